"""Training: the paper's Algorithm 1 under any tf.distribute strategy, with EMA and checkpoints.

One custom loop serves every strategy (default, Mirrored, MultiWorkerMirrored, TPU): Keras 3's
``fit`` does not run under MultiWorkerMirroredStrategy, and one code path is easier to trust.
``Trainer.replica_step`` is the whole algorithm; the rest is bookkeeping.

Randomness is a pure function of ``config.seed``: the initial weights of (seed, weight name)
(:func:`tf_iddpm.unet_reference.initialize_weights`); the timesteps, noise and dropout masks of
(seed, step), drawn for the *global* batch identically on every replica from stateless seeds, each
replica taking its slice; the data order of (seed, step) (:func:`tf_iddpm.data.make_train_dataset`).
So a run's trajectory does not depend on how many replicas share the batch, nor on whether it was
interrupted and resumed.
"""

import os
import signal
import time
from typing import Dict, Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tf_iddpm import checkpoints
from tf_iddpm import config_utils
from tf_iddpm import data as data_lib
from tf_iddpm import data_sources
from tf_iddpm import distribute
from tf_iddpm import factory
from tf_iddpm import image_utils
from tf_iddpm import inference
from tf_iddpm import metrics
from tf_iddpm import optimizers
from tf_iddpm import samplers
from tf_iddpm import timestep_distribution
from tf_iddpm import unet_reference

TENSORBOARD_SUBDIR = "tensorboard"
NUM_QUARTILES = 4
# The per-example terms Trainer.replay_steps returns.
REPLAY_TERMS = ("loss", "mse", "vb")


def _salted_seed(seed, *salts):
    """A stateless RNG seed [2] derived from (seed, salts...)."""
    value = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5EED, tf.int64)])
    for salt in salts:
        value = tf.random.experimental.stateless_fold_in(value, tf.cast(salt, tf.int64))
    return value


def _ema_update(ema, value, decay_complement):
    """ema <- ema - (1 - rate) * (ema - value), in place (see Trainer.update_ema)."""
    value = tf.convert_to_tensor(value)
    if not hasattr(ema, "handle") or ema.dtype != tf.float32:
        return ema.assign_sub(decay_complement * (ema - value))
    return tf.raw_ops.ResourceApplyGradientDescent(
        var=ema.handle,
        alpha=tf.constant(decay_complement, tf.float32),
        delta=tf.convert_to_tensor(ema) - value,
        use_locking=False,
    )


