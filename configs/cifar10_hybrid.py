"""Unconditional CIFAR-10, L_hybrid objective, cosine noise schedule (the paper's main CIFAR model).

Reproduces improved-diffusion's README, "Unconditional CIFAR-10 with our L_hybrid objective and
cosine noise schedule" (checkpoint ``cifar10_uncond_50M_500K.pt``):

    MODEL_FLAGS="--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3"
    DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule cosine"
    TRAIN_FLAGS="--lr 1e-4 --batch_size 128"

plus the defaults those commands rely on (attention at 16x16 and 8x8, 4 heads, scale-shift norm,
rescaled timesteps and learned sigmas, EMA 0.9999, uniform timestep sampling) and 500K steps, as
the checkpoint name says.

    python run.py --config=configs/cifar10_hybrid.py --workdir=/ckpt/cifar10_hybrid
"""

import pathlib
import sys

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:  # loaded by path (config_flags) from outside the repository root
    sys.path.insert(0, _REPO_ROOT)

from configs import base  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config():
    config = base.get_config()

    config.data.name = "cifar10"
    config.data.eval_split = "test"
    config.data.image_size = 32

    config.model.num_channels = 128
    config.model.num_res_blocks = 3
    config.model.dropout = 0.3
    config.model.channel_mult = ""          # the reference's 32x32 default, (1, 2, 2, 2)
    config.model.attention_resolutions = "16,8"

    config.diffusion.steps = 4000
    config.diffusion.noise_schedule = "cosine"
    config.diffusion.learn_sigma = True
    config.diffusion.use_kl = False         # L_hybrid: rescaled MSE + lambda * L_vlb

    config.train.lr = 1e-4
    config.train.batch_size = 128
    config.train.ema_rate = "0.9999"
    config.train.schedule_sampler = "uniform"
    config.train.num_steps = 500_000

    config.export.model_name = "cifar10_hybrid"
    return config
