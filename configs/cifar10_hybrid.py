"""Unconditional CIFAR-10, L_hybrid objective, cosine noise schedule (the paper's main CIFAR model).

Reproduces improved-diffusion's README, "Unconditional CIFAR-10 with our L_hybrid objective and
cosine noise schedule" (checkpoint ``cifar10_uncond_50M_500K.pt``):

    MODEL_FLAGS="--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3"
    DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule cosine"
    TRAIN_FLAGS="--lr 1e-4 --batch_size 128"

plus the defaults those commands rely on (attention at 16x16 and 8x8, 4 heads, scale-shift norm,
rescaled timesteps and learned sigmas, EMA 0.9999, uniform timestep sampling) and 500K steps, as
the checkpoint name says.  Those, and 128 channels, the cosine schedule, learned sigmas, lr 1e-4
and batch 128, are ``configs/base.py``'s defaults; only what differs from them is set here.

    python run.py --config=configs/cifar10_hybrid.py --workdir=/ckpt/cifar10_hybrid
"""

from configs import base


def get_config():
    config = base.get_config()

    config.data.name = "cifar10"

    config.model.num_res_blocks = 3
    config.model.dropout = 0.3

    config.diffusion.steps = 4000

    config.export.model_name = "cifar10_hybrid"
    return config