class Trainer:
    """Owns the network, its EMAs, the optimizer, the timestep sampler and the step counter."""

    def __init__(self, config, strategy: tf.distribute.Strategy):
        self.config = config
        self.strategy = strategy
        self.num_replicas = strategy.num_replicas_in_sync
        config_utils.validate_config(config, mode="train", num_replicas=self.num_replicas)
        self.global_batch_size = int(config.train.batch_size)
        self.local_batch_size = self.global_batch_size // self.num_replicas
        self.seed = int(config.seed)
        self.ema_rates = config_utils.ema_rates(config)
        self.diffusion = factory.create_diffusion_from_config(config, timestep_respacing="")
        self.class_cond = bool(config.data.class_cond)
        self.class_dropout = float(config.model.class_dropout)
        self.null_label = factory.null_label(config)
        self.super_res = config.data.low_res_size > 0
        self.grad_clip = float(config.train.grad_clip)

        with strategy.scope():
            self.net = factory.create_model_from_config(config, name="unet")
            unet_reference.initialize_weights(self.net, self.seed)
            self.ema_nets = {}
            for rate in self.ema_rates:
                ema_net = factory.create_model_from_config(
                    config, name=checkpoints.ema_checkpoint_name(rate)
                )
                ema_net.set_weights(self.net.get_weights())
                ema_net.trainable = False
                self.ema_nets[rate] = ema_net
            self.optimizer = optimizers.create_adam(config.train.lr, config.train.weight_decay)
            self.optimizer.build(self.net.trainable_variables)
            self.timestep_distribution = timestep_distribution.create_timestep_distribution(
                config.train.schedule_sampler, self.diffusion.num_timesteps
            )
            self.step = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        self.loss_aware = not isinstance(
            self.timestep_distribution, timestep_distribution.UniformTimesteps
        )
        self.checkpoint = tf.train.Checkpoint(
            model=self.net,
            optimizer=self.optimizer,
            # The checkpoint key of the reference's name (train.schedule_sampler), so that
            # checkpoints of every version restore.
            schedule_sampler=self.timestep_distribution,
            step=self.step,
            **{checkpoints.ema_checkpoint_name(r): n for r, n in self.ema_nets.items()},
        )
        self._train_loop = tf.function(self._train_loop_fn)
        self._replay_step = None
        # XLA only around the model math: the optimizer update and cross-replica gathers stay out.
        self._losses_and_grads = tf.function(
            self._losses_and_grads_fn, jit_compile=bool(config.train.jit_compile)
        )

    # ------------------------------------------------------------------ Algorithm 1

    def model_kwargs(self, batch):
        kwargs = {}
        if self.class_cond:
            kwargs["y"] = self._dropped_labels(batch["label"])
        if self.super_res:
            kwargs["low_res"] = batch["low_res"]
        return kwargs

    def _dropped_labels(self, labels):
        """The labels with each replaced by the null label with probability model.class_dropout.

        Classifier-free guidance (Ho & Salimans 2022) trains one network both conditionally and
        unconditionally.  The draws are made for the global batch from (seed, step), each replica
        taking its slice, like every other draw of a step; without class dropout nothing is drawn.
        """
        if not self.class_dropout:
            return labels
        drops = tf.random.stateless_uniform(
            [self.global_batch_size], seed=_salted_seed(self.seed, self.step, 3)
        )
        dropped = self._replica_slice(drops) < self.class_dropout
        return tf.where(dropped, tf.cast(self.null_label, labels.dtype), labels)

    def _losses_and_grads_fn(self, x_start, t, weights, noise, dropout_rng, model_kwargs):
        def model_fn(x, timesteps, **kwargs):
            return self.net(x, timesteps, training=True, dropout_rng=dropout_rng, **kwargs)

        with tf.GradientTape() as tape:
            terms = self.diffusion.training_losses(
                model_fn, x_start, t, model_kwargs=model_kwargs, noise=noise
            )
            # Sum over this replica / global batch: the optimizer sums gradients over replicas.
            loss = tf.nn.compute_average_loss(
                terms["loss"] * weights, global_batch_size=self.global_batch_size
            )
        return terms, tape.gradient(loss, self.net.trainable_variables)

    def _replica_slice(self, global_value):
        """This replica's rows of a tensor drawn for the whole global batch."""
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        first = replica_id * self.local_batch_size
        return global_value[first : first + self.local_batch_size]

    def _dropout_rng(self):
        """[3] int64: a seed of (seed, step), then this replica's first global batch position.

        See unet_ops.positional_dropout: the masks are then those of the whole global batch drawn on
        one device, whatever the number of replicas.
        """
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        first_example = tf.cast(replica_id * self.local_batch_size, tf.int64)
        return tf.concat([_salted_seed(self.seed, self.step, 2), [first_example]], 0)

    def replica_step(self, batch):
        """One step of Algorithm 1 on this replica's slice of the global batch."""
        # t ~ p(t) (uniform or Section 3.3 importance sampling) and eps ~ N(0, I), both drawn for
        # the whole global batch with the same seed on every replica; each keeps its own slice.
        t_global, weights_global = self.timestep_distribution.sample(
            self.global_batch_size, _salted_seed(self.seed, self.step, 1)
        )
        noise_global = tf.random.stateless_normal(
            tf.concat([[self.global_batch_size], tf.shape(batch["image"])[1:]], 0),
            seed=_salted_seed(self.seed, self.step),
        )
        t, weights = self._replica_slice(t_global), self._replica_slice(weights_global)
        terms = self._update(batch, t, weights, self._replica_slice(noise_global))
        # Logged terms carry the importance weights (as the reference logs them), so that they
        # estimate the uniform-t objective whichever sampler draws t.
        return self._step_metrics({name: value * weights for name, value in terms.items()}, t)

    def _update(self, batch, t, weights, noise):
        """Losses, gradients, optimizer and sampler-history update for given t and noise."""
        terms, grads = self._losses_and_grads(
            batch["image"], t, weights, noise, self._dropout_rng(), self.model_kwargs(batch)
        )
        if self.grad_clip > 0:
            # Keras clips each replica's gradient before summing them; clip the true global one.
            context = tf.distribute.get_replica_context()
            grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            grads, _ = tf.clip_by_global_norm(grads, self.grad_clip)
            grads = [g / self.num_replicas for g in grads]
        self.optimizer.apply_gradients(zip(grads, self.net.trainable_variables))
        if self.loss_aware:
            self.timestep_distribution.update_with_local_losses(t, terms["loss"])
        return terms

    def _step_metrics(self, terms, t):
        """Sums (not means) so that replicas and steps add up exactly; means are taken at logging."""
        quartile = tf.minimum(t * NUM_QUARTILES // self.diffusion.num_timesteps, NUM_QUARTILES - 1)
        metrics = {
            "count": tf.cast(tf.shape(t)[0], tf.float32),
            "count_q": tf.math.unsorted_segment_sum(
                tf.ones_like(terms["loss"]), quartile, NUM_QUARTILES
            ),
        }
        for name, values in terms.items():
            metrics[name] = tf.reduce_sum(values)
            metrics[name + "_q"] = tf.math.unsorted_segment_sum(values, quartile, NUM_QUARTILES)
        return metrics

    def update_ema(self):
        """ema <- rate * ema + (1 - rate) * weights, on every device's copy (cross-replica context).

        Evaluated as ``ema -= (1 - rate) * (ema - weights)``: one subtraction and one in-place
        ResourceApplyGradientDescent per variable (two passes over the ~10 M parameters instead of
        four), and the small update is formed directly instead of as the difference of two
        products that each round at ema's scale.
        """
        with tf.name_scope("ema"):
            for rate, ema_net in self.ema_nets.items():
                for ema_variable, variable in zip(ema_net.weights, self.net.weights):
                    self.strategy.extended.update(
                        ema_variable.value,
                        _ema_update,
                        args=(variable.value, 1.0 - rate),
                        group=False,
                    )

    def _train_loop_fn(self, iterator, num_steps):
        totals = None
        for _ in tf.range(num_steps):
            per_replica = self.strategy.run(self.replica_step, args=(next(iterator),))
            metrics = {
                k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()
            }
            self.update_ema()
            self.step.assign_add(1)
            totals = metrics if totals is None else {k: totals[k] + metrics[k] for k in totals}
        return totals

    def train_steps(self, iterator, num_steps: int) -> Dict[str, np.ndarray]:
        """Runs num_steps steps in one graph call; returns the summed metrics (see _step_metrics)."""
        totals = self._train_loop(iterator, tf.constant(num_steps, tf.int64))
        return {k: v.numpy() for k, v in totals.items()}

    # ------------------------------------------------------------------ replay

    def _replay_step_fn(self, batch, t, noise):
        def replica_fn(batch, t, noise):
            local = tf.nest.map_structure(self._replica_slice, batch)
            terms = self._update(
                local,
                self._replica_slice(t),
                tf.ones([self.local_batch_size]),
                self._replica_slice(noise),
            )
            return {name: terms[name] for name in REPLAY_TERMS}

        per_replica = self.strategy.run(replica_fn, args=(batch, t, noise))
        self.update_ema()
        self.step.assign_add(1)
        return {name: self.strategy.gather(value, axis=0) for name, value in per_replica.items()}

    def replay_steps(self, images, t, noise, labels=None, low_res=None) -> Dict[str, np.ndarray]:
        """Runs K full training steps on given data, timesteps and noise (e.g. a recorded run).

        Each step is a training step as :meth:`train_steps` runs it (losses, gradients, optimizer,
        sampler history, EMA, step counter) under the trainer's strategy, with importance weights
        1 and the given global-batch ``t`` and ``noise`` in place of the seeded draws.  Dropout
        masks still come from (seed, step).

        Args:
          images: [K, B, H, W, C] float images in [-1, 1]; B = train.batch_size.
          t: [K, B] integer timesteps.
          noise: [K, B, H, W, C] float eps.
          labels: [K, B] int class labels (class-conditional models only).
          low_res: [K, B, h, w, C] low-resolution images (super-resolution models only).

        Returns:
          dict with ``loss``, ``mse`` and ``vb``: [K, B] float32 per-example terms of each step,
          computed before that step's update (as the reference logs them).
        """
        images = np.asarray(images, np.float32)
        t = np.asarray(t)
        noise = np.asarray(noise, np.float32)
        if images.ndim != 5 or images.shape[1] != self.global_batch_size:
            raise ValueError(
                f"replay_steps: images must be [K, B={self.global_batch_size}, H, W, C], "
                f"got shape {images.shape}"
            )
        if t.shape != images.shape[:2] or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(
                f"replay_steps: t must be integer [K, B] = {images.shape[:2]}, got "
                f"{t.dtype} {t.shape}"
            )
        if noise.shape != images.shape:
            raise ValueError(
                f"replay_steps: noise must have the images' shape {images.shape}, got {noise.shape}"
            )
        if np.any((t < 0) | (t >= self.diffusion.num_timesteps)):
            raise ValueError(
                f"replay_steps: timesteps must be in [0, {self.diffusion.num_timesteps}), got "
                f"{t.min()}..{t.max()}"
            )
        extras = {"label": labels, "low_res": low_res}
        needed = {"label": self.class_cond, "low_res": self.super_res}
        for name, value in extras.items():
            if (value is None) == needed[name]:
                raise ValueError(
                    f"replay_steps: {name} is {'required' if needed[name] else 'not used'} "
                    f"for this model"
                )
        if self._replay_step is None:
            self._replay_step = tf.function(self._replay_step_fn)
        steps = []
        for k in range(images.shape[0]):
            batch = {"image": tf.constant(images[k])}
            batch.update(
                {
                    name: tf.constant(np.asarray(value)[k])
                    for name, value in extras.items()
                    if value is not None
                }
            )
            terms = self._replay_step(batch, tf.constant(t[k], tf.int32), tf.constant(noise[k]))
            steps.append({name: value.numpy() for name, value in terms.items()})
        return {name: np.stack([step[name] for step in steps]) for name in REPLAY_TERMS}


def summarize(totals: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Means per example of the summed metrics, with the reference's per-quartile names (loss_q0...)."""
    out = {}
    for name in ("loss", "mse", "vb"):
        if name not in totals:
            continue
        out[name] = float(totals[name] / totals["count"])
        for q in range(NUM_QUARTILES):
            if totals["count_q"][q] > 0:
                out[f"{name}_q{q}"] = float(totals[name + "_q"][q] / totals["count_q"][q])
    return out


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag checked between step chunks (preemption safety)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the final save still runs
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _checkpoint_dir(workdir: str, strategy) -> str:
    # Under MultiWorkerMirroredStrategy every worker takes part in saving, but only the chief's
    # files are kept; the others write to a scratch directory of their own.
    if distribute.is_chief(strategy):
        return checkpoints.checkpoint_dir(workdir)
    task_id = getattr(strategy.cluster_resolver, "task_id", 0)
    return checkpoints.checkpoint_dir(os.path.join(workdir, f"worker_{task_id}_scratch"))


def _remove_partial_checkpoints(directory: str):
    """Deletes temporary shards a killed save may have left (the index points only at complete ones)."""
    if not tf.io.gfile.isdir(directory):
        return
    for name in tf.io.gfile.listdir(directory):
        if "_temp" in name:
            tf.io.gfile.rmtree(os.path.join(directory, name))
            logging.info("removed a partial checkpoint left by an interrupted save: %s", name)


# Training-time sample grids: this many images, from seeds 0..N-1 (labels i % num_classes).
GRID_IMAGES = 16


def _sample_grid(model: inference.InferenceModel):
    """A fixed-seed grid of EMA samples with the configured sampler (``sample.*``) for
    TensorBoard; None for super-resolution models (they need low-resolution inputs)."""
    config = model.config
    if config.data.low_res_size > 0:
        return None
    labels = None
    if config.data.class_cond:
        labels = np.arange(GRID_IMAGES, dtype=np.int32) % int(config.data.num_classes)
    return model.draw(
        samplers.from_config(config.sample),
        np.arange(GRID_IMAGES, dtype=np.int64),
        labels=labels,
        batch_size=GRID_IMAGES,
        desc="sample grid",
    )


def log_training_fid(model: inference.InferenceModel, step: int, writer) -> Optional[Dict]:
    """Logs FID and KID of ``train.fid_num_samples`` samples of the EMA network to TensorBoard.

    Samples use the configured sampler (``sample.*``) and the seeds of ``run.py --mode=sample``;
    the reference is ``train.fid_ref_batch`` (or ``fid.ref_batch``).  At such small N, FID is
    biased upwards (compare runs only at equal N); KID is unbiased.
    """
    config = model.config
    if config.data.low_res_size > 0:
        logging.warning("train.fid_every: skipped, super-resolution models need low-res inputs")
        return None
    graph = metrics.load_graph(
        config.train.fid_inception or config.fid.inception, int(config.fid.batch_size)
    )
    ref, ref_statistics = metrics.reference_features(
        config.train.fid_ref_batch or config.fid.ref_batch, graph
    )
    images = model.draw_configured(
        samplers.from_config(config.sample),
        int(config.train.fid_num_samples),
        seed=int(config.seed),
        desc=f"FID samples at step {step}",
    )["images"]
    features = graph(image_utils.to_rgb(images))["pool"]
    scores = metrics.fid_and_kid(features, ref["pool"], ref_statistics)
    with writer.as_default(step=step):
        tf.summary.scalar("quality/fid", scores["fid"])
        tf.summary.scalar("quality/kid", scores["kid"])
    logging.info(
        "step %d: FID %.3f, KID %.5f (%d samples)",
        step,
        scores["fid"],
        scores["kid"],
        len(features),
    )
    return scores


def train(
    config, workdir: str, strategy: Optional[tf.distribute.Strategy] = None
) -> Dict[str, float]:
    """Trains per `config` in `workdir`, resuming from its newest readable checkpoint.

    `config` is stored as `<workdir>/config.json` once the model is built and restored, before the
    first step, so that a start refused earlier leaves the workdir as it was.  The config
    (config_utils.validate_config, with the strategy's replica count) and the data sources
    (data_sources.validate_data_config) are checked first.

    Returns:
      The metrics of the last logging interval (means per example), for callers and tests.
    """
    strategy = strategy or tf.distribute.get_strategy()
    config_utils.validate_config(config, mode="train", num_replicas=strategy.num_replicas_in_sync)
    data_sources.validate_data_config(config.data)
    keras.mixed_precision.set_global_policy(config.train.mixed_precision)
    if config.train.deterministic_ops:
        # GPU kernels (cuDNN convolution backprop, scatter/segment reductions) otherwise pick
        # non-deterministic algorithms; on CPU every kernel used here is already deterministic.
        tf.config.experimental.enable_op_determinism()
    trainer = Trainer(config, strategy)
    checkpoint_dir = _checkpoint_dir(workdir, strategy)
    _remove_partial_checkpoints(checkpoint_dir)
    # Skips (and moves aside) damaged newer checkpoints; the manager is created after that move.
    restore_path = checkpoints.newest_readable_checkpoint(checkpoint_dir)
    manager = tf.train.CheckpointManager(
        trainer.checkpoint, checkpoint_dir, max_to_keep=config.train.keep_checkpoints
    )
    if restore_path:
        trainer.checkpoint.restore(restore_path).assert_existing_objects_matched()
        logging.info("resumed from %s at step %d", restore_path, int(trainer.step.numpy()))
    if distribute.is_chief(strategy):
        config_utils.persist_config(config, workdir)  # training really starts: store its config
    start_step = int(trainer.step.numpy())
    num_steps = int(config.train.num_steps)
    if start_step >= num_steps:
        logging.info("step %d >= train.num_steps=%d: nothing to train", start_step, num_steps)
        return {}

    global_batch = trainer.global_batch_size
    # The data order is a pure function of (seed, step): starting the pipeline at start_step reads
    # exactly the batches the uninterrupted run reads from there on (no iterator checkpoint).
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: data_lib.make_train_dataset(
            config.data,
            batch_size=ctx.get_per_replica_batch_size(global_batch),
            input_context=ctx,
            seed=config.seed,
            start_step=start_step,
        )
    )
    iterator = iter(dataset)

    writer = (
        tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_SUBDIR))
        if distribute.is_chief(strategy)
        else tf.summary.create_noop_writer()
    )
    log_every = max(1, int(config.train.log_every))
    checkpoint_every = max(1, int(config.train.checkpoint_every))
    sample_every = int(config.train.sample_every)
    logging.info(
        "training %s for steps %d..%d, global batch %d on %d replica(s)",
        type(trainer.net).__name__,
        start_step,
        num_steps,
        global_batch,
        trainer.num_replicas,
    )

    # The slowest EMA, as inference sees it: sample grids and FID during training.
    ema_model = inference.InferenceModel(trainer.ema_nets[max(trainer.ema_rates)], config)
    last_metrics: Dict[str, float] = {}
    step = start_step
    started = time.time()
    with _StopRequest() as stop:
        try:
            while step < num_steps and not stop.requested:
                boundaries = [
                    num_steps,
                    (step // log_every + 1) * log_every,
                    (step // checkpoint_every + 1) * checkpoint_every,
                ]
                if sample_every > 0:
                    boundaries.append((step // sample_every + 1) * sample_every)
                if config.train.fid_every > 0:
                    boundaries.append((step // config.train.fid_every + 1) * config.train.fid_every)
                chunk = min(boundaries) - step
                chunk_start = time.time()
                totals = trainer.train_steps(iterator, chunk)
                elapsed = time.time() - chunk_start
                step = int(trainer.step.numpy())
                last_metrics = summarize(totals)
                last_metrics["steps_per_sec"] = chunk / elapsed
                last_metrics["images_per_sec"] = chunk * global_batch / elapsed
                if step % log_every == 0 or step == num_steps:
                    eta = (num_steps - step) / last_metrics["steps_per_sec"]
                    logging.info(
                        "step %d/%d loss %.4f %s| %.2f steps/s, %.1f img/s, ETA %s",
                        step,
                        num_steps,
                        last_metrics["loss"],
                        "".join(
                            f"{k} {last_metrics[k]:.4f} "
                            for k in ("mse", "vb")
                            if k in last_metrics
                        ),
                        last_metrics["steps_per_sec"],
                        last_metrics["images_per_sec"],
                        time.strftime("%H:%M:%S", time.gmtime(eta)),
                    )
                    with writer.as_default(step=step):
                        for key, value in last_metrics.items():
                            tf.summary.scalar(key, value)
                if step % checkpoint_every == 0:
                    manager.save(checkpoint_number=step)
                if sample_every > 0 and step % sample_every == 0:
                    grid = _sample_grid(ema_model)
                    if grid is not None:
                        with writer.as_default(step=step):
                            tf.summary.image("samples", grid, max_outputs=GRID_IMAGES)
                if config.train.fid_every > 0 and step % config.train.fid_every == 0:
                    log_training_fid(ema_model, step, writer)
        finally:
            step = int(trainer.step.numpy())
            if step > 0 and manager.latest_checkpoint != os.path.join(
                checkpoint_dir, f"ckpt-{step}"
            ):
                manager.save(checkpoint_number=step)
            writer.flush()
    logging.info(
        "trained %d steps in %.1f s; checkpoints in %s",
        step - start_step,
        time.time() - started,
        checkpoint_dir,
    )
    return last_metrics
