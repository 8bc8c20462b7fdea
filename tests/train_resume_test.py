"""Preemption safety of tf_iddpm/train_lib.py: SIGTERM saves at the current step and exits 0.

Training runs as users start it (``python run.py --mode=train`` in a subprocess) on the tiny
config.  That a killed (SIGKILL) or stopped (SIGTERM) run resumes into the uninterrupted one, and
that a killed save's partial files are removed, is tests/train_reproducibility_test.py's.
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
from tf_iddpm import digits_dataset

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow

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
