"""One seed gives one run, and a killed run resumes into the same run (tf_iddpm/train_lib.py).

Runs are started as users start them (``python run.py --mode=train`` subprocesses) on the tiny
config with dropout on, the loss-second-moment sampler and two EMAs, so that every random draw and
every piece of state is exercised: initial weights, data order, timesteps, noise, dropout masks,
Adam slots, sampler history, EMAs and the step counter.

What makes runs exact here: every draw is a stateless function of (seed, step, position in the
global batch) or (seed, weight name); the data order is a pure function of (seed, step); the
CPU kernels are deterministic for a fixed thread count (the processes inherit the same settings);
under MirroredStrategy the replicas' gradients are summed in a fixed order.  The tests compare with
a 1e-6 absolute tolerance and in practice find bit-identical checkpoints (the measured maximum
difference is printed).
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from tf_iddpm import checkpoints
from tf_iddpm import digits_dataset
from tf_iddpm import train_lib

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
NUM_STEPS = 24
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    digits_dataset.prepare_digits(data_dir)
    return data_dir


def _train_args(workdir, data_dir, strategy="default", seed=0):
    args = [
        sys.executable,
        str(REPO_ROOT / "run.py"),
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--mode=train",
        f"--strategy={strategy}",
        f"--config.seed={seed}",
        f"--config.data.data_dir={data_dir}",
        f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.checkpoint_every=8",
        "--config.train.log_every=4",
        "--config.train.keep_checkpoints=5",
        "--config.train.schedule_sampler=loss-second-moment",
        "--config.train.ema_rate=0.99,0.9",
        "--config.model.dropout=0.2",
        # One resolution level: quicker to trace, the same kinds of state.
        "--config.model.channel_mult=1",
        "--config.model.attention_resolutions=8",
    ]
    if strategy == "mirrored":
        args.append("--cpu_devices=2")
    return args


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "PYTHONPATH")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run_to_end(args, log_path):
    with open(log_path, "a") as log:
        result = subprocess.run(
            args,
            cwd=REPO_ROOT,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=TIMEOUT_S,
            check=False,
        )
    assert result.returncode == 0, pathlib.Path(log_path).read_text()[-5000:]


def _latest_step(workdir):
    state = tf.train.get_checkpoint_state(checkpoints.checkpoint_dir(str(workdir)))
    return -1 if state is None else int(state.model_checkpoint_path.rsplit("-", 1)[1])


def _interrupt_after_first_checkpoint(args, workdir, log_path, sig):
    """Starts training, sends `sig` once the first checkpoint exists; returns the stopped step."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            args, cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + TIMEOUT_S
        while _latest_step(workdir) < 8:
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"no first checkpoint:\n{pathlib.Path(log_path).read_text()[-5000:]}")
            time.sleep(0.05)
        process.send_signal(sig)
        returncode = process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 0), pathlib.Path(
        log_path
    ).read_text()[-5000:]
    return _latest_step(workdir)


def _final_state(workdir):
    """Every variable of the newest checkpoint, less the object graph and tf.train.Checkpoint's
    save_counter (how many saves the run made: an interrupted run saved once more)."""
    reader = tf.train.load_checkpoint(checkpoints.checkpoint_dir(str(workdir)))
    return {
        key: reader.get_tensor(key)
        for key in reader.get_variable_to_shape_map()
        if key != "_CHECKPOINTABLE_OBJECT_GRAPH" and not key.startswith("save_counter/")
    }


def _assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    groups = {key.split("/")[0] for key in expected}
    assert {"model", "ema_0p99", "ema_0p9", "optimizer", "schedule_sampler", "step"} <= groups
    assert expected["step/.ATTRIBUTES/VARIABLE_VALUE"] == NUM_STEPS
    worst = max(
        float(
            np.max(np.abs(np.asarray(actual[k], np.float64) - np.asarray(expected[k], np.float64)))
        )
        if np.size(expected[k])
        else 0.0
        for k in expected
    )
    print(f"max |difference| over {len(expected)} checkpoint variables: {worst:.3g}")
    for key in sorted(expected):
        np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=TOLERANCE, err_msg=key)


