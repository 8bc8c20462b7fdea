"""Few-step solvers against closed forms: exactness for polynomials, convergence order, moments.

On Gaussian data x_0 ~ N(mu, s^2 I) the exact noise prediction is known,
eps(x_t) = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2), and so is the exact solution of
the probability-flow ODE: x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z along a trajectory
(z fixed by the start).  That gives the solvers' error against the truth, without a network.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_iddpm import chains
from tf_iddpm import diffusion
from tf_iddpm import schedules
from tf_iddpm import solvers

MU, SCALE = 0.3, 0.5


def _alpha_sigma(lam):
    """alpha, sigma of a variance-preserving process at lambda = log(alpha / sigma)."""
    sigma = 1.0 / math.sqrt(1.0 + math.exp(2.0 * lam))
    return math.exp(lam) * sigma, sigma


def _f64(value):
    return tf.constant(value, tf.float64)


def _exact_step(x_s, data, lam_s, lam_t):
    """x_t = (sigma_t/sigma_s) x_s + sigma_t * integral of e^lambda data(lambda), by quadrature."""
    grid = np.linspace(lam_s, lam_t, 20001)
    integral = np.trapezoid(np.exp(grid) * data(grid), grid)
    sigma_s, sigma_t = _alpha_sigma(lam_s)[1], _alpha_sigma(lam_t)[1]
    return sigma_t / sigma_s * x_s + sigma_t * integral


def _step_args(lam_s, lam_t):
    alpha_t, sigma_t = _alpha_sigma(lam_t)
    return dict(
        h=_f64(lam_t - lam_s),
        alpha_t=_f64(alpha_t),
        sigma_t=_f64(sigma_t),
        sigma_s=_f64(_alpha_sigma(lam_s)[1]),
    )


# ---------------------------------------------------------------------------------------------
# Single updates.
# ---------------------------------------------------------------------------------------------


def test_a_first_order_update_is_a_ddim_step_between_the_same_timesteps():
    base = diffusion.create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    process = diffusion.respace(base, [350, 600])  # its step 1 is t = 600, step 0 is t = 350
    x = tf.random.stateless_normal([2, 4, 4, 3], seed=[3, 4])
    eps = tf.random.stateless_normal([2, 4, 4, 3], seed=[5, 6])
    t = tf.constant([1, 1])
    ddim = process.ddim_sample_from_output(eps, x, t, tf.zeros_like(x), clip_denoised=False)
    lambdas = schedules.half_log_snr(np.asarray(base.alphas_cumprod))
    abar = np.asarray(base.alphas_cumprod)
    ours = solvers.dpmpp_first_order(
        x,
        ddim["pred_xstart"],
        h=_f64(lambdas[350] - lambdas[600]),
        alpha_t=_f64(np.sqrt(abar[350])),
        sigma_t=_f64(np.sqrt(1 - abar[350])),
        sigma_s=_f64(np.sqrt(1 - abar[600])),
    )
    np.testing.assert_allclose(ours.numpy(), ddim["sample"].numpy(), atol=2e-6)


def test_a_2m_step_equals_its_closed_form_worked_by_hand():
    # lambda_s = 0, lambda_t = 0.5, the previous point at -0.4: h = 0.5, h_prev = 0.4, r = 0.8,
    # D = D0 + (D0 - D1) / (2r) = 0.1 + 0.4 / 1.6 = 0.35.  sigma = 1 / sqrt(1 + e^{2 lambda}):
    # sigma_s = 0.707107, sigma_t = 0.518596, alpha_t = e^{0.5} sigma_t = 0.855020;
    # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-0.5} - 1) D
    #     = 0.733407 * 0.8 + 0.855020 * 0.393469 * 0.35 = 0.586724 + 0.117748 = 0.704472.
    x_t = solvers.dpmpp_2m(
        _f64([0.8]), _f64([0.1]), _f64([-0.3]), h_prev=_f64(0.4), **_step_args(0.0, 0.5)
    )
    assert float(x_t[0]) == pytest.approx(0.704472, abs=1e-6)


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_each_update_integrates_data_predictions_of_its_degree_exactly(degree):
    """A step of order p whose interpolation is exact for x0(lambda) of degree p - 1 in lambda
    integrates such data predictions exactly."""
    coefficients = [0.2, -0.7, 0.9][: degree + 1]

    def data(lam):
        return sum(c * np.asarray(lam) ** i for i, c in enumerate(coefficients))

    lam_t, lam_s, lam_1, lam_2, lam_3 = 0.1, -0.4, -0.9, -1.3, -1.6
    x_s = 0.37
    exact = _exact_step(x_s, data, lam_s, lam_t)
    x = _f64([x_s])
    m = [_f64([float(data(lam))]) for lam in (lam_s, lam_1, lam_2, lam_3)]
    common = _step_args(lam_s, lam_t)
    results = {}
    if degree == 0:
        results["DPM-Solver++(1)"] = solvers.dpmpp_first_order(x, m[0], **common)
    if degree == 0:
        # 2M (the paper's Algorithm 2, "midpoint" form) approximates even the linear term, to
        # O(h^3) per step: second order, as the convergence test checks, but exact only here.
        results["DPM-Solver++(2M)"] = solvers.dpmpp_2m(
            x, m[0], m[1], h_prev=_f64(lam_s - lam_1), **common
        )
    results["DPM-Solver++(3M)"] = solvers.dpmpp_3m(
        x, m[0], m[1], m[2], h_prev=_f64(lam_s - lam_1), h_prev2=_f64(lam_1 - lam_2), **common
    )
    previous = [_f64(lam) for lam in (lam_1, lam_2)]
    # UniP-p is of order p, UniC-p (given the exact prediction at t) of order p + 1.  UniP-2 and
    # UniC-1 take rho = 1/2 as the reference code does: like 2M, second order but exact only for
    # constants; the others solve their order conditions and are exact up to their degree.
    for order in [p for p in range(degree + 1, 4) if p != 2 or degree == 0]:
        results[f"UniP-{order}"] = solvers.unipc_predictor(
            x,
            m[0],
            m[1:order],
            lambda_s=_f64(lam_s),
            previous_lambdas=previous[: order - 1],
            **common,
        )
    for order in [p for p in range(max(degree, 1), 4) if p != 1 or degree == 0]:
        results[f"UniC-{order}"] = solvers.unipc_corrector(
            x,
            m[0],
            m[1:order],
            _f64([float(data(lam_t))]),
            lambda_s=_f64(lam_s),
            previous_lambdas=previous[: order - 1],
            **common,
        )
    for name, value in results.items():
        assert float(value[0]) == pytest.approx(exact, abs=1e-9), name


def test_the_3m_curvature_term_has_the_taylor_coefficient():
    # DPM-Solver's and diffusers' multistep third-order update weight the second difference D2
    # (which estimates h^2 x0''/2) by phi_3 instead of 2 phi_3, so they are exact only up to
    # linear x0(lambda).  With the Taylor coefficient the update is exact for quadratics (above)
    # and the method converges at third order (test_deterministic_solvers_converge_at_their_order).
    lam_t, lam_s, lam_1, lam_2 = 0.1, -0.4, -0.9, -1.3

    def data(lam):
        return 0.9 * np.asarray(lam) ** 2

    exact = _exact_step(0.37, data, lam_s, lam_t)
    ours = solvers.dpmpp_3m(
        _f64([0.37]),
        *[_f64([float(data(lam))]) for lam in (lam_s, lam_1, lam_2)],
        h_prev=_f64(lam_s - lam_1),
        h_prev2=_f64(lam_1 - lam_2),
        **_step_args(lam_s, lam_t),
    )
    assert abs(float(ours[0]) - exact) < 1e-9
    h, r0, r1 = lam_t - lam_s, (lam_s - lam_1) / (lam_t - lam_s), (lam_1 - lam_2) / (lam_t - lam_s)
    m0, m1, m2 = (float(data(lam)) for lam in (lam_s, lam_1, lam_2))
    d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
    phi3 = (math.expm1(-h) + h) / h**2 - 0.5
    half_weighted = float(ours[0]) + _alpha_sigma(lam_t)[0] * phi3 * d2  # the references' value
    assert abs(half_weighted - exact) > 1e-3


# ---------------------------------------------------------------------------------------------
# Grids and orders.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, steps", [("cosine", 1000), ("linear", 1000), ("cosine", 4000)])
@pytest.mark.parametrize("grid", ["logsnr", "time_uniform", "karras"])
def test_grids_are_strictly_decreasing_integer_timesteps_from_the_start_to_zero(
    schedule, steps, grid
):
    betas = schedules.get_named_beta_schedule(schedule, steps)
    abar = np.cumprod(1 - betas)
    lambdas = schedules.half_log_snr(abar)
    assert np.all(np.isfinite(lambdas)) and np.all(np.diff(lambdas) < 0)
    start = schedules.solver_start_index(abar)
    assert lambdas[start] >= schedules.SOLVER_LAMBDA_MIN
    assert start == steps - 1 or lambdas[start + 1] < schedules.SOLVER_LAMBDA_MIN
    assert schedules.solver_max_steps(betas) == start + 1
    for count in (1, 2, 3, 10, 25, 100, start + 1):
        t = solvers.solver_timesteps(lambdas, start, count, grid).numpy()
        assert len(t) == count and t[0] == start
        assert np.all(np.diff(t) < 0) and t[-1] == (0 if count > 1 else start)
    assert np.array_equal(
        solvers.solver_timesteps(lambdas, start, start + 1, grid).numpy(), np.arange(start, -1, -1)
    )


def test_the_logsnr_grid_is_uniform_in_lambda_where_steps_are_fine():
    betas = schedules.get_named_beta_schedule("cosine", 4000)
    abar = np.cumprod(1 - betas)
    lambdas = schedules.half_log_snr(abar)
    start = schedules.solver_start_index(abar)
    t = solvers.solver_timesteps(lambdas, start, 10, "logsnr").numpy()
    targets = np.linspace(lambdas[start], lambdas[0], 10)
    # Each point is the integer step nearest its target: within half a step's change of lambda.
    half_step = 0.5 * np.abs(np.diff(lambdas)).max()
    assert np.all(np.abs(lambdas[t] - targets)[1:-1] <= half_step)


def test_orders_rise_with_the_history_and_fall_at_the_end():
    def orders(count, order, unipc):
        return [
            int(solvers.multistep_order(k, count, order, lower_final_always=unipc))
            for k in range(count)
        ]

    assert orders(10, 3, False) == [1, 2, 3, 3, 3, 3, 3, 3, 2, 0]
    assert orders(20, 3, False) == [1, 2] + [3] * 17 + [0]
    assert orders(20, 2, False) == [1] + [2] * 18 + [0]
    assert orders(20, 3, True) == [1, 2] + [3] * 16 + [2, 0]
    assert orders(1, 2, False) == [0] and orders(2, 3, False) == [1, 0]


# ---------------------------------------------------------------------------------------------
# Whole chains on Gaussian data.
# ---------------------------------------------------------------------------------------------


def _gaussian_model(process):
    """The exact eps-prediction for x_0 ~ N(MU, SCALE^2) (integer timesteps of ``process``)."""
    abar = tf.constant(np.asarray(process.alphas_cumprod), tf.float64)

    def model(x, t, **kwargs):
        del kwargs
        a = tf.cast(tf.sqrt(tf.gather(abar, t)), x.dtype)[:, None, None, None]
        s = tf.cast(tf.sqrt(1.0 - tf.gather(abar, t)), x.dtype)[:, None, None, None]
        return s * (x - a * MU) / (a * a * SCALE**2 + s * s)

    return model


def _ode_solution(process, x_start, start):
    """The exact probability-flow ODE from x at t = start to t = 0, then x0_hat there."""
    abar = np.cumprod(1.0 - np.asarray(process.betas))
    a, s = np.sqrt(abar[start]), np.sqrt(1 - abar[start])
    z = (x_start - a * MU) / np.sqrt(a * a * SCALE**2 + s * s)
    a0, s0 = np.sqrt(abar[0]), np.sqrt(1 - abar[0])
    x0 = a0 * MU + np.sqrt(a0 * a0 * SCALE**2 + s0 * s0) * z
    eps = s0 * (x0 - a0 * MU) / (a0 * a0 * SCALE**2 + s0 * s0)
    return (x0 - s0 * eps) / a0


def _lambda_linear_process(num_steps=20000):
    """A process whose lambda falls linearly from 5 to -5: integer timesteps are then a fine,
    even grid in lambda, so a solver's grid is uniform up to 1/2000 of its step."""
    abar = 1.0 / (1.0 + np.exp(-2.0 * np.linspace(5.0, -5.0, num_steps)))
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    return diffusion.GaussianDiffusion(
        betas=betas, model_mean_type="epsilon", model_var_type="fixed_small", loss_type="mse"
    )


