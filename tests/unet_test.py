"""Tests for tf_iddpm.unet: golden outputs of the reference UNet, architecture and behaviour."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import golden
from tf_iddpm import convert
from tf_iddpm import config_utils
from tf_iddpm import factory
from tf_iddpm import unet
from tf_iddpm import unet_ops
from tf_iddpm import unet_reference

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fixture models (tests/testdata/REFERENCE_README.md, "unet_weights.npz" and
# "unet_variant_weights.npz"), with the reference's constructor arguments.
MAIN_ARGS = dict(
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(2,),
    dropout=0.0,
    channel_mult=(1, 2),
    num_classes=None,
    num_heads=2,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
)
VARIANT_ARGS = dict(
    in_channels=3,
    model_channels=32,
    out_channels=3,
    num_res_blocks=1,
    attention_resolutions=(1,),
    dropout=0.0,
    channel_mult=(1,),
    num_classes=10,
    num_heads=1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
)


def _main_model(**overrides):
    model = unet.UNetModel(**{**MAIN_ARGS, **overrides})
    convert.assign_state_dict(model, convert.load_state_dict(golden.path("unet_weights.npz")))
    return model


def _variant_model():
    model = unet.UNetModel(**VARIANT_ARGS)
    convert.assign_state_dict(
        model, convert.load_state_dict(golden.path("unet_variant_weights.npz"))
    )
    return model


def _randomize(model, seed):
    """Gives every weight a random value (GroupNorm gammas around 1), so no output is zero."""
    rng = np.random.default_rng(seed)
    for layer, suffix, variable in convert.variable_map(model).values():
        value = 0.2 * rng.standard_normal(variable.shape)
        if isinstance(layer, unet.GroupNorm32) and suffix == "weight":
            value = 1.0 + 0.1 * rng.standard_normal(variable.shape)
        variable.assign(value.astype(np.float32))


# --- timestep embedding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "timesteps_key, dim, expected_key",
    [
        ("temb_timesteps", 32, "temb_dim32"),
        ("temb_timesteps", 7, "temb_dim7"),
        ("temb_int_timesteps", 16, "temb_int_timesteps_dim16"),
    ],
)
def test_timestep_embedding_matches_reference(timesteps_key, dim, expected_key):
    terms = golden.load("terms")
    embedding = unet_reference.timestep_embedding(tf.constant(terms[timesteps_key]), dim).numpy()
    assert embedding.shape == terms[expected_key].shape
    assert embedding.dtype == np.float32
    # Frequencies equal the reference's bit for bit; what remains is cos/sin rounding
    # (measured: 3.5e-8 at t <= 4000).  An ulp off in a frequency would show as up to 5e-5.
    np.testing.assert_allclose(embedding, terms[expected_key], rtol=0, atol=1e-6)
    if dim % 2:
        np.testing.assert_array_equal(embedding[:, -1], 0.0)


# --- golden forward passes ------------------------------------------------------------------------


def test_forward_matches_reference_with_features():
    data = golden.load("unet_forward")
    model = _main_model()
    x, timesteps = golden.nhwc(data["x"]), data["timesteps"]

    output = model(x, timesteps)
    assert output.dtype == tf.float32
    # Measured: 1.7e-6 relative to the output's scale.
    assert golden.max_rel_error(output, golden.nhwc(data["output"])) <= 1e-4

    emb = model._embed(tf.constant(timesteps), None)  # pylint: disable=protected-access
    np.testing.assert_allclose(emb, data["emb"], rtol=0, atol=1e-4 * np.abs(data["emb"]).max())

    features = model.feature_vectors(x[:1], timesteps[:1])
    assert len(features["down"]) == 4 and len(features["up"]) == 4
    for i, feature in enumerate(features["down"]):
        assert golden.max_rel_error(feature, golden.nhwc(data[f"feat_down_{i:02d}"])) <= 1e-5
    assert golden.max_rel_error(features["middle"], golden.nhwc(data["feat_middle"])) <= 1e-5
    for i, feature in enumerate(features["up"]):
        assert golden.max_rel_error(feature, golden.nhwc(data[f"feat_up_{i:02d}"])) <= 1e-5


def test_class_conditional_variant_matches_reference():
    data = golden.load("variant")
    model = _variant_model()
    output = model(golden.nhwc(data["fwd_x"]), data["fwd_timesteps"], y=data["y"])
    assert output.shape == (3, 8, 8, 3)
    # Measured: 8.7e-7.
    assert golden.max_rel_error(output, golden.nhwc(data["fwd_output"])) <= 1e-4


def test_integer_and_float_timesteps_agree():
    data = golden.load("unet_forward")
    model = _main_model()
    x = golden.nhwc(data["x"])
    t_int = np.array([3, 917], np.int32)
    np.testing.assert_array_equal(model(x, t_int), model(x, t_int.astype(np.float32)))


# --- architecture ---------------------------------------------------------------------------------


def test_layer_names_mirror_reference_state_dict():
    model = unet.UNetModel(**MAIN_ARGS)
    reference_keys = list(golden.load("unet_weights").files)
    assert list(convert.variable_map(model)) == reference_keys
    paths = {v.path for v in model.variables}
    assert "unet/input_blocks.3.0/in_layers.2/kernel" in paths
    assert "unet/input_blocks.3.1/qkv/kernel" in paths
    assert "unet/out.2/kernel" in paths


@pytest.mark.parametrize("name", sorted(json.load(open(golden.path("unet_param_counts.json")))))
def test_parameter_count_matches_reference(name):
    entry = json.load(open(golden.path("unet_param_counts.json")))[name]
    args = dict(entry["args"])
    assert args.pop("use_checkpoint") is False  # gradient checkpointing has no parameters
    model = factory.create_model(**args)
    assert model.count_params() == entry["num_parameters"]


def test_attention_at_requested_resolutions():
    # 32x32 with channel_mult (1, 2, 2): feature resolutions 32, 16, 8; attention only at 16.
    model = factory.create_model(
        32,
        32,
        1,
        learn_sigma=False,
        class_cond=False,
        attention_resolutions="16",
        num_heads=2,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        dropout=0.0,
        channel_mult="1,2,2",
    )
    assert model.attention_resolutions == (2,)
    assert model.attention_prefixes() == [
        "input_blocks.3.1",
        "middle_block.1",
        "output_blocks.2.1",
        "output_blocks.3.1",
    ]
    features = model.feature_vectors(np.zeros([1, 32, 32, 3], np.float32), np.zeros([1]))
    assert features["down"][3].shape[1:3] == (16, 16)  # input_blocks.3 = ResBlock + attention
    assert features["up"][2].shape[1:3] == (16, 16)
    # Head counts: num_heads in the encoder and middle, num_heads_upsample (-1 = same) above.
    heads = {
        p: getattr(model, p.replace(".", "_")).num_heads
        for p in model.attention_prefixes()
        if not p.startswith("middle")
    }
    assert set(heads.values()) == {2}


def test_num_heads_upsample_applies_to_output_blocks_only():
    model = unet.UNetModel(**{**MAIN_ARGS, "num_heads_upsample": 4})
    assert model.input_blocks_3_1.num_heads == 2
    assert model.middle_block_1.num_heads == 2
    assert model.output_blocks_0_1.num_heads == 4


def test_qkv_layout_is_per_head():
    """Zeroing one head's block of qkv channels only changes that head's output channels."""
    model = unet.UNetModel(**{**MAIN_ARGS, "attention_resolutions": (1,)})
    block = model.input_blocks_1_1
    _randomize(model, seed=0)
    x = tf.random.stateless_normal([1, 8, 8, 32], seed=[1, 2])
    proj = block.proj_out
    proj.kernel.assign(np.eye(32, dtype=np.float32))  # expose the attention output directly
    proj.bias.assign(np.zeros(32, np.float32))
    before = block(x).numpy()
    kernel = block.qkv.kernel.numpy()
    kernel[:, 48:] = 0.0  # head 1 owns qkv channels [48, 96): its [q | k | v] block
    block.qkv.kernel.assign(kernel)
    bias = block.qkv.bias.numpy()
    bias[48:] = 0.0
    block.qkv.bias.assign(bias)
    after = block(x).numpy()
    np.testing.assert_array_equal(after[..., :16], before[..., :16])  # head 0 untouched
    assert np.abs(after[..., 16:] - before[..., 16:]).max() > 1e-3


def test_downsample_pads_symmetrically():
    """A 3x3 stride-2 conv with padding 1: output (i, j) sees input rows 2i-1..2i+1."""
    layer = unet.Downsample(32)
    layer.build()
    kernel = np.zeros([3, 3, 32, 32], np.float32)
    kernel[0, 0, 0, 0] = 1.0  # picks input pixel (2i - 1, 2j - 1)
    layer.op.kernel.assign(kernel)
    layer.op.bias.assign(np.zeros(32, np.float32))
    x = np.arange(64, dtype=np.float32).reshape(1, 8, 8, 1) + 1.0
    x = np.concatenate([x, np.zeros([1, 8, 8, 31], np.float32)], axis=-1)
    out = layer(x).numpy()[0, :, :, 0]
    expected = np.zeros([4, 4], np.float32)
    expected[1:, 1:] = x[0, 1:7:2, 1:7:2, 0]
    np.testing.assert_array_equal(out, expected)


def test_output_is_exactly_zero_at_initialisation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal([2, 8, 8, 3]).astype(np.float32)
    model = unet.UNetModel(**{**MAIN_ARGS, "num_classes": 5})
    output = model(x, np.array([10.0, 500.0], np.float32), y=np.array([1, 4]))
    np.testing.assert_array_equal(output, 0.0)
    # ... while the torso is not trivially zero.
    features = model.feature_vectors(x, np.array([10.0, 500.0]), y=np.array([1, 4]))
    assert np.abs(features["up"][-1]).max() > 1e-2


def test_class_conditioning_changes_output():
    # (In the variant fixture the labels have no effect: with 32 channels in 32 groups, the
    # GroupNorm after the additive embedding removes any per-channel constant.  Scale-shift
    # norm does not, so this uses the main architecture with classes and random weights.)
    model = unet.UNetModel(**{**MAIN_ARGS, "num_classes": 5})
    _randomize(model, seed=5)
    x = np.random.default_rng(6).standard_normal([2, 8, 8, 3]).astype(np.float32)
    t = np.array([100.0, 100.0], np.float32)
    out_0 = model(x, t, y=np.array([0, 0])).numpy()
    out_3 = model(x, t, y=np.array([3, 3])).numpy()
    assert np.abs(out_0 - out_3).max() > 1e-2 * np.abs(out_0).max()
    mixed = model(x, t, y=np.array([0, 3])).numpy()
    np.testing.assert_allclose(mixed[0], out_0[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mixed[1], out_3[1], rtol=0, atol=1e-5)
    # Labels act only through their embedding row: copy row 0 into row 3 and they agree.
    table = model.label_emb.embeddings.numpy()
    table[3] = table[0]
    model.label_emb.embeddings.assign(table)
    np.testing.assert_allclose(model(x, t, y=np.array([3, 3])), out_0, rtol=0, atol=1e-5)


def test_dropout_only_when_training():
    data = golden.load("unet_forward")
    model = _main_model(dropout=0.5)
    x, timesteps = golden.nhwc(data["x"]), data["timesteps"]
    eval_a = model(x, timesteps, training=False)
    eval_b = model(x, timesteps)
    np.testing.assert_array_equal(eval_a, eval_b)
    assert golden.max_rel_error(eval_a, golden.nhwc(data["output"])) <= 1e-4
    train_a = model(x, timesteps, training=True)
    train_b = model(x, timesteps, training=True)
    assert np.abs(train_a - eval_a).max() > 1e-2 * np.abs(eval_a).max()
    assert np.abs(train_a - train_b).max() > 1e-2 * np.abs(eval_a).max()


def test_positional_dropout_rows_do_not_depend_on_the_split():
    h = tf.ones([6, 4, 4, 36])  # 576 elements per example: a multiple of four draws
    odd = tf.ones([6, 3, 3, 3])  # 27 elements: rows start mid-counter unless padded
    seed = tf.constant([7, 11], tf.int64)
    for x in (h, odd):
        whole = unet_ops.positional_dropout(x, 0.25, seed, 0, salt=3).numpy()
        parts = [
            unet_ops.positional_dropout(x[a:b], 0.25, seed, a, salt=3).numpy()
            for a, b in ((0, 2), (2, 5), (5, 6))
        ]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
        # Elements are kept with probability 1 - rate and scaled by 1 / (1 - rate).
        assert set(np.unique(whole)) <= {0.0, np.float32(1 / 0.75)}
        if x is h:
            assert abs((whole == 0).mean() - 0.25) < 0.02
            # Rows, layers (salt) and seeds draw different masks.
            assert (whole[0] != whole[1]).any()
            other_salt = unet_ops.positional_dropout(x, 0.25, seed, 0, salt=4).numpy()
            assert (other_salt != whole).mean() > 0.2
            other_seed = unet_ops.positional_dropout(x, 0.25, seed + 1, 0, salt=3).numpy()
            assert (other_seed != whole).mean() > 0.2
    # The multiplier is in h's dtype; the mask is the same under bfloat16.
    bf16 = unet_ops.positional_dropout(tf.cast(h, tf.bfloat16), 0.25, seed, 0, salt=3)
    assert bf16.dtype == tf.bfloat16
    np.testing.assert_array_equal(
        bf16.numpy() == 0, unet_ops.positional_dropout(h, 0.25, seed, 0, salt=3).numpy() == 0
    )


def test_philox_counters_of_stateless_seeds_start_at_zero():
    # positional_dropout offsets the low counter word without a carry: it relies on this.
    for seed in np.random.default_rng(0).integers(-(2**62), 2**62, size=(50, 2)):
        _, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=tf.constant(seed, tf.int64))
        assert int(counter[0]) == 0


def test_training_forward_with_dropout_rng_does_not_depend_on_the_split():
    data = golden.load("unet_forward")
    model = _main_model(dropout=0.3)
    x, timesteps = golden.nhwc(data["x"]), data["timesteps"]
    whole = model(x, timesteps, training=True, dropout_rng=[1, 2, 0]).numpy()
    again = model(x, timesteps, training=True, dropout_rng=[1, 2, 0]).numpy()
    np.testing.assert_array_equal(whole, again)
    halves = [
        model(x[a:b], timesteps[a:b], training=True, dropout_rng=[1, 2, a]).numpy()
        for a, b in ((0, 1), (1, len(timesteps)))
    ]
    np.testing.assert_allclose(np.concatenate(halves), whole, rtol=0, atol=1e-5)
    other = model(x, timesteps, training=True, dropout_rng=[1, 3, 0]).numpy()
    assert np.abs(other - whole).max() > 1e-3


def test_xla_forward_equals_eager():
    data = golden.load("variant")
    model = _variant_model()
    x, timesteps, labels = golden.nhwc(data["fwd_x"]), data["fwd_timesteps"], data["y"]
    compiled = tf.function(lambda x, t, y: model(x, t, y=y), jit_compile=True)
    eager = model(x, timesteps, y=labels)
    np.testing.assert_allclose(
        compiled(x, timesteps, labels), eager, rtol=0, atol=1e-5 * np.abs(eager).max()
    )


def test_mixed_bfloat16_policy():
    data = golden.load("unet_forward")
    model = unet.UNetModel(**MAIN_ARGS, dtype="mixed_bfloat16")
    convert.assign_state_dict(model, convert.load_state_dict(golden.path("unet_weights.npz")))
    fp32_model = unet.UNetModel(**MAIN_ARGS)
    convert.assign_state_dict(fp32_model, convert.load_state_dict(golden.path("unet_weights.npz")))
    assert model.input_blocks_1_0.in_conv.compute_dtype == "bfloat16"
    assert model.input_blocks_1_0.in_conv.kernel.dtype == "float32"
    assert model.time_embed_0.compute_dtype == "float32"  # as the reference's fp16 mode
    assert model.out_conv.compute_dtype == "float32"
    # The float32 skeleton that carries exact pixel values (see the unet module docstring).
    assert model.input_blocks_0_0.compute_dtype == "float32"
    assert model.output_blocks_0_0.skip_connection.compute_dtype == "float32"
    x = golden.nhwc(data["x"])
    emb = model._embed(tf.constant(data["timesteps"], tf.float32), None)
    features = model.input_blocks_0_0(x)
    np.testing.assert_array_equal(features, fp32_model.input_blocks_0_0(x))
    assert model.input_blocks_1_0(features, emb).dtype == tf.float32  # residual stream
    attention_input = tf.ones([1, 4, 4, 64], tf.bfloat16)
    assert (
        model.middle_block_1(attention_input).dtype == tf.float32
    )  # attention adds in float32 too
    output = model(golden.nhwc(data["x"]), data["timesteps"])
    assert output.dtype == tf.float32
    error = golden.max_rel_error(output, golden.nhwc(data["output"]))
    assert error < 5e-2  # bfloat16 has an 8-bit mantissa (measured: ~1e-2)


def test_global_mixed_policy_reaches_every_block():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = unet.UNetModel(**MAIN_ARGS)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.middle_block_1.qkv.compute_dtype == "bfloat16"
    assert model(np.zeros([1, 8, 8, 3], np.float32), np.ones([1])).dtype == tf.float32


def _group_norm_float64(x, gamma, beta, groups, epsilon=unet.NORM_EPSILON):
    """torch.nn.GroupNorm's definition on an [N, ..., C] float64 tensor, by tf.nn.moments."""
    shape = tf.shape(x)
    grouped = tf.reshape(x, tf.concat([shape[:-1], [groups, x.shape[-1] // groups]], 0))
    axes = list(range(1, x.shape.rank - 1)) + [x.shape.rank]
    mean, variance = tf.nn.moments(grouped, axes=axes, keepdims=True)
    normalized = tf.reshape((grouped - mean) * tf.math.rsqrt(variance + epsilon), shape)
    return normalized * gamma + beta


@pytest.mark.parametrize(
    "shape, groups", [((3, 4, 5, 64), 32), ((2, 6, 96), 32), ((2, 3, 3, 32), 8)]
)
def test_group_norm_value_and_analytic_gradient_match_the_definition(shape, groups):
    rng = np.random.default_rng(0)
    # An offset mean and a non-unit scale, as activations have.
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    beta = rng.standard_normal(shape[-1]).astype(np.float32)
    upstream = rng.standard_normal(shape).astype(np.float32)  # an arbitrary dL/dy
    layer = unet.GroupNorm32(groups=groups)
    layer.build(shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    inputs = [tf.constant(x), tf.constant(x, tf.float64)]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        out = layer(inputs[0])
        gamma64, beta64 = tf.constant(gamma, tf.float64), tf.constant(beta, tf.float64)
        tape.watch([gamma64, beta64])
        expected = _group_norm_float64(inputs[1], gamma64, beta64, groups)
        loss = tf.reduce_sum(out * upstream)
        expected_loss = tf.reduce_sum(expected * upstream)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)
    grads = tape.gradient(loss, [inputs[0], layer.gamma, layer.beta])
    expected_grads = tape.gradient(expected_loss, [inputs[1], gamma64, beta64])
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("conditioning", ["offset", "scale_shift", "none"])
@pytest.mark.parametrize("silu", [True, False])
def test_fused_group_norm_conditioning_and_silu_match_the_definition(conditioning, silu):
    """GroupNorm32(x, offset=, scale=, shift=, silu=) against the separate float64 ops."""
    shape, groups = (3, 4, 5, 64), 32
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
    beta = rng.standard_normal(shape[-1]).astype(np.float32)
    per_sample = {
        name: (rng.standard_normal((shape[0], shape[-1])) * spread + center).astype(np.float32)
        for name, spread, center in (("offset", 2.0, 1.0), ("scale", 0.3, 1.0), ("shift", 1.0, 0))
    }
    upstream = rng.standard_normal(shape).astype(np.float32)
    layer = unet.GroupNorm32(groups=groups)
    layer.build(shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    names = {"offset": ["offset"], "scale_shift": ["scale", "shift"], "none": []}[conditioning]
    args32 = {n: tf.constant(per_sample[n]) for n in names}
    args64 = {n: tf.constant(per_sample[n], tf.float64) for n in names}
    x32, x64 = tf.constant(x), tf.constant(x, tf.float64)
    gamma64, beta64 = tf.constant(gamma, tf.float64), tf.constant(beta, tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x32, x64, gamma64, beta64, *args32.values(), *args64.values()])
        out = layer(x32, silu=silu, **args32)
        h = x64 + args64["offset"][:, None, None, :] if "offset" in names else x64
        expected = _group_norm_float64(h, gamma64, beta64, groups)
        if "scale" in names:
            expected = (
                expected * args64["scale"][:, None, None, :] + args64["shift"][:, None, None, :]
            )
        if silu:
            expected = tf.nn.silu(expected)
        loss = tf.reduce_sum(out * upstream)
        expected_loss = tf.reduce_sum(expected * upstream)
    np.testing.assert_allclose(out, expected, rtol=0, atol=4e-6 * np.abs(expected).max())
    grads = tape.gradient(loss, [x32, layer.gamma, layer.beta, *args32.values()])
    expected_grads = tape.gradient(expected_loss, [x64, gamma64, beta64, *args64.values()])
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_fused_group_norm_silu_is_the_same_in_eager_and_graph_execution():
    # Grappler may fuse Sigmoid * x into oneDNN's Swish (other rounding) in one graph and not in
    # another; the norm's SiLU is written so that no graph gets that fusion.
    x = tf.constant(np.random.default_rng(2).standard_normal([2, 8, 8, 64]).astype(np.float32) + 1)
    layer = unet.GroupNorm32()
    layer.build(x.shape)
    eager = layer(x, silu=True).numpy()
    graph = tf.function(lambda x: layer(x, silu=True))(x).numpy()
    np.testing.assert_array_equal(eager, graph)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_shape, t, y, message",
    [
        ([2, 7, 8, 3], [1.0, 2.0], None, "height 7 must be a positive multiple of 2"),
        ([2, 8, 6, 3], [1.0, 2.0], None, None),  # 6 is a multiple of 2: accepted
        ([2, 8, 8, 4], [1.0, 2.0], None, "x has 4 channels, the model expects 3"),
        ([8, 8, 3], [1.0], None, "x must be \\[N, H, W, C\\]"),
        ([2, 8, 8, 3], [[1.0, 2.0]], None, "timesteps must be a 1-D"),
        ([2, 8, 8, 3], 1.0, None, "timesteps must be a 1-D"),
        ([2, 8, 8, 3], [1.0, 2.0, 3.0], None, "3 timesteps for a batch of 2"),
        ([2, 8, 8, 3], [1.0, 2.0], [1, 2], "labels y were given to an unconditional model"),
    ],
)
def test_bad_input_unconditional(x_shape, t, y, message):
    model = unet.UNetModel(**MAIN_ARGS)
    x = np.zeros(x_shape, np.float32)
    if message is None:
        assert model(x, np.array(t, np.float32)).shape == tuple(x_shape[:3]) + (6,)
        return
    with pytest.raises(ValueError, match=message):
        model(x, np.array(t, np.float32), y=None if y is None else np.array(y))


@pytest.mark.parametrize(
    "y, message",
    [
        (None, "needs labels y of shape \\[N\\]"),
        (np.array([1, 2, 3]), "labels y must be \\[N\\] with N = 2"),
        (np.array([1.0, 2.0], np.float32), "labels y must be integers"),
    ],
)
def test_bad_labels_class_conditional(y, message):
    model = unet.UNetModel(**VARIANT_ARGS)
    with pytest.raises(ValueError, match=message):
        model(np.zeros([2, 8, 8, 3], np.float32), np.ones([2], np.float32), y=y)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="not a multiple of 32 groups"):
        unet.UNetModel(**{**MAIN_ARGS, "model_channels": 16})
    with pytest.raises(ValueError, match="num_heads=3"):
        unet.UNetModel(**{**MAIN_ARGS, "num_heads": 3})
    with pytest.raises(ValueError, match="conv_resample=False"):
        unet.UNetModel(**{**MAIN_ARGS, "conv_resample": False})


# --- create_model and the config factory ----------------------------------------------------------


def _small_create_model(image_size, **overrides):
    args = dict(
        num_channels=32,
        num_res_blocks=1,
        learn_sigma=True,
        class_cond=False,
        attention_resolutions=str(image_size // 2),
        num_heads=1,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        dropout=0.0,
    )
    args.update(overrides)
    return factory.create_model(image_size, **args)


@pytest.mark.parametrize(
    "image_size, channel_mult",
    [
        (32, (1, 2, 2, 2)),
        (64, (1, 2, 3, 4)),
        (128, (1, 1, 2, 3, 4)),
        (256, (1, 1, 2, 2, 4, 4)),
    ],
)
def test_create_model_default_channel_mult(image_size, channel_mult):
    assert _small_create_model(image_size).channel_mult == channel_mult


def test_create_model_arguments():
    model = _small_create_model(
        16,
        channel_mult="1,2",
        attention_resolutions="8,16",
        class_cond=True,
        num_classes=7,
        in_channels=1,
    )
    assert model.channel_mult == (1, 2)
    assert model.attention_resolutions == (2, 1)
    assert (model.in_channels, model.out_channels, model.num_classes) == (1, 2, 7)
    assert _small_create_model(16, channel_mult=(1, 1), learn_sigma=False).out_channels == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=48), "image_size=48 has no default UNet channel_mult .*set channel_mult"),
        (dict(image_size=20, channel_mult="1,2,2,2"), "image_size=20 is not divisible by 8"),
        (dict(image_size=32, channel_mult="1,x"), "channel_mult='1,x': expected comma-separated"),
        (
            dict(image_size=32, attention_resolutions="2"),
            "attention_resolutions='2': 2 is not a resolution of this UNet",
        ),
        (
            dict(image_size=32, attention_resolutions="12"),
            "attention_resolutions='12': 12 is not a resolution of this UNet",
        ),
        (dict(image_size=32, class_cond=True, num_classes=0), "num_classes >= 1"),
    ],
)
def test_create_model_errors(kwargs, message):
    kwargs = dict(kwargs)
    image_size = kwargs.pop("image_size")
    with pytest.raises(ValueError, match=message):
        _small_create_model(image_size, **kwargs)


