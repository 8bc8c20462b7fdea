"""GaussianDiffusion against the reference's recorded outputs and closed forms."""

import numpy as np
import pytest
import tensorflow as tf

from tests import golden
from tf_iddpm import diffusion
from tf_iddpm import schedules

LOSSES = golden.load("losses")
LOSS_TYPES = ["mse", "rescaled_mse", "kl", "rescaled_kl"]


def _process(schedule, loss_type, num_timesteps=4000, **kwargs):
    kwargs.setdefault("model_var_type", "learned_range")
    kwargs.setdefault("model_mean_type", "epsilon")
    return diffusion.GaussianDiffusion(
        betas=schedules.get_named_beta_schedule(schedule, num_timesteps),
        loss_type=loss_type,
        rescale_timesteps=True,
        cdf="approx",
        **kwargs,
    )


def _recorded_model(output):
    """A model_fn that returns the reference network's recorded output and records its inputs."""
    calls = []

    def model_fn(x, t):
        calls.append((x, t))
        return output

    return model_fn, calls


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_training_losses_match_reference(schedule, loss_type):
    output = tf.constant(golden.nhwc(LOSSES[f"{schedule}_model_output"]))
    model_fn, calls = _recorded_model(output)
    process = _process(schedule, loss_type)
    with tf.GradientTape() as tape:
        tape.watch(output)
        terms = process.training_losses(
            model_fn,
            golden.nhwc(LOSSES["x_start"]),
            LOSSES["t"],
            noise=golden.nhwc(LOSSES["noise"]),
        )
        total = tf.reduce_sum(terms["loss"])
    expected_keys = {"loss", "mse", "vb"} if loss_type.endswith("mse") else {"loss"}
    assert set(terms) == expected_keys
    for key in terms:
        assert terms[key].shape == (4,)
        assert golden.max_rel_error(terms[key], LOSSES[f"{schedule}_{loss_type}_{key}"]) <= 1e-5, (
            key
        )
    # The hybrid loss's stop-gradient: eps channels receive only the mse gradient.
    gradient = tape.gradient(total, output)
    assert (
        golden.max_rel_error(
            gradient, golden.nhwc(LOSSES[f"{schedule}_{loss_type}_grad_model_output"])
        )
        <= 1e-5
    )
    ((x_t, model_t),) = calls
    assert golden.max_rel_error(x_t, golden.nhwc(LOSSES[f"{schedule}_x_t"])) <= 1e-6
    np.testing.assert_array_equal(model_t.numpy(), LOSSES[f"{schedule}_model_timesteps"])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_p_mean_variance_and_posterior_match_reference(schedule):
    output = golden.nhwc(LOSSES[f"{schedule}_model_output"])
    model_fn, _ = _recorded_model(output)
    process = _process(schedule, "mse")
    x_t = golden.nhwc(LOSSES[f"{schedule}_x_t"])
    out = process.p_mean_variance(model_fn, x_t, LOSSES["t"], clip_denoised=False)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert (
            golden.max_rel_error(out[key], golden.nhwc(LOSSES[f"{schedule}_pmv_{key}"])) <= 1e-5
        ), key
    mean, _, log_variance = process.q_posterior_mean_variance(
        golden.nhwc(LOSSES["x_start"]), x_t, LOSSES["t"]
    )
    assert golden.max_rel_error(mean, golden.nhwc(LOSSES[f"{schedule}_q_posterior_mean"])) <= 1e-5
    assert (
        golden.max_rel_error(
            np.broadcast_to(log_variance, mean.shape),
            golden.nhwc(LOSSES[f"{schedule}_q_posterior_log_variance_clipped"]),
        )
        <= 1e-6
    )


