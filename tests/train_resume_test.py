"""Preemption safety of tf_iddpm/train_lib.py: SIGKILL then resume, and SIGTERM saves and exits 0.

Training runs as users start it (``python run.py --mode=train`` in a subprocess) on the tiny config;
the resumed run is ``train_lib.train`` in this process, so that the state it restored can be
inspected before its first step.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_iddpm import checkpoints
from tf_iddpm import config_utils
from tf_iddpm import digits_dataset
from tf_iddpm import train_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    digits_dataset.prepare_digits(data_dir)
    return data_dir


def start_training(workdir, data_dir, log_path, **train_overrides):
    """Starts ``run.py --mode=train`` on the tiny config; its output goes to ``log_path``."""
    args = [
        sys.executable,
        str(REPO_ROOT / "run.py"),
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--mode=train",
        "--strategy=default",
        f"--config.data.data_dir={data_dir}",
        "--config.train.num_steps=1000",
        # One resolution level: the same checkpoint contents, quicker to trace.
        "--config.model.channel_mult=1",
        "--config.model.attention_resolutions=8",
    ]
    args += [f"--config.train.{name}={value}" for name, value in train_overrides.items()]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "PYTHONPATH")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    with open(log_path, "w") as log:
        return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until(condition, process, log_path, what):
    """Polls `condition` until it holds; fails if the process exits first or time runs out."""
    deadline = time.time() + TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"training exited with {process.returncode} before {what}:\n"
                f"{pathlib.Path(log_path).read_text()[-5000:]}"
            )
        if time.time() > deadline:
            process.kill()
            process.wait()
            pytest.fail(
                f"no {what} after {TIMEOUT_S} s:\n{pathlib.Path(log_path).read_text()[-5000:]}"
            )
        time.sleep(0.2)


def latest_step(checkpoint_dir):
    """The step of the newest checkpoint the CheckpointManager has recorded, or -1."""
    state = tf.train.get_checkpoint_state(checkpoint_dir)
    if state is None:
        return -1
    return int(state.model_checkpoint_path.rsplit("-", 1)[1])


def assert_complete(prefix):
    """Checks that a checkpoint's index and every data shard exist and that all values read."""
    assert os.path.exists(prefix + ".index"), prefix
    shards = sorted(tf.io.gfile.glob(prefix + ".data-*-of-*"))
    assert shards, prefix
    num_shards = int(re.search(r"-of-(\d+)$", shards[0]).group(1))
    assert shards == [f"{prefix}.data-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]
    reader = tf.train.load_checkpoint(prefix)
    for key in reader.get_variable_to_shape_map():
        value = reader.get_tensor(key)  # reads every value from the data shards
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
            assert np.all(np.isfinite(value)), key
    return reader


def test_sigkill_after_a_checkpoint_then_resume_restores_everything(
    digits_dir, tmp_path, monkeypatch
):
    workdir = tmp_path / "run"
    checkpoint_dir = checkpoints.checkpoint_dir(str(workdir))
    log_path = tmp_path / "train.log"
    process = start_training(
        workdir,
        digits_dir,
        log_path,
        checkpoint_every=4,
        log_every=4,
        keep_checkpoints=2,
        schedule_sampler="loss-second-moment",
        ema_rate="0.99,0.9",
    )
    try:
        wait_until(
            lambda: latest_step(checkpoint_dir) >= 8, process, log_path, "a checkpoint at step >= 8"
        )
    finally:
        process.kill()  # SIGKILL: no handler runs, no final save
        process.wait()
    assert process.returncode == -signal.SIGKILL

    # Whatever the kill interrupted, every checkpoint the manager lists is complete.
    state = tf.train.get_checkpoint_state(checkpoint_dir)
    for prefix in state.all_model_checkpoint_paths:
        assert_complete(prefix)
    killed_at = latest_step(checkpoint_dir)
    saved = assert_complete(tf.train.latest_checkpoint(checkpoint_dir))
    assert saved.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == killed_at
    # A save killed before TensorFlow merged its shards leaves "<prefix>_temp/"; plant one.
    leftover = pathlib.Path(checkpoint_dir) / "ckpt-999_temp"
    leftover.mkdir()
    (leftover / "part-00000-of-00001.index").write_bytes(b"\x00 half-written")

    # Resume (in this process) and capture the restored state before the first step.
    restored_prefix = str(tmp_path / "restored" / "ckpt")
    captured = {}
    original_train_steps = train_lib.Trainer.train_steps

    def capturing_train_steps(trainer, iterator, num_steps):
        if not captured:
            trainer.checkpoint.write(restored_prefix)
            captured["step"] = int(trainer.step.numpy())
            captured["iterations"] = int(trainer.optimizer.iterations.numpy())
            captured["net"] = trainer.net.get_weights()
            captured["ema"] = {rate: net.get_weights() for rate, net in trainer.ema_nets.items()}
            captured["optimizer"] = [v.numpy() for v in trainer.optimizer.variables]
            captured["loss_history"] = trainer.timestep_distribution.loss_history.numpy()
            captured["loss_counts"] = trainer.timestep_distribution.loss_counts.numpy()
        return original_train_steps(trainer, iterator, num_steps)

    monkeypatch.setattr(train_lib.Trainer, "train_steps", capturing_train_steps)
    config = config_utils.load_stored_config(str(workdir))
    config.train.num_steps = killed_at + 4
    metrics = train_lib.train(config, str(workdir))

    assert captured["step"] == captured["iterations"] == killed_at
    restored = tf.train.load_checkpoint(restored_prefix)
    keys = {k for k in saved.get_variable_to_shape_map() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    assert keys <= set(restored.get_variable_to_shape_map())
    for key in sorted(keys):
        np.testing.assert_array_equal(restored.get_tensor(key), saved.get_tensor(key), err_msg=key)
    # Named checks of what the comparison covers, and that the state is not trivial (fresh
    # Adam slots are zeros, a fresh sampler has no history, EMAs start as copies of the weights).
    groups = {key.split("/")[0] for key in keys}
    assert {"model", "ema_0p99", "ema_0p9", "optimizer", "schedule_sampler", "step"} <= groups
    assert saved.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == killed_at
    for name in ("loss_history", "loss_counts"):
        np.testing.assert_array_equal(
            captured[name], saved.get_tensor(f"schedule_sampler/{name}/.ATTRIBUTES/VARIABLE_VALUE")
        )
    assert captured["loss_counts"].sum() > 0
    num_weights = len(captured["net"])
    nonzero_slots = [v for v in captured["optimizer"] if v.size > 1 and np.any(v != 0)]
    assert len(nonzero_slots) == 2 * num_weights  # Adam m and v of each weight
    ema_99, ema_9 = captured["ema"][0.99], captured["ema"][0.9]
    assert len(ema_99) == len(ema_9) == num_weights
    for ema in (ema_99, ema_9):
        assert any(not np.array_equal(e, w) for e, w in zip(ema, captured["net"]))
    assert any(not np.array_equal(a, b) for a, b in zip(ema_99, ema_9))

    # The resumed run went on to its last step and left no partial checkpoint behind.
    assert metrics and np.isfinite(metrics["loss"])
    assert latest_step(checkpoint_dir) == killed_at + 4
    final = assert_complete(tf.train.latest_checkpoint(checkpoint_dir))
    assert final.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == killed_at + 4
    assert not [name for name in os.listdir(checkpoint_dir) if "_temp" in name]


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_0(digits_dir, tmp_path):
    workdir = tmp_path / "run"
    checkpoint_dir = checkpoints.checkpoint_dir(str(workdir))
    log_path = tmp_path / "train.log"
    # No periodic checkpoint before step 1000: the only one can come from the signal.
    process = start_training(workdir, digits_dir, log_path, checkpoint_every=1000, log_every=4)
    try:
        wait_until(
            lambda: "step 8/1000" in log_path.read_text(),
            process,
            log_path,
            "a log line for step 8",
        )
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert returncode == 0, log[-5000:]
    assert "received signal 15: saving a checkpoint and stopping" in log

    stopped_at = latest_step(checkpoint_dir)
    assert 8 <= stopped_at < 1000 and stopped_at % 4 == 0  # stops between 4-step chunks
    assert [p.name for p in sorted(pathlib.Path(checkpoint_dir).glob("*.index"))] == [
        f"ckpt-{stopped_at}.index"
    ]
    saved = assert_complete(tf.train.latest_checkpoint(checkpoint_dir))
    assert saved.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == stopped_at
    assert f"trained {stopped_at} steps" in log
