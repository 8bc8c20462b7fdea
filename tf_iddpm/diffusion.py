"""Gaussian diffusion of Improved DDPM (paper Sections 2-4), framework-thin and model-agnostic.

The network is any callable ``model_fn(x, t, **model_kwargs)`` on NHWC tensors; this module imports
no Keras layer.  Constants are derived once in float64 and gathered into float32 per timestep
(``extract``), the precision discipline of the reference implementation, so results agree with it
to float32 rounding.

Respacing is explicit: a :class:`GaussianDiffusion` carries a ``timestep_map`` (the original index
of each of its steps) and applies it, and the optional 0..1000 rescaling, in one visible place,
:meth:`GaussianDiffusion.model_timesteps`.  :func:`respace` builds the process restricted to a
subset of steps and :func:`respace_uniform` the "K" respacing with K chosen at run time (a
tensor); both build the restricted process through :func:`_restricted`.
:func:`create_gaussian_diffusion` mirrors improved-diffusion's factory.

Sampling and likelihood loops over the whole chain (``p_sample_loop``, ``ddim_sample_loop``,
``calc_bpd_loop``) live in :mod:`tf_iddpm.chains`, which builds on this module.
"""

import enum
import math
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import tensorflow as tf

from tf_iddpm import choices
from tf_iddpm import losses
from tf_iddpm import schedules

ModelFn = Callable[..., tf.Tensor]


class ModelMeanType(enum.Enum):
    """What the network's first C output channels predict."""

    PREVIOUS_X = "previous_x"  # the posterior mean of x_{t-1}
    START_X = "start_x"  # x_0
    EPSILON = "epsilon"  # the noise (Ho et al.; the paper's default)


class ModelVarType(enum.Enum):
    """How the reverse-process variance Sigma_theta(x_t, t) is obtained (Section 3.1)."""

    LEARNED = "learned"  # the net outputs log Sigma directly
    FIXED_SMALL = "fixed_small"  # Sigma = beta_tilde_t (posterior variance)
    FIXED_LARGE = "fixed_large"  # Sigma = beta_t
    LEARNED_RANGE = "learned_range"  # Eq. 15: log-space interpolation between the two


class LossType(enum.Enum):
    """Training objective (Section 3.1 L_hybrid / L_simple, Section 3.3 L_vlb)."""

    MSE = "mse"  # L_simple (+ L_vlb term for learned variances = L_hybrid)
    RESCALED_MSE = "rescaled_mse"  # as MSE, with the vb term scaled by T/1000 (lambda = 0.001)
    KL = "kl"  # L_vlb
    RESCALED_KL = "rescaled_kl"  # L_vlb * T, the loss of Ho et al.'s VLB experiments

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def _parse_enum(enum_cls, value, what):
    if isinstance(value, enum_cls):
        return value
    allowed = [m.value for m in enum_cls]
    if isinstance(value, str):
        lowered = value.lower()
        for member in enum_cls:
            if lowered in (member.value, member.name.lower()):
                return member
    raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def mean_flat(x):
    """Mean over all non-batch dimensions: [N, ...] -> [N]."""
    return tf.reduce_mean(x, axis=tf.range(1, tf.rank(x)))


def extract(table, t):
    """Gathers per-example constants: table[t] cast to float32, shaped [N, 1, 1, 1].

    Args:
      table: float64 numpy array or tensor [T] of per-timestep constants.
      t: int tensor [N] of timestep indices.

    Returns:
      float32 tensor [N, 1, 1, 1], to multiply NHWC images.
    """
    values = tf.cast(tf.gather(tf.convert_to_tensor(table, tf.float64), t), tf.float32)
    return tf.reshape(values, tf.concat([tf.shape(values), tf.ones([3], tf.int32)], 0))


