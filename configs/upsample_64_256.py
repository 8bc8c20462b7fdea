"""The class-conditional 64x64 -> 256x256 ImageNet upsampler (280M parameters).

Reproduces improved-diffusion's README, "Upsampling 256x256 model (280M parameters, trained for
500K iterations)" (checkpoint ``upsample_cond_500K.pt``), run with ``scripts/super_res_train.py``
whose defaults are ``--large_size 256 --small_size 64``:

    MODEL_FLAGS="--num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True"
    DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False"
    TRAIN_FLAGS="--lr 3e-4 --batch_size 256"

The model generates the 256x256 image (``data.image_size``) conditioned on its area-downsampled
64x64 version (``data.low_res_size``) and on the class label.  Data: ImageNet at full resolution,
TFDS ``imagenet2012`` (a manual-download dataset), center-cropped and resized to 256x256.
"""

from configs import base


def get_config():
    config = base.get_config()

    config.data.name = "imagenet2012"
    config.data.eval_split = "validation"
    config.data.image_size = 256  # the reference's large_size
    config.data.low_res_size = 64  # the reference's small_size
    config.data.class_cond = True
    config.data.num_classes = 1000

    config.model.num_channels = 192

    config.diffusion.steps = 4000
    config.diffusion.noise_schedule = "linear"
    config.diffusion.rescale_learned_sigmas = False
    config.diffusion.rescale_timesteps = False

    config.train.lr = 3e-4
    config.train.batch_size = 256

    config.export.model_name = "upsample_64_256"
    return config
