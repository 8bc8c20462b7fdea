"""Runs a pytest file as a Bazel py_test: `main = "//tools/python:pytest_main.py"`, `args = [file]`.

The tests are written for pytest (plain test functions, fixtures, parametrize), so a py_test cannot
simply execute the test file; this entry point hands it to pytest instead. It runs in the runfiles
tree of the test, whose working directory is the workspace root, so `tests/x_test.py` and the data
files next to it resolve exactly as in a checkout.

Bazel's sandbox has a read-only file system and no HOME, so everything that wants to write (pytest's
tmp_path, Keras' and TFDS' caches under ~) is pointed at the per-test TEST_TMPDIR. Per-case results
go to Bazel's test.xml (XML_OUTPUT_FILE) as JUnit XML.

`make venv` installs the project in editable mode, which adds an import hook mapping `tf_iddpm` and
`export` to the source checkout. It would quietly satisfy an import whose module is missing from the
test's deps, so it is removed: under Bazel, first-party code comes only from the runfiles tree.
"""

import os
import sys

import pytest


def _drop_editable_install_finders():
    """Removes setuptools' editable-install import hooks (`__editable___*_finder`)."""
    # The finders are classes or instances; both carry their module's name in __module__.
    sys.meta_path[:] = [
        finder
        for finder in sys.meta_path
        if not getattr(finder, "__module__", "").startswith("__editable__")
    ]


def main(argv):
    """Runs pytest on the test files named in `argv[1:]`; returns pytest's exit code."""
    if len(argv) < 2:
        raise ValueError(f"pytest_main.py needs at least one test file, got arguments {argv[1:]!r}")
    test_tmpdir = os.environ.get("TEST_TMPDIR")
    pytest_args = ["-q", "-p", "no:cacheprovider"]
    if test_tmpdir:
        home = os.path.join(test_tmpdir, "home")
        os.makedirs(home, exist_ok=True)
        os.environ["HOME"] = home
        os.environ["TMPDIR"] = test_tmpdir
        pytest_args += ["--basetemp", os.path.join(test_tmpdir, "pytest")]
    if os.environ.get("XML_OUTPUT_FILE"):
        pytest_args += ["--junitxml", os.environ["XML_OUTPUT_FILE"]]
    _drop_editable_install_finders()
    return pytest.main(pytest_args + argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