def _problems(message):
    """The problems a ValueError lists ("invalid ...:\n  - a\n  - b"), or its one message."""
    head, _, rest = message.partition(":\n  - ")
    return rest.split("\n  - ") if head.startswith("invalid") and rest else [message]


@pytest.mark.parametrize(
    "overrides",
    [
        {"data.image_size": 48, "model.channel_mult": ""},
        {"model.channel_mult": "1,x"},
        {"model.channel_mult": "1,0"},
        {
            "data.image_size": 40,
            "model.channel_mult": "1,1,2,2,2",
            "model.attention_resolutions": "10",
        },
        {"model.attention_resolutions": "3"},
        {"model.attention_resolutions": ""},
        {"model.num_channels": 48},
        {"model.num_heads": 3},
        {"model.num_heads_upsample": 5},
        {"model.num_res_blocks": 0},
        {"model.dropout": 1.0},
        {"model.num_heads": 3, "model.dropout": -0.5},
    ],
)
def test_create_model_and_validate_config_apply_the_same_rules(overrides):
    """One set of rules and messages (unet_options): the config's messages name the config field
    where create_model's name its argument, and say the same otherwise."""
    config = _tiny_config()
    config_utils.validate_config(config)
    for field, value in overrides.items():
        group, name = field.split(".")
        config[group][name] = value
    with pytest.raises(ValueError) as from_config:
        config_utils.validate_config(config)
    with pytest.raises(ValueError) as from_flags:
        factory.create_model_from_config(config)
    config_problems = [
        problem.replace("data.image_size", "image_size").replace("model.", "")
        for problem in _problems(str(from_config.value))
    ]
    assert config_problems == _problems(str(from_flags.value))
    # Every problem names its config field with the value: "model.num_heads=3 ...".
    assert all(
        re.match(r"(data|model)\.\w+=", problem) for problem in _problems(str(from_config.value))
    )


