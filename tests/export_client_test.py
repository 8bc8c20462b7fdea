"""Tests for export/client.py against local stand-ins for tensorflow_model_server.

No TF-Serving binary exists here, so the tests serve a class-conditional tiny export themselves: a
gRPC PredictionService and a REST endpoint (/v1/models/<name>:predict, columnar and row JSON), both
running the SavedModels the way the server does (serving.LocalSession: a TF1 session fed by
SignatureDef tensor names).  The client's request building and response parsing run for real.
"""

import concurrent.futures
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import types

import grpc
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from configs import tiny
from export import client
from export import export_lib
from export import serving
from tf_iddpm import config_utils
from tf_iddpm import inference
from tf_iddpm import samplers
from tf_iddpm import factory

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10


class _Models:
    """Served models by name; one lock, as a TF1 session callable is built on first use."""

    def __init__(self, sessions):
        self.sessions = sessions
        self.lock = threading.Lock()

    def run(self, name, inputs, signature_name):
        if name not in self.sessions:
            raise KeyError(f"Servable not found for request: Latest({name})")
        with self.lock:
            return self.sessions[name].run(inputs, signature_name or "serving_default")


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, models):
        self.models = models

    def Predict(self, request, context):  # pylint: disable=invalid-name (gRPC method name)
        try:
            outputs = self.models.run(
                request.model_spec.name,
                serving.request_inputs(request),
                request.model_spec.signature_name,
            )
        except KeyError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except tf.errors.InvalidArgumentError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


def _rest_handler(models):
    class Handler(http.server.BaseHTTPRequestHandler):
        """TF-Serving's REST predict API: JSON values cast to the signature dtypes."""

        def log_message(self, *args):  # keep test output quiet
            del args

        def _reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # pylint: disable=invalid-name
            match = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict", self.path)
            if not match:
                return self._reply(404, {"error": f"Malformed request: POST {self.path}"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name, signature_name = match.group(1), body.get("signature_name", "serving_default")
            if name not in models.sessions:
                return self._reply(
                    404, {"error": f"Servable not found for request: Latest({name})"}
                )
            try:
                dtypes = models.sessions[name].input_dtypes(signature_name)
                if "instances" in body:
                    rows = body["instances"]
                    inputs = {k: np.asarray([row[k] for row in rows], dtypes[k]) for k in rows[0]}
                else:
                    inputs = {k: np.asarray(v, dtypes[k]) for k, v in body["inputs"].items()}
                outputs = models.run(name, inputs, signature_name)
            except (tf.errors.InvalidArgumentError, ValueError) as e:
                return self._reply(400, {"error": getattr(e, "message", str(e))})
            if "instances" in body:
                count = next(iter(outputs.values())).shape[0]
                return self._reply(
                    200,
                    {
                        "predictions": [
                            {k: v[i].tolist() for k, v in outputs.items()} for i in range(count)
                        ]
                    },
                )
            return self._reply(200, {"outputs": {k: v.tolist() for k, v in outputs.items()}})

    return Handler


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    config = tiny.get_config()
    config.data.class_cond = True
    config.data.num_classes = NUM_CLASSES
    config.model.class_dropout = 0.1  # a null label: guidance_scale other than 1 is served
    config.export.model_name = "cond"
    net = factory.create_model_from_config(config)
    rng = np.random.default_rng(3)
    for variable in net.variables:
        variable.assign(variable.numpy() + rng.normal(0.0, 0.05, variable.shape).astype(np.float32))
    workdir = root / "workdir"
    workdir.mkdir()
    (workdir / "config.json").write_text(config_utils.config_to_json(config))
    tf.train.Checkpoint(model=net).save(str(workdir / "checkpoints" / "ckpt"))
    result = export_lib.export_from_workdir(None, str(workdir), str(root / "models"))

    sessions = {
        result.sampler_name: serving.LocalSession(result.sampler_dir),
        result.nll_name: serving.LocalSession(result.nll_dir),
    }
    models = _Models(sessions)
    grpc_server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionService(models), grpc_server
    )
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    rest_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(models))
    threading.Thread(target=rest_server.serve_forever, daemon=True).start()
    yield types.SimpleNamespace(
        config=config,
        net=net,
        result=result,
        models=models,
        root=root,
        grpc=f"127.0.0.1:{grpc_port}",
        rest=f"127.0.0.1:{rest_server.server_address[1]}",
        sampler=result.sampler_name,
        nll=result.nll_name,
    )
    rest_server.shutdown()
    grpc_server.stop(None)
    for session in sessions.values():
        session.close()


