"""A TFDS builder for the handwritten digits that ship with scikit-learn (the default dataset).

``sklearn.datasets.load_digits()`` holds 1797 real 8x8 grayscale digits from 43 writers, with
integer intensities 0..16. The data come inside the scikit-learn package, so preparing needs
no network. Pixels are stored as uint8: ``round(v * 255 / 16)`` with numpy's
round-half-to-even (0 -> 0, 8 -> 128, 16 -> 255). Images keep their native ``[8, 8, 1]`` shape;
:mod:`tf_iddpm.data_sources` upscales them to the configured image size.

Splits are fixed and contiguous in scikit-learn's order: ``train`` is examples 0..1499 and
``test`` is examples 1500..1796 (297). The digits are stored roughly by writer, so the test
split is mostly written by people not seen in training (like the original UCI split). That
is the honest setting for a likelihood (bits/dim) evaluation. Shuffling while writing is
disabled, so each split reads back in scikit-learn's order.
"""

import fcntl
import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

# Name under which tfds registers the builder (snake_case of the class name).
DIGITS_BUILDER_NAME = "iddpm_digits"
DIGITS_NUM_EXAMPLES = 1797
DIGITS_NUM_TRAIN = 1500
DIGITS_IMAGE_SHAPE = (8, 8, 1)
DIGITS_NUM_CLASSES = 10

_SPLIT_RANGES = {
    "train": (0, DIGITS_NUM_TRAIN),
    "test": (DIGITS_NUM_TRAIN, DIGITS_NUM_EXAMPLES),
}


def digits_to_uint8(values):
    """Maps scikit-learn digit intensities 0..16 to uint8 0..255.

    Args:
        values: array of intensities in [0, 16], e.g. ``load_digits().images`` ``[N, 8, 8]``.

    Returns:
        uint8 array of the same shape, ``round(v * 255 / 16)``.
    """
    return np.round(np.asarray(values, np.float64) * (255.0 / 16.0)).astype(np.uint8)


class IddpmDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits as a TFDS dataset, prepared offline."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "scikit-learn load_digits, train = first 1500, test = last 297."}

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared" to
    # stdout unconditionally; nothing is downloaded here, so log what happens instead.
    def _log_download_bytes(self):
        logging.vlog(1, "preparing %s from scikit-learn's digits in %s", self.name, self.data_dir)

    def _log_download_done(self):
        logging.info("prepared the digits dataset in %s (later runs reuse it)", self.data_dir)

    def _info(self):
        # DatasetInfo(builder=self, ...) directly: tfds' dataset_info_from_configs needs
        # package metadata files that a plain module does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "1797 8x8 grayscale handwritten digits (UCI optical recognition test set) "
                "shipped with scikit-learn; intensities 0..16 mapped to round(v * 255 / 16)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=DIGITS_IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=DIGITS_NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=(
                "https://scikit-learn.org/stable/modules/generated/"
                "sklearn.datasets.load_digits.html"
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ship with scikit-learn; nothing to download.
        return {
            split: self._generate_examples(start, stop)
            for split, (start, stop) in _SPLIT_RANGES.items()
        }

    def _generate_examples(self, start, stop):
        # Imported here: scikit-learn is only needed while preparing.
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits_to_uint8(digits.images)[..., None]
        for index in range(start, stop):
            yield index, {"image": images[index], "label": int(digits.target[index])}


def prepare_digits(data_dir=None):
    """Returns the digits builder, preparing it into ``data_dir`` first if needed.

    Several processes (e.g. multi-worker training) may call this at once. A file lock next to
    the dataset lets exactly one of them write it.

    Args:
        data_dir: TFDS data directory; ``None`` or ``""`` means the TFDS default
            (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    Returns:
        A prepared :class:`IddpmDigits` builder.
    """
    builder = IddpmDigits(data_dir=data_dir or None)
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{DIGITS_BUILDER_NAME}.lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            # Another process may have finished while this one waited for the lock.
            builder = IddpmDigits(data_dir=data_dir or None)
            if not builder.is_prepared():
                builder.download_and_prepare()
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return IddpmDigits(data_dir=data_dir or None)
