"""Access to the reference golden fixtures copied into tests/testdata (see REFERENCE_README.md)."""

import os

import numpy as np

TESTDATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


def path(name):
    """Absolute path of a file in tests/testdata."""
    return os.path.join(TESTDATA_DIR, name)


def load(name):
    """Loads tests/testdata/<name>.npz (no pickle)."""
    return np.load(path(name if name.endswith(".npz") else name + ".npz"))


def fixture_model_config():
    """configs/base.py set to the architecture of the reference fixture model (unet_weights.npz).

    8x8x3 images, 32 channels, one res block per level, channel_mult 1,2, attention at 4x4, 2 heads.
    """
    from configs import base  # pylint: disable=g-import-not-at-top

    config = base.get_config()
    config.data.image_size = 8
    config.model.num_channels = 32
    config.model.num_res_blocks = 1
    config.model.channel_mult = "1,2"
    config.model.attention_resolutions = "4"
    config.model.num_heads = 2
    return config


def nhwc(array):
    """Reference tensors are NCHW ([..., N, C, H, W] for step stacks); ours are NHWC."""
    array = np.asarray(array)
    if array.ndim == 4:
        return np.transpose(array, (0, 2, 3, 1))
    if array.ndim == 5:
        return np.transpose(array, (0, 1, 3, 4, 2))
    raise ValueError(f"expected a 4-D or 5-D image tensor, got shape {array.shape}")


def max_rel_error(actual, expected):
    """max |actual - expected| / max |expected|: the error relative to the array's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))
