"""Where a workdir keeps its weights, and how inference code (sampling, eval, export) reads them.

A workdir — written by training or by ``tf_iddpm.convert`` — holds ``config.json`` and
``checkpoints/ckpt-N``.  Training saves the network as ``model`` and one EMA copy per rate as
``ema_<rate>`` (see :func:`ema_checkpoint_name`); a converted checkpoint has ``model`` only.  This
module imports nothing from training, so export and serving code can depend on it.

Damaged checkpoints (a truncated or missing ``ckpt-N.data-*`` file, a truncated or missing
``ckpt-N.index``: a full disk, a copy cut short) are found by :func:`check_readable`, which reads
every value, and reported as :class:`DamagedCheckpointError` naming the file:

* Training resumes from :func:`newest_readable_checkpoint`, which skips damaged newer checkpoints
  with a warning naming each, moves their files aside into ``checkpoints/damaged/`` (kept, never
  deleted) and rewrites the ``checkpoint`` state file without them, so that a later
  ``CheckpointManager.save`` at the same step number cannot overwrite or mix with them and its
  ``max_to_keep`` clean-up cannot delete them.
* Sampling, evaluation and export refuse a damaged checkpoint with a one-line error that says how
  to pick another (``--checkpoint=<prefix>``); they move nothing.
"""

import dataclasses
import os
import re
from typing import List, Optional

from absl import logging
import tensorflow as tf

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged"


class CheckpointError(Exception):
    """A checkpoint problem for the user to act on (``run.py`` prints it as one line)."""


class DamagedCheckpointError(CheckpointError, ValueError):
    """A checkpoint whose index or data cannot be read; the message names the damaged file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one is needed."""


def ema_checkpoint_name(rate: float) -> str:
    """Checkpoint attribute of the EMA weights for one rate, e.g. 0.9999 -> 'ema_0p9999'."""
    return "ema_" + repr(float(rate)).replace(".", "p")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINT_SUBDIR)


def _listed_checkpoints(directory: str) -> List[str]:
    """The prefixes the ``checkpoint`` state file lists, oldest first (the newest last)."""
    state = tf.train.get_checkpoint_state(directory)
    if state is None or not state.model_checkpoint_path:
        return []
    paths = [p for p in state.all_model_checkpoint_paths if p != state.model_checkpoint_path]
    return paths + [state.model_checkpoint_path]


def latest_checkpoint(workdir: str) -> str:
    """Path prefix of the newest checkpoint of a workdir; a clear error when there is none.

    The newest one the ``checkpoint`` state file lists, even if its files are damaged or gone
    (``tf.train.latest_checkpoint`` would then say there is no checkpoint at all).
    """
    listed = _listed_checkpoints(checkpoint_dir(workdir))
    if not listed:
        raise CheckpointNotFoundError(
            f"no checkpoint in {checkpoint_dir(workdir)!r}: train first (run.py --mode=train) or "
            "convert a reference checkpoint (python -m tf_iddpm.convert ... --out <workdir>)"
        )
    return listed[-1]


def _data_files(prefix: str) -> List[str]:
    return sorted(tf.io.gfile.glob(prefix + ".data-*-of-*"))


def _missing_data_file(prefix: str) -> Optional[str]:
    """A data shard the checkpoint needs that does not exist, or None."""
    shards = _data_files(prefix)
    if not shards:
        return prefix + ".data-00000-of-00001"
    num_shards = int(re.search(r"-of-(\d+)$", shards[0]).group(1))
    for i in range(num_shards):
        name = f"{prefix}.data-{i:05d}-of-{num_shards:05d}"
        if name not in shards:
            return name
    return None


def check_readable(prefix: str) -> None:
    """Checks that a checkpoint's index parses and that every value in it can be read.

    Every tensor is read (TensorFlow verifies its checksum), one at a time, so memory stays at the
    largest tensor: the values a restore would read, with no model built and nothing assigned.
    The cheaper check (data-file sizes against the index) would need a parser of the index's table
    format and misses corrupt bytes inside a file of the right length.

    Args:
      prefix: a checkpoint path prefix, e.g. ``<workdir>/checkpoints/ckpt-12``.

    Raises:
      DamagedCheckpointError: naming the missing or unreadable file.
    """
    index = prefix + ".index"
    if not tf.io.gfile.exists(index):
        raise DamagedCheckpointError(f"checkpoint {prefix} is damaged: {index} is missing")
    missing = _missing_data_file(prefix)
    if missing is not None:
        raise DamagedCheckpointError(f"checkpoint {prefix} is damaged: {missing} is missing")
    try:
        reader = tf.train.load_checkpoint(prefix)
        names = sorted(reader.get_variable_to_dtype_map())
    except Exception as e:  # pylint: disable=broad-except
        raise DamagedCheckpointError(
            f"checkpoint {prefix} is damaged: {index} cannot be read ({_one_line(e)})"
        ) from e
    for name in names:
        try:
            reader.get_tensor(name)
        except Exception as e:  # pylint: disable=broad-except
            shards = _data_files(prefix)
            what = shards[0] if len(shards) == 1 else "one of " + ", ".join(shards)
            raise DamagedCheckpointError(
                f"checkpoint {prefix} is damaged: {what} is truncated or corrupt (reading "
                f"{name!r} failed: {_one_line(e)})"
            ) from e