def _losses_by_step(workdir, newest_file_only=False):
    """{step: loss} logged to TensorBoard (the newest events file only: the resumed process)."""
    paths = sorted(
        tf.io.gfile.glob(
            os.path.join(str(workdir), train_lib.TENSORBOARD_SUBDIR, "events.out.tfevents.*")
        ),
        key=os.path.getmtime,
    )
    losses = {}
    for path in paths[-1:] if newest_file_only else paths:
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag in ("loss", "vb", "mse"):
                    losses[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    return losses


@pytest.fixture(scope="module")
def uninterrupted(digits_dir, tmp_path_factory):
    """One uninterrupted run per strategy, shared by the tests that compare with it."""
    runs = {}

    def get(strategy):
        if strategy not in runs:
            workdir = tmp_path_factory.mktemp(f"uninterrupted_{strategy}") / "run"
            _run_to_end(_train_args(workdir, digits_dir, strategy), workdir.parent / "train.log")
            runs[strategy] = workdir
        return runs[strategy]

    return get


def test_two_fresh_runs_with_one_seed_end_identical(digits_dir, uninterrupted, tmp_path):
    second = tmp_path / "second"
    _run_to_end(_train_args(second, digits_dir), tmp_path / "train.log")
    first = uninterrupted("default")
    _assert_same_state(_final_state(second), _final_state(first))
    assert _losses_by_step(second) == _losses_by_step(first)


def test_the_seed_determines_the_initial_weights(digits_dir):
    config = tiny.get_config()
    config.data.data_dir = digits_dir
    strategy = tf.distribute.get_strategy()
    weights = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        config.seed = seed
        weights[name] = train_lib.Trainer(config, strategy).net.get_weights()
    for a, b in zip(weights["a"], weights["b"]):
        np.testing.assert_array_equal(a, b)
    differing = sum(not np.array_equal(a, c) for a, c in zip(weights["a"], weights["c"]))
    random_init = sum(
        np.unique(a).size > 2 for a in weights["a"]
    )  # not the zeros / ones / zero-init
    assert differing == random_init > 0


@pytest.mark.parametrize(
    "strategy,sig",
    [("default", signal.SIGKILL), ("default", signal.SIGTERM), ("mirrored", signal.SIGKILL)],
)
def test_an_interrupted_run_resumes_into_the_uninterrupted_one(
    digits_dir, uninterrupted, tmp_path, strategy, sig
):
    workdir = tmp_path / "run"
    checkpoint_dir = pathlib.Path(checkpoints.checkpoint_dir(str(workdir)))
    args = _train_args(workdir, digits_dir, strategy)
    stopped_at = _interrupt_after_first_checkpoint(args, workdir, tmp_path / "first.log", sig)
    assert 8 <= stopped_at < NUM_STEPS, f"stopped at {stopped_at}"
    if sig == signal.SIGKILL:
        # Whatever the kill interrupted, every checkpoint the manager lists is complete ...
        for prefix in tf.train.get_checkpoint_state(str(checkpoint_dir)).all_model_checkpoint_paths:
            checkpoints.check_readable(prefix)
        # ... and a save killed before TensorFlow merged its shards ("<prefix>_temp/") is removed
        # on the next start: plant one.
        (checkpoint_dir / "ckpt-999_temp").mkdir()
        (checkpoint_dir / "ckpt-999_temp" / "part-00000-of-00001.index").write_bytes(b"\x00 half")
    # Resume as users do: the same command.
    _run_to_end(args, tmp_path / "resumed.log")
    assert "resumed from" in (tmp_path / "resumed.log").read_text()
    assert not [path.name for path in checkpoint_dir.iterdir() if "_temp" in path.name]
    reference = uninterrupted(strategy)
    _assert_same_state(_final_state(workdir), _final_state(reference))
    resumed = _losses_by_step(workdir, newest_file_only=True)
    expected = _losses_by_step(reference)
    assert resumed and {step for _, step in resumed} == set(range(stopped_at + 4, NUM_STEPS + 1, 4))
    assert resumed == {key: expected[key] for key in resumed}
