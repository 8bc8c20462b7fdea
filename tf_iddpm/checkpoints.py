"""Where a workdir keeps its weights, and how inference code (sampling, eval, export) reads them.

A workdir — written by training or by ``tf_iddpm.convert`` — holds ``config.json`` and
``checkpoints/ckpt-N``.  Training saves the network as ``model`` and one EMA copy per rate as
``ema_<rate>`` (see :func:`ema_checkpoint_name`); a converted checkpoint has ``model`` only.  This
module imports nothing from training, so export and serving code can depend on it.
"""

import os
from typing import Optional

from absl import logging
import tensorflow as tf

CHECKPOINT_SUBDIR = "checkpoints"


def ema_checkpoint_name(rate: float) -> str:
    """Checkpoint attribute of the EMA weights for one rate, e.g. 0.9999 -> 'ema_0p9999'."""
    return "ema_" + repr(float(rate)).replace(".", "p")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_SUBDIR)


def latest_checkpoint(workdir: str) -> str:
    """Path prefix of the newest checkpoint of a workdir; a clear error when there is none."""
    path = tf.train.latest_checkpoint(checkpoint_dir(workdir))
    if path is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir(workdir)!r}: train first (run.py --mode=train) or "
            "convert a reference checkpoint (python -m tf_iddpm.convert ... --out <workdir>)")
    return path


def _has_object(path: str, name: str) -> bool:
    reader = tf.train.load_checkpoint(path)
    prefix = name + "/"
    return any(key.startswith(prefix) for key in reader.get_variable_to_shape_map())


def restore_inference_weights(net, workdir: str, *, use_ema: bool, ema_rates=(),
                              checkpoint_path: Optional[str] = None) -> str:
    """Loads the weights to sample / evaluate / export with into a built network.

    Args:
      net: a built Keras UNet of the workdir's configuration.
      workdir: the training (or conversion) workdir.
      use_ema: prefer the EMA weights (the slowest rate of ema_rates); falls back to the raw
        weights, with a warning, when the checkpoint has none (e.g. a converted checkpoint, whose
        published weights are already EMA weights).
      ema_rates: the EMA rates of the configuration.
      checkpoint_path: a specific checkpoint instead of the latest.

    Returns:
      A description of what was loaded ("<path>:<attribute>").
    """
    path = checkpoint_path or latest_checkpoint(workdir)
    name = "model"
    if use_ema and ema_rates:
        candidate = ema_checkpoint_name(max(ema_rates))
        if _has_object(path, candidate):
            name = candidate
        else:
            logging.warning("checkpoint %s has no %s weights; using the raw model weights", path, candidate)
    tf.train.Checkpoint(**{name: net}).read(path).assert_existing_objects_matched().expect_partial()
    return f"{path}:{name}"
