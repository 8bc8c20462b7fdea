"""What the entry points (run.py, ``python -m export``) print: this project's lines, not the
frameworks'.

TensorFlow, oneDNN and TFDS log ~150 INFO lines per run (C++ start-up banners, "Load dataset
info", "Downloading and preparing dataset" for a dataset that is read from disk).  By default an
entry point shows only what a user acts on: this project's own log lines (config summary,
progress, losses, where results were written), other packages' warnings and errors (TFDS's
errors), and the TensorFlow C++ runtime's errors; TFDS's progress bars are off.  ``-v 1``
(``--verbosity=1``) shows everything, as before.

``TF_CPP_MIN_LOG_LEVEL`` does not reach the lines TensorFlow 2.21 logs while it loads its shared
libraries (through absl before ``absl::InitializeLog()``: "oneDNN custom operations are on", twice),
so :func:`import_quietly` imports TensorFlow and a mode's modules with the process's stderr
(file descriptor 2) sent to a temporary file, and writes back every captured line except C++ INFO
lines.

Called by the entry points after their flags are parsed and before TensorFlow is imported; importing
this module changes nothing (no environment variable is set at library import time).
"""

import contextlib
import importlib
import logging as std_logging
import os
import re
import sys
import tempfile
from typing import Iterable, Sequence

from absl import logging

# The verbosity (absl -v / --verbosity) from which framework logging is shown.
VERBOSE = 1

# C++ log level while quiet: 2 hides TensorFlow's INFO and WARNING lines, keeps ERROR and FATAL.
QUIET_TF_CPP_MIN_LOG_LEVEL = "2"

# The tf_iddpm package: its INFO lines are always the user's.
_FIRST_PARTY_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


# TFDS's warnings in this project concern the digits' prepare-on-first-use, which tf_iddpm manages
# ("Variant folder ... has no dataset_info.json" while it is being prepared): errors only.
_ERRORS_ONLY = (os.sep + "tensorflow_datasets" + os.sep,)


class _FirstPartyInfoFilter(std_logging.Filter):
    """Passes every record of first-party code, and others' at WARNING and above (TFDS's: ERROR)."""

    def __init__(self, first_party: Sequence[str]):
        super().__init__()
        self._first_party = tuple(first_party)

    def filter(self, record: std_logging.LogRecord) -> bool:
        path = os.path.abspath(record.pathname or "")
        if path.startswith(self._first_party) or path in self._first_party:
            return True
        if any(part in path for part in _ERRORS_ONLY):
            return record.levelno >= std_logging.ERROR
        return record.levelno >= std_logging.WARNING


_installed_filter = None


def quiet() -> bool:
    """Whether :func:`configure` hid the framework logging."""
    return _installed_filter is not None


def configure(verbosity: int, first_party: Sequence[str] = ()) -> bool:
    """Quiets framework logging unless ``verbosity >= VERBOSE``; returns whether it quieted it.

    * ``TF_CPP_MIN_LOG_LEVEL`` is set to 2 unless the user set it (must run before TensorFlow is
      imported; C++ errors still print).
    * The absl handler (where absl, TensorFlow's, Keras' and TFDS's Python loggers end up) drops
      INFO/DEBUG records that do not come from this project; others' warnings and errors pass
      (TFDS's errors only).

    Args:
        verbosity: absl's ``FLAGS.verbosity`` after parsing (0 = the default INFO).
        first_party: files or directories (besides the ``tf_iddpm`` package) whose INFO lines are
            the user's, e.g. the entry point's own file and the ``export`` package.
    """
    global _installed_filter
    handler = logging.get_absl_handler()
    if _installed_filter is not None:
        handler.removeFilter(_installed_filter)
        _installed_filter = None
    if verbosity >= VERBOSE:
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_CPP_MIN_LOG_LEVEL)
    paths = list(_FIRST_PARTY_DIRS)
    for p in first_party:
        p = os.path.abspath(p)
        paths.append(p + os.sep if os.path.isdir(p) else p)
    _installed_filter = _FirstPartyInfoFilter(paths)
    handler.addFilter(_installed_filter)
    # TFDS also logs through its own Python logger, with a handler of its own in some versions.
    std_logging.getLogger("tensorflow_datasets").setLevel(std_logging.WARNING)
    return True


# C++ INFO lines (absl/glog format: I<MMDD> <time> <thread> <file>:<line>] ...) and absl's notice
# that logging is not initialised yet; everything else written during an import is written back.
_CPP_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [\w.\-]+:\d+\] ")
_ABSL_PRE_INIT_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called"


def _kept_lines(lines):
    """``lines`` without C++ INFO records (and their continuation lines) and absl's notice."""
    kept, in_info = [], False
    for line in lines:
        if _CPP_LOG_LINE.match(line):
            in_info = line.startswith("I")
        elif line.startswith(_ABSL_PRE_INIT_NOTICE):
            in_info = True
            continue
        if not in_info:
            kept.append(line)
    return kept


@contextlib.contextmanager
def _stderr_filtered():
    """Sends file descriptor 2 to a temporary file; afterwards writes back the lines to keep
    (all of them if the body raised)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            lines = text.splitlines(keepends=True)
            kept = "".join(lines if failed else _kept_lines(lines))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def disable_tfds_progress_bars() -> None:
    """Turns off TFDS's own progress bars (preparing the digits; tf_iddpm's bars stay)."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError:
        return
    tfds.display_progress_bar(False)


def import_quietly(module_names: Iterable[str]) -> None:
    """Imports ``module_names`` (e.g. ``tensorflow`` and a mode's module) without TensorFlow's C++
    INFO start-up lines; C++ warnings and errors, and anything else written, still appear.

    An import that fails is left to the caller's own import of the module (which then reports the
    error); its captured output is written back in full.
    """
    for name in module_names:
        try:
            with _stderr_filtered():
                importlib.import_module(name)
        except Exception:  # pylint: disable=broad-except
            pass
