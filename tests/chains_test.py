"""Whole-chain loops: closed forms, in-graph respacing, compile-once and replay plumbing."""

import math

import numpy as np
import pytest
from scipy import stats
import tensorflow as tf

from tf_iddpm import diffusion
from tf_iddpm import chains
from tf_iddpm import inference
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
        x_t = (
            np.sqrt(process.alphas_cumprod[t]) * x_start
            + np.sqrt(1 - process.alphas_cumprod[t]) * eps
        )
        c1, c2 = process.posterior_mean_coef1[t], process.posterior_mean_coef2[t]
        mu_q, logvar_q = c1 * x_start + c2 * x_t, process.posterior_log_variance_clipped[t]
        mu_p = c1 * x_t / np.sqrt(process.alphas_cumprod[t]) + c2 * x_t
        logvar_p = 0.5 * (process.log_betas[t] + process.posterior_log_variance_clipped[t])
        if t > 0:
            kl = 0.5 * (
                -1
                + logvar_p
                - logvar_q
                + np.exp(logvar_q - logvar_p)
                + (mu_q - mu_p) ** 2 * np.exp(-logvar_p)
            )
            vb[:, k] = kl.reshape(len(x_start), -1).mean(1) / math.log(2)
        else:
            scale = np.exp(0.5 * logvar_p)
            upper = np.where(x_start > 0.999, np.inf, x_start + 1 / 255)
            lower = np.where(x_start < -0.999, -np.inf, x_start - 1 / 255)
            probs = stats.norm.cdf(upper, mu_p, scale) - stats.norm.cdf(lower, mu_p, scale)
            vb[:, k] = -np.log(np.maximum(probs, 1e-12)).reshape(len(x_start), -1).mean(
                1
            ) / math.log(2)
    abar_last = process.alphas_cumprod[-1]
    mean, logvar = np.sqrt(abar_last) * x_start, np.log(1 - abar_last)
    prior = (0.5 * (-1 - logvar + np.exp(logvar) + mean**2)).reshape(len(x_start), -1).mean(
        1
    ) / math.log(2)
    return vb, prior


@pytest.mark.parametrize("respacing", ["", "7"])
def test_bpd_of_a_zero_output_model_equals_its_closed_form(respacing):
    process = diffusion.create_gaussian_diffusion(
        steps=20,
        learn_sigma=True,
        noise_schedule="cosine",
        rescale_timesteps=True,
        timestep_respacing=respacing,
    )
    rng = np.random.RandomState(0)
    x_start = (rng.randint(0, 256, [3, 4, 4, 3]) / 127.5 - 1).astype(np.float32)
    noise = rng.randn(process.num_timesteps, 3, 4, 4, 3).astype(np.float32)
    out = chains.calc_bpd_loop(process, _zero_model, x_start, clip_denoised=False, step_noise=noise)
    vb, prior = _numpy_vlb_of_zero_model(process, x_start, noise)
    np.testing.assert_allclose(out["vb"].numpy(), vb, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out["prior_bpd"].numpy(), prior, rtol=1e-4)
    np.testing.assert_allclose(out["total_bpd"].numpy(), prior + vb.sum(1), rtol=2e-4)
    np.testing.assert_allclose(
        out["total_bpd"].numpy(), out["prior_bpd"].numpy() + out["vb"].numpy().sum(1), rtol=1e-6
    )


def test_in_graph_uniform_respacing_equals_space_timesteps():
    base = diffusion.create_gaussian_diffusion(
        steps=1000, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True
    )

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
            np.testing.assert_allclose(
                log_var.numpy(), expected.posterior_log_variance_clipped, rtol=1e-12
            )
    assert tables.experimental_get_tracing_count() == 1


def test_sampler_compiles_once_per_shape_and_step_count():
    process = diffusion.create_gaussian_diffusion(
        steps=100, learn_sigma=True, timestep_respacing="5"
    )
    sampler = inference.Sampler(_zero_model, chains.AncestralChain(process), image_shape=[4, 4, 3])
    first = sampler(np.arange(4))
    sampler(np.arange(3))  # a smaller last batch
    sampler(np.arange(4) + 10)
    assert sampler.sample_batch.experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(sampler(np.arange(4)).numpy(), first.numpy())
    assert first.shape == (4, 4, 4, 3)