@pytest.mark.parametrize(
    "kind, order, expected_order",
    [("dpmpp_2m", 0, 2), ("dpmpp_3m", 0, 3), ("unipc", 1, 2), ("unipc", 2, 3), ("unipc", 3, 3)],
)
def test_deterministic_solvers_converge_at_their_order(kind, order, expected_order):
    # Double the calls, divide the error by 2^order (slack 0.8: grids round to integer steps).
    # UniPC-p's corrector makes it of order p + 1; UniPC-3 reaches float32 rounding at 40 calls,
    # so only third order is asked of it.
    process = _lambda_linear_process()
    model = _gaussian_model(process)
    x_T = tf.random.stateless_normal([8, 4, 4, 2], seed=[1, 2])
    start = schedules.solver_start_index(np.cumprod(1.0 - np.asarray(process.betas)))
    exact = _ode_solution(process, x_T.numpy(), start)
    errors = []
    for calls in (10, 20, 40):
        chain = chains.make_chain(kind, process, steps=calls, order=order, clip_denoised=False)
        out = chains.sample_loop(
            chain, model, x_T.shape, noise=x_T, seeds=tf.range(8, dtype=tf.int64)
        )
        errors.append(float(np.sqrt(np.mean((out.numpy() - exact) ** 2))))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    print(f"{kind} order {order}: errors {errors}, ratios {ratios}")
    assert ratios[-1] >= 0.8 * 2**expected_order, (errors, ratios)
    assert errors[-1] < 1e-2


def test_the_sde_solver_reproduces_the_data_moments():
    process = diffusion.create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    model = _gaussian_model(process)
    chain = chains.make_chain("dpmpp_2m_sde", process, steps=25, clip_denoised=False)
    out = chains.sample_loop(
        chain, model, [256, 8, 8, 3], seeds=tf.range(256, dtype=tf.int64)
    ).numpy()
    # 49152 draws: standard errors 0.0023 (mean) and 0.0016 (std).
    assert abs(out.mean() - MU) < 0.01 and abs(out.std() - SCALE) < 0.01, (out.mean(), out.std())
    # Its noise is the per-image streams': the same seed gives the same image in any batch.
    again = chains.sample_loop(chain, model, [2, 8, 8, 3], seeds=tf.constant([7, 3], tf.int64))
    np.testing.assert_allclose(again.numpy(), out[[7, 3]], atol=1e-5)
