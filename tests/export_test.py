"""Tests for export/ (export_lib, serving, python -m export): SavedModels for TF-Serving.

One tiny model (configs/tiny.py, weights perturbed so that the zero-initialised output convs do not
make every output trivial) is exported once per module; the tests then check the SavedModels the
way TF-Serving and its tools see them: saved_model_cli, a fresh Python process without the project,
a TF1 session fed by SignatureDef tensor names (the C++ path), warm-up records and server files.
"""

import json
import os
import re
import subprocess
import sys
import types

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import text_format
import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from export import export_lib
from export import serving
from tests import golden
from tf_iddpm import config_utils
from tf_iddpm import convert
from tf_iddpm import factory
from tf_iddpm import chains
from tf_iddpm import image_utils
from tf_iddpm import inference
from tf_iddpm import samplers

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
SITE_PACKAGES = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p))
IMAGE_SHAPE = [8, 8, 3]
NUM_TIMESTEPS = 100  # configs/tiny.py


def perturbed_net(config, seed):
    """The config's UNet with every weight moved by N(0, 0.05^2), so no output is trivially zero."""
    net = factory.create_model_from_config(config)
    rng = np.random.default_rng(seed)
    for variable in net.variables:
        variable.assign(variable.numpy() + rng.normal(0.0, 0.05, variable.shape).astype(np.float32))
    return net


def write_workdir(workdir, config, nets):
    """A training-workdir layout: config.json and checkpoints/ckpt-1 holding the given nets."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as file:
        file.write(config_utils.config_to_json(config))
    tf.train.Checkpoint(**nets).save(os.path.join(workdir, "checkpoints", "ckpt"))


def model_fn(net):
    return lambda x, t, **kwargs: net(x, t, training=False, **kwargs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    config = tiny.get_config()
    raw_net, ema_net = perturbed_net(config, 0), perturbed_net(config, 1)
    workdir = str(root / "workdir")
    write_workdir(workdir, config, {"model": raw_net, "ema_0p99": ema_net})
    export_dir = str(root / "models")
    result = export_lib.export_from_workdir(None, workdir, export_dir)
    return types.SimpleNamespace(
        config=config,
        raw_net=raw_net,
        ema_net=ema_net,
        workdir=workdir,
        export_dir=export_dir,
        result=result,
        root=root,
    )


@pytest.fixture(scope="module")
def sessions(exported):
    """The exported models loaded as TF-Serving loads them (TF1 session, SignatureDef names)."""
    opened = {
        "sampler": serving.LocalSession(exported.result.sampler_dir),
        "nll": serving.LocalSession(exported.result.nll_dir),
    }
    yield opened
    for session in opened.values():
        session.close()


def reference_samples(config, net, seeds, num_steps, *, sampler="ancestral", eta=0.0):
    """The in-process sampler of --mode=sample with --sampler=S --steps=K."""
    spec = samplers.SamplerSpec(kind=sampler, steps=str(num_steps), eta=eta)
    return inference.build_sampler(model_fn(net), config, spec)(np.asarray(seeds)).numpy()


def reference_bpd(config, net, images, num_steps, seeds):
    """The in-process evaluator: calc_bpd_loop on the "K"-respaced process, eager normalisation."""
    process = factory.create_diffusion_from_config(config, timestep_respacing=str(num_steps))
    out = chains.calc_bpd_loop(
        process,
        model_fn(net),
        image_utils.normalize_images(images),
        seeds=tf.constant(seeds, tf.int64),
    )
    return {key: value.numpy() for key, value in out.items()}


def test_export_layout_and_server_files(exported):
    result = exported.result
    assert result.version == 1 and result.weights == "ema_0p99"
    assert result.sampler_dir == os.path.join(exported.export_dir, "tiny_sampler", "1")
    assert result.nll_dir == os.path.join(exported.export_dir, "tiny_nll", "1")
    for directory in (result.sampler_dir, result.nll_dir):
        for name in (
            "saved_model.pb",
            "variables/variables.index",
            "assets.extra/tf_serving_warmup_requests",
            "assets.extra/iddpm_export.json",
        ):
            assert os.path.exists(os.path.join(directory, name)), name
        with open(os.path.join(directory, "assets.extra", "iddpm_export.json")) as file:
            metadata = json.load(file)
        assert metadata["weights"] == "ema_0p99" and metadata["version"] == 1
        assert metadata["checkpoint"].endswith(os.path.join("checkpoints", "ckpt-1"))
        assert metadata["config"]["diffusion"]["steps"] == NUM_TIMESTEPS
    # Nothing but the two models and the two server files; no temporary directory left behind.
    assert sorted(os.listdir(exported.export_dir)) == [
        "batching_parameters.txt",
        "models.config",
        "tiny_nll",
        "tiny_sampler",
    ]

    server_config = serving.read_model_server_config(result.models_config)
    entries = {c.name: c for c in server_config.model_config_list.config}
    assert sorted(entries) == ["tiny_nll", "tiny_sampler"]
    assert entries["tiny_sampler"].base_path == os.path.dirname(result.sampler_dir)
    assert entries["tiny_nll"].base_path == os.path.dirname(result.nll_dir)
    assert {c.model_platform for c in entries.values()} == {"tensorflow"}


def _batching_parameters_class():
    """tensorflow_serving's BatchingParameters (session_bundle_config.proto; not in the pip API)."""
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    from google.protobuf import wrappers_pb2  # pylint: disable=g-import-not-at-top

    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    proto = descriptor_pb2.FileDescriptorProto(
        name="session_bundle_config_subset.proto",
        package="tensorflow.serving",
        dependency=["google/protobuf/wrappers.proto"],
        syntax="proto3",
    )
    message = proto.message_type.add(name="BatchingParameters")
    int64 = descriptor_pb2.FieldDescriptorProto
    for number, name in enumerate(
        ["max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"],
        start=1,
    ):
        message.field.add(
            name=name,
            number=number,
            type=int64.TYPE_MESSAGE,
            label=int64.LABEL_OPTIONAL,
            type_name=".google.protobuf.Int64Value",
        )
    message.field.add(
        name="thread_pool_name",
        number=5,
        type=int64.TYPE_MESSAGE,
        label=int64.LABEL_OPTIONAL,
        type_name=".google.protobuf.StringValue",
    )
    message.field.add(
        name="allowed_batch_sizes", number=6, type=int64.TYPE_INT64, label=int64.LABEL_REPEATED
    )
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


