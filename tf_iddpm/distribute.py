"""Choosing a tf.distribute strategy by name: one CPU, one or many GPUs, several hosts, or a TPU.

``run.py --strategy=NAME`` (and tests) call :func:`get_strategy`:

=================  ============================================================================
``default``        no distribution: ``tf.distribute.get_strategy()`` on the first device
``mirrored``       ``MirroredStrategy`` over all local GPUs, or over the logical CPUs when there
                   are no GPUs and the CPU was split (:func:`split_cpu`)
``multi_worker``   ``MultiWorkerMirroredStrategy``; the cluster comes from the ``TF_CONFIG``
                   environment variable (see :func:`read_tf_config`)
``tpu``            ``TPUStrategy`` on the TPU named by ``tpu_address`` (``local`` on a TPU VM)
``auto``           ``tpu`` if a TPU address is given, else ``multi_worker`` if ``TF_CONFIG``
                   describes more than one task, else ``mirrored`` if there is more than one
                   GPU, else ``default``
=================  ============================================================================

Create the strategy at program start: ``MultiWorkerMirroredStrategy`` must exist before any other
TensorFlow op runs.  TensorFlow is imported inside the functions so that importing this module
(``run.py --help``, flag errors) stays fast.
"""

import json
import os
from typing import Any, NamedTuple, Optional, Sequence

from absl import logging

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


class ClusterTask(NamedTuple):
    """This process's place in a multi-worker cluster, from ``TF_CONFIG``."""

    task_type: str
    task_index: int
    num_workers: int  # tasks of type "chief" and "worker", which all train
    is_chief: bool  # the task that writes checkpoints and summaries


_TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


def read_tf_config() -> Optional[ClusterTask]:
    """Parses and checks the ``TF_CONFIG`` environment variable of a multi-worker job.

    Every process of the job gets the same ``cluster`` (lists of ``host:port`` per task type) and
    its own ``task`` (type and index), e.g.
    ``{"cluster": {"worker": ["host1:12345", "host2:12345"]},
    "task": {"type": "worker", "index": 0}}``.
    A task of type ``chief`` (if the cluster has one) or else worker 0 is the chief.

    Returns:
      The task, or None when ``TF_CONFIG`` is unset or empty.

    Raises:
      ValueError: naming what is wrong when ``TF_CONFIG`` is malformed.
    """
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return None
    try:
        tf_config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({e}): {text!r}; expected e.g. {_TF_CONFIG_EXAMPLE}"
        ) from None
    if not isinstance(tf_config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {text!r}")
    cluster = tf_config.get("cluster")
    task = tf_config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(
            f"TF_CONFIG has no 'cluster' mapping task types to host:port lists: {text!r}"
        )
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(f"TF_CONFIG needs 'task': {{'type': ..., 'index': ...}}, got {task!r}")
    for task_type, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError(
                f"TF_CONFIG cluster[{task_type!r}] must be a list of 'host:port' "
                f"strings, got {addresses!r}"
            )
    task_type, task_index = task["type"], task["index"]
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG task type {task_type!r} is not in the cluster ({', '.join(cluster)})"
        )
    if not isinstance(task_index, int) or not 0 <= task_index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG task index {task_index!r} is out of range for the "
            f"{len(cluster[task_type])} {task_type!r} task(s)"
        )
    num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    if "chief" in cluster:
        is_chief = task_type == "chief"
    else:
        is_chief = task_type == "worker" and task_index == 0
    return ClusterTask(task_type, task_index, num_workers, is_chief)


def split_cpu(num_devices: int) -> None:
    """Splits the host CPU into ``num_devices`` logical devices, so ``mirrored`` can use them.

    For testing multi-replica code on a CPU-only machine.  Must run before TensorFlow initialises
    its devices (before any op or strategy).

    Raises:
      ValueError: if ``num_devices`` < 1.
      RuntimeError: if TensorFlow's devices are already initialised.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if num_devices < 1:
        raise ValueError(f"number of logical CPU devices must be >= 1, got {num_devices}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
    )


def _local_gpus() -> Sequence[Any]:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return tf.config.list_physical_devices("GPU")


def _tpu_strategy(tpu_address: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:  # OSError: name lookup
        raise RuntimeError(
            f"--strategy=tpu could not reach a TPU at tpu_address={tpu_address!r}: {e}. Pass --tpu "
            "with the TPU's name or grpc://host:port, or --tpu=local on a TPU VM."
        ) from e
    return tf.distribute.TPUStrategy(resolver)


def _mirrored_strategy():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if not _local_gpus():
        cpus = tf.config.list_logical_devices("CPU")
        if len(cpus) > 1:
            return tf.distribute.MirroredStrategy(devices=[d.name for d in cpus])
    return tf.distribute.MirroredStrategy()


def _multi_worker_strategy():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    task = read_tf_config()
    if task is None:
        raise ValueError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable to "
            f"describe the cluster, e.g. TF_CONFIG='{_TF_CONFIG_EXAMPLE}' on every "
            "worker (with its own task index)"
        )
    logging.info(
        "Multi-worker task %s:%d of %d workers (chief: %s)",
        task.task_type,
        task.task_index,
        task.num_workers,
        task.is_chief,
    )
    return tf.distribute.MultiWorkerMirroredStrategy()


def get_strategy(name: str = "auto", tpu_address: str = ""):
    """Creates the distribution strategy called ``name`` (see the module docstring).

    Args:
      name: one of :data:`STRATEGIES`.
      tpu_address: the TPU for ``tpu`` (and, when non-empty, for ``auto``): a TPU name,
        ``grpc://host:port`` or ``local``.

    Returns:
      A ``tf.distribute.Strategy``.

    Raises:
      ValueError: for an unknown name, or a missing or malformed ``TF_CONFIG`` with
        ``multi_worker``.
      RuntimeError: if ``tpu`` cannot reach the TPU.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    if name == "auto":
        task = read_tf_config()
        if tpu_address:
            name = "tpu"
        elif task is not None and task.num_workers > 1:
            name = "multi_worker"
        elif len(_local_gpus()) > 1:
            name = "mirrored"
        else:
            name = "default"
        logging.info("--strategy=auto chose %r", name)
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = _mirrored_strategy()
    elif name == "multi_worker":
        strategy = _multi_worker_strategy()
    else:
        strategy = _tpu_strategy(tpu_address)
    logging.info(
        "Distribution strategy: %s with %d replica(s)",
        type(strategy).__name__,
        num_replicas(strategy),
    )
    return strategy


def num_replicas(strategy) -> int:
    """How many replicas share each global batch under ``strategy``."""
    return int(strategy.num_replicas_in_sync)


def is_chief(strategy) -> bool:
    """Whether this process should write checkpoints, summaries and outputs.

    True except for non-chief tasks of a multi-worker job (their ``TF_CONFIG`` says so).
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        task = read_tf_config()
        return task is None or task.is_chief
    return True
