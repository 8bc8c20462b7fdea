"""Benchmarks the PyTorch reference, openai/improved-diffusion, on CPU.

This is the reference half of the tf_iddpm benchmark (tools/benchmark.py,
`python -m tools.benchmark --reference=...`, which runs it by path). It runs
under a *different* interpreter from the rest of the project: a Python that has
torch (for example a virtualenv made with `pip install torch==2.13.0 numpy`).
It therefore imports only the standard library, numpy, torch and the reference
package, and never tensorflow or tf_iddpm. It lives in the checkout's tools/,
outside the installed package; run it by file path:

    /path/to/torchvenv/bin/python tools/benchmark_reference.py \\
        --reference /path/to/improved-diffusion --threads 2 --what all \\
        --json-out /tmp/reference.json

The model and diffusion are built with the reference's own factory
(`script_util.create_model_and_diffusion`) on the bench config: 32x32x3 images,
64 channels, 2 residual blocks per level, 4 heads, attention at 16x16 and 8x8,
dropout 0.1, learned sigma, cosine schedule, T=1000, hybrid loss
(rescaled MSE + VB term), uniform timestep sampler, AdamW(lr=1e-4,
weight_decay=0), fp32 and NCHW, as the reference ships.

Measurements, each after its own warm-up (for sample and nll a warm-up
iteration runs the same loop on a 5-step chain: same kernels and shapes):
  train:   a full training step as `train_util.TrainLoop` does it (sample t,
           `training_losses`, weighted mean, backward, AdamW step, EMA update
           with rate 0.9999) on random images in [-1, 1]; no data loading and
           no logging.
  sample:  `p_sample_loop` over a 50-step respaced chain, one batch per
           iteration.
  nll:     `calc_bpd_loop` over a 100-step respaced chain, one batch per
           iteration.
  profile: where a training step and a sampling forward spend their time
           (phases, op categories from `torch.profiler`, module types).
Peak RSS is per process; run one process per measurement to attribute it.
GFLOP per forward comes from `torch.utils.flop_counter.FlopCounterMode` on one
forward pass at batch 1 (FLOP = 2 x MAC; it counts convolutions and matrix
products only, not GroupNorm, SiLU or softmax).
"""

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import time

# Files whose presence marks a checkout of openai/improved-diffusion.
_REFERENCE_FILES = (
    "improved_diffusion/__init__.py",
    "improved_diffusion/script_util.py",
    "improved_diffusion/gaussian_diffusion.py",
    "improved_diffusion/respace.py",
    "improved_diffusion/resample.py",
    "improved_diffusion/unet.py",
    "improved_diffusion/nn.py",
    "improved_diffusion/fp16_util.py",
)

# The bench config, in the reference's `model_and_diffusion_defaults` names.
BENCH_CONFIG = {
    "image_size": 32,
    "num_channels": 64,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.1,
    "learn_sigma": True,
    "sigma_small": False,
    "class_cond": False,
    "diffusion_steps": 1000,
    "noise_schedule": "cosine",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
}
IMAGE_CHANNELS = 3
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.0
EMA_RATE = 0.9999
SAMPLE_STEPS = 50
NLL_STEPS = 100
# Length of the respaced chain that warm-up iterations of sample/nll run.
WARMUP_CHAIN_STEPS = 5
# Approximate cost of a training step in forward passes: the backward pass of
# convolutions and matmuls costs about twice the forward.
TRAIN_FORWARD_EQUIVALENTS = 3

# Below this fraction of `threads` cores (process CPU time / wall time) the
# table warns that other load distorted the measurement.
CONTENTION_WARNING_FRACTION = 0.8

