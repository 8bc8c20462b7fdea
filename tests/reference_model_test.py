"""Whole-model golden checks: the converted reference UNet through our diffusion, samplers and NLL loop.

The reference's recorded random draws are replayed (`step_noise`), so every number must match the
PyTorch run to float32 accuracy (rtol 1e-4 for the loops, 1e-5 for single-step terms).
"""

import numpy as np
import pytest
import tensorflow as tf

from tests import golden
from tf_iddpm import convert
from tf_iddpm import diffusion
from tf_iddpm import chains
from tf_iddpm import schedules
from tf_iddpm import unet

MAIN_ARGS = dict(
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=[2],
    dropout=0.0,
    channel_mult=[1, 2],
    conv_resample=True,
    num_classes=None,
    num_heads=2,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
)
VARIANT_ARGS = dict(
    MAIN_ARGS,
    out_channels=3,
    attention_resolutions=[1],
    channel_mult=[1],
    num_classes=10,
    num_heads=1,
    use_scale_shift_norm=False,
)


def _converted(args, weights_file):
    net = unet.UNetModel(**args)
    labels = tf.zeros([1], tf.int32) if args["num_classes"] else None
    net(tf.zeros([1, 8, 8, 3]), tf.zeros([1]), y=labels)
    convert.assign_state_dict(net, convert.load_state_dict(golden.path(weights_file)))
    return net


@pytest.fixture(scope="module")
def main_net():
    return _converted(MAIN_ARGS, "unet_weights.npz")


@pytest.fixture(scope="module")
def variant_net():
    return _converted(VARIANT_ARGS, "unet_variant_weights.npz")


def _model_fn(net):
    return lambda x, t, **kwargs: net(x, t, training=False, **kwargs)


SAMPLING = golden.load("sampling")


@pytest.mark.parametrize("run", ["p_sample", "ddim_eta0", "ddim_eta0p5"])
def test_strided_sampling_replays_reference(main_net, run):
    process = diffusion.create_gaussian_diffusion(
        steps=100,
        learn_sigma=True,
        noise_schedule="cosine",
        rescale_timesteps=True,
        timestep_respacing="10",
    )
    np.testing.assert_array_equal(process.timestep_map, SAMPLING["timestep_map"])
    kwargs = dict(
        noise=golden.nhwc(SAMPLING["noise_init"]),
        clip_denoised=True,
        step_noise=golden.nhwc(SAMPLING[f"{run}_step_noise"]),
    )
    shape = golden.nhwc(SAMPLING["noise_init"]).shape
    if run == "p_sample":
        final = chains.p_sample_loop(process, _model_fn(main_net), shape, **kwargs)
    else:
        final = chains.ddim_sample_loop(
            process, _model_fn(main_net), shape, eta=0.5 if run.endswith("0p5") else 0.0, **kwargs
        )
    error = golden.max_rel_error(final, golden.nhwc(SAMPLING[f"{run}_final"]))
    assert error <= 1e-4, error


NLL = golden.load("nll")


@pytest.mark.parametrize("case", ["plain_cosine_T50", "spaced_linear_T1000_r25"])
def test_calc_bpd_loop_replays_reference(main_net, case):
    if case.startswith("plain"):
        process = diffusion.GaussianDiffusion(
            betas=schedules.get_named_beta_schedule("cosine", 50),
            model_mean_type="epsilon",
            model_var_type="learned_range",
            loss_type="rescaled_mse",
            rescale_timesteps=True,
            cdf="approx",
        )
    else:
        process = diffusion.create_gaussian_diffusion(
            steps=1000,
            learn_sigma=True,
            noise_schedule="linear",
            rescale_timesteps=True,
            timestep_respacing="25",
            cdf="approx",
        )
    out = chains.calc_bpd_loop(
        process,
        _model_fn(main_net),
        golden.nhwc(NLL["x_start"]),
        clip_denoised=True,
        step_noise=golden.nhwc(NLL[f"{case}_noise"]),
    )
    for key in ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"):
        error = golden.max_rel_error(out[key], NLL[f"{case}_{key}"])
        assert error <= 1e-4, (key, error)
    np.testing.assert_allclose(
        out["total_bpd"].numpy(), out["prior_bpd"].numpy() + out["vb"].numpy().sum(1), rtol=1e-6
    )


