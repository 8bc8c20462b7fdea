"""Inference with a trained network: its weights, its model function, samplers, draws, bits/dim.

Every path that runs a trained model goes through this module, so each of these exists once:

* :meth:`InferenceModel.restore` builds the config's network and loads a workdir's (or a given
  checkpoint's) weights for inference — EMA or raw, the damaged- and missing-checkpoint errors of
  :mod:`tf_iddpm.checkpoints`;
* :func:`model_function`: ``net(x, t, training=False, ...)``, the network as the diffusion code
  calls it;
* :meth:`InferenceModel.sampler` turns a :class:`tf_iddpm.samplers.SamplerSpec` into a
  :class:`Sampler` (the chain of :mod:`tf_iddpm.chains`, compiled once per shape);
* :func:`draw_images` draws N images in batches with a progress bar, image i from seed i and its
  label (:func:`sample_labels`);
* :func:`bits_per_dim` runs the variational bound over a dataset under a ``tf.distribute``
  strategy, each batch's chain in a few graph calls for progress.

``run.py --mode=sample|eval|fid``, the training-time sample grids and FID, the SavedModel export,
the ablation study and the benchmark are all built from these.  This module reads no dataset and
imports no training code: callers hand it their (distributed) dataset.
"""

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import tensorflow as tf
import tqdm

from tf_iddpm import chains
from tf_iddpm import checkpoints
from tf_iddpm import config_utils
from tf_iddpm import factory
from tf_iddpm import image_utils
from tf_iddpm import samplers


def model_function(net) -> Callable:
    """The network as the diffusion code calls it: ``model_fn(x, t, **kwargs)`` in inference mode
    (no dropout).  A plain function, so a ``tf.Module`` holding it does not track the network."""
    return lambda x, t, **kwargs: net(x, t, training=False, **kwargs)