MEASUREMENTS = ("train", "sample", "nll")
WHAT_CHOICES = MEASUREMENTS + ("all", "profile")
# Per-measurement defaults that take roughly 20-60 s each on 2 cores of the
# development machine (AMD EPYC, AVX512) at batch 16.
DEFAULT_WARMUP = {"train": 3, "sample": 2, "nll": 2, "profile": 2}
DEFAULT_ITERS = {"train": 20, "sample": 2, "nll": 1, "profile": 5}
_PREFIXES = {"train": "train", "sample": "sample50", "nll": "nll100"}
_RESULT_KEYS = {
    "train": "train_img_per_s",
    "sample": "sample50_img_per_s",
    "nll": "nll100_img_per_s",
}
# Model forward passes per image and iteration, for the achieved GFLOP/s.
_FORWARDS_PER_IMAGE = {
    "train": TRAIN_FORWARD_EQUIVALENTS,
    "sample": SAMPLE_STEPS,
    "nll": NLL_STEPS,
}


def _int_at_least(minimum):
    """An argparse type: an integer >= minimum, naming the bad value."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def build_parser():
    """Returns the command-line parser (no torch needed)."""
    parser = argparse.ArgumentParser(
        prog="benchmark_reference.py",
        description=(
            "Benchmarks openai/improved-diffusion (PyTorch, CPU) on "
            "the tf_iddpm bench config. Run it with a Python that "
            "has torch."
        ),
    )
    parser.add_argument(
        "--reference",
        required=True,
        help="path to a checkout of openai/improved-diffusion (the directory "
        "that contains improved_diffusion/)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=2, help="torch intra-op threads (inter-op is 1)"
    )
    parser.add_argument("--batch", type=_positive_int, default=16, help="images per batch")
    parser.add_argument(
        "--what",
        choices=WHAT_CHOICES,
        default="all",
        help="which measurement to run; 'all' runs train, sample and nll in one process",
    )
    parser.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=None,
        help="untimed iterations before each measurement; for sample and "
        f"nll each runs a {WARMUP_CHAIN_STEPS}-step chain (default per "
        f"measurement: {DEFAULT_WARMUP})",
    )
    parser.add_argument(
        "--iters",
        type=_positive_int,
        default=None,
        help=f"timed iterations per measurement (default per measurement: {DEFAULT_ITERS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for torch and numpy")
    parser.add_argument("--json-out", default=None, help="file to write the JSON result object to")
    return parser


def parse_args(argv=None):
    """Parses and validates arguments before anything heavy is imported.

    Args:
      argv: argument strings without the program name; None for sys.argv.

    Returns:
      The argparse namespace, with `reference` made absolute.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    reference = os.path.abspath(os.path.expanduser(args.reference))
    if not os.path.isdir(reference):
        parser.error(
            f"--reference {args.reference!r} is not a directory; expected a "
            "checkout of openai/improved-diffusion (the directory that "
            "contains improved_diffusion/)"
        )
    missing = [
        name for name in _REFERENCE_FILES if not os.path.isfile(os.path.join(reference, name))
    ]
    if missing:
        parser.error(
            f"--reference {args.reference!r} is not a checkout of "
            "openai/improved-diffusion: missing " + ", ".join(missing)
        )
    args.reference = reference
    if args.json_out is not None:
        out_dir = os.path.dirname(os.path.abspath(args.json_out))
        if not os.path.isdir(out_dir):
            parser.error(f"--json-out {args.json_out!r}: directory {out_dir!r} does not exist")
    return args


def _import_torch(threads):
    """Imports torch with pinned thread counts, or exits with advice.

    Args:
      threads: intra-op thread count.

    Returns:
      The torch module.
    """
    # OpenMP and MKL read these when torch loads; set_num_threads below is
    # what torch itself uses, the variables keep the libraries consistent.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        sys.exit(
            f"benchmark_reference.py: error: cannot import torch with "
            f"{sys.executable} ({error}). Run this script with the python of "
            "a virtualenv that has torch installed (for example one made "
            "with `pip install torch==2.13.0 numpy`), not the TensorFlow "
            "venv."
        )
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    return torch