def diffusion_constants(betas) -> Dict[str, tf.Tensor]:
    """Every per-timestep constant of the forward process and its posterior (Eq. 9-12), in float64.

    Works on a constant schedule (eagerly) and on a tensor inside a graph (the exported sampler
    respaces the chain per request).

    Args:
      betas: float64 [T] noise schedule, each in (0, 1].

    Returns:
      dict of float64 tensors [T]: betas, log_betas, alphas_cumprod (alpha_bar_t),
      alphas_cumprod_prev (alpha_bar_{t-1}, 1 at t = 0), alphas_cumprod_next (0 at t = T-1),
      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
      sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance (beta_tilde_t,
      Eq. 10), posterior_log_variance_clipped, posterior_mean_coef1 / coef2 (Eq. 11),
      fixed_large_variance / fixed_large_log_variance (Sigma = beta_t with beta_tilde_1 at t = 0).
    """
    betas = tf.convert_to_tensor(betas, tf.float64)
    alphas = 1.0 - betas
    alphas_cumprod = tf.math.cumprod(alphas)
    one = tf.ones([1], tf.float64)
    alphas_cumprod_prev = tf.concat([one, alphas_cumprod[:-1]], 0)
    alphas_cumprod_next = tf.concat([alphas_cumprod[1:], tf.zeros([1], tf.float64)], 0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta_tilde_0 = 0, so its log is clipped to beta_tilde_1.  (For a one-step chain there is no
    # beta_tilde_1; beta_0 stands in: indexing [1] of the extended vector picks it only then.)
    beta_tilde_1 = tf.concat([posterior_variance, betas[:1]], 0)[1:2]
    posterior_log_variance_clipped = tf.math.log(
        tf.concat([beta_tilde_1, posterior_variance[1:]], 0)
    )
    fixed_large_variance = tf.concat([beta_tilde_1, betas[1:]], 0)
    return dict(
        betas=betas,
        log_betas=tf.math.log(betas),
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        alphas_cumprod_next=alphas_cumprod_next,
        sqrt_alphas_cumprod=tf.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=tf.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=tf.math.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=tf.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=tf.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * tf.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * tf.sqrt(alphas) / (1.0 - alphas_cumprod),
        fixed_large_variance=fixed_large_variance,
        fixed_large_log_variance=tf.math.log(fixed_large_variance),
    )


class GaussianDiffusion:
    """A T-step Gaussian diffusion and its learned reverse process.

    Attributes (float64 numpy [T] when built eagerly from a constant schedule, float64 tensors
    when built inside a graph): every key of :func:`diffusion_constants`, plus ``timestep_map``
    (int64 [T]: the original step index of each step; ``arange(T)`` for an unrespaced process) and
    ``original_num_steps``.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps: bool = False,
        timestep_map=None,
        original_num_steps: Optional[int] = None,
        cdf: str = "exact",
    ):
        """Builds the process.

        Args:
          betas: float64 [T] noise schedule.
          model_mean_type: ModelMeanType or its name ("epsilon", "start_x", "previous_x").
          model_var_type: ModelVarType or its name ("learned", "learned_range", "fixed_small",
            "fixed_large").
          loss_type: LossType or its name ("mse", "rescaled_mse", "kl", "rescaled_kl").
          rescale_timesteps: feed the network t scaled to 0..1000 (float) instead of the integer
            index, so that models trained with different T see the same range.
          timestep_map: original step index of each step of a respaced process (default: identity).
          original_num_steps: T of the process the network was trained on (default: T).
          cdf: "exact" or "approx" normal CDF in the discretised decoder (see losses).
        """
        self.model_mean_type = _parse_enum(ModelMeanType, model_mean_type, "model mean type")
        self.model_var_type = _parse_enum(ModelVarType, model_var_type, "model variance type")
        self.loss_type = _parse_enum(LossType, loss_type, "loss type")
        if cdf not in choices.CDF_MODES:
            raise ValueError(f"unknown cdf mode {cdf!r}; allowed: {', '.join(choices.CDF_MODES)}")
        self.cdf = cdf
        self.rescale_timesteps = bool(rescale_timesteps)

        constant_schedule = not isinstance(betas, (tf.Tensor, tf.Variable)) or hasattr(
            betas, "numpy"
        )
        if constant_schedule:
            betas_np = np.asarray(betas, dtype=np.float64)
            if betas_np.ndim != 1 or betas_np.size == 0:
                raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas_np.shape}")
            if not np.all((betas_np > 0) & (betas_np <= 1)):
                raise ValueError("betas must lie in (0, 1]")
        if constant_schedule:
            with tf.init_scope():  # eager even when built inside a tf.function
                constants = {k: v.numpy() for k, v in diffusion_constants(betas).items()}
        else:
            constants = diffusion_constants(betas)
        for name, value in constants.items():
            setattr(self, name, value)

        static_t = (
            tf.get_static_value(tf.shape(constants["betas"])[0])
            if not constant_schedule
            else len(self.betas)
        )
        # A python int whenever it is known, so shapes and messages stay static.
        self.num_timesteps = (
            int(static_t) if static_t is not None else tf.shape(constants["betas"])[0]
        )
        if timestep_map is None:
            timestep_map = (
                np.arange(self.num_timesteps, dtype=np.int64)
                if constant_schedule
                else tf.range(self.num_timesteps, dtype=tf.int64)
            )
        self.timestep_map = timestep_map
        self.original_num_steps = (
            original_num_steps if original_num_steps is not None else self.num_timesteps
        )

    # ------------------------------------------------------------------ timesteps seen by the net

    def model_timesteps(self, t):
        """The timestep input the network receives for diffusion step indices t.

        The index goes through ``timestep_map`` (respaced processes keep the original numbering the
        network was trained with) and, with ``rescale_timesteps``, is scaled to 0..1000 as float32:
        float32(t_orig) * float32(1000 / original_num_steps), exactly the reference's arithmetic.

        Args:
          t: int tensor [N] of step indices of this process.

        Returns:
          float32 [N] if rescaling, else int32 [N].
        """
        original_t = tf.gather(tf.convert_to_tensor(self.timestep_map, tf.int64), t)
        if self.rescale_timesteps:
            scale = tf.cast(1000.0 / tf.cast(self.original_num_steps, tf.float64), tf.float32)
            return tf.cast(original_t, tf.float32) * scale
        return tf.cast(original_t, tf.int32)

    def _check_timesteps(self, t):
        t = tf.convert_to_tensor(t)
        if not t.dtype.is_integer:
            raise ValueError(f"timesteps must be integer indices, got dtype {t.dtype.name}")
        t = tf.cast(t, tf.int32)
        value = tf.get_static_value(t)
        if value is not None and isinstance(self.num_timesteps, int):
            value = np.asarray(value)
            bad = value[(value < 0) | (value >= self.num_timesteps)]
            if bad.size:
                raise ValueError(
                    f"timestep(s) {sorted(set(bad.tolist()))[:8]} out of range; "
                    f"allowed: 0..{self.num_timesteps - 1}"
                )
        return t

    # ------------------------------------------------------------------ forward process q

    def q_mean_variance(self, x_start, t):
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Eq. 9).

        Returns:
          (mean [N,H,W,C], variance [N,1,1,1], log_variance [N,1,1,1]).
        """
        t = self._check_timesteps(t)
        mean = extract(self.sqrt_alphas_cumprod, t) * x_start
        variance = extract(1.0 - tf.convert_to_tensor(self.alphas_cumprod, tf.float64), t)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draws x_t ~ q(x_t | x_0) by reparameterisation: sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        Args:
          x_start: [N,H,W,C] data.
          t: int [N] step indices.
          noise: the eps to use (default: a fresh standard normal draw).

        Returns:
          x_t, same shape as x_start.
        """
        t = self._check_timesteps(t)
        if noise is None:
            noise = tf.random.normal(tf.shape(x_start))
        return (
            extract(self.sqrt_alphas_cumprod, t) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """The forward-process posterior q(x_{t-1} | x_t, x_0) (Eq. 10-12).

        Returns:
          (posterior_mean [N,H,W,C], posterior_variance [N,1,1,1],
           posterior_log_variance_clipped [N,1,1,1]).
        """
        t = self._check_timesteps(t)
        mean = (
            extract(self.posterior_mean_coef1, t) * x_start
            + extract(self.posterior_mean_coef2, t) * x_t
        )
        return (
            mean,
            extract(self.posterior_variance, t),
            extract(self.posterior_log_variance_clipped, t),
        )

    # ------------------------------------------------------------------ prediction conversions

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (inverting Eq. 9)."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t) * eps
        )

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1 / alpha_bar_t - 1)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t) * x_t - pred_xstart) / extract(
            self.sqrt_recipm1_alphas_cumprod, t
        )

    def predict_xstart_from_xprev(self, x_t, t, xprev):
        """Inverts the posterior mean (Eq. 11) for x_0 given the predicted mean of x_{t-1}."""
        coef1 = tf.convert_to_tensor(self.posterior_mean_coef1, tf.float64)
        coef2 = tf.convert_to_tensor(self.posterior_mean_coef2, tf.float64)
        return extract(1.0 / coef1, t) * xprev - extract(coef2 / coef1, t) * x_t

    # ------------------------------------------------------------------ reverse process p

    def split_model_output(self, model_output):
        """Splits [N,H,W,2C] output of a learned-variance model into (mean part, variance part)."""
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            mean_part, var_part = tf.split(model_output, 2, axis=-1)
            return mean_part, var_part
        return model_output, None

    def p_mean_variance_from_output(
        self, model_output, x, t, *, clip_denoised=True
    ) -> Dict[str, tf.Tensor]:
        """p(x_{t-1} | x_t) from the network's raw output (Section 3.1).

        Args:
          model_output: [N,H,W,C] or [N,H,W,2C] (learned variances) raw network output.
          x: x_t [N,H,W,C].
          t: int [N] step indices.
          clip_denoised: clip the predicted x_0 to [-1, 1].

        Returns:
          dict with mean, variance, log_variance (all [N,H,W,C]; fixed variances broadcast),
          pred_xstart [N,H,W,C].
        """
        model_output = tf.cast(model_output, tf.float32)
        t = tf.cast(t, tf.int32)
        model_output, var_values = self.split_model_output(model_output)
        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = var_values
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            # Eq. 15: v in [-1, 1] interpolates log Sigma between log beta_tilde_t and log beta_t.
            min_log = extract(self.posterior_log_variance_clipped, t)
            max_log = extract(self.log_betas, t)
            frac = (var_values + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            log_variance = extract(self.fixed_large_log_variance, t) * tf.ones_like(x)
        else:
            log_variance = extract(self.posterior_log_variance_clipped, t) * tf.ones_like(x)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            variance = tf.exp(log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = extract(self.fixed_large_variance, t) * tf.ones_like(x)
        else:
            variance = extract(self.posterior_variance, t) * tf.ones_like(x)

        pred_xstart = self._pred_xstart(model_output, x, t, clip_denoised=clip_denoised)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            mean = model_output
        else:
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(
            mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart
        )

    def _pred_xstart(self, mean_output, x, t, *, clip_denoised=True):
        """x_0 from the mean half of the output (eps, x_0 or x_{t-1}), clipped to [-1, 1]."""
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred = self.predict_xstart_from_xprev(x, t, mean_output)
        elif self.model_mean_type == ModelMeanType.START_X:
            pred = mean_output
        else:
            pred = self.predict_xstart_from_eps(x, t, mean_output)
        return tf.clip_by_value(pred, -1.0, 1.0) if clip_denoised else pred

    def predict_xstart_from_output(self, model_output, x, t, *, clip_denoised=True):
        """The network's prediction of x_0 at (x_t, t), whatever it predicts (eps, x_0, x_{t-1});
        a learned variance half is ignored.  Clipped to [-1, 1] with ``clip_denoised``.

        Args:
          model_output: [N,H,W,C] or [N,H,W,2C] raw network output.
          x: x_t [N,H,W,C].
          t: int [N] step indices.

        Returns:
          float32 [N,H,W,C].
        """
        mean_output, _ = self.split_model_output(tf.cast(model_output, tf.float32))
        return self._pred_xstart(mean_output, x, tf.cast(t, tf.int32), clip_denoised=clip_denoised)

    def p_mean_variance(
        self,
        model_fn: ModelFn,
        x,
        t,
        *,
        clip_denoised=True,
        model_kwargs: Optional[Mapping[str, Any]] = None,
    ) -> Dict[str, tf.Tensor]:
        """Runs the network on x_t and returns p(x_{t-1} | x_t) (see p_mean_variance_from_output).

        The returned dict also holds the raw ``model_output``.
        """
        t = self._check_timesteps(t)
        model_output = model_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        out = self.p_mean_variance_from_output(model_output, x, t, clip_denoised=clip_denoised)
        out["model_output"] = tf.cast(model_output, tf.float32)
        return out

    def p_sample_from_output(self, model_output, x, t, noise, *, clip_denoised=True):
        """One ancestral step x_{t-1} = mu + sigma * z (no noise at t = 0), from the raw output."""
        out = self.p_mean_variance_from_output(model_output, x, t, clip_denoised=clip_denoised)
        nonzero_mask = tf.reshape(tf.cast(tf.not_equal(t, 0), tf.float32), [-1, 1, 1, 1])
        sample = out["mean"] + nonzero_mask * tf.exp(0.5 * out["log_variance"]) * noise
        return dict(sample=sample, pred_xstart=out["pred_xstart"])

    def ddim_sample_from_output(self, model_output, x, t, noise, *, eta=0.0, clip_denoised=True):
        """One DDIM step (Song et al. Eq. 12; eta = 0 is deterministic) from the raw output.

        eps is re-derived from the (clipped) predicted x_0 so that clipping also constrains eps.
        """
        out = self.p_mean_variance_from_output(model_output, x, t, clip_denoised=clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = extract(self.alphas_cumprod, t)
        alpha_bar_prev = extract(self.alphas_cumprod_prev, t)
        eta = tf.cast(eta, tf.float32)
        sigma = (
            eta
            * tf.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
            * tf.sqrt(1.0 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * tf.sqrt(alpha_bar_prev)
            + tf.sqrt(1.0 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero_mask = tf.reshape(tf.cast(tf.not_equal(t, 0), tf.float32), [-1, 1, 1, 1])
        return dict(sample=mean_pred + nonzero_mask * sigma * noise, pred_xstart=out["pred_xstart"])

    # ------------------------------------------------------------------ variational bound

    def vb_terms_bpd_from_output(self, model_output, x_start, x_t, t, *, clip_denoised=True):
        """One term of the VLB (Eq. 4-6) in bits per dimension, per example.

        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretised
        decoder NLL L_0 = -log p(x_0 | x_1) at t = 0.

        Returns:
          dict with output [N] (bits/dim) and pred_xstart [N,H,W,C].
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(
            losses.normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        ) / math.log(2.0)

        def decoder_nll():
            return -mean_flat(
                losses.discretized_gaussian_log_likelihood(
                    x_start, means=out["mean"], log_scales=0.5 * out["log_variance"], cdf=self.cdf
                )
            ) / math.log(2.0)

        # The decoder term (the normal log-CDF in both tails, and its gradient: as costly as
        # several UNet layers) runs only for batches that hold a t = 0 example, ~1.6% of uniform
        # training batches of 16 and one step of a bits/dim chain.
        is_first = tf.equal(t, 0)
        decoder = tf.cond(tf.reduce_any(is_first), decoder_nll, lambda: tf.zeros_like(kl))
        return dict(output=tf.where(is_first, decoder, kl), pred_xstart=out["pred_xstart"])

    def prior_bpd(self, x_start):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example [N] (no parameters)."""
        t = tf.fill(tf.shape(x_start)[:1], tf.cast(self.num_timesteps, tf.int32) - 1)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(losses.normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    # ------------------------------------------------------------------ training objective

    def training_losses(self, model_fn: ModelFn, x_start, t, *, model_kwargs=None, noise=None):
        """Per-example training losses for a batch (Algorithm 1 with the paper's objectives).

        * KL / RESCALED_KL: loss = L_t of the VLB (times T for RESCALED_KL), clip_denoised=False.
        * MSE / RESCALED_MSE: mse = ||target - prediction||^2 averaged over pixels (target = eps,
          x_0 or the posterior mean).  With learned variances the VLB term is added with the mean
          prediction behind a stop-gradient (L_hybrid, Section 3.1: the VLB only trains Sigma);
          RESCALED_MSE scales it by T/1000 (lambda = 0.001 relative to the T-term VLB).

        Args:
          model_fn: the network, called as model_fn(x_t, model_timesteps(t), **model_kwargs).
          x_start: [N,H,W,C] data in [-1, 1].
          t: int [N] step indices.
          model_kwargs: extra network inputs (e.g. {"y": labels}).
          noise: the eps of q_sample (default: fresh standard normal).

        Returns:
          dict of float32 [N] tensors: "loss" always; "mse" for the MSE losses; "vb" for the MSE
          losses with learned variances (already scaled as it enters the loss).
        """
        t = self._check_timesteps(t)
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = tf.random.normal(tf.shape(x_start))
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = tf.cast(model_fn(x_t, self.model_timesteps(t), **model_kwargs), tf.float32)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self.vb_terms_bpd_from_output(
                model_output, x_start, x_t, t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * tf.cast(self.num_timesteps, tf.float32)
            return terms

        prediction, var_values = self.split_model_output(model_output)
        if var_values is not None:
            frozen_output = tf.concat([tf.stop_gradient(prediction), var_values], axis=-1)
            vb = self.vb_terms_bpd_from_output(frozen_output, x_start, x_t, t, clip_denoised=False)[
                "output"
            ]
            if self.loss_type == LossType.RESCALED_MSE:
                # Divide by 1000 for equivalence with the initial implementation; without the
                # factor the VLB term would hurt the MSE term (Section 3.1, lambda = 0.001).
                vb = vb * (tf.cast(self.num_timesteps, tf.float32) / 1000.0)
            terms["vb"] = vb
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat(tf.square(target - prediction))
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def respace(diffusion: GaussianDiffusion, use_timesteps) -> GaussianDiffusion:
    """The process that visits only `use_timesteps` of `diffusion` (Section 4).

    Marginals q(x_t | x_0) of the kept steps are preserved (new betas from alpha_bar ratios), and the
    returned process maps its step k to the original index ``timestep_map[k]`` when it calls the
    network, so a model trained on the full chain is used unchanged.

    Args:
      diffusion: the base process (may itself be respaced: maps compose).
      use_timesteps: kept step indices of `diffusion`, e.g. from schedules.space_timesteps.

    Returns:
      A new GaussianDiffusion with the same mean/variance/loss types.
    """
    betas, index_map = schedules.respace_betas(np.asarray(diffusion.alphas_cumprod), use_timesteps)
    return _restricted(
        diffusion, betas=betas, timestep_map=np.asarray(diffusion.timestep_map)[index_map]
    )


def _restricted(diffusion: GaussianDiffusion, *, betas, timestep_map) -> GaussianDiffusion:
    """A process with `diffusion`'s types and original numbering, on a new chain `betas` whose
    step k is the original step ``timestep_map[k]``: the one constructor of respaced processes."""
    return GaussianDiffusion(
        betas=betas,
        model_mean_type=diffusion.model_mean_type,
        model_var_type=diffusion.model_var_type,
        loss_type=diffusion.loss_type,
        rescale_timesteps=diffusion.rescale_timesteps,
        timestep_map=timestep_map,
        original_num_steps=diffusion.original_num_steps,
        cdf=diffusion.cdf,
    )


def uniform_respacing_indices(num_timesteps: int, num_steps):
    """space_timesteps(T, "K") computed with TF ops, so K can be a tensor (chosen per request).

    Same arithmetic as the reference: a float64 stride (T-1)/(K-1) accumulated by sequential
    addition (tf.scan) and rounded half to even.

    Args:
      num_timesteps: T (python int).
      num_steps: K, int scalar (tensor or python), 1 <= K <= T.

    Returns:
      int64 [K] sorted kept indices.
    """
    num_steps = tf.cast(num_steps, tf.int64)
    count = tf.cast(num_steps, tf.float64)
    frac_stride = tf.where(
        num_steps > 1,
        (num_timesteps - 1.0) / tf.maximum(count - 1.0, 1.0),
        tf.constant(1.0, tf.float64),
    )
    offsets = tf.scan(
        lambda acc, step: acc + step,
        tf.fill([num_steps - 1], frac_stride),
        initializer=tf.constant(0.0, tf.float64),
    )
    positions = tf.concat([tf.zeros([1], tf.float64), offsets], 0)
    return tf.cast(tf.math.round(positions), tf.int64)


def respace_uniform(diffusion: GaussianDiffusion, num_steps) -> GaussianDiffusion:
    """`diffusion` restricted to K evenly spaced steps ("K" respacing), K possibly a tensor.

    Eagerly with a python K this equals respace(diffusion, space_timesteps(T, str(K)));
    inside a graph it builds the respaced constants from K with TF ops.
    """
    if not isinstance(diffusion.num_timesteps, int):
        raise ValueError("respace_uniform needs a diffusion with a static number of steps")
    if isinstance(num_steps, (int, np.integer)):
        if not 1 <= num_steps <= diffusion.num_timesteps:
            raise ValueError(
                f"num_steps {num_steps} out of range; allowed: 1..{diffusion.num_timesteps}"
            )
        return respace(
            diffusion, schedules.space_timesteps(diffusion.num_timesteps, str(int(num_steps)))
        )
    indices = uniform_respacing_indices(diffusion.num_timesteps, num_steps)
    kept = tf.gather(tf.convert_to_tensor(diffusion.alphas_cumprod, tf.float64), indices)
    previous = tf.concat([tf.ones([1], tf.float64), kept[:-1]], 0)
    return _restricted(
        diffusion,
        betas=1.0 - kept / previous,
        timestep_map=tf.gather(tf.convert_to_tensor(diffusion.timestep_map, tf.int64), indices),
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
    cdf="exact",
) -> GaussianDiffusion:
    """The diffusion for improved-diffusion's flags (same names, same defaults, same meaning).

    Args:
      steps: T of the training process.
      learn_sigma: the network outputs 2C channels and Sigma is learned (learned_range, Eq. 15).
      sigma_small: with fixed variances, use beta_tilde_t (else beta_t).
      noise_schedule: "linear" or "cosine".
      use_kl: train on L_vlb (rescaled_kl) instead of L_simple / L_hybrid.
      predict_xstart: the network predicts x_0 instead of eps.
      rescale_timesteps: feed the network t on a 0..1000 scale.
      rescale_learned_sigmas: with learned sigmas, use rescaled_mse (L_hybrid with lambda = 0.001).
      timestep_respacing: "" (all steps) or a space_timesteps spec ("250", "10,10,10", "ddim50").
      cdf: decoder CDF, "exact" or "approx" (the reference's tanh approximation).

    Returns:
      A GaussianDiffusion (always carrying a timestep_map; the identity without respacing).
    """
    betas = schedules.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    base = GaussianDiffusion(
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
        cdf=cdf,
    )
    if not timestep_respacing:
        return base
    return respace(base, schedules.space_timesteps(steps, timestep_respacing))
