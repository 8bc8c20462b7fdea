"""Unconditional ImageNet 64x64, L_hybrid objective, cosine noise schedule.

Reproduces improved-diffusion's README, "Unconditional ImageNet-64 with our L_hybrid objective and
cosine noise schedule" (checkpoint ``imagenet64_uncond_100M_1500K.pt``):

    MODEL_FLAGS="--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True"
    DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule cosine"
    TRAIN_FLAGS="--lr 1e-4 --batch_size 128"

with 1.5M steps as the checkpoint name says.  Data: the TFDS ``imagenet_resized/64x64`` dataset
(ImageNet box-resized to 64x64; it must be prepared in ``data.data_dir``).
"""

from configs import base


def get_config():
    config = base.get_config()

    config.data.name = "imagenet_resized/64x64"
    config.data.eval_split = "validation"
    config.data.image_size = 64

    config.model.num_res_blocks = 3

    config.diffusion.steps = 4000

    config.train.num_steps = 1_500_000

    config.export.model_name = "imagenet64_hybrid"
    return config
