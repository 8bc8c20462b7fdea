"""Client for the exported sampler and NLL models served by TF-Serving (REST or gRPC).

Command line (``--server`` is host:port of the REST API, 8501, or of gRPC, 8500)::

    # samples -> one PNG per seed in --out_dir
    python -m export.client --server=localhost:8501 --model=digits_sampler sample \\
        --seeds=0,1,2,3 --num_steps=50 [--sampler=dpmpp_2m] [--eta=0.0] [--class_labels=3,3,7,7] \\
        --out_dir=/tmp/samples
    # bits/dim of images (.npz with arr_0 uint8 [N, H, W, C] as run.py --mode=sample writes it,
    # a .npy, or comma-separated PNG files)
    python -m export.client --server=localhost:8500 --protocol=grpc --model=digits_nll nll \\
        --images=samples.npz --num_steps=100

Library use::

    outputs = client.sample("localhost:8501", "digits_sampler", seeds=[0, 1], num_steps=50)
    outputs["images"]        # uint8 [2, H, W, C]
    outputs = client.nll("localhost:8500", "digits_nll", images, num_steps=100, protocol="grpc")
    outputs["total_bpd"]     # float32 [N]

Every parameter is sent per image ([N] vectors), which TF-Serving's request batching requires.
The REST client needs only numpy (and Pillow for PNGs); gRPC needs TensorFlow and
``tensorflow-serving-api``.  Nothing here imports the project's library.
"""

import json
import os
import sys
from typing import Dict, Mapping, Optional, Sequence
import urllib.error
import urllib.request

from absl import app
from absl import flags
import numpy as np

DEFAULT_SIGNATURE = "serving_default"
REST_PORT = 8501
GRPC_PORT = 8500
# Signature dtypes of every input and output of the exported models (export/export_lib.py).
INPUT_DTYPES = {
    "seed": np.int64,
    "num_steps": np.int32,
    "eta": np.float32,
    "sampler": np.str_,
    "guidance_scale": np.float32,
    "class_labels": np.int32,
    "low_res": np.uint8,
    "images": np.uint8,
    "noise": np.float32,
}
OUTPUT_DTYPES = {
    "images": np.uint8,
    "images_float": np.float32,
    "total_bpd": np.float32,
    "prior_bpd": np.float32,
    "vb_terms": np.float32,
    "xstart_mse": np.float32,
    "mse": np.float32,
    "vb_timesteps": np.int32,
}
_GRPC_MESSAGE_LIMIT = 512 * 1024 * 1024


