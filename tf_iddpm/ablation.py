"""The paper's ablations (Tables 1-2, Figure 8) at a scale two CPU cores afford, in one command.

    python -m tf_iddpm.ablation --study_dir=workdir/study                 # the default study
    python -m tf_iddpm.ablation --study_dir=workdir/study --steps=4000 --seeds=3   # longer
    python -m tf_iddpm.ablation --study_dir=workdir/quick --quick         # the test suite's variant
    python -m tf_iddpm.ablation --study_dir=S --config=configs/digits.py --config.train.lr=1e-4

For each arm (loss x noise schedule x timestep sampler, :data:`ARMS`) and seed, one run is trained
with the same step budget in ``<study_dir>/runs/<arm>_seed<k>/`` (an ordinary workdir: ``run.py``
samples, evaluates and exports it), then evaluated:

* test-split bits/dim over the first ``--bpd_examples`` test images, with the full chain and with
  the respaced chain (``--bpd_respacing`` steps) used for speed;
* sample quality against the training split for every (sampler, steps) of ``--sampling_steps``
  (strided ancestral, and DDIM with eta=0): a Fréchet distance and precision/recall on features
  of a small classifier trained once on the training split (cached in ``<study_dir>/classifier``)
  -- a *proxy* for FID, checked against the data itself before use -- or, with
  ``--inception=classify_image_graph_def.pb``, on the real Inception graph's pool features.

Every finished piece is cached as JSON in its run directory, so a killed study resumes where it
stopped: trained runs are not retrained, finished evaluations are not redone.  The study directory
gets ``results.json`` (every number), ``results.md`` (the table: mean ± std over seeds) and
``figures/*.png``.
"""

import copy
import glob
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from configs import tiny
from tf_iddpm import checkpoints
from tf_iddpm import config_utils
from tf_iddpm import data as data_lib
from tf_iddpm import data_sources
from tf_iddpm import eval_lib
from tf_iddpm import factory
from tf_iddpm import fileio
from tf_iddpm import image_utils
from tf_iddpm import metrics
from tf_iddpm import quality_lib
from tf_iddpm import sample_lib
from tf_iddpm import train_lib
from tf_iddpm import unet

ARM_SETTINGS = {
    # name: (loss, noise_schedule, schedule_sampler)
    "simple_linear": ("simple", "linear", "uniform"),
    "simple_cosine": ("simple", "cosine", "uniform"),
    "hybrid_linear": ("hybrid", "linear", "uniform"),
    "hybrid_cosine": ("hybrid", "cosine", "uniform"),
    "vlb_cosine_uniform": ("vlb", "cosine", "uniform"),
    "vlb_cosine_loss_aware": ("vlb", "cosine", "loss-second-moment"),
}
ARMS = tuple(ARM_SETTINGS)
ARM_LABELS = {
    "simple_linear": "L_simple, linear",
    "simple_cosine": "L_simple, cosine",
    "hybrid_linear": "L_hybrid, linear",
    "hybrid_cosine": "L_hybrid, cosine",
    "vlb_cosine_uniform": "L_vlb, cosine, uniform t",
    "vlb_cosine_loss_aware": "L_vlb, cosine, loss-aware t",
}
QUICK_ARMS = ("simple_linear", "hybrid_cosine")
SAMPLERS = ("ancestral", "ddim")
RUNS_SUBDIR = "runs"
FIGURES_SUBDIR = "figures"
CLASSIFIER_SUBDIR = "classifier"
STUDY_SUBDIR = "study"  # inside each run directory: the cached evaluations
PROXY_RATIO = 10.0  # the proxy check: FD(train, test) * PROXY_RATIO < FD(train, untrained)
FEATURE_DIM = 32  # the proxy classifier's penultimate width


def default_base_config() -> ml_collections.ConfigDict:
    """The default study's model: the embedded digits at 8x8, the tests' UNet, T=1000.

    ``configs/tiny.py`` (one res block per level, 32 channels, attention at 4x4), with the paper's
    T=1000 diffusion steps, a global batch of 64 and sampling batches of 256.
    """
    config = tiny.get_config()
    config.diffusion.steps = 1000
    config.train.batch_size = 64
    config.train.log_every = 25
    config.train.checkpoint_every = 200
    config.eval.batch_size = 64
    config.sample.batch_size = 256  # one batch per quality point: a 8x8 chain is cheap per image
    config.export.model_name = "study"
    return config


def quick_base_config() -> ml_collections.ConfigDict:
    """``--quick``: configs/tiny.py as it is (T=100)."""
    config = tiny.get_config()
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.sample.batch_size = 64
    return config


