"""Tests for tf_iddpm/train_lib.py under tf.distribute: Mirrored and MultiWorkerMirrored strategies.

Logical CPU devices and MultiWorkerMirroredStrategy must be set up before TensorFlow initialises,
so every strategy runs in a fresh interpreter.  The trainer draws the timesteps and the noise of
the whole global batch from (seed, step) on every replica and each replica keeps its slice, so
with the same global batches and initial weights a 2-replica run follows the 1-replica run.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tf_iddpm import checkpoints
from tf_iddpm import digits_dataset

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 4
# (schedule sampler, grad_clip): the plain path (Keras sums the replicas' gradients) and the
# path with a cross-replica clip and importance weights from a warmed-up loss history.
VARIANTS = {"uniform": ("uniform", 0.0), "second_moment_clipped": ("loss-second-moment", 1.0)}

# Trains each variant for NUM_STEPS steps under the default strategy and under MirroredStrategy
# over 2 logical CPUs, from the same initial weights (and the same pre-filled loss history) on the
# same global batches; saves per-step metrics and the final state.
_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    from tf_iddpm import distribute
    distribute.split_cpu(2)
    import numpy as np
    import tensorflow as tf
    from configs import tiny
    from tf_iddpm import data as data_lib
    from tf_iddpm import train_lib

    data_dir, out_path, num_steps, variants = json.loads(sys.argv[1])
    # One MirroredStrategy for the whole process: a second one would reuse the first one's
    # collective instance keys, which TensorFlow rejects.
    strategies = (("default", tf.distribute.get_strategy()),
                  ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])))
    results = {}
    for variant, (sampler, grad_clip) in variants.items():
        config = tiny.get_config()
        config.data.data_dir = data_dir
        config.model.dropout = 0.0
        config.model.channel_mult = "1"         # one resolution level: quicker to trace
        config.model.attention_resolutions = "8"
        config.train.lr = 1e-3
        config.train.schedule_sampler = sampler
        config.train.grad_clip = grad_clip
        batch = config.train.batch_size
        images = np.stack([b["image"] for b in data_lib.make_train_dataset(
            config.data, batch_size=batch, seed=1).take(num_steps).as_numpy_iterator()])
        initial = None
        for name, strategy in strategies:
            trainer = train_lib.Trainer(config, strategy)
            assert trainer.num_replicas == (2 if name == "mirrored" else 1)
            if initial is None:
                initial = trainer.net.get_weights()
                results[f"{variant}/initial"] = np.concatenate([w.ravel() for w in initial])
            for net in [trainer.net, *trainer.ema_nets.values()]:
                net.set_weights(initial)
            if trainer.loss_aware:
                sampler_state = trainer.timestep_distribution
                sampler_state.loss_history.assign(np.random.default_rng(0).uniform(
                    0.01, 1.0, sampler_state.loss_history.shape))
                sampler_state.loss_counts.assign(
                    np.full(sampler_state.loss_counts.shape, sampler_state.history_per_term))
            global_batches = tf.data.Dataset.from_tensor_slices({"image": images}).unbatch().batch(
                batch, drop_remainder=True)
            iterator = iter(strategy.experimental_distribute_dataset(global_batches))
            metrics = []
            for _ in range(num_steps):
                step = train_lib.summarize(trainer.train_steps(iterator, 1))
                metrics.append([step["loss"], step["mse"], step["vb"]])
            prefix = f"{variant}/{name}/"
            results[prefix + "metrics"] = np.array(metrics)
            results[prefix + "net"] = np.concatenate([w.ravel() for w in trainer.net.get_weights()])
            results[prefix + "ema"] = np.concatenate(
                [w.ravel() for w in trainer.ema_nets[0.99].get_weights()])
            results[prefix + "optimizer"] = np.concatenate(
                [np.ravel(v.numpy()) for v in trainer.optimizer.variables])
            results[prefix + "step"] = trainer.step.numpy()
            if trainer.loss_aware:
                results[prefix + "loss_history"] = trainer.timestep_distribution.loss_history.numpy()
    np.savez(out_path, **results)
""")