def _direct(served, name, inputs, signature_name="serving_default"):
    return served.models.run(name, inputs, signature_name)


def test_request_inputs_are_batch_major_with_signature_dtypes():
    inputs = client.sampler_inputs([5, 6, 7], 20, sampler="ddim", eta=0.5, class_labels=4)
    assert {k: (v.dtype.kind, v.shape) for k, v in inputs.items()} == {
        "seed": ("i", (3,)),
        "num_steps": ("i", (3,)),
        "sampler": ("U", (3,)),
        "eta": ("f", (3,)),
        "class_labels": ("i", (3,)),
        "guidance_scale": ("f", (3,)),
    }
    assert inputs["guidance_scale"].tolist() == [1.0] * 3
    assert inputs["seed"].dtype == np.int64 and inputs["eta"].dtype == np.float32
    assert inputs["sampler"].tolist() == ["ddim"] * 3
    assert inputs["num_steps"].tolist() == [20] * 3 and inputs["class_labels"].tolist() == [4] * 3
    images = np.zeros([2, 8, 8, 3], np.uint8)
    inputs = client.nll_inputs(images, 7)
    assert inputs["seed"].tolist() == [0, 1] and inputs["num_steps"].tolist() == [7, 7]
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, C\]"):
        client.nll_inputs(images.astype(np.float32), 7)
    with pytest.raises(ValueError, match="row format needs every input batch-major"):
        client.rest_predict("127.0.0.1:1", "m", {"seed": [1, 2], "num_steps": 3}, row_format=True)
    with pytest.raises(ValueError, match="unknown protocol"):
        client.predict("127.0.0.1:1", "m", {}, protocol="http2")


@pytest.mark.parametrize("row_format", [False, True], ids=["columnar", "row"])
def test_rest_sample_matches_the_model_and_writes_pngs(served, tmp_path, row_format):
    outputs = client.sample(
        served.rest, served.sampler, [0, 1, 2], 3, class_labels=[1, 2, 3], row_format=row_format
    )
    expected = _direct(
        served, served.sampler, client.sampler_inputs([0, 1, 2], 3, class_labels=[1, 2, 3])
    )
    assert outputs["images"].dtype == np.uint8 and outputs["images"].shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(outputs["images"], expected["images"])
    np.testing.assert_array_equal(outputs["images_float"], expected["images_float"])
    paths = client.write_pngs(outputs["images"], str(tmp_path), ["a", "b", "c"])
    for path, image in zip(paths, outputs["images"]):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)


def test_grpc_sample_and_nll_match_the_model(served):
    outputs = client.sample(
        served.grpc,
        served.sampler,
        [4, 9],
        4,
        protocol="grpc",
        sampler="ddim",
        eta=0.5,
        class_labels=[0, 9],
    )
    expected = _direct(
        served,
        served.sampler,
        client.sampler_inputs([4, 9], 4, sampler="ddim", eta=0.5, class_labels=[0, 9]),
    )
    np.testing.assert_array_equal(outputs["images"], expected["images"])
    np.testing.assert_array_equal(outputs["images_float"], expected["images_float"])

    images = np.random.default_rng(0).integers(0, 256, [2, 8, 8, 3]).astype(np.uint8)
    for protocol, server in (("grpc", served.grpc), ("rest", served.rest)):
        outputs = client.nll(
            server, served.nll, images, 6, protocol=protocol, seeds=[3, 4], class_labels=[5, 6]
        )
        expected = _direct(
            served, served.nll, client.nll_inputs(images, 6, seeds=[3, 4], class_labels=[5, 6])
        )
        assert set(outputs) == set(expected)
        for key, value in expected.items():
            assert outputs[key].dtype == value.dtype, key
            np.testing.assert_array_equal(outputs[key], value, err_msg=f"{protocol} {key}")
        np.testing.assert_allclose(
            outputs["total_bpd"], outputs["prior_bpd"] + outputs["vb_terms"].sum(1), rtol=1e-6
        )


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_server_errors_reach_the_caller_with_their_message(served, protocol):
    server = served.rest if protocol == "rest" else served.grpc
    code = "400" if protocol == "rest" else "INVALID_ARGUMENT"
    with pytest.raises(client.PredictError, match=r"class_labels must lie in \[0, 10\)") as error:
        client.sample(server, served.sampler, [1, 2], 3, class_labels=[3, 10], protocol=protocol)
    assert error.value.code == code
    with pytest.raises(client.PredictError, match=r"num_steps must lie in \[1, 100\]") as error:
        client.nll(
            server,
            served.nll,
            np.zeros([1, 8, 8, 3], np.uint8),
            0,
            class_labels=[1],
            protocol=protocol,
        )
    assert error.value.code == code
    with pytest.raises(client.PredictError, match="class_labels must be a vector"):
        client.predict(
            server,
            served.sampler,
            dict(client.sampler_inputs([1, 2], 3, class_labels=[1, 2]), class_labels=[1]),
            protocol=protocol,
        )
    with pytest.raises(client.PredictError, match="not found"):
        client.sample(server, "no_such_model", [1], 3, protocol=protocol)


