"""Likelihood terms of the variational bound (paper Eq. 4-6), built on TFP distributions.

All functions are elementwise (no reduction) and work in float32 (bfloat16 inputs are cast up:
TFP's normal CDF does not support bfloat16, and these terms are small differences of large
numbers where bfloat16 would lose the signal).
"""

import math

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_iddpm import choices

tfd = tfp.distributions

# Images are quantised to 256 levels in [-1, 1]: bins are 2/255 wide, centred on the data.
_HALF_BIN = 1.0 / 255.0
# x <= -0.999 is the lowest level (-1) and x >= 0.999 the highest (+1): their bins extend to
# -inf / +inf so that the 256 bin probabilities sum to one.
_EDGE = 0.999
# improved-diffusion clamps bin probabilities at 1e-12 before the log; keep the same floor so that
# bits/dim stay comparable (it only matters for bins the model gives < 1e-12).
_MIN_PROB = 1e-12


def _as_float(x):
    x = tf.convert_to_tensor(x)
    if x.dtype in (tf.float16, tf.bfloat16):
        x = tf.cast(x, tf.float32)
    return x


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    The L_{t-1} terms of Eq. 5: both the true posterior q(x_{t-1} | x_t, x_0) and the model
    p(x_{t-1} | x_t) are diagonal Gaussians, so the KL is closed-form.  Arguments broadcast
    (python scalars are allowed, e.g. normal_kl(mean, logvar, 0.0, 0.0) for the prior term).

    Args:
      mean1, logvar1: mean and log-variance of the first Gaussian.
      mean2, logvar2: mean and log-variance of the second Gaussian.

    Returns:
      KL divergence, broadcast shape of the inputs, float32 (float64 if the inputs are float64).
    """
    tensor_args = [
        a
        for a in (mean1, logvar1, mean2, logvar2)
        if isinstance(a, (tf.Tensor, tf.Variable, np.ndarray))
    ]
    dtype = _as_float(tensor_args[0]).dtype if tensor_args else tf.float32
    mean1, logvar1, mean2, logvar2 = (
        tf.cast(_as_float(a), dtype) for a in (mean1, logvar1, mean2, logvar2)
    )
    q = tfd.Normal(loc=mean1, scale=tf.exp(0.5 * logvar1))
    p = tfd.Normal(loc=mean2, scale=tf.exp(0.5 * logvar2))
    return tfd.kl_divergence(q, p)


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by improved-diffusion.

    Phi(x) ~= 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).  Its absolute error is below
    ~3e-4; it is kept only to reproduce the published bits/dim numbers (cdf="approx").

    The tanh itself is evaluated in float64 and rounded once: TF's float32 tanh is a fast
    rational approximation that saturates at +-(1 - 6e-8) instead of +-1, which changes log(CDF)
    in the tails by many nats; a correctly rounded tanh reproduces PyTorch's float32 values
    bit for bit.  (float64 is unavailable on TPU: use cdf="exact" there.)
    """
    x = _as_float(x)
    z = math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))
    tanh_z = tf.cast(tf.tanh(tf.cast(z, tf.float64)), z.dtype)
    return 0.5 * (1.0 + tanh_z)


def _approx_bin_log_probs(x, means, log_scales):
    centered_x = x - means
    inv_stdv = tf.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - _HALF_BIN))
    log_cdf_plus = tf.math.log(tf.maximum(cdf_plus, _MIN_PROB))
    log_one_minus_cdf_min = tf.math.log(tf.maximum(1.0 - cdf_min, _MIN_PROB))
    log_cdf_delta = tf.math.log(tf.maximum(cdf_plus - cdf_min, _MIN_PROB))
    return log_cdf_plus, log_one_minus_cdf_min, log_cdf_delta


def _log_sub_exp(larger, smaller):
    """log(exp(larger) - exp(smaller)) for larger >= smaller, with finite gradients everywhere.

    Written as larger + log(-expm1(smaller - larger)) with the difference capped just below zero.
    When the two log-CDFs agree to float precision the bin probability is unresolvable; the cap keeps
    value and gradient finite.  That matters: the decoder term is evaluated for every example and
    masked with tf.where, and an infinite gradient in a masked-out branch still becomes NaN
    (0 * inf).  tfp.math.log_sub_exp / log1mexp switch branches with tf.where internally and do
    produce such NaNs at equal arguments, hence this version.
    """
    difference = tf.minimum(smaller - larger, -1e-30)
    return larger + tf.math.log(-tf.math.expm1(difference))


def _exact_bin_log_probs(x, means, log_scales):
    decoder = tfd.Normal(loc=means, scale=tf.exp(log_scales))
    upper = x + _HALF_BIN
    lower = x - _HALF_BIN
    log_cdf_plus = decoder.log_cdf(upper)
    log_one_minus_cdf_min = decoder.log_survival_function(lower)
    # log(Phi(b) - Phi(a)) without cancellation: in the right tail both CDFs are ~1, so take the
    # difference of survival functions there instead.
    right_tail = x > means
    log_cdf_delta = tf.where(
        right_tail,
        _log_sub_exp(log_one_minus_cdf_min, decoder.log_survival_function(upper)),
        _log_sub_exp(log_cdf_plus, decoder.log_cdf(lower)),
    )
    floor = tf.math.log(tf.constant(_MIN_PROB, log_cdf_plus.dtype))
    return (
        tf.maximum(log_cdf_plus, floor),
        tf.maximum(log_one_minus_cdf_min, floor),
        tf.maximum(log_cdf_delta, floor),
    )


def discretized_gaussian_log_likelihood(x, *, means, log_scales, cdf="exact"):
    """Log-likelihood of 8-bit image data under a Gaussian discretised to 256 bins (L_0, Eq. 13 of Ho et al.).

    Each data value x in {-1, -1 + 2/255, ..., 1} owns the bin [x - 1/255, x + 1/255], with the two
    edge bins extended to -inf and +inf.

    Args:
      x: target images scaled to [-1, 1], any shape.
      means: Gaussian means, same shape.
      log_scales: Gaussian log standard deviations (NOT log variances), same shape.
      cdf: "exact" (TFP's normal log-CDF, numerically stable in the tails) or "approx" (the
        reference's tanh approximation, which reproduces published bits/dim).

    Returns:
      Elementwise log-probabilities in nats, same shape as x.
    """
    if cdf not in choices.CDF_MODES:
        raise ValueError(f"unknown cdf mode {cdf!r}; allowed: {', '.join(choices.CDF_MODES)}")
    x, means, log_scales = _as_float(x), _as_float(means), _as_float(log_scales)
    means = tf.cast(means, x.dtype)
    log_scales = tf.cast(log_scales, x.dtype)
    if cdf == "approx":
        log_cdf_plus, log_one_minus_cdf_min, log_cdf_delta = _approx_bin_log_probs(
            x, means, log_scales
        )
    else:
        log_cdf_plus, log_one_minus_cdf_min, log_cdf_delta = _exact_bin_log_probs(
            x, means, log_scales
        )
    return tf.where(
        x < -_EDGE, log_cdf_plus, tf.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta)
    )
