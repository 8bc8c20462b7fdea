"""Tests for tf_iddpm/distribute.py: strategy selection by name and TF_CONFIG parsing."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from tf_iddpm import distribute

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(script, env_update=None, timeout=120):
    """Runs ``script`` in a fresh interpreter (device setup must precede TF initialisation)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(env_update or {})
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_strategy_has_one_replica(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = distribute.get_strategy("default")
    assert distribute.num_replicas(strategy) == 1
    assert distribute.is_chief(strategy)


def test_auto_without_tpu_gpus_or_cluster_is_the_default_strategy(monkeypatch):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    monkeypatch.delenv("TF_CONFIG", raising=False)
    if len(tf.config.list_physical_devices("GPU")) > 1:
        pytest.skip("this machine has several GPUs: auto picks mirrored")
    strategy = distribute.get_strategy("auto")
    assert strategy is tf.distribute.get_strategy()
    assert distribute.num_replicas(strategy) == 1


def test_unknown_strategy_is_rejected():
    with pytest.raises(
        ValueError,
        match="unknown strategy 'mirror'; allowed: auto, default, mirrored, multi_worker, tpu",
    ):
        distribute.get_strategy("mirror")


def test_multi_worker_without_tf_config_explains_what_to_set(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="--strategy=multi_worker needs the TF_CONFIG"):
        distribute.get_strategy("multi_worker")


@pytest.mark.skipif(
    os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio"), reason="this machine has a TPU"
)
def test_tpu_without_an_address_on_a_machine_without_tpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(RuntimeError, match="--strategy=tpu could not reach a TPU"):
        distribute.get_strategy("tpu", "")


@pytest.mark.slow
def test_mirrored_uses_the_logical_cpus_when_there_is_no_gpu():
    out = run_python(
        "from tf_iddpm import distribute\n"
        "distribute.split_cpu(2)\n"
        "s = distribute.get_strategy('mirrored')\n"
        "print(type(s).__name__, distribute.num_replicas(s), sorted(s.extended.worker_devices))\n"
    )
    assert out == (
        "MirroredStrategy 2 ['/job:localhost/replica:0/task:0/device:CPU:0', "
        "'/job:localhost/replica:0/task:0/device:CPU:1']"
    )


@pytest.mark.slow
def test_single_worker_tf_config_runs_multi_worker_strategy_as_chief():
    tf_config = {
        "cluster": {"worker": [f"127.0.0.1:{free_port()}"]},
        "task": {"type": "worker", "index": 0},
    }
    out = run_python(
        "from tf_iddpm import distribute\n"
        "s = distribute.get_strategy('multi_worker')\n"
        "import tensorflow as tf\n"
        "print(isinstance(s, tf.distribute.MultiWorkerMirroredStrategy), "
        "distribute.num_replicas(s), distribute.is_chief(s))\n",
        env_update={"TF_CONFIG": json.dumps(tf_config)},
    )
    assert out == "True 1 True"


@pytest.mark.parametrize(
    "tf_config, want",
    [
        (
            {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}},
            distribute.ClusterTask("worker", 0, 2, True),
        ),
        (
            {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}},
            distribute.ClusterTask("worker", 1, 2, False),
        ),
        (
            {
                "cluster": {"chief": ["c:1"], "worker": ["a:1", "b:1"]},
                "task": {"type": "worker", "index": 0},
            },
            distribute.ClusterTask("worker", 0, 3, False),
        ),
        (
            {
                "cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                "task": {"type": "chief", "index": 0},
            },
            distribute.ClusterTask("chief", 0, 2, True),
        ),
    ],
)
def test_read_tf_config(monkeypatch, tf_config, want):
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert distribute.read_tf_config() == want


def test_read_tf_config_unset_or_empty_is_none(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.read_tf_config() is None
    monkeypatch.setenv("TF_CONFIG", "  ")
    assert distribute.read_tf_config() is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("{cluster", "TF_CONFIG is not valid JSON"),
        ("[1]", "TF_CONFIG must be a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG has no 'cluster'"),
        ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG needs 'task'"),
        (
            '{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}',
            "cluster['worker'] must be a list of 'host:port' strings",
        ),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}',
            "task type 'ps' is not in the cluster (worker)",
        ),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}',
            "task index 1 is out of range for the 1 'worker' task(s)",
        ),
    ],
)
def test_read_tf_config_rejects_malformed(monkeypatch, text, message):
    monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(ValueError) as error:
        distribute.read_tf_config()
    assert message in str(error.value)