def arm_config(
    base: ml_collections.ConfigDict, arm: str, seed: int, steps: int
) -> ml_collections.ConfigDict:
    """The base config with one arm's loss, schedule and timestep sampler, a seed and a budget.

    L_simple: fixed (large, beta_t) variances, MSE on eps.  L_hybrid: learned variances (Eq. 15),
    MSE + lambda L_vlb (rescale_learned_sigmas).  L_vlb: learned variances, KL terms only.
    """
    if arm not in ARM_SETTINGS:
        raise ValueError(f"unknown arm {arm!r}; the arms are: {', '.join(ARMS)}")
    loss, schedule, sampler = ARM_SETTINGS[arm]
    config = copy.deepcopy(base)
    config.seed = int(seed)
    config.diffusion.noise_schedule = schedule
    config.diffusion.learn_sigma = loss != "simple"
    config.diffusion.sigma_small = False
    config.diffusion.use_kl = loss == "vlb"
    config.diffusion.rescale_learned_sigmas = True
    config.diffusion.timestep_respacing = ""
    config.train.schedule_sampler = sampler
    config.train.num_steps = int(steps)
    config.train.sample_every = 0
    config.train.fid_every = 0
    return config


def parse_arms(text: str) -> List[str]:
    """ "a,b" or "all" -> arm names, each checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--arms is empty; give arm names or 'all'")
    if names == ["all"]:
        return list(ARMS)
    unknown = [n for n in names if n not in ARM_SETTINGS]
    if unknown:
        raise ValueError(
            f"unknown arm(s) {', '.join(map(repr, unknown))}; the arms are: "
            f"{', '.join(ARMS)} (or 'all')"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--arms names an arm twice: {text!r}")
    return names


def parse_sampling_steps(text: str, num_timesteps: int) -> List[int]:
    """ "10,25,full" -> sorted step counts, each in 1..T ("full" = T)."""
    values = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if token in ("full", "all"):
            values.append(num_timesteps)
            continue
        try:
            value = int(token)
        except ValueError:
            raise ValueError(f"--sampling_steps: {token!r} is not a step count or 'full'") from None
        if not 1 <= value <= num_timesteps:
            raise ValueError(
                f"--sampling_steps: {value} is outside 1..{num_timesteps} "
                f"(the diffusion has T={num_timesteps} steps)"
            )
        values.append(value)
    if not values:
        raise ValueError("--sampling_steps is empty")
    return sorted(set(values))


def _respacing(steps: int, num_timesteps: int) -> str:
    return "" if steps == num_timesteps else str(steps)


def _read_json(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    fileio.atomic_write_text(path, json.dumps(value, indent=2))


def _cached(path: str, key: Dict, compute):
    """The JSON at ``path`` if it was computed with ``key``; else ``compute()``, stored with it."""
    stored = _read_json(path)
    if stored is not None and stored.get("key") == key:
        return stored["value"], True
    value = compute()
    _write_json(path, {"key": key, "value": value})
    return value, False


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


# ---------------------------------------------------------------------------------------------
# Feature extractors: the proxy classifier, or the Inception graph.
# ---------------------------------------------------------------------------------------------


def _split_images_and_labels(data_config, split: str, num_examples: int = 0):
    """uint8 RGB images [N, H, W, 3] and int labels [N] of a split (eval pipeline, in order)."""
    labelled = copy.deepcopy(data_config)
    num_classes = data_sources.dataset_num_classes(data_config, split)
    if num_classes is None:
        raise ValueError(
            f"the proxy classifier needs class labels, and {data_config.name!r} "
            f"split {split!r} has none; pass --inception=classify_image_graph_def.pb"
        )
    labelled.class_cond = True
    labelled.num_classes = num_classes
    dataset = data_lib.make_eval_dataset(
        labelled, batch_size=256, split=split, num_examples=num_examples
    )
    images, labels = [], []
    for batch in dataset:
        mask = batch["mask"]
        real = tf.boolean_mask(batch["image"], mask)
        images.append(image_utils.denormalize_images(real, round_to_nearest=True).numpy())
        labels.append(tf.boolean_mask(batch["label"], mask).numpy())
    return quality_lib.to_rgb(np.concatenate(images)), np.concatenate(labels).astype(np.int64)


class ProxyFeatures:
    """Penultimate features of a small CNN classifier trained on the training split.

    A stand-in for Inception where its weights cannot be had: distances in its feature space are
    self-consistent within one study, comparable with nothing published.
    """

    def __init__(self, model, feature_model, accuracy: float):
        self.model = model
        self.feature_model = feature_model
        self.test_accuracy = float(accuracy)
        self.description = (
            f"proxy: penultimate {FEATURE_DIM}-d features of a small CNN digit "
            f"classifier trained on the training split (test accuracy "
            f"{self.test_accuracy:.3f}); NOT Inception, NOT comparable with "
            "published FIDs"
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 127.5 - 1.0
        return self.feature_model.predict(x, batch_size=256, verbose=0).astype(np.float64)

    @classmethod
    def train_or_load(cls, directory: str, train_data, test_data, *, epochs: int, seed: int):
        path = os.path.join(directory, "classifier.keras")
        info_path = os.path.join(directory, "classifier.json")
        (x_train, y_train), (x_test, y_test) = train_data, test_data
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        if num_classes < 2:
            raise ValueError(
                "the proxy classifier needs class labels (at least 2 classes) in the "
                "dataset; pass --inception=classify_image_graph_def.pb instead"
            )
        info = _read_json(info_path)
        key = {
            "epochs": epochs,
            "seed": seed,
            "shape": list(x_train.shape),
            "num_classes": num_classes,
        }
        if info is not None and info.get("key") == key and os.path.exists(path):
            model = keras.models.load_model(path)
            accuracy = info["test_accuracy"]
            logging.info("loaded the proxy classifier from %s", path)
        else:
            keras.utils.set_random_seed(seed)
            inputs = keras.Input(x_train.shape[1:])
            h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
            h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", strides=2)(h)
            h = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
            h = keras.layers.Dense(FEATURE_DIM, activation="relu", name="features")(h)
            outputs = keras.layers.Dense(num_classes, name="logits")(h)
            model = keras.Model(inputs, outputs)
            model.compile(
                optimizer=keras.optimizers.Adam(2e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
            model.fit(
                x_train.astype(np.float32) / 127.5 - 1.0,
                y_train,
                batch_size=64,
                epochs=epochs,
                verbose=0,
                shuffle=True,
            )
            _, accuracy = model.evaluate(x_test.astype(np.float32) / 127.5 - 1.0, y_test, verbose=0)
            os.makedirs(directory, exist_ok=True)
            model.save(path)
            _write_json(info_path, {"key": key, "test_accuracy": float(accuracy)})
            logging.info("trained the proxy classifier: test accuracy %.3f", accuracy)
        feature_model = keras.Model(model.inputs, model.get_layer("features").output)
        return cls(model, feature_model, accuracy)


class InceptionFeatures:
    """pool_3 features of the 2015 Inception graph (``metrics.InceptionGraph``)."""

    def __init__(self, path: str):
        self.graph = metrics.InceptionGraph(path)
        self.description = f"Inception pool_3 features ({path}, sha256 {self.graph.sha256})"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.graph(images)["pool"].astype(np.float64)


def quality(ref_features: np.ndarray, features: np.ndarray) -> Dict[str, float]:
    """Fréchet distance, precision and recall of ``features`` against ``ref_features``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fd = metrics.frechet_distance(
            *metrics.feature_statistics(features), *metrics.feature_statistics(ref_features)
        )
    precision, recall = metrics.precision_recall(ref_features, features)
    return {"fd": float(fd), "precision": float(precision), "recall": float(recall)}


