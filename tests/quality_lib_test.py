"""run.py --mode=fid, the FID-vs-steps sweep, reference batches and FID/KID during training.

End to end on the tiny config (8x8 digits) trained for 4 steps, with a stand-in Inception graph
(64-d pool features, so that FID needs no 2048 x 2048 matrix square roots; the loader itself is
tested on the 2048-d stand-in in metrics_test.py).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from configs import tiny
from tests import inception_stand_in
from tf_iddpm import metrics
from tf_iddpm import quality_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, module=None):
    command = [sys.executable] + (["-m", module] if module else [str(REPO_ROOT / "run.py")])
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        command + [str(a) for a in args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout + result.stderr


def _scalars(directory, tag):
    values = {}
    for name in os.listdir(directory):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A stand-in graph, a reference batch made by the command line, and a workdir trained for
    4 steps with train.fid_every=2."""
    root = tmp_path_factory.mktemp("quality")
    graph_path = inception_stand_in.write(root / "stand_in.pb", pool_dim=64)
    ref_path = root / "ref.npz"
    code, output = _run(
        [
            f"--config={REPO_ROOT / 'configs' / 'tiny.py'}",
            f"--out={ref_path}",
            "--num_images=40",
            f"--inception={graph_path}",
        ],
        module="tf_iddpm.quality_lib",
    )
    assert code == 0, output
    workdir = root / "work"
    code, output = _run(
        [
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            "--mode=train",
            "--config.train.num_steps=4",
            "--config.train.checkpoint_every=4",
            "--config.train.log_every=4",
            "--config.train.fid_every=2",
            "--config.train.fid_num_samples=6",
            f"--config.fid.ref_batch={ref_path}",
            f"--config.fid.inception={graph_path}",
        ]
    )
    assert code == 0, output
    return {"graph": graph_path, "ref": str(ref_path), "workdir": str(workdir)}


