"""Throughput benchmark on the bench config, optionally side by side with the PyTorch reference.

Run from the checkout's root (``tools/`` is not installed with the package; it reads ``configs/``):

    python -m tools.benchmark --what=all --batch=16 --threads=2
    python -m tools.benchmark --what=samplers --sampler_nfe=20   # every sampler kind at 20 calls
    python -m tools.benchmark --what=all --reference=/path/to/improved-diffusion \\
        --reference_python=/path/to/torchvenv/bin/python

Bench config: 32x32x3 images, 64 channels, 2 residual blocks per level, 4 heads, attention at 16x16
and 8x8, dropout 0.1, learned sigma, cosine schedule, T=1000, batch 16, Adam(W) lr 1e-4, hybrid
loss, uniform t-sampler.  Measurements (each after warm-up, each in a fresh process so that peak
RSS belongs to one measurement and threads are pinned before TensorFlow starts):

* train: full steps (forward, hybrid loss, backward, optimizer, EMA) on random images, no data I/O;
* sample50: ancestral sampling over a 50-step respaced chain, one batch per iteration (the
  inference layer's sampler of ``SamplerSpec(kind="ancestral", steps="50")``, one graph call);
* nll100: ``chains.calc_bpd_loop`` over a 100-step respaced chain, one batch per iteration (the
  network called as ``inference.model_function`` makes it, one graph call).

* samplers (``--what=samplers`` only): every sampler kind of
  :data:`tf_iddpm.samplers.SAMPLER_KINDS` at the same number of network calls per image
  (``--sampler_nfe``; ancestral and DDIM as that respacing, a solver as that many calls), each
  through ``InferenceModel(net, config).sampler(spec)``, one whole-chain call per iteration after
  a warm-up call (the trace), all kinds in one process on one network, taking turns per iteration
  so that a drifting machine slows them alike.  The table gives each kind's images/s, ms per
  network call per image, and its overhead over ancestral at equal NFE: what the solver's
  bookkeeping (its multistep history, extra arithmetic per step) costs on top of the network.  It
  is not part of ``--what=all``: at the bench batch it runs six chains where ``sample`` runs one
  (about as long as train, sample and nll together on 2 cores), and the reference has no solvers
  to compare with.

* matmul_peak: the machine's float32 (and with --precision=mixed_bfloat16, bfloat16) matmul
  throughput at the same thread count, from large square products: the roofline the model's
  achieved GFLOP/s (GFLOP per forward x forwards per second; a training step counts 3 forwards)
  is read against.

With --model=tiny every measurement runs on configs/tiny.py's model instead (8x8x3, 32 channels,
T=100): the measurement code end to end in seconds, for tests; its numbers are not the bench's.

With --bpd_check_workdir=DIR, the bpd of DIR's trained model (``InferenceModel.restore``, EMA
weights) over test images is computed in float32 and in mixed_bfloat16 on the same per-image seeds,
and the difference is printed.

With --reference the same three run with improved-diffusion (``tools/benchmark_reference.py``, run
by path under --reference_python), alternating ours / reference per measurement, and the ratios
are printed.
Output: a table and one JSON line (keys train_img_per_s, sample50_img_per_s, nll100_img_per_s,
peak_rss_mb, gflop_per_forward, and ref_* for the reference; --what=samplers: nfe and, per kind
under "samplers", img_per_s, ms_per_call_per_image and overhead_vs_ancestral).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "what",
    "all",
    ["train", "sample", "nll", "all", "profile", "samplers"],
    "What to measure; profile: where a training step's time goes (op categories and phases); "
    "samplers: every sampler kind at --sampler_nfe network calls (not part of all).",
)
flags.DEFINE_integer(
    "sampler_nfe",
    20,
    "--what=samplers: network calls per image of every kind (ancestral and DDIM: that "
    "respacing; solvers: that many calls). At least 3 (dpmpp_3m's order).",
)
flags.DEFINE_integer("batch", 16, "Batch size.")
flags.DEFINE_integer("threads", 2, "Intra-op threads (TF) / torch.set_num_threads (reference).")
flags.DEFINE_integer(
    "inter_op_threads", 1, "TF inter-op threads (the reference uses 1 interop thread)."
)
flags.DEFINE_integer("warmup", 2, "Warm-up iterations per measurement.")
flags.DEFINE_integer("iters", 5, "Timed iterations per measurement (train: x4 steps).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"], "Our compute precision.")
flags.DEFINE_string("reference", "", "Path to an openai/improved-diffusion checkout (optional).")
flags.DEFINE_string("reference_python", "", "Python with torch for the reference run.")
flags.DEFINE_string("json_out", "", "Also write the JSON result here.")
flags.DEFINE_string(
    "bpd_check_workdir",
    "",
    "A trained workdir: also measure how far mixed_bfloat16 moves its "
    "bpd from float32 (EMA weights, 100-step chain, --bpd_check_images test images).",
)
flags.DEFINE_integer("bpd_check_images", 64, "Test images for --bpd_check_workdir.")
flags.DEFINE_boolean(
    "activation_memory",
    False,
    "Also run the training step at half the batch: (peak RSS at --batch minus peak RSS at "
    "--batch/2) / (--batch/2) is the memory each image adds (activations kept for backward).",
)
flags.DEFINE_enum(
    "model",
    "bench",
    ["bench", "tiny"],
    "The measured model: bench (the bench config) or tiny (configs/tiny.py: 8x8x3 images, 32 "
    "channels, T=100), which runs the measurement code in seconds and says nothing about the "
    "bench model's speed.",
)
flags.DEFINE_string("child", "", "Internal: run one measurement in this process.")

# The checkout's root: the measurement children run `python -m tools.benchmark` from it.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASUREMENTS = {
    "train": "train_img_per_s",
    "sample": "sample50_img_per_s",
    "nll": "nll100_img_per_s",
}
# UNet forward passes per image of each measurement (backward ~ 2 forwards; one per chain step).
FORWARDS_PER_IMAGE = {"train": 3, "sample": 50, "nll": 100}


def bench_config(batch_size: int, precision: str = "float32"):
    """The benchmark's ConfigDict (configs/base.py schema)."""
    from configs import base  # pylint: disable=g-import-not-at-top

    config = base.get_config()
    config.data.image_size, config.data.num_channels = 32, 3
    config.model.num_channels, config.model.num_res_blocks = 64, 2
    config.model.num_heads, config.model.attention_resolutions = 4, "16,8"
    config.model.dropout, config.model.channel_mult = 0.1, ""
    config.diffusion.steps, config.diffusion.noise_schedule = 1000, "cosine"
    config.diffusion.learn_sigma, config.diffusion.rescale_learned_sigmas = True, True
    config.train.batch_size, config.train.lr, config.train.ema_rate = batch_size, 1e-4, "0.9999"
    config.train.schedule_sampler, config.train.mixed_precision = "uniform", precision
    return config