def test_command_line_writes_pngs_and_prints_bpd(served, tmp_path):
    out_dir = tmp_path / "pngs"
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.client",
            f"--server={served.rest}",
            f"--model={served.sampler}",
            "sample",
            "--seeds=4,5",
            "--num_steps=2",
            "--class_labels=7",
            f"--out_dir={out_dir}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert sample.returncode == 0, sample.stderr[-2000:]
    expected = _direct(served, served.sampler, client.sampler_inputs([4, 5], 2, class_labels=7))
    for seed, image in zip((4, 5), expected["images"]):
        path = out_dir / f"sample_seed{seed}.png"
        assert str(path) in sample.stdout
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)

    images = np.random.default_rng(1).integers(0, 256, [2, 8, 8, 3]).astype(np.uint8)
    np.savez(tmp_path / "images.npz", images)
    bpd = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.client",
            f"--server={served.grpc}",
            "--protocol=grpc",
            f"--model={served.nll}",
            "nll",
            f"--images={tmp_path / 'images.npz'}",
            "--num_steps=3",
            "--class_labels=2",
            f"--output={tmp_path / 'bpd.npz'}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert bpd.returncode == 0, bpd.stderr[-2000:]
    expected = _direct(served, served.nll, client.nll_inputs(images, 3, class_labels=2))
    assert f"mean total_bpd {np.mean(expected['total_bpd']):.6f} over 2 images" in bpd.stdout
    assert f"image 1: total_bpd {expected['total_bpd'][1]:.6f}" in bpd.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "bpd.npz")["vb_terms"], expected["vb_terms"])

    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.client",
            f"--server={served.rest}",
            f"--model={served.sampler}",
            "sample",
            "--seeds=1",
            "--num_steps=101",
            "--class_labels=0",
            f"--out_dir={out_dir}",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1
    assert "num_steps (network calls) out of range for the sampler" in failed.stderr


def test_rest_client_imports_no_tensorflow():
    code = (
        "import sys, export.client\n"
        "assert 'tensorflow' not in sys.modules and 'tf_iddpm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_load_images_reads_npz_npy_and_pngs(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, [2, 4, 4, 3]).astype(np.uint8)
    np.savez(tmp_path / "a.npz", images, np.arange(2))
    np.save(tmp_path / "b.npy", images)
    paths = client.write_pngs(images, str(tmp_path), ["p0", "p1"])
    for spec in (str(tmp_path / "a.npz"), str(tmp_path / "b.npy"), ",".join(paths)):
        np.testing.assert_array_equal(client.load_images(spec), images)
    np.save(tmp_path / "bad.npy", images.astype(np.float32))
    with pytest.raises(ValueError, match=r"expected uint8 \[N, H, W, C\]"):
        client.load_images(str(tmp_path / "bad.npy"))


def test_guided_requests_are_the_in_process_guided_sampler(served):
    seeds, labels = [4, 9], [1, 8]
    outputs = client.sample(
        served.rest,
        served.sampler,
        seeds,
        5,
        sampler="dpmpp_2m",
        class_labels=labels,
        guidance_scale=2.5,
    )
    spec = samplers.SamplerSpec("dpmpp_2m", "5", guidance_scale=2.5)
    sampler = inference.build_sampler(inference.model_function(served.net), served.config, spec)
    expected = sampler(np.array(seeds), np.array(labels)).numpy()
    np.testing.assert_array_equal(outputs["images_float"], expected)
    unguided = client.sample(
        served.rest, served.sampler, seeds, 5, sampler="dpmpp_2m", class_labels=labels
    )
    assert np.abs(unguided["images_float"] - expected).max() > 1e-3
    with pytest.raises(client.PredictError, match="guidance_scale must be finite and >= 0"):
        client.sample(
            served.rest, served.sampler, seeds, 5, class_labels=labels, guidance_scale=-1.0
        )