def test_model_timesteps_seen_by_the_network_match_reference():
    process = diffusion.create_gaussian_diffusion(
        steps=1000,
        learn_sigma=True,
        noise_schedule="linear",
        rescale_timesteps=True,
        timestep_respacing="25",
        cdf="approx",
    )
    seen = [
        process.model_timesteps(tf.fill([2], process.num_timesteps - 1 - k)).numpy()
        for k in range(process.num_timesteps)
    ]
    np.testing.assert_array_equal(np.stack(seen), NLL["spaced_linear_T1000_r25_model_timesteps"])


VARIANT = golden.load("variant")


@pytest.mark.parametrize(
    "name,mean_type,var_type",
    [
        ("eps_fixedlarge", "epsilon", "fixed_large"),
        ("eps_fixedsmall", "epsilon", "fixed_small"),
        ("xstart_fixedsmall", "start_x", "fixed_small"),
    ],
)
def test_variant_losses_and_p_mean_variance(variant_net, name, mean_type, var_type):
    process = diffusion.GaussianDiffusion(
        betas=schedules.get_named_beta_schedule("linear", 1000),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type="mse",
        rescale_timesteps=True,
    )
    kwargs = {"y": tf.constant(VARIANT["y"], tf.int32)}
    x_start, noise, t = golden.nhwc(VARIANT["x_start"]), golden.nhwc(VARIANT["noise"]), VARIANT["t"]
    terms = process.training_losses(
        _model_fn(variant_net), x_start, t, model_kwargs=kwargs, noise=noise
    )
    assert set(terms) == {"loss", "mse"}
    for key in ("loss", "mse"):
        assert golden.max_rel_error(terms[key], VARIANT[f"{name}_{key}"]) <= 1e-4, key
    out = process.p_mean_variance(
        _model_fn(variant_net),
        process.q_sample(x_start, t, noise),
        t,
        clip_denoised=True,
        model_kwargs=kwargs,
    )
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert golden.max_rel_error(out[key], golden.nhwc(VARIANT[f"{name}_pmv_{key}"])) <= 1e-4, (
            key
        )


@pytest.mark.parametrize(
    "run,sigma_small,predict_xstart,ddim",
    [
        ("sample_fixedlarge", False, False, False),
        ("sample_fixedsmall_xstart", True, True, False),
        ("ddim_fixedlarge_eta0", False, False, True),
    ],
)
def test_variant_class_conditional_sampling(variant_net, run, sigma_small, predict_xstart, ddim):
    process = diffusion.create_gaussian_diffusion(
        steps=50,
        learn_sigma=False,
        sigma_small=sigma_small,
        predict_xstart=predict_xstart,
        noise_schedule="linear",
        rescale_timesteps=True,
        timestep_respacing="5",
    )
    np.testing.assert_array_equal(process.timestep_map, VARIANT[f"{run}_timestep_map"])
    noise = golden.nhwc(VARIANT["sample_noise_init"])
    kwargs = dict(
        noise=noise,
        clip_denoised=True,
        model_kwargs={"y": tf.constant(VARIANT["sample_y"], tf.int32)},
        step_noise=golden.nhwc(VARIANT[f"{run}_step_noise"]),
    )
    loop = chains.ddim_sample_loop if ddim else chains.p_sample_loop
    final = loop(process, _model_fn(variant_net), noise.shape, **kwargs)
    assert golden.max_rel_error(final, golden.nhwc(VARIANT[f"{run}_final"])) <= 1e-4


@pytest.mark.slow
def test_seeded_samples_do_not_depend_on_the_batch_split(main_net):
    process = diffusion.create_gaussian_diffusion(
        steps=100,
        learn_sigma=True,
        noise_schedule="cosine",
        rescale_timesteps=True,
        timestep_respacing="5",
    )
    seeds = tf.constant([11, 12, 13], tf.int64)
    together = chains.p_sample_loop(process, _model_fn(main_net), [3, 8, 8, 3], seeds=seeds)
    apart = [
        chains.p_sample_loop(process, _model_fn(main_net), [1, 8, 8, 3], seeds=seeds[i : i + 1])
        for i in range(3)
    ]
    np.testing.assert_allclose(
        together.numpy(), np.concatenate([a.numpy() for a in apart]), atol=1e-5
    )
    again = chains.p_sample_loop(process, _model_fn(main_net), [3, 8, 8, 3], seeds=seeds)
    np.testing.assert_array_equal(together.numpy(), again.numpy())
