"""Sample quality of a trained model: run.py --mode=fid, the FID-vs-steps sweep, FID/KID in training.

The metrics are the guided-diffusion evaluator's (see :mod:`tf_iddpm.metrics`), computed on the
2015 Inception graph ``classify_image_graph_def.pb`` against a reference batch in the evaluator's
``.npz`` format, so the numbers are comparable with published ones at the same sample count
(papers use 50 000 samples).

    # one evaluation with the config's sampler (sample.timestep_respacing, use_ddim, eta, use_ema)
    python run.py --workdir=W --mode=fid --ref_batch=ref.npz --inception=classify_image_graph_def.pb
    # FID vs sampling steps, strided ancestral and DDIM (the paper's Figure 8)
    python run.py --workdir=W --mode=fid --ref_batch=ref.npz --inception=... \\
        --sweep=25,50,100,250,full
    # a reference batch (arr_0 and statistics) from any dataset tf_iddpm.data reads
    python -m tf_iddpm.quality_lib --config=configs/cifar10_hybrid.py --out=ref.npz \\
        --num_images=50000 --inception=classify_image_graph_def.pb

Outputs go to ``<workdir>/fid/``: ``results.json`` (one row per evaluated sampler), ``results.md``
(the table that is printed), and for a sweep ``fid_vs_steps.png``; a single evaluation also keeps
its samples as ``samples_NxHxWx3.npz`` (``arr_0``), so the evaluator itself can be run on them.
"""

import copy
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

from tf_iddpm import config_utils
from tf_iddpm import data as data_lib
from tf_iddpm import data_sources
from tf_iddpm import factory
from tf_iddpm import fileio
from tf_iddpm import image_utils
from tf_iddpm import metrics
from tf_iddpm import sample_lib

FID_SUBDIR = "fid"
TABLE_COLUMNS = (
    ("sampler", "sampler", "{}"),
    ("steps", "steps", "{}"),
    ("FID", "fid", "{:.3f}"),
    ("sFID", "sfid", "{:.3f}"),
    ("IS", "inception_score", "{:.3f}"),
    ("precision", "precision", "{:.4f}"),
    ("recall", "recall", "{:.4f}"),
    ("KID", "kid", "{:.5f}"),
)


def to_rgb(images) -> np.ndarray:
    """uint8 [N, H, W, 1 or 3] -> [N, H, W, 3]: grayscale is repeated over RGB, as for Inception."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def draw_samples(
    sampler: sample_lib.Sampler, config, num_samples: int, batch_size: int, desc: str = "sampling"
) -> np.ndarray:
    """``num_samples`` uint8 RGB images from a :class:`sample_lib.Sampler`.

    Image i uses seed ``config.seed + i`` (and its class label, for class-conditional models) as in
    ``run.py --mode=sample``, so every point of a sweep starts from the same noise.
    """
    seeds = np.arange(num_samples, dtype=np.int64) + int(config.seed)
    labels = sample_lib.sample_labels(config, seeds)
    images = []
    starts = range(0, num_samples, batch_size)
    with tqdm.tqdm(
        total=len(starts) * sampler.diffusion.num_timesteps, desc=desc, unit="step"
    ) as progress:
        for start in starts:
            batch_labels = None if labels is None else labels[start : start + batch_size]
            batch = sampler.sample_in_chunks(
                seeds[start : start + batch_size], batch_labels, on_chunk=progress.update
            )
            images.append(image_utils.denormalize_images(batch).numpy())
    return to_rgb(np.concatenate(images))


_GRAPHS: Dict[Tuple[str, int], metrics.InceptionGraph] = {}
_REFERENCES: Dict[Tuple[str, float, str], Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]] = {}


def load_graph(path: str, batch_size: int = 64) -> metrics.InceptionGraph:
    """The Inception graph at ``path``, loaded once per process."""
    key = (os.path.abspath(path), int(batch_size))
    if key not in _GRAPHS:
        _GRAPHS[key] = metrics.InceptionGraph(path, batch_size=batch_size)
    return _GRAPHS[key]


def reference_features(
    path: str, graph: metrics.InceptionGraph
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(features of the batch's images, its stored statistics), computed once per file and graph.

    Features are needed whatever the file stores (precision, recall and KID compare feature
    sets); stored ``mu``/``sigma``/``mu_s``/``sigma_s`` replace the ones computed from them, as in
    the evaluator.
    """
    key = (
        os.path.abspath(path),
        os.path.getmtime(path) if os.path.exists(path) else 0.0,
        graph.sha256,
    )
    if key not in _REFERENCES:
        batch = metrics.read_batch(path)
        features = graph(batch.pop("images"))
        _REFERENCES[key] = ({k: features[k] for k in ("pool", "spatial")}, batch)
    return _REFERENCES[key]