def test_ddim_eta0_is_deterministic_given_x_T_and_ignores_step_noise():
    process = diffusion.create_gaussian_diffusion(
        steps=100, learn_sigma=True, timestep_respacing="ddim10"
    )
    x_T = np.random.RandomState(1).randn(2, 4, 4, 3).astype(np.float32)
    a = chains.ddim_sample_loop(
        process, _zero_model, x_T.shape, noise=x_T, seeds=tf.constant([1, 2], tf.int64)
    )
    b = chains.ddim_sample_loop(
        process, _zero_model, x_T.shape, noise=x_T, seeds=tf.constant([3, 4], tf.int64)
    )
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_step_noise_length_must_match_the_chain():
    process = diffusion.create_gaussian_diffusion(steps=100, timestep_respacing="10")
    with pytest.raises(ValueError, match="step_noise holds 9 draws but the chain has 10 steps"):
        chains.p_sample_loop(
            process, _zero_model, [1, 4, 4, 3], step_noise=np.zeros([9, 1, 4, 4, 3], np.float32)
        )


def test_respace_uniform_rejects_out_of_range_step_counts():
    base = diffusion.create_gaussian_diffusion(steps=100)
    for bad in (0, 101):
        with pytest.raises(ValueError, match=r"num_steps .* out of range; allowed: 1..100"):
            diffusion.respace_uniform(base, bad)


def _wavy_model(x, t, **kwargs):
    """A cheap network whose output depends on x, t and the labels, so chunking errors show."""
    scale = 1.0 + tf.cast(
        tf.reshape(kwargs.get("y", tf.zeros_like(t, tf.int32)), [-1, 1, 1, 1]), tf.float32
    )
    phase = tf.reshape(tf.cast(t, tf.float32), [-1, 1, 1, 1]) * 0.01
    return tf.concat([tf.tanh(0.7 * x + phase) / scale, 0.3 * tf.sin(x - phase)], -1)


def test_chunk_bounds_cover_the_chain_in_about_32_calls():
    assert chains.chunk_bounds(10) == [(k, k + 1) for k in range(10)]
    bounds = chains.chunk_bounds(1000)
    assert len(bounds) == 32 and bounds[0] == (0, 32) and bounds[-1] == (992, 1000)
    assert chains.chunk_bounds(50, num_chunks=20) == [(k, min(k + 3, 50)) for k in range(0, 50, 3)]


@pytest.mark.parametrize("loop", ["p_sample", "ddim"])
def test_chunked_sampling_is_bit_identical_to_the_one_call_loop(loop):
    process = diffusion.create_gaussian_diffusion(
        steps=100, learn_sigma=True, noise_schedule="cosine", timestep_respacing="25"
    )
    seeds = tf.constant([3, 14, 15], tf.int64)
    kwargs = dict(seeds=seeds, model_kwargs={"y": tf.constant([0, 1, 2], tf.int32)})
    if loop == "ddim":
        kwargs["eta"] = 0.5
    run = chains.ddim_sample_loop if loop == "ddim" else chains.p_sample_loop
    shape = [3, 4, 4, 3]
    whole = run(process, _wavy_model, shape, **kwargs)
    steps_fn = tf.function(
        lambda x, begin, end: run(
            process, _wavy_model, shape, noise=x, steps=(begin, end), **kwargs
        )
    )
    x = chains.seeded_normal(seeds, 0, shape[1:])
    bounds = chains.chunk_bounds(process.num_timesteps, num_chunks=7)
    assert len(bounds) == 7
    for begin, end in bounds:
        x = steps_fn(x, tf.constant(begin), tf.constant(end))
    assert steps_fn.experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(x.numpy(), whole.numpy())