def test_batching_parameters_parse(exported):
    with open(exported.result.batching_parameters) as file:
        parameters = text_format.Parse(file.read(), _batching_parameters_class()())
    assert parameters.max_batch_size.value == exported.config.export.max_batch_size == 4
    assert parameters.num_batch_threads.value >= 1
    assert parameters.max_enqueued_batches.value >= 1
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        serving.batching_parameters_text(max_batch_size=0)


def _run_in_parallel(commands):
    """Runs commands concurrently (each loads TensorFlow for seconds); returns their stdouts."""
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    outputs = [process.communicate() for process in processes]
    for command, process, (_, stderr) in zip(commands, processes, outputs):
        assert process.returncode == 0, (command, stderr[-3000:])
    return [stdout for stdout, _ in outputs]


def _parse_show(text):
    """`saved_model_cli show --all` -> {signature: {"inputs"/"outputs": {name: (dtype, shape)}}}."""
    signatures = {}
    for block in re.split(r"\nsignature_def\['", text)[1:]:
        name = block.split("'", 1)[0]
        entry = {"inputs": {}, "outputs": {}}
        for kind, key, dtype, shape in re.findall(
            r"(inputs|outputs)\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: ([^\n]+)", block
        ):
            entry[kind][key] = (dtype, shape.strip())
        signatures[name] = entry
    return signatures