# ---------------------------------------------------------------------------------------------
# One run: train, bits/dim, quality sweep.
# ---------------------------------------------------------------------------------------------


def _trained_step(workdir: str) -> int:
    path = tf.train.latest_checkpoint(checkpoints.checkpoint_dir(workdir))
    if path is None:
        return 0
    return int(path.rsplit("-", 1)[-1])


def train_run(config, workdir: str) -> Dict:
    """Trains (or resumes) one run to ``train.num_steps``; a finished run is not touched."""
    info_path = os.path.join(workdir, STUDY_SUBDIR, "train.json")
    steps = int(config.train.num_steps)
    info = _read_json(info_path) or {}
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
    _write_json(info_path, info)
    return dict(info, retrained=True)


class ArmModels:
    """One network per arm, with its bpd and sampling graphs, reused by every seed of the arm.

    The seeds of an arm share architecture and process, so each seed's EMA weights are loaded
    into the same variables and the compiled loops (one per chain length and sampler) are traced
    once per arm instead of once per run.
    """

    def __init__(self, config):
        self.config = config
        self.net = factory.create_model_from_config(config)
        self._bpd = {}
        self._samplers = {}

    def load(self, workdir: str) -> str:
        return checkpoints.restore_inference_weights(
            self.net, workdir, use_ema=True, ema_rates=config_utils.ema_rates(self.config)
        )

    def bpd(self, *, respacing: str, num_examples: int) -> Dict:
        """Test-split bits/dim of the first ``num_examples`` images over the (respaced) chain.

        Image i's noise uses seed i in every run (as eval_lib with config.seed 0), so runs are
        compared on the same draws.
        """
        if respacing not in self._bpd:
            process = factory.create_diffusion_from_config(
                self.config, timestep_respacing=respacing
            )
            evaluator = eval_lib.BpdEvaluator(self.net, process, seed=0)
            self._bpd[respacing] = (process, tf.function(evaluator.replica_sums))
        process, step = self._bpd[respacing]
        started = time.time()
        dataset = data_lib.make_eval_dataset(
            self.config.data,
            batch_size=int(self.config.eval.batch_size),
            num_examples=int(num_examples),
        )
        totals = None
        for batch in dataset:
            sums = {k: v.numpy() for k, v in step(batch).items()}
            totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        count = float(totals["count"])
        return {
            "bpd": float(totals["total_bpd"] / count),
            "prior_bpd": float(totals["prior_bpd"] / count),
            "num_images": int(count),
            "num_steps": int(process.num_timesteps),
            "seconds": time.time() - started,
        }

    def samples(self, *, sampler: str, steps: int, num_samples: int) -> np.ndarray:
        """uint8 RGB samples of the loaded weights; image i uses seed i in every run."""
        key = (sampler, steps)
        if key not in self._samplers:
            process = factory.create_diffusion_from_config(
                self.config, timestep_respacing=_respacing(steps, int(self.config.diffusion.steps))
            )
            size = self.config.data.image_size
            self._samplers[key] = sample_lib.Sampler(
                self.net,
                process,
                image_shape=[size, size, self.config.data.num_channels],
                use_ddim=sampler == "ddim",
                eta=0.0,
                clip_denoised=True,
            )
        sample_config = copy.deepcopy(self.config)
        sample_config.seed = 0
        return quality_lib.draw_samples(
            self._samplers[key],
            sample_config,
            num_samples,
            min(num_samples, int(self.config.sample.batch_size)),
            desc=f"{sampler} {steps} steps",
        )