class PredictError(RuntimeError):
    """The server refused or failed a request; ``code`` is the gRPC status name or HTTP status."""

    def __init__(self, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.code = code


def _typed(inputs: Mapping[str, object]) -> Dict[str, np.ndarray]:
    """Casts each input to its signature dtype (unknown names keep their numpy dtype)."""
    return {key: np.asarray(value, dtype=INPUT_DTYPES.get(key)) for key, value in inputs.items()}


def _as_output(key, value):
    return np.asarray(value, dtype=OUTPUT_DTYPES.get(key))


# ------------------------------------------------------------------------------ request inputs


def sampler_inputs(
    seeds: Sequence[int],
    num_steps: int,
    *,
    sampler: str = "ancestral",
    eta: float = 0.0,
    class_labels: Optional[Sequence[int]] = None,
    guidance_scale: float = 1.0,
    low_res: Optional[np.ndarray] = None,
) -> Dict[str, np.ndarray]:
    """The inputs of one sampler request, every parameter repeated per seed.

    Args:
      seeds: one int64 seed per image.
      num_steps: K, the network calls per image (for ancestral and DDIM the respaced chain
        length, 1 <= K <= T).
      sampler: ancestral, ddim, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde or unipc.
      eta: DDIM eta in [0, 1] (0 for every other sampler).
      class_labels: one label per seed, for class-conditional models.
      guidance_scale: classifier-free guidance s, sent with class_labels (1 = unguided).
      low_res: uint8 [N, h, h, C] low-resolution images, for the super-resolution model.

    Returns:
      input name -> numpy array with the signature's dtype.
    """
    seeds = np.asarray(seeds, np.int64).reshape([-1])
    count = seeds.shape[0]
    inputs = {
        "seed": seeds,
        "num_steps": np.full([count], num_steps, np.int32),
        "sampler": np.full([count], sampler),
        "eta": np.full([count], eta, np.float32),
    }
    if class_labels is not None:
        inputs["class_labels"] = np.broadcast_to(np.asarray(class_labels, np.int32), [count]).copy()
        inputs["guidance_scale"] = np.full([count], guidance_scale, np.float32)
    if low_res is not None:
        inputs["low_res"] = np.asarray(low_res, np.uint8)
    return inputs


def nll_inputs(
    images: np.ndarray,
    num_steps: int,
    *,
    seeds: Optional[Sequence[int]] = None,
    class_labels: Optional[Sequence[int]] = None,
) -> Dict[str, np.ndarray]:
    """The inputs of one NLL request (seeds default to 0, 1, ..., N-1)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    count = images.shape[0]
    seeds = np.arange(count, dtype=np.int64) if seeds is None else np.asarray(seeds, np.int64)
    inputs = {"images": images, "num_steps": np.full([count], num_steps, np.int32), "seed": seeds}
    if class_labels is not None:
        inputs["class_labels"] = np.broadcast_to(np.asarray(class_labels, np.int32), [count]).copy()
    return inputs


# ------------------------------------------------------------------------------ REST


def rest_predict(
    server: str,
    model: str,
    inputs: Mapping[str, object],
    *,
    signature_name: str = DEFAULT_SIGNATURE,
    version: Optional[int] = None,
    row_format: bool = False,
    timeout: float = 600.0,
) -> Dict[str, np.ndarray]:
    """POST /v1/models/<model>[/versions/<v>]:predict with a JSON body.

    Args:
      server: "host:port" of the REST API (or a full "http://..." URL).
      model: the served model name.
      inputs: input name -> array (cast to the signature dtypes).
      signature_name: which signature.
      version: a specific version (default: the server's choice, normally the latest).
      row_format: send ``{"instances": [{...}, ...]}`` (one object per image; every input must be
        [N, ...]) instead of the columnar ``{"inputs": {...}}``.
      timeout: seconds.

    Returns:
      output name -> numpy array.

    Raises:
      PredictError: with the server's error message (HTTP 400 for INVALID_ARGUMENT).
    """
    inputs = _typed(inputs)
    if row_format:
        counts = {key: value.shape[0] if value.ndim else None for key, value in inputs.items()}
        if len(set(counts.values())) != 1 or None in counts.values():
            raise ValueError(
                f"row format needs every input batch-major with one count, got {counts}"
            )
        count = next(iter(counts.values()))
        body = {
            "signature_name": signature_name,
            "instances": [
                {key: value[i].tolist() for key, value in inputs.items()} for i in range(count)
            ],
        }
    else:
        body = {
            "signature_name": signature_name,
            "inputs": {key: value.tolist() for key, value in inputs.items()},
        }
    base = server if server.startswith(("http://", "https://")) else f"http://{server}"
    path = f"/v1/models/{model}" + (f"/versions/{int(version)}" if version is not None else "")
    request = urllib.request.Request(
        base + path + ":predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            text = json.loads(text).get("error", text)
        except ValueError:
            pass
        raise PredictError(f"{model} ({base}): HTTP {e.code}: {text}", code=str(e.code)) from None
    if "error" in payload:
        raise PredictError(f"{model} ({base}): {payload['error']}")
    if row_format:
        rows = payload["predictions"]
        if rows and not isinstance(rows[0], dict):  # a single-output signature
            return {"output": np.asarray(rows)}
        return {
            key: _as_output(key, [row[key] for row in rows]) for key in (rows[0] if rows else {})
        }
    outputs = payload["outputs"]
    if not isinstance(outputs, dict):  # a single-output signature returns the bare value
        return {"output": np.asarray(outputs)}
    return {key: _as_output(key, value) for key, value in outputs.items()}


# ------------------------------------------------------------------------------ gRPC


def grpc_predict(
    server: str,
    model: str,
    inputs: Mapping[str, object],
    *,
    signature_name: str = DEFAULT_SIGNATURE,
    version: Optional[int] = None,
    timeout: float = 600.0,
) -> Dict[str, np.ndarray]:
    """PredictionService.Predict over an insecure gRPC channel.

    Arguments and return value as :func:`rest_predict`; tensors travel as TensorProtos with the
    signature dtypes.

    Raises:
      PredictError: with the gRPC status name as ``code`` (e.g. "INVALID_ARGUMENT").
    """
    import grpc  # pylint: disable=g-import-not-at-top (gRPC and TF only when used)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import predict_pb2  # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=g-import-not-at-top

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    for key, value in _typed(inputs).items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    options = [
        ("grpc.max_send_message_length", _GRPC_MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", _GRPC_MESSAGE_LIMIT),
    ]
    with grpc.insecure_channel(server, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            raise PredictError(
                f"{model} ({server}): {e.code().name}: {e.details()}", code=e.code().name
            ) from None
    return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}


def predict(
    server: str, model: str, inputs: Mapping[str, object], *, protocol: str = "rest", **kwargs
) -> Dict[str, np.ndarray]:
    """:func:`rest_predict` or :func:`grpc_predict`."""
    if protocol == "rest":
        return rest_predict(server, model, inputs, **kwargs)
    if protocol == "grpc":
        kwargs.pop("row_format", None)
        return grpc_predict(server, model, inputs, **kwargs)
    raise ValueError(f"unknown protocol {protocol!r}; allowed: rest, grpc")


def sample(
    server: str,
    model: str,
    seeds: Sequence[int],
    num_steps: int,
    *,
    protocol: str = "rest",
    sampler: str = "ancestral",
    eta: float = 0.0,
    class_labels=None,
    guidance_scale: float = 1.0,
    low_res=None,
    **kwargs,
) -> Dict[str, np.ndarray]:
    """Draws one image per seed from a served sampler (see :func:`sampler_inputs`)."""
    inputs = sampler_inputs(
        seeds,
        num_steps,
        sampler=sampler,
        eta=eta,
        class_labels=class_labels,
        guidance_scale=guidance_scale,
        low_res=low_res,
    )
    return predict(server, model, inputs, protocol=protocol, **kwargs)


def nll(
    server: str,
    model: str,
    images: np.ndarray,
    num_steps: int,
    *,
    protocol: str = "rest",
    seeds=None,
    class_labels=None,
    **kwargs,
) -> Dict[str, np.ndarray]:
    """Bits/dim of uint8 images [N, H, W, C] from a served NLL model (see :func:`nll_inputs`)."""
    inputs = nll_inputs(images, num_steps, seeds=seeds, class_labels=class_labels)
    return predict(server, model, inputs, protocol=protocol, **kwargs)


# ------------------------------------------------------------------------------ files


def write_pngs(images: np.ndarray, out_dir: str, names: Sequence[str]) -> list:
    """Writes uint8 images [N, H, W, C] (C = 1 or 3) as <out_dir>/<name>.png; returns the paths."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 [N, H, W, 1 or 3] images, got {images.dtype} {images.shape}"
        )
    if len(names) != images.shape[0]:
        raise ValueError(f"{len(names)} names for {images.shape[0]} images")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for image, name in zip(images, names):
        path = os.path.join(out_dir, f"{name}.png")
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        paths.append(path)
    return paths


def load_images(spec: str) -> np.ndarray:
    """uint8 [N, H, W, C] images from an .npz (``arr_0`` or ``images``), an .npy, or PNG paths."""
    paths = [p for p in spec.split(",") if p]
    if len(paths) == 1 and paths[0].endswith(".npz"):
        with np.load(paths[0]) as data:
            key = "arr_0" if "arr_0" in data.files else "images"
            if key not in data.files:
                raise ValueError(f"{paths[0]} has no arr_0 or images array (it has {data.files})")
            images = data[key]
    elif len(paths) == 1 and paths[0].endswith(".npy"):
        images = np.load(paths[0])
    else:
        from PIL import Image  # pylint: disable=g-import-not-at-top

        arrays = [np.asarray(Image.open(p)) for p in paths]
        images = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{spec}: expected uint8 [N, H, W, C] images, got {images.dtype} {images.shape}"
        )
    return images


