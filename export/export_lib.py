"""Exports a trained (or converted) Improved DDPM as two SavedModels for TF-Serving.

A TF-Serving model base path is written under ``export_dir``::

    <export_dir>/<model_name>_sampler/<version>/   saved_model.pb, variables/, assets.extra/
    <export_dir>/<model_name>_nll/<version>/       (same layout)
    <export_dir>/models.config                     ModelServerConfig naming every exported model
    <export_dir>/batching_parameters.txt           BatchingParameters for --enable_batching

Versions are numbered 1, 2, ...; an export never overwrites a version (both SavedModels of one
export get the same number) and is written to a temporary directory and renamed into place, so a
failed export leaves nothing behind and the server never sees a half-written version.

Signatures (every input is batch-major, one row per image, so that TF-Serving's request batching
can concatenate concurrent requests; the per-request parameters also accept a scalar, applied to
every image, when batching is off):

Sampler, ``serving_default``:
  inputs   ``seed`` int64 [N]: one image per seed.  Image n depends only on seed[n] and its own
             parameters, not on the rest of the batch (stateless per-image noise: draw 0 is x_T,
             draw k + 1 the noise of reverse step k, see :mod:`tf_iddpm.chains`) -- up to
             float rounding: convolutions round differently for different batch sizes.
           ``num_steps`` int32, scalar or [N]: K, the network calls per image.  For ``ancestral``
             and ``ddim`` the chain is the trained process respaced to K evenly spaced steps
             (``timestep_respacing = "K"``), 1 <= K <= T; a solver calls the network at K
             timesteps of its grid (``sample.grid`` of the exported config), from its order up
             to the steps where lambda >= -5.1 (see :mod:`tf_iddpm.samplers`).
           ``sampler`` string, scalar or [N]: ``ancestral``, ``ddim``, ``dpmpp_2m``, ``dpmpp_3m``,
             ``dpmpp_2m_sde`` or ``unipc`` (UniPC's order is the exported ``sample.solver_order``).
           ``eta`` float32, scalar or [N]: DDIM eta in [0, 1]; must be 0 for other samplers.
           ``class_labels`` int32 [N] in [0, num_classes): class-conditional models only.
           ``guidance_scale`` float32, scalar or [N]: classifier-free guidance s >= 0 per image
             (class-conditional models only; 1 = the conditional model as trained, 0 = its
             unconditional prediction, > 1 guided; other than 1 only for models trained with
             ``model.class_dropout > 0``).  Guided images cost one call on a doubled batch per
             step; a group of images all at 1 runs the plain chain.
           ``low_res`` uint8 [N, h, h, C]: the super-resolution model's low-resolution input.
  outputs  ``images`` uint8 [N, H, W, C] (the reference's truncating conversion) and
           ``images_float`` float32 [N, H, W, C] (the raw samples, ~[-1, 1]).
  Images equal ``run.py --mode=sample --sampler=S --steps=K [--guidance_scale=s]`` (the in-process
  :class:`tf_iddpm.inference.Sampler` of that :class:`tf_iddpm.samplers.SamplerSpec`) with
  ``seeds=seed``, bit for bit for the same batch.

NLL, ``serving_default`` (the variational bound of Eq. 4 in bits/dim, ``clip_denoised`` from
``config.eval.clip_denoised``):
  inputs   ``images`` uint8 [N, H, W, C]; ``num_steps`` int32, scalar or [N] (K = T evaluates the
             full chain); ``seed`` int64 [N]: the q_sample noise of loop step k (t = K-1-k) of
             image n is ``stateless_normal([H, W, C], seed=[seed[n], k + 1])``, so a bpd is
             reproducible; ``class_labels`` int32 [N] for class-conditional models.  A
             super-resolution model is conditioned on the area-downsampled image, as in training.
  outputs  ``total_bpd``, ``prior_bpd`` float32 [N]; ``vb_terms``, ``xstart_mse``, ``mse`` float32
           [N, K] with column k for t = K-1-k (the reference's order); ``vb_timesteps`` int32
           [N, K]: the original timestep index of each column.  When a (batched) request mixes
           step counts, K is the largest and shorter rows are padded with 0 (``vb_timesteps``
           -1), so total_bpd = prior_bpd + vb_terms.sum(1) always holds.
NLL, ``nll_replay``: as ``serving_default`` but the noise is given, ``noise`` float32
  [N, K, H, W, C] (K = num_steps; noise[:, k] is used at t = K-1-k), to reproduce a recorded evaluation
  such as the reference's ``calc_bpd_loop``.

Every input is validated in the graph: a malformed request fails with INVALID_ARGUMENT and a
message naming the input and what is allowed.

The exported graphs need no Python from this project; this module imports no training code.
"""

