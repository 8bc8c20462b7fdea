"""Tests for tf_iddpm/checkpoints.py: finding damaged checkpoints, and what resuming does with them.

Small checkpoints of a few variables written by tf.train.CheckpointManager stand in for training
checkpoints; the damage is done to their files as a full disk or a cut copy would.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from tf_iddpm import checkpoints


def make_checkpoints(directory, steps=(10, 20, 30)):
    """A CheckpointManager directory holding ckpt-<step> for each step; returns (ckpt, manager)."""
    weights = tf.Variable(np.zeros([64, 64], np.float32))
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(weights=weights, step=step)
    manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=3)
    for n in steps:
        weights.assign(np.full([64, 64], n, np.float32))
        step.assign(n)
        manager.save(checkpoint_number=n)
    return ckpt


def data_file(directory, step):
    return directory / f"ckpt-{step}.data-00000-of-00001"


def truncate(path):
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.truncate(size // 2)


DAMAGES = {
    "truncated data": (
        lambda d: truncate(data_file(d, 30)),
        "ckpt-30.data-00000-of-00001 is truncated or corrupt",
    ),
    "missing data": (lambda d: data_file(d, 30).unlink(), "ckpt-30.data-00000-of-00001 is missing"),
    "truncated index": (lambda d: truncate(d / "ckpt-30.index"), "ckpt-30.index cannot be read"),
    "missing index": (lambda d: (d / "ckpt-30.index").unlink(), "ckpt-30.index is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_check_readable_names_the_damaged_file(tmp_path, damage):
    make_checkpoints(tmp_path)
    checkpoints.check_readable(str(tmp_path / "ckpt-30"))
    do_damage, message = DAMAGES[damage]
    do_damage(tmp_path)
    with pytest.raises(checkpoints.DamagedCheckpointError) as error:
        checkpoints.check_readable(str(tmp_path / "ckpt-30"))
    assert str(error.value).startswith(f"checkpoint {tmp_path / 'ckpt-30'} is damaged: ")
    assert str(tmp_path / message) in str(error.value)
    assert "\n" not in str(error.value)
    assert checkpoints.is_readable(str(tmp_path / "ckpt-20"))


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_skips_damaged_checkpoints_and_keeps_them_aside(tmp_path, damage, caplog):
    ckpt = make_checkpoints(tmp_path)
    DAMAGES[damage][0](tmp_path)
    damaged_files = sorted(name for name in os.listdir(tmp_path) if name.startswith("ckpt-30"))
    contents = {name: (tmp_path / name).read_bytes() for name in damaged_files}
    with caplog.at_level("WARNING"):
        newest = checkpoints.newest_readable_checkpoint(str(tmp_path))
    assert newest == str(tmp_path / "ckpt-20")
    assert any(
        DAMAGES[damage][1] in r.getMessage() and "resuming from the older" in r.getMessage()
        for r in caplog.records
    )
    # Kept, byte for byte, out of the manager's way; the state file no longer lists them.
    kept = tmp_path / checkpoints.DAMAGED_SUBDIR
    assert sorted(os.listdir(kept)) == damaged_files
    assert {name: (kept / name).read_bytes() for name in damaged_files} == contents
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert state.model_checkpoint_path == str(tmp_path / "ckpt-20")
    assert list(state.all_model_checkpoint_paths) == [
        str(tmp_path / "ckpt-10"),
        str(tmp_path / "ckpt-20"),
    ]
    assert str(tmp_path) not in (tmp_path / "checkpoint").read_text()  # relative, as TF writes

    # A manager created now saves step 30 again and cleans up old ones without touching them.
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=2)
    ckpt.read(newest).assert_existing_objects_matched()
    assert int(ckpt.step.numpy()) == 20
    for n in (30, 40):
        manager.save(checkpoint_number=n)
    assert {name: (kept / name).read_bytes() for name in damaged_files} == contents
    checkpoints.check_readable(str(tmp_path / "ckpt-30"))
    assert not os.path.exists(tmp_path / "ckpt-20.index")  # max_to_keep worked


def test_same_step_damaged_twice_gets_a_second_name(tmp_path):
    make_checkpoints(tmp_path)
    truncate(data_file(tmp_path, 30))
    checkpoints.newest_readable_checkpoint(str(tmp_path))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(
            weights=tf.Variable(np.ones([64, 64], np.float32)), step=tf.Variable(30, dtype=tf.int64)
        ),
        str(tmp_path),
        max_to_keep=3,
    )
    manager.save(checkpoint_number=30)
    truncate(data_file(tmp_path, 30))
    assert checkpoints.newest_readable_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-20")
    assert sorted(os.listdir(tmp_path / "damaged")) == [
        "ckpt-30.1.data-00000-of-00001",
        "ckpt-30.1.index",
        "ckpt-30.data-00000-of-00001",
        "ckpt-30.index",
    ]


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    make_checkpoints(tmp_path, steps=(10, 20))
    truncate(data_file(tmp_path, 10))
    data_file(tmp_path, 20).unlink()
    before = sorted(os.listdir(tmp_path))
    state_before = (tmp_path / "checkpoint").read_text()
    with pytest.raises(
        checkpoints.DamagedCheckpointError,
        match=r"no readable checkpoint in .*ckpt-20.data-00000-of-00001 is missing; "
        r".*ckpt-10.data-00000-of-00001 is truncated",
    ):
        checkpoints.newest_readable_checkpoint(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "checkpoint").read_text() == state_before


def test_an_empty_directory_has_no_checkpoint(tmp_path):
    assert checkpoints.newest_readable_checkpoint(str(tmp_path / "missing")) is None
    assert not (tmp_path / "missing").exists()
    with pytest.raises(checkpoints.CheckpointNotFoundError, match="no checkpoint in"):
        checkpoints.latest_checkpoint(str(tmp_path))


def test_inference_refuses_a_damaged_checkpoint_and_names_an_older_one(tmp_path):
    directory = tmp_path / checkpoints.CHECKPOINT_SUBDIR
    make_checkpoints(directory)
    data_file(directory, 30).unlink()
    # The newest is still what the state file lists (tf.train.latest_checkpoint would say None).
    assert checkpoints.latest_checkpoint(str(tmp_path)) == str(directory / "ckpt-30")
    with pytest.raises(checkpoints.DamagedCheckpointError) as error:
        checkpoints.inference_checkpoint(str(tmp_path))
    message = str(error.value)
    assert f"{directory / 'ckpt-30.data-00000-of-00001'} is missing" in message
    assert f"--checkpoint={directory / 'ckpt-20'}" in message
    assert "\n" not in message
    assert sorted(os.listdir(directory)).count("ckpt-30.index") == 1  # inference moves nothing
