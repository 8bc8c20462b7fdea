"""Unconditional ImageNet 64x64, L_hybrid objective, cosine noise schedule.

Reproduces improved-diffusion's README, "Unconditional ImageNet-64 with our L_hybrid objective and
cosine noise schedule" (checkpoint ``imagenet64_uncond_100M_1500K.pt``):

    MODEL_FLAGS="--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True"
    DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule cosine"
    TRAIN_FLAGS="--lr 1e-4 --batch_size 128"

with 1.5M steps as the checkpoint name says.  Data: the TFDS ``imagenet_resized/64x64`` dataset
(ImageNet box-resized to 64x64; it must be prepared in ``data.data_dir``).
"""

import pathlib
import sys

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:  # loaded by path (config_flags) from outside the repository root
    sys.path.insert(0, _REPO_ROOT)

from configs import base  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config():
    config = base.get_config()

    config.data.name = "imagenet_resized/64x64"
    config.data.eval_split = "validation"
    config.data.image_size = 64

    config.model.num_channels = 128
    config.model.num_res_blocks = 3
    config.model.dropout = 0.0
    config.model.channel_mult = ""          # the reference's 64x64 default, (1, 2, 3, 4)
    config.model.attention_resolutions = "16,8"

    config.diffusion.steps = 4000
    config.diffusion.noise_schedule = "cosine"
    config.diffusion.learn_sigma = True
    config.diffusion.use_kl = False

    config.train.lr = 1e-4
    config.train.batch_size = 128
    config.train.ema_rate = "0.9999"
    config.train.schedule_sampler = "uniform"
    config.train.num_steps = 1_500_000

    config.export.model_name = "imagenet64_hybrid"
    return config
