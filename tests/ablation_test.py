"""python -m ablation: the quick study end to end, its resume, and its input checks."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from ablation import arms
from ablation import report
from ablation import study as study_lib
from configs import ablation as ablation_configs
from configs import tiny
from tf_iddpm import data_sources
from tf_iddpm import samplers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_quick(study_dir):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "ablation", "--quick", f"--study_dir={study_dir}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, float):
        yield tree


def _mtimes(study_dir):
    paths = (
        glob.glob(os.path.join(study_dir, "runs", "*", "checkpoints", "*"))
        + glob.glob(os.path.join(study_dir, "runs", "*", "study", "*.json"))
        + glob.glob(os.path.join(study_dir, "classifier", "*"))
    )
    return {p: os.path.getmtime(p) for p in paths}


def test_quick_study_writes_finite_results_and_resumes_without_recomputing(tmp_path):
    study_dir = str(tmp_path / "study")
    stdout = _run_quick(study_dir)

    with open(os.path.join(study_dir, "results.json")) as f:
        results = json.load(f)
    study = results["study"]
    assert study["run_seconds"] > 0 and study["wall_seconds"] > 0
    assert study["quick"] and study["arms"] == list(arms.QUICK_ARMS) and study["seeds"] == 1
    assert len(study["sampling_steps"]) == 2 and study["proxy_features"]
    assert len(results["runs"]) == 2
    for run in results["runs"]:
        assert set(run["bpd"]) == {"full", "respaced"}
        assert run["bpd"]["full"]["num_steps"] == study["diffusion_steps"]
        assert run["bpd"]["respaced"]["num_steps"] == int(study["bpd_respacing"])
        assert {(p["sampler"], p["steps"]) for p in run["quality"]} == {
            (s, k) for s in arms.SAMPLERS for k in study["sampling_steps"]
        }
        assert all(run["curves"][f"loss_q{q}"] for q in range(4))
        if run["arm"] == "hybrid_cosine":  # L_simple logs no vb term
            assert all(run["curves"][f"vb_q{q}"] for q in range(4))
    numbers = list(_numbers(results))
    assert numbers and all(math.isfinite(x) for x in numbers), "a non-finite number in results"
    # The proxy check: the data against itself is far closer than an untrained model's samples.
    check = results["feature_check"]
    assert check["passed"]
    assert check["fd_test_vs_train"] * study_lib.PROXY_RATIO < check["fd_untrained_vs_train"]
    assert "FD(test split vs train split" in stdout and "proxy" in stdout
    with open(os.path.join(study_dir, "results.md")) as f:
        table = f.read()
    assert "a proxy" in table and "L_simple, linear" in table and "L_hybrid, cosine" in table
    for name in ("bpd_per_arm.png", "training_curves.png", "quality_vs_steps.png"):
        with open(os.path.join(study_dir, "figures", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(glob.glob(os.path.join(study_dir, "figures", "samples_*.png"))) == 2
    assert stdout.count("trained 10 steps") == 2

    # A second invocation retrains nothing and recomputes no evaluation.
    before = _mtimes(study_dir)
    assert any("ckpt-10" in p for p in before)
    stdout = _run_quick(study_dir)
    assert stdout.count("already trained") == 2
    assert _mtimes(study_dir) == before
    with open(os.path.join(study_dir, "results.json")) as f:
        again = json.load(f)
    assert again["runs"][0]["bpd"] == results["runs"][0]["bpd"]


def test_arm_configs_follow_the_paper():
    base = ablation_configs.get_config("quick")
    expected = {  # learn_sigma, use_kl, schedule, timestep sampler
        "simple_linear": (False, False, "linear", "uniform"),
        "simple_cosine": (False, False, "cosine", "uniform"),
        "hybrid_linear": (True, False, "linear", "uniform"),
        "hybrid_cosine": (True, False, "cosine", "uniform"),
        "vlb_cosine_uniform": (True, True, "cosine", "uniform"),
        "vlb_cosine_loss_aware": (True, True, "cosine", "loss-second-moment"),
    }
    assert set(expected) == set(arms.ARMS)
    for arm, (learn_sigma, use_kl, schedule, sampler) in expected.items():
        config = arms.arm_config(base, arm, seed=3, steps=77)
        assert (
            config.diffusion.learn_sigma,
            config.diffusion.use_kl,
            config.diffusion.noise_schedule,
            config.train.schedule_sampler,
        ) == (learn_sigma, use_kl, schedule, sampler), arm
        assert not config.diffusion.sigma_small and config.diffusion.rescale_learned_sigmas
        assert config.seed == 3 and config.train.num_steps == 77
    assert base.diffusion.learn_sigma  # the base is copied, never changed


def test_unknown_arm_is_refused_with_the_list_of_arms(tmp_path):
    with pytest.raises(ValueError, match=r"unknown arm\(s\) 'hybrid_cosin'.*simple_linear"):
        arms.parse_arms("simple_linear,hybrid_cosin")
    with pytest.raises(ValueError, match="twice"):
        arms.parse_arms("simple_linear,simple_linear")
    assert arms.parse_arms("all") == list(arms.ARMS)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ablation",
            "--arms=simple_linear,bogus",
            f"--study_dir={tmp_path / 'cli'}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "unknown arm(s) 'bogus'" in result.stderr and "hybrid_cosine" in result.stderr
    assert not os.path.exists(tmp_path / "cli")
    study_dir = str(tmp_path / "study")
    with pytest.raises(ValueError, match="unknown arm 'nope'"):
        study_lib.run_study(
            ablation_configs.get_config("quick"),
            study_dir,
            arms=["nope"],
            seeds=1,
            steps=1,
            bpd_examples=1,
            bpd_respacing="",
            sampling_steps="5",
            quality_samples=8,
        )
    assert not os.path.exists(study_dir)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data.name", "no_such_dataset", "no_such_dataset"),
        ("model.channel_mult", "1,x", "channel_mult"),
        ("train.batch_size", 0, "batch_size"),
    ],
)
def test_bad_base_config_fails_before_anything_runs(tmp_path, field, value, message):
    config = ablation_configs.get_config("quick")
    group, name = field.split(".")
    setattr(getattr(config, group), name, value)
    study_dir = str(tmp_path / "study")
    with pytest.raises(ValueError, match=message):
        study_lib.run_study(
            config,
            study_dir,
            arms=["simple_linear"],
            seeds=1,
            steps=1,
            bpd_examples=1,
            bpd_respacing="",
            sampling_steps="5",
            quality_samples=8,
        )
    assert not os.path.exists(study_dir)


def test_bad_budgets_are_refused(tmp_path):
    base = ablation_configs.get_config("quick")
    kwargs = dict(
        arms=["simple_linear"],
        seeds=1,
        steps=1,
        bpd_examples=1,
        bpd_respacing="",
        sampling_steps="5",
        quality_samples=8,
    )
    for change, message in (
        (
            dict(sampling_steps="5,1000"),
            r"'1000' is not a step count in \[1, diffusion.steps=100\]",
        ),
        (dict(sampling_steps="five"), "not a step count"),
        (dict(seeds=0), "--seeds must be >= 1"),
        (dict(quality_samples=1), "--quality_samples must be >= 2"),
    ):
        with pytest.raises(ValueError, match=message):
            study_lib.run_study(base, str(tmp_path / "s"), **dict(kwargs, **change))
    assert arms.parse_sampling_steps("50,full,10,50", 100) == [10, 50, 100]


def test_the_study_samples_with_sampler_kinds_of_the_inference_layer():
    assert set(arms.SAMPLERS) <= set(samplers.SAMPLER_KINDS)
    assert set(arms.SAMPLER_LABELS) == set(arms.SAMPLERS)
    assert arms.sampler_spec("ancestral", 5, 100) == samplers.SamplerSpec(
        "ancestral", "5", 0.0, True
    )
    # Every step of the process is the unrespaced chain; DDIM is deterministic (eta 0).
    assert arms.sampler_spec("ddim", 100, 100) == samplers.SamplerSpec("ddim", "", 0.0, True)
    with pytest.raises(ValueError, match="study's samplers"):
        arms.sampler_spec("euler", 5, 100)


def test_the_quick_config_is_tiny_with_one_sampling_batch():
    # The default study's config (configs/ablation.py) against tiny: tests/configs_test.py.
    tiny_config, quick = tiny.get_config(), ablation_configs.get_config("quick")
    assert quick.sample.batch_size == 64
    quick.sample.batch_size = tiny_config.sample.batch_size
    assert quick.to_dict() == tiny_config.to_dict()
    with pytest.raises(ValueError, match="no variant 'fast'"):
        ablation_configs.get_config("fast")


def test_quick_with_overrides_of_the_default_config_is_a_usage_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ablation",
            "--quick",
            "--config.train.lr=1e-3",
            f"--study_dir={tmp_path / 'cli'}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "--config=configs/ablation.py:quick" in result.stderr
    assert not os.path.exists(tmp_path / "cli")


def test_mean_and_spread_over_seeds():
    stat = report.mean_std([1.0, 2.0, 3.0])
    assert stat == {"mean": 2.0, "std": 1.0, "n": 3}
    assert report.mean_std([5.0])["std"] == 0.0
    assert report.mean_std([])["n"] == 0


def test_dataset_num_classes_reads_the_label_count():
    config = ablation_configs.get_config("quick")
    assert data_sources.dataset_num_classes(config.data, "train") == 10
    assert data_sources.dataset_num_classes(config.data.to_dict(), "test") == 10
