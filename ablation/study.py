"""The study's driver: train every (arm, seed), evaluate each run, assemble the results.

For each arm (:mod:`ablation.arms`) and seed, one run is trained with the same step budget in
``<study_dir>/runs/<arm>_seed<k>/`` (an ordinary workdir: ``run.py`` samples, evaluates and
exports it), then evaluated through the inference layer (:mod:`tf_iddpm.inference`), with the
run's EMA weights:

* test-split bits/dim over the first ``bpd_examples`` test images, with the full chain and with
  the respaced chain (``bpd_respacing`` steps) used for speed (:func:`inference.bits_per_dim`;
  example i's noise from seed i);
* sample quality against the training split for every sampler kind of ``samplers`` (default
  :data:`ablation.arms.DEFAULT_SAMPLERS`) at every point of ``sampling_steps``, a number of network
  calls per image (:func:`ablation.arms.sampler_spec`; a solver skips the full chain), drawn with
  :meth:`inference.InferenceModel.draw` (image i from seed i) and scored by
  :mod:`ablation.features` -- whose features are first checked against the data itself
  (:func:`feature_check`).

Samples and bpd noise use the same seeds in every run, so arms are compared on the same draws.
Every finished piece is cached as JSON in its run's ``study/`` folder (:mod:`ablation.cache`), so
a killed study resumes where it stopped: trained runs are not retrained, finished evaluations are
not redone, and a run whose evaluations are all cached loads no weights.  The study directory gets
``results.json`` (every number), ``results.md`` (the table: mean ± std over seeds) and
``figures/*.png`` (:mod:`ablation.report`).
"""

import dataclasses
import glob
import json
import os
import subprocess
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ablation import arms as arms_lib
from ablation import cache
from ablation import features
from ablation import report
from tf_iddpm import checkpoints
from tf_iddpm import config_utils
from tf_iddpm import data as data_lib
from tf_iddpm import data_sources
from tf_iddpm import factory
from tf_iddpm import fileio
from tf_iddpm import image_utils
from tf_iddpm import inference
from tf_iddpm import schedules
from tf_iddpm import train_lib
from tf_iddpm import unet_reference

