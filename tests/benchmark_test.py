"""Smoke tests of tools/benchmark.py (ours only): small measurements end to end, no speeds
asserted."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from tf_iddpm import samplers
from tools import benchmark

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# GFLOP of one bench-config forward at batch 1 as torch's FlopCounterMode counts it on the
# reference (convolutions and matmuls, 2 x MAC); our count reads the traced graph instead.
REFERENCE_GFLOP_PER_FORWARD = 3.25566464


def _benchmark(*flags):
    proc = subprocess.run(
        [sys.executable, "-m", "tools.benchmark", *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return proc


def test_one_nll_measurement_prints_the_table_and_json():
    proc = _benchmark("--what=nll", "--batch=2", "--warmup=0", "--iters=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["gflop_per_forward"] == pytest.approx(REFERENCE_GFLOP_PER_FORWARD, rel=1e-9)
    assert result["nll100_img_per_s"] > 0
    # A 100-step chain is 100 forwards per image.
    assert result["nll100_gflop_per_s"] == pytest.approx(
        result["nll100_img_per_s"] * 100 * result["gflop_per_forward"], rel=1e-9
    )
    assert result["fp32_matmul_gflop_per_s"] > 1
    assert 0 < result["rss_above_runtime_mb"] < result["peak_rss_mb"]
    assert (result["threads"], result["batch"], result["precision"]) == (2, 2, "float32")
    assert "float32 ceiling at that peak" in proc.stdout
    assert "nll100_img_per_s" in proc.stdout.split("\n{")[0]  # the table, before the JSON line


def test_reference_without_its_python_is_a_usage_error():
    proc = _benchmark("--what=train", "--reference=/nonexistent")
    assert proc.returncode != 0
    assert "--reference needs --reference_python" in proc.stderr


def test_profile_attributes_a_training_step_to_categories_and_phases():
    proc = _benchmark("--what=profile", "--batch=2", "--warmup=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    categories, phases = result["categories_ms"], result["phases_ms"]
    assert set(categories) == {name for name, _ in benchmark.PROFILE_CATEGORIES}
    # Every kernel class the step runs is found: convolutions both ways, the fused norm and its
    # gradient, dropout (the bench config has 0.1), the optimizer and the EMA.
    for name in (
        "conv forward",
        "conv backward, input",
        "conv backward, filter (+bias)",
        "GroupNorm + SiLU (fused) and its gradient",
        "dropout (mask draw + multiply)",
        "optimizer (fused AdamW)",
        "EMA update",
    ):
        assert categories[name] > 0, name
    # float32: no activation casts, only a few scalar/index ones.
    assert categories["casts float32 <-> bfloat16"] < 0.01 * sum(categories.values())
    assert phases["backward"] > 0 and phases["forward (incl. loss)"] > 0
    assert sum(phases.values()) == pytest.approx(sum(categories.values()), rel=1e-9)
    assert "training step profile" in proc.stdout and "phase" in proc.stdout
    # The inference forward: convolutions forward only, no gradients, no optimizer, no dropout.
    inference = result["inference_forward"]["categories_ms"]
    assert inference["conv forward"] > 0
    assert inference["GroupNorm + SiLU (fused) and its gradient"] > 0
    for name in (
        "conv backward, input",
        "conv backward, filter (+bias)",
        "optimizer (fused AdamW)",
        "EMA update",
        "dropout (mask draw + multiply)",
    ):
        assert inference[name] == 0, name
    assert "inference forward" in proc.stdout


def test_samplers_times_every_kind_at_the_same_nfe():
    proc = _benchmark(
        "--what=samplers",
        "--model=tiny",
        "--batch=2",
        "--sampler_nfe=3",
        "--warmup=0",  # still one warm-up call per kind: the trace
        "--iters=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["model"], result["nfe"], result["batch"]) == ("tiny", 3, 2)
    timings = result["samplers"]
    assert list(timings) == list(samplers.SAMPLER_KINDS)
    for kind, timing in timings.items():
        assert timing["num_steps"] == 3, kind  # every kind calls the network 3 times per image
        (seconds,) = timing["seconds_per_batch"]
        assert 0 < seconds < math.inf
        assert timing["img_per_s"] == pytest.approx(2 / seconds)
        assert timing["ms_per_call_per_image"] == pytest.approx(1e3 * seconds / (3 * 2))
        assert timing["overhead_vs_ancestral"] == pytest.approx(
            timing["ms_per_call_per_image"] / timings["ancestral"]["ms_per_call_per_image"] - 1
        )
    assert timings["ancestral"]["overhead_vs_ancestral"] == 0
    # The table: one row per kind, with its NFE and positive finite rates.
    rows = {
        line.split()[0]: line.split()[1:]
        for line in proc.stdout.split("\n{")[0].splitlines()
        if line.split() and line.split()[0] in samplers.SAMPLER_KINDS
    }
    assert list(rows) == list(samplers.SAMPLER_KINDS)
    for kind, (nfe, img_per_s, ms_per_call, overhead) in rows.items():
        assert int(nfe) == 3
        assert 0 < float(img_per_s) < math.inf and 0 < float(ms_per_call) < math.inf, kind
        assert math.isfinite(float(overhead.rstrip("%")))


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ("--model=tiny", "--sampler_nfe=2"),
            "dpmpp_3m of order 3 needs at least 3 network calls",
        ),
        (("--reference=/nonexistent", "--reference_python=python"), "no reference counterpart"),
    ],
)
def test_samplers_measurement_refuses_bad_flags_before_measuring(flags, message):
    proc = _benchmark("--what=samplers", *flags)
    assert proc.returncode != 0
    assert message in proc.stderr
