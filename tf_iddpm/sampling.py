"""Whole-chain loops of the reverse process, each one graph: ancestral and DDIM sampling, and the
full variational bound in bits/dim (paper Sections 3-4).

Every loop is a ``tf.while_loop`` over the (possibly respaced) chain, so it traces once per shape
and compiles with XLA; per-step results are collected in ``tf.TensorArray``s.

Randomness is either replayed or seed-determined:

* ``step_noise`` [K, N, H, W, C] holds every Gaussian draw a loop makes, in the order it makes them
  (first reverse step first; samplers draw at t = 0 too, where the draw is multiplied by zero).
  This replays the reference's recorded draws exactly.
* ``seeds`` int64 [N] gives each image its own stateless stream: draw number ``d`` of image ``n`` is
  ``stateless_normal([H, W, C], seed=[seeds[n], d])``; draw 0 is x_T (when ``noise`` is not given)
  and draw k + 1 is the noise of loop iteration k.  An image therefore depends only on its own
  seed, never on the batch it was computed in.
"""

import numpy as np
import tensorflow as tf

from tf_iddpm.diffusion import GaussianDiffusion, mean_flat


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
    return tf.map_fn(
        lambda s: tf.random.stateless_normal(image_shape, seed=tf.stack([s, draw_index])),
        seeds, fn_output_signature=tf.float32)


def _in_graph(fn):
    """Runs fn as one graph: directly when already tracing, else through a one-off tf.function."""
    if tf.executing_eagerly():
        return tf.function(fn, autograph=False)()
    return fn()


def _noise_for_step(step_noise, seeds, k, image_shape):
    if step_noise is not None:
        return step_noise[k]
    return seeded_normal(seeds, k + 1, image_shape)


def _noise_sources(step_noise, seeds, batch_size, num_steps):
    """Validates replayed draws, or falls back to random per-image seeds when none are given."""
    if step_noise is not None:
        step_noise = tf.convert_to_tensor(step_noise, tf.float32)
        steps_given = tf.get_static_value(tf.shape(step_noise)[0])
        if isinstance(num_steps, int) and steps_given is not None and steps_given != num_steps:
            raise ValueError(f"step_noise holds {steps_given} draws but the chain has {num_steps} steps")
    elif seeds is None:
        seeds = tf.random.uniform([batch_size], maxval=np.iinfo(np.int64).max, dtype=tf.int64)
    return step_noise, seeds


def _sample_loop(diffusion: GaussianDiffusion, model_fn, shape, step_fn, *, noise, model_kwargs,
                 step_noise, seeds):
    shape = [int(s) for s in shape] if not isinstance(shape, tf.Tensor) else shape
    step_noise, seeds = _noise_sources(step_noise, seeds, shape[0], diffusion.num_timesteps)
    model_kwargs = dict(model_kwargs or {})
    image_shape = shape[1:]

    def run():
        if noise is not None:
            x_init = tf.convert_to_tensor(noise, tf.float32)
        else:
            x_init = seeded_normal(seeds, 0, image_shape)
        num_steps = tf.cast(diffusion.num_timesteps, tf.int32)
        batch = tf.shape(x_init)[0]

        def body(k, x):
            t = tf.fill([batch], num_steps - 1 - k)
            model_output = model_fn(x, diffusion.model_timesteps(t), **model_kwargs)
            z = _noise_for_step(step_noise, seeds, k, image_shape)
            # Keep the static shape of x_T across iterations (tf.fill's batch dim is dynamic).
            return k + 1, tf.ensure_shape(step_fn(model_output, x, t, z), x_init.shape)

        _, x_final = tf.while_loop(lambda k, x: k < num_steps, body, [tf.constant(0), x_init])
        return x_final

    return _in_graph(run)