def untrained_samples(config, num_samples: int, steps: int) -> np.ndarray:
    """Samples of the freshly initialised network (the proxy check's "bad model")."""
    net = factory.create_model_from_config(config)
    unet.initialize_weights(net, int(config.seed))
    process = factory.create_diffusion_from_config(
        config, timestep_respacing=_respacing(steps, int(config.diffusion.steps))
    )
    size = config.data.image_size
    sampler = sample_lib.Sampler(
        net,
        process,
        image_shape=[size, size, config.data.num_channels],
        clip_denoised=True,
        class_cond=config.data.class_cond,
    )
    return quality_lib.draw_samples(
        sampler,
        config,
        num_samples,
        min(num_samples, int(config.sample.batch_size)),
        desc="untrained model",
    )


# ---------------------------------------------------------------------------------------------
# TensorBoard curves.
# ---------------------------------------------------------------------------------------------

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
# The study.
# ---------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    values = np.asarray([v for v in values if v is not None], np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "n": int(values.size),
    }


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
    grid_steps: int = 50,
    inception: str = "",
    classifier_epochs: int = 30,
    quick: bool = False,
    command: str = "",
) -> Dict:
    """Trains and evaluates every (arm, seed); writes results.json, results.md and figures.

    Returns:
      The results dict written to ``<study_dir>/results.json``.
    """

    started = time.time()
    arms = list(arms)
    for arm in arms:
        if arm not in ARM_SETTINGS:
            raise ValueError(f"unknown arm {arm!r}; the arms are: {', '.join(ARMS)}")
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
    step_points = parse_sampling_steps(sampling_steps, num_timesteps)
    if bpd_respacing:
        parse_sampling_steps(bpd_respacing, num_timesteps)
    # The base config must be valid as it stands and for every arm, before anything runs.
    data_sources.validate_data_config(base_config.data)
    for arm in arms:
        config_utils.validate_config(arm_config(base_config, arm, 0, steps))
    if base_config.data.class_cond or base_config.data.low_res_size > 0:
        raise ValueError(
            "the study runs unconditional models; class-conditional or "
            "super-resolution base configs are not supported"
        )

    os.makedirs(study_dir, exist_ok=True)
    figures_dir = os.path.join(study_dir, FIGURES_SUBDIR)
    os.makedirs(figures_dir, exist_ok=True)

    # --- features and the proxy check -------------------------------------------------------
    train_images, train_labels = _split_images_and_labels(
        base_config.data, base_config.data.train_split
    )
    test_images, test_labels = _split_images_and_labels(
        base_config.data, base_config.data.eval_split
    )
    if inception:
        extractor = InceptionFeatures(inception)
        proxy = False
    else:
        extractor = ProxyFeatures.train_or_load(
            os.path.join(study_dir, CLASSIFIER_SUBDIR),
            (train_images, train_labels),
            (test_images, test_labels),
            epochs=classifier_epochs,
            seed=0,
        )
        proxy = True
    ref_features = extractor(train_images)
    num_check = min(quality_samples, len(test_images))
    if num_check < 2:
        raise ValueError(f"the test split has {len(test_images)} images; need at least 2")
    data_vs_data = quality(ref_features, extractor(test_images[:num_check]))
    untrained_key = {
        "n": quality_samples,
        "features": extractor.description,
        "config": config_utils.config_to_json(base_config),
    }
    untrained, _ = _cached(
        os.path.join(study_dir, STUDY_SUBDIR, "untrained.json"),
        untrained_key,
        lambda: quality(
            ref_features,
            extractor(
                untrained_samples(
                    arm_config(base_config, "hybrid_cosine", 0, 1),
                    quality_samples,
                    min(10, num_timesteps),
                )
            ),
        ),
    )
    check = {
        "fd_test_vs_train": data_vs_data["fd"],
        "fd_untrained_vs_train": untrained["fd"],
        "ratio_required": PROXY_RATIO,
        "test_images": num_check,
        "untrained_samples": quality_samples,
        "passed": data_vs_data["fd"] * PROXY_RATIO < untrained["fd"],
    }
    print(f"features: {extractor.description}")
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

    # --- the runs ------------------------------------------------------------------------------
    runs = []
    models: Dict[str, ArmModels] = {}
    total = len(arms) * seeds
    index = 0
    # Seed-major: every arm's first seed comes first, so a study cut short still covers all arms.
    for seed in range(seeds):
        for arm in arms:
            index += 1
            config = arm_config(base_config, arm, seed, steps)
            workdir = os.path.join(study_dir, RUNS_SUBDIR, f"{arm}_seed{seed}")
            run_started = time.time()
            train_info = train_run(config, workdir)
            cache_dir = os.path.join(workdir, STUDY_SUBDIR)
            base_key = {"steps": steps}
            if arm not in models:
                models[arm] = ArmModels(config)
            model = models[arm]
            loaded = []

            def load(model=model, workdir=workdir, loaded=loaded):
                if not loaded:
                    loaded.append(model.load(workdir))

            bpd = {}
            for name, respacing in (("full", ""), ("respaced", bpd_respacing)):
                if name == "respaced" and not bpd_respacing:
                    continue
                bpd[name], _ = _cached(
                    os.path.join(cache_dir, f"bpd_{name}.json"),
                    dict(base_key, respacing=respacing, n=bpd_examples),
                    lambda r=respacing, model=model: (
                        load(),
                        model.bpd(respacing=r, num_examples=bpd_examples),
                    )[1],
                )
            points = []
            for sampler in SAMPLERS:
                for k in step_points:
                    key = dict(
                        base_key,
                        sampler=sampler,
                        sampling_steps=k,
                        n=quality_samples,
                        features=extractor.description,
                    )
                    grid_path = os.path.join(cache_dir, f"grid_{sampler}_{k}.npy")

                    def compute(sampler=sampler, k=k, grid_path=grid_path, model=model):
                        t0 = time.time()
                        load()
                        images = model.samples(
                            sampler=sampler, steps=k, num_samples=quality_samples
                        )
                        fileio.atomic_write(grid_path, lambda f: np.save(f, images[:64]))
                        return dict(
                            quality(ref_features, extractor(images)), seconds=time.time() - t0
                        )

                    value, _ = _cached(
                        os.path.join(cache_dir, f"quality_{sampler}_{k}.json"), key, compute
                    )
                    points.append(dict(value, sampler=sampler, steps=k))
            curves = read_curves(workdir)
            run = {
                "arm": arm,
                "seed": seed,
                "workdir": os.path.relpath(workdir, study_dir),
                "train": {k: v for k, v in train_info.items() if k != "retrained"},
                "bpd": bpd,
                "quality": points,
                "curves": curves,
            }
            runs.append(run)
            best = min(points, key=lambda p: p["fd"])
            print(
                f"[{index}/{total}] {arm} seed {seed}: "
                f"{'trained' if train_info['retrained'] else 'already trained'} {steps} steps; "
                f"bpd {bpd['full']['bpd']:.3f} (full chain)"
                + (
                    f", {bpd['respaced']['bpd']:.3f} ({bpd_respacing} steps)"
                    if "respaced" in bpd
                    else ""
                )
                + f"; best FD {best['fd']:.3f} ({best['sampler']}, {best['steps']} steps); "
                f"{time.time() - run_started:.0f} s",
                flush=True,
            )

    # --- summary ------------------------------------------------------------------------------
    summary = summarize_runs(runs, arms, step_points)
    # Time spent on the runs in whichever invocations did the work (a resumed study's own wall
    # time covers only what was left).
    run_seconds = sum(
        r["train"].get("seconds", 0.0)
        + sum(b["seconds"] for b in r["bpd"].values())
        + sum(p["seconds"] for p in r["quality"])
        for r in runs
    )
    results = {
        "study": {
            "command": command,
            "commit": _git_commit(),
            "quick": quick,
            "arms": arms,
            "seeds": seeds,
            "train_steps": steps,
            "batch_size": int(base_config.train.batch_size),
            "diffusion_steps": num_timesteps,
            "image_size": int(base_config.data.image_size),
            "dataset": base_config.data.name,
            "bpd_examples": bpd_examples,
            "bpd_respacing": bpd_respacing,
            "sampling_steps": step_points,
            "quality_samples": quality_samples,
            "features": extractor.description,
            "proxy_features": proxy,
            "wall_seconds": time.time() - started,
            "run_seconds": run_seconds,
            "base_config": json.loads(config_utils.config_to_json(base_config)),
        },
        "feature_check": check,
        "summary": summary,
        "runs": runs,
    }
    figures = write_figures(results, study_dir, grid_steps=grid_steps)
    results["figures"] = figures
    results["study"]["wall_seconds"] = time.time() - started
    _write_json(os.path.join(study_dir, "results.json"), results)
    table = format_results(results)
    fileio.atomic_write_text(os.path.join(study_dir, "results.md"), table)
    print(table)
    print(f"results: {os.path.join(study_dir, 'results.json')}")
    return results