def test_q_sample_moments():
    process = _process("cosine", "mse", num_timesteps=1000)
    x_start = np.full([20000, 2, 2, 1], 0.5, np.float32)
    t = np.full([20000], 300)
    samples = process.q_sample(x_start, t).numpy()
    abar = process.alphas_cumprod[300]
    np.testing.assert_allclose(samples.mean(), np.sqrt(abar) * 0.5, atol=0.01)
    np.testing.assert_allclose(samples.var(), 1 - abar, rtol=0.02)
    mean, variance, log_variance = process.q_mean_variance(x_start[:2], t[:2])
    np.testing.assert_allclose(mean.numpy(), np.sqrt(abar) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(variance.numpy().ravel(), 1 - abar, rtol=1e-6)
    np.testing.assert_allclose(log_variance.numpy().ravel(), np.log(1 - abar), rtol=1e-6)


def test_posterior_is_the_gaussian_conditional():
    # Eq. 10-13 from first principles: x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e and
    # x_{t-1} ~ N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}); condition the joint Gaussian on x_t.
    process = _process("linear", "mse", num_timesteps=1000)
    rng = np.random.RandomState(0)
    x_start = rng.randn(5, 3, 3, 2).astype(np.float32)
    x_t = rng.randn(5, 3, 3, 2).astype(np.float32)
    t = np.array([1, 10, 200, 700, 999])
    mean, variance, _ = process.q_posterior_mean_variance(x_start, x_t, t)
    beta = process.betas[t][:, None, None, None]
    abar_prev = process.alphas_cumprod_prev[t][:, None, None, None]
    prior_mean, prior_var = np.sqrt(abar_prev) * x_start, 1 - abar_prev
    gain = prior_var * np.sqrt(1 - beta) / ((1 - beta) * prior_var + beta)
    expected_mean = prior_mean + gain * (x_t - np.sqrt(1 - beta) * prior_mean)
    expected_var = prior_var * beta / ((1 - beta) * prior_var + beta)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(variance.numpy().ravel(), expected_var.ravel(), rtol=1e-5)


def test_eps_xstart_xprev_round_trips():
    process = _process("cosine", "mse", num_timesteps=1000)
    rng = np.random.RandomState(1)
    x_t = tf.constant(rng.randn(4, 4, 4, 3).astype(np.float32))
    eps = tf.constant(rng.randn(4, 4, 4, 3).astype(np.float32))
    t = tf.constant([0, 5, 500, 900])
    x_start = process.predict_xstart_from_eps(x_t, t, eps)
    np.testing.assert_allclose(
        process.predict_eps_from_xstart(x_t, t, x_start).numpy(), eps.numpy(), rtol=1e-4, atol=1e-4
    )
    mean, _, _ = process.q_posterior_mean_variance(x_start, x_t, t)
    np.testing.assert_allclose(
        process.predict_xstart_from_xprev(x_t, t, mean).numpy(),
        x_start.numpy(),
        rtol=1e-3,
        atol=1e-3,
    )


def test_fixed_variance_types_and_previous_x_mean():
    process = _process(
        "linear",
        "mse",
        num_timesteps=1000,
        model_var_type="fixed_large",
        model_mean_type="previous_x",
    )
    x = tf.zeros([2, 2, 2, 1])
    t = tf.constant([0, 10])
    output = tf.fill([2, 2, 2, 1], 0.25)
    out = process.p_mean_variance_from_output(output, x, t, clip_denoised=False)
    np.testing.assert_allclose(out["mean"].numpy(), 0.25)
    expected = [process.posterior_variance[1], process.betas[10]]
    np.testing.assert_allclose(out["variance"].numpy()[:, 0, 0, 0], expected, rtol=1e-6)
    small = _process("linear", "mse", num_timesteps=1000, model_var_type="fixed_small")
    out = small.p_mean_variance_from_output(output, x, t)
    np.testing.assert_allclose(
        out["log_variance"].numpy()[:, 0, 0, 0],
        small.posterior_log_variance_clipped[[0, 10]],
        rtol=1e-6,
    )


def test_learned_range_interpolates_between_beta_tilde_and_beta():
    process = _process("cosine", "mse", num_timesteps=1000)
    x = tf.zeros([3, 1, 1, 1])
    t = tf.constant([100, 100, 100])
    v = tf.reshape(tf.constant([-1.0, 0.0, 1.0]), [3, 1, 1, 1])
    out = process.p_mean_variance_from_output(tf.concat([x, v], -1), x, t)
    low, high = process.posterior_log_variance_clipped[100], process.log_betas[100]
    np.testing.assert_allclose(
        out["log_variance"].numpy().ravel(), [low, (low + high) / 2, high], rtol=1e-6
    )


def test_model_timesteps_rescaling_and_respacing_map():
    process = diffusion.create_gaussian_diffusion(
        steps=1000, rescale_timesteps=True, timestep_respacing="10"
    )
    t = tf.constant([0, 1, 9])
    np.testing.assert_array_equal(
        process.model_timesteps(t).numpy(),
        np.float32(process.timestep_map[[0, 1, 9]]) * np.float32(1.0),
    )
    raw = diffusion.create_gaussian_diffusion(
        steps=4000, rescale_timesteps=False, timestep_respacing="10"
    )
    assert raw.model_timesteps(t).dtype == tf.int32
    np.testing.assert_array_equal(raw.model_timesteps(t).numpy(), raw.timestep_map[[0, 1, 9]])


def test_create_gaussian_diffusion_flag_mapping():
    d = diffusion.create_gaussian_diffusion(learn_sigma=True, rescale_learned_sigmas=True)
    assert (d.model_var_type, d.loss_type) == (
        diffusion.ModelVarType.LEARNED_RANGE,
        diffusion.LossType.RESCALED_MSE,
    )
    d = diffusion.create_gaussian_diffusion(use_kl=True, sigma_small=True, predict_xstart=True)
    assert (d.model_var_type, d.loss_type, d.model_mean_type) == (
        diffusion.ModelVarType.FIXED_SMALL,
        diffusion.LossType.RESCALED_KL,
        diffusion.ModelMeanType.START_X,
    )
    assert (
        diffusion.create_gaussian_diffusion().model_var_type == diffusion.ModelVarType.FIXED_LARGE
    )


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (
            dict(model_mean_type="noise"),
            r"unknown model mean type 'noise'; allowed: previous_x, start_x, epsilon",
        ),
        (
            dict(model_var_type="learnt"),
            r"unknown model variance type 'learnt'; allowed: learned, fixed_small",
        ),
        (
            dict(loss_type="l1"),
            r"unknown loss type 'l1'; allowed: mse, rescaled_mse, kl, rescaled_kl",
        ),
        (dict(cdf="erf"), r"unknown cdf mode 'erf'"),
    ],
)
def test_bad_names_are_rejected(kwargs, pattern):
    args = dict(
        betas=np.full(10, 0.1),
        model_mean_type="epsilon",
        model_var_type="fixed_small",
        loss_type="mse",
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        diffusion.GaussianDiffusion(**args)


def test_timesteps_out_of_range_are_rejected():
    process = _process("linear", "mse", num_timesteps=100)
    x = tf.zeros([2, 2, 2, 1])
    with pytest.raises(ValueError, match=r"timestep\(s\) \[100\] out of range; allowed: 0..99"):
        process.q_sample(x, [3, 100])
    with pytest.raises(ValueError, match=r"\[-1\] out of range"):
        process.training_losses(lambda x, t: tf.zeros([2, 2, 2, 2]), x, [-1, 0])
    with pytest.raises(ValueError, match="integer indices"):
        process.q_sample(x, [0.5, 1.0])


def test_bad_respacing_is_rejected():
    with pytest.raises(ValueError, match="cannot divide section of 100 steps into 250"):
        diffusion.create_gaussian_diffusion(steps=100, timestep_respacing="250")


def test_a_process_can_be_built_inside_a_tf_function():
    @tf.function
    def noisy(x):
        process = diffusion.create_gaussian_diffusion(steps=100, timestep_respacing="5")
        return process.q_sample(x, [3], noise=tf.zeros_like(x))

    expected = diffusion.create_gaussian_diffusion(
        steps=100, timestep_respacing="5"
    ).sqrt_alphas_cumprod[3]
    np.testing.assert_allclose(noisy(tf.ones([1, 2, 2, 1])).numpy(), np.float32(expected))