import dataclasses
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from configs import base as base_config
from export import serving
from tf_iddpm import chains
from tf_iddpm import config_utils
from tf_iddpm import diffusion as diffusion_lib
from tf_iddpm import factory
from tf_iddpm import fileio
from tf_iddpm import image_utils
from tf_iddpm import inference
from tf_iddpm import samplers
from tf_iddpm import schedules

SAMPLER_SUFFIX = "_sampler"
NLL_SUFFIX = "_nll"
DEFAULT_SIGNATURE = "serving_default"
NLL_REPLAY_SIGNATURE = "nll_replay"
METADATA_FILENAME = "iddpm_export.json"  # next to the warm-up file, in assets.extra

# Steps of the warm-up requests: enough to run every op of the loops once.
_WARMUP_STEPS = 2
# Bit layout of the key that groups the sampler's images by (num_steps, sampler kind, eta):
# eta's 32 bits, then 4 bits of kind index, then the steps.
_STEPS_SHIFT = 2**36
_KIND_SHIFT = 2**32


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where one export went.

    Attributes:
      version: the version number of both SavedModels.
      sampler_dir, nll_dir: the SavedModel version directories.
      sampler_name, nll_name: the TF-Serving model names.
      models_config: path of models.config.
      batching_parameters: path of batching_parameters.txt.
      weights: the checkpoint attribute that was exported ("ema_0p9999" or "model").
    """

    version: int
    sampler_dir: str
    nll_dir: str
    sampler_name: str
    nll_name: str
    models_config: str
    batching_parameters: str
    weights: str


# ------------------------------------------------------------------------------ in-graph checks


def _per_image(value, batch, name):
    """Flattens a scalar-or-[N] parameter; returns it and the checks of its shape."""
    flat = tf.reshape(value, [-1])
    size = tf.size(flat)
    message = f"{name} must be a scalar or a vector [N] with one value per image"
    checks = [
        tf.debugging.assert_less_equal(tf.rank(value), 1, message=message),
        tf.debugging.assert_equal(
            tf.logical_or(tf.equal(size, 1), tf.equal(size, batch)), True, message=message
        ),
    ]
    return flat, checks


def _padded_shape(tensor, length):
    """tf.shape(tensor) cut or padded with -1 to `length` entries.

    Lets one equality check cover the rank as well: the static rank of a signature input is known,
    so a rank computed with tf.rank/tf.size would be folded to a constant, yet a server feeding a
    tensor of another rank bypasses the static shape.
    """
    return tf.concat([tf.shape(tensor), tf.fill([length], -1)], 0)[:length]


def _check_vector(flat_or_tensor, batch, name, per):
    """A per-image input must be a vector [N] (one value per `per`)."""
    return tf.debugging.assert_equal(
        tf.reduce_all(tf.equal(_padded_shape(flat_or_tensor, 2), tf.stack([batch, -1]))),
        True,
        message=f"{name} must be a vector [N] holding exactly one value per {per}",
    )


def _check_images(images, batch, size, channels, name):
    """images must be [batch, size, size, channels] (the uint8 dtype is the signature's)."""
    expected = tf.stack([batch, size, size, channels, -1])
    return tf.debugging.assert_equal(
        tf.reduce_all(tf.equal(_padded_shape(images, 5), expected)),
        True,
        message=f"{name} must be uint8 [N, {size}, {size}, {channels}] with N = the number of "
        f"images of the request",
    )


def _gated(checks, *tensors):
    """The tensors, computed only after every check has passed."""
    checks = [c for c in checks if c is not None]
    with tf.control_dependencies(checks):
        gated = tuple(tf.identity(t) for t in tensors)
    return gated if len(gated) > 1 else gated[0]


def _for_each_group(group_ids, num_groups, fn, initial):
    """Runs fn(member_indices, accumulators) -> accumulators for every group, in one while_loop."""

    def body(g, *accumulators):
        members = tf.cast(tf.where(tf.equal(group_ids, g))[:, 0], tf.int32)
        return (g + 1,) + tuple(fn(members, accumulators))

    results = tf.while_loop(lambda g, *_: g < num_groups, body, (tf.constant(0),) + tuple(initial))
    return results[1:]


def _scatter_rows(accumulator, members, rows):
    return tf.tensor_scatter_nd_update(accumulator, members[:, None], rows)


# ------------------------------------------------------------------------------ modules


class _ServingModule(tf.Module):
    """Common parts of the exported modules: the weights, the process and the model inputs.

    Only the network's raw ``tf.Variable``s are tracked, never the Keras model itself: with the
    model tracked, ``saved_model_cli run`` and the C++ loader (TF-Serving) cannot find the
    variables (``FailedPreconditionError: Could not find variable ...``; the TF2 loader works
    either way).  The traced functions close over the model.
    """

    def __init__(self, config, net, name):
        super().__init__(name=name)
        self.network_variables = [getattr(v, "value", v) for v in net.variables]
        # A plain function is not tracked by tf.Module, so the model itself is not saved.
        self._model_fn = inference.model_function(net)
        data = config.data
        self.image_size = int(data.image_size)
        self.channels = int(data.num_channels)
        self.num_classes = int(data.num_classes) if data.class_cond else 0
        self.low_res_size = int(data.low_res_size)
        self.diffusion = factory.create_diffusion_from_config(config, timestep_respacing="")
        self.num_timesteps = int(self.diffusion.num_timesteps)
        # normalize_images of every uint8 value, computed eagerly.  Inside a graph Grappler turns
        # x / 127.5 into x * (1 / 127.5), which rounds 111 of the 256 values differently; a
        # lookup keeps the graph's inputs bit-identical to the eager normalisation.
        self._pixel_values = image_utils.normalize_images(np.arange(256, dtype=np.uint8)).numpy()

    def model_fn(self, x, t, **model_kwargs):
        return self._model_fn(x, t, **model_kwargs)

    def normalize(self, images):
        """uint8 images -> float32 in [-1, 1], exactly as image_utils.normalize_images eagerly."""
        return tf.gather(tf.constant(self._pixel_values), tf.cast(images, tf.int32))

    @property
    def image_shape(self) -> List[int]:
        return [self.image_size, self.image_size, self.channels]

    def _make_function(self, fn, specs: Dict[str, tf.TensorSpec]):
        """A tf.function of named inputs (the SignatureDef input names are the spec names)."""
        names = list(specs)

        def call(*args):
            return fn(**dict(zip(names, args)))

        call.__name__ = fn.__name__
        return tf.function(
            call,
            input_signature=[
                tf.TensorSpec(spec.shape, spec.dtype, name=key) for key, spec in specs.items()
            ],
        )

    def _label_checks(self, labels, batch, per):
        return labels, [
            _check_vector(labels, batch, "class_labels", per),
            tf.debugging.assert_greater_equal(
                labels, 0, message=f"class_labels must lie in [0, {self.num_classes})"
            ),
            tf.debugging.assert_less(
                labels,
                self.num_classes,
                message=f"class_labels must lie in [0, {self.num_classes})",
            ),
        ]

    def _check_steps(self, steps, name="num_steps"):
        message = (
            f"{name} must lie in [1, {self.num_timesteps}] (the trained process has "
            f"T = {self.num_timesteps} steps)"
        )
        return [
            tf.debugging.assert_greater_equal(steps, 1, message=message),
            tf.debugging.assert_less_equal(steps, self.num_timesteps, message=message),
        ]


class SamplerModule(_ServingModule):
    """The sampler graph (see the module docstring for the signature)."""

    def __init__(self, config, net, *, clip_denoised: bool = True):
        super().__init__(config, net, name="sampler")
        self.clip_denoised = bool(clip_denoised)
        # The sampler kinds a request may name, with the range of network calls each can make on
        # this process and whether it takes eta; the solvers' grid and UniPC's order are the
        # config's (sample.grid, sample.solver_order), fixed at export.
        self.kinds = list(samplers.SAMPLER_KINDS)
        self.grid = config.sample.grid
        self.solver_order = int(config.sample.solver_order)
        solver_max = schedules.solver_max_steps(self.diffusion.betas)
        self._min_calls, self._max_calls = [], []
        for name in self.kinds:
            kind = samplers.SAMPLER_KINDS[name]
            order = self.solver_order if (kind.orders and self.solver_order) else kind.order
            self._min_calls.append(order if kind.solver else 1)
            self._max_calls.append(solver_max if kind.solver else self.num_timesteps)
        self._takes_eta = [samplers.SAMPLER_KINDS[name].takes_eta for name in self.kinds]
        specs = {
            "seed": tf.TensorSpec([None], tf.int64),
            "num_steps": tf.TensorSpec(None, tf.int32),
            "sampler": tf.TensorSpec(None, tf.string),
            "eta": tf.TensorSpec(None, tf.float32),
        }
        self.null_label = factory.null_label(config)
        if self.num_classes:
            specs["class_labels"] = tf.TensorSpec([None], tf.int32)
            specs["guidance_scale"] = tf.TensorSpec(None, tf.float32)
        if self.low_res_size:
            specs["low_res"] = tf.TensorSpec(
                [None, self.low_res_size, self.low_res_size, self.channels], tf.uint8
            )
        self.input_specs = specs
        self.sample = self._make_function(self._sample, specs)

    def signatures(self):
        return {DEFAULT_SIGNATURE: self.sample}

    def _guidance_checks(self, scale, batch):
        """guidance_scale: finite and >= 0 per image; exactly 1 for a model without a null label."""
        scale, checks = _per_image(scale, batch, "guidance_scale")
        message = (
            "guidance_scale must be finite and >= 0 (1 = the conditional model as trained, 0 = "
            "unconditional, > 1 guided)"
        )
        checks += [
            tf.debugging.assert_equal(
                tf.reduce_all(tf.math.is_finite(scale) & (scale >= 0.0)), True, message=message
            )
        ]
        if self.null_label is None:
            checks.append(
                tf.debugging.assert_equal(
                    tf.reduce_all(tf.equal(scale, 1.0)),
                    True,
                    message="guidance_scale must be 1: this model was trained without label "
                    "dropout (model.class_dropout = 0), so it has no unconditional prediction",
                )
            )
        return scale, checks

    def _sample(
        self,
        seed,
        num_steps,
        sampler,
        eta,
        class_labels=None,
        guidance_scale=None,
        low_res=None,
    ):
        batch = tf.size(seed)
        checks = [
            tf.debugging.assert_positive(
                batch, message="seed is empty: send one seed per image, at least one"
            ),
            _check_vector(seed, batch, "seed", "image"),
        ]
        steps, step_checks = _per_image(num_steps, batch, "num_steps")
        sampler, sampler_checks = _per_image(sampler, batch, "sampler")
        eta, eta_checks = _per_image(eta, batch, "eta")
        checks += step_checks + sampler_checks + eta_checks
        eta_message = "eta must lie in [0, 1] (0 = deterministic DDIM)"
        checks += [
            tf.debugging.assert_greater_equal(eta, 0.0, message=eta_message),
            tf.debugging.assert_less_equal(eta, 1.0, message=eta_message),
        ]
        model_inputs = {}
        scale = tf.ones([1], tf.float32)
        if self.num_classes:
            labels, label_checks = self._label_checks(class_labels, batch, "seed")
            scale, guidance_checks = self._guidance_checks(guidance_scale, batch)
            checks += label_checks + guidance_checks
            model_inputs["y"] = labels
        if self.low_res_size:
            checks.append(
                _check_images(low_res, batch, self.low_res_size, self.channels, "low_res")
            )
            model_inputs["low_res"] = low_res
        batch, seed, steps, sampler, eta, scale, *gated_inputs = _gated(
            checks, batch, seed, steps, sampler, eta, scale, *model_inputs.values()
        )
        model_inputs = dict(zip(model_inputs, gated_inputs))
        steps = tf.broadcast_to(steps, [batch])
        eta = tf.broadcast_to(eta, [batch])
        scale = tf.broadcast_to(scale, [batch])
        kind, steps, eta = self._check_samplers(tf.broadcast_to(sampler, [batch]), steps, eta)
        if "low_res" in model_inputs:
            model_inputs["low_res"] = self.normalize(model_inputs["low_res"])

        # Images sharing (sampler, num_steps, eta) run as one chain; a request normally is one
        # group, a batch merged by the server from several requests may be several.
        key = (
            tf.cast(steps, tf.int64) * _STEPS_SHIFT
            + tf.cast(kind, tf.int64) * _KIND_SHIFT
            + tf.cast(tf.bitcast(eta, tf.uint32), tf.int64)
        )
        unique_keys, group_ids = tf.unique(key)

        def run_group(members, accumulators):
            first = members[0]
            seeds = tf.gather(seed, members)
            kwargs = {k: tf.gather(v, members) for k, v in model_inputs.items()}
            shape = tf.concat([tf.shape(seeds), self.image_shape], 0)
            group_scale = tf.gather(scale, members)

            def draw(name, model_fn):
                chain = chains.make_chain(
                    name,
                    self.diffusion,
                    steps=steps[first],
                    eta=eta[first],
                    clip_denoised=self.clip_denoised,
                    grid=self.grid,
                    order=self.solver_order,
                )
                return chains.sample_loop(chain, model_fn, shape, model_kwargs=kwargs, seeds=seeds)

            def draw_kind(model_fn):
                branches = [lambda name=name: draw(name, model_fn) for name in self.kinds]
                return tf.switch_case(kind[first], branches)

            if self.null_label is None:
                samples = draw_kind(self.model_fn)
            else:
                # Guided images cost a doubled batch per call: only when some image asks for it.
                guided = inference.guided_model_function(
                    self.model_fn, group_scale, self.null_label, self.channels
                )
                samples = tf.cond(
                    tf.reduce_all(tf.equal(group_scale, 1.0)),
                    lambda: draw_kind(self.model_fn),
                    lambda: draw_kind(guided),
                )
            return [_scatter_rows(accumulators[0], members, samples)]

        initial = tf.zeros(tf.concat([[batch], self.image_shape], 0), tf.float32)
        (samples,) = _for_each_group(group_ids, tf.size(unique_keys), run_group, [initial])
        samples = tf.ensure_shape(samples, [None] + self.image_shape)
        return {"images": image_utils.denormalize_images(samples), "images_float": samples}

    def _check_samplers(self, sampler, steps, eta):
        """Each image's sampler kind index, with its steps and eta checked against the kind."""
        names = tf.constant(self.kinds)
        matches = tf.equal(sampler[:, None], names[None, :])
        kind = tf.cast(tf.argmax(tf.cast(matches, tf.int32), axis=1), tf.int32)
        known = tf.debugging.assert_equal(
            tf.reduce_all(tf.reduce_any(matches, axis=1)),
            True,
            message=f"sampler must name one of: {', '.join(self.kinds)}",
        )
        kind = _gated([known], kind)
        least = tf.gather(tf.constant(self._min_calls, tf.int32), kind)
        most = tf.gather(tf.constant(self._max_calls, tf.int32), kind)
        takes_eta = tf.gather(tf.constant(self._takes_eta), kind)
        ranges = ", ".join(
            f"{name} {low}..{high}"
            for name, low, high in zip(self.kinds, self._min_calls, self._max_calls)
        )
        checks = [
            tf.debugging.assert_equal(
                tf.reduce_all((steps >= least) & (steps <= most)),
                True,
                message=f"num_steps (network calls) out of range for the sampler; allowed: "
                f"{ranges} (T = {self.num_timesteps}; a solver of order k needs at least k calls "
                f"and starts where lambda >= {schedules.SOLVER_LAMBDA_MIN})",
            ),
            tf.debugging.assert_equal(
                tf.reduce_all(takes_eta | tf.equal(eta, 0.0)),
                True,
                message="eta is nonzero for an image whose sampler takes none: eta only applies to "
                "ddim (set sampler ddim, or eta 0)",
            ),
        ]
        return _gated(checks, kind, steps, eta)

    def warmup_inputs(self) -> List[Dict[str, np.ndarray]]:
        """One request of one image per sampler kind (each graph branch runs once)."""
        requests = []
        for name, least, most in zip(self.kinds, self._min_calls, self._max_calls):
            if least > most:  # a solver whose order this short process cannot support
                continue
            inputs = {
                "seed": np.array([0], np.int64),
                "num_steps": np.array([min(max(_WARMUP_STEPS, least), most)], np.int32),
                "sampler": np.array([name.encode()], object),
                "eta": np.array([0.5 if name == "ddim" else 0.0], np.float32),
            }
            if self.num_classes:
                inputs["class_labels"] = np.array([0], np.int32)
                # The guided branch too, where the model has one.
                inputs["guidance_scale"] = np.array(
                    [1.0 if self.null_label is None or name != "ancestral" else 2.0], np.float32
                )
            if self.low_res_size:
                inputs["low_res"] = np.full(
                    [1, self.low_res_size, self.low_res_size, self.channels], 128, np.uint8
                )
            requests.append((DEFAULT_SIGNATURE, inputs))
        return requests


class NllModule(_ServingModule):
    """The likelihood graph (see the module docstring for the signatures)."""

    def __init__(self, config, net, *, clip_denoised: bool = True):
        super().__init__(config, net, name="nll")
        self.clip_denoised = bool(clip_denoised)
        images = tf.TensorSpec([None] + self.image_shape, tf.uint8)
        specs = {
            "images": images,
            "num_steps": tf.TensorSpec(None, tf.int32),
            "seed": tf.TensorSpec([None], tf.int64),
        }
        replay_specs = {
            "images": images,
            "noise": tf.TensorSpec([None, None] + self.image_shape, tf.float32),
        }
        if self.num_classes:
            specs["class_labels"] = replay_specs["class_labels"] = tf.TensorSpec([None], tf.int32)
        self.input_specs = specs
        self.replay_input_specs = replay_specs
        self.nll = self._make_function(self._nll, specs)
        self.nll_replay = self._make_function(self._nll_replay, replay_specs)

    def signatures(self):
        return {DEFAULT_SIGNATURE: self.nll, NLL_REPLAY_SIGNATURE: self.nll_replay}

    def _image_inputs(self, images, class_labels, batch, checks):
        checks.append(
            tf.debugging.assert_positive(
                batch, message="images is empty (or not [N, H, W, C]): send at least one image"
            )
        )
        checks.append(_check_images(images, batch, self.image_size, self.channels, "images"))
        model_inputs = {}
        if self.num_classes:
            labels, label_checks = self._label_checks(class_labels, batch, "image")
            checks += label_checks
            model_inputs["y"] = labels
        return model_inputs

    def _model_inputs(self, x_start, model_inputs):
        if self.low_res_size:  # conditioned on its own area-downsampled image, as in training
            x_start = tf.ensure_shape(x_start, [None] + self.image_shape)
            low_res = image_utils.area_resize(x_start, self.low_res_size)
            model_inputs = dict(model_inputs, low_res=low_res)
        return model_inputs

    def _bpd_rows(self, diffusion, x_start, model_inputs, **noise):
        """calc_bpd_loop on one group, plus the original timestep of each vb column."""
        terms = chains.calc_bpd_loop(
            diffusion,
            self.model_fn,
            x_start,
            clip_denoised=self.clip_denoised,
            model_kwargs=model_inputs,
            **noise,
        )
        timesteps = tf.reverse(tf.cast(diffusion.timestep_map, tf.int32), [0])
        terms["vb_timesteps"] = tf.tile(timesteps[None], [tf.shape(x_start)[0], 1])
        return terms

    def _nll(self, images, num_steps, seed, class_labels=None):
        batch = _padded_shape(images, 1)[0]
        checks = []
        model_inputs = self._image_inputs(images, class_labels, batch, checks)
        checks.append(_check_vector(seed, batch, "seed", "image"))
        steps, step_checks = _per_image(num_steps, batch, "num_steps")
        checks += step_checks + self._check_steps(steps)
        batch, images, seed, steps, *gated_inputs = _gated(
            checks, batch, images, seed, steps, *model_inputs.values()
        )
        model_inputs = dict(zip(model_inputs, gated_inputs))
        steps = tf.broadcast_to(steps, [batch])
        x_start = self.normalize(images)
        model_inputs = self._model_inputs(x_start, model_inputs)

        max_steps = tf.reduce_max(steps)
        unique_steps, group_ids = tf.unique(steps)

        def run_group(members, accumulators):
            num = steps[members[0]]
            diffusion = diffusion_lib.respace_uniform(self.diffusion, num)
            terms = self._bpd_rows(
                diffusion,
                tf.gather(x_start, members),
                {k: tf.gather(v, members) for k, v in model_inputs.items()},
                seeds=tf.gather(seed, members),
            )
            padding = [[0, 0], [0, max_steps - num]]
            updated = []
            for name, accumulator in zip(self._output_names(), accumulators):
                rows = terms[name]
                if rows.shape.rank == 2:
                    rows = tf.pad(
                        rows, padding, constant_values=-1 if name == "vb_timesteps" else 0
                    )
                updated.append(_scatter_rows(accumulator, members, rows))
            return updated

        initial = []
        for name in self._output_names():
            if name in ("total_bpd", "prior_bpd"):
                initial.append(tf.zeros([batch], tf.float32))
            elif name == "vb_timesteps":
                initial.append(tf.fill([batch, max_steps], -1))
            else:
                initial.append(tf.zeros([batch, max_steps], tf.float32))
        results = _for_each_group(group_ids, tf.size(unique_steps), run_group, initial)
        return self._outputs(dict(zip(self._output_names(), results)))

    def _nll_replay(self, images, noise, class_labels=None):
        batch = _padded_shape(images, 1)[0]
        checks = []
        model_inputs = self._image_inputs(images, class_labels, batch, checks)
        noise_shape = _padded_shape(noise, 6)
        checks.append(
            tf.debugging.assert_equal(
                tf.reduce_all(
                    tf.equal(
                        tf.gather(noise_shape, [0, 2, 3, 4, 5]),
                        tf.stack([batch] + self.image_shape + [-1]),
                    )
                ),
                True,
                message=f"noise must be float32 [N, K, {self.image_size}, {self.image_size}, "
                f"{self.channels}]: one row of K draws per image",
            )
        )
        num = noise_shape[1]
        checks += self._check_steps(
            num, name="the number of noise draws per image, K = noise.shape[1],"
        )
        batch, images, noise, num, *gated_inputs = _gated(
            checks, batch, images, noise, num, *model_inputs.values()
        )
        model_inputs = dict(zip(model_inputs, gated_inputs))
        x_start = self.normalize(images)
        model_inputs = self._model_inputs(x_start, model_inputs)
        diffusion = diffusion_lib.respace_uniform(self.diffusion, num)
        terms = self._bpd_rows(
            diffusion, x_start, model_inputs, step_noise=tf.transpose(noise, [1, 0, 2, 3, 4])
        )
        return self._outputs(terms)

    @staticmethod
    def _output_names():
        return ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse", "vb_timesteps")

    @staticmethod
    def _outputs(terms):
        return {
            "total_bpd": terms["total_bpd"],
            "prior_bpd": terms["prior_bpd"],
            "vb_terms": terms["vb"],
            "xstart_mse": terms["xstart_mse"],
            "mse": terms["mse"],
            "vb_timesteps": terms["vb_timesteps"],
        }

    def warmup_inputs(self):
        images = np.full([1] + self.image_shape, 128, np.uint8)
        default = {
            "images": images,
            "num_steps": np.array([_WARMUP_STEPS], np.int32),
            "seed": np.array([0], np.int64),
        }
        replay = {
            "images": images,
            "noise": np.zeros([1, _WARMUP_STEPS] + self.image_shape, np.float32),
        }
        if self.num_classes:
            default["class_labels"] = replay["class_labels"] = np.array([0], np.int32)
        return [(DEFAULT_SIGNATURE, default), (NLL_REPLAY_SIGNATURE, replay)]


# ------------------------------------------------------------------------------ writing


def _save_module(module, directory, model_name, metadata):
    """Saves one module as a SavedModel with warm-up records and export metadata."""
    tf.saved_model.save(module, directory, signatures=module.signatures())
    requests = [
        serving.predict_request(model_name, inputs, signature_name=signature)
        for signature, inputs in module.warmup_inputs()
    ]
    serving.write_warmup_requests(directory, requests)
    fileio.atomic_write_text(
        os.path.join(directory, serving.WARMUP_SUBDIR, METADATA_FILENAME),
        json.dumps(metadata, indent=2, sort_keys=True),
    )


def _next_version(base_paths: Sequence[str], version: Optional[int]) -> int:
    existing = sorted({v for path in base_paths for v in serving.numeric_versions(path)})
    if version is None:
        return (existing[-1] + 1) if existing else 1
    if int(version) < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    if int(version) in existing:
        raise ValueError(
            f"version {version} already exists under {', '.join(base_paths)}; "
            f"exports never overwrite a version (existing: {existing})"
        )
    return int(version)


def export_saved_models(
    config,
    net,
    export_dir: str,
    *,
    model_name: Optional[str] = None,
    version: Optional[int] = None,
    weights: str = "",
    checkpoint_path: str = "",
) -> ExportResult:
    """Writes the sampler and NLL SavedModels of ``net`` as a new version under ``export_dir``.

    Args:
      config: the experiment config (architecture, diffusion, sample/eval/export fields).
      net: the restored network.
      export_dir: the TF-Serving base directory (created if needed).
      model_name: TF-Serving model name prefix (default ``config.export.model_name``).
      version: version number (default: one more than the highest existing one).
      weights, checkpoint_path: recorded in the export metadata.

    Returns:
      An :class:`ExportResult`.

    Raises:
      ValueError: if ``version`` already exists.
    """
    model_name = model_name or config.export.model_name
    name_error = config_utils.model_name_error(model_name, field="model name")
    if name_error:
        raise ValueError(name_error)
    dir_error = fileio.directory_error(export_dir, what="export_dir")
    if dir_error:
        raise ValueError(dir_error)
    export_dir = os.path.abspath(export_dir)
    os.makedirs(export_dir, exist_ok=True)
    sampler_name, nll_name = model_name + SAMPLER_SUFFIX, model_name + NLL_SUFFIX
    sampler_base = os.path.join(export_dir, sampler_name)
    nll_base = os.path.join(export_dir, nll_name)
    version = _next_version([sampler_base, nll_base], version)
    sampler_dir = os.path.join(sampler_base, str(version))
    nll_dir = os.path.join(nll_base, str(version))

    metadata = {
        "config": json.loads(config_utils.config_to_json(config)),
        "checkpoint": checkpoint_path,
        "weights": weights,
        "version": version,
        "num_timesteps": int(config.diffusion.steps),
        "respacing": "num_steps = K network calls: K evenly spaced steps (timestep_respacing "
        "'K') for ancestral and ddim, K grid points for the solvers",
        "solver_grid": config.sample.grid,
        "solver_order": int(config.sample.solver_order),
    }
    temp_root = fileio.make_temp_dir(export_dir, prefix=f".{model_name}-export-")
    renamed = []
    try:
        sampler = SamplerModule(config, net, clip_denoised=config.sample.clip_denoised)
        _save_module(
            sampler,
            os.path.join(temp_root, "sampler"),
            sampler_name,
            dict(metadata, model="sampler"),
        )
        nll = NllModule(config, net, clip_denoised=config.eval.clip_denoised)
        _save_module(nll, os.path.join(temp_root, "nll"), nll_name, dict(metadata, model="nll"))
        for source, target in (("sampler", sampler_dir), ("nll", nll_dir)):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):  # a concurrent export took the number
                raise FileExistsError(f"{target} appeared during the export; not overwriting it")
            os.rename(os.path.join(temp_root, source), target)
            renamed.append(target)
    except BaseException:
        for target in renamed:  # keep the two models' versions paired
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)

    models_config = serving.write_model_server_config(
        os.path.join(export_dir, serving.MODELS_CONFIG_FILENAME),
        serving.servable_models(export_dir),
    )
    batching = serving.write_batching_parameters(
        os.path.join(export_dir, serving.BATCHING_PARAMETERS_FILENAME),
        max_batch_size=int(config.export.max_batch_size),
    )
    return ExportResult(
        version=version,
        sampler_dir=sampler_dir,
        nll_dir=nll_dir,
        sampler_name=sampler_name,
        nll_name=nll_name,
        models_config=models_config,
        batching_parameters=batching,
        weights=weights,
    )


