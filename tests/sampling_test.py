"""Whole-chain loops: closed forms, in-graph respacing, compile-once and replay plumbing."""

import math

import numpy as np
import pytest
from scipy import stats
import tensorflow as tf

from tf_iddpm import diffusion
from tf_iddpm import sample_lib
from tf_iddpm import sampling
from tf_iddpm import schedules


def _zero_model(x, t, **kwargs):
    del t, kwargs
    return tf.zeros(tf.concat([tf.shape(x)[:3], [2 * x.shape[-1]]], 0))


def _numpy_vlb_of_zero_model(process, x_start, noise):
    """Eq. 4 evaluated in float64 numpy for a network whose output is identically zero.

    eps_theta = 0 gives pred_x0 = x_t / sqrt(abar_t); v = 0 puts log Sigma halfway between
    log beta_tilde_t and log beta_t (Eq. 15); no clipping.
    """
    x_start = x_start.astype(np.float64)
    num_steps = process.num_timesteps
    vb = np.zeros([x_start.shape[0], num_steps])
    for k in range(num_steps):
        t = num_steps - 1 - k
        eps = noise[k].astype(np.float64)
        x_t = np.sqrt(process.alphas_cumprod[t]) * x_start + np.sqrt(1 - process.alphas_cumprod[t]) * eps
        c1, c2 = process.posterior_mean_coef1[t], process.posterior_mean_coef2[t]
        mu_q, logvar_q = c1 * x_start + c2 * x_t, process.posterior_log_variance_clipped[t]
        mu_p = c1 * x_t / np.sqrt(process.alphas_cumprod[t]) + c2 * x_t
        logvar_p = 0.5 * (process.log_betas[t] + process.posterior_log_variance_clipped[t])
        if t > 0:
            kl = 0.5 * (-1 + logvar_p - logvar_q + np.exp(logvar_q - logvar_p) + (mu_q - mu_p) ** 2 * np.exp(-logvar_p))
            vb[:, k] = kl.reshape(len(x_start), -1).mean(1) / math.log(2)
        else:
            scale = np.exp(0.5 * logvar_p)
            upper = np.where(x_start > 0.999, np.inf, x_start + 1 / 255)
            lower = np.where(x_start < -0.999, -np.inf, x_start - 1 / 255)
            probs = stats.norm.cdf(upper, mu_p, scale) - stats.norm.cdf(lower, mu_p, scale)
            vb[:, k] = -np.log(np.maximum(probs, 1e-12)).reshape(len(x_start), -1).mean(1) / math.log(2)
    abar_last = process.alphas_cumprod[-1]
    mean, logvar = np.sqrt(abar_last) * x_start, np.log(1 - abar_last)
    prior = (0.5 * (-1 - logvar + np.exp(logvar) + mean ** 2)).reshape(len(x_start), -1).mean(1) / math.log(2)
    return vb, prior


@pytest.mark.parametrize("respacing", ["", "7"])
def test_bpd_of_a_zero_output_model_equals_its_closed_form(respacing):
    process = diffusion.create_gaussian_diffusion(steps=20, learn_sigma=True, noise_schedule="cosine",
                                                  rescale_timesteps=True, timestep_respacing=respacing)
    rng = np.random.RandomState(0)
    x_start = (rng.randint(0, 256, [3, 4, 4, 3]) / 127.5 - 1).astype(np.float32)
    noise = rng.randn(process.num_timesteps, 3, 4, 4, 3).astype(np.float32)
    out = sampling.calc_bpd_loop(process, _zero_model, x_start, clip_denoised=False, step_noise=noise)
    vb, prior = _numpy_vlb_of_zero_model(process, x_start, noise)
    np.testing.assert_allclose(out["vb"].numpy(), vb, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out["prior_bpd"].numpy(), prior, rtol=1e-4)
    np.testing.assert_allclose(out["total_bpd"].numpy(), prior + vb.sum(1), rtol=2e-4)
    np.testing.assert_allclose(out["total_bpd"].numpy(), out["prior_bpd"].numpy() + out["vb"].numpy().sum(1),
                               rtol=1e-6)


def test_in_graph_uniform_respacing_equals_space_timesteps():
    base = diffusion.create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                               rescale_timesteps=True)

    @tf.function
    def tables(num_steps):
        process = diffusion.respace_uniform(base, num_steps)
        return process.betas, process.timestep_map, process.posterior_log_variance_clipped

    for num_steps in [1, 2, 3, 10, 25, 49, 50, 100, 250, 333, 999, 1000]:
        betas, timestep_map, log_var = tables(tf.constant(num_steps))
        expected = diffusion.respace(base, schedules.space_timesteps(1000, str(num_steps)))
        np.testing.assert_array_equal(timestep_map.numpy(), expected.timestep_map)
        np.testing.assert_allclose(betas.numpy(), expected.betas, rtol=1e-13)
        if num_steps > 1:
            np.testing.assert_allclose(log_var.numpy(), expected.posterior_log_variance_clipped, rtol=1e-12)
    assert tables.experimental_get_tracing_count() == 1


def test_sampler_compiles_once_per_shape_and_step_count():
    process = diffusion.create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="5")
    sampler = sample_lib.Sampler(_zero_model, process, image_shape=[4, 4, 3])
    first = sampler(np.arange(4))
    sampler(np.arange(3))     # a smaller last batch
    sampler(np.arange(4) + 10)
    assert sampler.sample_batch.experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(sampler(np.arange(4)).numpy(), first.numpy())
    assert first.shape == (4, 4, 4, 3)


def test_ddim_eta0_is_deterministic_given_x_T_and_ignores_step_noise():
    process = diffusion.create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="ddim10")
    x_T = np.random.RandomState(1).randn(2, 4, 4, 3).astype(np.float32)
    a = sampling.ddim_sample_loop(process, _zero_model, x_T.shape, noise=x_T, seeds=tf.constant([1, 2], tf.int64))
    b = sampling.ddim_sample_loop(process, _zero_model, x_T.shape, noise=x_T, seeds=tf.constant([3, 4], tf.int64))
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_step_noise_length_must_match_the_chain():
    process = diffusion.create_gaussian_diffusion(steps=100, timestep_respacing="10")
    with pytest.raises(ValueError, match="step_noise holds 9 draws but the chain has 10 steps"):
        sampling.p_sample_loop(process, _zero_model, [1, 4, 4, 3], step_noise=np.zeros([9, 1, 4, 4, 3], np.float32))


def test_respace_uniform_rejects_out_of_range_step_counts():
    base = diffusion.create_gaussian_diffusion(steps=100)
    for bad in (0, 101):
        with pytest.raises(ValueError, match=r"num_steps .* out of range; allowed: 1..100"):
            diffusion.respace_uniform(base, bad)