def check_exists(prefix: str) -> None:
    """Checks that a checkpoint prefix given by the user (``--checkpoint=``) names a checkpoint.

    Raises:
      CheckpointNotFoundError: naming the missing ``.index`` file and the checkpoints that do
        exist in that directory.
    """
    if tf.io.gfile.exists(prefix + ".index"):
        return
    directory = os.path.dirname(prefix) or "."
    existing = (
        sorted(
            name[: -len(".index")]
            for name in tf.io.gfile.listdir(directory)
            if name.endswith(".index")
        )
        if tf.io.gfile.isdir(directory)
        else []
    )
    raise CheckpointNotFoundError(
        f"no such checkpoint {prefix} ({prefix}.index does not exist); give a prefix such as "
        "<workdir>/checkpoints/ckpt-10, without the .index/.data suffix"
        + (f" (in {directory}: {', '.join(existing)})" if existing else "")
    )


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def is_readable(prefix: str) -> bool:
    try:
        check_readable(prefix)
    except DamagedCheckpointError:
        return False
    return True


def _checkpoint_files(prefix: str) -> List[str]:
    index = prefix + ".index"
    return ([index] if tf.io.gfile.exists(index) else []) + _data_files(prefix)


def _move_aside(prefix: str, directory: str) -> str:
    """Moves a checkpoint's files into ``<directory>/damaged/``; returns the new prefix."""
    damaged_dir = os.path.join(directory, DAMAGED_SUBDIR)
    tf.io.gfile.makedirs(damaged_dir)
    base = os.path.basename(prefix)
    target, n = os.path.join(damaged_dir, base), 0
    while tf.io.gfile.glob(target + ".*"):  # an earlier damaged checkpoint of the same step
        n += 1
        target = os.path.join(damaged_dir, f"{base}.{n}")
    for path in _checkpoint_files(prefix):
        tf.io.gfile.rename(path, target + path[len(prefix) :])
    return target


def _relative_to(directory: str, path: str) -> str:
    if os.path.dirname(path) == directory.rstrip("/"):
        return os.path.basename(path)
    return path


def newest_readable_checkpoint(directory: str) -> Optional[str]:
    """The newest readable checkpoint of a training checkpoint directory, for resuming.

    Damaged newer checkpoints (see :func:`check_readable`) are skipped with a warning naming the
    damaged file.  Their files are kept but moved into ``<directory>/damaged/`` (``ckpt-20.index``
    ...; ``ckpt-20.1.*`` when that name is taken), and the ``checkpoint`` state file is rewritten
    to list only the remaining ones.  A ``tf.train.CheckpointManager`` created afterwards thus
    neither lists them (its ``max_to_keep`` clean-up cannot delete them) nor finds their names taken
    when it saves the same step number again.  Create the manager after calling this.

    Args:
      directory: the checkpoint directory (``<workdir>/checkpoints``).

    Returns:
      The prefix to restore, or None when the directory has no checkpoint (a first run).

    Raises:
      DamagedCheckpointError: if checkpoints are listed but none is readable; then nothing is moved
        (training would otherwise silently start over from step 0).
    """
    listed = _listed_checkpoints(directory)
    if not listed:
        return None
    damaged = []
    readable = None
    for prefix in reversed(listed):
        try:
            check_readable(prefix)
        except DamagedCheckpointError as e:
            damaged.append((prefix, str(e)))
            continue
        readable = prefix
        break
    if readable is None:
        details = "; ".join(message for _, message in damaged)
        raise DamagedCheckpointError(
            f"no readable checkpoint in {directory}: {details}. Move the damaged files away to "
            "train from step 0, or start a new --workdir"
        )
    if not damaged:
        return readable
    for prefix, message in damaged:
        moved = _move_aside(prefix, directory)
        logging.warning(
            "%s; resuming from the older %s instead. The damaged files are kept as %s.*",
            message,
            readable,
            moved,
        )
    # The remaining checkpoints, with their timestamps (used by keep_checkpoint_every_n_hours).
    state = tf.train.get_checkpoint_state(directory)
    damaged_prefixes = {prefix for prefix, _ in damaged}
    kept, kept_times = [], []
    times = list(state.all_model_checkpoint_timestamps)
    for i, path in enumerate(state.all_model_checkpoint_paths):
        if path not in damaged_prefixes:
            kept.append(path)
            if len(times) == len(state.all_model_checkpoint_paths):
                kept_times.append(times[i])
    if readable not in kept:
        kept.append(readable)
    # Relative names, as CheckpointManager writes them, so the workdir can still be moved.
    kept = [_relative_to(directory, path) for path in kept]
    tf.compat.v1.train.update_checkpoint_state(
        directory,
        _relative_to(directory, readable),
        all_model_checkpoint_paths=kept,
        all_model_checkpoint_timestamps=kept_times or None,
        last_preserved_timestamp=state.last_preserved_timestamp or None,
    )
    return readable


