"""Class-conditional ImageNet 64x64, L_hybrid, 270M parameters.

Reproduces improved-diffusion's README, "Class-conditional ImageNet-64 model (270M parameters,
trained for 250K iterations)" (checkpoint ``imagenet64_cond_270M_250K.pt``):

    MODEL_FLAGS="--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True"
    DIFFUSION_FLAGS="--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False"
    TRAIN_FLAGS="--lr 3e-4 --batch_size 2048"

i.e. ``imagenet64_hybrid.py`` with a wider UNet, the 1000 ImageNet labels as condition, the
un-rescaled variants of the timestep input and of the learned-sigma loss, and the large-batch
optimiser settings.  The batch of 2048 is global: it is split over the replicas.
"""

from configs import imagenet64_hybrid


def get_config():
    config = imagenet64_hybrid.get_config()

    config.data.class_cond = True
    config.data.num_classes = 1000

    config.model.num_channels = 192

    config.diffusion.rescale_learned_sigmas = False
    config.diffusion.rescale_timesteps = False

    config.train.lr = 3e-4
    config.train.batch_size = 2048
    config.train.num_steps = 250_000

    config.export.model_name = "imagenet64_cond"
    return config
