"""The improved-diffusion UNet (Nichol & Dhariwal, 2021) as Keras 3 layers, NHWC.

The architecture follows openai/improved-diffusion's ``unet.py`` block for block, so that its
published checkpoints can be loaded (see :mod:`tf_iddpm.convert`).  Every layer that owns weights
is named after the reference's ``state_dict`` prefix (``input_blocks.3.0`` holding
``in_layers.2`` ...), so variable paths read like the reference keys, e.g.
``unet/input_blocks.3.0/in_layers.2/kernel`` for ``input_blocks.3.0.in_layers.2.weight``.

Sub-layers are stored as plain attributes rather than in Python lists: Keras 3 does not add
layers held in a list to a ``tf.train.Checkpoint`` object graph, and the training workdir is a
``tf.train.Checkpoint(model=unet)``.

This module is the architecture.  What its layers compute beyond Keras' own layers is in
:mod:`tf_iddpm.unet_ops` (GroupNorm, attention, dropout and the residual sum, written for speed);
PyTorch's initialisation and the reference's timestep embedding are in
:mod:`tf_iddpm.unet_reference`; building a UNet from the reference's ``script_util`` flags is
:func:`tf_iddpm.factory.create_model`, and the rules on those flags are
:mod:`tf_iddpm.unet_options`.

Mixed precision (``mixed_bfloat16`` / ``mixed_float16``) runs the 3x3 convolutions, attention
products and dense projections of the torso in the low precision and keeps in float32 everything
that carries the exact pixel values: the input convolution, the residual stream (block outputs and
the skips the decoder concatenates), the 1x1 skip convolutions, GroupNorm with its conditioning and
SiLU (fused, see :func:`tf_iddpm.unet_ops.group_norm`), the attention softmax, the timestep/class
embedding MLP and the ``out`` head; the output is float32.  Why: at small t the model reads eps off
deviations of x_t far below bfloat16's resolution (its spacing near 1.0 is 2^-7, one 8-bit pixel
level), so rounding the image or the stream that passes it to the head destroys exactly the
information the likelihood depends on.  How far a policy moves the bpd of a trained model is what
``python -m tools.benchmark --bpd_check_workdir=...`` measures (run from the checkout).
"""

import itertools

import keras
import numpy as np
import tensorflow as tf

from tf_iddpm import unet_ops
from tf_iddpm import unet_options
from tf_iddpm import unet_reference

# The reference's normalization(): GroupNorm with 32 groups (unet_options.NORM_GROUPS, a rule on
# the channel counts) and PyTorch's default epsilon.
NORM_EPSILON = 1e-5


class GroupNorm32(keras.layers.Layer):
    """GroupNorm over the last (channel) axis, statistics always in float32.

    Groups are contiguous channel blocks and the variance is the biased one, as in
    ``torch.nn.GroupNorm``.  Accepts any rank >= 2 ([N, ..., C]); statistics are taken over all
    non-batch positions of each group.

    Args:
      groups: number of channel groups; the channel count must be a multiple of it.
      epsilon: added to the variance.
    """

    def __init__(self, groups=unet_options.NORM_GROUPS, epsilon=NORM_EPSILON, **kwargs):
        # autocast=False: read gamma/beta in float32 even under a mixed policy.
        super().__init__(autocast=False, **kwargs)
        self.groups = groups
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.groups:
            raise ValueError(
                f"GroupNorm32 {self.name!r}: {channels} channels is not a multiple of "
                f"{self.groups} groups; every UNet channel count must be a multiple of "
                f"{self.groups}"
            )
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")

    def call(self, x, offset=None, scale=None, shift=None, silu=False):
        """``silu?((norm(x + offset) * gamma + beta) * scale + shift)``, fused.

        See :func:`tf_iddpm.unet_ops.group_norm`.

        Args:
          x: [N, ..., C] features of any float dtype (normalised in float32).
          offset: optional [N, C] added to x before the norm.
          scale, shift: optional [N, C] applied after the norm's own affine.
          silu: apply SiLU (in float32, before the cast to the compute dtype).
        """
        out = unet_ops.group_norm(
            tf.cast(x, tf.float32),
            tf.convert_to_tensor(self.gamma),
            tf.convert_to_tensor(self.beta),
            self.groups,
            self.epsilon,
            offset=offset,
            scale=scale,
            shift=shift,
            silu=silu,
        )
        return tf.cast(out, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon}


