"""TF-Serving side files of an export, and a local stand-in for a model server's session.

Everything here is about the server, not the diffusion model:

* :func:`model_server_config` / :func:`write_model_server_config`: the ``--model_config_file``
  (a ``ModelServerConfig`` text proto with one ``config`` per served model).
* :func:`batching_parameters_text` / :func:`write_batching_parameters`: the
  ``--batching_parameters_file`` (a ``BatchingParameters`` text proto).
* :func:`predict_request`, :func:`write_warmup_requests`, :func:`read_warmup_requests`: the
  ``assets.extra/tf_serving_warmup_requests`` file, ``PredictionLog`` records in a TFRecord file,
  which TF-Serving replays when it loads a version so that the first real request is not slow.
* :class:`LocalSession`: runs a SavedModel signature the way ``tensorflow_model_server`` does
  (a TF1 session, tensors named by the ``SignatureDef``, no Python-side shape or dtype checks),
  so exports and clients can be tested without the server binary.

Only TensorFlow and the ``tensorflow-serving-api`` protos are needed, plus the standard-library-only
:mod:`tf_iddpm.fileio`, which writes every file here atomically with the mode ``open()`` gives
(a server running as another user can read them).
"""

import os
import tempfile
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

from google.protobuf import text_format
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from tf_iddpm import fileio

WARMUP_FILENAME = "tf_serving_warmup_requests"
WARMUP_SUBDIR = "assets.extra"
MODELS_CONFIG_FILENAME = "models.config"
BATCHING_PARAMETERS_FILENAME = "batching_parameters.txt"
SERVE_TAG = "serve"


# ------------------------------------------------------------------------------ models.config


def model_server_config(base_paths: Mapping[str, str]) -> model_server_config_pb2.ModelServerConfig:
    """A ModelServerConfig serving every model of ``base_paths`` (latest version of each).

    Args:
      base_paths: model name -> directory holding the model's numeric version directories.

    Returns:
      The ``model_config_list`` proto, models in sorted name order.
    """
    config = model_server_config_pb2.ModelServerConfig()
    for name in sorted(base_paths):
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = base_paths[name]
        entry.model_platform = "tensorflow"
    return config


def write_model_server_config(path: str, base_paths: Mapping[str, str]) -> str:
    """Writes :func:`model_server_config` as a text proto (``--model_config_file``)."""
    fileio.atomic_write_text(path, text_format.MessageToString(model_server_config(base_paths)))
    return path


def read_model_server_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    """Parses a ``models.config`` text proto (raises text_format.ParseError when malformed)."""
    with open(path) as file:
        return text_format.Parse(file.read(), model_server_config_pb2.ModelServerConfig())


# ------------------------------------------------------------------------------ batching


def batching_parameters_text(
    *,
    max_batch_size: int,
    batch_timeout_micros: int = 5000,
    max_enqueued_batches: int = 64,
    num_batch_threads: int = 2,
) -> str:
    """The ``--batching_parameters_file`` contents (a ``BatchingParameters`` text proto).

    With ``--enable_batching`` the server concatenates concurrent requests along dimension 0 of
    every input, so every input of every signature must be batch-major (one row per image) and
    one request may hold at most ``max_batch_size`` rows.

    Args:
      max_batch_size: largest merged batch, in images.
      batch_timeout_micros: how long a request may wait for others to join its batch.
      max_enqueued_batches: queue length, in batches, before requests are refused.
      num_batch_threads: batches run concurrently.

    Returns:
      The text proto.
    """
    for name, value in (
        ("max_batch_size", max_batch_size),
        ("num_batch_threads", num_batch_threads),
        ("max_enqueued_batches", max_enqueued_batches),
    ):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if int(batch_timeout_micros) < 0:
        raise ValueError(f"batch_timeout_micros must be >= 0, got {batch_timeout_micros}")
    return (
        f"max_batch_size {{ value: {int(max_batch_size)} }}\n"
        f"batch_timeout_micros {{ value: {int(batch_timeout_micros)} }}\n"
        f"max_enqueued_batches {{ value: {int(max_enqueued_batches)} }}\n"
        f"num_batch_threads {{ value: {int(num_batch_threads)} }}\n"
    )


def write_batching_parameters(path: str, **kwargs) -> str:
    """Writes :func:`batching_parameters_text` (same keyword arguments) to ``path``."""
    fileio.atomic_write_text(path, batching_parameters_text(**kwargs))
    return path


# ------------------------------------------------------------------------------ warm-up records


