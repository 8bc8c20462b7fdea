"""Tests for tools/benchmark_reference.py, the PyTorch-side benchmark.

The script runs under a separate interpreter that has torch; these tests run
in the TensorFlow venv (no torch), so they check what must work without torch:
argument validation, the error messages, and that the script imports nothing
from TensorFlow or tf_iddpm.
"""

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "tools" / "benchmark_reference.py"
_REFERENCE_MODULES = (
    "__init__",
    "script_util",
    "gaussian_diffusion",
    "respace",
    "resample",
    "unet",
    "nn",
    "fp16_util",
)


def _run_script(*args):
    """Runs the script with this interpreter; returns CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _load_module():
    """Loads the script by path, without importing the tf_iddpm package."""
    spec = importlib.util.spec_from_file_location("benchmark_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_checkout(root):
    """Creates empty files shaped like an improved-diffusion checkout."""
    package = root / "improved_diffusion"
    package.mkdir()
    for name in _REFERENCE_MODULES:
        (package / f"{name}.py").write_text("")
    return root


def test_nonexistent_reference_fails_with_path_message():
    completed = _run_script("--reference", "/nonexistent", "--threads", "2")
    assert completed.returncode == 2
    assert "--reference '/nonexistent' is not a directory" in completed.stderr
    assert "openai/improved-diffusion" in completed.stderr
    # The path is checked before torch is imported, so the error is not
    # about torch even though this interpreter has none.
    assert "torch" not in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


def test_directory_without_checkout_names_missing_files(tmp_path):
    (tmp_path / "improved_diffusion").mkdir()
    (tmp_path / "improved_diffusion" / "unet.py").write_text("")
    completed = _run_script("--reference", str(tmp_path))
    assert completed.returncode == 2
    assert "is not a checkout of openai/improved-diffusion" in completed.stderr
    assert "improved_diffusion/script_util.py" in completed.stderr
    assert "improved_diffusion/gaussian_diffusion.py" in completed.stderr
    # unet.py exists, so it must not be listed as missing.
    assert "improved_diffusion/unet.py" not in completed.stderr


def test_missing_torch_says_which_python_to_use(tmp_path):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("this interpreter has torch; the message needs it absent")
    checkout = _fake_checkout(tmp_path)
    completed = _run_script("--reference", str(checkout), "--what", "train")
    assert completed.returncode == 1
    assert "cannot import torch with " + sys.executable in completed.stderr
    assert "virtualenv that has torch" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--threads", "0", "expected an integer >= 1, got 0"),
        ("--batch", "-3", "expected an integer >= 1, got -3"),
        ("--iters", "two", "expected an integer >= 1, got 'two'"),
        ("--warmup", "-1", "expected an integer >= 0, got -1"),
        ("--what", "speed", "invalid choice: 'speed'"),
    ],
)
def test_bad_arguments_are_rejected_with_the_value(tmp_path, flag, value, message):
    checkout = _fake_checkout(tmp_path)
    completed = _run_script("--reference", str(checkout), flag, value)
    assert completed.returncode == 2
    assert flag in completed.stderr
    assert message in completed.stderr


def test_json_out_in_missing_directory_is_rejected(tmp_path):
    checkout = _fake_checkout(tmp_path)
    target = tmp_path / "no_such_dir" / "ref.json"
    completed = _run_script("--reference", str(checkout), "--json-out", str(target))
    assert completed.returncode == 2
    assert f"--json-out {str(target)!r}" in completed.stderr
    assert "does not exist" in completed.stderr


def test_parse_args_defaults_and_absolute_reference(tmp_path, monkeypatch):
    checkout = _fake_checkout(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    module = _load_module()
    args = module.parse_args(["--reference", checkout.name])
    assert args.reference == str(checkout)
    assert os.path.isabs(args.reference)
    assert (args.threads, args.batch, args.what) == (2, 16, "all")
    assert args.warmup is None and args.iters is None
    args = module.parse_args(
        [
            "--reference",
            str(checkout),
            "--threads",
            "4",
            "--batch",
            "8",
            "--what",
            "nll",
            "--warmup",
            "0",
            "--iters",
            "3",
        ]
    )
    assert (args.threads, args.batch, args.what, args.warmup, args.iters) == (4, 8, "nll", 0, 3)


def test_the_benchmark_runs_this_script_by_path():
    from tools import benchmark  # pylint: disable=g-import-not-at-top

    assert pathlib.Path(benchmark.REFERENCE_SCRIPT) == SCRIPT


def test_bench_config_matches_the_issue():
    config = _load_module().BENCH_CONFIG
    assert config["image_size"] == 32
    assert config["num_channels"] == 64
    assert config["num_res_blocks"] == 2
    assert config["num_heads"] == 4
    assert config["attention_resolutions"] == "16,8"
    assert config["dropout"] == pytest.approx(0.1)
    assert config["learn_sigma"] is True
    assert config["noise_schedule"] == "cosine"
    assert config["diffusion_steps"] == 1000
    # Hybrid loss in the reference: learned sigma + rescaled MSE, not KL.
    assert config["rescale_learned_sigmas"] is True
    assert config["use_kl"] is False
    assert config["use_checkpoint"] is False


def test_script_imports_only_stdlib_numpy_torch():
    tree = ast.parse(SCRIPT.read_text())
    allowed_top_level = {
        "argparse",
        "importlib",
        "json",
        "os",
        "platform",
        "resource",
        "statistics",
        "sys",
        "time",
    }
    allowed_anywhere = allowed_top_level | {"numpy", "torch"}
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module.split(".")[0])
    # Top-level imports run before argument validation, so they must be
    # standard library only.
    assert top_level <= allowed_top_level
    anywhere = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            anywhere.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anywhere.add(node.module.split(".")[0])
    assert anywhere <= allowed_anywhere, anywhere - allowed_anywhere