# ------------------------------------------------------------------------------ command line

FLAGS = flags.FLAGS


def _define_flags():
    # Defined only when run as a program, so that importing the client next to another entry
    # point (run.py has --eta, --num_samples, ...) cannot clash.
    flags.DEFINE_string(
        "server",
        f"localhost:{REST_PORT}",
        f"host:port of TF-Serving's REST API ({REST_PORT}) or gRPC port ({GRPC_PORT}).",
    )
    flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "How to talk to the server.")
    flags.DEFINE_string("model", None, "Served model name, e.g. digits_sampler or digits_nll.")
    flags.DEFINE_integer("version", None, "Model version (default: the latest the server has).")
    flags.DEFINE_boolean(
        "row_format", False, "REST: send {'instances': [...]} instead of {'inputs': {...}}."
    )
    flags.DEFINE_list(
        "seeds",
        None,
        "sample: one seed per image (default 0..num_samples-1); "
        "nll: the per-image noise seeds (default 0..N-1).",
    )
    flags.DEFINE_integer("num_samples", 4, "sample: images to draw when --seeds is not given.")
    flags.DEFINE_integer(
        "num_steps", 50, "Network calls K per image (ancestral / DDIM: the respaced chain, K <= T)."
    )
    flags.DEFINE_string(
        "sampler",
        "ancestral",
        "sample: ancestral, ddim, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde or unipc (checked by the server).",
    )
    flags.DEFINE_float("eta", 0.0, "sample: DDIM eta in [0, 1].")
    flags.DEFINE_list(
        "class_labels", None, "Class-conditional models: one label per image, or one for all."
    )
    flags.DEFINE_float(
        "guidance_scale", 1.0, "sample, class-conditional models: classifier-free guidance s."
    )
    flags.DEFINE_string(
        "low_res", None, "sample, super-resolution model: low-resolution images (.npz/.npy/PNGs)."
    )
    flags.DEFINE_string(
        "images", None, "nll: images to evaluate (.npz with arr_0, .npy, or PNG paths)."
    )
    flags.DEFINE_string("out_dir", "samples", "sample: directory for the PNGs.")
    flags.DEFINE_string("output", None, "Optional .npz path for every output array.")
    flags.DEFINE_float("timeout", 600.0, "Request timeout in seconds.")


