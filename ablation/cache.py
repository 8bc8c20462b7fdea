"""The study's caches: JSON files that remember what they were computed from.

Every finished piece of the study (a run's training record, each evaluation, the proxy classifier's
accuracy, the untrained model's scores) is stored as ``{"key": ..., "value": ...}``; a later
invocation reuses a value whose key matches and recomputes one whose key changed, so a killed
study resumes where it stopped and a changed budget redoes exactly what it changes.  Files are
written atomically (:mod:`tf_iddpm.fileio`), so a kill leaves either the old file or the new one.
"""

import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

from tf_iddpm import fileio


def read_json(path: str) -> Optional[Dict]:
    """The JSON object at ``path``, or None when there is no file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value) -> None:
    """Writes ``value`` as indented JSON, atomically."""
    fileio.atomic_write_text(path, json.dumps(value, indent=2))


def cached(path: str, key: Dict, compute: Callable[[], Any]) -> Tuple[Any, bool]:
    """(value, True) if ``path`` holds a value computed with ``key``; else ``compute()``, stored
    with ``key``, and False."""
    stored = read_json(path)
    if stored is not None and stored.get("key") == key:
        return stored["value"], True
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value, False
