"""Imports openai/improved-diffusion checkpoints into the Keras UNet.

Library use::

    state_dict = convert.load_state_dict("model.pt")      # or an .npz of the state_dict
    convert.assign_state_dict(unet, state_dict)            # strict: every key, every shape

Command line (writes a directory laid out like a training workdir)::

    python -m tf_iddpm.convert --checkpoint model.pt --config configs/cifar10_hybrid.py \\
        --out /tmp/cifar10_imported

    <out>/config.json              the config, as to_json_best_effort(indent=2)
    <out>/checkpoints/ckpt-1.*     tf.train.Checkpoint(model=unet) via a CheckpointManager

Weight layouts (PyTorch -> Keras): Conv2d OIHW -> HWIO; Linear [out, in] -> [in, out]; the
attention's kernel-1 Conv1d (qkv, proj_out) [out, in, 1] -> Dense [in, out], keeping the
reference's per-head [q | k | v] channel order that :class:`tf_iddpm.unet.AttentionBlock` uses;
GroupNorm weight/bias -> gamma/beta; Embedding unchanged.
"""

import os
import shutil
import sys

from absl import app
from absl import flags
import keras
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from tf_iddpm import factory
from tf_iddpm import fileio
from tf_iddpm import torch_checkpoint
from tf_iddpm import unet as unet_lib


def load_state_dict(path):
    """Reads a reference state_dict from a torch ``.pt``/``.pth`` file or an ``.npz``.

    Args:
      path: checkpoint file; ``.npz`` is read with numpy, anything else as a torch zip archive
        (without importing torch).

    Returns:
      dict from state_dict key to np.ndarray (PyTorch layouts).
    """
    if str(path).endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    return torch_checkpoint.load_state_dict(path)


def _torch_to_keras(layer, suffix, value):
    """Converts one reference tensor to the layout of the matching Keras variable."""
    if isinstance(layer, keras.layers.Conv2D) and suffix == "weight":
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if isinstance(layer, keras.layers.Dense) and suffix == "weight":
        if value.ndim == 3:  # kernel-1 Conv1d [out, in, 1]
            if value.shape[-1] != 1:
                return value  # left mis-shaped on purpose: reported by the shape check
            value = value[:, :, 0]
        return value.T  # Linear [out, in] -> [in, out]
    return value


def _keras_to_torch(layer, suffix, value, torch_ndim):
    """Inverse of :func:`_torch_to_keras` (``torch_ndim`` tells Linear from Conv1d)."""
    if isinstance(layer, keras.layers.Conv2D) and suffix == "weight":
        return value.transpose(3, 2, 0, 1)
    if isinstance(layer, keras.layers.Dense) and suffix == "weight":
        return value.T[:, :, None] if torch_ndim == 3 else value.T
    return value


def _layer_variables(layer):
    """The reference's parameter suffixes of a layer and the matching Keras variables."""
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        return {"weight": layer.kernel, "bias": layer.bias}
    if isinstance(layer, unet_lib.GroupNorm32):
        return {"weight": layer.gamma, "bias": layer.beta}
    if isinstance(layer, keras.layers.Embedding):
        return {"weight": layer.embeddings}
    raise TypeError(f"no reference mapping for layer {layer.name!r} ({type(layer).__name__})")


def _is_attention_1x1(prefix):
    return prefix.endswith(".qkv") or prefix.endswith(".proj_out")


def variable_map(model):
    """Maps every reference state_dict key to ``(keras_layer, suffix, variable)``.

    Args:
      model: a :class:`tf_iddpm.unet.UNetModel` (or SuperResModel).

    Returns:
      dict ordered like the reference's state_dict.
    """
    mapping = {}
    for prefix, layer in model.torch_layers().items():
        for suffix, variable in _layer_variables(layer).items():
            mapping[f"{prefix}.{suffix}"] = (layer, suffix, variable)
    return mapping


