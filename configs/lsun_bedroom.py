"""Unconditional LSUN bedroom 256x256, L_hybrid, linear noise schedule, T=1000.

Reproduces improved-diffusion's README, "LSUN bedroom model (lr=1e-4)" (checkpoint
``lsun_uncond_100M_1200K_bs128.pt``):

    MODEL_FLAGS="--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True --use_scale_shift_norm False --attention_resolutions 16"
    DIFFUSION_FLAGS="--diffusion_steps 1000 --noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False"
    TRAIN_FLAGS="--lr 1e-4 --batch_size 128"

with 1.2M steps as the checkpoint name says.  The README's second LSUN model differs only in the
learning rate: ``--config.train.lr=2e-5`` (checkpoint ``lsun_uncond_100M_2400K_bs64.pt``, 2.4M
steps: ``--config.train.num_steps=2400000``).  Data: TFDS ``lsun/bedroom``.
"""

from configs import base


def get_config():
    config = base.get_config()

    config.data.name = "lsun/bedroom"
    config.data.eval_split = "validation"
    config.data.image_size = 256

    config.model.num_heads = 1
    config.model.use_scale_shift_norm = False
    config.model.attention_resolutions = "16"

    config.diffusion.noise_schedule = "linear"
    config.diffusion.rescale_learned_sigmas = False
    config.diffusion.rescale_timesteps = False

    config.train.num_steps = 1_200_000

    config.export.model_name = "lsun_bedroom"
    return config
