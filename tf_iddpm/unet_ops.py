"""Speed-tuned TensorFlow ops of the UNet: what its layers compute, fused or laid out for speed.

Each op computes what a plain composition of TensorFlow ops would (``tests/unet_test.py`` compares
them with the textbook definitions) in fewer ops and fewer passes over the activations, or, for
dropout, with masks that do not depend on how a batch is split.  The docstrings say why each exists:

* :func:`group_norm`: GroupNorm fused with the ResBlock's timestep conditioning and SiLU, with a
  closed-form gradient.
* :func:`qkv_attention`: multi-head attention with the heads ahead of the tokens, so both products
  are batched matmuls whose gradients need no transposes, and a float32 softmax.
* :func:`positional_dropout`: dropout with one stateless random op per layer whose mask is a
  function of (seed, layer, position in the global batch).
* :func:`residual_sum`: the residual addition, in float32 under a mixed precision policy.

The layers that use them are in :mod:`tf_iddpm.unet`.
"""

import math

import tensorflow as tf


def group_norm(x, gamma, beta, groups, epsilon, offset=None, scale=None, shift=None, silu=False):
    """``silu?((GroupNorm(x + offset) * gamma + beta) * scale + shift)`` with an analytic gradient.

    GroupNorm of float32 x [N, ..., C] over contiguous channel groups, fused with what the UNet
    applies around it: a per-(sample, channel) ``offset`` added before the norm (the ResBlock's
    additive timestep conditioning), a per-(sample, channel) ``scale`` and ``shift`` after it (the
    adaptive ``use_scale_shift_norm`` conditioning, ``scale`` being the reference's ``1 + scale``)
    and SiLU.  offset, scale and shift are [N, C] or None.  Folded into per-(sample, channel)
    coefficients ``a``, ``b`` they cost nothing over a plain GroupNorm: the forward is
    ``z = (x - center) * a + b`` then SiLU, and the backward reads the saved ``x - center``, ``z``
    and ``sigmoid(z)`` instead of the 4-6 extra passes over the activation that separate ops and
    their automatic gradients take.  Why: as separate ops differentiated automatically, each of the
    UNet's ~50 norms was ~40 small graph ops, and the conditioning and SiLU cost 2 forward and ~4
    backward passes over the activation beyond the norm itself.

    Statistics are per-channel sums over the positions (a reduction over the leading axes, which
    keeps channels contiguous) folded into groups afterwards; reducing a [N, HW, groups, C/groups]
    view over axes (1, 3) directly, as tf.nn.moments would, is ~30x slower on CPU.  The backward
    pass is the closed form (g = gamma * scale, mean_g the mean over a group's positions and
    channels)

        dx = rstd * (g*dz - mean_g(g*dz) - xhat * mean_g(g*dz * xhat)),   d offset = sum_pos dx,
        dgamma = sum_{n,pos} dz * xhat * scale,   dbeta = sum_{n,pos} dz * scale,
        d scale = sum_pos dz * (xhat * gamma + beta),   d shift = sum_pos dz,

    with dz = dy * silu'(z), evaluated as dz*P + centered*Q + R with per-(sample, channel) P, Q, R.
    """
    channels = x.shape[-1]
    group_size = channels // groups
    position_axes = list(range(1, x.shape.rank - 1))
    broadcast_shape = [-1] + [1] * len(position_axes) + [channels]
    positions = x.shape[1:-1]
    if positions.is_fully_defined():
        # Python constants: every graph (in-process, SavedModel) then runs the same multiply,
        # instead of leaving it to Grappler whether a division by a folded count is rewritten.
        num_positions = float(positions.num_elements())
    else:
        num_positions = tf.cast(tf.reduce_prod(tf.shape(x)[1:-1]), tf.float32)
    inverse_count = 1.0 / (num_positions * group_size)
    per_sample = tf.stack([tf.shape(x)[0], channels])
    offset = tf.zeros(per_sample) if offset is None else tf.cast(offset, tf.float32)
    scale = tf.ones(per_sample) if scale is None else tf.cast(scale, tf.float32)
    shift = tf.zeros(per_sample) if shift is None else tf.cast(shift, tf.float32)

    def group_mean(per_channel_sums):  # [N, C] sums over positions -> [N, C] means of each group
        grouped = tf.reshape(per_channel_sums, [-1, groups, group_size])
        means = tf.reduce_sum(grouped, -1, keepdims=True) * inverse_count
        return tf.reshape(tf.broadcast_to(means, tf.shape(grouped)), [-1, channels])

    def per_position(coefficient):  # [N, C] -> broadcastable against x
        return tf.reshape(coefficient, broadcast_shape)

    @tf.custom_gradient
    def normalize(x, gamma, beta, offset, scale, shift):
        sums = tf.reduce_sum(x, axis=position_axes)  # [N, C]
        # The group mean of x + offset, less offset: x - center is (x + offset) - its group mean.
        center = group_mean(sums + num_positions * offset) - offset
        centered = x - per_position(center)
        variance = group_mean(tf.reduce_sum(tf.square(centered), axis=position_axes))
        rstd = tf.math.rsqrt(variance + epsilon)  # [N, C]
        gain = gamma * scale
        z = centered * per_position(rstd * gain) + per_position(beta * scale + shift)
        if silu:
            # SiLU as sigmoid and a multiply that Grappler's remapper does not fuse: its oneDNN
            # Swish rounds differently from Sigmoid * x, and whether a graph gets the fusion
            # (an in-process function vs the same model loaded from a SavedModel) must not change
            # the numbers.  The sigmoid is kept for the gradient instead of recomputed there.
            sigmoid = tf.sigmoid(z)
            out = tf.math.multiply_no_nan(z, sigmoid)
        else:
            out = z

        def grad(dy):
            with tf.name_scope("group_norm_grad"):  # names the gradient in profiles
                if silu:
                    # silu'(z) = sigmoid + z * sigmoid * (1 - sigmoid); SigmoidGrad(s, g) = g*s*(1-s).
                    dz = dy * sigmoid + tf.raw_ops.SigmoidGrad(y=sigmoid, dy=dy * z)
                else:
                    dz = dy
                sum_dz = tf.reduce_sum(dz, axis=position_axes)  # [N, C]
                sum_dz_centered = tf.reduce_sum(dz * centered, axis=position_axes)  # [N, C]
                p = rstd * gain
                q = -tf.pow(rstd, 3) * group_mean(sum_dz_centered * gain)
                r = -rstd * group_mean(sum_dz * gain)
                dx = dz * per_position(p) + (centered * per_position(q) + per_position(r))
                sum_centered = sums - num_positions * center  # sum over positions of centered
                d_offset = sum_dz * p + sum_centered * q + num_positions * r
                d_gamma = tf.reduce_sum(sum_dz_centered * rstd * scale, axis=0)
                d_beta = tf.reduce_sum(sum_dz * scale, axis=0)
                d_scale = sum_dz_centered * rstd * gamma + sum_dz * beta
                return dx, d_gamma, d_beta, d_offset, d_scale, sum_dz

        return out, grad

    return normalize(x, gamma, beta, offset, scale, shift)