def summarize_runs(runs: Sequence[Dict], arms: Sequence[str], step_points: Sequence[int]) -> Dict:
    """Mean and std over seeds of every number, per arm."""
    summary = {}
    for arm in arms:
        arm_runs = [r for r in runs if r["arm"] == arm]
        entry = {"seeds": len(arm_runs)}
        for name in ("full", "respaced"):
            if all(name in r["bpd"] for r in arm_runs):
                entry[f"bpd_{name}"] = _mean_std([r["bpd"][name]["bpd"] for r in arm_runs])
        entry["quality"] = []
        for sampler in SAMPLERS:
            for k in step_points:
                row = {"sampler": sampler, "steps": k}
                for metric in ("fd", "precision", "recall"):
                    row[metric] = _mean_std(
                        [
                            p[metric]
                            for r in arm_runs
                            for p in r["quality"]
                            if p["sampler"] == sampler and p["steps"] == k
                        ]
                    )
                entry["quality"].append(row)
        entry["final_loss"] = _mean_std(
            [r["train"].get("final_metrics", {}).get("loss") for r in arm_runs]
        )
        summary[arm] = entry
    return summary


def _pm(stat: Dict, fmt: str = "{:.3f}") -> str:
    if stat["n"] == 0:
        return "n/a"
    if stat["n"] == 1:
        return fmt.format(stat["mean"])
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def format_results(results: Dict) -> str:
    """results.md: the setup, the feature check, the bpd table and the quality tables."""
    study, check, summary = results["study"], results["feature_check"], results["summary"]
    lines = [
        f"# Ablation study ({'quick' if study['quick'] else 'full'})",
        "",
        f"Command: `{study['command']}`  ",
        f"Commit: `{study['commit']}`  ",
        f"Dataset: {study['dataset']} {study['image_size']}x{study['image_size']}; "
        f"T={study['diffusion_steps']}; {study['train_steps']} training steps of batch "
        f"{study['batch_size']} per run; {study['seeds']} seed(s) per arm; wall time of this "
        f"invocation {study['wall_seconds'] / 60:.1f} min; training and evaluation of the "
        f"runs {study['run_seconds'] / 60:.1f} min (summed over the invocations that did "
        "them).",
        "",
        f"Sample quality features: {study['features']}.",
        "",
    ]
    if study["proxy_features"]:
        lines += [
            "**The distances below are a proxy** (a small classifier's features on the "
            "digits, not Inception): they rank models of this study against each other "
            "and are comparable with no published FID.",
            "",
        ]
    lines += [
        f"Feature check: FD(test split vs train split, {check['test_images']} images) = "
        f"{check['fd_test_vs_train']:.4f}; FD(untrained model's samples vs train split) = "
        f"{check['fd_untrained_vs_train']:.4f} (required: at least {check['ratio_required']:g}x "
        f"apart: {'passed' if check['passed'] else 'FAILED'}).",
        "",
        f"Values are mean ± std over seeds (std with ddof=1). Bits/dim over the first "
        f"{study['bpd_examples']} test images.",
        "",
        f"| arm | bpd (full chain, {study['diffusion_steps']} steps) | "
        f"bpd (respaced, {study['bpd_respacing'] or '-'} steps) | final train loss |",
        "|---|---|---|---|",
    ]
    for arm, entry in summary.items():
        lines.append(
            f"| {ARM_LABELS[arm]} | {_pm(entry.get('bpd_full', {'n': 0}))} | "
            f"{_pm(entry.get('bpd_respaced', {'n': 0}))} | {_pm(entry['final_loss'], '{:.4f}')} |"
        )
    steps = study["sampling_steps"]
    for metric, title in (
        ("fd", "Fréchet distance (lower is better)"),
        ("precision", "precision"),
        ("recall", "recall"),
    ):
        lines += [
            "",
            f"**{title}** vs sampling steps ({study['quality_samples']} samples, "
            "against the training split)",
            "",
            "| arm | sampler | " + " | ".join(str(k) for k in steps) + " |",
            "|---|---|" + "---|" * len(steps),
        ]
        for arm, entry in summary.items():
            for sampler in SAMPLERS:
                cells = [
                    _pm(row[metric])
                    for k in steps
                    for row in entry["quality"]
                    if row["sampler"] == sampler and row["steps"] == k
                ]
                lines.append(
                    f"| {ARM_LABELS[arm]} | {'DDIM' if sampler == 'ddim' else 'strided'}"
                    f" | " + " | ".join(cells) + " |"
                )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------------