def _sweep_points(config) -> List[Tuple[str, str]]:
    """(respacing, sampler) pairs: the sweep's, or the config's own sampler."""
    respacings = config_utils.fid_sweep(config)
    if not respacings:
        return [
            (config.sample.timestep_respacing, "ddim" if config.sample.use_ddim else "ancestral")
        ]
    samplers = [s.strip() for s in config.fid.sweep_samplers.split(",") if s.strip()]
    return [(respacing, sampler) for sampler in samplers for respacing in respacings]


def format_table(rows: Sequence[Dict]) -> str:
    """A markdown table of evaluation rows (the columns of :data:`TABLE_COLUMNS`)."""
    lines = [
        "| " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join(fmt.format(row[key]) for _, key, fmt in TABLE_COLUMNS) + " |"
        )
    return "\n".join(lines)


def plot_fid_vs_steps(rows: Sequence[Dict], path: str, title: str = "") -> str:
    """Writes a PNG of FID against sampling steps (log axis), one line per sampler."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

    figure, axes = pyplot.subplots(figsize=(5, 3.5), dpi=120)
    for sampler in sorted({row["sampler"] for row in rows}):
        points = sorted((row["steps"], row["fid"]) for row in rows if row["sampler"] == sampler)
        axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            label="DDIM" if sampler == "ddim" else "strided ancestral",
        )
    axes.set_xscale("log")
    axes.set_xlabel("sampling steps")
    axes.set_ylabel("FID")
    axes.set_title(title or "FID vs sampling steps")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    fileio.atomic_write(path, lambda file: figure.savefig(file, format="png"))
    pyplot.close(figure)
    return path


def evaluate_fid(config, workdir: str, strategy=None, checkpoint: Optional[str] = None) -> Dict:
    """run.py --mode=fid: IS, FID, sFID, precision, recall (and KID) of the workdir's model.

    Draws ``fid.num_samples`` images with the configured sampler (``sample.*``: respacing, DDIM,
    eta, EMA) or, with ``fid.sweep``, once per (steps, sampler) of the sweep, and evaluates them
    against ``fid.ref_batch`` on the Inception graph ``fid.inception``.  ``checkpoint`` is a
    checkpoint prefix to load instead of the workdir's newest (run.py --checkpoint).

    Returns:
      {"rows": [one dict per evaluation], "json": path, "table": path, "png": path or None}.
    """
    del strategy  # sampling runs on the default device, as in run.py --mode=sample
    if config.data.low_res_size > 0:
        raise ValueError(
            "the super-resolution model needs low-resolution inputs; evaluate its "
            "samples with python -m tf_iddpm.metrics instead of run.py --mode=fid"
        )
    num_samples = int(config.fid.num_samples)
    graph = load_graph(config.fid.inception, int(config.fid.batch_size))
    print(f"Inception graph: {graph.path} (sha256 {graph.sha256})")
    ref, ref_statistics = reference_features(config.fid.ref_batch, graph)
    out_dir = os.path.join(workdir, FID_SUBDIR)
    os.makedirs(out_dir, exist_ok=True)
    points = _sweep_points(config)
    rows = []
    for respacing, sampler_name in points:
        point_config = copy.deepcopy(config)
        point_config.sample.timestep_respacing = respacing
        point_config.sample.use_ddim = sampler_name == "ddim"
        if sampler_name != "ddim":
            point_config.sample.eta = 0.0
        sampler = sample_lib.build_sampler(point_config, workdir, checkpoint=checkpoint)
        steps = int(sampler.diffusion.num_timesteps)
        images = draw_samples(
            sampler,
            point_config,
            num_samples,
            int(config.sample.batch_size),
            desc=f"sampling {sampler_name} {steps} steps",
        )
        if len(points) == 1:
            stem = "samples_" + "x".join(str(d) for d in images.shape)
            metrics.write_batch(os.path.join(out_dir, stem + ".npz"), images)
        results = metrics.evaluate_features(ref, graph(images), ref_statistics=ref_statistics)
        row = {
            "sampler": sampler_name,
            "steps": steps,
            "respacing": respacing or "full",
            "eta": float(point_config.sample.eta),
            "use_ema": bool(config.sample.use_ema),
            **results,
        }
        rows.append(row)
        logging.info("%s %d steps: %s", sampler_name, steps, row)
        print(metrics.format_results(row))

    summary = {
        "rows": rows,
        "ref_batch": config.fid.ref_batch,
        "inception": graph.path,
        "inception_sha256": graph.sha256,
    }
    json_path = os.path.join(out_dir, "results.json")
    fileio.atomic_write_text(json_path, json.dumps(summary, indent=2))
    table = format_table(rows)
    table_path = os.path.join(out_dir, "results.md")
    fileio.atomic_write_text(table_path, table + "\n")
    png_path = None
    if len(points) > 1:
        png_path = plot_fid_vs_steps(
            rows,
            os.path.join(out_dir, "fid_vs_steps.png"),
            f"FID vs sampling steps ({num_samples} samples)",
        )
    print(table)
    print(f"results: {json_path}" + (f"\nplot:    {png_path}" if png_path else ""))
    return {"rows": rows, "json": json_path, "table": table_path, "png": png_path}


# ---------------------------------------------------------------------------------------------
# During training.
# ---------------------------------------------------------------------------------------------

_TRAINING_SAMPLERS: Dict[Tuple, sample_lib.Sampler] = {}


def log_training_fid(net, config, step: int, writer) -> Optional[Dict[str, float]]:
    """Logs FID and KID of ``train.fid_num_samples`` samples of ``net`` to TensorBoard.

    Called by the training loop every ``train.fid_every`` steps with the EMA network.  Samples use
    the config's sampler (``sample.timestep_respacing``, ``use_ddim``, ``eta``) and fixed seeds;
    the reference is ``train.fid_ref_batch`` (or ``fid.ref_batch``).  At such small N, FID is
    biased upwards (compare runs only at equal N); KID is unbiased.

    Args:
      net: the (EMA) denoising network.
      config: the experiment config.
      step: the training step, for the summaries.
      writer: a ``tf.summary`` writer.

    Returns:
      {"fid", "kid"}, or None for super-resolution models (they need low-resolution inputs).
    """
    if config.data.low_res_size > 0:
        logging.warning("train.fid_every: skipped, super-resolution models need low-res inputs")
        return None
    graph = load_graph(
        config.train.fid_inception or config.fid.inception, int(config.fid.batch_size)
    )
    ref, ref_statistics = reference_features(
        config.train.fid_ref_batch or config.fid.ref_batch, graph
    )
    sample = config.sample
    key = (id(net), sample.timestep_respacing, sample.use_ddim, float(sample.eta))
    if key not in _TRAINING_SAMPLERS:
        diffusion = factory.create_diffusion_from_config(
            config, timestep_respacing=sample.timestep_respacing
        )
        size = config.data.image_size
        _TRAINING_SAMPLERS[key] = sample_lib.Sampler(
            net,
            diffusion,
            image_shape=[size, size, config.data.num_channels],
            use_ddim=sample.use_ddim,
            eta=sample.eta,
            clip_denoised=sample.clip_denoised,
            class_cond=config.data.class_cond,
        )
    images = draw_samples(
        _TRAINING_SAMPLERS[key],
        config,
        int(config.train.fid_num_samples),
        int(sample.batch_size),
        desc=f"FID samples at step {step}",
    )
    features = graph(images)["pool"]
    if "mu" in ref_statistics:
        mu, sigma = ref_statistics["mu"], ref_statistics["sigma"]
    else:
        mu, sigma = metrics.feature_statistics(ref["pool"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # small N is the point here; KID covers it
        fid = metrics.frechet_distance(*metrics.feature_statistics(features), mu, sigma)
    kid = metrics.kernel_inception_distance(features, ref["pool"])
    with writer.as_default(step=step):
        tf.summary.scalar("quality/fid", fid)
        tf.summary.scalar("quality/kid", kid)
    logging.info("step %d: FID %.3f, KID %.5f (%d samples)", step, fid, kid, len(features))
    return {"fid": fid, "kid": kid}


# ---------------------------------------------------------------------------------------------
# Reference batches from the project's datasets.
# ---------------------------------------------------------------------------------------------


def make_reference_batch(
    data_config,
    path: str,
    *,
    num_images: int = 0,
    split: Optional[str] = None,
    graph: Optional[metrics.InceptionGraph] = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Writes an evaluator-format reference batch from a dataset of ``tf_iddpm.data``.

    Images come from the deterministic eval pipeline (``data.make_eval_dataset``: the split's
    first ``num_images``, center-cropped and resized as for training), mapped back to uint8
    exactly and made RGB.  With ``graph`` the batch also stores ``mu``/``sigma`` and
    ``mu_s``/``sigma_s``, as published reference batches do.

    Args:
      data_config: ``config.data`` (digits, a folder, or any tfds name).
      path: the .npz to write.
      num_images: images to take (0 = the whole split).
      split: default ``data_config.eval_split``.
      graph: optional Inception graph for the statistics.
      batch_size: images per pipeline batch.

    Returns:
      The uint8 images [N, H, W, 3].
    """
    dataset = data_lib.make_eval_dataset(
        data_config, batch_size=batch_size, split=split, num_examples=num_images
    )
    images = []
    for batch in dataset:
        real = tf.boolean_mask(batch["image"], batch["mask"])
        images.append(image_utils.denormalize_images(real, round_to_nearest=True).numpy())
    images = to_rgb(np.concatenate(images))
    if graph is None:
        metrics.write_batch(path, images)
    else:
        features = graph(images)
        metrics.write_batch(
            path, images, pool_features=features["pool"], spatial_features=features["spatial"]
        )
    logging.info("wrote a reference batch of %d images to %s", len(images), path)
    return images


def _main(argv):
    del argv
    config = FLAGS.config
    data_sources.validate_data_config(config.data)
    graph = metrics.InceptionGraph(FLAGS.inception) if FLAGS.inception else None
    images = make_reference_batch(
        config.data, FLAGS.out, num_images=FLAGS.num_images, split=FLAGS.split or None, graph=graph
    )
    print(
        f"reference batch: {FLAGS.out} ({images.shape[0]} images "
        f"{'x'.join(str(d) for d in images.shape[1:])}"
        + (f", statistics from Inception sha256 {graph.sha256})" if graph else ")")
    )


if __name__ == "__main__":
    from absl import app  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

    FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Experiment config whose data group to read, "
        "e.g. configs/cifar10_hybrid.py (--config.data.* overrides).",
    )
    flags.DEFINE_string("out", None, "Reference batch .npz to write.")
    flags.DEFINE_integer("num_images", 0, "Images to take from the split (0 = all of it).")
    flags.DEFINE_string("split", "", "Split (default: the config's data.eval_split).")
    flags.DEFINE_string(
        "inception", "", "classify_image_graph_def.pb: also store mu/sigma and mu_s/sigma_s."
    )
    flags.mark_flags_as_required(["config", "out"])
    app.run(_main)
