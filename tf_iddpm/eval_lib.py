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
from tf_iddpm import data_sources
from tf_iddpm import factory
from tf_iddpm import fileio
from tf_iddpm import sampling

EVAL_SUBDIR = "eval"


class BpdEvaluator:
    """Sums of calc_bpd_loop's outputs over masked batches, one replica step at a time.

    :meth:`replica_sums` evaluates a batch's whole chain in one call; :meth:`replica_chunk` and
    :meth:`replica_chunk_sums` split it into a few calls (sampling.chunk_bounds) for progress
    reports, with bit-identical sums.
    """

    def __init__(
        self, net, diffusion, *, seed=0, clip_denoised=True, class_cond=False, super_res=False
    ):
        self.net = net
        self.diffusion = diffusion
        self.seed = int(seed)
        self.clip_denoised = clip_denoised
        self.class_cond = class_cond
        self.super_res = super_res

    def _bpd(self, batch, steps=None):
        kwargs = {}
        if self.class_cond:
            kwargs["y"] = batch["label"]
        if self.super_res:
            kwargs["low_res"] = batch["low_res"]
        seeds = tf.cast(batch["index"], tf.int64) + self.seed
        return sampling.calc_bpd_loop(
            self.diffusion,
            lambda x, t, **kw: self.net(x, t, training=False, **kw),
            batch["image"],
            clip_denoised=self.clip_denoised,
            model_kwargs=kwargs,
            seeds=seeds,
            steps=steps,
        )

    def replica_sums(self, batch):
        """Per-replica sums over the real (unmasked) examples of one batch."""
        return self._sums(batch, self._bpd(batch))

    def replica_chunk(self, batch, begin, end):
        """Loop steps begin..end-1 of one batch: their vb, xstart_mse, mse columns."""
        return self._bpd(batch, steps=(begin, end))

    def replica_chunk_sums(self, batch, chunks):
        """replica_sums from the batch's chunks (replica_chunk over the whole chain, in order)."""
        return self._sums(batch, sampling.bpd_from_chunks(self.diffusion, batch["image"], chunks))

    @staticmethod
    def _sums(batch, out):
        mask = tf.cast(batch["mask"], tf.float32)
        return {
            "count": tf.reduce_sum(mask),
            "total_bpd": tf.reduce_sum(out["total_bpd"] * mask),
            "prior_bpd": tf.reduce_sum(out["prior_bpd"] * mask),
            "vb": tf.reduce_sum(out["vb"] * mask[:, None], axis=0),
            "mse": tf.reduce_sum(out["mse"] * mask[:, None], axis=0),
            "xstart_mse": tf.reduce_sum(out["xstart_mse"] * mask[:, None], axis=0),
        }


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
    if num_examples < 0:
        raise ValueError(f"eval.num_samples must be >= 0 (0 = the whole split), got {num_examples}")
    data_sources.validate_data_config(config.data)
    diffusion = factory.create_diffusion_from_config(
        config, timestep_respacing=config.eval.timestep_respacing
    )
    with strategy.scope():
        net = factory.create_model_from_config(config)
    loaded = checkpoints.restore_inference_weights(
        net,
        workdir,
        use_ema=config.eval.use_ema,
        ema_rates=config_utils.ema_rates(config),
        checkpoint_path=checkpoint,
    )
    evaluator = BpdEvaluator(
        net,
        diffusion,
        seed=config.seed,
        clip_denoised=config.eval.clip_denoised,
        class_cond=config.data.class_cond,
        super_res=config.data.low_res_size > 0,
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

    # Each batch's chain runs as a few graph calls (chunks of steps), so progress moves along the
    # chain; the sums equal the one-call evaluator.replica_sums bit for bit.
    @tf.function
    def eval_chunk(batch, begin, end):
        return strategy.run(evaluator.replica_chunk, args=(batch, begin, end))

    @tf.function
    def eval_sums(batch, chunks):
        per_replica = strategy.run(evaluator.replica_chunk_sums, args=(batch, chunks))
        return {
            k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in per_replica.items()
        }

    logging.info(
        "evaluating %s on %s/%s with %d steps per image",
        loaded,
        config.data.name,
        config.data.eval_split,
        diffusion.num_timesteps,
    )
    bounds = [
        (tf.constant(b, tf.int32), tf.constant(e, tf.int32))
        for b, e in sampling.chunk_bounds(diffusion.num_timesteps)
    ]
    split_size = data_sources.dataset_num_examples(config.data, config.data.eval_split)
    num_batches = -(
        -(min(split_size, num_examples) if num_examples else split_size) // global_batch
    )
    totals = None
    progress = tqdm.tqdm(total=num_batches * diffusion.num_timesteps, desc="bpd", unit="step")
    for batch in dataset:
        chunks = []
        for begin, end in bounds:
            chunks.append(eval_chunk(batch, begin, end))
            progress.update(int(end - begin))
        sums = {k: v.numpy() for k, v in eval_sums(batch, chunks).items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        progress.set_postfix(
            bpd=f"{totals['total_bpd'] / max(totals['count'], 1):.4f}", n=int(totals["count"])
        )
    progress.close()
    if totals is None or totals["count"] == 0:
        raise ValueError(
            f"the eval split {config.data.eval_split!r} of {config.data.name!r} is empty"
        )

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