def write_figures(results: Dict, study_dir: str, *, grid_steps: int = 50) -> Dict[str, str]:
    """bpd per arm, training curves, quality vs steps and one sample grid per arm (PNGs)."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

    figures_dir = os.path.join(study_dir, FIGURES_SUBDIR)
    os.makedirs(figures_dir, exist_ok=True)
    summary, runs = results["summary"], results["runs"]
    arms = list(summary)
    colors = {arm: pyplot.get_cmap("tab10")(i) for i, arm in enumerate(ARMS)}
    out = {}

    # bpd per arm.
    figure, axes = pyplot.subplots(figsize=(7, 3.5), dpi=100)
    width = 0.38
    for offset, (name, label) in enumerate(
        (("bpd_full", "full chain"), ("bpd_respaced", "respaced chain"))
    ):
        xs = [i + (offset - 0.5) * width for i in range(len(arms))]
        stats = [summary[a].get(name, {"mean": np.nan, "std": 0.0}) for a in arms]
        axes.bar(
            xs,
            [s["mean"] for s in stats],
            width,
            yerr=[s["std"] for s in stats],
            label=label,
            capsize=3,
        )
    axes.set_xticks(range(len(arms)))
    axes.set_xticklabels([ARM_LABELS[a].replace(", ", "\n", 1) for a in arms], fontsize=7)
    axes.set_ylabel("test bits/dim")
    lows = [
        summary[a][n]["mean"]
        for a in arms
        for n in ("bpd_full", "bpd_respaced")
        if n in summary[a] and np.isfinite(summary[a][n]["mean"])
    ]
    if lows:
        axes.set_ylim(min(lows) * 0.9, max(lows) * 1.05)
    axes.set_title("Test bits/dim per arm (mean ± std over seeds)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    out["bpd"] = _save(figure, figures_dir, "bpd_per_arm.png", pyplot)

    # Training curves.
    figure, grid = pyplot.subplots(2, 4, figsize=(12, 5.5), dpi=90, sharex=True)
    for row, name in enumerate(("loss", "vb")):
        for q in range(4):
            axes = grid[row][q]
            for arm in arms:
                for run in (r for r in runs if r["arm"] == arm):
                    points = np.asarray(run["curves"].get(f"{name}_q{q}", []), np.float64)
                    if points.size:
                        axes.plot(
                            points[:, 0],
                            points[:, 1],
                            color=colors[arm],
                            alpha=0.8,
                            linewidth=1,
                            label=ARM_LABELS[arm] if run["seed"] == 0 else None,
                        )
            axes.set_yscale("log")
            axes.set_title(f"{name}_q{q}", fontsize=9)
            if row == 1:
                axes.set_xlabel("training step")
    grid[0][0].legend(fontsize=6)
    figure.suptitle("Training loss and L_vlb per quartile of t (TensorBoard loss_q*, vb_q*)")
    figure.tight_layout()
    out["curves"] = _save(figure, figures_dir, "training_curves.png", pyplot)

    # Quality vs sampling steps.
    figure, grid = pyplot.subplots(1, 3, figsize=(13, 4), dpi=90)
    for axes, metric in zip(grid, ("fd", "precision", "recall")):
        for arm in arms:
            for sampler, style in (("ancestral", "-"), ("ddim", "--")):
                rows = [r for r in summary[arm]["quality"] if r["sampler"] == sampler]
                axes.errorbar(
                    [r["steps"] for r in rows],
                    [r[metric]["mean"] for r in rows],
                    yerr=[r[metric]["std"] for r in rows],
                    color=colors[arm],
                    linestyle=style,
                    marker="o",
                    markersize=3,
                    capsize=2,
                    label=f"{ARM_LABELS[arm]} ({'DDIM' if sampler == 'ddim' else 'strided'})",
                )
        axes.set_xscale("log")
        axes.set_xlabel("sampling steps")
        axes.set_title(
            {
                "fd": "Fréchet distance (proxy features)"
                if results["study"]["proxy_features"]
                else "FID",
                "precision": "precision",
                "recall": "recall",
            }[metric],
            fontsize=10,
        )
        axes.grid(True, which="both", alpha=0.3)
    grid[0].legend(fontsize=6)
    figure.suptitle(
        "Sample quality vs sampling steps: solid = strided ancestral, dashed = DDIM (eta=0)"
    )
    figure.tight_layout()
    out["quality"] = _save(figure, figures_dir, "quality_vs_steps.png", pyplot)

    # Sample grids: seed 0 of each arm, strided ancestral at the step count nearest grid_steps.
    steps = results["study"]["sampling_steps"]
    nearest = min(steps, key=lambda k: (abs(k - grid_steps), k))
    for arm in arms:
        path = os.path.join(
            study_dir, RUNS_SUBDIR, f"{arm}_seed0", STUDY_SUBDIR, f"grid_ancestral_{nearest}.npy"
        )
        if os.path.exists(path):
            images = np.load(path)
            name = f"samples_{arm}_{nearest}steps.png"
            image_utils.save_image_grid(images, os.path.join(figures_dir, name), padding=1)
            out[f"samples_{arm}"] = os.path.join(FIGURES_SUBDIR, name)
    return out


def _save(figure, directory: str, name: str, pyplot) -> str:
    fileio.atomic_write(os.path.join(directory, name), lambda f: figure.savefig(f, format="png"))
    pyplot.close(figure)
    return os.path.join(FIGURES_SUBDIR, name)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

DEFAULTS = {  # the default study (about 30-40 minutes on 2 CPU cores)
    "arms": "all",
    "seeds": 2,
    "steps": 400,
    "bpd_examples": 32,
    "bpd_respacing": "100",
    "sampling_steps": "10,25,50,100",
    "quality_samples": 192,
}
QUICK = {  # --quick: the test suite's variant (tiny config, T=100)
    "arms": ",".join(QUICK_ARMS),
    "seeds": 1,
    "steps": 10,
    "bpd_examples": 8,
    "bpd_respacing": "10",
    "sampling_steps": "5,10",
    "quality_samples": 64,
}


def main(argv):
    del argv
    flags_ = FLAGS
    preset = QUICK if flags_.quick else DEFAULTS

    def pick(name):
        value = getattr(flags_, name)
        return preset[name] if value is None else value

    if flags_.config is not None:
        base = flags_.config
    else:
        base = quick_base_config() if flags_.quick else default_base_config()
    command = " ".join(["python -m tf_iddpm.ablation"] + sys.argv[1:])
    try:
        arms = parse_arms(pick("arms"))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    run_study(
        base,
        flags_.study_dir,
        arms=arms,
        seeds=int(pick("seeds")),
        steps=int(pick("steps")),
        bpd_examples=int(pick("bpd_examples")),
        bpd_respacing=pick("bpd_respacing"),
        sampling_steps=pick("sampling_steps"),
        quality_samples=int(pick("quality_samples")),
        inception=flags_.inception,
        classifier_epochs=5 if flags_.quick else flags_.classifier_epochs,
        quick=flags_.quick,
        command=command.strip(),
    )


if __name__ == "__main__":
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Base config (default: configs/tiny.py with T=1000 and batch 64; "
        "--quick: configs/tiny.py). Any dataset tf_iddpm.data reads works.",
    )
    flags.DEFINE_string("study_dir", None, "Where the runs, results and figures go.")
    flags.DEFINE_bool(
        "quick",
        False,
        "The test suite's variant: tiny config, 2 arms, 1 seed, 10 steps, 2 sampling-step points.",
    )
    flags.DEFINE_string(
        "arms", None, f"Comma-separated arms or 'all' (default all): {', '.join(ARMS)}."
    )
    flags.DEFINE_integer("seeds", None, "Seeds per arm (default 2).")
    flags.DEFINE_integer("steps", None, "Training steps per run (default 400).")
    flags.DEFINE_integer("bpd_examples", None, "Test images for bits/dim (default 32).")
    flags.DEFINE_string(
        "bpd_respacing",
        None,
        "Steps of the respaced bpd chain (default 100; '' = full chain only).",
    )
    flags.DEFINE_string(
        "sampling_steps",
        None,
        "Sampling step counts of the quality sweep (default 10,25,50,100; 'full' = T).",
    )
    flags.DEFINE_integer("quality_samples", None, "Samples per quality point (default 192).")
    flags.DEFINE_string(
        "inception",
        "",
        "classify_image_graph_def.pb: real Inception features instead of the proxy classifier.",
    )
    flags.DEFINE_integer("classifier_epochs", 30, "Epochs of the proxy classifier.")
    flags.mark_flags_as_required(["study_dir"])
    app.run(main)