def _import_reference(reference):
    """Imports the reference modules from the checkout at `reference`.

    Args:
      reference: absolute path of the improved-diffusion checkout.

    Returns:
      A dict of module name -> module for script_util, resample, nn,
      fp16_util and unet.
    """
    sys.path.insert(0, reference)
    modules = {}
    for name in ("script_util", "resample", "nn", "fp16_util", "unet"):
        modules[name] = importlib.import_module(f"improved_diffusion.{name}")
    package_file = os.path.abspath(sys.modules["improved_diffusion"].__file__)
    if not package_file.startswith(reference + os.sep):
        sys.exit(
            f"benchmark_reference.py: error: imported improved_diffusion "
            f"from {package_file}, not from --reference {reference}; "
            "uninstall the other copy"
        )
    return modules


def _build(ref):
    """Builds the bench model and its 1000-step diffusion.

    Args:
      ref: modules from `_import_reference`.

    Returns:
      (model, diffusion), both from `script_util.create_model_and_diffusion`.
    """
    return ref["script_util"].create_model_and_diffusion(**BENCH_CONFIG)


def _respaced_diffusion(ref, respacing):
    """Returns the bench diffusion respaced to `respacing` steps."""
    return ref["script_util"].create_gaussian_diffusion(
        steps=BENCH_CONFIG["diffusion_steps"],
        learn_sigma=BENCH_CONFIG["learn_sigma"],
        sigma_small=BENCH_CONFIG["sigma_small"],
        noise_schedule=BENCH_CONFIG["noise_schedule"],
        use_kl=BENCH_CONFIG["use_kl"],
        predict_xstart=BENCH_CONFIG["predict_xstart"],
        rescale_timesteps=BENCH_CONFIG["rescale_timesteps"],
        rescale_learned_sigmas=BENCH_CONFIG["rescale_learned_sigmas"],
        timestep_respacing=respacing,
    )


def _image_shape(batch):
    size = BENCH_CONFIG["image_size"]
    return (batch, IMAGE_CHANNELS, size, size)


class _ModelCallTimer:
    """Counts and times calls of a module through forward hooks.

    Used on the sampling and NLL loops to split the loop time into the
    network and everything else (the reference's Python diffusion math).
    """

    def __init__(self, model):
        self.seconds = []
        self._start = None
        self._handles = [
            model.register_forward_pre_hook(self._pre_hook),
            model.register_forward_hook(self._post_hook),
        ]

    def _pre_hook(self, module, inputs):
        del module, inputs
        self._start = time.perf_counter()

    def _post_hook(self, module, inputs, output):
        del module, inputs, output
        self.seconds.append(time.perf_counter() - self._start)

    def reset(self):
        self.seconds = []

    def remove(self):
        for handle in self._handles:
            handle.remove()


class _TrainStep:
    """One reference training step: losses, backward, AdamW, EMA.

    Mirrors `train_util.TrainLoop.run_step` for fp32 without microbatching,
    distributed sync or logging.
    """

    def __init__(self, torch, ref, model, diffusion, batch):
        self._torch = torch
        self._ref = ref
        self._model = model
        self._diffusion = diffusion
        self._batch = batch
        self._params = list(model.parameters())
        self._optimizer = torch.optim.AdamW(
            self._params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
        )
        self._ema_params = [p.detach().clone() for p in self._params]
        self._sampler = ref["resample"].UniformSampler(diffusion)
        self.phase_seconds = {"forward_loss": [], "backward": [], "optimizer": [], "ema": []}

    def __call__(self, record_phases=False):
        torch = self._torch
        start = time.perf_counter()
        images = torch.rand(_image_shape(self._batch)) * 2.0 - 1.0
        self._ref["fp16_util"].zero_grad(self._params)
        t, weights = self._sampler.sample(self._batch, torch.device("cpu"))
        losses = self._diffusion.training_losses(self._model, images, t)
        loss = (losses["loss"] * weights).mean()
        after_forward = time.perf_counter()
        loss.backward()
        after_backward = time.perf_counter()
        self._optimizer.step()
        after_optimizer = time.perf_counter()
        self._ref["nn"].update_ema(self._ema_params, self._params, rate=EMA_RATE)
        end = time.perf_counter()
        if record_phases:
            self.phase_seconds["forward_loss"].append(after_forward - start)
            self.phase_seconds["backward"].append(after_backward - after_forward)
            self.phase_seconds["optimizer"].append(after_optimizer - after_backward)
            self.phase_seconds["ema"].append(end - after_optimizer)
        return float(loss.detach())


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(function, warmup, iters, warmup_function=None):
    """Runs warm-up then timed iterations of `function`.

    Args:
      function: the callable to time; called with no arguments.
      warmup: number of untimed calls before timing.
      iters: number of timed calls.
      warmup_function: what a warm-up call runs; defaults to `function`.

    Returns:
      (list of seconds per timed call, result of the last call, CPU
      utilisation over the timed calls as process CPU seconds / wall seconds).
    """
    warmup_function = warmup_function or function
    for _ in range(warmup):
        warmup_function()
    seconds = []
    result = None
    cpu_start = _cpu_seconds()
    for _ in range(iters):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    cpu_per_wall = (_cpu_seconds() - cpu_start) / sum(seconds)
    return seconds, result, cpu_per_wall