def test_res_blocks_get_their_index_as_dropout_salt():
    model = unet.UNetModel(**MAIN_ARGS)
    suffix = ".in_layers.0"
    prefixes = [p[: -len(suffix)] for p in model.torch_layers() if p.endswith(suffix)]
    assert len(prefixes) == 8  # 2 input, 2 middle and 4 output ResBlocks, in module order
    salts = [getattr(model, p.replace(".", "_")).dropout_salt for p in prefixes]
    assert salts == list(range(8))


def _tiny_config():
    return golden.fixture_model_config()


def test_create_model_from_config():
    config = _tiny_config()
    model = factory.create_model_from_config(config)
    assert isinstance(model, unet.UNetModel) and not isinstance(model, unet.SuperResModel)
    assert (model.in_channels, model.out_channels, model.model_channels) == (3, 6, 32)
    assert model.attention_resolutions == (2,) and model.num_classes is None
    assert model.count_params() == 757030  # the reference fixture model of the same flags

    config.data.num_channels = 1
    config.data.class_cond = True
    config.data.num_classes = 10
    config.diffusion.learn_sigma = False
    model = factory.create_model_from_config(config)
    assert (model.in_channels, model.out_channels, model.num_classes) == (1, 1, 10)

    config.data.low_res_size = 4
    model = factory.create_model_from_config(config)
    assert isinstance(model, unet.SuperResModel) and model.in_channels == 2

    config.data.num_classes = 0
    with pytest.raises(ValueError, match="num_classes >= 1"):
        factory.create_model_from_config(config)