def measured_config(model: str, batch_size: int, precision: str = "float32"):
    """The config of --model: the bench config, or configs/tiny.py at the same batch and
    precision."""
    if model == "bench":
        return bench_config(batch_size, precision)
    from configs import tiny  # pylint: disable=g-import-not-at-top

    config = tiny.get_config()
    config.train.batch_size, config.train.mixed_precision = batch_size, precision
    return config


def _forward_gflop(net, image_size, channels):
    """GFLOP of one forward pass at batch 1, counting convolutions and matrix products (2 x MAC).

    Read off the traced graph's Conv2D / MatMul / BatchMatMul / Einsum ops and their static shapes,
    which is what the reference side counts too (torch FlopCounterMode: convs and matmuls only).
    """
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    fn = tf.function(lambda x, t: net(x, t, training=False)).get_concrete_function(
        tf.TensorSpec([1, image_size, image_size, channels], tf.float32),
        tf.TensorSpec([1], tf.float32),
    )
    flops = 0
    for op in fn.graph.get_operations():
        if op.type in ("Conv2D", "_FusedConv2D"):
            out = op.outputs[0].shape.as_list()
            kernel = op.inputs[1].shape.as_list()
            flops += 2 * int(np.prod(out)) * kernel[0] * kernel[1] * kernel[2]
        elif op.type in ("MatMul", "_FusedMatMul"):
            a = op.inputs[0].shape.as_list()
            k = a[0] if op.get_attr("transpose_a") else a[1]
            flops += 2 * int(np.prod(op.outputs[0].shape.as_list())) * k
        elif op.type in ("BatchMatMulV2", "BatchMatMulV3", "BatchMatMul"):
            a = op.inputs[0].shape.as_list()
            k = a[-2] if op.get_attr("adj_x") else a[-1]
            flops += 2 * int(np.prod(op.outputs[0].shape.as_list())) * k
        elif op.type == "Einsum":
            equation = op.get_attr("equation").decode()
            inputs = equation.split("->")[0]
            sizes = {}
            for term, tensor in zip(inputs.split(","), op.inputs):
                sizes.update(zip(term, tensor.shape.as_list()))
            flops += 2 * int(np.prod([sizes[c] for c in set(inputs.replace(",", ""))]))
    return flops / 1e9


