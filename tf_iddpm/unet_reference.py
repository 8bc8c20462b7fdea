"""What the UNet takes from the reference beyond its block structure: PyTorch's numbers.

openai/improved-diffusion is a PyTorch program, and parts of what its UNet computes are PyTorch's
conventions rather than the paper's.  This module reproduces them, so that the layers of
:mod:`tf_iddpm.unet` start from the same weight distributions and compute the same numbers:

* :func:`conv2d` and :func:`dense`: Keras layers initialised as PyTorch's nn.Conv2d / nn.Linear
  (:func:`torch_default_initializers`), or zeroed as the reference's ``zero_module``;
* :func:`timestep_embedding`: the reference's ``nn.timestep_embedding``, bit for bit;
* :func:`resize_like_torch_bilinear`: ``F.interpolate(mode="bilinear")``, the super-resolution
  model's upsampling of its low-resolution input;
* :func:`initialize_weights`: re-draws a built model's initial weights as a function of (seed,
  reference state_dict name), so they do not depend on construction order or process.

Building a UNet from the reference's ``script_util`` flags is ``factory.create_model``; the rules on
those flags are :mod:`tf_iddpm.unet_options`.
"""

import hashlib
import math

import keras
import numpy as np
import tensorflow as tf


def torch_default_initializers(fan_in, zero=False):
    """Kernel and bias initializers matching PyTorch's Conv/Linear defaults.

    PyTorch draws both weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the reference
    zeroes its output convolutions (``zero_module``) instead.
    """
    if zero:
        return "zeros", "zeros"
    bound = 1.0 / math.sqrt(fan_in)
    kernel = keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
    )
    return kernel, keras.initializers.RandomUniform(-bound, bound)


def conv2d(in_channels, out_channels, kernel_size, name, dtype, strides=1, zero=False):
    """A Keras Conv2D initialised as the reference's ``conv_nd`` (PyTorch's nn.Conv2d).

    'same' padding for stride 1, which for the odd kernels used here is PyTorch's symmetric
    ``padding=kernel_size // 2``; 'valid' for stride 2, where the caller pads symmetrically first
    (Keras' 'same' would pad only bottom/right).  ``zero=True`` is the reference's
    ``zero_module``.
    """
    kernel_init, bias_init = torch_default_initializers(
        in_channels * kernel_size * kernel_size, zero
    )
    return keras.layers.Conv2D(
        out_channels,
        kernel_size,
        strides=strides,
        padding="same" if strides == 1 else "valid",
        kernel_initializer=kernel_init,
        bias_initializer=bias_init,
        name=name,
        dtype=dtype,
    )


def dense(in_features, out_features, name, dtype, zero=False):
    """A Keras Dense initialised as the reference's ``linear`` (PyTorch's nn.Linear)."""
    kernel_init, bias_init = torch_default_initializers(in_features, zero)
    return keras.layers.Dense(
        out_features,
        kernel_initializer=kernel_init,
        bias_initializer=bias_init,
        name=name,
        dtype=dtype,
    )


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal timestep embedding of the reference (``nn.timestep_embedding``).

    ``freqs[i] = exp(-ln(max_period) * i / half)`` for ``i < half = dim // 2``, a float32
    constant; the embedding is ``[cos(t * freqs) | sin(t * freqs)]`` (cos first, products in
    float32), with one zero column appended when ``dim`` is odd.

    The exponent is formed in float32 as the reference does and then exponentiated with correct
    rounding (in float64, cast to float32).  That reproduces the reference's frequencies
    bit for bit, whereas TensorFlow's float32 ``exp`` is off by an ulp for some of them, which
    moves cos/sin by up to ~t * 6e-8 (5e-5 at t = 4000).

    Args:
      timesteps: [N] tensor of (possibly fractional) timesteps, any real or integer dtype.
      dim: embedding width.
      max_period: controls the lowest frequency.

    Returns:
      [N, dim] float32 tensor.
    """
    half = dim // 2
    exponent = (
        np.float32(-math.log(max_period))
        * np.arange(half, dtype=np.float32)
        / np.float32(max(half, 1))
    )
    freqs = tf.constant(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = tf.cast(timesteps, tf.float32)[:, None] * freqs[None, :]
    embedding = tf.concat([tf.cos(args), tf.sin(args)], axis=-1)
    if dim % 2:
        embedding = tf.concat([embedding, tf.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


def resize_like_torch_bilinear(images, height, width):
    """Bilinear resize with half-pixel centres and no antialiasing.

    Equals ``F.interpolate(mode="bilinear", align_corners=False)`` of the reference.
    """
    return tf.image.resize(images, [height, width], method="bilinear", antialias=False)


def initialize_weights(net, seed):
    """Re-draws every random initial weight of ``net`` as a function of (seed, weight name).

    Keras draws an initializer's seed when the layer is constructed, from Python's global RNG,
    so two builds of one configuration start from different weights.  This gives each randomly
    initialised weight (conv / dense kernels and biases, class embeddings) its own seed derived
    from ``seed`` and its reference state_dict name (``input_blocks.3.0.in_layers.2.weight``),
    with the layer's own initializer (PyTorch's default distributions), so the initial weights do
    not depend on construction order, process or strategy.  Zero-initialised layers and the norms'
    ones / zeros stay as they are.  Call it in cross-replica context: a mirrored variable's
    copies all receive the same value.

    Args:
      net: a built :class:`tf_iddpm.unet.UNetModel` (or SuperResModel).
      seed: non-negative int.
    """
    for prefix, layer in net.torch_layers().items():
        for attribute in ("kernel", "bias", "embeddings"):
            variable = getattr(layer, attribute, None)
            initializer = getattr(layer, attribute + "_initializer", None)
            if variable is None or initializer is None or "seed" not in initializer.get_config():
                continue
            digest = hashlib.sha256(f"{int(seed)}/{prefix}/{attribute}".encode()).digest()
            config = {**initializer.get_config(), "seed": int.from_bytes(digest[:4], "little") >> 1}
            seeded = type(initializer).from_config(config)
            variable.assign(seeded(variable.shape, dtype=variable.dtype))