def test_saved_model_cli_show_and_run(exported, tmp_path):
    """`show --all` lists the documented signatures; `run` executes each model (4 CLI calls)."""
    images = np.random.default_rng(5).integers(0, 256, [2] + IMAGE_SHAPE).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    sampler_out, nll_out = tmp_path / "sampler", tmp_path / "nll"
    run = [SAVED_MODEL_CLI, "run", "--tag_set", "serve", "--signature_def", "serving_default"]
    show_sampler, show_nll, _, _ = _run_in_parallel(
        [
            [SAVED_MODEL_CLI, "show", "--dir", exported.result.sampler_dir, "--all"],
            [SAVED_MODEL_CLI, "show", "--dir", exported.result.nll_dir, "--all"],
            run
            + [
                "--dir",
                exported.result.sampler_dir,
                "--outdir",
                str(sampler_out),
                "--input_exprs",
                "seed=[1,2];num_steps=3;sampler='dpmpp_2m';eta=0.0",
            ],
            run
            + [
                "--dir",
                exported.result.nll_dir,
                "--outdir",
                str(nll_out),
                "--inputs",
                f"images={tmp_path / 'images.npy'}",
                "--input_exprs",
                "num_steps=4;seed=[1,2]",
            ],
        ]
    )

    image_spec, unknown = "(-1, 8, 8, 3)", "unknown_rank"
    assert _parse_show(show_sampler)["serving_default"] == {
        "inputs": {
            "seed": ("DT_INT64", "(-1)"),
            "num_steps": ("DT_INT32", unknown),
            "sampler": ("DT_STRING", unknown),
            "eta": ("DT_FLOAT", unknown),
        },
        "outputs": {"images": ("DT_UINT8", image_spec), "images_float": ("DT_FLOAT", image_spec)},
    }
    nll = _parse_show(show_nll)
    outputs = {
        "total_bpd": ("DT_FLOAT", "(-1)"),
        "prior_bpd": ("DT_FLOAT", "(-1)"),
        "vb_terms": ("DT_FLOAT", "(-1, -1)"),
        "xstart_mse": ("DT_FLOAT", "(-1, -1)"),
        "mse": ("DT_FLOAT", "(-1, -1)"),
        "vb_timesteps": ("DT_INT32", "(-1, -1)"),
    }
    assert nll["serving_default"] == {
        "inputs": {
            "images": ("DT_UINT8", image_spec),
            "num_steps": ("DT_INT32", unknown),
            "seed": ("DT_INT64", "(-1)"),
        },
        "outputs": outputs,
    }
    assert nll["nll_replay"] == {
        "inputs": {"images": ("DT_UINT8", image_spec), "noise": ("DT_FLOAT", "(-1, -1, 8, 8, 3)")},
        "outputs": outputs,
    }

    expected = reference_samples(exported.config, exported.ema_net, [1, 2], 3, sampler="dpmpp_2m")
    np.testing.assert_array_equal(np.load(sampler_out / "images_float.npy"), expected)
    np.testing.assert_array_equal(
        np.load(sampler_out / "images.npy"), image_utils.denormalize_images(expected).numpy()
    )
    expected = reference_bpd(exported.config, exported.ema_net, images, 4, [1, 2])
    np.testing.assert_array_equal(np.load(nll_out / "vb_terms.npy"), expected["vb"])
    np.testing.assert_allclose(np.load(nll_out / "total_bpd.npy"), expected["total_bpd"], rtol=2e-7)


# The program a fresh interpreter runs: no project on the path, then both SavedModels.
FRESH_PROCESS = r"""
import importlib.util, os, sys
site_packages, repo_root, sampler_dir, nll_dir, images_path, out_path = sys.argv[1:]
sys.path.append(site_packages)   # -S: no .pth files, hence no editable install of the project
for name in ("tf_iddpm", "export", "configs", "tests"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable"
import numpy as np
import tensorflow as tf

sampler = tf.saved_model.load(sampler_dir).signatures["serving_default"]
nll = tf.saved_model.load(nll_dir).signatures["serving_default"]
def run(signature, **inputs):
    return {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in inputs.items()}).items()}
images = np.load(images_path)
results = {}
for name, out in {
    "ancestral": run(sampler, seed=np.array([3, 7, 9], np.int64), num_steps=np.int32(4),
                     sampler="ancestral", eta=np.float32(0)),
    "ddim": run(sampler, seed=np.array([3, 7], np.int64), num_steps=np.int32(3),
                sampler="ddim", eta=np.float32(0.5)),
    "mixed": run(sampler, seed=np.array([3, 7, 9], np.int64), num_steps=np.array([4, 3, 4], np.int32),
                 sampler=np.array(["ancestral", "ddim", "ancestral"]),
                 eta=np.array([0, 0.5, 0], np.float32)),
    "alone": run(sampler, seed=np.array([7], np.int64), num_steps=np.int32(3),
                 sampler="ddim", eta=np.float32(0.5)),
    **{solver: run(sampler, seed=np.array([3, 7], np.int64), num_steps=np.int32(5),
                   sampler=solver, eta=np.float32(0))
       for solver in ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")},
    "nll_full": run(nll, images=images, num_steps=np.int32(100), seed=np.array([1, 2, 3], np.int64)),
    "nll_mixed": run(nll, images=images, num_steps=np.array([100, 5, 100], np.int32),
                     seed=np.array([1, 2, 3], np.int64)),
}.items():
    results.update({f"{name}/{k}": v for k, v in out.items()})
def project_file(module):   # a file of the repository, not of its virtualenv (which may live inside)
    path = os.path.realpath(getattr(module, "__file__", None) or "/")
    return path.startswith(repo_root + os.sep) and not path.startswith(os.path.realpath(site_packages) + os.sep)
leaked = sorted(name for name, module in sys.modules.items() if project_file(module))
assert not leaked, leaked
np.savez(out_path, **results)
"""


