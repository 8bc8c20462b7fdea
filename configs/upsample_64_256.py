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

import pathlib
import sys

_REPO_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:  # loaded by path (config_flags) from outside the repository root
    sys.path.insert(0, _REPO_ROOT)

from configs import base  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config():
    config = base.get_config()

    config.data.name = "imagenet2012"
    config.data.eval_split = "validation"
    config.data.image_size = 256            # the reference's large_size
    config.data.low_res_size = 64           # the reference's small_size
    config.data.class_cond = True
    config.data.num_classes = 1000

    config.model.num_channels = 192
    config.model.num_res_blocks = 2
    config.model.dropout = 0.0
    config.model.channel_mult = ""          # the reference's 256x256 default, (1, 1, 2, 2, 4, 4)
    config.model.attention_resolutions = "16,8"

    config.diffusion.steps = 4000
    config.diffusion.noise_schedule = "linear"
    config.diffusion.learn_sigma = True
    config.diffusion.rescale_learned_sigmas = False
    config.diffusion.rescale_timesteps = False

    config.train.lr = 3e-4
    config.train.batch_size = 256
    config.train.num_steps = 500_000

    config.export.model_name = "upsample_64_256"
    return config