def _matmul_peak_gflop_per_s(dtype_name: str) -> float:
    """Best GFLOP/s of large square matmuls (2048^3 x 2) in this process's thread setting."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    n = 2048
    a = tf.random.normal([n, n], dtype=tf.float32)
    a, b = tf.cast(a, dtype_name), tf.cast(tf.transpose(a), dtype_name)
    product = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1, :1], tf.float32)))
    product(a, b).numpy()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        product(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _bpd_precision_check(workdir: str, num_images: int):
    """Per-image bpd of workdir's EMA model on its test split: {policy name of the net: bpd}."""
    import keras  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tf_iddpm import chains  # pylint: disable=g-import-not-at-top
    from tf_iddpm import config_utils  # pylint: disable=g-import-not-at-top
    from tf_iddpm import data as data_lib  # pylint: disable=g-import-not-at-top
    from tf_iddpm import factory  # pylint: disable=g-import-not-at-top
    from tf_iddpm import inference  # pylint: disable=g-import-not-at-top

    config = config_utils.load_stored_config(workdir)
    batch = next(iter(data_lib.make_eval_dataset(config.data, batch_size=num_images)))
    seeds = tf.cast(batch["index"], tf.int64)
    bpd = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        model = inference.InferenceModel.restore(config, workdir, use_ema=True)
        diffusion = factory.create_diffusion_from_config(config, timestep_respacing="100")
        # Per image (not bits_per_dim's sums over a dataset): the check reports the largest change.
        nll = tf.function(
            lambda x, s, model_fn=model.model_fn, diffusion=diffusion: chains.calc_bpd_loop(
                diffusion, model_fn, x, seeds=s
            )["total_bpd"]
        )
        bpd[model.net.dtype_policy.name] = nll(batch["image"], seeds).numpy()[
            np.asarray(batch["mask"], bool)
        ]
    keras.mixed_precision.set_global_policy("float32")
    return bpd


# Profile categories of a training step's ops: (category, predicate on (op type, op name)).
# Names come from the graph's name scopes: the UNet's layers, the closed-form GroupNorm/SiLU
# gradient ("group_norm_grad"), dropout ("dropout"), the optimizer ("adam") and the EMA ("ema").
PROFILE_CATEGORIES = (
    ("conv forward", lambda t, n: "Conv2D" in t and "Backprop" not in t),
    ("conv backward, input", lambda t, n: "Conv2DBackpropInput" in t),
    ("conv backward, filter (+bias)", lambda t, n: "Conv2DBackpropFilter" in t),
    ("matmul (attention, qkv/proj, embedding)", lambda t, n: "MatMul" in t),
    ("optimizer (fused AdamW)", lambda t, n: "adam/" in n or t.startswith("ResourceApplyAdam")),
    ("EMA update", lambda t, n: "ema/" in n or t == "ResourceApplyGradientDescent"),
    ("casts float32 <-> bfloat16", lambda t, n: t == "Cast"),
    ("dropout (mask draw + multiply)", lambda t, n: "dropout/" in n),
    (
        "GroupNorm + SiLU (fused) and its gradient",
        lambda t, n: (
            "group_norm_grad" in n
            or t in ("Sigmoid", "SigmoidGrad", "_MklSwish")
            or any(s in n for s in ("in_layers.0", "out_layers.0", "/norm", "out.0"))
        ),
    ),
    ("attention softmax, transposes", lambda t, n: "Softmax" in t or "Transpose" in t),
    ("other elementwise (residual adds, concat, loss terms, ...)", lambda t, n: True),
)