def test_fresh_process_without_project_reproduces_in_process_results(exported, tmp_path):
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    images = np.random.default_rng(0).integers(0, 256, [3] + IMAGE_SHAPE).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    out_path = tmp_path / "out.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-S",
            str(script),
            SITE_PACKAGES,
            REPO_ROOT,
            exported.result.sampler_dir,
            exported.result.nll_dir,
            str(tmp_path / "images.npy"),
            str(out_path),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    config, net = exported.config, exported.ema_net
    ancestral = reference_samples(config, net, [3, 7, 9], 4)  # meanwhile, in this process
    ddim = reference_samples(config, net, [3, 7], 3, sampler="ddim", eta=0.5)
    solved = {
        solver: reference_samples(config, net, [3, 7], 5, sampler=solver)
        for solver in ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
    }
    full = reference_bpd(config, net, images, NUM_TIMESTEPS, [1, 2, 3])
    # The comparison below needs a deterministic reference.  calc_bpd_loop's iterations are
    # independent, so tf.while_loop runs up to 10 at once; with oneDNN kernels this was seen to
    # change one vb column in ~1 of 7 runs (fixed by parallel_iterations=1 in the loop).
    again = reference_bpd(config, net, images, NUM_TIMESTEPS, [1, 2, 3])
    assert np.array_equal(full["vb"], again["vb"]), (
        "tf_iddpm.chains.calc_bpd_loop gave different vb on two identical runs (columns "
        f"{np.where((full['vb'] != again['vb']).any(0))[0]}): parallel while_loop iterations race"
    )
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    got = np.load(out_path)

    # Same seeds, same batch => bit-identical to the in-process sampler and evaluator.
    np.testing.assert_array_equal(got["ancestral/images_float"], ancestral)
    np.testing.assert_array_equal(
        got["ancestral/images"], image_utils.denormalize_images(ancestral)
    )
    np.testing.assert_array_equal(got["ddim/images_float"], ddim)
    for solver, images_float in solved.items():  # the solvers' grids are computed in-graph too
        np.testing.assert_array_equal(got[f"{solver}/images_float"], images_float, err_msg=solver)
    # A request mixing settings runs one chain per setting, bit-identical to running each group
    # as its own request.  Across batch sizes an image is the same only up to rounding: the
    # convolutions round differently per batch size (~1e-6 in the network output, with or without
    # oneDNN), and 1 / sqrt(alpha_bar_t) amplifies that in pred_xstart at large t (seen: 3e-4).
    np.testing.assert_array_equal(got["mixed/images_float"][1], got["alone/images_float"][0])
    np.testing.assert_array_equal(
        got["mixed/images_float"][[0, 2]], reference_samples(config, net, [3, 9], 4)
    )
    np.testing.assert_allclose(got["mixed/images_float"][[0, 2]], ancestral[[0, 2]], atol=2e-3)
    np.testing.assert_allclose(got["mixed/images_float"][1], ddim[1], atol=2e-3)
    assert np.abs(got["ancestral/images_float"][0] - got["ancestral/images_float"][1]).max() > 0.1

    # Every per-step term (network output, KL / decoder terms) is bit-identical.  The prior term
    # uses alpha_bar_{K-1} of the respaced process, which the exported graph rebuilds from
    # num_steps at run time while the in-process one folds it as a constant: up to 1 ulp apart.
    for key, ours in (("vb", "vb_terms"), ("xstart_mse", "xstart_mse"), ("mse", "mse")):
        np.testing.assert_array_equal(got[f"nll_full/{ours}"], full[key], err_msg=key)
    for key in ("prior_bpd", "total_bpd"):
        np.testing.assert_allclose(
            got[f"nll_full/{key}"], full[key], rtol=2e-7, atol=0, err_msg=key
        )
    np.testing.assert_array_equal(
        got["nll_full/vb_timesteps"], np.tile(np.arange(99, -1, -1), [3, 1])
    )
    # K = T is the full chain of the trained process (no respacing): same numbers up to rounding.
    unrespaced = chains.calc_bpd_loop(
        factory.create_diffusion_from_config(config),
        model_fn(net),
        image_utils.normalize_images(images),
        seeds=tf.constant([1, 2, 3], tf.int64),
    )
    np.testing.assert_allclose(got["nll_full/total_bpd"], unrespaced["total_bpd"], rtol=1e-6)

    # Mixed step counts: short rows padded with 0 / -1; the bound still adds up.
    short = reference_bpd(config, net, images[1:2], 5, [2])
    np.testing.assert_allclose(got["nll_mixed/vb_terms"][1, :5], short["vb"][0], rtol=1e-6)
    np.testing.assert_array_equal(got["nll_mixed/vb_terms"][1, 5:], 0.0)
    np.testing.assert_array_equal(got["nll_mixed/vb_timesteps"][1, :6], [99, 74, 50, 25, 0, -1])
    np.testing.assert_allclose(
        got["nll_mixed/total_bpd"],
        got["nll_mixed/prior_bpd"] + got["nll_mixed/vb_terms"].sum(1),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        got["nll_mixed/total_bpd"][[0, 2]], full["total_bpd"][[0, 2]], rtol=1e-6
    )


