"""run.py --mode=eval: exact negative log-likelihood in bits/dim over a dataset split (Eq. 4).

Every example of the split is evaluated exactly once (the eval pipeline pads the last batch and
masks the padding), spread over the strategy's replicas; means are sums over examples divided by
the number of real examples, so they are exact whatever the replica count.  The noise of example i
comes from the per-image seed ``config.seed + i`` (tf_iddpm.sampling), so the result does not
depend on the batch size or replica count either.
"""

import json
import os
from typing import Dict, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

from tf_iddpm import checkpoints
from tf_iddpm import config_utils
from tf_iddpm import data as data_lib
from tf_iddpm import factory
from tf_iddpm import fileio
from tf_iddpm import sampling

EVAL_SUBDIR = "eval"


class BpdEvaluator:
    """Sums of calc_bpd_loop's outputs over masked batches, one replica step at a time."""

    def __init__(self, net, diffusion, *, seed=0, clip_denoised=True, class_cond=False, super_res=False):
        self.net = net
        self.diffusion = diffusion
        self.seed = int(seed)
        self.clip_denoised = clip_denoised
        self.class_cond = class_cond
        self.super_res = super_res

    def replica_sums(self, batch):
        """Per-replica sums over the real (unmasked) examples of one batch."""
        kwargs = {}
        if self.class_cond:
            kwargs["y"] = batch["label"]
        if self.super_res:
            kwargs["low_res"] = batch["low_res"]
        seeds = tf.cast(batch["index"], tf.int64) + self.seed
        out = sampling.calc_bpd_loop(self.diffusion, lambda x, t, **kw: self.net(x, t, training=False, **kw),
                                     batch["image"], clip_denoised=self.clip_denoised, model_kwargs=kwargs,
                                     seeds=seeds)
        mask = tf.cast(batch["mask"], tf.float32)
        return {
            "count": tf.reduce_sum(mask),
            "total_bpd": tf.reduce_sum(out["total_bpd"] * mask),
            "prior_bpd": tf.reduce_sum(out["prior_bpd"] * mask),
            "vb": tf.reduce_sum(out["vb"] * mask[:, None], axis=0),
            "mse": tf.reduce_sum(out["mse"] * mask[:, None], axis=0),
            "xstart_mse": tf.reduce_sum(out["xstart_mse"] * mask[:, None], axis=0),
        }


def evaluate(config, workdir: str, strategy=None, checkpoint: Optional[str] = None) -> Dict[str, float]:
    """Evaluates bits/dim on config.data.eval_split; writes <workdir>/eval/{summary.json,*_terms.npz}.

    The files are written atomically (:mod:`tf_iddpm.fileio`).  ``checkpoint``: a checkpoint
    prefix to evaluate instead of the workdir's newest (``run.py --checkpoint``).

    Returns:
      The summary dict (bpd, prior_bpd, num_images, ...).
    """
    strategy = strategy or tf.distribute.get_strategy()
    num_examples = int(config.eval.num_samples)
    if num_examples < 0:
        raise ValueError(f"eval.num_samples must be >= 0 (0 = the whole split), got {num_examples}")
    data_lib.validate_data_config(config.data)
    diffusion = factory.create_diffusion_from_config(config, timestep_respacing=config.eval.timestep_respacing)
    with strategy.scope():
        net = factory.create_model_from_config(config)
    loaded = checkpoints.restore_inference_weights(net, workdir, use_ema=config.eval.use_ema,
                                                   ema_rates=config_utils.ema_rates(config),
                                                   checkpoint_path=checkpoint)
    evaluator = BpdEvaluator(net, diffusion, seed=config.seed, clip_denoised=config.eval.clip_denoised,
                             class_cond=config.data.class_cond, super_res=config.data.low_res_size > 0)
    global_batch = int(config.eval.batch_size)
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: data_lib.make_eval_dataset(
            config.data, batch_size=ctx.get_per_replica_batch_size(global_batch),
            num_examples=num_examples, input_context=ctx))

    @tf.function
    def eval_step(batch):
        per_replica = strategy.run(evaluator.replica_sums, args=(batch,))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

    logging.info("evaluating %s on %s/%s with %d steps per image", loaded, config.data.name,
                 config.data.eval_split, diffusion.num_timesteps)
    totals = None
    progress = tqdm.tqdm(dataset, desc="bpd", unit="batch")
    for batch in progress:
        sums = {k: v.numpy() for k, v in eval_step(batch).items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        progress.set_postfix(bpd=f"{totals['total_bpd'] / max(totals['count'], 1):.4f}", n=int(totals["count"]))
    if totals is None or totals["count"] == 0:
        raise ValueError(f"the eval split {config.data.eval_split!r} of {config.data.name!r} is empty")

    count = float(totals["count"])
    summary = {
        "bpd": float(totals["total_bpd"] / count),
        "prior_bpd": float(totals["prior_bpd"] / count),
        "num_images": int(count),
        "num_steps": int(diffusion.num_timesteps),
        "timestep_respacing": config.eval.timestep_respacing,
        "clip_denoised": bool(config.eval.clip_denoised),
        "cdf": config.diffusion.cdf,
        "weights": str(loaded),
        "dataset": f"{config.data.name}/{config.data.eval_split}",
    }
    out_dir = os.path.join(workdir, EVAL_SUBDIR)
    for name in ("vb", "mse", "xstart_mse"):
        # The reference's image_nll.py layout: arr_0 = the per-step term averaged over images,
        # column k belonging to t = K-1-k.
        terms = totals[name] / count
        fileio.atomic_write(os.path.join(out_dir, f"{name}_terms.npz"),
                            lambda file, terms=terms: np.savez(file, terms))
    summary_path = fileio.atomic_write_text(os.path.join(out_dir, "summary.json"),
                                            json.dumps(summary, indent=2))
    logging.info("bpd %.4f over %d images; written to %s", summary["bpd"], summary["num_images"], out_dir)
    print(f"bits/dim: {summary['bpd']:.4f} over {summary['num_images']} images -> {summary_path}")
    return summary
