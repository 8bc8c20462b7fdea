"""Tests for tf_iddpm/fileio.py: atomic writes with the mode open() gives, and the writers using it.

The writers that need no model (config.json, PNG grids, models.config, batching parameters, warm-up
requests) are checked here; samples, eval results and export assets are checked end to end in
tests/workdir_lifecycle_test.py.
"""

import contextlib
import os
import stat

import numpy as np
import pytest

from configs import tiny
from tf_iddpm import config_utils
from tf_iddpm import fileio


@contextlib.contextmanager
def umask(value):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_open_mode(directory):
    """The mode a plain open(path, "w") gives a new file here, under the current umask."""
    probe = os.path.join(directory, "probe")
    with open(probe, "w"):
        pass
    result = mode(probe)
    os.remove(probe)
    return result


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_new_and_replaced_files_get_the_mode_open_gives(tmp_path, mask, expected):
    path = tmp_path / "sub" / "file.txt"
    with umask(mask):
        assert fileio.atomic_write_text(path, "one") == str(path)
        assert mode(path) == expected == plain_open_mode(tmp_path)
        os.chmod(path, 0o600)  # what the old mkstemp-based writers left
        fileio.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert mode(path) == expected
    assert os.listdir(path.parent) == ["file.txt"]


def test_make_temp_dir_gets_the_mode_makedirs_gives(tmp_path):
    with umask(0o022):
        first = fileio.make_temp_dir(tmp_path, prefix=".x-")
        second = fileio.make_temp_dir(tmp_path, prefix=".x-")
    assert first != second and os.path.basename(first).startswith(".x-")
    assert mode(first) == 0o755


def _fail_in_the_middle(file):
    file.write(b"partial")
    raise RuntimeError("writer failed")


@pytest.mark.parametrize("existing", [None, b"old content"])
@pytest.mark.parametrize("failure", ["writer", "fsync", "replace"])
def test_a_failure_in_the_middle_leaves_no_partial_or_temp_file(
    tmp_path, monkeypatch, existing, failure
):
    path = tmp_path / "target.json"
    if existing is not None:
        path.write_bytes(existing)
    write = _fail_in_the_middle
    if failure != "writer":

        def broken(*args):
            raise OSError(f"{failure} failed")

        monkeypatch.setattr(fileio.os, failure, broken)
        write = lambda file: file.write(b"new content")  # noqa: E731
    with pytest.raises((RuntimeError, OSError), match=f"{failure} failed"):
        fileio.atomic_write(path, write)
    monkeypatch.undo()
    if existing is None:
        assert os.listdir(tmp_path) == []
    else:
        assert os.listdir(tmp_path) == ["target.json"]
        assert path.read_bytes() == existing


def test_savez_through_the_writer_callback(tmp_path):
    path = tmp_path / "a.npz"
    images = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    fileio.atomic_write(path, lambda file: np.savez(file, images, np.array([3, 4])))
    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["arr_0"], images)
        np.testing.assert_array_equal(loaded["arr_1"], [3, 4])


def test_remote_paths_go_through_gfile(tmp_path):
    import tensorflow as tf

    # TensorFlow's in-memory filesystem stands in for gs://.
    path = "ram://fileio_test/dir/x.txt"
    fileio.atomic_write_text(path, "remote")
    with tf.io.gfile.GFile(path) as file:
        assert file.read() == "remote"
    assert tf.io.gfile.listdir("ram://fileio_test/dir") == ["x.txt"]
    with pytest.raises(RuntimeError, match="writer failed"):
        fileio.atomic_write(path, _fail_in_the_middle)
    with tf.io.gfile.GFile(path) as file:
        assert file.read() == "remote"
    del tmp_path


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640)])
def test_config_json_png_and_serving_files_have_the_mode_open_gives(tmp_path, mask, expected):
    from export import serving
    from tf_iddpm import image_utils

    workdir = tmp_path / "work"
    export_dir = tmp_path / "models"
    with umask(mask):
        config_utils.persist_config(tiny.get_config(), str(workdir))
        image_utils.save_image_grid(np.zeros([2, 4, 4, 3], np.uint8), workdir / "grid.png")
        serving.write_model_server_config(
            str(export_dir / serving.MODELS_CONFIG_FILENAME),
            {"tiny_sampler": str(export_dir / "tiny_sampler")},
        )
        serving.write_batching_parameters(
            str(export_dir / serving.BATCHING_PARAMETERS_FILENAME), max_batch_size=4
        )
        warmup = serving.write_warmup_requests(
            str(export_dir / "v"), [serving.predict_request("m", {"seed": np.array([1])})]
        )
    for path in (
        workdir / "config.json",
        workdir / "grid.png",
        export_dir / serving.MODELS_CONFIG_FILENAME,
        export_dir / serving.BATCHING_PARAMETERS_FILENAME,
        warmup,
    ):
        assert mode(path) == expected, path
    assert sorted(os.listdir(workdir)) == ["config.json", "grid.png"]
    assert len(serving.read_warmup_requests(str(export_dir / "v"))) == 1


def test_directory_error_names_a_file_in_the_way(tmp_path):
    a_file = tmp_path / "models"
    a_file.write_text("x")
    assert fileio.directory_error(tmp_path) is None
    assert fileio.directory_error(tmp_path / "new" / "deeper") is None  # can be created
    message = fileio.directory_error(a_file, what="--export_dir")
    assert message.startswith(f"--export_dir={str(a_file)!r} is a file, not a directory")
    below = fileio.directory_error(a_file / "v1", what="--export_dir")
    assert f"is under {str(a_file)!r}, which is a file" in below
    assert fileio.directory_error("gs://bucket/models") is None
