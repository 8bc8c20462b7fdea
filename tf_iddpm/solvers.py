"""Few-step solvers of the diffusion ODE and SDE, as pure functions: their time grids and updates.

DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) in its multistep forms 2M and 3M, its stochastic
variant SDE-DPM-Solver++(2M), and UniPC (Zhao et al. 2023, arXiv 2302.04867) with its B(h) = e^h - 1
("bh2") predictor-corrector.  They need only the network's data prediction x0_hat (from eps, or
x_0 itself, see :meth:`tf_iddpm.diffusion.GaussianDiffusion.predict_xstart_from_output`), so they
apply to every model of this project, learned variances included (the variance channels are not
used).  :class:`tf_iddpm.chains.SolverChain` runs them as one ``tf.while_loop``.

Notation: abar_t is the trained process's ``alphas_cumprod``, alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t); a step goes from s to the less noisy
t, h = lambda_t - lambda_s > 0; D (or m) is a data prediction.  The exact solution of the
probability-flow ODE from s to t is

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0(lambda) dl,

and the updates below are its exponential-integrator discretisations with x0(lambda)
interpolated through the current and previous predictions.  Every schedule quantity (lambda, h,
alpha, sigma and the coefficients built from them) is float64; coefficients are cast to the
images' dtype only to multiply them.  (e^{-h} - 1) is ``expm1(-h)``.
"""

import numpy as np
import tensorflow as tf

# Below this many steps the multistep DPM-Solver++ lowers its order over the last steps (as
# DPM-Solver's reference code and diffusers' lower_order_final do): a step of order k needs k
# points close enough for the interpolation, and few-step grids are coarsest near t = 0.
LOWER_ORDER_FINAL_BELOW = 15
# Karras et al. (2022): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) -
# sigma_max^(1/rho)))^rho in sigma = e^{-lambda} (their "sigma"), rho = 7.
KARRAS_RHO = 7.0


def _coef(value, like):
    """A float64 schedule coefficient cast to the dtype of the tensor it multiplies."""
    return tf.cast(value, like.dtype)


# ---------------------------------------------------------------------------------------------
# Time grids.
# ---------------------------------------------------------------------------------------------


def solver_timesteps(lambdas, start: int, num_steps, grid: str = "logsnr"):
    """The N timesteps (integers of the trained chain) where a solver calls the network.

    The grid runs from ``start`` (the noisiest step, see
    :func:`tf_iddpm.schedules.solver_start_index`) to t = 0, uniform in lambda ("logsnr", the
    default of DPM-Solver), in t ("time_uniform") or in Karras et al.'s sigma^(1/rho)
    ("karras").  Each point is rounded to the integer t whose lambda is nearest (in t for
    "time_uniform"), then made strictly decreasing: rounding a grid that is dense where lambda
    changes fast (both ends) gives duplicates, and a repeated timestep would be a zero-size step.

    Args:
      lambdas: float64 numpy [T], lambda_t of the trained process (decreasing in t).
      start: the first (noisiest) timestep, 0 <= start < T.
      num_steps: N, a python int or an int scalar tensor, 1 <= N <= start + 1.
      grid: "logsnr", "time_uniform" or "karras".

    Returns:
      int32 [N]: t_0 = ``start`` > t_1 > ... > t_{N-1} >= 0 (t_{N-1} = 0 for N > 1).
    """
    table = tf.constant(np.asarray(lambdas, np.float64)[: start + 1])  # lambda at t = 0..start
    count = tf.cast(num_steps, tf.int32)
    fraction = tf.cast(tf.range(count), tf.float64) / tf.cast(tf.maximum(count - 1, 1), tf.float64)
    if grid == "time_uniform":
        nearest = tf.cast(tf.round(float(start) * (1.0 - fraction)), tf.int32)
    else:
        lambda_first, lambda_last = table[start], table[0]
        if grid == "logsnr":
            targets = lambda_first + fraction * (lambda_last - lambda_first)
        elif grid == "karras":
            low, high = tf.exp(-lambda_last / KARRAS_RHO), tf.exp(-lambda_first / KARRAS_RHO)
            targets = -KARRAS_RHO * tf.math.log(high + fraction * (low - high))
        else:
            raise ValueError(f"unknown grid {grid!r}; allowed: logsnr, time_uniform, karras")
        distance = tf.abs(table[None, :] - targets[:, None])  # [N, start + 1]
        nearest = tf.cast(tf.argmin(distance, axis=1), tf.int32)
    positions = tf.range(count)
    # t_i >= t_{i+1} + 1 and t_{N-1} >= 0, i.e. t_i = max_{j >= i}(t_j + j) - i: a suffix maximum
    # (lifts duplicates near t = 0) ...
    rising = tf.concat([nearest[:-1], tf.maximum(nearest[-1:], 0)], 0) + positions
    lifted = tf.scan(tf.maximum, rising, reverse=True) - positions
    # ... then t_0 <= start and t_i <= t_{i-1} - 1, i.e. t_i = min_{j <= i}(t_j + j) - i: a
    # prefix minimum (lowers duplicates near the start).  Both hold after the two passes when
    # N <= start + 1.
    lowered = lifted + positions
    lowered = tf.concat([tf.minimum(lowered[:1], start), lowered[1:]], 0)
    return tf.scan(tf.minimum, lowered) - positions