# A global batch of 15 under MirroredStrategy over 2 logical CPUs, through train() and Trainer.
_INDIVISIBLE_BATCH_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from tf_iddpm import distribute
    distribute.split_cpu(2)
    from configs import tiny
    from tf_iddpm import train_lib

    data_dir, workdir = json.loads(sys.argv[1])
    strategy = distribute.get_strategy("mirrored")
    config = tiny.get_config()
    config.data.data_dir = data_dir
    config.train.batch_size = 15
    errors = {}
    for name, build in (("train", lambda: train_lib.train(config, workdir, strategy)),
                        ("Trainer", lambda: train_lib.Trainer(config, strategy))):
        try:
            build()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    print(json.dumps({"errors": errors, "workdir_exists": os.path.exists(workdir)}))
""")

# One worker of a 2-worker MultiWorkerMirroredStrategy job running train_lib.train.
_WORKER_SCRIPT = textwrap.dedent("""
    import json, sys
    from tf_iddpm import distribute
    strategy = distribute.get_strategy("multi_worker")
    from configs import tiny
    from tf_iddpm import train_lib

    data_dir, workdir, num_steps = json.loads(sys.argv[1])
    config = tiny.get_config()
    config.data.data_dir = data_dir
    config.model.channel_mult = "1"             # one resolution level: quicker to trace
    config.model.attention_resolutions = "8"
    # The cross-worker paths: the loss history is gathered from both workers, the gradient
    # is all-reduced before the global-norm clip.
    config.train.schedule_sampler = "loss-second-moment"
    config.train.grad_clip = 1.0
    config.train.num_steps = num_steps
    config.train.checkpoint_every = num_steps // 2
    config.train.log_every = num_steps // 2
    metrics = train_lib.train(config, workdir, strategy)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": metrics["loss"],
                      "vb": metrics["vb"]}))
