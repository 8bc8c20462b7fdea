"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every file this project writes into a workdir or an export directory (``config.json``, samples,
evaluation summaries and terms, export metadata and warm-up requests, ``models.config``,
``batching_parameters.txt``) goes through :func:`atomic_write`, so all of them get the same
guarantees.

Local paths:

* The data goes to a new temporary file in the target's directory (same filesystem, so the rename
  is atomic), is flushed and ``fsync``-ed, then renamed over the target; the directory is
  ``fsync``-ed too (best effort), so the rename survives a crash.
* On any failure (the writer callback raising, a full disk, a failing ``fsync`` or rename) the
  temporary file is removed and the exception propagates; a pre-existing target is left unchanged.
* The final file has the mode a plain ``open(path, "w")`` gives a new file: ``0o666`` minus the
  process umask (e.g. ``0o644`` under umask 022), also when it replaces an older file.  The
  temporary file is created with ``os.open(..., 0o666)``, so the kernel applies the umask (and a
  directory's default ACL) exactly as for ``open()`` — unlike ``tempfile.mkstemp``, whose ``0o600``
  would keep, e.g., a TF-Serving container running as another user from reading the file.

Remote paths (anything with a scheme, e.g. ``gs://bucket/run``) go through ``tf.io.gfile``: the
bytes are built in memory, uploaded to a temporary object next to the target and renamed over it
(``overwrite=True``); the temporary object is deleted on failure.  Object stores commit an upload
whole, so readers still never see a partial file, but there is no ``fsync`` and no file mode
(access is the bucket's IAM), and on GCS the rename is a copy plus a delete.

This module imports only the standard library (TensorFlow only for remote paths), so ``run.py``,
``config_utils`` and ``export/`` can all use it.
"""

import io
import os
import secrets
from typing import BinaryIO, Callable, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` names a filesystem reached through ``tf.io.gfile`` (``gs://...``)."""
    return "://" in os.fspath(path)


def directory_error(path: PathLike, *, what: str = "directory") -> Optional[str]:
    """Why ``path`` cannot be (or become) a directory to write into, or None.

    A local path is refused when it, or its nearest existing ancestor, is not a directory (a
    file named like the directory, a path under a file).  Remote paths are not checked here.

    Args:
      path: the directory to write into; it need not exist yet.
      what: how the message names it (e.g. ``"--export_dir"``).
    """
    path = os.fspath(path)
    if is_remote(path):
        return None
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            return None
        existing = parent
    if os.path.isdir(existing):
        return None
    where = "is" if existing == os.path.abspath(path) else f"is under {existing!r}, which is"
    return f"{what}={path!r} {where} a file, not a directory; give a directory to write into"


def _temp_name(path: str) -> str:
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")


def _fsync_directory(directory: str) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open directories
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _atomic_write_remote(path: str, write: Callable[[BinaryIO], None]) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    buffer = io.BytesIO()
    write(buffer)
    directory = path.rsplit("/", 1)[0]
    tf.io.gfile.makedirs(directory)
    temp_path = _temp_name(path)
    try:
        with tf.io.gfile.GFile(temp_path, "wb") as file:
            file.write(buffer.getvalue())
        tf.io.gfile.rename(temp_path, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(temp_path):
            tf.io.gfile.remove(temp_path)
        raise


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> str:
    """Writes a file atomically through ``write(file)``; see the module docstring for guarantees.

    Args:
      path: the file to write; its parent directories are created (with the umask's modes).
      write: called once with a binary file object open for writing (seekable for local paths,
        an in-memory buffer for remote ones); it writes the whole content.  Nothing is visible at
        ``path`` until it returns.

    Returns:
      ``path`` as a string.

    Raises:
      Whatever ``write`` or the filesystem raises; the target is then unchanged and no temporary
      file is left behind.
    """
    path = os.fspath(path)
    if is_remote(path):
        _atomic_write_remote(path, write)
        return path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    while True:
        temp_path = _temp_name(os.path.join(directory, os.path.basename(path)))
        try:
            # 0o666 & ~umask, as open() would give; O_EXCL: never reuse someone else's file.
            descriptor = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        _remove_quietly(temp_path)
        raise
    _fsync_directory(directory)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> str:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda file: file.write(data))


def atomic_write_text(path: PathLike, text: str) -> str:
    """:func:`atomic_write` of ``text``, UTF-8 encoded."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def make_temp_dir(parent: PathLike, prefix: str) -> str:
    """Creates a new, uniquely named directory in ``parent`` with the mode ``os.makedirs`` gives.

    For building a directory that is then renamed into place whole (a converted workdir):
    unlike ``tempfile.mkdtemp`` (mode ``0o700``), the renamed directory is readable by others as
    far as the umask allows.  Local paths only.

    Returns:
      The new directory's path.
    """
    parent = os.fspath(parent)
    os.makedirs(parent, exist_ok=True)
    while True:
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(4)}")
        try:
            os.mkdir(path, 0o777)  # 0o777 & ~umask
            return path
        except FileExistsError:
            continue
