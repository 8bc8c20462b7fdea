"""Whole-chain loops of the reverse process, each one graph: the samplers (strided ancestral,
DDIM) and the full variational bound in bits/dim (paper Sections 3-4).

A sampler is a *chain* (:class:`AncestralChain`, :class:`DdimChain`; :func:`make_chain` builds one
from a sampler kind of :mod:`tf_iddpm.samplers`) run by :func:`sample_loop`: a ``tf.while_loop``
over its steps whose state (x_t, and whatever else a kind carries) is the loop state, so it traces
once per shape and compiles with XLA.  ``p_sample_loop`` / ``ddim_sample_loop`` are the reference's
names for the two paper samplers; :func:`calc_bpd_loop` collects its per-step terms in
``tf.TensorArray``s.

Randomness is either replayed or seed-determined:

* ``step_noise`` [K, N, H, W, C] holds every Gaussian draw a loop makes, in the order it makes them
  (first reverse step first; samplers draw at t = 0 too, where the draw is multiplied by zero).
  This replays the reference's recorded draws exactly.
* ``seeds`` int64 [N] gives each image its own stateless stream: draw number ``d`` of image ``n`` is
  ``stateless_normal([H, W, C], seed=[seeds[n], d])``; draw 0 is x_T (when ``noise`` is not given)
  and draw k + 1 is the noise of loop iteration k.  An image therefore depends only on its own
  seed, never on the batch it was computed in.

A chain can also run as a few graph calls of consecutive steps (``steps=(begin, end)``, the loop
state carried between calls, see :func:`chunk_bounds`), so that a caller can show progress along
the chain; every step computes exactly what it computes in the one-call loop, so the results are
bit-identical.  :func:`bpd_from_chunks` joins the chunks of :func:`calc_bpd_loop`.
"""

import numpy as np
import tensorflow as tf

from tf_iddpm import schedules
from tf_iddpm import solvers
from tf_iddpm.diffusion import GaussianDiffusion, mean_flat, respace, respace_uniform


def seeded_normal(seeds, draw_index, image_shape):
    """Per-image stateless standard normal draws.

    Args:
      seeds: int64 [N], one seed per image.
      draw_index: int scalar, which draw of each image's stream.
      image_shape: [H, W, C].

    Returns:
      float32 [N, H, W, C].
    """
    seeds = tf.cast(seeds, tf.int64)
    draw_index = tf.cast(draw_index, tf.int64)
    # Philox named explicitly (the CPU's default): XLA would otherwise pick another generator.
    # XLA then draws the same Philox bits but maps them to normals its own way, so a sampler
    # compiled with jit_compile draws other (equally distributed) noise for a seed than the
    # CPU graph does; the images of one build are reproducible either way.
    return tf.map_fn(
        lambda s: tf.random.stateless_normal(
            image_shape, seed=tf.stack([s, draw_index]), alg="philox"
        ),
        seeds,
        fn_output_signature=tf.float32,
    )


def _in_graph(fn):
    """Runs fn as one graph: directly when already tracing, else through a one-off tf.function."""
    if tf.executing_eagerly():
        return tf.function(fn, autograph=False)()
    return fn()


def _noise_for_step(step_noise, seeds, k, image_shape):
    if step_noise is not None:
        return step_noise[k]
    return seeded_normal(seeds, k + 1, image_shape)


def _noise_sources(step_noise, seeds, batch_size, num_steps, steps=None):
    """Validates replayed draws, or falls back to random per-image seeds when none are given."""
    if step_noise is not None:
        step_noise = tf.convert_to_tensor(step_noise, tf.float32)
        steps_given = tf.get_static_value(tf.shape(step_noise)[0])
        if isinstance(num_steps, int) and steps_given is not None and steps_given != num_steps:
            raise ValueError(
                f"step_noise holds {steps_given} draws but the chain has {num_steps} steps"
            )
    elif seeds is None:
        if steps is not None:
            raise ValueError(
                "a chain run in chunks (steps=...) needs seeds or step_noise, so that "
                "every chunk draws from the same streams"
            )
        seeds = tf.random.uniform([batch_size], maxval=np.iinfo(np.int64).max, dtype=tf.int64)
    return step_noise, seeds


# About this many graph calls per chain when it runs in chunks (chunk_bounds).
CHUNKS_PER_CHAIN = 32