class ResBlock(keras.layers.Layer):
    """Residual block conditioned on the timestep embedding (the reference's ResBlock).

    ``h = conv3x3(silu(norm(x)))``; the embedding projection ``e = dense(silu(emb))`` is either
    added (``h + e``) or, with ``use_scale_shift_norm``, split into ``[scale | shift]`` and applied
    as ``norm(h) * (1 + scale) + shift``; then silu, dropout and a zero-initialised conv3x3.  The
    skip path is the identity or a 1x1 conv when the channel count changes.

    Args:
      channels: input channels.
      emb_channels: width of the timestep embedding.
      dropout: dropout rate applied before the last conv when training.
      out_channels: output channels (default: ``channels``).
      use_scale_shift_norm: adaptive GroupNorm instead of additive conditioning.
      dropout_salt: distinguishes this block's positional dropout masks from those of the
        network's other blocks; the UNet passes the block's index among its ResBlocks.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_scale_shift_norm=False,
        dropout_salt=0,
        **kwargs,
    ):
        # autocast=False: the residual input keeps its dtype (see unet_ops.residual_sum); the
        # sub-layers cast what they consume.
        super().__init__(autocast=False, **kwargs)
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = float(dropout)
        self.dropout_salt = int(dropout_salt)
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        out_ch = self.out_channels
        policy = self.dtype_policy
        self.in_norm = GroupNorm32(name="in_layers.0", dtype=policy)
        self.in_conv = unet_reference.conv2d(channels, out_ch, 3, "in_layers.2", policy)
        self.emb_proj = unet_reference.dense(
            emb_channels, 2 * out_ch if use_scale_shift_norm else out_ch, "emb_layers.1", policy
        )
        self.out_norm = GroupNorm32(name="out_layers.0", dtype=policy)
        self.out_conv = unet_reference.conv2d(out_ch, out_ch, 3, "out_layers.3", policy, zero=True)
        self.skip_connection = (
            None
            if out_ch == channels
            else unet_reference.conv2d(channels, out_ch, 1, "skip_connection", "float32")
        )

    def build(self, input_shape=None):
        del input_shape  # every weight shape is known from the constructor arguments
        self.in_norm.build((None, None, None, self.channels))
        self.in_conv.build((None, None, None, self.channels))
        self.emb_proj.build((None, self.emb_channels))
        self.out_norm.build((None, None, None, self.out_channels))
        self.out_conv.build((None, None, None, self.out_channels))
        if self.skip_connection is not None:
            self.skip_connection.build((None, None, None, self.channels))

    def call(self, x, emb, training=None, dropout_rng=None):
        """Applies the block.

        Args:
          x: [N, H, W, channels] features.
          emb: [N, emb_channels] timestep (+ class) embedding.
          training: enables dropout.
          dropout_rng: optional [3] int64 ``[seed_0, seed_1, first_example]`` that makes the
            dropout mask a function of the step's seed and each example's global batch position
            (see :func:`tf_iddpm.unet_ops.positional_dropout`; the block folds in its
            ``dropout_salt``).  Without it
            dropout draws from TensorFlow's stateful RNG.

        Returns:
          [N, H, W, out_channels].
        """
        h = self.in_conv(self.in_norm(x, silu=True))
        emb_out = tf.cast(self.emb_proj(tf.nn.silu(emb)), tf.float32)  # [N, C or 2C]
        # The conditioning is folded into the norm's per-(sample, channel) coefficients.
        if self.use_scale_shift_norm:
            scale, shift = tf.split(emb_out, 2, axis=-1)
            h = self.out_norm(h, scale=1 + scale, shift=shift, silu=True)
        else:
            h = self.out_norm(h, offset=emb_out, silu=True)
        if training and self.dropout > 0:
            if dropout_rng is not None:
                h = unet_ops.positional_dropout(
                    h, self.dropout, dropout_rng[:2], dropout_rng[2], self.dropout_salt
                )
            else:
                # The stateful op-level RNG: every replica gets its own mask (a Keras
                # SeedGenerator would repeat it), but masks are not reproducible.
                h = tf.nn.dropout(h, rate=self.dropout)
        h = self.out_conv(h)
        skip = x if self.skip_connection is None else self.skip_connection(x)
        return unet_ops.residual_sum(skip, h)

    def torch_layers(self, prefix):
        """Maps reference state_dict prefixes to this block's weight-owning layers."""
        layers = {
            f"{prefix}.in_layers.0": self.in_norm,
            f"{prefix}.in_layers.2": self.in_conv,
            f"{prefix}.emb_layers.1": self.emb_proj,
            f"{prefix}.out_layers.0": self.out_norm,
            f"{prefix}.out_layers.3": self.out_conv,
        }
        if self.skip_connection is not None:
            layers[f"{prefix}.skip_connection"] = self.skip_connection
        return layers