def measure_train(torch, ref, batch, warmup, iters):
    """Times full training steps; returns a dict of results."""
    model, diffusion = _build(ref)
    model.train()
    step = _TrainStep(torch, ref, model, diffusion, batch)
    seconds, last_loss, cpu_per_wall = _timed(step, warmup, iters)
    if last_loss != last_loss:  # NaN check without numpy.
        raise RuntimeError("training loss became NaN")
    return {
        "train_iter_s": seconds,
        "train_last_loss": last_loss,
        "train_cpu_per_wall": cpu_per_wall,
    }


def _measure_chain(torch, ref, prefix, respacing, batch, warmup, iters, run_chain):
    """Times `run_chain(model, diffusion)` on a respaced chain.

    Warm-up calls run the same chain respaced to WARMUP_CHAIN_STEPS steps:
    the same kernels on the same shapes at a tenth of the cost.

    Args:
      torch: the torch module.
      ref: modules from `_import_reference`.
      prefix: key prefix of the results, e.g. "sample50".
      respacing: number of steps of the timed chain.
      batch: images per batch.
      warmup: untimed short-chain calls.
      iters: timed calls.
      run_chain: callable(model, diffusion) -> result of one batch.

    Returns:
      (dict of results, result of the last timed call).
    """
    model, _ = _build(ref)
    model.eval()
    diffusion = _respaced_diffusion(ref, str(respacing))
    warmup_diffusion = _respaced_diffusion(ref, str(WARMUP_CHAIN_STEPS))
    timer = _ModelCallTimer(model)

    def timed_call():
        with torch.no_grad():
            return run_chain(model, diffusion)

    def warmup_call():
        with torch.no_grad():
            run_chain(model, warmup_diffusion)
        timer.reset()

    seconds, result, cpu_per_wall = _timed(timed_call, warmup, iters, warmup_call)
    timer.remove()
    return {
        f"{prefix}_iter_s": seconds,
        f"{prefix}_cpu_per_wall": cpu_per_wall,
        f"{prefix}_model_calls_per_batch": len(timer.seconds) // iters,
        f"{prefix}_model_call_s_median": statistics.median(timer.seconds),
        f"{prefix}_model_time_fraction": sum(timer.seconds) / sum(seconds),
    }, result


def measure_sample(torch, ref, batch, warmup, iters):
    """Times 50-step strided ancestral sampling; returns a dict of results."""

    def run_chain(model, diffusion):
        return diffusion.p_sample_loop(model, _image_shape(batch), clip_denoised=True)

    results, samples = _measure_chain(
        torch, ref, "sample50", SAMPLE_STEPS, batch, warmup, iters, run_chain
    )
    if not bool(torch.isfinite(samples).all()):
        raise RuntimeError("sampling produced non-finite values")
    return results