# --- super-resolution -----------------------------------------------------------------------------


def _torch_bilinear_numpy(images, out_h, out_w):
    """PyTorch's bilinear interpolation (align_corners=False) in numpy, from its definition.

    Source coordinate ``(dst + 0.5) * in / out - 0.5`` clamped at 0; neighbours
    ``i0 = floor(src)`` and ``min(i0 + 1, in - 1)``, weighted linearly.
    """

    def axis_weights(in_size, out_size):
        src = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, in_size - 1)
        return i0, i1, src - i0

    h0, h1, hw = axis_weights(images.shape[1], out_h)
    w0, w1, ww = axis_weights(images.shape[2], out_w)
    rows = images[:, h0] * (1 - hw)[None, :, None, None] + images[:, h1] * hw[None, :, None, None]
    return rows[:, :, w0] * (1 - ww)[None, None, :, None] + rows[:, :, w1] * ww[None, None, :, None]


@pytest.mark.parametrize("in_size, out_size", [((4, 4), (16, 16)), ((5, 3), (8, 8))])
def test_low_res_resize_matches_torch_bilinear(in_size, out_size):
    images = np.random.default_rng(1).standard_normal([2, *in_size, 3]).astype(np.float32)
    resized = unet_reference.resize_like_torch_bilinear(images, *out_size)
    np.testing.assert_allclose(resized, _torch_bilinear_numpy(images, *out_size), atol=1e-6)


