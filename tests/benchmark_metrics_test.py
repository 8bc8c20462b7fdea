"""Smoke test of tools/benchmark_metrics.py: tiny measurements end to end, no timings asserted."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests import inception_stand_in
from tf_iddpm import metrics
from tools import benchmark_metrics

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_prints_the_table_and_json_with_the_metrics_of_the_same_features(tmp_path):
    graph = inception_stand_in.write(tmp_path / "stand_in.pb", pool_dim=64)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.benchmark_metrics",
            "--what=all",
            f"--inception={graph}",
            "--images=8",
            "--batch=4",
            "--pr_size=300",
            "--pr_dim=16",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["features_img_per_s"] > 0 and result["features_images"] == 8
    assert result["pr_seconds"] > 0 and np.isfinite(result["pr_seconds"])
    # The benchmark's features are reproducible: its precision/recall are the library's.
    rng = np.random.default_rng(1)
    ref = np.abs(rng.normal(0, 1, [300, 16])).astype(np.float32)
    sample = np.abs(rng.normal(0.1, 1, [300, 16])).astype(np.float32)
    assert (result["pr_precision"], result["pr_recall"]) == metrics.precision_recall(ref, sample)


def test_inception_v3_stand_in_has_the_evaluators_tensor_names():
    names = {node.name for node in benchmark_metrics.inception_v3_stand_in_graph_def().node}
    assert {"ExpandDims", "mixed_6/conv", "pool_3", "softmax/logits/MatMul"} <= names