def multistep_order(step, num_steps, max_order, *, lower_final_always: bool):
    """The order of update ``step`` (0-based) of an N-step multistep solver.

    Update N-1 denoises to sigma = 0 (order 0 here: the output is the last data prediction).
    Otherwise the order grows with the history (k + 1 predictions exist at update k) up to
    ``max_order``, and the last steps are lowered: min(order, N - k), for UniPC always and for
    DPM-Solver++ when N < LOWER_ORDER_FINAL_BELOW (their reference codes' rules).

    Args:
      step, num_steps: k and N, int scalars (tensors or python ints).
      max_order: the solver's order.
      lower_final_always: UniPC's rule (else DPM-Solver++'s).

    Returns:
      int32 scalar in 0..max_order.
    """
    step, num_steps = tf.cast(step, tf.int32), tf.cast(num_steps, tf.int32)
    order = tf.minimum(max_order, step + 1)
    lowered = tf.minimum(order, num_steps - step)
    if not lower_final_always:
        lowered = tf.where(num_steps < LOWER_ORDER_FINAL_BELOW, lowered, order)
    return tf.where(step >= num_steps - 1, 0, lowered)


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ (data prediction).
# ---------------------------------------------------------------------------------------------


def dpmpp_first_order(x, d0, *, h, alpha_t, sigma_t, sigma_s):
    """DPM-Solver++(1): x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) D0.

    Identical to a deterministic DDIM step (eta = 0) from s to t.
    """
    return _coef(sigma_t / sigma_s, x) * x - _coef(alpha_t * tf.math.expm1(-h), x) * d0


def dpmpp_2m(x, d0, d1, *, h, h_prev, alpha_t, sigma_t, sigma_s):
    """DPM-Solver++(2M): the first-order update with D = D0 + (D0 - D1) / (2r), r = h_prev / h.

    ``d1`` is the previous prediction, ``h_prev`` the previous step's h: the line through the two
    predictions (in lambda) evaluated at the step's midpoint.
    """
    r = h_prev / h
    data = d0 + _coef(0.5 / r, d0) * (d0 - d1)
    return dpmpp_first_order(x, data, h=h, alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=sigma_s)


def dpmpp_3m(x, d0, d1, d2, *, h, h_prev, h_prev2, alpha_t, sigma_t, sigma_s):
    """DPM-Solver++(3M): a quadratic through three predictions (current, previous, the one before).

    With r0 = h_prev/h, r1 = h_prev2/h, first differences D1_0 = (D0 - D1)/r0 and
    D1_1 = (D1 - D2)/r1, slope D' = D1_0 + r0/(r0 + r1) (D1_0 - D1_1) and curvature
    D'' = (D1_0 - D1_1)/(r0 + r1):

        x_t = (sigma_t/sigma_s) x_s - alpha_t phi1 D0 + alpha_t (phi1/h + 1) D'
              - alpha_t ((phi1 + h)/h^2 - 1/2) D'',   phi1 = e^{-h} - 1.
    """
    r0, r1 = h_prev / h, h_prev2 / h
    first0 = _coef(1.0 / r0, d0) * (d0 - d1)
    first1 = _coef(1.0 / r1, d0) * (d1 - d2)
    slope = first0 + _coef(r0 / (r0 + r1), d0) * (first0 - first1)
    curvature = _coef(1.0 / (r0 + r1), d0) * (first0 - first1)
    phi1 = tf.math.expm1(-h)
    return (
        _coef(sigma_t / sigma_s, x) * x
        - _coef(alpha_t * phi1, x) * d0
        + _coef(alpha_t * (phi1 / h + 1.0), x) * slope
        - _coef(2.0 * alpha_t * ((phi1 + h) / h**2 - 0.5), x) * curvature
    )


def sde_dpmpp_first_order(x, d0, z, *, h, alpha_t, sigma_t, sigma_s):
    """SDE-DPM-Solver++(1): the exact solution of the reverse SDE for a constant prediction,

    x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D0 + sigma_t sqrt(1 - e^{-2h}) z.
    """
    one_minus = -tf.math.expm1(-2.0 * h)
    return (
        _coef(sigma_t / sigma_s * tf.exp(-h), x) * x
        + _coef(alpha_t * one_minus, x) * d0
        + _coef(sigma_t * tf.sqrt(one_minus), x) * z
    )