def _profile(run, repeats):
    """Calls run() `repeats` times under the TF profiler; ms per call by category and by phase.

    Reads the host trace's op events (one per executed kernel; with one inter-op thread they do
    not overlap) from the XSpace the profiler writes.
    """
    import tempfile  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as logdir:
        options = tf.profiler.experimental.ProfilerOptions(
            host_tracer_level=3, python_tracer_level=0, device_tracer_level=0
        )
        tf.profiler.experimental.start(logdir, options=options)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        wall = (time.perf_counter() - start) / repeats
        tf.profiler.experimental.stop()
        paths = [
            os.path.join(root, name)
            for root, _, names in os.walk(logdir)
            for name in names
            if name.endswith(".xplane.pb")
        ]
        space = xplane_pb2.XSpace()
        with open(paths[0], "rb") as f:
            space.ParseFromString(f.read())
    categories = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    phases = {"forward (incl. loss)": 0.0, "backward": 0.0, "optimizer": 0.0, "EMA": 0.0}
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                op_name, _, op_type = plane.event_metadata[event.metadata_id].name.rpartition(":")
                kernel = op_name and op_type.replace("_", "").isalnum()
                if not kernel or op_type in ("Run", "Process"):
                    continue  # executor / session events, not kernels
                ms = event.duration_ps / 1e9 / repeats
                category = next(c for c, match in PROFILE_CATEGORIES if match(op_type, op_name))
                categories[category] += ms
                if category.startswith("optimizer"):
                    phases["optimizer"] += ms
                elif category == "EMA update":
                    phases["EMA"] += ms
                elif "gradient_tape" in op_name or "group_norm_grad" in op_name:
                    phases["backward"] += ms
                else:
                    phases["forward (incl. loss)"] += ms
    return {"step_ms": wall * 1e3, "categories_ms": categories, "phases_ms": phases}