def test_warmup_records_parse_and_replay(exported, sessions):
    expected = {
        "sampler": ("tiny_sampler", {"serving_default"}),
        "nll": ("tiny_nll", {"serving_default", "nll_replay"}),
    }
    for key, directory in (
        ("sampler", exported.result.sampler_dir),
        ("nll", exported.result.nll_dir),
    ):
        logs = serving.read_warmup_requests(directory)
        model_name, signature_names = expected[key]
        assert {
            log.predict_log.request.model_spec.signature_name for log in logs
        } == signature_names
        for log in logs:
            request = log.predict_log.request
            assert request.model_spec.name == model_name
            inputs = serving.request_inputs(request)
            # batch-major inputs (what request batching needs), with the signature dtypes
            assert all(value.ndim >= 1 for value in inputs.values())
            session = sessions[key]
            dtypes = session.input_dtypes(request.model_spec.signature_name)
            assert {k: v.dtype for k, v in inputs.items()} == {
                k: np.dtype(v) for k, v in dtypes.items()
            }
            outputs = session.run(inputs, request.model_spec.signature_name)
            for name, value in outputs.items():
                assert value.shape[0] == 1 and np.all(np.isfinite(value)), name


GOOD_SAMPLE = dict(
    seed=np.array([1, 2], np.int64),
    num_steps=np.array(2, np.int32),
    sampler=np.array(b"ancestral"),
    eta=np.array(0.0, np.float32),
)
GOOD_NLL = dict(
    images=np.zeros([2] + IMAGE_SHAPE, np.uint8),
    num_steps=np.array(2, np.int32),
    seed=np.array([1, 2], np.int64),
)
GOOD_REPLAY = dict(
    images=np.zeros([2] + IMAGE_SHAPE, np.uint8), noise=np.zeros([2, 3] + IMAGE_SHAPE, np.float32)
)
STEPS_RANGE = r"num_steps must lie in \[1, 100\]"
CALLS_RANGE = r"num_steps \(network calls\) out of range for the sampler; allowed: ancestral 1..100"
MALFORMED = [
    ("sampler", "serving_default", dict(GOOD_SAMPLE, num_steps=np.array(0, np.int32)), CALLS_RANGE),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, num_steps=np.array(101, np.int32)),
        CALLS_RANGE,
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, sampler=np.array(b"dpmpp_3m"), num_steps=np.array(2, np.int32)),
        r"dpmpp_3m 3..",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, sampler=np.array(b"euler")),
        "sampler must name one of: ancestral, ddim, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, sampler=np.array([b"ddim", b"ddim", b"ddim"])),
        r"sampler must be a scalar or a vector \[N\] with one value per image",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, num_steps=np.array([2, 2, 2], np.int32)),
        r"num_steps must be a scalar or a vector \[N\] with one value per image",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, num_steps=np.array([[2, 2]], np.int32)),
        r"num_steps must be a scalar or a vector \[N\]",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, seed=np.zeros([0], np.int64)),
        "seed is empty",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, seed=np.array([[1, 2]], np.int64)),
        r"seed must be a vector \[N\]",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, seed=np.array([1.0, 2.0], np.float32)),
        "expect int64",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, eta=np.array(-0.5, np.float32), sampler=np.array(b"ddim")),
        r"eta must lie in \[0, 1\]",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, eta=np.array(np.nan, np.float32), sampler=np.array(b"ddim")),
        r"eta must lie in \[0, 1\]",
    ),
    (
        "sampler",
        "serving_default",
        dict(GOOD_SAMPLE, eta=np.array(0.5, np.float32)),
        "eta only applies to ddim",
    ),
    ("nll", "serving_default", dict(GOOD_NLL, num_steps=np.array([0, 2], np.int32)), STEPS_RANGE),
    ("nll", "serving_default", dict(GOOD_NLL, num_steps=np.array(101, np.int32)), STEPS_RANGE),
    (
        "nll",
        "serving_default",
        dict(GOOD_NLL, images=np.zeros([2, 16, 16, 3], np.uint8)),
        r"images must be uint8 \[N, 8, 8, 3\]",
    ),
    (
        "nll",
        "serving_default",
        dict(GOOD_NLL, images=np.zeros([2, 8, 8, 1], np.uint8)),
        r"images must be uint8 \[N, 8, 8, 3\]",
    ),
    (
        "nll",
        "serving_default",
        dict(GOOD_NLL, images=np.zeros(IMAGE_SHAPE, np.uint8)),
        r"images must be uint8 \[N, 8, 8, 3\]",
    ),
    (
        "nll",
        "serving_default",
        dict(GOOD_NLL, images=np.zeros([2] + IMAGE_SHAPE, np.float32)),
        "expect uint8",
    ),
    (
        "nll",
        "serving_default",
        dict(GOOD_NLL, seed=np.array([1], np.int64)),
        r"seed must be a vector \[N\] holding exactly one value per image",
    ),
    (
        "nll",
        "serving_default",
        dict(GOOD_NLL, images=np.zeros([0] + IMAGE_SHAPE, np.uint8), seed=np.zeros([0], np.int64)),
        "images is empty",
    ),
    (
        "nll",
        "nll_replay",
        dict(GOOD_REPLAY, noise=np.zeros([1, 3] + IMAGE_SHAPE, np.float32)),
        r"noise must be float32 \[N, K, 8, 8, 3\]",
    ),
    (
        "nll",
        "nll_replay",
        dict(GOOD_REPLAY, noise=np.zeros([2, 3, 8, 8], np.float32)),
        r"noise must be float32 \[N, K, 8, 8, 3\]",
    ),
    (
        "nll",
        "nll_replay",
        dict(GOOD_REPLAY, noise=np.zeros([2, 0] + IMAGE_SHAPE, np.float32)),
        r"noise draws per image, K = noise.shape\[1\], must lie in \[1, 100\]",
    ),
]