def chunk_bounds(num_steps: int, num_chunks: int = CHUNKS_PER_CHAIN):
    """Splits the K loop steps of a chain into about `num_chunks` runs of consecutive steps.

    Args:
      num_steps: K, the steps of the (respaced) chain.
      num_chunks: the wanted number of chunks (fewer when K is smaller).

    Returns:
      [(begin, end), ...] covering 0..K in order; every chunk but the last has ceil(K / num_chunks)
      steps.
    """
    chunk = max(1, -(-int(num_steps) // max(1, int(num_chunks))))
    return [
        (begin, min(begin + chunk, int(num_steps))) for begin in range(0, int(num_steps), chunk)
    ]


def _step_range(num_steps, steps):
    """(begin, end) int32 scalars of the loop steps to run: `steps`, or the whole chain."""
    if steps is None:
        return tf.constant(0), tf.cast(num_steps, tf.int32)
    begin, end = steps
    return tf.cast(begin, tf.int32), tf.cast(end, tf.int32)


class AncestralChain:
    """Strided ancestral sampling: x_{t-1} = mu + sigma z through p(x_{t-1} | x_t) (Section 4).

    With a respaced process this is the paper's few-step sampler: the respaced betas and the
    model's learned variances keep the short chain calibrated.  The loop state is x_t.

    Every chain kind has this interface, which :func:`sample_loop` drives: ``num_steps`` (network
    calls), ``initial_state(x_T)``, ``state_spec(image_shape)`` (the state's ``tf.TensorSpec``s,
    batch dimension None), ``network_input(k, state)`` (where iteration k calls the network),
    ``update(k, state, model_output, z)`` and ``result(state)``.
    """

    # Draws noise at every step (at t = 0 too, where it is multiplied by zero): the reference's
    # order of draws, which replayed noise follows.
    draws_noise = True

    def __init__(self, diffusion: GaussianDiffusion, *, clip_denoised=True):
        self.diffusion = diffusion
        self.clip_denoised = clip_denoised
        self.num_steps = diffusion.num_timesteps

    def initial_state(self, x_T):
        return x_T

    def state_spec(self, image_shape):
        return tf.TensorSpec([None] + list(image_shape), tf.float32)

    def timesteps(self, k, state):
        """t of loop iteration k: the chain's steps from K-1 down to 0, one per image."""
        return tf.fill(tf.shape(state)[:1], tf.cast(self.num_steps, tf.int32) - 1 - k)

    def network_input(self, k, state):
        return state, self.diffusion.model_timesteps(self.timesteps(k, state))

    def update(self, k, state, model_output, z):
        return self.diffusion.p_sample_from_output(
            model_output, state, self.timesteps(k, state), z, clip_denoised=self.clip_denoised
        )["sample"]

    def result(self, state):
        return state


class DdimChain(AncestralChain):
    """DDIM (Song et al. 2020) over every step of the (respaced) process; eta = 0 is
    deterministic.  ``eta`` is a python float or a float32 scalar tensor."""

    def __init__(self, diffusion: GaussianDiffusion, *, eta=0.0, clip_denoised=True):
        super().__init__(diffusion, clip_denoised=clip_denoised)
        self.eta = eta

    def update(self, k, state, model_output, z):
        return self.diffusion.ddim_sample_from_output(
            model_output,
            state,
            self.timesteps(k, state),
            z,
            eta=self.eta,
            clip_denoised=self.clip_denoised,
        )["sample"]


# Solver kinds: (maximum order, family).  dpmpp: DPM-Solver++ multistep; sde: its stochastic
# variant; unipc: the predictor-corrector, whose order is a setting (SamplerSpec.order).
SOLVER_KINDS = {
    "dpmpp_2m": (2, "dpmpp"),
    "dpmpp_3m": (3, "dpmpp"),
    "dpmpp_2m_sde": (2, "sde"),
    "unipc": (3, "unipc"),
}
# UniPC's order when none is given: the reference code's recommendation for guided sampling,
# and diffusers' default.
UNIPC_DEFAULT_ORDER = 2
# History depth every solver chain carries: the newest data predictions, newest first.
_HISTORY = 3


class SolverChain:
    """A few-step solver (:mod:`tf_iddpm.solvers`) on the trained process's integer timesteps.

    The network is called at N timesteps of the chain it was trained on (t_0 > ... > t_{N-1} = 0,
    :func:`tf_iddpm.solvers.solver_timesteps`): it sees inputs only at timesteps it was trained
    at, the schedule values there are exact (no interpolation of alpha_t between steps), and
    models that take integer timesteps work too.  Update k goes from t_k to t_{k+1}; the last one
    denoises to sigma = 0 at first order (the output is the last data prediction).  N is the
    number of network calls (NFE).

    The loop state is (x_t, the previous x (UniPC's corrector restarts from it), the last three
    data predictions, newest first), so the multistep history is part of the graph's loop and a
    chain run in chunks carries it between calls.  The stochastic ``dpmpp_2m_sde`` takes its
    noise from the per-image streams like the other samplers (draw k + 1 at update k); the
    deterministic solvers draw nothing.

    Args:
      diffusion: the trained (unrespaced) process.
      kind: a key of :data:`SOLVER_KINDS`.
      num_steps: N, a python int or an int scalar tensor, 1 <= N <= the steps from the solver's
        start (:func:`tf_iddpm.schedules.solver_max_steps`; checked by the caller).
      grid: "logsnr", "time_uniform" or "karras".
      order: UniPC's order, 1-3 (0: UNIPC_DEFAULT_ORDER); the dpmpp kinds have theirs in their name.
      clip_denoised: clip each data prediction to [-1, 1].
    """

    def __init__(self, diffusion, kind, *, num_steps, grid="logsnr", order=0, clip_denoised=True):
        max_order, self.family = SOLVER_KINDS[kind]
        self.order = int(order) or (UNIPC_DEFAULT_ORDER if kind == "unipc" else max_order)
        self.diffusion = diffusion
        self.clip_denoised = clip_denoised
        self.draws_noise = self.family == "sde"
        # The float64 products schedules.solver_max_steps used to validate num_steps.
        alphas_cumprod = np.cumprod(1.0 - np.asarray(diffusion.betas, np.float64))
        lambdas = schedules.half_log_snr(alphas_cumprod)
        start = schedules.solver_start_index(alphas_cumprod)
        self.timesteps = solvers.solver_timesteps(lambdas, start, num_steps, grid)
        self.num_steps = num_steps if isinstance(num_steps, int) else tf.size(self.timesteps)
        abar = tf.gather(tf.constant(alphas_cumprod), self.timesteps)
        self.lambdas = tf.gather(tf.constant(lambdas), self.timesteps)
        self.alphas = tf.sqrt(abar)
        self.sigmas = tf.sqrt(-tf.math.expm1(tf.math.log(abar)))

    def initial_state(self, x_T):
        history = tf.zeros(tf.concat([[_HISTORY], tf.shape(x_T)], 0), x_T.dtype)
        return x_T, x_T, tf.ensure_shape(history, [_HISTORY] + x_T.shape.as_list())

    def state_spec(self, image_shape):
        image = tf.TensorSpec([None] + list(image_shape), tf.float32)
        return image, image, tf.TensorSpec([_HISTORY, None] + list(image_shape), tf.float32)

    def _t(self, k, x):
        return tf.fill(tf.shape(x)[:1], self.timesteps[k])

    def network_input(self, k, state):
        x = state[0]
        return x, self.diffusion.model_timesteps(self._t(k, x))

    def result(self, state):
        return state[0]

    def _point(self, k):
        """(lambda, alpha, sigma) of grid point k, float64 (k clipped into the grid)."""
        k = tf.clip_by_value(k, 0, tf.cast(self.num_steps, tf.int32) - 1)
        return self.lambdas[k], self.alphas[k], self.sigmas[k]

    def update(self, k, state, model_output, z):
        x, x_previous, history = state
        prediction = self.diffusion.predict_xstart_from_output(
            model_output, x, self._t(k, x), clip_denoised=self.clip_denoised
        )
        if self.family == "unipc":
            x = tf.cond(
                k > 0,
                lambda: self._unipc_correct(k, x_previous, x, prediction, history),
                lambda: x,
            )
        history = tf.concat([prediction[None], history[:-1]], 0)
        order = solvers.multistep_order(
            k, self.num_steps, self.order, lower_final_always=self.family == "unipc"
        )
        branches = [lambda: prediction]  # order 0: the last update denoises to sigma = 0
        for step_order in range(1, self.order + 1):
            branches.append(lambda o=step_order: self._step(k, o, x, history, z))
        x_next = tf.switch_case(order, branches)
        return tf.ensure_shape(x_next, x.shape), x, history

    def _step(self, k, order, x, history, z):
        """Update k at ``order`` from t_k to t_{k+1}; history[0] is the prediction at t_k."""
        lambda_s, _, sigma_s = self._point(k)
        lambda_t, alpha_t, sigma_t = self._point(k + 1)
        common = dict(h=lambda_t - lambda_s, alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=sigma_s)
        h_prev = lambda_s - self._point(k - 1)[0]
        if self.family == "unipc":
            return solvers.unipc_predictor(
                x,
                history[0],
                [history[i] for i in range(1, order)],
                lambda_s=lambda_s,
                previous_lambdas=[self._point(k - i)[0] for i in range(1, order)],
                **common,
            )
        if self.family == "sde":
            if order == 1:
                return solvers.sde_dpmpp_first_order(x, history[0], z, **common)
            return solvers.sde_dpmpp_2m(x, history[0], history[1], z, h_prev=h_prev, **common)
        if order == 1:
            return solvers.dpmpp_first_order(x, history[0], **common)
        if order == 2:
            return solvers.dpmpp_2m(x, history[0], history[1], h_prev=h_prev, **common)
        h_prev2 = self._point(k - 1)[0] - self._point(k - 2)[0]
        return solvers.dpmpp_3m(
            x, history[0], history[1], history[2], h_prev=h_prev, h_prev2=h_prev2, **common
        )

    def _unipc_correct(self, k, x_previous, x, prediction, history):
        """UniC at t_k with the prediction made there, of the order of the predictor that
        reached x_k (update k - 1); history[0] is the prediction at t_{k-1}."""
        order = solvers.multistep_order(k - 1, self.num_steps, self.order, lower_final_always=True)
        lambda_s, _, sigma_s = self._point(k - 1)
        lambda_t, alpha_t, sigma_t = self._point(k)

        def correct(step_order):
            return solvers.unipc_corrector(
                x_previous,
                history[0],
                [history[i] for i in range(1, step_order)],
                prediction,
                lambda_s=lambda_s,
                previous_lambdas=[self._point(k - 1 - i)[0] for i in range(1, step_order)],
                h=lambda_t - lambda_s,
                alpha_t=alpha_t,
                sigma_t=sigma_t,
                sigma_s=sigma_s,
            )

        return tf.switch_case(
            tf.maximum(order - 1, 0),
            [lambda o=step_order: correct(o) for step_order in range(1, self.order + 1)],
        )


def sample_loop(
    chain,
    model_fn,
    shape,
    *,
    noise=None,
    state=None,
    model_kwargs=None,
    step_noise=None,
    seeds=None,
    steps=None,
):
    """Runs a chain (:class:`AncestralChain`, :class:`DdimChain`, ...) from x_T to x_0 as one graph.

    Args:
      chain: the sampler's steps on its process.
      model_fn: the network, model_fn(x, t, **model_kwargs).
      shape: [N, H, W, C] of the samples.
      noise: optional x_T [N, H, W, C] (default: draw 0 of each image's seeded stream).
      state: optional loop state to continue from (with ``steps``: the state after loop step
        begin-1, as the previous chunk returned it); default ``chain.initial_state(x_T)``.
      model_kwargs: extra network inputs, e.g. {"y": labels}.
      step_noise: optional [K, N, H, W, C] draws to replay (see module doc).
      seeds: optional int64 [N] per-image seeds (see module doc); random if neither is given.
      steps: optional (begin, end): run only loop steps begin..end-1 and return the state after
        step end-1 instead of the samples; needs seeds or step_noise.  See chunk_bounds.

    Returns:
      float32 [N, H, W, C] samples in (approximately) [-1, 1]; with ``steps``, the loop state.
    """
    shape = [int(s) for s in shape] if not isinstance(shape, tf.Tensor) else shape
    step_noise, seeds = _noise_sources(step_noise, seeds, shape[0], chain.num_steps, steps)
    model_kwargs = dict(model_kwargs or {})
    image_shape = shape[1:]

    def run():
        if state is not None:
            initial = tf.nest.map_structure(tf.convert_to_tensor, state)
        else:
            if noise is not None:
                x_init = tf.convert_to_tensor(noise, tf.float32)
            else:
                x_init = seeded_normal(seeds, 0, image_shape)
            initial = chain.initial_state(x_init)
        begin, end = _step_range(chain.num_steps, steps)
        # Keep the static shapes of the state across iterations (tf.fill's batch is dynamic).
        static_shapes = tf.nest.map_structure(lambda s: s.shape, initial)

        def body(k, loop_state):
            x, t = chain.network_input(k, loop_state)
            model_output = model_fn(x, t, **model_kwargs)
            z = _noise_for_step(step_noise, seeds, k, image_shape) if chain.draws_noise else None
            updated = chain.update(k, loop_state, model_output, z)
            return k + 1, tf.nest.map_structure(tf.ensure_shape, updated, static_shapes)

        _, final = tf.while_loop(lambda k, _: k < end, body, [begin, initial])
        return final if steps is not None else chain.result(final)

    return _in_graph(run)


def p_sample_loop(
    diffusion: GaussianDiffusion,
    model_fn,
    shape,
    *,
    noise=None,
    clip_denoised=True,
    model_kwargs=None,
    step_noise=None,
    seeds=None,
    steps=None,
):
    """Ancestral sampling x_T -> x_0 through p(x_{t-1} | x_t) over every step of `diffusion`.

    The reference's ``p_sample_loop``: :func:`sample_loop` of an :class:`AncestralChain`.  With
    ``steps``, ``noise`` is the state after step begin-1 (x_T when begin = 0).
    """
    return sample_loop(
        AncestralChain(diffusion, clip_denoised=clip_denoised),
        model_fn,
        shape,
        noise=noise,
        model_kwargs=model_kwargs,
        step_noise=step_noise,
        seeds=seeds,
        steps=steps,
    )


def ddim_sample_loop(
    diffusion: GaussianDiffusion,
    model_fn,
    shape,
    *,
    noise=None,
    clip_denoised=True,
    model_kwargs=None,
    eta=0.0,
    step_noise=None,
    seeds=None,
    steps=None,
):
    """DDIM sampling over every step of `diffusion`: the reference's ``ddim_sample_loop``,
    :func:`sample_loop` of a :class:`DdimChain`.  Arguments as :func:`p_sample_loop`, plus eta."""
    return sample_loop(
        DdimChain(diffusion, eta=eta, clip_denoised=clip_denoised),
        model_fn,
        shape,
        noise=noise,
        model_kwargs=model_kwargs,
        step_noise=step_noise,
        seeds=seeds,
        steps=steps,
    )


def respaced(diffusion: GaussianDiffusion, steps) -> GaussianDiffusion:
    """`diffusion` (unrespaced) restricted to a sampler's steps.

    Args:
      diffusion: the trained process.
      steps: a respacing string ("" = every step, "50", "ddim50", "10,15,20"), or K evenly
        spaced steps as an int or an int scalar tensor (chosen per request in a graph).
    """
    if isinstance(steps, str):
        if not steps:
            return diffusion
        return respace(diffusion, schedules.space_timesteps(diffusion.num_timesteps, steps))
    return respace_uniform(diffusion, steps)


def make_chain(
    kind: str,
    diffusion: GaussianDiffusion,
    *,
    steps,
    eta=0.0,
    clip_denoised=True,
    grid="logsnr",
    order=0,
):
    """The chain of a sampler kind (:data:`tf_iddpm.samplers.SAMPLER_KINDS`) on the trained
    process `diffusion`.

    Args:
      kind: "ancestral", "ddim" or a solver of :data:`SOLVER_KINDS`.
      diffusion: the trained (unrespaced) process.
      steps: ancestral / DDIM: the respacing (see :func:`respaced`); solvers: the number of
        network calls, a python int, a digit string or an int scalar tensor.
      eta: DDIM's eta.
      clip_denoised: clip predicted x_0 to [-1, 1].
      grid, order: the solvers' time grid and UniPC's order (see :class:`SolverChain`).
    """
    if kind in SOLVER_KINDS:
        num_steps = int(steps) if isinstance(steps, str) else steps
        return SolverChain(
            diffusion,
            kind,
            num_steps=num_steps,
            grid=grid,
            order=order,
            clip_denoised=clip_denoised,
        )
    process = respaced(diffusion, steps)
    if kind == "ancestral":
        return AncestralChain(process, clip_denoised=clip_denoised)
    if kind == "ddim":
        return DdimChain(process, eta=eta, clip_denoised=clip_denoised)
    raise ValueError(f"unknown sampler kind {kind!r}; the kinds are: {', '.join(CHAIN_KINDS)}")


# The sampler kinds this module runs; tests check it equals samplers.SAMPLER_KINDS.
CHAIN_KINDS = ("ancestral", "ddim") + tuple(SOLVER_KINDS)


def calc_bpd_loop(
    diffusion: GaussianDiffusion,
    model_fn,
    x_start,
    *,
    clip_denoised=True,
    model_kwargs=None,
    step_noise=None,
    seeds=None,
    steps=None,
):
    """The whole variational bound (Eq. 4) in bits/dim, per image.

    For t = K-1 ... 0 (K = steps of `diffusion`): draw eps, form x_t ~ q(x_t | x_0), and evaluate
    L_t (the KL terms, and the discretised decoder at t = 0); add the prior term L_T.

    Args:
      diffusion: the (possibly respaced) process.
      model_fn: the network.
      x_start: [N, H, W, C] images in [-1, 1].
      clip_denoised: clip predicted x_0 when forming p's mean.
      model_kwargs: extra network inputs.
      step_noise: optional [K, N, H, W, C] eps draws to replay, entry k used at t = K-1-k.
      seeds: optional int64 [N] per-image seeds.
      steps: optional (begin, end): evaluate only loop steps begin..end-1 and return their
        columns; needs seeds or step_noise.  bpd_from_chunks joins the chunks of a chain.

    Returns:
      dict: total_bpd [N], prior_bpd [N], and [N, K] arrays vb, xstart_mse, mse whose column k
      belongs to t = K-1-k (the reference's order).  total_bpd = prior_bpd + vb.sum(1).  With
      `steps`: only vb, xstart_mse, mse, each [N, end - begin].
    """
    x_start = tf.convert_to_tensor(x_start, tf.float32)
    step_noise, seeds = _noise_sources(
        step_noise, seeds, tf.shape(x_start)[0], diffusion.num_timesteps, steps
    )
    model_kwargs = dict(model_kwargs or {})
    image_shape = tf.shape(x_start)[1:]

    def run():
        num_steps = tf.cast(diffusion.num_timesteps, tf.int32)
        begin, end = _step_range(diffusion.num_timesteps, steps)
        batch = tf.shape(x_start)[0]
        arrays = [
            tf.TensorArray(tf.float32, size=end - begin, element_shape=[None]) for _ in range(3)
        ]

        def body(k, vb_ta, xstart_mse_ta, mse_ta):
            t = tf.fill([batch], num_steps - 1 - k)
            eps = _noise_for_step(step_noise, seeds, k, image_shape)
            x_t = diffusion.q_sample(x_start, t, noise=eps)
            model_output = model_fn(x_t, diffusion.model_timesteps(t), **model_kwargs)
            term = diffusion.vb_terms_bpd_from_output(
                model_output, x_start, x_t, t, clip_denoised=clip_denoised
            )
            pred_eps = diffusion.predict_eps_from_xstart(x_t, t, term["pred_xstart"])
            return (
                k + 1,
                vb_ta.write(k - begin, term["output"]),
                xstart_mse_ta.write(k - begin, mean_flat(tf.square(term["pred_xstart"] - x_start))),
                mse_ta.write(k - begin, mean_flat(tf.square(pred_eps - eps))),
            )

        # parallel_iterations=1: the iterations are independent, and running several at once made
        # oneDNN kernels return (rarely) different vb terms from run to run; one at a time is
        # deterministic and no slower on a CPU whose cores each iteration already uses.
        _, vb_ta, xstart_mse_ta, mse_ta = tf.while_loop(
            lambda k, *_: k < end, body, [begin] + arrays, parallel_iterations=1
        )
        columns = {
            name: tf.transpose(ta.stack())
            for name, ta in (("vb", vb_ta), ("xstart_mse", xstart_mse_ta), ("mse", mse_ta))
        }
        if steps is not None:
            return columns
        return bpd_from_chunks(diffusion, x_start, [columns])

    return _in_graph(run)


def bpd_from_chunks(diffusion: GaussianDiffusion, x_start, chunks):
    """calc_bpd_loop's result from the chunks of one chain (calc_bpd_loop(..., steps=...) in order).

    Args:
      diffusion: the process of the chain.
      x_start: [N, H, W, C] images in [-1, 1].
      chunks: the chunks' dicts of vb, xstart_mse, mse [N, end - begin], covering the chain.

    Returns:
      The dict calc_bpd_loop returns for the whole chain (bit-identical to it).
    """
    x_start = tf.convert_to_tensor(x_start, tf.float32)

    def run():
        joined = {
            name: chunks[0][name] if len(chunks) == 1 else tf.concat([c[name] for c in chunks], 1)
            for name in ("vb", "xstart_mse", "mse")
        }
        prior_bpd = diffusion.prior_bpd(x_start)
        return dict(
            total_bpd=tf.reduce_sum(joined["vb"], axis=1) + prior_bpd, prior_bpd=prior_bpd, **joined
        )

    # In a graph, as in the one-call loop: graph optimisations round some arithmetic differently.
    return _in_graph(run)
