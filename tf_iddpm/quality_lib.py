"""run.py --mode=fid: sample quality of a trained model, for one sampler or a sweep.

The metrics are the guided-diffusion evaluator's (see :mod:`tf_iddpm.metrics`), computed on the
2015 Inception graph ``classify_image_graph_def.pb`` against a reference batch in the evaluator's
``.npz`` format, so the numbers are comparable with published ones at the same sample count
(papers use 50 000 samples).

    # one evaluation with the configured sampler (sample.*: sampler, steps, eta, guidance, EMA)
    python run.py --workdir=W --mode=fid --ref_batch=ref.npz --inception=classify_image_graph_def.pb
    # FID vs network calls for several samplers (the paper's Figure 8, plus the solvers)
    python run.py --workdir=W --mode=fid --ref_batch=ref.npz --inception=... \\
        --sweep=10,25,50,100,full --sweep_samplers=ancestral,ddim,dpmpp_2m,unipc
    # the metrics against the classifier-free guidance scale (class-conditional models)
    python run.py --workdir=W --mode=fid ... --guidance_sweep=0,1,1.5,2,3,5
    # a reference batch (arr_0 and statistics) from any dataset tf_iddpm.data reads
    python -m tf_iddpm.quality_lib --config=configs/cifar10_hybrid.py --out=ref.npz \\
        --num_images=50000 --inception=classify_image_graph_def.pb

Outputs go to ``<workdir>/fid/``: ``results.json`` (one row per evaluated sampler), ``results.md``
(the table that is printed), for a sweep ``fid_vs_steps.png`` or ``metrics_vs_guidance.png``; a
single evaluation also keeps its samples as ``samples_NxHxWx3.npz`` (``arr_0``), so the evaluator
itself can be run on them.  FID and KID during training: ``train_lib.log_training_fid``.
"""

import json
import os
from typing import Dict, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from tf_iddpm import data as data_lib
from tf_iddpm import data_sources
from tf_iddpm import fileio
from tf_iddpm import image_utils
from tf_iddpm import inference
from tf_iddpm import metrics
from tf_iddpm import samplers

FID_SUBDIR = "fid"
TABLE_COLUMNS = (
    ("sampler", "sampler", "{}"),
    ("steps", "steps", "{}"),
    ("guidance", "guidance_scale", "{:g}"),
    ("FID", "fid", "{:.3f}"),
    ("sFID", "sfid", "{:.3f}"),
    ("IS", "inception_score", "{:.3f}"),
    ("precision", "precision", "{:.4f}"),
    ("recall", "recall", "{:.4f}"),
    ("KID", "kid", "{:.5f}"),
    ("label agreement", "label_agreement", "{:.3f}"),
)


def format_table(rows: Sequence[Dict]) -> str:
    """A markdown table of evaluation rows (the columns of :data:`TABLE_COLUMNS` the rows have)."""
    columns = [c for c in TABLE_COLUMNS if any(c[1] in row for row in rows)]
    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(fmt.format(row[key]) if key in row else "-" for _, key, fmt in columns)
            + " |"
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
            label=sampler,
        )
    axes.set_xscale("log")
    axes.set_xlabel("network calls per image (NFE)")
    axes.set_ylabel("FID")
    axes.set_title(title or "FID vs network calls")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    fileio.atomic_write(path, lambda file: figure.savefig(file, format="png"))
    pyplot.close(figure)
    return path


