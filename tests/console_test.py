"""What run.py prints: this project's lines by default, the frameworks' logging with -v 1."""

import os
import pathlib
import subprocess
import sys

import pytest

from tf_iddpm import console

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Framework chatter: TensorFlow's C++ start-up banners and TFDS's INFO logging.
CHATTER = (
    "oneDNN custom operations",
    "This TensorFlow binary is optimized",
    "Load dataset info",
    "All log messages before absl::InitializeLog()",
)


def _run(args, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONPATH", "TF_CONFIG")
    }
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py")] + args,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def test_kept_lines_drop_cpp_info_records_and_keep_the_rest():
    lines = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        "I0000 00:00:1796042203.608211    9344 port.cc:153] oneDNN custom operations are on.\n",
        "I0000 00:00:1796042204.023517    9344 cpu_feature_guard.cc:227] This TensorFlow binary\n",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild.\n",
        "W0000 00:00:1796042204.1    9344 op.cc:12] a warning\n",
        "E0000 00:00:1796042204.2    9344 op.cc:13] an error\n",
        "written by Python\n",
    ]
    assert console._kept_lines(lines) == lines[4:]  # pylint: disable=protected-access


def test_run_py_prints_framework_logging_only_with_verbosity(tmp_path):
    workdir, data_dir = tmp_path / "work", tmp_path / "tfds"  # the digits are prepared here
    code, output = _run(
        [
            f"--config={REPO_ROOT / 'configs' / 'tiny.py'}",
            f"--workdir={workdir}",
            "--mode=train",
            f"--config.data.data_dir={data_dir}",
            "--config.train.num_steps=2",
            "--config.train.log_every=1",
            "--config.train.checkpoint_every=2",
        ],
        tmp_path,
    )
    assert code == 0, output
    assert not [line for line in output.splitlines() if any(c in line for c in CHATTER)], output
    assert "Downloading and preparing dataset" not in output, output
    assert "train in " in output and "UNet 32 ch" in output, output  # the config summary
    assert "step 2/2 loss" in output and "checkpoints in" in output, output
    assert len(output.splitlines()) < 20, output

    code, output = _run(
        [
            f"--workdir={workdir}",
            "--mode=eval",
            "--num_samples=4",
            "--batch_size=4",
            "--steps=2",
            "-v",
            "1",
        ],
        tmp_path,
    )
    assert code == 0, output
    assert "Load dataset info" in output, output
    assert any(c in output for c in CHATTER[:2]), output  # TensorFlow's C++ start-up lines
    assert "bits/dim:" in output and "eval/summary.json" in output, output
    assert "with config:" in output, output  # the full config at -v 1