RUNS_SUBDIR = "runs"
STUDY_SUBDIR = "study"  # inside each run directory (and the study's): the cached evaluations
PROXY_RATIO = 10.0  # the feature check: FD(train, test) * PROXY_RATIO < FD(train, untrained)
GRID_IMAGES = 64  # samples kept per quality point, for the figures
UNTRAINED_STEPS = 10  # sampling steps of the untrained model's samples (at most T)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a study runs: its arms and seeds, the training steps per run, the evaluation sizes.

    Build it with :func:`check_inputs`, which checks every field against the base config.
    """

    arms: Tuple[str, ...]
    seeds: int
    steps: int
    bpd_examples: int
    bpd_respacing: str  # "" = the full chain only
    sampling_steps: Tuple[int, ...]  # sorted, each in 1..T
    quality_samples: int
    samplers: Tuple[str, ...] = arms_lib.DEFAULT_SAMPLERS  # sampler kinds of the quality sweep
    num_timesteps: int = 0  # T of the base config: the "full" point, which solvers skip

    def bpd_chains(self) -> List[Tuple[str, str]]:
        """(name, respacing) of each bpd evaluation: the full chain, and the respaced one."""
        return [("full", "")] + ([("respaced", self.bpd_respacing)] if self.bpd_respacing else [])

    def quality_points(self) -> List[Tuple[str, int]]:
        """(sampler kind, network calls) of every quality point, sampler-major."""
        return [
            (kind, k)
            for kind in self.samplers
            for k in arms_lib.sampler_points(kind, self.sampling_steps, self.num_timesteps)
        ]

    def runs(self) -> List[Tuple[str, int]]:
        """(arm, seed) of every run, seed-major: a study cut short still covers every arm."""
        return [(arm, seed) for seed in range(self.seeds) for arm in self.arms]


def check_inputs(
    base_config,
    *,
    arms: Sequence[str],
    seeds: int,
    steps: int,
    bpd_examples: int,
    bpd_respacing: str,
    sampling_steps: str,
    quality_samples: int,
    samplers: Sequence[str] = arms_lib.DEFAULT_SAMPLERS,
) -> Budget:
    """The study's budget, with the base config valid for every arm; raises before anything runs.

    Raises:
      ValueError: naming the flag or config field at fault.
    """
    arms = list(arms)
    for arm in arms:
        if arm not in arms_lib.ARM_SETTINGS:
            raise ValueError(f"unknown arm {arm!r}; the arms are: {', '.join(arms_lib.ARMS)}")
    if not arms:
        raise ValueError("no arms to run")
    for name, value, low in (
        ("seeds", seeds, 1),
        ("steps", steps, 1),
        ("bpd_examples", bpd_examples, 1),
        ("quality_samples", quality_samples, 2),
    ):
        if int(value) < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}")
    num_timesteps = int(base_config.diffusion.steps)
    step_points = arms_lib.parse_sampling_steps(sampling_steps, num_timesteps)
    if bpd_respacing:
        arms_lib.parse_sampling_steps(bpd_respacing, num_timesteps, flag="bpd_respacing")
    samplers = tuple(samplers)
    arms_lib.parse_samplers(",".join(samplers))  # known kinds, each once
    for kind in samplers:
        if not arms_lib.sampler_points(kind, step_points, num_timesteps):
            raise ValueError(
                f"--samplers={kind}: a solver's points are numbers of network calls and skip "
                f"'full'; --sampling_steps={sampling_steps!r} gives it none"
            )
    # The base config must be valid as it stands and for every arm, before anything runs.
    data_sources.validate_data_config(base_config.data)
    for arm in arms:
        arm_config = arms_lib.arm_config(base_config, arm, 0, steps)
        config_utils.validate_config(arm_config)
        # Every quality point must be a sampler this arm's process can run (a solver's calls are
        # bounded by its schedule: schedules.solver_max_steps).
        betas = schedules.get_named_beta_schedule(
            arm_config.diffusion.noise_schedule, num_timesteps
        )
        problems = [
            problem
            for kind in samplers
            for k in arms_lib.sampler_points(kind, step_points, num_timesteps)
            for problem in arms_lib.sampler_spec(kind, k, num_timesteps).errors(
                num_timesteps, betas=betas, prefix=f"--samplers={kind} at {k} calls ({arm}): "
            )
        ]
        if problems:
            raise ValueError("; ".join(problems))
    if base_config.data.class_cond or base_config.data.low_res_size > 0:
        raise ValueError(
            "the study runs unconditional models; class-conditional or "
            "super-resolution base configs are not supported"
        )
    return Budget(
        arms=tuple(arms),
        seeds=int(seeds),
        steps=int(steps),
        bpd_examples=int(bpd_examples),
        bpd_respacing=bpd_respacing,
        sampling_steps=tuple(step_points),
        quality_samples=int(quality_samples),
        samplers=samplers,
        num_timesteps=num_timesteps,
    )


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------


def run_dir(study_dir: str, arm: str, seed: int) -> str:
    return os.path.join(study_dir, RUNS_SUBDIR, f"{arm}_seed{seed}")


def _trained_step(workdir: str) -> int:
    path = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(workdir))
    if path is None:
        return 0
    return int(path.rsplit("-", 1)[-1])


def train_run(config, workdir: str) -> Dict:
    """Trains (or resumes) one run to ``train.num_steps``; a finished run is not touched.

    Returns:
      {"steps", "seconds" (training time over all invocations), "final_metrics", "retrained"}.
    """
    info_path = os.path.join(workdir, STUDY_SUBDIR, "train.json")
    steps = int(config.train.num_steps)
    info = cache.read_json(info_path) or {}
    if _trained_step(workdir) >= steps and info.get("steps") == steps:
        return dict(info, retrained=False)
    config_utils.resolve_and_persist_config(config, workdir, config_given=True)
    started = time.time()
    last = train_lib.train(config, workdir)
    info = {
        "steps": steps,
        "seconds": time.time() - started + info.get("seconds", 0.0),
        "final_metrics": last or info.get("final_metrics", {}),
    }
    cache.write_json(info_path, info)
    return dict(info, retrained=True)


CURVE_TAGS = tuple(f"{name}_q{q}" for name in ("loss", "vb") for q in range(4))


def read_curves(workdir: str, tags: Sequence[str] = CURVE_TAGS) -> Dict[str, List[List[float]]]:
    """{tag: [[step, value], ...]} of train_lib's TensorBoard scalars (last value per step)."""
    curves: Dict[str, Dict[int, float]] = {tag: {} for tag in tags}
    pattern = os.path.join(workdir, train_lib.TENSORBOARD_SUBDIR, "events.out.tfevents.*")
    for path in sorted(glob.glob(pattern)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag in curves:
                    curves[value.tag][int(event.step)] = float(tf.make_ndarray(value.tensor))
    return {tag: [[s, v] for s, v in sorted(points.items())] for tag, points in curves.items()}


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------


def draw_samples(
    model: inference.InferenceModel, kind: str, steps: int, num_samples: int, desc: str
) -> np.ndarray:
    """uint8 RGB samples of ``kind`` at ``steps`` network calls (:func:`arms.sampler_spec`); image
    i from seed i in every run, in batches of ``sample.batch_size`` (unconditional: the study runs
    no class-conditional model)."""
    config = model.config
    spec = arms_lib.sampler_spec(kind, steps, int(config.diffusion.steps))
    images = model.draw(
        spec,
        np.arange(int(num_samples), dtype=np.int64),
        batch_size=int(config.sample.batch_size),
        desc=desc,
    )
    return image_utils.to_rgb(images)


def untrained_samples(config, num_samples: int, steps: int) -> np.ndarray:
    """Samples of the freshly initialised network (the feature check's "bad model"): strided
    ancestral over ``steps`` steps, image i from seed i."""
    net = factory.create_model_from_config(config)
    unet_reference.initialize_weights(net, int(config.seed))
    model = inference.InferenceModel(net, config)
    return draw_samples(model, "ancestral", steps, num_samples, desc="untrained model")


class ArmModel:
    """An arm's network for inference, holding one run's EMA weights at a time.

    The seeds of an arm share architecture and process, so each run's weights are loaded into the
    same :class:`tf_iddpm.inference.InferenceModel`, whose compiled samplers (one per sampler
    spec) are traced once per arm instead of once per run.  The network is built, and a run's
    weights loaded, only when an evaluation needs them.
    """

    def __init__(self, config):
        self.config = config
        self._model: Optional[inference.InferenceModel] = None
        self._workdir: Optional[str] = None

    def with_weights_of(self, workdir: str) -> inference.InferenceModel:
        """The model, with the EMA weights of ``workdir``'s newest checkpoint (loaded once)."""
        if self._model is None:
            self._model = inference.InferenceModel.restore(self.config, workdir, use_ema=True)
        elif self._workdir != workdir:
            self._model.load(workdir, use_ema=True)
        self._workdir = workdir
        return self._model


def grid_path(workdir: str, kind: str, steps: int) -> str:
    """Where a run keeps the first samples of one quality point (uint8 [64, H, W, 3] .npy)."""
    return os.path.join(workdir, STUDY_SUBDIR, f"grid_{kind}_{steps}.npy")


class RunEvaluator:
    """One trained run's evaluations, each cached as JSON in the run's ``study/`` folder.

    An evaluation is computed only when its cache is missing or was computed from other inputs
    (cache key: the run's training steps and the evaluation's settings); the run's weights are
    loaded into the arm's model at the first such evaluation, and not at all when every
    evaluation is cached.
    """

    def __init__(self, arm_model: ArmModel, workdir: str, *, train_steps: int):
        self.arm_model = arm_model
        self.workdir = workdir
        self.cache_dir = os.path.join(workdir, STUDY_SUBDIR)
        self.key = {"steps": int(train_steps)}

    def _model(self) -> inference.InferenceModel:
        return self.arm_model.with_weights_of(self.workdir)

    def bpd(self, name: str, respacing: str, num_examples: int) -> Dict:
        """Test-split bits/dim of the first ``num_examples`` images over the (respaced) chain:
        {"bpd", "prior_bpd", "num_images", "num_steps", "seconds"}."""
        value, _ = cache.cached(
            os.path.join(self.cache_dir, f"bpd_{name}.json"),
            dict(self.key, respacing=respacing, n=int(num_examples)),
            lambda: self._bpd(respacing, int(num_examples)),
        )
        return value

    def _bpd(self, respacing: str, num_examples: int) -> Dict:
        model = self._model()
        started = time.time()
        config = model.config
        batch_size = int(config.eval.batch_size)
        size = min(
            num_examples, data_sources.dataset_num_examples(config.data, config.data.eval_split)
        )
        totals = inference.bits_per_dim(
            model,
            data_lib.make_eval_dataset(
                config.data, batch_size=batch_size, num_examples=num_examples
            ),
            respacing=respacing,
            clip_denoised=True,
            seed=0,  # example i's noise from seed i, in every run
            num_batches=-(-size // batch_size),
            desc=f"bpd, {respacing or 'full'} steps",
        )
        count = float(totals["count"])
        return {
            "bpd": float(totals["total_bpd"] / count),
            "prior_bpd": float(totals["prior_bpd"] / count),
            "num_images": int(count),
            "num_steps": int(totals["num_steps"]),
            "seconds": time.time() - started,
        }

    def quality(self, kind: str, steps: int, num_samples: int, scorer: features.Scorer) -> Dict:
        """Quality of ``num_samples`` samples of ``kind`` at ``steps`` network calls against the
        training split: {"fd", "precision", "recall", "seconds", "sampler", "steps"}; the first
        samples are kept at :func:`grid_path`.

        The cache file is per kind and step count (``quality_<kind>_<steps>.json``); a solver's
        key also holds its grid and order, which strided and DDIM points (whose keys predate the
        solvers) do not have.
        """
        key = dict(
            self.key,
            sampler=kind,
            sampling_steps=int(steps),
            n=int(num_samples),
            features=scorer.description,
        )
        if arms_lib.is_solver(kind):
            spec = arms_lib.sampler_spec(kind, steps, int(self.arm_model.config.diffusion.steps))
            key.update(grid=spec.grid, order=spec.order)

        def compute():
            started = time.time()
            images = draw_samples(
                self._model(), kind, steps, num_samples, desc=f"{kind} {steps} calls"
            )
            fileio.atomic_write(
                grid_path(self.workdir, kind, steps),
                lambda f: np.save(f, images[:GRID_IMAGES]),
            )
            return dict(scorer(images), seconds=time.time() - started)

        value, _ = cache.cached(
            os.path.join(self.cache_dir, f"quality_{kind}_{steps}.json"), key, compute
        )
        return dict(value, sampler=kind, steps=int(steps))


def evaluate_run(evaluator: RunEvaluator, budget: Budget, scorer: features.Scorer) -> Dict:
    """{"bpd": {chain name: ...}, "quality": [one point per sampler and step count]} of a run
    (:meth:`Budget.quality_points`)."""
    return {
        "bpd": {
            name: evaluator.bpd(name, respacing, budget.bpd_examples)
            for name, respacing in budget.bpd_chains()
        },
        "quality": [
            evaluator.quality(kind, k, budget.quality_samples, scorer)
            for kind, k in budget.quality_points()
        ],
    }


# ---------------------------------------------------------------------------------------------
# The feature check.
# ---------------------------------------------------------------------------------------------


def feature_check(
    base_config, study_dir: str, scorer: features.Scorer, test_images: np.ndarray, budget: Budget
) -> Dict:
    """Checks that the features can rank sample quality before any run is scored.

    The Fréchet distance between the test and train splits must be :data:`PROXY_RATIO` times
    below that of an untrained model's samples (cached in ``<study_dir>/study/untrained.json``).

    Raises:
      RuntimeError: if it is not.
    """
    num_timesteps = int(base_config.diffusion.steps)
    num_check = min(budget.quality_samples, len(test_images))
    if num_check < 2:
        raise ValueError(f"the test split has {len(test_images)} images; need at least 2")
    data_vs_data = scorer(test_images[:num_check])
    untrained, _ = cache.cached(
        os.path.join(study_dir, STUDY_SUBDIR, "untrained.json"),
        {
            "n": budget.quality_samples,
            "features": scorer.description,
            "config": config_utils.config_to_json(base_config),
        },
        lambda: scorer(
            untrained_samples(
                arms_lib.arm_config(base_config, arms_lib.UNTRAINED_ARM, 0, 1),
                budget.quality_samples,
                min(UNTRAINED_STEPS, num_timesteps),
            )
        ),
    )
    check = {
        "fd_test_vs_train": data_vs_data["fd"],
        "fd_untrained_vs_train": untrained["fd"],
        "ratio_required": PROXY_RATIO,
        "test_images": num_check,
        "untrained_samples": budget.quality_samples,
        "passed": data_vs_data["fd"] * PROXY_RATIO < untrained["fd"],
    }
    print(f"features: {scorer.description}")
    print(
        f"feature check: FD(test split vs train split) = {check['fd_test_vs_train']:.4f}, "
        f"FD(untrained model's samples vs train split) = {check['fd_untrained_vs_train']:.4f}",
        flush=True,
    )
    if not check["passed"]:
        raise RuntimeError(
            f"the feature check failed: FD between the test and train splits "
            f"({check['fd_test_vs_train']:.4f}) is not {PROXY_RATIO:g}x below the FD of an "
            f"untrained model's samples ({check['fd_untrained_vs_train']:.4f}); these features "
            "cannot rank sample quality (train the classifier longer or pass --inception)"
        )
    return check


# ---------------------------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run_line(index: int, total: int, run: Dict, retrained: bool, budget: Budget, seconds: float):
    bpd = run["bpd"]
    best = min(run["quality"], key=lambda p: p["fd"])
    return (
        f"[{index}/{total}] {run['arm']} seed {run['seed']}: "
        f"{'trained' if retrained else 'already trained'} {budget.steps} steps; "
        f"bpd {bpd['full']['bpd']:.3f} (full chain)"
        + (
            f", {bpd['respaced']['bpd']:.3f} ({budget.bpd_respacing} steps)"
            if "respaced" in bpd
            else ""
        )
        + f"; best FD {best['fd']:.3f} ({best['sampler']}, {best['steps']} calls); "
        f"{seconds:.0f} s"
    )


def run_study(
    base_config,
    study_dir: str,
    *,
    arms: Sequence[str],
    seeds: int,
    steps: int,
    bpd_examples: int,
    bpd_respacing: str,
    sampling_steps: str,
    quality_samples: int,
    samplers: Sequence[str] = arms_lib.DEFAULT_SAMPLERS,
    grid_steps: int = 50,
    inception: str = "",
    classifier_epochs: int = 30,
    quick: bool = False,
    command: str = "",
) -> Dict:
    """Trains and evaluates every (arm, seed); writes results.json, results.md and figures.

    Args:
      base_config: the model every arm starts from (``configs/ablation.py``).
      study_dir: where the runs, caches, results and figures go.
      arms, seeds, steps, bpd_examples, bpd_respacing, sampling_steps, quality_samples, samplers:
        the budget (see ``python -m ablation --help``), checked before anything runs.
      grid_steps: the figures show each arm's samples at the step count nearest this (strided
        ancestral's, else those of the first of ``samplers``).
      inception: a ``classify_image_graph_def.pb`` to score samples with instead of the proxy.
      classifier_epochs: training epochs of the proxy classifier.
      quick: recorded in the results (the test suite's variant).
      command: the command line, recorded in the results.

    Returns:
      The results dict written to ``<study_dir>/results.json``.
    """
    started = time.time()
    budget = check_inputs(
        base_config,
        arms=arms,
        seeds=seeds,
        steps=steps,
        bpd_examples=bpd_examples,
        bpd_respacing=bpd_respacing,
        sampling_steps=sampling_steps,
        quality_samples=quality_samples,
        samplers=samplers,
    )
    os.makedirs(study_dir, exist_ok=True)

    data = base_config.data
    train_images, train_labels = features.split_images_and_labels(data, data.train_split)
    test_images, test_labels = features.split_images_and_labels(data, data.eval_split)
    network = features.feature_network(
        study_dir,
        inception,
        (train_images, train_labels),
        (test_images, test_labels),
        classifier_epochs=classifier_epochs,
    )
    scorer = features.Scorer(network, train_images)
    check = feature_check(base_config, study_dir, scorer, test_images, budget)

    runs = []
    arm_models: Dict[str, ArmModel] = {}
    plan = budget.runs()
    for index, (arm, seed) in enumerate(plan, 1):
        run_started = time.time()
        config = arms_lib.arm_config(base_config, arm, seed, budget.steps)
        workdir = run_dir(study_dir, arm, seed)
        train_info = train_run(config, workdir)
        arm_model = arm_models.setdefault(arm, ArmModel(config))
        evaluator = RunEvaluator(arm_model, workdir, train_steps=budget.steps)
        run = {
            "arm": arm,
            "seed": seed,
            "workdir": os.path.relpath(workdir, study_dir),
            "train": {k: v for k, v in train_info.items() if k != "retrained"},
            **evaluate_run(evaluator, budget, scorer),
            "curves": read_curves(workdir),
        }
        runs.append(run)
        line = _run_line(
            index, len(plan), run, train_info["retrained"], budget, time.time() - run_started
        )
        print(line, flush=True)

    results = _results(base_config, budget, runs, check, scorer, quick=quick, command=command)
    # Seed 0's strided ancestral samples of each arm (else the first sampler's), at the step
    # count nearest grid_steps.
    grid_kind = "ancestral" if "ancestral" in budget.samplers else budget.samplers[0]
    nearest = min(
        (k for kind, k in budget.quality_points() if kind == grid_kind),
        key=lambda k: (abs(k - grid_steps), k),
    )
    results["figures"] = report.write_figures(
        results,
        study_dir,
        sample_grids={
            arm: (grid_kind, nearest, grid_path(run_dir(study_dir, arm, 0), grid_kind, nearest))
            for arm in budget.arms
        },
    )
    results["study"]["wall_seconds"] = time.time() - started
    cache.write_json(os.path.join(study_dir, "results.json"), results)
    table = report.format_results(results)
    fileio.atomic_write_text(os.path.join(study_dir, "results.md"), table)
    print(table)
    print(f"results: {os.path.join(study_dir, 'results.json')}")
    return results


def _results(
    base_config, budget: Budget, runs, check, scorer, *, quick: bool, command: str
) -> Dict:
    """The results dict: the study's settings, the feature check, the summary and every run."""
    # Time spent on the runs in whichever invocations did the work (a resumed study's own wall
    # time covers only what was left).
    run_seconds = sum(
        r["train"].get("seconds", 0.0)
        + sum(b["seconds"] for b in r["bpd"].values())
        + sum(p["seconds"] for p in r["quality"])
        for r in runs
    )
    return {
        "study": {
            "command": command,
            "commit": _git_commit(),
            "quick": quick,
            "arms": list(budget.arms),
            "seeds": budget.seeds,
            "train_steps": budget.steps,
            "batch_size": int(base_config.train.batch_size),
            "diffusion_steps": int(base_config.diffusion.steps),
            "image_size": int(base_config.data.image_size),
            "dataset": base_config.data.name,
            "bpd_examples": budget.bpd_examples,
            "bpd_respacing": budget.bpd_respacing,
            "sampling_steps": list(budget.sampling_steps),
            "samplers": list(budget.samplers),
            "quality_samples": budget.quality_samples,
            "features": scorer.description,
            "proxy_features": scorer.proxy,
            "run_seconds": run_seconds,
            "base_config": json.loads(config_utils.config_to_json(base_config)),
        },
        "feature_check": check,
        "summary": report.summarize_runs(runs, budget.arms, budget.quality_points()),
        "runs": runs,
    }
