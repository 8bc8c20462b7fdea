"""run.py --mode=eval: exact negative log-likelihood in bits/dim over a dataset split (Eq. 4).

Every example of the split is evaluated exactly once (the eval pipeline pads the last batch and
masks the padding), spread over the strategy's replicas; means are sums over examples divided by
the number of real examples, so they are exact whatever the replica count.  The noise of example i
comes from the per-image seed ``config.seed + i`` (:mod:`tf_iddpm.chains`), so the result does not
depend on the batch size or replica count either.  The loop itself is
:func:`tf_iddpm.inference.bits_per_dim`.
"""

import json
import os
from typing import Dict, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from tf_iddpm import data as data_lib
from tf_iddpm import data_sources
from tf_iddpm import fileio
from tf_iddpm import inference

EVAL_SUBDIR = "eval"


def evaluate(
    config, workdir: str, strategy=None, checkpoint: Optional[str] = None
) -> Dict[str, float]:
    """Evaluates bits/dim on config.data.eval_split; writes <workdir>/eval/{summary.json,*_terms.npz}.

    The files are written atomically (:mod:`tf_iddpm.fileio`).  ``checkpoint``: a checkpoint
    prefix to evaluate instead of the workdir's newest (``run.py --checkpoint``).

    Returns:
      The summary dict (bpd, prior_bpd, num_images, ...).
    """
    strategy = strategy or tf.distribute.get_strategy()
    num_examples = int(config.eval.num_samples)
    data_sources.validate_data_config(config.data)
    model = inference.InferenceModel.restore(
        config, workdir, use_ema=config.eval.use_ema, checkpoint=checkpoint, strategy=strategy
    )
    global_batch = int(config.eval.batch_size)
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: data_lib.make_eval_dataset(
            config.data,
            batch_size=ctx.get_per_replica_batch_size(global_batch),
            num_examples=num_examples,
            input_context=ctx,
        )
    )
    split_size = data_sources.dataset_num_examples(config.data, config.data.eval_split)
    size = min(split_size, num_examples) if num_examples else split_size
    logging.info(
        "evaluating %s on %s/%s (%d images)",
        model.loaded,
        config.data.name,
        config.data.eval_split,
        size,
    )
    try:
        totals = inference.bits_per_dim(
            model,
            dataset,
            respacing=config.eval.timestep_respacing,
            clip_denoised=config.eval.clip_denoised,
            seed=config.seed,
            strategy=strategy,
            num_batches=-(-size // global_batch),
        )
    except ValueError as e:
        raise ValueError(
            f"the eval split {config.data.eval_split!r} of {config.data.name!r} is empty"
        ) from e

    count = float(totals["count"])
    summary = {
        "bpd": float(totals["total_bpd"] / count),
        "prior_bpd": float(totals["prior_bpd"] / count),
        "num_images": int(count),
        "num_steps": int(totals["num_steps"]),
        "timestep_respacing": config.eval.timestep_respacing,
        "clip_denoised": bool(config.eval.clip_denoised),
        "cdf": config.diffusion.cdf,
        "weights": str(model.loaded),
        "dataset": f"{config.data.name}/{config.data.eval_split}",
    }
    out_dir = os.path.join(workdir, EVAL_SUBDIR)
    for name in ("vb", "mse", "xstart_mse"):
        # The reference's image_nll.py layout: arr_0 = the per-step term averaged over images,
        # column k belonging to t = K-1-k.
        terms = totals[name] / count
        fileio.atomic_write(
            os.path.join(out_dir, f"{name}_terms.npz"),
            lambda file, terms=terms: np.savez(file, terms),
        )
    summary_path = fileio.atomic_write_text(
        os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2)
    )
    logging.info(
        "bpd %.4f over %d images; written to %s", summary["bpd"], summary["num_images"], out_dir
    )
    print(f"bits/dim: {summary['bpd']:.4f} over {summary['num_images']} images -> {summary_path}")
    return summary
