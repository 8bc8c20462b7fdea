"""run.py --mode=sample / --mode=eval end to end on a tiny model trained for a few steps, and their errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, cwd=REPO_ROOT):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py")] + args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_eval")
    workdir = str(root / "work")
    code, output = _run(
        [
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            "--mode=train",
            f"--config.data.data_dir={root / 'tfds'}",
            "--config.train.num_steps=4",
            "--config.train.checkpoint_every=4",
        ]
    )
    assert code == 0, output
    return workdir


@pytest.mark.slow
def test_sample_writes_reference_style_npz_and_png(trained_workdir):
    code, output = _run(
        [
            f"--workdir={trained_workdir}",
            "--mode=sample",
            "--num_samples=5",
            "--batch_size=2",
            "--steps=5",
        ]
    )
    assert code == 0, output
    npz = os.path.join(trained_workdir, "samples", "samples_5x8x8x3.npz")
    assert os.path.exists(npz) and os.path.exists(npz[:-4] + ".png")
    images = np.load(npz)["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    # Per-image seeds: the same images whatever the batch size.
    code, output = _run(
        [
            f"--workdir={trained_workdir}",
            "--mode=sample",
            "--num_samples=5",
            "--batch_size=5",
            "--steps=5",
        ]
    )
    assert code == 0, output
    np.testing.assert_array_equal(np.load(npz)["arr_0"], images)


@pytest.mark.slow
def test_eval_reports_bpd_and_terms(trained_workdir):
    code, output = _run(
        [
            f"--workdir={trained_workdir}",
            "--mode=eval",
            "--num_samples=10",
            "--batch_size=4",
            "--steps=10",
        ]
    )
    assert code == 0, output
    with open(os.path.join(trained_workdir, "eval", "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_images"] == 10 and summary["num_steps"] == 10
    assert 0.5 < summary["bpd"] < 30, summary
    vb = np.load(os.path.join(trained_workdir, "eval", "vb_terms.npz"))["arr_0"]
    assert vb.shape == (10,)
    assert summary["bpd"] == pytest.approx(summary["prior_bpd"] + vb.sum(), rel=1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mode=sample", "--steps=101"], "not a valid respacing"),
        (["--mode=sample", "--steps=fast"], "not a valid respacing"),
        (["--mode=sample", "--num_samples=0"], "num_samples"),
        (["--mode=eval", "--steps=ddim45"], "not a valid respacing"),
        (["--mode=sample", "--class_label=3"], "class"),
    ],
)
def test_bad_sampling_requests_fail_clearly(trained_workdir, args, message):
    code, output = _run([f"--workdir={trained_workdir}"] + args)
    assert code != 0
    assert message in output, output[-2000:]


def test_class_labels_for_conditional_models():
    from configs import tiny
    from tf_iddpm import inference

    config = tiny.get_config()
    config.data.class_cond, config.data.num_classes = True, 10
    config.sample.class_label = 10
    with pytest.raises(ValueError, match=r"class_label 10 out of range; allowed: 0..9"):
        inference.sample_labels(config, np.arange(3))
    config.sample.class_label = 4
    np.testing.assert_array_equal(inference.sample_labels(config, np.arange(3)), [4, 4, 4])
    config.sample.class_label = -1
    labels = inference.sample_labels(config, np.arange(200))
    assert labels.min() >= 0 and labels.max() <= 9 and len(set(labels.tolist())) == 10
    np.testing.assert_array_equal(
        inference.sample_labels(config, np.arange(200))[5:8],
        inference.sample_labels(config, np.arange(5, 8)),
    )


@pytest.mark.slow
def test_benchmark_bpd_precision_check_on_a_trained_workdir(trained_workdir):
    # The benchmark's --bpd_check_workdir measurement: float32 and mixed_bfloat16 bpd of the same
    # test images on the same per-image seeds.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.benchmark",
            "--child=bpd_check",
            f"--bpd_check_workdir={trained_workdir}",
            "--bpd_check_images=6",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [out for out in proc.stdout.splitlines() if out.startswith("BENCH_JSON ")][-1]
    result = json.loads(line[len("BENCH_JSON ") :])
    assert result["images"] == 6
    assert result["fp32_bpd"] > 0 and result["bf16_bpd"] > 0
    assert result["policies"] == [
        "float32",
        "mixed_bfloat16",
    ]  # each pass built its net in that policy
    assert result["bf16_bpd_delta_max_abs"] < 0.05 * result["fp32_bpd"]
    assert abs(result["bf16_bpd_delta"]) <= result["bf16_bpd_delta_max_abs"]


@pytest.mark.slow
def test_one_channel_model_trains_samples_evaluates_and_exports(tmp_path):
    """configs/digits.py is grayscale (C=1): the whole pipeline keeps one channel, and the PNG grid
    is a grayscale image (not three tinted copies)."""
    import tensorflow as tf
    from PIL import Image

    workdir = str(tmp_path / "work")
    code, output = _run(
        [
            "--config=configs/tiny.py",
            "--config.data.num_channels=1",
            f"--workdir={workdir}",
            "--mode=train",
            f"--config.data.data_dir={tmp_path / 'tfds'}",
            "--config.train.num_steps=2",
            "--config.train.checkpoint_every=2",
        ]
    )
    assert code == 0, output
    code, output = _run([f"--workdir={workdir}", "--mode=sample", "--num_samples=3", "--steps=3"])
    assert code == 0, output
    npz = os.path.join(workdir, "samples", "samples_3x8x8x1.npz")
    assert np.load(npz)["arr_0"].shape == (3, 8, 8, 1)
    with Image.open(npz[:-4] + ".png") as grid:
        assert grid.mode == "L"
    code, output = _run(
        [f"--workdir={workdir}", "--mode=eval", "--num_samples=4", "--batch_size=4", "--steps=3"]
    )
    assert code == 0, output
    with open(os.path.join(workdir, "eval", "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_images"] == 4 and 0.5 < summary["bpd"] < 30, summary
    code, output = _run([f"--workdir={workdir}", "--mode=export"])
    assert code == 0, output
    export_dir = os.path.join(workdir, "export")
    sampler = tf.saved_model.load(os.path.join(export_dir, "tiny_sampler", "1"))
    images = sampler.signatures["serving_default"](
        seed=tf.constant([1, 2], tf.int64),
        num_steps=tf.constant(2),
        sampler=tf.constant("unipc"),
        eta=tf.constant(0.0),
    )["images"]
    assert images.shape == (2, 8, 8, 1) and images.dtype == tf.uint8
    nll = tf.saved_model.load(os.path.join(export_dir, "tiny_nll", "1"))
    result = nll.signatures["serving_default"](
        images=tf.constant(images), num_steps=tf.constant(2), seed=tf.constant([1, 2], tf.int64)
    )
    assert result["total_bpd"].shape == (2,)


def test_a_class_conditional_grid_has_one_row_per_class():
    from tf_iddpm import sample_lib

    images = np.stack([np.full([2, 2, 1], 10 * (i + 1), np.uint8) for i in range(4)])
    cells, columns = sample_lib._grid_images(images, np.array([2, 0, 2, 1]))
    assert columns == 2
    np.testing.assert_array_equal(cells[:, 0, 0, 0], [20, 0, 40, 0, 10, 30])  # 0 = empty cell
    cells, columns = sample_lib._grid_images(images, None)
    assert columns is None and len(cells) == 4