@pytest.mark.slow
def test_reference_batch_from_a_project_dataset(setup):
    batch = metrics.read_batch(setup["ref"])
    images = batch["images"]
    assert images.shape == (40, 8, 8, 3) and images.dtype == np.uint8
    assert images.std() > 10  # digits, not a blank batch
    graph = metrics.InceptionGraph(setup["graph"], progress=False)
    features = graph(images)
    mu, sigma = metrics.feature_statistics(features["pool"])
    np.testing.assert_allclose(batch["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(batch["sigma"], sigma, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        batch["mu_s"], metrics.feature_statistics(features["spatial"])[0], rtol=1e-6
    )
    # Without a graph: images only, and the same images (the eval pipeline is deterministic).
    config = tiny.get_config()
    again = quality_lib.make_reference_batch(
        config.data, os.path.join(os.path.dirname(setup["ref"]), "plain.npz"), num_images=40
    )
    np.testing.assert_array_equal(again, images)


@pytest.mark.slow
def test_training_logs_fid_and_kid_every_fid_every_steps(setup):
    directory = os.path.join(setup["workdir"], "tensorboard")
    fids, kids = _scalars(directory, "quality/fid"), _scalars(directory, "quality/kid")
    assert sorted(fids) == sorted(kids) == [2, 4]
    assert all(np.isfinite(v) and v > 0 for v in fids.values())
    assert all(np.isfinite(v) for v in kids.values())


@pytest.mark.slow
def test_training_hook_logs_what_it_returns(setup, tmp_path):
    config = tiny.get_config()
    config.fid.ref_batch, config.fid.inception = setup["ref"], setup["graph"]
    config.train.fid_num_samples = 5
    config.sample.timestep_respacing = "3"
    from tf_iddpm import factory
    from tf_iddpm import inference
    from tf_iddpm import train_lib

    model = inference.InferenceModel(factory.create_model_from_config(config), config)
    writer = tf.summary.create_file_writer(str(tmp_path))
    logged = train_lib.log_training_fid(model, 7, writer)
    writer.flush()
    assert _scalars(str(tmp_path), "quality/fid") == {7: pytest.approx(logged["fid"], rel=1e-6)}
    assert _scalars(str(tmp_path), "quality/kid") == {7: pytest.approx(logged["kid"], rel=1e-6)}


@pytest.mark.slow
def test_fid_mode_evaluates_the_configured_sampler_like_the_metrics_command(setup):
    workdir = setup["workdir"]
    code, output = _run(
        [
            f"--workdir={workdir}",
            "--mode=fid",
            f"--ref_batch={setup['ref']}",
            f"--inception={setup['graph']}",
            "--num_samples=12",
            "--batch_size=6",
            "--steps=5",
        ]
    )
    assert code == 0, output
    for name in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:", "| sampler |"):
        assert name in output, output[-3000:]
    with open(os.path.join(workdir, "fid", "results.json")) as f:
        (row,) = json.load(f)["rows"]
    assert row["sampler"] == "ancestral" and row["steps"] == 5 and row["num_samples"] == 12
    assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
    assert row["fid"] > 0 and row["inception_score"] >= 1.0
    # The samples are run.py --mode=sample's (same sampler, same seeds) ...
    samples_path = os.path.join(workdir, "fid", "samples_12x8x8x3.npz")
    code, output = _run(
        [f"--workdir={workdir}", "--mode=sample", "--num_samples=12", "--batch_size=4", "--steps=5"]
    )
    assert code == 0, output
    np.testing.assert_array_equal(
        metrics.read_batch(samples_path)["images"],
        np.load(os.path.join(workdir, "samples", "samples_12x8x8x3.npz"))["arr_0"],
    )
    # ... and python -m tf_iddpm.metrics on them gives the same numbers.
    graph = metrics.InceptionGraph(setup["graph"], progress=False)
    with pytest.warns(RuntimeWarning, match="unreliable"):
        again = metrics.evaluate_batches(setup["ref"], samples_path, graph)
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "kid"):
        assert again[key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_fid_sweep_writes_a_table_and_a_plot(setup):
    workdir = setup["workdir"]
    code, output = _run(
        [
            f"--workdir={workdir}",
            "--mode=fid",
            f"--ref_batch={setup['ref']}",
            f"--inception={setup['graph']}",
            "--num_samples=6",
            "--batch_size=6",
            "--sweep=2,4",
        ]
    )
    assert code == 0, output
    with open(os.path.join(workdir, "fid", "results.json")) as f:
        rows = json.load(f)["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [
        ("ancestral", 2),
        ("ancestral", 4),
        ("ddim", 2),
        ("ddim", 4),
    ]
    with open(os.path.join(workdir, "fid", "results.md")) as f:
        table = f.read()
    assert table.count("\n| ddim |") == 2 and "| FID |" in table
    png = os.path.join(workdir, "fid", "fid_vs_steps.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_guidance_sweep_writes_one_row_per_scale_and_a_plot(setup, tmp_path):
    """A class-conditional model trained with label dropout, swept over s: one row per scale,
    each drawn from the same seeds as a single evaluation at that scale."""
    from tf_iddpm import train_lib  # pylint: disable=g-import-not-at-top

    config = tiny.get_config()
    config.data.class_cond, config.data.num_classes = True, 10
    config.model.class_dropout = 0.1
    config.train.num_steps = config.train.checkpoint_every = config.train.log_every = 2
    config.fid.ref_batch, config.fid.inception = setup["ref"], setup["graph"]
    config.fid.num_samples = config.fid.batch_size = 6
    config.sample.timestep_respacing = "3"
    workdir = str(tmp_path / "cond")
    train_lib.train(config, workdir)
    config.fid.guidance_sweep = "0,1,2"
    swept = quality_lib.evaluate_fid(config, workdir)
    rows = swept["rows"]
    assert [r["guidance_scale"] for r in rows] == [0.0, 1.0, 2.0]
    # (Two training steps barely separate eps(x, y) from eps(x, null): the rows may round to the
    # same uint8 images. tests/guidance_test.py checks what guidance does to the images.)
    with open(swept["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert swept["png"].endswith("metrics_vs_guidance.png")
    with open(swept["table"]) as f:
        assert f.read().count("\n| ancestral | 3 |") == 3
    config.fid.guidance_sweep, config.sample.guidance_scale = "", 2.0
    single = quality_lib.evaluate_fid(config, workdir)["rows"]
    assert single[0]["fid"] == rows[2]["fid"]


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "fid.ref_batch is empty: run.py --ref_batch"),
        (["--ref_batch=r.npz"], "fid.inception is empty: run.py --inception"),
        (
            ["--ref_batch=r.npz", "--inception=i.pb", "--sweep=25,fast"],
            "'fast' is not a step count in [1, diffusion.steps=100]",
        ),
        (
            ["--ref_batch=r.npz", "--inception=i.pb", "--sweep=500"],
            "'500' is not a step count in [1, diffusion.steps=100]",
        ),
        (["--ref_batch=r.npz", "--inception=i.pb", "--num_samples=1"], "must be >= 2"),
        (
            ["--ref_batch=r.npz", "--inception=i.pb", "--sweep=5", "--eta=0.5"],
            "only applies to ddim",
        ),
        (
            ["--ref_batch=r.npz", "--inception=/nonexistent/i.pb"],
            "fid.inception='/nonexistent/i.pb' does not exist; it must be the local path of "
            "classify_image_graph_def.pb",
        ),
        (["--ref_batch=/nonexistent/r.npz"], "fid.ref_batch='/nonexistent/r.npz' does not exist"),
    ],
)
def test_fid_mode_bad_requests_fail_clearly(tmp_path, args, message):
    # A new workdir: the trained one stores fid.ref_batch / fid.inception from its training run.
    code, output = _run(
        ["--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", "--mode=fid", "--num_samples=4"]
        + args
    )
    assert code != 0
    assert message in output, output[-2000:]


def test_training_with_fid_every_needs_a_reference_and_a_graph():
    from tf_iddpm import config_utils

    config = tiny.get_config()
    config.train.fid_every = 5
    with pytest.raises(ValueError, match=r"train.fid_ref_batch \(or fid.ref_batch\) is empty"):
        config_utils.validate_config(config)
    config.train.fid_ref_batch, config.fid.inception = "/nonexistent/ref.npz", "/nonexistent/i.pb"
    with pytest.raises(ValueError, match="fid_ref_batch.*does not exist"):
        config_utils.validate_config(config)