def test_chunked_bpd_is_bit_identical_to_the_one_call_loop():
    process = diffusion.create_gaussian_diffusion(
        steps=100, learn_sigma=True, noise_schedule="linear", timestep_respacing="20"
    )
    x_start = np.random.default_rng(5).uniform(-1, 1, [2, 4, 4, 3]).astype(np.float32)
    seeds = tf.constant([7, 8], tf.int64)
    whole = chains.calc_bpd_loop(process, _wavy_model, x_start, seeds=seeds)
    chunk_fn = tf.function(
        lambda begin, end: chains.calc_bpd_loop(
            process, _wavy_model, x_start, seeds=seeds, steps=(begin, end)
        )
    )
    chunks = [
        chunk_fn(tf.constant(b), tf.constant(e)) for b, e in chains.chunk_bounds(20, num_chunks=6)
    ]
    assert [c["vb"].shape[1] for c in chunks] == [4, 4, 4, 4, 4]
    joined = chains.bpd_from_chunks(process, x_start, chunks)
    assert sorted(joined) == sorted(whole)
    for key in whole:
        np.testing.assert_array_equal(joined[key].numpy(), whole[key].numpy(), err_msg=key)


def test_sampler_in_chunks_equals_the_one_call_sampler():
    process = diffusion.create_gaussian_diffusion(
        steps=100, learn_sigma=True, timestep_respacing="40"
    )
    sampler = inference.Sampler(
        _wavy_model, chains.AncestralChain(process), image_shape=[4, 4, 3], class_cond=True
    )
    ticks = []
    chunked = sampler.sample_in_chunks(np.arange(3), np.array([2, 0, 1]), on_chunk=ticks.append)
    assert sum(ticks) == 40 and len(ticks) == 20
    np.testing.assert_array_equal(
        chunked.numpy(), sampler(np.arange(3), np.array([2, 0, 1])).numpy()
    )
    sampler.sample_in_chunks(np.arange(2))
    assert sampler.sample_steps.experimental_get_tracing_count() == 1


def test_chunked_loops_need_seeds_or_recorded_noise():
    process = diffusion.create_gaussian_diffusion(
        steps=100, learn_sigma=True, timestep_respacing="10"
    )
    with pytest.raises(ValueError, match="needs seeds or step_noise"):
        chains.p_sample_loop(process, _zero_model, [1, 4, 4, 3], steps=(0, 5))


def test_evaluator_chunked_sums_equal_the_one_call_sums():
    process = diffusion.create_gaussian_diffusion(
        steps=100, learn_sigma=True, timestep_respacing="12"
    )
    evaluator = inference.BpdEvaluator(_wavy_model, process, seed=3)
    batch = {
        "image": tf.constant(np.random.default_rng(1).uniform(-1, 1, [3, 4, 4, 3]), tf.float32),
        "index": tf.constant([0, 1, -1]),
        "mask": tf.constant([True, True, False]),
    }
    bounds = [(tf.constant(b), tf.constant(e)) for b, e in chains.chunk_bounds(12, num_chunks=5)]
    whole = tf.function(evaluator.replica_sums)(batch)
    chunk = tf.function(evaluator.replica_chunk)
    chunked = tf.function(evaluator.replica_chunk_sums)(
        batch, [chunk(batch, b, e) for b, e in bounds]
    )
    for key in whole:
        np.testing.assert_array_equal(chunked[key].numpy(), whole[key].numpy(), err_msg=key)


SOLVERS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")


@pytest.mark.parametrize("kind", SOLVERS)
def test_a_solver_run_in_chunks_is_bit_identical_to_one_call(kind):
    process = diffusion.create_gaussian_diffusion(
        steps=100, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True
    )
    chain = chains.make_chain(kind, process, steps=9)
    sampler = inference.Sampler(_wavy_model, chain, image_shape=[4, 4, 3], class_cond=True)
    seeds, labels = np.array([3, 14, 15]), np.array([2, 0, 1])
    ticks = []
    chunked = sampler.sample_in_chunks(seeds, labels, on_chunk=ticks.append)
    assert sum(ticks) == 9 and len(ticks) == 9
    np.testing.assert_array_equal(chunked.numpy(), sampler(seeds, labels).numpy())
    assert sampler.sample_steps.experimental_get_tracing_count() == 1
    assert np.all(np.isfinite(chunked.numpy()))