def _child(what: str):
    """One measurement in this process; prints one JSON line."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    if what == "matmul_peak":
        result = {"what": what, "fp32_matmul_gflop_per_s": _matmul_peak_gflop_per_s("float32")}
        if FLAGS.precision == "mixed_bfloat16":
            result["bf16_matmul_gflop_per_s"] = _matmul_peak_gflop_per_s("bfloat16")
        print("BENCH_JSON " + json.dumps(result))
        return
    if what == "bpd_check":
        bpd = _bpd_precision_check(FLAGS.bpd_check_workdir, FLAGS.bpd_check_images)
        fp32, bf16 = bpd["float32"], bpd["mixed_bfloat16"]
        print(
            "BENCH_JSON "
            + json.dumps(
                {
                    "what": what,
                    "images": int(fp32.size),
                    "policies": sorted(bpd),
                    "fp32_bpd": float(fp32.mean()),
                    "bf16_bpd": float(bf16.mean()),
                    "bf16_bpd_delta": float((bf16 - fp32).mean()),
                    "bf16_bpd_delta_max_abs": float(np.abs(bf16 - fp32).max()),
                }
            )
        )
        return
    import keras  # pylint: disable=g-import-not-at-top
    from tf_iddpm import chains  # pylint: disable=g-import-not-at-top
    from tf_iddpm import factory  # pylint: disable=g-import-not-at-top
    from tf_iddpm import inference  # pylint: disable=g-import-not-at-top
    from tf_iddpm import samplers  # pylint: disable=g-import-not-at-top
    from tf_iddpm import train_lib  # pylint: disable=g-import-not-at-top

    runtime_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports only

    config = measured_config(FLAGS.model, FLAGS.batch, FLAGS.precision)
    keras.mixed_precision.set_global_policy(FLAGS.precision)
    batch, size = FLAGS.batch, config.data.image_size
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, [batch, size, size, config.data.num_channels]).astype(np.float32)
    result = {
        "what": what,
        "model": FLAGS.model,
        "threads": FLAGS.threads,
        "inter_op_threads": FLAGS.inter_op_threads,
        "precision": FLAGS.precision,
        "tf_version": tf.__version__,
    }
    times = []
    if what == "samplers":
        model = inference.InferenceModel(factory.create_model_from_config(config), config)
        result.update(nfe=FLAGS.sampler_nfe, batch=batch, samplers=_time_samplers(model, batch))
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("BENCH_JSON " + json.dumps(result))
        return
    if what in ("train", "profile"):
        trainer = train_lib.Trainer(config, tf.distribute.get_strategy())
        iterator = iter(tf.data.Dataset.from_tensors({"image": images}).repeat())
    if what == "profile":
        for _ in range(1 + FLAGS.warmup):
            trainer.train_steps(iterator, 4)
        steps = 4  # one compiled 4-step call, as the train measurement times it
        profile = _profile(lambda: trainer.train_steps(iterator, steps), 1)
        result["step_ms"] = profile["step_ms"] / steps
        for key in ("categories_ms", "phases_ms"):
            result[key] = {name: ms / steps for name, ms in profile[key].items()}
        # One inference forward of the batch: a sampling or bits/dim step's network call.
        forward = tf.function(inference.model_function(trainer.net))
        timesteps = tf.cast(tf.range(batch) * 61 % 1000, tf.float32)
        for _ in range(1 + FLAGS.warmup):
            forward(images, timesteps).numpy()
        forward_profile = _profile(lambda: forward(images, timesteps).numpy(), 4)
        result["inference_forward"] = {
            "forward_ms": forward_profile["step_ms"],
            "categories_ms": forward_profile["categories_ms"],
        }
        print("BENCH_JSON " + json.dumps(result))
        return
    if what == "train":
        steps = 4
        trainer.train_steps(iterator, steps)  # trace
        for _ in range(FLAGS.warmup):
            trainer.train_steps(iterator, steps)
        for _ in range(FLAGS.iters):
            start = time.perf_counter()
            trainer.train_steps(iterator, steps)
            times.append((time.perf_counter() - start) / steps)
        net = trainer.net
    else:
        model = inference.InferenceModel(factory.create_model_from_config(config), config)
        net = model.net
        if what == "sample":
            sampler = model.sampler(samplers.SamplerSpec(kind="ancestral", steps="50"))

            def run(i):
                return sampler(np.arange(batch) + i * batch).numpy()  # the whole chain, one call
        else:
            diffusion = factory.create_diffusion_from_config(config, timestep_respacing="100")
            nll = tf.function(
                lambda x, seeds: chains.calc_bpd_loop(diffusion, model.model_fn, x, seeds=seeds)[
                    "total_bpd"
                ]
            )

            def run(i):
                return nll(images, tf.range(batch, dtype=tf.int64) + i * batch).numpy()

        for i in range(FLAGS.warmup):
            run(i)
        for i in range(FLAGS.iters):
            start = time.perf_counter()
            run(i)
            times.append(time.perf_counter() - start)
    result["seconds_per_batch"] = times
    result["img_per_s"] = batch / statistics.median(times)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["runtime_rss_mb"] = runtime_rss_mb
    result["gflop_per_forward"] = _forward_gflop(net, size, config.data.num_channels)
    print("BENCH_JSON " + json.dumps(result))


def _sampler_specs(nfe: int):
    """{kind: the SamplerSpec of every sampler kind at ``nfe`` network calls per image}."""
    from tf_iddpm import samplers  # pylint: disable=g-import-not-at-top

    return {
        kind: samplers.SamplerSpec(kind=kind, steps=str(nfe)) for kind in samplers.SAMPLER_KINDS
    }


def _time_samplers(model, batch):
    """{kind: {"num_steps", "seconds_per_batch", "img_per_s", "ms_per_call_per_image",
    "overhead_vs_ancestral"}}: each kind's whole chain, one call per timing (seeds differ per
    call), after max(1, --warmup) warm-up calls of every kind (the first traces the chain).

    The kinds take turns, one call each per round, so that a machine whose speed drifts (other
    load, clocks) slows every kind alike and the overheads compare like with like.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top

    by_kind = {
        kind: model.sampler(spec) for kind, spec in _sampler_specs(FLAGS.sampler_nfe).items()
    }
    seeds = lambda i: np.arange(batch) + i * batch  # noqa: E731
    for i in range(max(1, FLAGS.warmup)):
        for sampler in by_kind.values():
            sampler(seeds(i)).numpy()
    times = {kind: [] for kind in by_kind}
    for i in range(FLAGS.iters):
        for kind, sampler in by_kind.items():
            start = time.perf_counter()
            sampler(seeds(i)).numpy()
            times[kind].append(time.perf_counter() - start)
    timings = {}
    for kind, sampler in by_kind.items():
        median = statistics.median(times[kind])
        timings[kind] = {
            "num_steps": sampler.num_steps,
            "seconds_per_batch": times[kind],
            "img_per_s": batch / median,
            "ms_per_call_per_image": 1e3 * median / (sampler.num_steps * batch),
        }
    base = timings["ancestral"]["ms_per_call_per_image"]
    for timing in timings.values():
        timing["overhead_vs_ancestral"] = timing["ms_per_call_per_image"] / base - 1.0
    return timings


