"""The study's report: statistics over seeds, the markdown table and the figures.

Reads only the results dict that :func:`ablation.study.run_study` assembles (and the sample grids
it names), so a report can be redrawn from a ``results.json``.
"""

import os
from typing import Dict, Sequence, Tuple

import numpy as np

from ablation import arms as arms_lib
from tf_iddpm import fileio
from tf_iddpm import image_utils

FIGURES_SUBDIR = "figures"  # inside the study directory


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """{"mean", "std" (ddof=1; 0 for one value), "n"} of the values that are not None."""
    values = np.asarray([v for v in values if v is not None], np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "n": int(values.size),
    }


def summarize_runs(
    runs: Sequence[Dict], arms: Sequence[str], quality_points: Sequence[Tuple[str, int]]
) -> Dict:
    """Mean and std over seeds of every number, per arm; ``quality_points`` are the (sampler
    kind, network calls) of the quality sweep (``Budget.quality_points``)."""
    summary = {}
    for arm in arms:
        arm_runs = [r for r in runs if r["arm"] == arm]
        entry = {"seeds": len(arm_runs)}
        for name in ("full", "respaced"):
            if all(name in r["bpd"] for r in arm_runs):
                entry[f"bpd_{name}"] = mean_std([r["bpd"][name]["bpd"] for r in arm_runs])
        entry["quality"] = []
        for sampler, k in quality_points:
            row = {"sampler": sampler, "steps": k}
            for metric in ("fd", "precision", "recall"):
                row[metric] = mean_std(
                    [
                        p[metric]
                        for r in arm_runs
                        for p in r["quality"]
                        if p["sampler"] == sampler and p["steps"] == k
                    ]
                )
            entry["quality"].append(row)
        entry["final_loss"] = mean_std(
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


def study_samplers(results: Dict) -> Tuple[str, ...]:
    """The sampler kinds of a study's quality sweep (results written before ``--samplers`` existed
    swept the defaults)."""
    return tuple(results["study"].get("samplers", arms_lib.DEFAULT_SAMPLERS))


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
            f"| {arms_lib.ARM_LABELS[arm]} | {_pm(entry.get('bpd_full', {'n': 0}))} | "
            f"{_pm(entry.get('bpd_respaced', {'n': 0}))} | {_pm(entry['final_loss'], '{:.4f}')} |"
        )
    steps = study["sampling_steps"]
    kinds = study_samplers(results)
    for metric, title in (
        ("fd", "Fréchet distance (lower is better)"),
        ("precision", "precision"),
        ("recall", "recall"),
    ):
        lines += [
            "",
            f"**{title}** vs network calls per image (NFE: the respaced chain's steps for "
            f"strided and DDIM; {study['quality_samples']} samples, against the training split)",
            "",
            "| arm | sampler | " + " | ".join(str(k) for k in steps) + " |",
            "|---|---|" + "---|" * len(steps),
        ]
        for arm, entry in summary.items():
            for sampler in kinds:
                rows = {row["steps"]: row for row in entry["quality"] if row["sampler"] == sampler}
                # "-": no point (a solver has no full chain).
                cells = [_pm(rows[k][metric]) if k in rows else "-" for k in steps]
                lines.append(
                    f"| {arms_lib.ARM_LABELS[arm]} | {arms_lib.sampler_label(sampler)}"
                    f" | " + " | ".join(cells) + " |"
                )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------------


# Line styles of the quality figure, one per sampler of the study (in --samplers order).
SAMPLER_LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
SAMPLER_MARKERS = ("o", "s", "^", "v", "D", "x")
_STYLE_NAMES = ("solid", "dashed", "dotted", "dash-dot", "dash-dot-dot", "sparse dots")


def sampler_styles(kinds: Sequence[str]) -> Dict[str, Tuple]:
    """{kind: (line style, marker, style name)}, distinct for up to every sampler kind."""
    return {
        kind: (
            SAMPLER_LINE_STYLES[i % len(SAMPLER_LINE_STYLES)],
            SAMPLER_MARKERS[i % len(SAMPLER_MARKERS)],
            _STYLE_NAMES[i % len(_STYLE_NAMES)],
        )
        for i, kind in enumerate(kinds)
    }


def _sampler_legend(kind: str) -> str:
    return {"ancestral": "strided ancestral", "ddim": "DDIM (eta=0)"}.get(kind, kind)


