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
