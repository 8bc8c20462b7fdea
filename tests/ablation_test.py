"""python -m ablation: the quick study end to end, its resume (with a solver added), and its input
checks."""

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

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_quick(study_dir, *flags):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "ablation", "--quick", f"--study_dir={study_dir}", *flags],
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
    assert study["samplers"] == list(arms.DEFAULT_SAMPLERS)
    assert len(results["runs"]) == 2
    for run in results["runs"]:
        assert set(run["bpd"]) == {"full", "respaced"}
        assert run["bpd"]["full"]["num_steps"] == study["diffusion_steps"]
        assert run["bpd"]["respaced"]["num_steps"] == int(study["bpd_respacing"])
        assert {(p["sampler"], p["steps"]) for p in run["quality"]} == {
            (s, k) for s in arms.DEFAULT_SAMPLERS for k in study["sampling_steps"]
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

    # A second invocation that adds a solver (at the smallest point only, to stay cheap) retrains
    # nothing and recomputes no evaluation it has: only the solver's points are new.
    before = _mtimes(study_dir)
    assert any("ckpt-10" in p for p in before)
    solver = "dpmpp_2m"
    stdout = _run_quick(
        study_dir, f"--samplers={','.join(arms.DEFAULT_SAMPLERS)},{solver}", "--sampling_steps=5"
    )
    assert stdout.count("already trained") == 2
    after = _mtimes(study_dir)
    assert {p: after[p] for p in before} == before
    assert (
        sorted(os.path.basename(p) for p in set(after) - set(before))
        == [f"quality_{solver}_5.json"] * 2
    )
    with open(os.path.join(study_dir, "results.json")) as f:
        again = json.load(f)
    assert again["study"]["samplers"] == [*arms.DEFAULT_SAMPLERS, solver]
    for run, first in zip(again["runs"], results["runs"]):
        assert run["bpd"] == first["bpd"]
        points = {(p["sampler"], p["steps"]): p for p in run["quality"]}
        assert set(points) == {("ancestral", 5), ("ddim", 5), (solver, 5)}
        for p in first["quality"]:  # the cached points, as the first invocation measured them
            if p["steps"] == 5:
                assert points[(p["sampler"], 5)] == p
        assert all(math.isfinite(points[(solver, 5)][m]) for m in ("fd", "precision", "recall"))
    numbers = list(_numbers(again))
    assert numbers and all(math.isfinite(x) for x in numbers), "a non-finite number in results"
    for entry in again["summary"].values():
        (row,) = [r for r in entry["quality"] if r["sampler"] == solver]
        assert row["steps"] == 5 and row["fd"]["n"] == 1 and row["fd"]["mean"] > 0
    with open(os.path.join(study_dir, "results.md")) as f:
        table = f.read()
    assert f"| L_simple, linear | {solver} | " in table
    assert f"| L_hybrid, cosine | {solver} | " in table
    with open(os.path.join(study_dir, "figures", "quality_vs_steps.png"), "rb") as f:
        figure = f.read()
    assert figure.startswith(b"\x89PNG") and solver.encode() in figure  # the figure's description


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


def test_unknown_sampler_is_refused_with_the_list_of_kinds(tmp_path):
    with pytest.raises(ValueError, match=r"--samplers=.*dpmpp_2m_sde.*'euler' unknown"):
        arms.parse_samplers("ancestral,euler")
    with pytest.raises(ValueError, match="each once"):
        arms.parse_samplers("ddim,ddim")
    assert arms.parse_samplers("ancestral,unipc") == ("ancestral", "unipc")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ablation",
            "--samplers=ancestral,euler",
            f"--study_dir={tmp_path / 'cli'}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "'euler' unknown" in result.stderr
    assert all(kind in result.stderr for kind in samplers.SAMPLER_KINDS)
    assert not os.path.exists(tmp_path / "cli")
    study_dir = str(tmp_path / "study")
    with pytest.raises(ValueError, match="'nope' unknown"):
        study_lib.run_study(
            ablation_configs.get_config("quick"),
            study_dir,
            arms=["simple_linear"],
            seeds=1,
            steps=1,
            bpd_examples=1,
            bpd_respacing="",
            sampling_steps="5",
            quality_samples=8,
            samplers=["ancestral", "nope"],
        )
    assert not os.path.exists(study_dir)


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
        # A solver's points are numbers of calls: "full" is none, and its schedule bounds them.
        (dict(samplers=("ancestral", "unipc"), sampling_steps="full"), "unipc.*gives it none"),
        (
            dict(samplers=("dpmpp_2m",), sampling_steps="5,99"),
            r"dpmpp_2m at 99 calls \(simple_linear\).*at most 97 network calls",
        ),
        (dict(samplers=("dpmpp_3m",), sampling_steps="2,5"), "needs at least 3 network calls"),
    ):
        with pytest.raises(ValueError, match=message):
            study_lib.run_study(base, str(tmp_path / "s"), **dict(kwargs, **change))
    assert arms.parse_sampling_steps("50,full,10,50", 100) == [10, 50, 100]


def test_the_study_samples_with_sampler_kinds_of_the_inference_layer():
    assert set(arms.DEFAULT_SAMPLERS) <= set(samplers.SAMPLER_KINDS)
    assert set(arms.SAMPLER_LABELS) == set(arms.DEFAULT_SAMPLERS)
    assert arms.sampler_spec("ancestral", 5, 100) == samplers.SamplerSpec(
        "ancestral", "5", 0.0, True
    )
    # Every step of the process is the unrespaced chain; DDIM is deterministic (eta 0).
    assert arms.sampler_spec("ddim", 100, 100) == samplers.SamplerSpec("ddim", "", 0.0, True)
    # A solver's point is its number of network calls; it has no "full" point.
    assert arms.sampler_spec("dpmpp_2m", 5, 100) == samplers.SamplerSpec("dpmpp_2m", "5")
    assert arms.sampler_spec("unipc", 7, 100).num_steps(100) == 7
    assert arms.sampler_points("unipc", [5, 10, 100], 100) == [5, 10]
    assert arms.sampler_points("ddim", [5, 10, 100], 100) == [5, 10, 100]
    assert [arms.sampler_label(k) for k in ("ancestral", "ddim", "unipc")] == [
        "strided",
        "DDIM",
        "unipc",
    ]
    with pytest.raises(ValueError, match="samplers are: ancestral, ddim, dpmpp_2m"):
        arms.sampler_spec("euler", 5, 100)


def test_strided_and_ddim_points_cached_before_the_solvers_are_reused(tmp_path):
    # The cache key of a strided / DDIM quality point as studies wrote it before --samplers: a
    # resumed study must find it (RunEvaluator has no model to compute with here).
    class Scorer:
        description = "proxy features"

    workdir = tmp_path / "run"
    (workdir / study_lib.STUDY_SUBDIR).mkdir(parents=True)
    for kind in arms.DEFAULT_SAMPLERS:
        key = {
            "steps": 10,
            "sampler": kind,
            "sampling_steps": 5,
            "n": 64,
            "features": Scorer.description,
        }
        value = {"fd": 1.5, "precision": 0.5, "recall": 0.25, "seconds": 3.0}
        with open(workdir / study_lib.STUDY_SUBDIR / f"quality_{kind}_5.json", "w") as f:
            json.dump({"key": key, "value": value}, f)
        evaluator = study_lib.RunEvaluator(None, str(workdir), train_steps=10)
        assert evaluator.quality(kind, 5, 64, Scorer()) == dict(value, sampler=kind, steps=5)


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