def write_figures(
    results: Dict, study_dir: str, *, sample_grids: Dict[str, Tuple[str, int, str]]
) -> Dict[str, str]:
    """bpd per arm, training curves, quality vs network calls and one sample grid per arm (PNGs).

    Args:
      results: the study's results (``summary``, ``runs``, ``study``).
      study_dir: the figures go to its ``figures/``.
      sample_grids: {arm: (sampler kind, network calls, path of a uint8 [N, H, W, C] .npy)}: the
        samples to show for each arm; a missing file is skipped.

    Returns:
      {figure: path relative to ``study_dir``}.
    """
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

    figures_dir = os.path.join(study_dir, FIGURES_SUBDIR)
    os.makedirs(figures_dir, exist_ok=True)
    summary, runs = results["summary"], results["runs"]
    arms = list(summary)
    colors = {arm: pyplot.get_cmap("tab10")(i) for i, arm in enumerate(arms_lib.ARMS)}
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
    axes.set_xticklabels([arms_lib.ARM_LABELS[a].replace(", ", "\n", 1) for a in arms], fontsize=7)
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
                            label=arms_lib.ARM_LABELS[arm] if run["seed"] == 0 else None,
                        )
            axes.set_yscale("log")
            axes.set_title(f"{name}_q{q}", fontsize=9)
            if row == 1:
                axes.set_xlabel("training step")
    grid[0][0].legend(fontsize=6)
    figure.suptitle("Training loss and L_vlb per quartile of t (TensorBoard loss_q*, vb_q*)")
    figure.tight_layout()
    out["curves"] = _save(figure, figures_dir, "training_curves.png", pyplot)

    # Quality vs network calls: a color per arm, a line style per sampler.
    kinds = study_samplers(results)
    styles = sampler_styles(kinds)
    figure, grid = pyplot.subplots(1, 3, figsize=(13, 4.3), dpi=90)
    for axes, metric in zip(grid, ("fd", "precision", "recall")):
        for arm in arms:
            for sampler in kinds:
                style, marker, _ = styles[sampler]
                rows = [r for r in summary[arm]["quality"] if r["sampler"] == sampler]
                axes.errorbar(
                    [r["steps"] for r in rows],
                    [r[metric]["mean"] for r in rows],
                    yerr=[r[metric]["std"] for r in rows],
                    color=colors[arm],
                    linestyle=style,
                    marker=marker,
                    markersize=3,
                    capsize=2,
                )
        axes.set_xscale("log")
        axes.set_xlabel("network calls (NFE)")
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
    # Two legends: the arms' colors, the samplers' line styles.
    from matplotlib import lines as mlines  # pylint: disable=g-import-not-at-top

    grid[0].legend(
        handles=[
            mlines.Line2D([], [], color=colors[arm], label=arms_lib.ARM_LABELS[arm]) for arm in arms
        ],
        fontsize=6,
        title="arm",
        title_fontsize=7,
    )
    grid[1].legend(
        handles=[
            mlines.Line2D(
                [],
                [],
                color="black",
                linestyle=styles[kind][0],
                marker=styles[kind][1],
                markersize=3,
                label=_sampler_legend(kind),
            )
            for kind in kinds
        ],
        fontsize=6,
        handlelength=4,
        title="sampler",
        title_fontsize=7,
    )
    described = ", ".join(f"{styles[kind][2]} = {_sampler_legend(kind)}" for kind in kinds)
    title = f"Sample quality vs network calls per image: {described}"
    figure.suptitle(title, fontsize=10 if len(kinds) <= 3 else 8)
    figure.tight_layout()
    out["quality"] = _save(figure, figures_dir, "quality_vs_steps.png", pyplot, description=title)

    # Sample grids.
    for arm, (kind, steps, path) in sample_grids.items():
        if os.path.exists(path):
            # Strided ancestral's grids keep the name they had before the other samplers.
            tag = "" if kind == "ancestral" else f"{kind}_"
            name = f"samples_{arm}_{tag}{steps}steps.png"
            image_utils.save_image_grid(np.load(path), os.path.join(figures_dir, name), padding=1)
            out[f"samples_{arm}"] = os.path.join(FIGURES_SUBDIR, name)
    return out


def _save(figure, directory: str, name: str, pyplot, description: str = "") -> str:
    """Writes ``figure`` as a PNG (with ``description`` as its Description text chunk)."""
    metadata = {"Description": description} if description else None
    fileio.atomic_write(
        os.path.join(directory, name),
        lambda f: figure.savefig(f, format="png", metadata=metadata),
    )
    pyplot.close(figure)
    return os.path.join(FIGURES_SUBDIR, name)