def test_super_res_model_concatenates_upsampled_low_res():
    sr_args = {**MAIN_ARGS, "num_classes": 4}
    super_res = unet.SuperResModel(**sr_args)
    plain = unet.UNetModel(**{**sr_args, "in_channels": 6})
    _randomize(plain, seed=3)
    # The reference's SuperResModel has the plain UNet's state_dict keys, with 6 input channels.
    convert.assign_state_dict(super_res, convert.model_state_dict(plain))

    rng = np.random.default_rng(4)
    x = rng.standard_normal([2, 8, 8, 3]).astype(np.float32)
    low_res = rng.standard_normal([2, 4, 4, 3]).astype(np.float32)
    t, y = np.array([5.0, 700.0], np.float32), np.array([0, 3])
    expected = plain(np.concatenate([x, _torch_bilinear_numpy(low_res, 8, 8)], -1), t, y=y)
    output = super_res(x, t, y=y, low_res=low_res)
    assert output.shape == (2, 8, 8, 6)
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-5 * np.abs(expected).max())

    with pytest.raises(ValueError, match="needs low_res"):
        super_res(x, t, y=y)
    with pytest.raises(ValueError, match="low_res must be \\[N, h, w, 3\\]"):
        super_res(x, t, y=y, low_res=low_res[..., :1])
    with pytest.raises(ValueError, match="x must be \\[N, H, W, 3\\]"):
        super_res(np.concatenate([x, x], -1), t, y=y, low_res=low_res)