def predict_request(
    model_name: str, inputs: Mapping[str, np.ndarray], *, signature_name: str = "serving_default"
) -> predict_pb2.PredictRequest:
    """A PredictRequest whose tensors keep the numpy dtypes of ``inputs``."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
    return request


def write_warmup_requests(
    saved_model_dir: str, requests: Sequence[predict_pb2.PredictRequest]
) -> str:
    """Writes ``<saved_model_dir>/assets.extra/tf_serving_warmup_requests``.

    Returns:
      The path of the written TFRecord file.
    """
    if not requests:
        raise ValueError("at least one warm-up request is needed")
    path = os.path.join(saved_model_dir, WARMUP_SUBDIR, WARMUP_FILENAME)
    # TFRecordWriter wants a path: frame the records in a private scratch file, then write the
    # bytes through the one atomic writer (mode as open() gives, fsync, no partial file).
    with tempfile.TemporaryDirectory(prefix="warmup-") as scratch:
        scratch_path = os.path.join(scratch, WARMUP_FILENAME)
        with tf.io.TFRecordWriter(scratch_path) as writer:
            for request in requests:
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(log.SerializeToString())
        with open(scratch_path, "rb") as file:
            records = file.read()
    return fileio.atomic_write_bytes(path, records)


def read_warmup_requests(saved_model_dir: str) -> List[prediction_log_pb2.PredictionLog]:
    """Parses the warm-up file of a SavedModel version directory into PredictionLogs."""
    path = os.path.join(saved_model_dir, WARMUP_SUBDIR, WARMUP_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no warm-up file at {path}")
    return [
        prediction_log_pb2.PredictionLog.FromString(record.numpy())
        for record in tf.data.TFRecordDataset(path)
    ]


def request_inputs(request: predict_pb2.PredictRequest) -> Dict[str, np.ndarray]:
    """The inputs of a PredictRequest as numpy arrays."""
    return {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}


# ------------------------------------------------------------------------------ versions


def numeric_versions(base_path: str) -> List[int]:
    """The version numbers TF-Serving would see under a model base path (numeric dirs), sorted."""
    if not os.path.isdir(base_path):
        return []
    return sorted(
        int(name)
        for name in os.listdir(base_path)
        if name.isdigit() and os.path.isdir(os.path.join(base_path, name))
    )


def servable_models(export_dir: str) -> Dict[str, str]:
    """Every model under ``export_dir``: subdirectories holding a numeric SavedModel version.

    Returns:
      model name -> absolute base path.
    """
    models = {}
    if not os.path.isdir(export_dir):
        return models
    for name in sorted(os.listdir(export_dir)):
        base_path = os.path.abspath(os.path.join(export_dir, name))
        if name.startswith(".") or not os.path.isdir(base_path):
            continue
        if any(
            os.path.exists(os.path.join(base_path, str(v), "saved_model.pb"))
            for v in numeric_versions(base_path)
        ):
            models[name] = base_path
    return models


# ------------------------------------------------------------------------------ local session


class LocalSession:
    """Runs the signatures of one SavedModel as ``tensorflow_model_server`` runs them.

    The model is loaded into a TF1 ``Session`` (the C++ loader TF-Serving uses) and each call
    feeds the ``SignatureDef``'s tensor names through a session callable, which -- like the
    server -- checks dtypes but not shapes on the Python side.  Malformed inputs therefore reach
    the graph and its in-graph validation, as they would in production.
    """

    def __init__(self, saved_model_dir: str, tags: Iterable[str] = (SERVE_TAG,)):
        self.saved_model_dir = saved_model_dir
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph)
        with self._graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(
                self._session, list(tags), saved_model_dir
            )
        self.signature_defs = dict(meta_graph.signature_def)
        self._callables: Dict[Tuple[str, Tuple[str, ...]], object] = {}

    def input_dtypes(self, signature_name: str = "serving_default") -> Dict[str, np.dtype]:
        """Input name -> numpy dtype of a signature."""
        signature = self._signature(signature_name)
        return {
            key: tf.dtypes.as_dtype(info.dtype).as_numpy_dtype
            for key, info in signature.inputs.items()
        }

    def _signature(self, signature_name):
        if signature_name not in self.signature_defs:
            raise ValueError(
                f"unknown signature {signature_name!r}; this model has "
                f"{sorted(self.signature_defs)}"
            )
        return self.signature_defs[signature_name]

    def run(
        self, inputs: Mapping[str, np.ndarray], signature_name: str = "serving_default"
    ) -> Dict[str, np.ndarray]:
        """Runs a signature on numpy inputs.

        Args:
          inputs: one array per signature input (exactly the signature's input names).
          signature_name: which signature.

        Returns:
          output name -> numpy array.

        Raises:
          ValueError: if the input names do not match the signature (TF-Serving's check).
          tf.errors.InvalidArgumentError: for a dtype mismatch or a failed in-graph check.
        """
        signature = self._signature(signature_name)
        expected, given = sorted(signature.inputs), sorted(inputs)
        if expected != given:
            raise ValueError(f"signature {signature_name!r} takes inputs {expected}, got {given}")
        output_keys = sorted(signature.outputs)
        key = (signature_name, tuple(expected))
        if key not in self._callables:
            options = config_pb2.CallableOptions()
            options.feed.extend(signature.inputs[name].name for name in expected)
            options.fetch.extend(signature.outputs[name].name for name in output_keys)
            # The public Session.make_callable checks feed shapes in Python; the server does not.
            make_callable = self._session._make_callable_from_options  # pylint: disable=protected-access
            self._callables[key] = make_callable(options)
        values = self._callables[key](*[np.asarray(inputs[name]) for name in expected])
        return dict(zip(output_keys, values))

    def close(self):
        self._session.close()