def serving_instructions(
    result: ExportResult, *, num_timesteps: int, class_cond: bool = False
) -> str:
    """Commands to inspect, serve and query an export (printed at the end of an export)."""
    export_dir = os.path.dirname(os.path.dirname(result.sampler_dir))
    run_steps, client_steps = min(10, num_timesteps), min(50, num_timesteps)
    labels = " --class_labels=0,1,2,3" if class_cond else ""
    rest_inputs = (
        f'"seed": [1, 2], "num_steps": [{client_steps}, {client_steps}], '
        '"sampler": ["ancestral", "ancestral"], "eta": [0.0, 0.0]'
        + (', "class_labels": [0, 1]' if class_cond else "")
    )
    lines = [
        f"Exported version {result.version} ({result.weights} weights):",
        f"  {result.sampler_dir}",
        f"  {result.nll_dir}",
        "Inspect / run without a server:",
        f"  saved_model_cli show --dir {result.sampler_dir} --all",
        f"  saved_model_cli show --dir {result.nll_dir} --all",
        f"  saved_model_cli run --dir {result.sampler_dir} --tag_set serve "
        f"--signature_def serving_default --input_exprs "
        f'\'seed=[1,2];num_steps={run_steps};sampler="ancestral";eta=0.0'
        + (";class_labels=[0,1]" if class_cond else "")
        + "'",
        "Serve (TF-Serving binary, or docker):",
        f"  tensorflow_model_server --port=8500 --rest_api_port=8501 "
        f"--model_config_file={result.models_config} --enable_batching "
        f"--batching_parameters_file={result.batching_parameters}",
        f"  docker run --rm -p 8500:8500 -p 8501:8501 -v {export_dir}:{export_dir} "
        f"tensorflow/serving --model_config_file={result.models_config} --enable_batching "
        f"--batching_parameters_file={result.batching_parameters}",
        "Query:",
        f"  python -m export.client --server=localhost:8501 --model={result.sampler_name} "
        f"sample --seeds=0,1,2,3 --num_steps={client_steps}{labels} --out_dir=/tmp/samples",
        f"  python -m export.client --server=localhost:8500 --protocol=grpc "
        f"--model={result.nll_name} nll --images=<images.npz> --num_steps={client_steps}",
        f"  curl -X POST http://localhost:8501/v1/models/{result.sampler_name}:predict "
        f"-d '{{\"inputs\": {{{rest_inputs}}}}}'",
    ]
    return "\n".join(lines)