# --- checkpointing, export and distribution -------------------------------------------------------


def test_clone_model_keeps_architecture_and_policy():
    """keras.models.clone_model (e.g. for an EMA copy) rebuilds the same network."""
    model = unet.UNetModel(**{**MAIN_ARGS, "num_classes": 3}, dtype="mixed_bfloat16")
    _randomize(model, seed=7)
    clone = keras.models.clone_model(model)
    assert type(clone) is unet.UNetModel and clone is not model
    assert clone.dtype_policy.name == "mixed_bfloat16"
    assert clone.count_params() == model.count_params()
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(8).standard_normal([1, 8, 8, 3]).astype(np.float32)
    args = (x, np.array([42.0], np.float32))
    np.testing.assert_array_equal(clone(*args, y=np.array([2])), model(*args, y=np.array([2])))


def test_tf_checkpoint_holds_every_variable(tmp_path):
    model = _variant_model()
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(path) if name.startswith("model/")]
    assert len(saved) == len(model.variables) == 89

    restored = unet.UNetModel(**VARIANT_ARGS)
    tf.train.Checkpoint(model=restored).read(path).assert_consumed()
    data = golden.load("variant")
    args = (golden.nhwc(data["fwd_x"]), data["fwd_timesteps"])
    np.testing.assert_array_equal(restored(*args, y=data["y"]), model(*args, y=data["y"]))