def p_sample_loop(diffusion: GaussianDiffusion, model_fn, shape, *, noise=None, clip_denoised=True,
                  model_kwargs=None, step_noise=None, seeds=None):
    """Ancestral sampling x_T -> x_0 through p(x_{t-1} | x_t) over every step of `diffusion`.

    With a respaced diffusion this is the paper's strided sampling (Section 4): the respaced betas
    and the model's learned variances make the few-step chain well calibrated.

    Args:
      diffusion: the (possibly respaced) process.
      model_fn: the network, model_fn(x, t, **model_kwargs).
      shape: [N, H, W, C] of the samples.
      noise: optional x_T [N, H, W, C].
      clip_denoised: clip predicted x_0 to [-1, 1] at every step.
      model_kwargs: extra network inputs, e.g. {"y": labels}.
      step_noise: optional [K, N, H, W, C] draws to replay (see module doc).
      seeds: optional int64 [N] per-image seeds (see module doc); random if neither is given.

    Returns:
      float32 [N, H, W, C] samples in (approximately) [-1, 1].
    """
    def step(model_output, x, t, z):
        return diffusion.p_sample_from_output(model_output, x, t, z, clip_denoised=clip_denoised)["sample"]
    return _sample_loop(diffusion, model_fn, shape, step, noise=noise, model_kwargs=model_kwargs,
                        step_noise=step_noise, seeds=seeds)


def ddim_sample_loop(diffusion: GaussianDiffusion, model_fn, shape, *, noise=None, clip_denoised=True,
                     model_kwargs=None, eta=0.0, step_noise=None, seeds=None):
    """DDIM sampling (Song et al. 2020) over every step of `diffusion`; eta = 0 is deterministic.

    Arguments as p_sample_loop, plus eta >= 0 (a python float or a float32 scalar tensor).
    """
    def step(model_output, x, t, z):
        return diffusion.ddim_sample_from_output(model_output, x, t, z, eta=eta,
                                                 clip_denoised=clip_denoised)["sample"]
    return _sample_loop(diffusion, model_fn, shape, step, noise=noise, model_kwargs=model_kwargs,
                        step_noise=step_noise, seeds=seeds)


def calc_bpd_loop(diffusion: GaussianDiffusion, model_fn, x_start, *, clip_denoised=True,
                  model_kwargs=None, step_noise=None, seeds=None):
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

    Returns:
      dict: total_bpd [N], prior_bpd [N], and [N, K] arrays vb, xstart_mse, mse whose column k
      belongs to t = K-1-k (the reference's order).  total_bpd = prior_bpd + vb.sum(1).
    """
    x_start = tf.convert_to_tensor(x_start, tf.float32)
    step_noise, seeds = _noise_sources(step_noise, seeds, tf.shape(x_start)[0], diffusion.num_timesteps)
    model_kwargs = dict(model_kwargs or {})
    image_shape = tf.shape(x_start)[1:]

    def run():
        num_steps = tf.cast(diffusion.num_timesteps, tf.int32)
        batch = tf.shape(x_start)[0]
        arrays = [tf.TensorArray(tf.float32, size=num_steps, element_shape=[None]) for _ in range(3)]

        def body(k, vb_ta, xstart_mse_ta, mse_ta):
            t = tf.fill([batch], num_steps - 1 - k)
            eps = _noise_for_step(step_noise, seeds, k, image_shape)
            x_t = diffusion.q_sample(x_start, t, noise=eps)
            model_output = model_fn(x_t, diffusion.model_timesteps(t), **model_kwargs)
            term = diffusion.vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised=clip_denoised)
            pred_eps = diffusion.predict_eps_from_xstart(x_t, t, term["pred_xstart"])
            return (k + 1,
                    vb_ta.write(k, term["output"]),
                    xstart_mse_ta.write(k, mean_flat(tf.square(term["pred_xstart"] - x_start))),
                    mse_ta.write(k, mean_flat(tf.square(pred_eps - eps))))

        # parallel_iterations=1: the iterations are independent, and running several at once made
        # oneDNN kernels return (rarely) different vb terms from run to run; one at a time is
        # deterministic and no slower on a CPU whose cores each iteration already uses.
        _, vb_ta, xstart_mse_ta, mse_ta = tf.while_loop(
            lambda k, *_: k < num_steps, body, [tf.constant(0)] + arrays, parallel_iterations=1)
        vb, xstart_mse, mse = (tf.transpose(ta.stack()) for ta in (vb_ta, xstart_mse_ta, mse_ta))
        prior_bpd = diffusion.prior_bpd(x_start)
        return dict(total_bpd=tf.reduce_sum(vb, axis=1) + prior_bpd, prior_bpd=prior_bpd, vb=vb,
                    xstart_mse=xstart_mse, mse=mse)

    return _in_graph(run)