GUIDANCE_PLOT_METRICS = (
    ("FID", "fid"),
    ("sFID", "sfid"),
    ("Inception Score", "inception_score"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("label agreement", "label_agreement"),
)


def plot_metrics_vs_guidance(rows: Sequence[Dict], path: str, title: str = "") -> str:
    """Writes a PNG of FID, sFID, IS, precision and recall against the guidance scale."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

    rows = sorted(rows, key=lambda row: row["guidance_scale"])
    scales = [row["guidance_scale"] for row in rows]
    shown = [(name, key) for name, key in GUIDANCE_PLOT_METRICS if key in rows[0]]
    figure, axes = pyplot.subplots(1, len(shown), figsize=(3 * len(shown), 3), dpi=120)
    for axis, (name, key) in zip(axes, shown):
        axis.plot(scales, [row[key] for row in rows], marker="o")
        axis.set_xlabel("guidance scale s")
        axis.set_title(name)
        axis.grid(True, alpha=0.3)
    figure.suptitle(title or "sample quality vs guidance")
    figure.tight_layout()
    fileio.atomic_write(path, lambda file: figure.savefig(file, format="png"))
    pyplot.close(figure)
    return path


def evaluate_fid(config, workdir: str, strategy=None, checkpoint: Optional[str] = None) -> Dict:
    """run.py --mode=fid: IS, FID, sFID, precision, recall (and KID) of the workdir's model.

    Draws ``fid.num_samples`` images with the configured sampler (``sample.*``, see
    :func:`tf_iddpm.samplers.from_config`), or once per point of a sweep
    (:func:`tf_iddpm.samplers.sweep_specs`): with ``fid.sweep`` per (sampler, network calls),
    with ``fid.guidance_sweep`` per guidance scale; and evaluates them against
    ``fid.ref_batch`` on the Inception graph ``fid.inception``.  Every point draws image i from
    seed ``config.seed + i``, as ``run.py --mode=sample`` does.  ``checkpoint`` is a checkpoint
    prefix to load instead of the workdir's newest (run.py --checkpoint).

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
    num_timesteps = int(config.diffusion.steps)
    specs = samplers.sweep_specs(
        samplers.from_config(config.sample),
        config.fid.sweep,
        config.fid.sweep_samplers,
        num_timesteps,
        guidance_text=config.fid.guidance_sweep,
    )
    guidance_sweep = bool(config.fid.guidance_sweep.strip())
    model = inference.InferenceModel.restore(
        config, workdir, use_ema=config.sample.use_ema, checkpoint=checkpoint
    )
    graph = metrics.load_graph(config.fid.inception, int(config.fid.batch_size))
    print(f"feature network: {graph.path} (sha256 {graph.sha256})")
    ref, ref_statistics = metrics.reference_features(config.fid.ref_batch, graph)
    out_dir = os.path.join(workdir, FID_SUBDIR)
    rows = []
    for spec in specs:
        steps = spec.num_steps(num_timesteps)
        drawn = model.draw_configured(
            spec, num_samples, seed=int(config.seed), desc=f"sampling {spec.label(num_timesteps)}"
        )
        images = image_utils.to_rgb(drawn["images"])
        if len(specs) == 1:
            stem = "samples_" + "x".join(str(d) for d in images.shape)
            metrics.write_batch(os.path.join(out_dir, stem + ".npz"), images)
        features = graph(images)
        results = metrics.evaluate_features(ref, features, ref_statistics=ref_statistics)
        if drawn["labels"] is not None and features["probs"].shape[1] == config.data.num_classes:
            # A classifier of the model's own classes: do the samples show their label?
            results["label_agreement"] = metrics.label_agreement(features["probs"], drawn["labels"])
        row = {
            "sampler": spec.kind,
            "steps": steps,
            "respacing": spec.steps or "full",
            "eta": float(spec.eta),
            "guidance_scale": float(spec.guidance_scale),
            "use_ema": bool(config.sample.use_ema),
            **results,
        }
        rows.append(row)
        logging.info("%s: %s", spec.label(num_timesteps), row)
        print(metrics.format_results(row))

    summary = {
        "rows": rows,
        "ref_batch": config.fid.ref_batch,
        "inception": graph.path,
        "inception_sha256": graph.sha256,
        "weights": str(model.loaded),
    }
    json_path = os.path.join(out_dir, "results.json")
    fileio.atomic_write_text(json_path, json.dumps(summary, indent=2))
    table = format_table(rows)
    table_path = os.path.join(out_dir, "results.md")
    fileio.atomic_write_text(table_path, table + "\n")
    png_path = None
    if guidance_sweep:
        png_path = plot_metrics_vs_guidance(
            rows,
            os.path.join(out_dir, "metrics_vs_guidance.png"),
            # The sampler without its (swept) scale.
            f"{specs[0].replace(guidance_scale=1.0).label(num_timesteps)}, {num_samples} samples",
        )
    elif len(specs) > 1:
        png_path = plot_fid_vs_steps(
            rows,
            os.path.join(out_dir, "fid_vs_steps.png"),
            f"FID vs network calls ({num_samples} samples)",
        )
    print(table)
    print(f"results: {json_path}" + (f"\nplot:    {png_path}" if png_path else ""))
    return {"rows": rows, "json": json_path, "table": table_path, "png": png_path}


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
    images = image_utils.to_rgb(np.concatenate(images))
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
    graph = metrics.load_graph(FLAGS.inception) if FLAGS.inception else None
    images = make_reference_batch(
        config.data, FLAGS.out, num_images=FLAGS.num_images, split=FLAGS.split or None, graph=graph
    )
    print(
        f"reference batch: {FLAGS.out} ({images.shape[0]} images "
        f"{'x'.join(str(d) for d in images.shape[1:])}"
        + (f", statistics from the feature network, sha256 {graph.sha256})" if graph else ")")
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