def _print_samplers(result):
    """Prints the --what=samplers table and its JSON line."""
    print(
        f"\nsamplers at {result['nfe']} network calls per image (NFE), {FLAGS.model} config, batch "
        f"{result['batch']}, {result['threads']} intra-op threads, {result['precision']}"
    )
    header = f"{'sampler':<16}{'NFE':>5}{'images/s':>11}{'ms/call/image':>15}{'overhead':>10}"
    print(header + "\n" + "-" * len(header))
    for kind, timing in result["samplers"].items():
        print(
            f"{kind:<16}{timing['num_steps']:>5d}{timing['img_per_s']:>11.3f}"
            f"{timing['ms_per_call_per_image']:>15.2f}"
            f"{100 * timing['overhead_vs_ancestral']:>+9.1f}%"
        )
    print("overhead: ms per network call per image over ancestral's, at equal NFE")
    line = json.dumps(result)
    print(line)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            f.write(line + "\n")


def _run_json(command):
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=pythonpath)
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    if proc.returncode == 0:  # the reference script writes plain JSON on its last line
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    raise RuntimeError(
        f"benchmark child failed ({' '.join(command)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def _ours(what, batch=None):
    return _run_json(
        [
            sys.executable,
            "-m",
            "tools.benchmark",
            f"--child={what}",
            f"--batch={batch or FLAGS.batch}",
            f"--threads={FLAGS.threads}",
            f"--inter_op_threads={FLAGS.inter_op_threads}",
            f"--warmup={FLAGS.warmup}",
            f"--iters={FLAGS.iters}",
            f"--precision={FLAGS.precision}",
            f"--sampler_nfe={FLAGS.sampler_nfe}",
            f"--model={FLAGS.model}",
            f"--bpd_check_workdir={FLAGS.bpd_check_workdir}",
            f"--bpd_check_images={FLAGS.bpd_check_images}",
        ]
    )


# The PyTorch-side benchmark, next to this file, run by path under --reference_python.
REFERENCE_SCRIPT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "benchmark_reference.py"
)