class AttentionBlock(keras.layers.Layer):
    """Multi-head self-attention over all spatial positions (the reference's AttentionBlock).

    ``qkv`` is a 1x1 projection to 3C channels laid out per head: head ``h`` owns channels
    ``[h * 3C/heads, (h + 1) * 3C/heads)`` holding its ``[q | k | v]`` in that order, exactly as
    the reference's Conv1d, so checkpoints load without permuting channels.  q and k are both
    scaled by ``(C/heads) ** -0.25``; the softmax runs in float32 (see
    :func:`tf_iddpm.unet_ops.qkv_attention`).  Output: ``x + proj_out(a)`` with ``proj_out``
    zero-initialised.

    Args:
      channels: C, a multiple of ``num_heads``.
      num_heads: attention heads.
    """

    def __init__(self, channels, num_heads=1, **kwargs):
        # autocast=False: the residual input keeps its dtype (see unet_ops.residual_sum); the
        # sub-layers cast what they consume.
        super().__init__(autocast=False, **kwargs)
        if channels % num_heads:
            raise ValueError(
                f"AttentionBlock {self.name!r}: {channels} channels cannot be split into "
                f"num_heads={num_heads} heads; channels must be a multiple of num_heads"
            )
        self.channels = channels
        self.num_heads = num_heads
        policy = self.dtype_policy
        self.norm = GroupNorm32(name="norm", dtype=policy)
        self.qkv = unet_reference.dense(channels, 3 * channels, "qkv", policy)
        self.proj_out = unet_reference.dense(channels, channels, "proj_out", policy, zero=True)

    def build(self, input_shape=None):
        del input_shape
        self.norm.build((None, None, self.channels))
        self.qkv.build((None, None, self.channels))
        self.proj_out.build((None, None, self.channels))

    def call(self, x):
        """Applies attention to [N, H, W, C] features; returns the same shape."""
        batch, height, width = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
        tokens = tf.reshape(x, [batch, height * width, self.channels])  # row-major (h, w)
        attended = unet_ops.qkv_attention(self.qkv(self.norm(tokens)), self.num_heads)
        return unet_ops.residual_sum(x, tf.reshape(self.proj_out(attended), tf.shape(x)))

    def torch_layers(self, prefix):
        return {
            f"{prefix}.norm": self.norm,
            f"{prefix}.qkv": self.qkv,
            f"{prefix}.proj_out": self.proj_out,
        }


