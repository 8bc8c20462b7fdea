"""KL and discretised Gaussian likelihood against the reference and closed forms."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tests import golden
from tf_iddpm import losses

TERMS = golden.load("terms")


def test_normal_kl_matches_reference_float32():
    kl = losses.normal_kl(
        TERMS["kl_mean1"], TERMS["kl_logvar1"], TERMS["kl_mean2"], TERMS["kl_logvar2"]
    )
    assert kl.dtype == tf.float32
    assert golden.max_rel_error(kl, TERMS["normal_kl"]) <= 1e-5


def test_normal_kl_matches_reference_float64():
    args = [
        TERMS[k].astype(np.float64) for k in ("kl_mean1", "kl_logvar1", "kl_mean2", "kl_logvar2")
    ]
    kl = losses.normal_kl(*args)
    assert kl.dtype == tf.float64
    assert golden.max_rel_error(kl, TERMS["normal_kl_f64"]) <= 1e-12


def test_normal_kl_against_standard_normal_with_python_scalars():
    kl = losses.normal_kl(TERMS["kl_mean1"], TERMS["kl_logvar1"], 0.0, 0.0)
    assert golden.max_rel_error(kl, TERMS["normal_kl_vs_std_normal"]) <= 1e-5


def test_normal_kl_closed_form_and_identity():
    rng = np.random.RandomState(0)
    m1, m2 = rng.randn(2, 100)
    lv1, lv2 = rng.uniform(-5, 2, (2, 100))
    expected = 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))
    np.testing.assert_allclose(losses.normal_kl(m1, lv1, m2, lv2).numpy(), expected, rtol=1e-10)
    np.testing.assert_array_equal(losses.normal_kl(m1, lv1, m1, lv1).numpy(), np.zeros(100))


def test_approx_cdf_matches_reference_bit_for_bit_in_float32():
    np.testing.assert_array_equal(
        losses.approx_standard_normal_cdf(TERMS["cdf_x"]).numpy(), TERMS["cdf"]
    )
    np.testing.assert_allclose(
        losses.approx_standard_normal_cdf(TERMS["cdf_x"].astype(np.float64)).numpy(),
        TERMS["cdf_f64"],
        rtol=1e-12,
        atol=1e-15,
    )


def test_discretized_likelihood_approx_matches_reference():
    log_probs = losses.discretized_gaussian_log_likelihood(
        TERMS["dgll_x"],
        means=TERMS["dgll_means"],
        log_scales=TERMS["dgll_log_scales"],
        cdf="approx",
    )
    assert golden.max_rel_error(log_probs, TERMS["dgll"]) <= 1e-5
    log_probs64 = losses.discretized_gaussian_log_likelihood(
        TERMS["dgll_x"].astype(np.float64),
        means=TERMS["dgll_means"].astype(np.float64),
        log_scales=TERMS["dgll_log_scales"].astype(np.float64),
        cdf="approx",
    )
    assert golden.max_rel_error(log_probs64, TERMS["dgll_f64"]) <= 1e-5


def _exact_bin_probs(x, mean, log_scale):
    """Bin probabilities of the discretised Gaussian from math.erf in float64."""

    def phi(z):
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    scale = math.exp(log_scale)
    upper = 1.0 if x > 0.999 else phi((x + 1 / 255 - mean) / scale)
    lower = 0.0 if x < -0.999 else phi((x - 1 / 255 - mean) / scale)
    return upper - lower


def test_discretized_likelihood_exact_against_erf():
    rng = np.random.RandomState(3)
    x = rng.randint(0, 256, 400) / 127.5 - 1.0
    means = x + 0.05 * rng.randn(400)
    log_scales = rng.uniform(-4, 0.5, 400)
    log_probs = losses.discretized_gaussian_log_likelihood(
        x, means=means, log_scales=log_scales, cdf="exact"
    )
    expected = np.log([max(_exact_bin_probs(*a), 1e-12) for a in zip(x, means, log_scales)])
    np.testing.assert_allclose(log_probs.numpy(), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cdf,tolerance", [("exact", 1e-6), ("approx", 1e-3)])
def test_bin_probabilities_sum_to_one(cdf, tolerance):
    rng = np.random.RandomState(1)
    means = rng.uniform(-1.2, 1.2, (64, 1)).astype(np.float32)
    log_scales = rng.uniform(-6, 0.5, (64, 1)).astype(np.float32)
    grid = np.broadcast_to((np.arange(256) / 127.5 - 1.0).astype(np.float32), (64, 256))
    log_probs = losses.discretized_gaussian_log_likelihood(
        grid,
        means=np.broadcast_to(means, grid.shape),
        log_scales=np.broadcast_to(log_scales, grid.shape),
        cdf=cdf,
    )
    totals = np.exp(log_probs.numpy().astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(totals, 1.0, atol=tolerance)


def test_exact_mode_is_accurate_in_the_far_tails():
    # Bins 6-7 standard deviations from the mean: the difference of two CDFs near 0 (left) or 1
    # (right) would cancel catastrophically in float32; the exact mode works from log-CDFs.
    scale = 0.03
    means = np.float32([0.2, -0.2])
    log_probs = losses.discretized_gaussian_log_likelihood(
        np.float32([0.0, 0.0]), means=means, log_scales=np.float32([np.log(scale)] * 2)
    ).numpy()

    def lower_tail(z):
        return 0.5 * math.erfc(-z / math.sqrt(2.0))

    expected_left = math.log(
        lower_tail((1 / 255 - 0.2) / scale) - lower_tail((-1 / 255 - 0.2) / scale)
    )
    np.testing.assert_allclose(log_probs, [expected_left, expected_left], rtol=1e-5)


def test_bfloat16_inputs_are_computed_in_float32():
    out = losses.discretized_gaussian_log_likelihood(
        tf.constant([0.0], tf.bfloat16),
        means=tf.constant([0.01], tf.bfloat16),
        log_scales=tf.constant([-2.0], tf.bfloat16),
    )
    assert out.dtype == tf.float32


def test_unknown_cdf_mode():
    with pytest.raises(ValueError, match=r"unknown cdf mode 'erf'; allowed: exact, approx"):
        losses.discretized_gaussian_log_likelihood(0.0, means=0.0, log_scales=0.0, cdf="erf")


@pytest.mark.parametrize("cdf", ["exact", "approx"])
def test_gradients_are_finite_even_for_hopeless_bins(cdf):
    # Edge bins with the mean far on the other side, and interior bins where both CDFs round to 1:
    # the training loss evaluates the decoder for every example and masks it with tf.where, so a
    # single inf in a masked branch would poison the whole gradient with NaN.
    x = tf.constant([-1.0, 1.0, 0.0, 0.0, 0.5, -1.0], tf.float32)
    means = tf.constant([2.1, -2.5, 30.0, -30.0, 0.5, 0.46], tf.float32)
    log_scales = tf.constant([-0.59, -0.59, -5.0, -5.0, -9.0, -1.44], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([means, log_scales])
        log_probs = losses.discretized_gaussian_log_likelihood(
            x, means=means, log_scales=log_scales, cdf=cdf
        )
        total = tf.reduce_sum(log_probs)
    grads = tape.gradient(total, [means, log_scales])
    assert np.all(np.isfinite(log_probs.numpy()))
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