def sde_dpmpp_2m(x, d0, d1, z, *, h, h_prev, alpha_t, sigma_t, sigma_s):
    """SDE-DPM-Solver++(2M) (midpoint form): the first-order SDE update plus
    alpha_t (1 - e^{-2h}) (D0 - D1) / (2 r), r = h_prev / h."""
    r = h_prev / h
    data = d0 + _coef(0.5 / r, d0) * (d0 - d1)
    return sde_dpmpp_first_order(x, data, z, h=h, alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=sigma_s)


# ---------------------------------------------------------------------------------------------
# UniPC (B(h) = e^h - 1, data prediction).
# ---------------------------------------------------------------------------------------------


def _solve(matrix, vector):
    """Solves a 1x1, 2x2 or 3x3 float64 system by Cramer's rule (python lists of scalars):
    closed forms that XLA compiles, for UniPC's tiny systems."""
    n = len(vector)
    if n == 1:
        return [vector[0] / matrix[0][0]]

    def det(m):
        if len(m) == 2:
            return m[0][0] * m[1][1] - m[0][1] * m[1][0]
        return (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )

    whole = det(matrix)
    solution = []
    for column in range(n):
        replaced = [
            [vector[row] if c == column else matrix[row][c] for c in range(n)] for row in range(n)
        ]
        solution.append(det(replaced) / whole)
    return solution


def _unipc_terms(h, ratios, order):
    """UniPC's B(h), phi_1 = e^{-h} - 1 and the right-hand side b of its order conditions.

    ``ratios`` are r_k = (lambda_{s_k} - lambda_s0) / h of the previous points (negative), with
    1.0 appended (the point t itself); b_i = h phi_{i+1}(h) i! / B(h) for i = 1..order, phi_k the
    exponential integrator's phi functions at -h.
    """
    hh = -h
    phi1 = tf.math.expm1(hh)
    b_h = phi1  # B(h) = e^{hh} - 1: the "bh2" variant
    phi_k = phi1 / hh - 1.0
    factorial = 1.0
    rows, rhs = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in ratios])
        rhs.append(phi_k * factorial / b_h)
        factorial *= i + 1
        phi_k = phi_k / hh - 1.0 / factorial
    return phi1, b_h, rows, rhs


def unipc_predictor(x, d0, previous, *, lambda_s, previous_lambdas, h, alpha_t, sigma_t, sigma_s):
    """UniP-p, the predictor of order p = len(previous) + 1, from x_s and D0 to x_t.

    x_t = (sigma_t/sigma_s) x_s - alpha_t phi1 D0 - alpha_t B(h) sum_k rho_k (D_k - D0) / r_k,
    where D_k are ``previous`` predictions at ``previous_lambdas`` (newest first) and rho solves
    the order conditions (rho = 1/2 for p = 2, as in the reference code).
    """
    order = len(previous) + 1
    ratios = [(lam - lambda_s) / h for lam in previous_lambdas] + [tf.constant(1.0, tf.float64)]
    phi1, b_h, rows, rhs = _unipc_terms(h, ratios, order)
    out = _coef(sigma_t / sigma_s, x) * x - _coef(alpha_t * phi1, x) * d0
    if order == 1:
        return out
    if order == 2:
        rhos = [tf.constant(0.5, tf.float64)]
    else:
        rhos = _solve([row[:-1] for row in rows[:-1]], rhs[:-1])
    correction = tf.add_n(
        [_coef(rho / r, x) * (d - d0) for rho, r, d in zip(rhos, ratios, previous)]
    )
    return out - _coef(alpha_t * b_h, x) * correction


def unipc_corrector(
    x_s, d0, previous, d_t, *, lambda_s, previous_lambdas, h, alpha_t, sigma_t, sigma_s
):
    """UniC-p: corrects x_t, reached from x_s, with the prediction D_t the network made at it.

    Costs no network call: D_t is the evaluation the next step needs anyway.  Of order
    p = len(previous) + 1 (its accuracy is p + 1):

    x_t^c = (sigma_t/sigma_s) x_s - alpha_t phi1 D0
            - alpha_t B(h) (sum_k rho_k (D_k - D0) / r_k + rho_t (D_t - D0)),

    with rho = 1/2 for p = 1 and the solution of the full order conditions otherwise.
    """
    order = len(previous) + 1
    ratios = [(lam - lambda_s) / h for lam in previous_lambdas] + [tf.constant(1.0, tf.float64)]
    phi1, b_h, rows, rhs = _unipc_terms(h, ratios, order)
    rhos = [tf.constant(0.5, tf.float64)] if order == 1 else _solve(rows, rhs)
    correction = _coef(rhos[-1], x_s) * (d_t - d0)
    for rho, r, d in zip(rhos[:-1], ratios[:-1], previous):
        correction += _coef(rho / r, x_s) * (d - d0)
    base = _coef(sigma_t / sigma_s, x_s) * x_s - _coef(alpha_t * phi1, x_s) * d0
    return base - _coef(alpha_t * b_h, x_s) * correction