def _has_object(path: str, name: str) -> bool:
    reader = tf.train.load_checkpoint(path)
    prefix = name + "/"
    return any(key.startswith(prefix) for key in reader.get_variable_to_shape_map())


def _readable_alternative(workdir: str, damaged: str) -> Optional[str]:
    """The newest readable checkpoint of the workdir other than ``damaged``, or None."""
    try:
        listed = _listed_checkpoints(checkpoint_dir(workdir))
    except Exception:  # pylint: disable=broad-except
        return None
    for prefix in reversed(listed):
        if prefix != damaged and is_readable(prefix):
            return prefix
    return None


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """Which weights :func:`load_inference_weights` loaded: the checkpoint prefix and the
    checkpoint attribute (``"model"`` or an EMA name such as ``"ema_0p9999"``).

    ``str()`` gives ``"<path>:<attribute>"`` for logs and result files.
    """

    path: str
    attribute: str

    def __str__(self):
        return f"{self.path}:{self.attribute}"


def inference_checkpoint(workdir: str, checkpoint_path: Optional[str] = None) -> str:
    """The checkpoint that sampling, evaluation or export read: checked, before any network is built.

    Args:
      workdir: the training (or conversion) workdir.
      checkpoint_path: a specific checkpoint prefix (``--checkpoint``) instead of the newest.

    Returns:
      The checkpoint prefix, readable (:func:`check_readable`).

    Raises:
      CheckpointNotFoundError: if the workdir has no checkpoint, or ``checkpoint_path`` names none.
      DamagedCheckpointError: if the checkpoint is damaged; the one-line message names the damaged
        file and says how to pick another (``--checkpoint=<prefix>``, naming the newest readable
        one of the workdir when there is one).
    """
    if checkpoint_path:
        check_exists(checkpoint_path)
    path = checkpoint_path or latest_checkpoint(workdir)
    try:
        check_readable(path)
    except DamagedCheckpointError as e:
        alternative = _readable_alternative(workdir, path)
        hint = (
            f"pick another checkpoint with --checkpoint=<prefix>, e.g. --checkpoint={alternative}"
            if alternative
            else "pick another checkpoint with --checkpoint=<prefix> (this workdir has no readable "
            "one)"
        )
        raise DamagedCheckpointError(f"{e}; {hint}") from None
    return path


def load_inference_weights(net, path: str, *, use_ema: bool, ema_rates=()) -> LoadedWeights:
    """Loads the weights to sample / evaluate / export with from a checkpoint into a built network.

    Args:
      net: a built Keras UNet of the checkpoint's configuration.
      path: a checkpoint prefix, as :func:`inference_checkpoint` returns it.
      use_ema: prefer the EMA weights (the slowest rate of ema_rates); falls back to the raw
        weights, with a warning, when the checkpoint has none (e.g. a converted checkpoint, whose
        published weights are already EMA weights).
      ema_rates: the EMA rates of the configuration.

    Returns:
      What was loaded, a :class:`LoadedWeights` (``str()`` of it: ``"<path>:<attribute>"``).

    Raises:
      AssertionError: if the checkpoint's weights do not fit the network.
    """
    name = "model"
    if use_ema and ema_rates:
        candidate = ema_checkpoint_name(max(ema_rates))
        if _has_object(path, candidate):
            name = candidate
        else:
            logging.warning(
                "checkpoint %s has no %s weights; using the raw model weights", path, candidate
            )
    tf.train.Checkpoint(**{name: net}).read(path).assert_existing_objects_matched().expect_partial()
    return LoadedWeights(path=path, attribute=name)