def qkv_attention(qkv, num_heads):
    """Multi-head self-attention of the reference's AttentionBlock, from its qkv projection.

    ``qkv`` holds, per token, the ``num_heads`` heads one after another, each as its
    ``[q | k | v]`` (the reference's Conv1d layout, so checkpoints load without permuting
    channels).  q and k are each scaled by ``(C/heads) ** -0.25`` before their product, as the
    reference does (better conditioned in low precision than scaling the product), and the softmax
    runs in float32 whatever the policy.

    Why this layout: the heads are moved ahead of the tokens once ([N, heads, T, 3ch]), so both
    products are plain batched matmuls whose gradients need no data transposes; einsum over the
    [N, T, heads, ch] layout transposed its operands on every call, which was slower.

    Args:
      qkv: [N, T, 3C] projections of T tokens.
      num_heads: attention heads; C must divide by it.

    Returns:
      [N, T, C] attended values, in qkv's dtype.
    """
    batch = tf.shape(qkv)[0]
    channels = qkv.shape[-1] // 3
    head_channels = channels // num_heads
    qkv = tf.transpose(tf.reshape(qkv, [batch, -1, num_heads, 3 * head_channels]), [0, 2, 1, 3])
    q, k, v = tf.split(qkv, 3, axis=-1)  # each [N, heads, T, ch]
    scale = tf.cast(1.0 / math.sqrt(math.sqrt(head_channels)), q.dtype)
    logits = tf.matmul(q * scale, k * scale, transpose_b=True)  # [N, heads, T, T]
    weights = tf.cast(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1), v.dtype)
    attended = tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3])  # [N, T, heads, ch]
    return tf.reshape(attended, [batch, -1, channels])