@pytest.mark.parametrize("kind", SOLVERS + ("ancestral",))
def test_sampler_loops_compile_with_xla(kind):
    process = diffusion.create_gaussian_diffusion(
        steps=100, learn_sigma=True, noise_schedule="cosine", rescale_timesteps=True
    )
    chain = chains.make_chain(kind, process, steps="6")
    shape = [2, 4, 4, 3]
    rng = np.random.default_rng(0)
    noise = tf.constant(rng.normal(size=shape), tf.float32)
    step_noise = tf.constant(rng.normal(size=[chain.num_steps, *shape]), tf.float32)

    def replayed():
        return chains.sample_loop(chain, _wavy_model, shape, noise=noise, step_noise=step_noise)

    # The same draws give the same images up to rounding, compiled or not.
    compiled = tf.function(replayed, jit_compile=True)
    np.testing.assert_allclose(compiled().numpy(), tf.function(replayed)().numpy(), atol=1e-4)
    assert compiled.experimental_get_tracing_count() == 1

    # Seeded streams compile too, and stay per image: image 1's draws do not depend on image 0.
    @tf.function(jit_compile=True)
    def seeded(seeds):
        return chains.sample_loop(chain, _wavy_model, [2, 4, 4, 3], seeds=seeds)

    first = seeded(tf.constant([1, 2], tf.int64)).numpy()
    np.testing.assert_array_equal(seeded(tf.constant([1, 2], tf.int64)).numpy(), first)
    np.testing.assert_allclose(
        seeded(tf.constant([7, 2], tf.int64)).numpy()[1], first[1], atol=1e-6
    )
    assert np.all(np.isfinite(first))


@pytest.mark.parametrize(
    "flags",
    [
        dict(learn_sigma=False, predict_xstart=True),  # x0-predicting, fixed variances
        dict(learn_sigma=False, sigma_small=True),
        dict(learn_sigma=True, steps=4000),  # T = 4000 cosine: lambda falls to -10 at the end
        dict(learn_sigma=True, noise_schedule="linear", rescale_timesteps=False),  # integer t
    ],
)
def test_solvers_take_every_kind_of_model(flags):
    flags = {"steps": 100, "noise_schedule": "cosine", "rescale_timesteps": True, **flags}
    process = diffusion.create_gaussian_diffusion(**flags)
    channels = 6 if flags["learn_sigma"] else 3
    seen = []

    def model(x, t, **kwargs):
        del kwargs
        seen.append(t.dtype)
        out = tf.tanh(0.5 * x) * 0.9
        return tf.concat([out, tf.zeros_like(out)], -1)[..., :channels]

    for kind in SOLVERS:
        chain = chains.make_chain(kind, process, steps=7)
        out = chains.sample_loop(chain, model, [2, 4, 4, 3], seeds=tf.constant([5, 6], tf.int64))
        assert out.shape == (2, 4, 4, 3) and np.all(np.isfinite(out.numpy())), kind
        assert np.abs(out.numpy()).max() <= 1.0  # the last step is the clipped prediction
        timesteps = chain.timesteps.numpy()
        assert timesteps[-1] == 0 and np.all(np.diff(timesteps) < 0)
    assert set(seen) == {tf.float32 if flags["rescale_timesteps"] else tf.int32}


def test_the_deterministic_solvers_draw_no_noise_and_the_sde_one_uses_the_seeded_streams():
    process = diffusion.create_gaussian_diffusion(steps=100, learn_sigma=True)
    x_T = np.random.default_rng(0).normal(size=[2, 4, 4, 3]).astype(np.float32)
    for kind in ("dpmpp_2m", "dpmpp_3m", "unipc"):
        chain = chains.make_chain(kind, process, steps=5)
        assert not chain.draws_noise
        a = chains.sample_loop(chain, _wavy_model, x_T.shape, noise=x_T, seeds=tf.constant([1, 2]))
        b = chains.sample_loop(chain, _wavy_model, x_T.shape, noise=x_T, seeds=tf.constant([3, 4]))
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    chain = chains.make_chain("dpmpp_2m_sde", process, steps=5)
    a = chains.sample_loop(chain, _wavy_model, x_T.shape, noise=x_T, seeds=tf.constant([1, 2]))
    b = chains.sample_loop(chain, _wavy_model, x_T.shape, noise=x_T, seeds=tf.constant([3, 4]))
    assert np.abs(a.numpy() - b.numpy()).max() > 1e-3