COMMANDS = ("sample", "nll")


def run(command: str) -> Dict[str, np.ndarray]:
    """Runs one command with the flags' settings; prints what it did."""
    if not FLAGS.model:
        raise app.UsageError("--model is required (e.g. digits_sampler)")
    labels = [int(v) for v in FLAGS.class_labels] if FLAGS.class_labels else None
    common = dict(protocol=FLAGS.protocol, version=FLAGS.version, timeout=FLAGS.timeout)
    if FLAGS.protocol == "rest":
        common["row_format"] = FLAGS.row_format
    if command == "sample":
        seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else list(range(FLAGS.num_samples))
        low_res = load_images(FLAGS.low_res) if FLAGS.low_res else None
        outputs = sample(
            FLAGS.server,
            FLAGS.model,
            seeds,
            FLAGS.num_steps,
            sampler=FLAGS.sampler,
            eta=FLAGS.eta,
            class_labels=labels,
            guidance_scale=FLAGS.guidance_scale,
            low_res=low_res,
            **common,
        )
        paths = write_pngs(outputs["images"], FLAGS.out_dir, [f"sample_seed{s}" for s in seeds])
        for path in paths:
            print(path)
    else:
        if not FLAGS.images:
            raise app.UsageError("nll needs --images")
        images = load_images(FLAGS.images)
        seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
        outputs = nll(
            FLAGS.server,
            FLAGS.model,
            images,
            FLAGS.num_steps,
            seeds=seeds,
            class_labels=labels,
            **common,
        )
        for index, (total, prior) in enumerate(zip(outputs["total_bpd"], outputs["prior_bpd"])):
            print(f"image {index}: total_bpd {total:.6f} prior_bpd {prior:.6f}")
        print(
            f"mean total_bpd {float(np.mean(outputs['total_bpd'])):.6f} over {len(images)} "
            f"images, {FLAGS.num_steps} steps"
        )
    if FLAGS.output:
        np.savez(FLAGS.output, **outputs)
        print(f"wrote {FLAGS.output}")
    return outputs


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command: {' or '.join(COMMANDS)} (got {argv[1:]})")
    try:
        run(argv[1])
    except PredictError as e:
        print(f"export.client: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
