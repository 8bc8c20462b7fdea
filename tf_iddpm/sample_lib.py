"""run.py --mode=sample: draw images from a trained (or converted) model.

Image i of a run uses the per-image seed ``config.seed + i`` (see tf_iddpm.sampling), so a sample
does not depend on the batch size, and the exported sampler given the same seed and a "K" respacing
returns the same image.
"""

import os
from typing import Callable, Dict, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

from tf_iddpm import checkpoints
from tf_iddpm import config_utils
from tf_iddpm import factory
from tf_iddpm import fileio
from tf_iddpm import image_utils
from tf_iddpm import sampling

SAMPLES_SUBDIR = "samples"


def sample_labels(config, seeds: np.ndarray) -> Optional[np.ndarray]:
    """Class labels for class-conditional sampling: the fixed sample.class_label, or drawn per seed."""
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
    # A label per seed (not per batch), so labels too are independent of the batch split.
    return np.asarray(
        [np.random.default_rng(int(s)).integers(num_classes) for s in seeds], np.int32
    )


class Sampler:
    """A network plus a (respaced) diffusion, with the whole reverse loop compiled once per shape.

    ``sampler(seeds)`` runs the chain as one graph call; :meth:`sample_in_chunks` runs it as a few
    graph calls of consecutive steps (sampling.chunk_bounds) and reports each, for progress bars.
    Both give bit-identical images.
    """

    def __init__(
        self,
        net,
        diffusion,
        *,
        image_shape,
        use_ddim=False,
        eta=0.0,
        clip_denoised=True,
        class_cond=False,
    ):
        self.net = net
        self.diffusion = diffusion
        self.image_shape = list(image_shape)
        self.use_ddim = use_ddim
        self.eta = float(eta)
        self.clip_denoised = clip_denoised
        self.class_cond = class_cond
        # [None] batch dims: a last, smaller batch reuses the same graph.
        self.sample_batch = tf.function(
            self._sample_batch,
            input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int32)],
        )
        self.initial_noise = tf.function(
            lambda seeds: sampling.seeded_normal(seeds, 0, self.image_shape),
            input_signature=[tf.TensorSpec([None], tf.int64)],
        )
        self.sample_steps = tf.function(
            self._sample_batch,
            input_signature=[
                tf.TensorSpec([None], tf.int64),
                tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None] + self.image_shape, tf.float32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ],
        )

    def _model_fn(self, x, t, **kwargs):
        return self.net(x, t, training=False, **kwargs)

    def _sample_batch(self, seeds, labels, x=None, begin=None, end=None):
        shape = tf.concat([tf.shape(seeds), self.image_shape], 0)
        kwargs = {"y": labels} if self.class_cond else {}
        steps = None if begin is None else (begin, end)
        if self.use_ddim:
            return sampling.ddim_sample_loop(
                self.diffusion,
                self._model_fn,
                shape,
                seeds=seeds,
                eta=self.eta,
                clip_denoised=self.clip_denoised,
                model_kwargs=kwargs,
                noise=x,
                steps=steps,
            )
        return sampling.p_sample_loop(
            self.diffusion,
            self._model_fn,
            shape,
            seeds=seeds,
            clip_denoised=self.clip_denoised,
            model_kwargs=kwargs,
            noise=x,
            steps=steps,
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
        x = self.initial_noise(seeds)
        for begin, end in sampling.chunk_bounds(self.diffusion.num_timesteps):
            x = self.sample_steps(seeds, labels, x, begin, end)
            if on_chunk is not None:
                on_chunk(end - begin)
        return x


def build_sampler(config, workdir: str, checkpoint: Optional[str] = None) -> Sampler:
    """The sampler of config.sample (respacing, DDIM, eta, EMA) with the workdir's weights.

    ``checkpoint`` is a checkpoint prefix to load instead of the workdir's newest; a damaged one
    raises :class:`tf_iddpm.checkpoints.DamagedCheckpointError`.
    """
    respacing = config.sample.timestep_respacing
    diffusion = factory.create_diffusion_from_config(config, timestep_respacing=respacing)
    net = factory.create_model_from_config(config)
    loaded = checkpoints.restore_inference_weights(
        net,
        workdir,
        use_ema=config.sample.use_ema,
        ema_rates=config_utils.ema_rates(config),
        checkpoint_path=checkpoint,
    )
    logging.info(
        "sampling with %s, %d steps (%r), %s",
        loaded,
        diffusion.num_timesteps,
        respacing or "all",
        f"DDIM eta={config.sample.eta}" if config.sample.use_ddim else "ancestral",
    )
    size = config.data.image_size
    return Sampler(
        net,
        diffusion,
        image_shape=[size, size, config.data.num_channels],
        use_ddim=config.sample.use_ddim,
        eta=config.sample.eta,
        clip_denoised=config.sample.clip_denoised,
        class_cond=config.data.class_cond,
    )


def sample(config, workdir: str, strategy=None, checkpoint: Optional[str] = None) -> Dict[str, str]:
    """Draws config.sample.num_samples images; writes an .npz (arr_0 uint8 NHWC, arr_1 labels) and a PNG grid.

    Both files are written atomically (:mod:`tf_iddpm.fileio`).  ``checkpoint``: a checkpoint
    prefix to sample from instead of the workdir's newest (``run.py --checkpoint``).

    Returns:
      {"npz": path, "png": path}.
    """
    del strategy  # sampling runs on the default device; batches are independent
    num_samples, batch_size = int(config.sample.num_samples), int(config.sample.batch_size)
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if config.data.low_res_size > 0:
        raise ValueError(
            "the super-resolution model needs low-resolution inputs: sample it through the "
            "exported sampler (its low_res input) instead of run.py --mode=sample"
        )
    sampler = build_sampler(config, workdir, checkpoint)
    seeds = np.arange(num_samples, dtype=np.int64) + int(config.seed)
    labels = sample_labels(config, seeds)
    images = []
    starts = range(0, num_samples, batch_size)
    # Progress in reverse-chain steps over all batches, updated a few dozen times per chain.
    with tqdm.tqdm(
        total=len(starts) * sampler.diffusion.num_timesteps, desc="sampling", unit="step"
    ) as progress:
        for start in starts:
            batch_seeds = seeds[start : start + batch_size]
            batch_labels = None if labels is None else labels[start : start + batch_size]
            batch = sampler.sample_in_chunks(batch_seeds, batch_labels, on_chunk=progress.update)
            images.append(image_utils.denormalize_images(batch).numpy())
    images = np.concatenate(images)

    out_dir = os.path.join(workdir, SAMPLES_SUBDIR)
    stem = "samples_" + "x".join(str(d) for d in images.shape)
    npz_path = os.path.join(out_dir, stem + ".npz")
    arrays = [images] if labels is None else [images, labels]
    fileio.atomic_write(npz_path, lambda file: np.savez(file, *arrays))
    png_path = os.path.join(out_dir, stem + ".png")
    image_utils.save_image_grid(images[:256], png_path)
    logging.info("wrote %d samples to %s and a grid to %s", num_samples, npz_path, png_path)
    print(f"samples: {npz_path}\ngrid:    {png_path}")
    return {"npz": npz_path, "png": png_path}