def _reference(what, json_path):
    script = REFERENCE_SCRIPT
    if not os.path.isfile(script):
        raise FileNotFoundError(f"{script} not found: --reference runs it, from this checkout")
    command = [
        FLAGS.reference_python,
        script,
        "--reference",
        FLAGS.reference,
        "--threads",
        str(FLAGS.threads),
        "--batch",
        str(FLAGS.batch),
        "--what",
        what,
        "--json-out",
        json_path,
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"reference benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    with open(json_path) as f:
        return json.load(f)


def _print_profile(result):
    """Prints a training-step profile (categories and phases) and its JSON line."""
    total = sum(result["categories_ms"].values())
    print(
        f"\ntraining step profile, {FLAGS.model} config, batch {FLAGS.batch}, "
        f"{FLAGS.threads} intra-op threads, {FLAGS.precision}: {result['step_ms']:.0f} ms per "
        f"step under the profiler, {total:.0f} ms in kernels"
    )
    inference = result["inference_forward"]["categories_ms"]
    inference_total = sum(inference.values())
    tables = (
        ("category", result["categories_ms"], total, "ms/step"),
        ("phase", result["phases_ms"], total, "ms/step"),
        (
            f"inference forward, {result['inference_forward']['forward_ms']:.0f} ms per call",
            inference,
            inference_total,
            "ms/call",
        ),
    )
    for title, table, table_total, unit in tables:
        print(f"\n{title:<58}{unit:>9}{'share':>8}\n" + "-" * 75)
        for name, ms in sorted(table.items(), key=lambda item: -item[1]):
            print(f"{name:<58}{ms:>9.1f}{100 * ms / table_total:>7.1f}%")
    print(json.dumps(result))


def main(argv):
    del argv
    if FLAGS.child:
        _child(FLAGS.child)
        return
    if FLAGS.reference and FLAGS.model != "bench":
        raise app.UsageError("--reference measures the bench config; drop --model")
    if FLAGS.reference and not FLAGS.reference_python:
        raise app.UsageError("--reference needs --reference_python (a Python with torch installed)")
    if FLAGS.what == "profile":
        _print_profile(_ours("profile"))
        return
    if FLAGS.what == "samplers":
        if FLAGS.reference:
            raise app.UsageError("--what=samplers has no reference counterpart; drop --reference")
        problems = [
            problem
            for spec in _sampler_specs(FLAGS.sampler_nfe).values()
            for problem in spec.errors(
                measured_config(FLAGS.model, FLAGS.batch).diffusion.steps, prefix=""
            )
        ]
        if problems:
            raise app.UsageError(
                f"--sampler_nfe={FLAGS.sampler_nfe} is not a point of every sampler kind: "
                + "; ".join(problems)
            )
        _print_samplers(_ours("samplers"))
        return
    whats = list(MEASUREMENTS) if FLAGS.what == "all" else [FLAGS.what]
    summary, reference = {}, {}
    rss, ref_rss, runtime, ref_runtime = [], [], [], []
    for what in whats:  # alternate ours / reference per measurement
        ours = _ours(what)
        summary[MEASUREMENTS[what]] = ours["img_per_s"]
        summary["gflop_per_forward"] = ours["gflop_per_forward"]
        rss.append(ours["peak_rss_mb"])
        runtime.append(ours["runtime_rss_mb"])
        if FLAGS.reference:
            ref = _reference(what, f"/tmp/tf_iddpm_bench_ref_{os.getpid()}_{what}.json")
            reference["ref_" + MEASUREMENTS[what]] = ref[MEASUREMENTS[what]]
            reference["ref_gflop_per_forward"] = ref.get("gflop_per_forward")
            ref_rss.append(ref["peak_rss_mb"])
            ref_runtime.append(ref.get("runtime_rss_mb") or float("nan"))
    if FLAGS.activation_memory and "train" in whats:
        # What each image adds to the training process's peak: the activations kept for the
        # backward pass (and their gradients), the batch-independent state cancelling out.
        half = _ours("train", batch=FLAGS.batch // 2)
        full_rss = rss[whats.index("train")]
        summary["activation_mb_per_image"] = (full_rss - half["peak_rss_mb"]) / (
            FLAGS.batch - FLAGS.batch // 2
        )
        summary["peak_rss_mb_half_batch"] = half["peak_rss_mb"]
    summary["peak_rss_mb"] = max(rss)
    # What the measurement itself added on top of the imported framework (TF ~560 MB, torch ~220).
    summary["rss_above_runtime_mb"] = max(r - base for r, base in zip(rss, runtime))
    summary.update(_ours("matmul_peak"))
    summary.pop("what")
    if FLAGS.bpd_check_workdir:
        check = _ours("bpd_check")
        check.pop("what")
        summary.update(check)
    summary.update(
        threads=FLAGS.threads,
        inter_op_threads=FLAGS.inter_op_threads,
        batch=FLAGS.batch,
        precision=FLAGS.precision,
        model=FLAGS.model,
    )
    if FLAGS.reference:
        reference["ref_peak_rss_mb"] = max(ref_rss)
        reference["ref_rss_above_runtime_mb"] = max(
            r - base for r, base in zip(ref_rss, ref_runtime)
        )
        summary.update(reference)
    # Achieved GFLOP/s: forwards per second x GFLOP per forward (a training step = 3 forwards).
    for what in whats:
        key = MEASUREMENTS[what]
        for prefix in ("", "ref_") if FLAGS.reference else ("",):
            if summary.get(prefix + key):
                summary[prefix + key.replace("img_per_s", "gflop_per_s")] = (
                    summary[prefix + key] * FORWARDS_PER_IMAGE[what] * summary["gflop_per_forward"]
                )

    print(
        f"\n{FLAGS.model} config, batch {FLAGS.batch}, {FLAGS.threads} intra-op threads, "
        f"{FLAGS.precision}"
    )
    header = f"{'measurement':<24}{'tf_iddpm':>12}" + (
        f"{'reference':>12}{'ratio':>9}" if FLAGS.reference else ""
    )
    print(header + "\n" + "-" * len(header))
    keys = [MEASUREMENTS[w] for w in whats] + [
        MEASUREMENTS[w].replace("img_per_s", "gflop_per_s") for w in whats
    ]
    extra = ["activation_mb_per_image"] if "activation_mb_per_image" in summary else []
    for key in keys + ["peak_rss_mb", "rss_above_runtime_mb", "gflop_per_forward"] + extra:
        line = f"{key:<24}{summary[key]:>12.2f}"
        if FLAGS.reference and ("ref_" + key) in summary and summary["ref_" + key]:
            line += f"{summary['ref_' + key]:>12.2f}{summary[key] / summary['ref_' + key]:>8.2f}x"
        print(line)
    peak = summary["fp32_matmul_gflop_per_s"]
    print(
        f"\nfloat32 matmul peak on these threads: {peak:.1f} GFLOP/s"
        + (
            f"; bfloat16: {summary['bf16_matmul_gflop_per_s']:.1f}"
            if "bf16_matmul_gflop_per_s" in summary
            else ""
        )
    )
    for what in whats:
        ceiling = peak / (FORWARDS_PER_IMAGE[what] * summary["gflop_per_forward"])
        line = f"  {MEASUREMENTS[what]:<22} float32 ceiling at that peak {ceiling:8.2f} img/s"
        if FLAGS.reference and summary.get("ref_" + MEASUREMENTS[what]):
            line += f" = {ceiling / summary['ref_' + MEASUREMENTS[what]]:.2f}x the reference"
        print(line)
    if FLAGS.bpd_check_workdir:
        print(
            f"\nbpd of {FLAGS.bpd_check_workdir} over {summary['images']} test images: float32 "
            f"{summary['fp32_bpd']:.4f}, mixed_bfloat16 {summary['bf16_bpd']:.4f} (difference "
            f"{summary['bf16_bpd_delta']:+.4f}, max per image {summary['bf16_bpd_delta_max_abs']:.4f})"
        )
    line = json.dumps(summary)
    print(line)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    app.run(main)