@pytest.mark.parametrize(
    "model,signature,inputs,message",
    MALFORMED,
    ids=[f"{m}-{s}-{i}" for i, (m, s, _, _) in enumerate(MALFORMED)],
)
def test_malformed_request_is_invalid_argument(sessions, model, signature, inputs, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        sessions[model].run(inputs, signature)


def test_well_formed_requests_pass_the_checks(sessions):
    assert sessions["sampler"].run(GOOD_SAMPLE)["images"].shape == (2, 8, 8, 3)
    assert sessions["nll"].run(GOOD_NLL)["vb_terms"].shape == (2, 2)
    assert (
        sessions["nll"].run(GOOD_REPLAY, "nll_replay")["vb_timesteps"].tolist() == [[99, 50, 0]] * 2
    )


def test_malformed_request_through_the_tf2_loader(exported):
    """tf.saved_model.load callers get the same InvalidArgumentError and message."""
    signature = tf.saved_model.load(exported.result.sampler_dir).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=CALLS_RANGE):
        signature(
            **{
                k: tf.constant(v)
                for k, v in dict(GOOD_SAMPLE, num_steps=np.array(101, np.int32)).items()
            }
        )
    with pytest.raises(tf.errors.InvalidArgumentError, match="eta only applies to ddim"):
        signature(
            **{
                k: tf.constant(v)
                for k, v in dict(GOOD_SAMPLE, eta=np.array(0.5, np.float32)).items()
            }
        )