""")


def _env(**update):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "PYTHONPATH")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(update)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    digits_dataset.prepare_digits(data_dir)
    return data_dir


def run_script(script, args, timeout=900):
    """Runs `script` in a fresh interpreter; returns the JSON its last stdout line holds."""
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def test_mirrored_strategy_follows_the_default_strategy(digits_dir, tmp_path):
    # Measured (4 steps): per-step loss/mse/vb agree to <= 9.5e-7 absolute (1.1e-7 relative);
    # EMA and Adam slots to ~1e-8 absolute; the loss history <= 1.1e-5 absolute on values up to
    # 60 (2e-7 relative).  The weights are compared through their update (final - initial, L2
    # over all of them, as tests/train_trajectory_test.py does): with the reference's AdamW
    # epsilon (1e-8 on the bias-corrected root) an element whose true gradient is zero, e.g. a
    # conv bias followed by a GroupNorm, moves by up to ~lr per step on float32 rounding alone,
    # differently for a different summation order (measured: 43 of 197702 weights, <= 4.4e-5).
    # A per-replica mean loss (gradients 2x too large) gives Adam slot differences of 0.04 and
    # weight differences of 8e-4, far outside these tolerances.
    out_path = tmp_path / "results.npz"
    run_script(_MIRRORED_SCRIPT, [digits_dir, str(out_path), NUM_STEPS, VARIANTS])
    results = dict(np.load(out_path))
    for variant in VARIANTS:
        single = {
            k.split("/")[2]: v for k, v in results.items() if k.startswith(f"{variant}/default/")
        }
        mirrored = {
            k.split("/")[2]: v for k, v in results.items() if k.startswith(f"{variant}/mirrored/")
        }
        assert single["step"] == mirrored["step"] == NUM_STEPS
        # The trajectory is a real one: the loss changes from step to step.
        assert np.ptp(single["metrics"][:, 0]) > 0.05, variant
        for name in sorted(set(single) - {"step"}):
            difference = np.abs(single[name] - mirrored[name])
            print(f"{variant} {name}: max |difference| {difference.max():.3g}")
        np.testing.assert_allclose(
            mirrored["metrics"], single["metrics"], rtol=1e-5, err_msg=variant
        )
        initial = results[f"{variant}/initial"].astype(np.float64)
        update_single = single["net"] - initial
        update_mirrored = mirrored["net"] - initial
        update_error = np.linalg.norm(update_mirrored - update_single) / np.linalg.norm(
            update_single
        )
        print(f"{variant} net: |update difference| / |update| {update_error:.3g}")
        assert update_error <= 1e-3, f"{variant} net: update differs by {update_error:.3g}"
        noisy = np.abs(mirrored["net"] - single["net"]) > 1e-5
        assert noisy.mean() <= 1e-3, f"{variant} net: {noisy.sum()} weights differ by > 1e-5"
        for name in ("ema", "optimizer"):
            np.testing.assert_allclose(
                mirrored[name], single[name], rtol=1e-5, atol=1e-5, err_msg=f"{variant} {name}"
            )
        if "loss_history" in single:
            np.testing.assert_allclose(
                mirrored["loss_history"], single["loss_history"], rtol=1e-5, err_msg=variant
            )
    assert "second_moment_clipped/mirrored/loss_history" in results


def test_batch_not_divisible_by_the_replicas_fails_before_training(digits_dir, tmp_path):
    workdir = tmp_path / "run"
    report = run_script(_INDIVISIBLE_BATCH_SCRIPT, [digits_dir, str(workdir)], timeout=180)
    assert (
        "train.batch_size=15 is not divisible by the 2 replicas of the distribution strategy; "
        "use a multiple of 2"
    ) in report["errors"]["train"]
    # One rule, one message: the Trainer refuses with the config check's words.
    assert report["errors"]["Trainer"] == (
        "invalid config:\n  - train.batch_size=15 is not divisible by the 2 replicas of the "
        "distribution strategy; use a multiple of 2"
    )
    assert not report["workdir_exists"] and not workdir.exists()


def test_multi_worker_mirrored_workers_finish_with_identical_weights(digits_dir, tmp_path):
    num_steps = 4
    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in sorted(ports)]}
    workdir = tmp_path / "run"
    args = json.dumps([digits_dir, str(workdir), num_steps])
    workers, logs = [], []
    try:
        for index in range(2):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            log = open(tmp_path / f"worker_{index}.log", "w+")
            logs.append(log)
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-c", _WORKER_SCRIPT, args],
                    cwd=REPO_ROOT,
                    env=_env(TF_CONFIG=json.dumps(tf_config)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        for worker in workers:
            worker.wait(timeout=240)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    outputs = []
    for worker, log in zip(workers, logs):
        log.seek(0)
        text = log.read()
        log.close()
        assert worker.returncode == 0, text[-5000:]
        outputs.append(json.loads(text.strip().splitlines()[-1]))
    assert outputs[0]["replicas"] == outputs[1]["replicas"] == 2
    # The logged metrics are reduced over both workers, so they agree too.
    assert outputs[0] == outputs[1]

    # The chief keeps its checkpoints in the workdir, worker 1 in a scratch directory of its own;
    # both hold every variable of the run at its last step: model, EMA, Adam slots, the
    # sampler's loss history, step.
    chief = tf.train.load_checkpoint(checkpoints.checkpoint_dir(str(workdir)))
    other = tf.train.load_checkpoint(checkpoints.checkpoint_dir(str(workdir / "worker_1_scratch")))
    keys = {k for k in chief.get_variable_to_shape_map() if not k.startswith("_CHECKPOINTABLE")}
    assert keys == {
        k for k in other.get_variable_to_shape_map() if not k.startswith("_CHECKPOINTABLE")
    }
    assert chief.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == num_steps
    assert any(k.startswith("ema_0p99/") for k in keys)
    counts = chief.get_tensor("schedule_sampler/loss_counts/.ATTRIBUTES/VARIABLE_VALUE")
    assert counts.sum() == num_steps * 16  # every example of both workers was recorded
    for key in sorted(keys):
        np.testing.assert_array_equal(chief.get_tensor(key), other.get_tensor(key), err_msg=key)
    # Training moved the weights between the two checkpoints (so the equality is not vacuous).
    halfway = tf.train.load_checkpoint(
        os.path.join(checkpoints.checkpoint_dir(str(workdir)), f"ckpt-{num_steps // 2}")
    )
    assert any(
        not np.array_equal(halfway.get_tensor(k), chief.get_tensor(k))
        for k in keys
        if k.startswith("model/")
    )
    # Only the chief writes TensorBoard summaries.
    assert len(os.listdir(workdir / "tensorboard")) == 1