@pytest.mark.slow
def test_export_archive_round_trip(tmp_path):
    data = golden.load("variant")
    model = _variant_model()
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda x, t, y: model(x, t, y=y),
        input_signature=[
            tf.TensorSpec([None, 8, 8, 3], tf.float32),
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([None], tf.int64),
        ],
    )
    archive.write_out(str(tmp_path / "export"), verbose=False)

    loaded = tf.saved_model.load(str(tmp_path / "export"))
    args = (golden.nhwc(data["fwd_x"]), data["fwd_timesteps"], data["y"])
    assert golden.max_rel_error(loaded.serving_default(*args), model(*args[:2], y=args[2])) <= 1e-5


@pytest.mark.slow
def test_plain_saved_model_of_a_module_tracking_the_model(tmp_path):
    """tf.saved_model.save does not trip over the two-argument call: a tracked keras.Model whose
    call is call(self, x, t) can make it fail with "missing a required argument: 't'", since
    Keras builds a default signature that calls self(inputs)."""
    model = _variant_model()
    module = tf.Module()
    module.net = model
    module.predict = tf.function(
        lambda x, t, y: model(x, t, y=y),
        input_signature=[
            tf.TensorSpec([None, 8, 8, 3]),
            tf.TensorSpec([None]),
            tf.TensorSpec([None], tf.int64),
        ],
    )
    tf.saved_model.save(module, str(tmp_path / "module"))
    loaded = tf.saved_model.load(str(tmp_path / "module"))
    data = golden.load("variant")
    args = (golden.nhwc(data["fwd_x"]), data["fwd_timesteps"], data["y"])
    assert golden.max_rel_error(loaded.predict(*args), model(*args[:2], y=args[2])) <= 1e-5


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tests import golden
    from tf_iddpm import convert, unet
    from tests.unet_test import MAIN_ARGS

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = unet.UNetModel(**{**MAIN_ARGS, "dropout": 0.3})
    assert all(isinstance(v.value, tf.distribute.DistributedValues) for v in model.variables)
    convert.assign_state_dict(model, convert.load_state_dict(golden.path("unet_weights.npz")))
    data = golden.load("unet_forward")
    x, t = golden.nhwc(data["x"]), data["timesteps"]

    @tf.function
    def step(x, t):
        return strategy.run(
            lambda x, t: (model(x, t, training=False), model(x, t, training=True)), args=(x, t))

    # Both replicas get the same example: eval outputs must agree, dropout masks must not.
    def per_replica(value):
        return strategy.experimental_distribute_values_from_function(lambda ctx: value[:1])

    evals, trains = step(per_replica(x), per_replica(t))
    e0, e1 = [v.numpy() for v in strategy.experimental_local_results(evals)]
    d0, d1 = [v.numpy() for v in strategy.experimental_local_results(trains)]
    ref = golden.nhwc(data["output"])[:1]
    print(json.dumps({"eval_err": [golden.max_rel_error(e0, ref), golden.max_rel_error(e1, ref)],
                      "dropout_diff": float(np.abs(d0 - d1).max())}))
""")


@pytest.mark.slow
def test_mirrored_strategy_forward():
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert max(report["eval_err"]) <= 1e-4
    assert report["dropout_diff"] > 1e-3  # each replica draws its own dropout mask