def assign_state_dict(model, state_dict):
    """Copies a reference state_dict into the Keras model, strictly.

    Args:
      model: a built :class:`tf_iddpm.unet.UNetModel` / SuperResModel.
      state_dict: mapping from reference key to array in PyTorch layout.

    Raises:
      ValueError: listing every missing key, unexpected key and shape mismatch (nothing is
        assigned in that case).
    """
    mapping = variable_map(model)
    missing = [key for key in mapping if key not in state_dict]
    unexpected = [key for key in state_dict if key not in mapping]
    mismatched = []
    converted = {}
    for key, (layer, suffix, variable) in mapping.items():
        if key not in state_dict:
            continue
        value = np.asarray(state_dict[key])
        new_value = _torch_to_keras(layer, suffix, value)
        if tuple(new_value.shape) != tuple(variable.shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)} -> {tuple(new_value.shape)}, "
                f"model expects {tuple(variable.shape)} ({variable.path})"
            )
        else:
            converted[key] = new_value
    if missing or unexpected or mismatched:
        lines = [
            f"state_dict does not match the model {model.name!r} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mis-shaped keys)"
        ]
        if missing:
            lines.append("missing keys: " + ", ".join(missing))
        if unexpected:
            lines.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            lines.append("shape mismatches:\n  " + "\n  ".join(mismatched))
        raise ValueError("\n".join(lines))
    for key, (_, _, variable) in mapping.items():
        variable.assign(converted[key].astype(variable.dtype))


def model_state_dict(model):
    """The Keras model's weights as a reference state_dict (PyTorch layouts, float32 numpy).

    Inverse of :func:`assign_state_dict`; useful to inspect a model or to compare with a
    reference checkpoint.
    """
    state = {}
    for key, (layer, suffix, variable) in variable_map(model).items():
        prefix = key[: -len(suffix) - 1]
        torch_ndim = 3 if _is_attention_1x1(prefix) else 2
        state[key] = _keras_to_torch(layer, suffix, np.asarray(variable.numpy()), torch_ndim)
    return state


def convert_checkpoint(checkpoint_path, config, out_dir):
    """Builds the model of ``config``, loads the reference checkpoint and writes a workdir.

    The output is written to a temporary sibling directory and renamed into place, so
    ``out_dir`` is either complete or absent.

    Args:
      checkpoint_path: reference ``.pt`` or ``.npz`` state_dict.
      config: ml_collections ConfigDict shaped like ``configs/base.py``.
      out_dir: destination; must not exist or be an empty directory.

    Returns:
      path of the written TF checkpoint (``<out_dir>/checkpoints/ckpt-1``).
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(
            f"--out {out_dir} exists and is not an empty directory; refusing to overwrite it"
        )
    model = factory.create_model_from_config(config)
    assign_state_dict(model, load_state_dict(checkpoint_path))

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = fileio.make_temp_dir(parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
    try:
        fileio.atomic_write_text(
            os.path.join(tmp_dir, "config.json"), config.to_json_best_effort(indent=2)
        )
        manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=model), os.path.join(tmp_dir, "checkpoints"), max_to_keep=1
        )
        saved = manager.save(checkpoint_number=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above); rename needs it gone or empty
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return os.path.join(out_dir, "checkpoints", os.path.basename(saved))


def _define_flags():
    # Defined only when run as a program, so importing this module next to another entry point
    # (run.py has its own --config) cannot clash.
    flags.DEFINE_string("checkpoint", None, "improved-diffusion .pt (or .npz) state_dict")
    flags.DEFINE_string("out", None, "output directory (must not exist or be empty)")
    config_flags.DEFINE_config_file(
        "config", None, "configs/<name>.py describing the model", lock_config=True
    )
    flags.mark_flags_as_required(["checkpoint", "out", "config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        path = convert_checkpoint(flags.FLAGS.checkpoint, flags.FLAGS.config, flags.FLAGS.out)
    except ValueError as error:  # bad flags or a checkpoint that does not fit the config
        sys.exit(f"tf_iddpm.convert: {error}")
    print(f"wrote {path}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