def positional_dropout(h, rate, seed, first_example, salt):
    """Dropout whose mask is a function of (seed, salt, each example's position in the batch).

    Why: ``tf.nn.dropout`` draws from the stateful RNG, so masks differ between runs, between a
    resumed and an uninterrupted run, and between ways of splitting a batch over replicas.
    The mask of the example at global batch position ``p`` is the Philox stream of the key that
    ``seed`` and ``salt`` select, from counter ``p * ceil(D / 4)`` on (D elements per example, four
    per counter): the rows a replica draws for positions ``first_example, ...`` are exactly the
    rows one device draws for the whole batch, so masks do not depend on how the batch is split,
    and a trainer that derives ``seed`` from (seed, step) gets them again after a resume.  One
    random op per layer, whatever the batch size (a per-example loop was a while-loop per layer).

    The mask is drawn in float32 (the same masks under every precision policy) and applied as a
    single multiplier ``keep / (1 - rate)`` in h's dtype, so the backward pass is one multiply by
    the same tensor.

    Args:
      h: [N, ...] activations.
      rate: probability of dropping an element, in [0, 1).
      seed: [2] integer stateless seed (the step's dropout seed).
      first_example: global batch position of h's first row (0 on one device).
      salt: int distinguishing the dropout layers of one network.

    Returns:
      ``h * keep / (1 - rate)`` with ``keep ~ Bernoulli(1 - rate)`` elementwise, as tf.nn.dropout.
    """
    with tf.name_scope("dropout"):  # names the mask ops in profiles
        layer_seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), salt)
        key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=layer_seed)
        shape = tf.shape(h)
        per_example = tf.reduce_prod(shape[1:])
        counters_per_example = (per_example + 3) // 4  # Philox yields four 32-bit draws per counter
        start = tf.cast(first_example, tf.int64) * tf.cast(counters_per_example, tf.int64)
        # The low counter word is 0 for keys from StatelessRandomGetKeyCounter; adding to it cannot
        # carry for any batch a run can hold.
        counter = counter + tf.stack([tf.cast(start, tf.uint64), tf.constant(0, tf.uint64)])
        draws = tf.raw_ops.StatelessRandomUniformV2(
            shape=tf.stack([shape[0], 4 * counters_per_example]),
            key=key,
            counter=counter,
            alg=1,  # Philox, on every device (AUTO_SELECT may differ between backends)
            dtype=tf.float32,
        )
        keep = tf.reshape(draws[:, :per_example], shape) >= rate
        multiplier = tf.where(keep, tf.constant(1.0 / (1.0 - rate), h.dtype), tf.zeros([], h.dtype))
        return h * multiplier


def residual_sum(skip, update):
    """skip + update, computed in float32 (a mixed policy's low-precision operand is widened).

    Why: under a mixed policy the convolutions and matmuls run in bfloat16/float16 but the residual
    stream (block outputs, the skip tensors the decoder concatenates) stays float32: it is the path
    by which the float32 input convolution's exact view of x_t reaches the float32 head (see
    :mod:`tf_iddpm.unet` on why the likelihood needs it).  In float32 models this is a plain
    addition.
    """
    if skip.dtype == update.dtype == tf.float32:
        return skip + update
    return tf.cast(skip, tf.float32) + tf.cast(update, tf.float32)