def measure_nll(torch, ref, batch, warmup, iters):
    """Times `calc_bpd_loop` over a 100-step chain; returns a dict."""
    # Pixel values on the 8-bit grid, as the reference's data loader gives.
    pixels = torch.randint(0, 256, _image_shape(batch)).float()
    images = pixels / 127.5 - 1.0

    def run_chain(model, diffusion):
        return diffusion.calc_bpd_loop(model, images, clip_denoised=True)

    results, terms = _measure_chain(
        torch, ref, "nll100", NLL_STEPS, batch, warmup, iters, run_chain
    )
    results["nll100_mean_bpd"] = float(terms["total_bpd"].mean())
    return results


def count_gflop_per_forward(torch, ref):
    """Counts GFLOP of one batch-1 forward pass with FlopCounterMode.

    Returns:
      (total GFLOP, dict of op name -> GFLOP, number of model parameters).
    """
    flop_counter = importlib.import_module("torch.utils.flop_counter")
    model, _ = _build(ref)
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    images = torch.randn(_image_shape(1))
    timesteps = torch.tensor([500.0])
    counter = flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images, timesteps)
    by_op = {str(op): flops / 1e9 for op, flops in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / 1e9, by_op, num_params


def _op_category(name):
    """Maps a profiler op name to a coarse category."""
    if "conv" in name:
        return "convolution"
    if "group_norm" in name:
        return "group_norm"
    if any(key in name for key in ("bmm", "einsum", "softmax")):
        return "attention (einsum/bmm/softmax)"
    if name in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul"):
        return "linear (time embedding)"
    if "sigmoid" in name or "silu" in name:
        return "silu (x*sigmoid(x))"
    if "dropout" in name or "bernoulli" in name:
        return "dropout"
    if "upsample" in name:
        return "upsample (nearest)"
    if name in (
        "aten::cat",
        "aten::copy_",
        "aten::clone",
        "aten::contiguous",
        "aten::_to_copy",
        "aten::empty",
        "aten::empty_like",
        "aten::zero_",
        "aten::fill_",
    ):
        return "cat/copy/alloc"
    return "other elementwise (add, mul, loss math, ...)"


def _profile_categories(function):
    """Runs `function` under torch.profiler; returns ms by op category."""
    profiler = importlib.import_module("torch.profiler")
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
        function()
    categories = {}
    top_ops = []
    for event in prof.key_averages():
        self_ms = event.self_cpu_time_total / 1e3
        category = _op_category(event.key)
        categories[category] = categories.get(category, 0.0) + self_ms
        top_ops.append((self_ms, event.key))
    top_ops.sort(reverse=True)
    return categories, [(key, ms) for ms, key in top_ops[:12]]


def _module_exclusive_ms(model, function):
    """Times `function` with per-module hooks; returns exclusive ms by type.

    Each module's exclusive time is its own time minus its children's, so
    the sums add up to the whole forward pass (plus hook overhead).
    """
    stack = []
    exclusive = {}

    def pre_hook(module, inputs):
        del module, inputs
        stack.append([time.perf_counter(), 0.0])

    def post_hook(module, inputs, output):
        del inputs, output
        start, children = stack.pop()
        elapsed = time.perf_counter() - start
        name = type(module).__name__
        exclusive[name] = exclusive.get(name, 0.0) + (elapsed - children) * 1e3
        if stack:
            stack[-1][1] += elapsed

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    function()
    for handle in handles:
        handle.remove()
    return exclusive


def measure_profile(torch, ref, batch, warmup, iters):
    """Finds where the reference spends time; returns a dict of breakdowns."""
    model, diffusion = _build(ref)
    model.train()
    step = _TrainStep(torch, ref, model, diffusion, batch)
    for _ in range(warmup):
        step()
    cpu_start, wall_start = _cpu_seconds(), time.perf_counter()
    for _ in range(iters):
        step(record_phases=True)
    cpu_per_wall = (_cpu_seconds() - cpu_start) / (time.perf_counter() - wall_start)
    phase_ms = {
        name: statistics.median(values) * 1e3 for name, values in step.phase_seconds.items()
    }
    sampler = ref["resample"].UniformSampler(diffusion)

    def forward_backward():
        images = torch.rand(_image_shape(batch)) * 2.0 - 1.0
        t, weights = sampler.sample(batch, torch.device("cpu"))
        losses = diffusion.training_losses(model, images, t)
        (losses["loss"] * weights).mean().backward()

    train_categories, train_top = _profile_categories(forward_backward)

    model.eval()
    images = torch.rand(_image_shape(batch)) * 2.0 - 1.0
    timesteps = torch.full((batch,), 500.0)

    def forward():
        with torch.no_grad():
            model(images, timesteps)

    forward_seconds, _, _ = _timed(forward, warmup, iters)
    forward_categories, forward_top = _profile_categories(forward)
    module_ms = _module_exclusive_ms(model, forward)
    return {
        "profile": {
            "train_phase_ms_median": phase_ms,
            "train_cpu_per_wall": cpu_per_wall,
            "train_fwd_bwd_op_category_ms": train_categories,
            "train_fwd_bwd_top_ops_ms": train_top,
            "eval_forward_ms_median": statistics.median(forward_seconds) * 1e3,
            "eval_forward_op_category_ms": forward_categories,
            "eval_forward_top_ops_ms": forward_top,
            "eval_forward_module_exclusive_ms": module_ms,
        }
    }


def peak_rss_mb():
    """Peak resident set size of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    if sys.platform == "darwin":
        return peak / (1024.0 * 1024.0)
    return peak / 1024.0


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args):
    """Runs the requested measurements; returns the JSON result dict."""
    torch = _import_torch(args.threads)
    import numpy as np  # pylint: disable=import-outside-toplevel

    ref = _import_reference(args.reference)
    runtime_rss_mb = peak_rss_mb()  # torch + the reference imported, nothing built yet
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # UniformSampler draws t with numpy.

    result = {
        "train_img_per_s": None,
        "sample50_img_per_s": None,
        "nll100_img_per_s": None,
        "peak_rss_mb": None,
        "runtime_rss_mb": runtime_rss_mb,
        "gflop_per_forward": None,
        "gflop_method": (
            "torch.utils.flop_counter.FlopCounterMode, one "
            "forward at batch 1; FLOP = 2 x MAC; convolutions "
            "and matmuls only"
        ),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "batch": args.batch,
        "what": args.what,
        "cpu": _cpu_name(),
        "loadavg_start": list(os.getloadavg()),
        "config": dict(
            BENCH_CONFIG,
            lr=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            ema_rate=EMA_RATE,
            schedule_sampler="uniform",
            dtype="float32",
        ),
    }
    measure = {"train": measure_train, "sample": measure_sample, "nll": measure_nll}
    if args.what == "profile":
        todo = ["profile"]
        measure["profile"] = measure_profile
    elif args.what == "all":
        todo = list(MEASUREMENTS)
    else:
        todo = [args.what]
    for name in todo:
        warmup = DEFAULT_WARMUP[name] if args.warmup is None else args.warmup
        iters = DEFAULT_ITERS[name] if args.iters is None else args.iters
        result[f"{name}_warmup"] = warmup
        result[f"{name}_iters"] = iters
        result.update(measure[name](torch, ref, args.batch, warmup, iters))
    # Peak RSS before the FLOP count, so it reflects the measurements only.
    result["peak_rss_mb"] = peak_rss_mb()
    result["loadavg_end"] = list(os.getloadavg())
    gflop, gflop_by_op, num_params = count_gflop_per_forward(torch, ref)
    result["num_params"] = num_params
    result["gflop_per_forward"] = gflop
    result["gflop_per_forward_by_op"] = gflop_by_op
    for name in MEASUREMENTS:
        seconds = result.get(f"{_PREFIXES[name]}_iter_s")
        if not seconds:
            continue
        img_per_s = args.batch * len(seconds) / sum(seconds)
        result[_RESULT_KEYS[name]] = img_per_s
        result[f"{_RESULT_KEYS[name]}_median"] = args.batch / statistics.median(seconds)
        # The fastest iteration is the least disturbed by other load.
        result[f"{_RESULT_KEYS[name]}_best"] = args.batch / min(seconds)
        result[f"{_PREFIXES[name]}_achieved_gflop_per_s"] = (
            img_per_s * _FORWARDS_PER_IMAGE[name] * gflop
        )
    return result


def format_table(result):
    """Returns the human-readable summary of `result` as a string."""
    lines = [
        f"PyTorch reference (improved-diffusion), torch "
        f"{result['torch_version']}, {result['threads']} intra-op / "
        f"{result['interop_threads']} inter-op threads, batch "
        f"{result['batch']}, fp32, CPU: {result['cpu']}",
        f"{'measurement':<22}{'img/s':>9}{'median':>9}{'best':>9}"
        f"{'s/batch':>10}{'GFLOP/s':>10}{'cpu/wall':>10}",
    ]
    for name in MEASUREMENTS:
        key = _RESULT_KEYS[name]
        if result.get(key) is None:
            continue
        prefix = _PREFIXES[name]
        seconds = result[f"{prefix}_iter_s"]
        lines.append(
            f"{key:<22}{result[key]:>9.3f}{result[key + '_median']:>9.3f}"
            f"{result[key + '_best']:>9.3f}"
            f"{sum(seconds) / len(seconds):>10.3f}"
            f"{result[prefix + '_achieved_gflop_per_s']:>10.1f}"
            f"{result[prefix + '_cpu_per_wall']:>10.2f}"
        )
    starved = [
        name
        for name in MEASUREMENTS
        if result.get(f"{_PREFIXES[name]}_cpu_per_wall") is not None
        and result[f"{_PREFIXES[name]}_cpu_per_wall"]
        < CONTENTION_WARNING_FRACTION * result["threads"]
    ]
    if starved:
        lines.append(
            "WARNING: " + ", ".join(starved) + " got less than "
            f"{CONTENTION_WARNING_FRACTION:.0%} of {result['threads']} cores "
            "(cpu/wall); other load on the machine makes these numbers "
            "unrepresentative"
        )
    lines.append(f"{'peak_rss_mb':<22}{result['peak_rss_mb']:>9.0f}")
    lines.append(
        "load average at start / end: "
        + " ".join(f"{v:.2f}" for v in result["loadavg_start"])
        + " / "
        + " ".join(f"{v:.2f}" for v in result["loadavg_end"])
    )
    lines.append(
        f"{'gflop_per_forward':<22}"
        f"{result['gflop_per_forward']:>9.3f}  (batch 1, "
        "FlopCounterMode, 2 x MAC)"
    )
    profile = result.get("profile")
    if profile:
        phases = profile["train_phase_ms_median"]
        lines.append(
            "training step phases (median ms): "
            + ", ".join(f"{name} {ms:.1f}" for name, ms in phases.items())
            + f"; cpu/wall {profile['train_cpu_per_wall']:.2f}"
        )
        for title, key in (
            ("forward+backward self time by op category (ms)", "train_fwd_bwd_op_category_ms"),
            ("eval forward self time by op category (ms)", "eval_forward_op_category_ms"),
            ("eval forward exclusive time by module type (ms)", "eval_forward_module_exclusive_ms"),
        ):
            total = sum(profile[key].values())
            lines.append(f"{title}, total {total:.1f}:")
            for category, ms in sorted(profile[key].items(), key=lambda item: -item[1]):
                lines.append(f"  {category:<46}{ms:>9.1f}{100.0 * ms / total:>7.1f}%")
        lines.append(f"eval forward median ms: {profile['eval_forward_ms_median']:.1f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    line = json.dumps(result, sort_keys=True)
    print(line)
    if args.json_out is not None:
        with open(args.json_out, "w", encoding="utf-8") as out:
            out.write(line + "\n")
    return 0


if __name__ == "__main__":
    # When run by path, Python puts this file's directory (tools/) first on
    # sys.path; drop it so that nothing there can shadow top-level imports.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    sys.exit(main())