def load_workdir_config(workdir: str):
    """``<workdir>/config.json``, fields it lacks filled from ``configs/base.py``."""
    return config_utils.load_stored_config(workdir, defaults=base_config.get_config())


def export_from_workdir(
    config,
    workdir: str,
    export_dir: str,
    *,
    checkpoint: Optional[str] = None,
    model_name: Optional[str] = None,
    version: Optional[int] = None,
    use_ema: Optional[bool] = None,
) -> ExportResult:
    """Exports the latest checkpoint of a workdir (``run.py --mode=export`` calls this).

    Args:
      config: the experiment config, or None to load ``<workdir>/config.json``.
      workdir: a training workdir or a converted reference checkpoint directory.
      export_dir: the TF-Serving base directory.
      checkpoint: a specific checkpoint prefix (default: the latest in ``<workdir>/checkpoints``).
      model_name: default ``config.export.model_name``.
      version: default: the next free version number.
      use_ema: default ``config.export.use_ema``.

    Returns:
      An :class:`ExportResult`; the serving commands are printed.
    """
    if config is None:
        config = load_workdir_config(workdir)
    config_utils.validate_config(config, mode="export")
    use_ema = config.export.use_ema if use_ema is None else use_ema
    model = inference.InferenceModel.restore(
        config, workdir, use_ema=use_ema, checkpoint=checkpoint
    )
    net, checkpoint_path, weights = model.net, model.loaded.path, model.loaded.attribute
    logging.info("exporting %s weights of %s", weights, checkpoint_path)
    result = export_saved_models(
        config,
        net,
        export_dir,
        model_name=model_name,
        version=version,
        weights=weights,
        checkpoint_path=checkpoint_path,
    )
    print(
        serving_instructions(
            result,
            num_timesteps=int(config.diffusion.steps),
            class_cond=bool(config.data.class_cond),
        ),
        flush=True,
    )
    return result
