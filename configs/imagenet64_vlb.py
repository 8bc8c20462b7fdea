"""Unconditional ImageNet 64x64, L_vlb objective, cosine noise schedule.

Reproduces improved-diffusion's README, "Unconditional ImageNet-64 with the L_vlb objective and
cosine noise schedule" (checkpoint ``imagenet64_uncond_vlb_100M_1500K.pt``):

    MODEL_FLAGS="--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True"
    DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule cosine --use_kl True"
    TRAIN_FLAGS="--lr 1e-4 --batch_size 128 --schedule_sampler loss-second-moment"

i.e. ``imagenet64_hybrid.py`` with the KL loss and importance-sampled timesteps (Section 3.3).
"""

from configs import imagenet64_hybrid


def get_config():
    config = imagenet64_hybrid.get_config()
    config.diffusion.use_kl = True
    config.train.schedule_sampler = "loss-second-moment"
    config.export.model_name = "imagenet64_vlb"
    return config
