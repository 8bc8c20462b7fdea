"""Unconditional CIFAR-10, L_vlb objective, cosine noise schedule.

Reproduces improved-diffusion's README, "Unconditional CIFAR-10 with the L_vlb objective and
cosine noise schedule" (checkpoint ``cifar10_uncond_vlb_50M_500K.pt``):

    MODEL_FLAGS="--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3"
    DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule cosine --use_kl True"
    TRAIN_FLAGS="--lr 1e-4 --batch_size 128 --schedule_sampler loss-second-moment"

i.e. ``cifar10_hybrid.py`` with the KL loss and the paper's importance-sampled timesteps
(Section 3.3: t is drawn with probability proportional to sqrt(E[L_t^2]) once every t has 10
recorded losses).
"""

from configs import cifar10_hybrid


def get_config():
    config = cifar10_hybrid.get_config()
    config.diffusion.use_kl = True
    config.train.schedule_sampler = "loss-second-moment"
    config.export.model_name = "cifar10_vlb"
    return config