class Downsample(keras.layers.Layer):
    """Halves H and W with a 3x3 stride-2 conv on a symmetrically zero-padded input.

    ``ZeroPadding2D(1)`` + a 'valid' conv equals PyTorch's ``padding=1``; Keras'
    ``padding="same"`` would pad only bottom/right for even sizes and give different numbers.
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.pad = keras.layers.ZeroPadding2D(1, dtype=self.dtype_policy)
        self.op = unet_reference.conv2d(channels, channels, 3, "op", self.dtype_policy, strides=2)

    def build(self, input_shape=None):
        del input_shape
        self.op.build((None, None, None, self.channels))

    def call(self, x):
        return self.op(self.pad(x))

    def torch_layers(self, prefix):
        return {f"{prefix}.op": self.op}


class Upsample(keras.layers.Layer):
    """Doubles H and W by nearest-neighbour repetition (each pixel -> 2x2), then a 3x3 conv."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.conv = unet_reference.conv2d(channels, channels, 3, "conv", self.dtype_policy)

    def build(self, input_shape=None):
        del input_shape
        self.conv.build((None, None, None, self.channels))

    def call(self, x):
        x = tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)

    def torch_layers(self, prefix):
        return {f"{prefix}.conv": self.conv}


class UNetModel(keras.Model):
    """The improved-diffusion UNet with timestep embedding, attention and optional classes.

    Constructor arguments are the reference's (``dims=2`` and ``use_checkpoint`` aside), so a
    reference configuration maps 1:1.  Called as ``model(x, t)`` or ``model(x, t, y=labels)``.
    The model is usable on its own, so it raises on arguments it cannot be built with.  The rules
    on the reference's flags (image size, attention resolutions, ...) are in
    :mod:`tf_iddpm.unet_options`: ``factory.create_model`` applies them, and so does
    ``config_utils.validate_config`` to a config, before anything is built.

    Args:
      in_channels: channels of the input image.
      model_channels: base channel count (a multiple of 32).
      out_channels: output channels (2 * image channels when sigma is learned).
      num_res_blocks: ResBlocks per level.
      attention_resolutions: downsample *rates* (1, 2, 4, ...) at which attention is used.
      dropout: dropout rate inside the ResBlocks (training only).
      channel_mult: channel multiplier per level; len(channel_mult) - 1 downsamplings.
      conv_resample: must be True (the reference's learned up/downsampling convs; the
        conv-free variant is not used by any published model).
      num_classes: number of classes for a class-conditional model, or None.
      num_heads: attention heads in the input and middle blocks.
      num_heads_upsample: attention heads in the output blocks; -1 = ``num_heads``.
      use_scale_shift_norm: adaptive GroupNorm conditioning in the ResBlocks.
      **kwargs: keras.Model arguments (``name``, ``dtype`` policy, ...).
    """

    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        num_classes=None,
        num_heads=1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        **kwargs,
    ):
        kwargs.setdefault("name", "unet")
        super().__init__(**kwargs)
        if not conv_resample:
            raise ValueError(
                "conv_resample=False (average-pool/plain-nearest resampling) is not supported; "
                "use conv_resample=True as every published improved-diffusion model does"
            )
        for arg_name, value in (
            ("in_channels", in_channels),
            ("model_channels", model_channels),
            ("out_channels", out_channels),
            ("num_res_blocks", num_res_blocks),
            ("num_heads", num_heads),
        ):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{arg_name} must be a positive integer, got {value!r}")
        if num_classes is not None and (
            not isinstance(num_classes, (int, np.integer)) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be None or a positive integer, got {num_classes!r}")
        if not channel_mult or any(int(m) < 1 for m in channel_mult):
            raise ValueError(
                f"channel_mult must be a non-empty sequence of positive integers, "
                f"got {channel_mult!r}"
            )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        # Model inputs are converted in call(): Keras' automatic conversion would cast float
        # timesteps to the compute dtype (bfloat16 cannot represent t = 999), and arrays (not
        # only tensors) are accepted for t as for x.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

        self.in_channels = int(in_channels)
        self.model_channels = int(model_channels)
        self.out_channels = int(out_channels)
        self.num_res_blocks = int(num_res_blocks)
        self.attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self.dropout = float(dropout)
        self.channel_mult = tuple(int(m) for m in channel_mult)
        self.conv_resample = True
        self.num_classes = None if num_classes is None else int(num_classes)
        self.num_heads = int(num_heads)
        self.num_heads_upsample = int(num_heads_upsample)
        self.use_scale_shift_norm = bool(use_scale_shift_norm)

        policy = self.dtype_policy
        emb_dim = 4 * self.model_channels
        self.time_embed_dim = emb_dim
        # The embedding MLP and the output head stay float32 under a mixed policy, as in the
        # reference's fp16 mode (convert_to_fp16 converts only the torso).
        self.time_embed_0 = unet_reference.dense(
            self.model_channels, emb_dim, "time_embed.0", "float32"
        )
        self.time_embed_2 = unet_reference.dense(emb_dim, emb_dim, "time_embed.2", "float32")
        if self.num_classes is not None:
            self.label_emb = keras.layers.Embedding(
                self.num_classes,
                emb_dim,
                embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0),
                name="label_emb",
                dtype="float32",
            )

        # Each reference block (a TimestepEmbedSequential) is a sequence of layers named
        # "<block>.<index>".  The layers are attributes (see the module docstring); the blocks
        # keep only their attribute names, for iteration.
        input_blocks, middle, output_blocks = [], [], []
        # The blocks are built in the reference's module order (input, middle, output), so this
        # numbers the ResBlocks in that order: each one's dropout salt.
        res_block_index = itertools.count()
        res_kwargs = dict(
            emb_channels=emb_dim,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            dtype=policy,
        )

        def new_block(blocks, prefix):
            attr_names = []
            blocks.append(attr_names)

            def add(layer_cls, *args, **layer_kwargs):
                name = f"{prefix}.{len(attr_names)}"
                attr_names.append(name.replace(".", "_"))
                setattr(self, attr_names[-1], layer_cls(*args, name=name, **layer_kwargs))

            return add

        add = new_block(input_blocks, "input_blocks.0")
        add(unet_reference.conv2d, self.in_channels, self.model_channels, 3, dtype="float32")
        skip_channels = [self.model_channels]
        ch = self.model_channels
        ds = 1  # current downsample rate
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                add = new_block(input_blocks, f"input_blocks.{len(input_blocks)}")
                add(
                    ResBlock,
                    ch,
                    out_channels=mult * self.model_channels,
                    dropout_salt=next(res_block_index),
                    **res_kwargs,
                )
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    add(AttentionBlock, ch, self.num_heads, dtype=policy)
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                add = new_block(input_blocks, f"input_blocks.{len(input_blocks)}")
                add(Downsample, ch, dtype=policy)
                skip_channels.append(ch)
                ds *= 2
        self.num_downsamplings = len(self.channel_mult) - 1

        add = new_block(middle, "middle_block")
        add(ResBlock, ch, dropout_salt=next(res_block_index), **res_kwargs)
        add(AttentionBlock, ch, self.num_heads, dtype=policy)
        add(ResBlock, ch, dropout_salt=next(res_block_index), **res_kwargs)

        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                add = new_block(output_blocks, f"output_blocks.{len(output_blocks)}")
                add(
                    ResBlock,
                    ch + skip_channels.pop(),
                    out_channels=mult * self.model_channels,
                    dropout_salt=next(res_block_index),
                    **res_kwargs,
                )
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    add(AttentionBlock, ch, self.num_heads_upsample, dtype=policy)
                if level and i == self.num_res_blocks:
                    add(Upsample, ch, dtype=policy)
                    ds //= 2

        # Assigned once complete: Keras wraps lists stored on a layer.
        self._input_blocks = input_blocks
        self._middle_block = middle[0]
        self._output_blocks = output_blocks

        self.out_norm = GroupNorm32(name="out.0", dtype="float32")
        self.out_conv = unet_reference.conv2d(
            ch, self.out_channels, 3, "out.2", "float32", zero=True
        )
        # Create every variable now: shapes do not depend on the image size, and a model built
        # at construction can be counted, checkpointed and mirrored by a strategy right away.
        self.build()

    def _layers_of(self, attr_names):
        return [getattr(self, attr) for attr in attr_names]

    def build(self, input_shape=None):
        """Creates all variables (called by the constructor; the input shape is not needed)."""
        del input_shape
        self.time_embed_0.build((None, self.model_channels))
        self.time_embed_2.build((None, self.time_embed_dim))
        if self.num_classes is not None:
            self.label_emb.build((None,))
        blocks = self._input_blocks + [self._middle_block] + self._output_blocks
        for attr_names in blocks:
            for layer in self._layers_of(attr_names):
                if isinstance(layer, keras.layers.Conv2D):
                    layer.build((None, None, None, self.in_channels))
                else:
                    layer.build()
        self.out_norm.build((None, None, None, self.model_channels))
        self.out_conv.build((None, None, None, self.model_channels))

    @property
    def _default_save_signature(self):
        # Keras would trace a default SavedModel signature as `self(inputs)` with one argument,
        # which cannot call a model taking (x, t) and makes tf.saved_model.save fail.  Exports
        # define their own signatures (keras.export.ExportArchive or a tf.function).
        return None

    def torch_layers(self):
        """Maps every reference state_dict prefix to the Keras layer holding its weights.

        Returns:
          dict from prefix (``"input_blocks.3.0.in_layers.2"``, ``"out.2"``, ...) to a
          Conv2D, Dense, GroupNorm32 or Embedding layer, in the reference's module order.
        """
        mapping = {"time_embed.0": self.time_embed_0, "time_embed.2": self.time_embed_2}
        if self.num_classes is not None:
            mapping["label_emb"] = self.label_emb
        named_blocks = [(f"input_blocks.{i}", names) for i, names in enumerate(self._input_blocks)]
        named_blocks.append(("middle_block", self._middle_block))
        named_blocks += [
            (f"output_blocks.{i}", names) for i, names in enumerate(self._output_blocks)
        ]
        for prefix, attr_names in named_blocks:
            for index, layer in enumerate(self._layers_of(attr_names)):
                if hasattr(layer, "torch_layers"):
                    mapping.update(layer.torch_layers(f"{prefix}.{index}"))
                else:
                    mapping[f"{prefix}.{index}"] = layer
        mapping["out.0"] = self.out_norm
        mapping["out.2"] = self.out_conv
        return mapping

    def attention_prefixes(self):
        """State_dict prefixes of all attention blocks (e.g. ``"input_blocks.4.1"``)."""
        return [prefix[: -len(".qkv")] for prefix in self.torch_layers() if prefix.endswith(".qkv")]

    # -- forward ---------------------------------------------------------------------------------

    def _check_inputs(self, x, t, y, x_channels):
        """Raises ValueError for statically detectable bad inputs."""
        if x.shape.rank != 4:
            raise ValueError(f"{self.name}: x must be [N, H, W, C], got shape {x.shape}")
        if x.shape[-1] is not None and x.shape[-1] != x_channels:
            raise ValueError(
                f"{self.name}: x has {x.shape[-1]} channels, the model expects "
                f"{x_channels} (shape {x.shape})"
            )
        factor = 2**self.num_downsamplings
        for axis, axis_name in ((1, "height"), (2, "width")):
            size = x.shape[axis]
            if size is not None and (size == 0 or size % factor):
                raise ValueError(
                    f"{self.name}: image {axis_name} {size} must be a positive multiple of "
                    f"{factor} (the model downsamples {self.num_downsamplings} times; "
                    f"channel_mult={self.channel_mult})"
                )
        if t.shape.rank != 1:
            raise ValueError(
                f"{self.name}: timesteps must be a 1-D [N] tensor, got shape {t.shape}"
            )
        if x.shape[0] is not None and t.shape[0] is not None and x.shape[0] != t.shape[0]:
            raise ValueError(
                f"{self.name}: {t.shape[0]} timesteps for a batch of "
                f"{x.shape[0]} images; t must be [N]"
            )
        if self.num_classes is None and y is not None:
            raise ValueError(
                f"{self.name}: labels y were given to an unconditional model (num_classes=None)"
            )
        if self.num_classes is not None:
            if y is None:
                raise ValueError(
                    f"{self.name}: class-conditional model (num_classes="
                    f"{self.num_classes}) needs labels y of shape [N]"
                )
            if y.shape.rank != 1 or (
                x.shape[0] is not None and y.shape[0] is not None and y.shape[0] != x.shape[0]
            ):
                raise ValueError(
                    f"{self.name}: labels y must be [N] with N = {x.shape[0]}, got shape {y.shape}"
                )
            if y.dtype.is_floating:
                raise ValueError(f"{self.name}: labels y must be integers, got {y.dtype}")

    def _embed(self, t, y):
        emb = self.time_embed_2(
            tf.nn.silu(self.time_embed_0(unet_reference.timestep_embedding(t, self.model_channels)))
        )
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        return emb

    def _apply_block(self, attr_names, h, emb, training, dropout_rng):
        for layer in self._layers_of(attr_names):
            if isinstance(layer, ResBlock):
                h = layer(h, emb, training=training, dropout_rng=dropout_rng)
            else:
                h = layer(h)
        return h

    def _forward(self, x, t, y, training, collect_features=False, dropout_rng=None):
        emb = self._embed(t, y)
        features = {"down": [], "up": []}
        skips = []
        h = x
        for attr_names in self._input_blocks:
            h = self._apply_block(attr_names, h, emb, training, dropout_rng)
            skips.append(h)
            features["down"].append(h)
        h = self._apply_block(self._middle_block, h, emb, training, dropout_rng)
        features["middle"] = h
        for attr_names in self._output_blocks:
            skip = skips.pop()
            if h.dtype != skip.dtype:  # mixed precision: a conv output next to a float32 residual
                h, skip = tf.cast(h, tf.float32), tf.cast(skip, tf.float32)
            h = tf.concat([h, skip], axis=-1)  # h first, skip second, as the reference
            h = self._apply_block(attr_names, h, emb, training, dropout_rng)
            features["up"].append(h)
        if collect_features:
            return tf.nest.map_structure(lambda f: tf.cast(f, tf.float32), features)
        out = self.out_conv(self.out_norm(h, silu=True))
        return tf.cast(out, tf.float32)

    def _prepare(self, x, t, y, x_channels):
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            raise ValueError(f"{self.name}: x must be a float tensor, got {x.dtype}")
        x = tf.cast(x, tf.float32)
        t = tf.convert_to_tensor(t)
        y = None if y is None else tf.convert_to_tensor(y)
        self._check_inputs(x, t, y, x_channels)
        return x, t, y

    def call(self, x, t, y=None, training=None, dropout_rng=None):
        """Predicts the model output for noisy images ``x`` at timesteps ``t``.

        Args:
          x: [N, H, W, in_channels] float images; H and W multiples of
            2 ** (len(channel_mult) - 1).
          t: [N] timesteps (int or float; the diffusion passes rescaled floats).
          y: [N] integer class labels, required iff the model is class-conditional.
          training: enables dropout.
          dropout_rng: optional [3] int64 ``[seed_0, seed_1, first_example]``: a stateless seed
            and the global batch position of x's first row, which make the dropout masks a
            function of (seed, position) (see :func:`tf_iddpm.unet_ops.positional_dropout`); a
            trainer derives the
            seed from (seed, step) and passes its replica's offset.

        Returns:
          [N, H, W, out_channels] float32.
        """
        x, t, y = self._prepare(x, t, y, self.in_channels)
        return self._forward(x, t, y, training, dropout_rng=dropout_rng)

    def feature_vectors(self, x, t, y=None):
        """All intermediate block outputs (the reference's ``get_feature_vectors``).

        Args:
          x, t, y: as in :meth:`call` (evaluated with training=False).

        Returns:
          dict with ``"down"`` (list of input-block outputs), ``"middle"`` and ``"up"`` (list of
          output-block outputs, before the final norm/conv), each [N, h, w, c] float32.
        """
        x, t, y = self._prepare(x, t, y, self.in_channels)
        return self._forward(x, t, y, training=False, collect_features=True)

    def get_config(self):
        return {
            "in_channels": self.in_channels,
            "model_channels": self.model_channels,
            "out_channels": self.out_channels,
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": self.attention_resolutions,
            "dropout": self.dropout,
            "channel_mult": self.channel_mult,
            "conv_resample": self.conv_resample,
            "num_classes": self.num_classes,
            "num_heads": self.num_heads,
            "num_heads_upsample": self.num_heads_upsample,
            "use_scale_shift_norm": self.use_scale_shift_norm,
            "name": self.name,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }


class SuperResModel(UNetModel):
    """A UNet conditioned on a low-resolution image (the reference's SuperResModel).

    ``low_res`` is resized bilinearly to the size of ``x`` and concatenated after its channels,
    so the inner UNet sees ``2 * in_channels`` input channels.

    Args:
      in_channels: channels of ``x`` (and of ``low_res``).
      *args, **kwargs: as :class:`UNetModel`.
    """

    def __init__(self, in_channels, *args, **kwargs):
        kwargs.setdefault("name", "super_res_unet")
        super().__init__(2 * in_channels, *args, **kwargs)
        self.image_channels = int(in_channels)

    def _prepare_low_res(self, x, low_res):
        if low_res is None:
            raise ValueError(
                f"{self.name}: a super-resolution model needs low_res, a "
                f"[N, h, w, {self.image_channels}] image"
            )
        low_res = tf.convert_to_tensor(low_res)
        if low_res.shape.rank != 4 or (
            low_res.shape[-1] is not None and low_res.shape[-1] != self.image_channels
        ):
            raise ValueError(
                f"{self.name}: low_res must be [N, h, w, {self.image_channels}], "
                f"got shape {low_res.shape}"
            )
        x = tf.convert_to_tensor(x)
        if x.shape.rank != 4 or (x.shape[-1] is not None and x.shape[-1] != self.image_channels):
            raise ValueError(
                f"{self.name}: x must be [N, H, W, {self.image_channels}], got shape {x.shape}"
            )
        upsampled = unet_reference.resize_like_torch_bilinear(
            tf.cast(low_res, tf.float32), tf.shape(x)[1], tf.shape(x)[2]
        )
        return tf.concat([tf.cast(x, tf.float32), upsampled], axis=-1)

    def call(self, x, t, y=None, low_res=None, training=None, dropout_rng=None):
        """As :meth:`UNetModel.call`, plus ``low_res``: [N, h, w, in_channels] float images."""
        x = self._prepare_low_res(x, low_res)
        return super().call(x, t, y=y, training=training, dropout_rng=dropout_rng)

    def feature_vectors(self, x, t, y=None, low_res=None):
        x = self._prepare_low_res(x, low_res)
        return super().feature_vectors(x, t, y=y)

    def get_config(self):
        config = super().get_config()
        config["in_channels"] = self.image_channels
        return config