def guided_model_function(model_fn, guidance_scale, null_label: int, channels: int) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022) as a model function.

    One network call on the batch twice over, [x; x] with labels [y; null], gives the conditional
    and the unconditional outputs; the prediction (eps, or x_0 / x_{t-1} for models that predict
    those: the first ``channels`` channels) becomes ``uncond + s (cond - uncond)``.  A learned
    variance half is the conditional branch's, as in GLIDE: the ancestral sampler uses it, the
    others ignore it.  s = 1 gives the conditional prediction again, at twice the cost; callers
    use ``model_fn`` itself then.

    Args:
      model_fn: the network, ``model_fn(x, t, y=labels, **kwargs)``.
      guidance_scale: s, a float or a float32 [N] tensor (one per image).
      null_label: the label of the unconditional prediction (:func:`tf_iddpm.factory.null_label`).
      channels: the image channels C (the prediction's channels in the output).
    """

    def guided(x, t, y, **kwargs):
        doubled = {k: tf.concat([v, v], 0) for k, v in kwargs.items()}
        labels = tf.concat([y, tf.fill(tf.shape(y), tf.cast(null_label, y.dtype))], 0)
        both = model_fn(tf.concat([x, x], 0), tf.concat([t, t], 0), y=labels, **doubled)
        conditional, unconditional = tf.split(tf.cast(both, tf.float32), 2, axis=0)
        scale = tf.reshape(tf.cast(guidance_scale, tf.float32), [-1, 1, 1, 1])
        prediction = unconditional[..., :channels] + scale * (
            conditional[..., :channels] - unconditional[..., :channels]
        )
        return tf.concat([prediction, conditional[..., channels:]], -1)

    return guided


def image_shape(config) -> list:
    """[H, W, C] of the config's images."""
    size = int(config.data.image_size)
    return [size, size, int(config.data.num_channels)]


def sample_labels(config, seeds: np.ndarray) -> Optional[np.ndarray]:
    """Class labels of the images of ``seeds`` for class-conditional models, else None.

    ``sample.class_label`` >= 0 gives every image that label; -1 draws each image's label from its
    own seed, so labels, like images, do not depend on how seeds are batched.
    """
    if not config.data.class_cond:
        return None
    num_classes = int(config.data.num_classes)
    label = int(config.sample.class_label)
    if label >= 0:
        if label >= num_classes:
            raise ValueError(
                f"class_label {label} out of range; allowed: 0..{num_classes - 1} (or -1 for random)"
            )
        return np.full(len(seeds), label, np.int32)
    return np.asarray(
        [np.random.default_rng(int(s)).integers(num_classes) for s in seeds], np.int32
    )


class Sampler:
    """A model function plus a chain (one sampler on one process), compiled once per shape.

    ``sampler(seeds, labels)`` runs the whole chain as one graph call; :meth:`sample_in_chunks`
    runs it as a few graph calls of consecutive steps (:func:`tf_iddpm.chains.chunk_bounds`) and
    reports each, for progress bars.  Both give bit-identical images.  Image n depends only on
    seeds[n] (and labels[n]), see :mod:`tf_iddpm.chains`.
    """

    def __init__(self, model_fn, chain, *, image_shape: Sequence[int], class_cond: bool = False):
        self.model_fn = model_fn
        self.chain = chain
        self.image_shape = list(image_shape)
        self.class_cond = class_cond
        seeds_spec = tf.TensorSpec([None], tf.int64)
        labels_spec = tf.TensorSpec([None], tf.int32)
        # [None] batch dims: a last, smaller batch reuses the same graph.
        self.sample_batch = tf.function(self._sample, input_signature=[seeds_spec, labels_spec])
        self.initial_state = tf.function(
            lambda seeds: chain.initial_state(chains.seeded_normal(seeds, 0, self.image_shape)),
            input_signature=[seeds_spec],
        )
        self.sample_steps = tf.function(
            self._sample,
            input_signature=[
                seeds_spec,
                labels_spec,
                chain.state_spec(self.image_shape),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ],
        )

    @property
    def num_steps(self) -> int:
        """Steps of the chain: network calls per image."""
        return int(self.chain.num_steps)

    def _sample(self, seeds, labels, state=None, begin=None, end=None):
        return chains.sample_loop(
            self.chain,
            self.model_fn,
            tf.concat([tf.shape(seeds), self.image_shape], 0),
            seeds=seeds,
            state=state,
            model_kwargs={"y": labels} if self.class_cond else {},
            steps=None if begin is None else (begin, end),
        )

    @staticmethod
    def _inputs(seeds, labels):
        seeds = tf.convert_to_tensor(seeds, tf.int64)
        labels = (
            tf.zeros_like(seeds, tf.int32)
            if labels is None
            else tf.convert_to_tensor(labels, tf.int32)
        )
        return seeds, labels

    def __call__(self, seeds, labels=None):
        return self.sample_batch(*self._inputs(seeds, labels))

    def sample_in_chunks(
        self, seeds, labels=None, on_chunk: Optional[Callable[[int], None]] = None
    ):
        """As ``sampler(seeds, labels)``, run as a few graph calls; on_chunk(steps run) after each."""
        seeds, labels = self._inputs(seeds, labels)
        state = self.initial_state(seeds)
        for begin, end in chains.chunk_bounds(self.num_steps):
            state = self.sample_steps(seeds, labels, state, begin, end)
            if on_chunk is not None:
                on_chunk(end - begin)
        return self.chain.result(state)


def build_sampler(model_fn, config, spec: samplers.SamplerSpec) -> Sampler:
    """The :class:`Sampler` of ``spec`` for a network of ``config`` (its process and image shape),
    guided (:func:`guided_model_function`) when ``spec.guidance_scale`` is not 1.

    Raises:
      ValueError: if ``spec`` is invalid for the config's process (see SamplerSpec.errors), or
        asks for guidance the network cannot give (see samplers.guidance_error).
    """
    diffusion = factory.create_diffusion_from_config(config, timestep_respacing="")
    spec.check(diffusion.num_timesteps, betas=diffusion.betas)
    null_label = factory.null_label(config)
    guidance = samplers.guidance_error(
        spec, class_cond=bool(config.data.class_cond), has_null_label=null_label is not None
    )
    if guidance:
        raise ValueError(guidance)
    if spec.guidance_scale != 1.0:
        model_fn = guided_model_function(
            model_fn, spec.guidance_scale, null_label, int(config.data.num_channels)
        )
    chain = chains.make_chain(
        spec.kind,
        diffusion,
        steps=spec.steps,
        eta=spec.eta,
        clip_denoised=spec.clip_denoised,
        grid=spec.grid,
        order=spec.order,
    )
    return Sampler(
        model_fn, chain, image_shape=image_shape(config), class_cond=bool(config.data.class_cond)
    )


def draw_images(
    sampler: Sampler,
    seeds: np.ndarray,
    labels: Optional[np.ndarray],
    batch_size: int,
    desc: str = "sampling",
) -> np.ndarray:
    """uint8 [N, H, W, C] images, image i from ``seeds[i]`` (and ``labels[i]``), in batches.

    The progress bar counts chain steps over all batches, updated a few dozen times per chain.
    """
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    seeds = np.asarray(seeds, np.int64)
    starts = range(0, len(seeds), int(batch_size))
    images = []
    with tqdm.tqdm(total=len(starts) * sampler.num_steps, desc=desc, unit="step") as progress:
        for start in starts:
            end = start + int(batch_size)
            batch = sampler.sample_in_chunks(
                seeds[start:end],
                None if labels is None else labels[start:end],
                on_chunk=progress.update,
            )
            images.append(image_utils.denormalize_images(batch).numpy())
    return np.concatenate(images)


@dataclasses.dataclass
class InferenceModel:
    """A network of ``config`` ready for inference, with the samplers built on it.

    Samplers are cached per spec, so a model whose weights are reloaded (:meth:`load`, e.g. the
    seeds of one ablation arm) reuses its compiled loops.

    Attributes:
      net: the built Keras network.
      config: the experiment config it belongs to.
      loaded: which weights were loaded (None for a network passed in as it is).
    """

    net: object
    config: object
    loaded: Optional[checkpoints.LoadedWeights] = None

    def __post_init__(self):
        self.model_fn = model_function(self.net)
        self._samplers: Dict[samplers.SamplerSpec, Sampler] = {}

    @classmethod
    def restore(
        cls,
        config,
        workdir: str,
        *,
        use_ema: bool,
        checkpoint: Optional[str] = None,
        strategy: Optional[tf.distribute.Strategy] = None,
    ) -> "InferenceModel":
        """Builds the config's network (in ``strategy``'s scope) and loads the weights to infer with.

        Args:
          config: the experiment config.
          workdir: a training workdir or a converted reference checkpoint.
          use_ema: the EMA weights of the slowest rate (falling back to the raw weights, with a
            warning, when the checkpoint has none: a converted checkpoint).
          checkpoint: a checkpoint prefix instead of the workdir's newest.
          strategy: the strategy whose replicas evaluate the model (default: none).

        Raises:
          CheckpointNotFoundError / DamagedCheckpointError: see :mod:`tf_iddpm.checkpoints`.
          ValueError: if the checkpoint's weights do not fit the config's network.
        """
        path = checkpoints.inference_checkpoint(workdir, checkpoint)  # before building the net
        if strategy is not None:
            with strategy.scope():
                net = factory.create_model_from_config(config)
        else:
            net = factory.create_model_from_config(config)
        model = cls(net, config)
        model.load(path, use_ema=use_ema, checked=True)
        return model

    def load(self, path: str, *, use_ema: bool, checked: bool = False) -> checkpoints.LoadedWeights:
        """Loads weights into this model's network.

        Args:
          path: a workdir (its newest checkpoint) or, with ``checked``, a checkpoint prefix that
            :func:`tf_iddpm.checkpoints.inference_checkpoint` returned.
          use_ema: the EMA weights of the slowest rate (see :meth:`restore`).
          checked: ``path`` is an already checked checkpoint prefix.
        """
        if not checked:
            path = checkpoints.inference_checkpoint(path)
        try:
            self.loaded = checkpoints.load_inference_weights(
                self.net, path, use_ema=use_ema, ema_rates=config_utils.ema_rates(self.config)
            )
        except AssertionError as e:
            raise ValueError(
                f"the checkpoint {path} does not fit the network of the config: {e}"
            ) from e
        return self.loaded

    @property
    def image_shape(self) -> list:
        return image_shape(self.config)

    def sampler(self, spec: samplers.SamplerSpec) -> Sampler:
        """The compiled sampler of ``spec`` on this network (built once per spec)."""
        if spec not in self._samplers:
            self._samplers[spec] = build_sampler(self.model_fn, self.config, spec)
        return self._samplers[spec]

    def draw(
        self,
        spec: samplers.SamplerSpec,
        seeds: np.ndarray,
        *,
        labels: Optional[np.ndarray] = None,
        batch_size: int,
        desc: str = "sampling",
    ) -> np.ndarray:
        """:func:`draw_images` with the sampler of ``spec``."""
        return draw_images(self.sampler(spec), seeds, labels, batch_size, desc=desc)

    def draw_configured(
        self, spec: samplers.SamplerSpec, num_samples: int, *, seed: int, desc: str = "sampling"
    ) -> Dict[str, Optional[np.ndarray]]:
        """``num_samples`` images as ``run.py --mode=sample`` draws them: image i from seed
        ``seed + i`` with its :func:`sample_labels` label, in batches of ``sample.batch_size``.

        Returns:
          {"images": uint8 [N, H, W, C], "labels": int32 [N] or None}.
        """
        seeds = np.arange(int(num_samples), dtype=np.int64) + int(seed)
        labels = sample_labels(self.config, seeds)
        images = self.draw(
            spec, seeds, labels=labels, batch_size=int(self.config.sample.batch_size), desc=desc
        )
        return {"images": images, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Bits/dim.
# ---------------------------------------------------------------------------------------------


class BpdEvaluator:
    """Sums of calc_bpd_loop's outputs over masked batches, one replica step at a time.

    A batch is a dict with ``image`` [N, H, W, C] in [-1, 1], ``index`` (the example's position
    in the split: its noise comes from seed ``seed + index``), ``mask`` (False for padding) and,
    for conditional models, ``label`` / ``low_res``.  :meth:`replica_sums` evaluates a batch's
    whole chain in one call; :meth:`replica_chunk` and :meth:`replica_chunk_sums` split it into a
    few calls (chains.chunk_bounds) for progress reports, with bit-identical sums.
    """

    def __init__(
        self, model_fn, diffusion, *, seed=0, clip_denoised=True, class_cond=False, super_res=False
    ):
        self.model_fn = model_fn
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
        return chains.calc_bpd_loop(
            self.diffusion,
            self.model_fn,
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
        return self._sums(batch, chains.bpd_from_chunks(self.diffusion, batch["image"], chunks))

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


def bits_per_dim(
    model: InferenceModel,
    dataset,
    *,
    respacing: str = "",
    clip_denoised: bool = True,
    seed: int = 0,
    strategy: Optional[tf.distribute.Strategy] = None,
    num_batches: Optional[int] = None,
    desc: str = "bpd",
) -> Dict[str, np.ndarray]:
    """The variational bound (Eq. 4) of every real example of ``dataset``, summed.

    Each batch's chain runs as a few graph calls (chunks of steps) so that the progress bar moves
    along the chain; the sums equal the one-call loop's bit for bit.  Sums over examples (not
    means) make the result exact whatever the replica count.

    Args:
      model: the network to evaluate.
      dataset: batches as :class:`BpdEvaluator` reads them; a distributed dataset of
        ``strategy`` when one is given.
      respacing: the chain ("" = all T steps, "100" = 100 evenly strided steps).
      clip_denoised: clip predicted x_0 when forming p's mean.
      seed: example i's noise comes from the per-image seed ``seed + i``.
      strategy: the ``tf.distribute`` strategy ``dataset`` is distributed over (default: none).
      num_batches: for the progress bar's total, when known.
      desc: the progress bar's label.

    Returns:
      {"count": examples, "total_bpd", "prior_bpd": sums over examples; "vb", "mse",
      "xstart_mse": [K] sums per chain step, column k for t = K-1-k; "num_steps": K}, numpy.

    Raises:
      ValueError: if the dataset holds no example.
    """
    strategy = strategy or tf.distribute.get_strategy()
    diffusion = factory.create_diffusion_from_config(model.config, timestep_respacing=respacing)
    data = model.config.data
    evaluator = BpdEvaluator(
        model.model_fn,
        diffusion,
        seed=seed,
        clip_denoised=clip_denoised,
        class_cond=bool(data.class_cond),
        super_res=data.low_res_size > 0,
    )

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

    num_steps = int(diffusion.num_timesteps)
    bounds = [
        (tf.constant(b, tf.int32), tf.constant(e, tf.int32))
        for b, e in chains.chunk_bounds(num_steps)
    ]
    totals = None
    total_steps = None if num_batches is None else num_batches * num_steps
    with tqdm.tqdm(total=total_steps, desc=desc, unit="step") as progress:
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
    if totals is None or totals["count"] == 0:
        raise ValueError("the dataset to evaluate holds no example")
    totals["num_steps"] = num_steps
    return totals