def test_reexport_adds_a_version_and_a_failed_export_leaves_nothing(exported, monkeypatch):
    before = {
        d: open(os.path.join(d, "saved_model.pb"), "rb").read()
        for d in (exported.result.sampler_dir, exported.result.nll_dir)
    }
    # `python -m export`, in a process that then checks that no training code was imported.
    program = (
        "import runpy, sys\n"
        f"sys.argv = ['export', '--workdir={exported.workdir}', "
        f"'--export_dir={exported.export_dir}']\n"
        "try:\n"
        "    runpy.run_module('export', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = [m for m in ('tf_iddpm.train_lib', 'tf_iddpm.data', 'tensorflow_datasets')"
        " if m in sys.modules]\n"
        "assert not bad, f'export imported training code: {bad}'\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "tensorflow_model_server --port=8500 --rest_api_port=8501" in completed.stdout
    for model in ("tiny_sampler", "tiny_nll"):
        assert serving.numeric_versions(os.path.join(exported.export_dir, model)) == [1, 2]
    for directory, content in before.items():  # version 1 untouched
        with open(os.path.join(directory, "saved_model.pb"), "rb") as file:
            assert file.read() == content

    with pytest.raises(ValueError, match="version 2 already exists"):
        export_lib.export_from_workdir(None, exported.workdir, exported.export_dir, version=2)

    # Crashes part-way leave no version 3 of either model and no temporary directory.  What is
    # saved does not matter here, so the SavedModel writer is replaced by a stub (no tracing).
    def stub_save(module, directory, model_name, metadata):
        del model_name, metadata
        os.makedirs(directory)
        open(os.path.join(directory, "saved_model.pb"), "wb").close()
        if isinstance(module, export_lib.NllModule) and crash_in == "nll_save":
            raise OSError("disk full")

    renames, real_rename = [], os.rename

    def failing_rename(source, target):
        renames.append(target)
        if len(renames) == 2:  # the sampler's version is already in place
            raise OSError("rename failed")
        real_rename(source, target)

    monkeypatch.setattr(export_lib, "_save_module", stub_save)
    for crash_in, error in (("nll_save", "disk full"), ("second_rename", "rename failed")):
        with monkeypatch.context() as patch:
            if crash_in == "second_rename":
                patch.setattr(export_lib.os, "rename", failing_rename)
            with pytest.raises(OSError, match=error):
                export_lib.export_from_workdir(None, exported.workdir, exported.export_dir)
        for model in ("tiny_sampler", "tiny_nll"):
            assert serving.numeric_versions(os.path.join(exported.export_dir, model)) == [1, 2]
        assert not [name for name in os.listdir(exported.export_dir) if name.startswith(".")]
    assert renames[0].endswith(os.path.join("tiny_sampler", "3"))


def test_weights_choice_ema_raw_and_converted_fallback(exported, tmp_path, caplog):
    config = exported.config

    def restore(workdir, **kwargs):
        model = inference.InferenceModel.restore(config, workdir, **kwargs)
        return model.net, model.loaded.attribute

    net, name = restore(exported.workdir, use_ema=True)
    assert name == "ema_0p99"
    for ours, theirs in zip(net.variables, exported.ema_net.variables):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    net, name = restore(exported.workdir, use_ema=False)
    assert name == "model"
    np.testing.assert_array_equal(net.variables[-1].numpy(), exported.raw_net.variables[-1].numpy())

    workdir = str(tmp_path / "converted")  # a converted checkpoint: `model` only
    write_workdir(workdir, config, {"model": exported.raw_net})
    with caplog.at_level("WARNING"):
        _, name = restore(workdir, use_ema=True)
    assert name == "model" and "ema_0p99" in caplog.text

    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        restore(workdir, use_ema=True, checkpoint=os.path.join(workdir, "nope-3"))
    with pytest.raises(ValueError, match="model name"):
        export_lib.export_saved_models(config, net, str(tmp_path / "x"), model_name="bad name")


# --- the converted reference model --------------------------------------------------------------

NLL = golden.load("nll")


def _reference_config(schedule, steps):
    """configs/base.py describing the reference fixture model and one nll.npz case."""
    config = golden.fixture_model_config()
    config.diffusion.steps = steps
    config.diffusion.noise_schedule = schedule
    config.diffusion.cdf = "approx"  # the reference's tanh CDF
    config.export.model_name = "reference"
    return config


@pytest.mark.parametrize(
    "case,schedule,steps,num_steps",
    [("plain_cosine_T50", "cosine", 50, 50), ("spaced_linear_T1000_r25", "linear", 1000, 25)],
)
def test_converted_reference_weights_reproduce_reference_bpd(
    tmp_path, case, schedule, steps, num_steps
):
    config = _reference_config(schedule, steps)
    workdir = str(tmp_path / "converted")
    convert.convert_checkpoint(golden.path("unet_weights.npz"), config, workdir)
    model = inference.InferenceModel.restore(config, workdir, use_ema=True)
    net, weights = model.net, model.loaded.attribute
    assert weights == "model"
    nll_dir = str(tmp_path / "nll")
    module = export_lib.NllModule(config, net)
    tf.saved_model.save(module, nll_dir, signatures=module.signatures())
    session = serving.LocalSession(nll_dir)

    x_start = golden.nhwc(NLL["x_start"])
    images = np.round((x_start + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(image_utils.normalize_images(images).numpy(), x_start)
    noise = golden.nhwc(NLL[f"{case}_noise"]).transpose(1, 0, 2, 3, 4)  # [N, K, H, W, C]
    out = session.run({"images": images, "noise": noise}, "nll_replay")
    for key, ours in (
        ("total_bpd", "total_bpd"),
        ("prior_bpd", "prior_bpd"),
        ("vb", "vb_terms"),
        ("xstart_mse", "xstart_mse"),
        ("mse", "mse"),
    ):
        error = golden.max_rel_error(out[ours], NLL[f"{case}_{key}"])
        assert error <= 1e-4, (key, error)
    assert out["vb_terms"].shape == (2, num_steps)
    # The seeded signature runs the same chain with its own noise: the prior term (no noise) is
    # the same, and the bound adds up.
    seeded = session.run(
        {
            "images": images,
            "num_steps": np.array(num_steps, np.int32),
            "seed": np.array([0, 1], np.int64),
        }
    )
    np.testing.assert_array_equal(seeded["prior_bpd"], out["prior_bpd"])
    np.testing.assert_allclose(
        seeded["total_bpd"], seeded["prior_bpd"] + seeded["vb_terms"].sum(1), rtol=1e-6
    )
    assert not np.array_equal(seeded["vb_terms"], out["vb_terms"])
    session.close()


def test_super_resolution_model_takes_low_res_input():
    """The upsampler's sampler takes uint8 low_res; its NLL conditions on the area-downsampled image."""
    config = tiny.get_config()
    config.data.low_res_size = 4
    net = perturbed_net(config, 2)
    low_res = np.random.default_rng(1).integers(0, 256, [2, 4, 4, 3]).astype(np.uint8)
    sampler = export_lib.SamplerModule(config, net)
    assert list(sampler.input_specs) == ["seed", "num_steps", "sampler", "eta", "low_res"]
    out = sampler.sample(
        tf.constant([1, 2], tf.int64),
        tf.constant(3),
        tf.constant("ancestral"),
        tf.constant(0.0),
        tf.constant(low_res),
    )
    process = factory.create_diffusion_from_config(config, timestep_respacing="3")
    expected = chains.p_sample_loop(
        process,
        model_fn(net),
        [2] + IMAGE_SHAPE,
        model_kwargs={"low_res": image_utils.normalize_images(low_res)},
        seeds=tf.constant([1, 2], tf.int64),
    )
    # Another graph than the export's (eager normalisation, one tf.function): equal up to rounding.
    np.testing.assert_allclose(out["images_float"].numpy(), expected.numpy(), atol=1e-5)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"low_res must be uint8 \[N, 4, 4, 3\]"
    ):
        sampler.sample(
            tf.constant([1, 2, 3], tf.int64),
            tf.constant(3),
            tf.constant("ancestral"),
            tf.constant(0.0),
            tf.constant(low_res),
        )

    images = np.random.default_rng(2).integers(0, 256, [2] + IMAGE_SHAPE).astype(np.uint8)
    out = export_lib.NllModule(config, net).nll(
        tf.constant(images), tf.constant(4), tf.constant([5, 6], tf.int64)
    )
    x_start = image_utils.normalize_images(images)
    expected = chains.calc_bpd_loop(
        factory.create_diffusion_from_config(config, timestep_respacing="4"),
        model_fn(net),
        x_start,
        model_kwargs={"low_res": image_utils.area_resize(x_start, 4)},
        seeds=tf.constant([5, 6], tf.int64),
    )
    np.testing.assert_allclose(out["vb_terms"].numpy(), expected["vb"].numpy(), rtol=1e-5)


def test_a_model_without_a_null_label_serves_guidance_scale_one_only():
    config = tiny.get_config()
    config.data.class_cond, config.data.num_classes = True, 10
    sampler = export_lib.SamplerModule(config, perturbed_net(config, 4))
    assert list(sampler.input_specs) == [
        "seed",
        "num_steps",
        "sampler",
        "eta",
        "class_labels",
        "guidance_scale",
    ]
    inputs = [
        tf.constant([1, 2], tf.int64),
        tf.constant(2),
        tf.constant("ddim"),
        tf.constant(0.0),
        tf.constant([3, 4]),
    ]
    assert sampler.sample(*inputs, tf.constant(1.0))["images"].shape[0] == 2
    with pytest.raises(tf.errors.InvalidArgumentError, match="guidance_scale must be 1"):
        sampler.sample(*inputs, tf.constant([1.0, 2.0]))
