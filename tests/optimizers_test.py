"""Tests for tf_iddpm/optimizers.py: create_adam is torch.optim.AdamW's arithmetic (float64 closed
form); FusedAdam with Keras' epsilon placement equals Keras' Adam / AdamW; fused under strategies."""

import json
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_iddpm import optimizers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = [(3, 3, 4, 8), (8,), (5,)]


def _run(optimizer, num_steps=20):
    """Applies num_steps seeded gradients to seeded variables; returns weights and slots."""
    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    optimizer.build(variables)

    @tf.function
    def step(grads):
        optimizer.apply_gradients(zip(grads, variables))

    for i in range(num_steps):
        grad_rng = np.random.default_rng(100 + i)
        step([tf.constant(grad_rng.standard_normal(s).astype(np.float32)) for s in SHAPES])
    return [v.numpy() for v in variables], [v.numpy() for v in optimizer.variables]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_create_adam_is_torch_adamw(weight_decay):
    # Gradients scaled down so that sqrt(v_hat) ~ epsilon matters: where Keras adds its epsilon
    # shows in the result (the same run with Keras' placement is checked to differ below).
    def run(optimizer):
        rng = np.random.default_rng(0)
        variables = [tf.Variable(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
        optimizer.build(variables)
        step = tf.function(lambda grads: optimizer.apply_gradients(zip(grads, variables)))
        for i in range(10):
            grad_rng = np.random.default_rng(100 + i)
            step(
                [tf.constant(grad_rng.standard_normal(s).astype(np.float32) * 1e-8) for s in SHAPES]
            )
        return [v.numpy() for v in variables]

    def expected():
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(s).astype(np.float32).astype(np.float64) for s in SHAPES]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        for i in range(10):
            grad_rng = np.random.default_rng(100 + i)
            for j, s in enumerate(SHAPES):
                g = (grad_rng.standard_normal(s).astype(np.float32) * 1e-8).astype(np.float64)
                params[j] = params[j] * (1 - 1e-3 * weight_decay)
                m[j] = 0.9 * m[j] + 0.1 * g
                v[j] = 0.999 * v[j] + 0.001 * g * g
                m_hat, v_hat = m[j] / (1 - 0.9 ** (i + 1)), v[j] / (1 - 0.999 ** (i + 1))
                params[j] = params[j] - 1e-3 * m_hat / (np.sqrt(v_hat) + 1e-8)
        return params

    initial = [np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in SHAPES]
    ours, reference = run(optimizers.create_adam(1e-3, weight_decay)), expected()
    for value, ref, init in zip(ours, reference, initial):
        update, ref_update = value - init, ref - init
        # float32 weights of scale 1: the update (~1e-3) is resolved to ~1e-7 absolute.
        np.testing.assert_allclose(update, ref_update, rtol=0, atol=2e-6)
    keras_placement = optimizers.FusedAdam(1e-3, epsilon=1e-8, weight_decay=weight_decay or None)
    moved = run(keras_placement)
    assert max(np.abs((a - i) - (r - i)).max() for a, r, i in zip(moved, reference, initial)) > 1e-4


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_adam_with_keras_epsilon_follows_keras_adam(weight_decay):
    keras_optimizer = (
        keras.optimizers.AdamW(1e-3, weight_decay=weight_decay)
        if weight_decay
        else keras.optimizers.Adam(1e-3)
    )
    fused_weights, fused_slots = _run(optimizers.FusedAdam(1e-3, weight_decay=weight_decay or None))
    keras_weights, keras_slots = _run(keras_optimizer)
    for fused, reference in zip(fused_weights, keras_weights):
        # 1-2 ulp: Keras rounds (1 - beta) from float64, the kernel subtracts in float32.
        np.testing.assert_allclose(
            fused, reference, rtol=0, atol=4 * np.spacing(np.abs(reference).max())
        )
    assert len(fused_slots) == len(keras_slots)
    for fused, reference in zip(fused_slots, keras_slots):
        # The second moment carries float32(1 - 0.999f) = 0.000999987 vs 0.001: 1.3e-5 relative;
        # the first moment a few ulp of its largest entry.
        np.testing.assert_allclose(
            fused, reference, rtol=3e-5, atol=4 * np.spacing(np.abs(reference).max())
        )
    # The weights really moved (20 steps of lr 1e-3 with unit-scale gradients).
    initial = np.random.default_rng(0).standard_normal(SHAPES[0]).astype(np.float32)
    assert np.abs(fused_weights[0] - initial).max() > 5e-3


def test_one_fused_kernel_per_variable_and_shared_bias_correction():
    optimizer = optimizers.create_adam(1e-4)
    variables = [tf.Variable(tf.zeros(s)) for s in SHAPES]
    optimizer.build(variables)
    graph = (
        tf.function(lambda grads: optimizer.apply_gradients(zip(grads, variables)))
        .get_concrete_function([tf.TensorSpec(s, tf.float32) for s in SHAPES])
        .graph
    )
    op_types = [op.type for op in graph.get_operations()]
    assert op_types.count("ResourceApplyAdam") == len(SHAPES)
    assert op_types.count("Pow") == 2  # beta_1^t and beta_2^t once per step, not per variable
    assert op_types.count("Sqrt") == 1  # the step's epsilon * sqrt(1 - beta_2^t), once


def test_amsgrad_falls_back_to_the_keras_update():
    fused_weights, _ = _run(optimizers.FusedAdam(1e-3, amsgrad=True), num_steps=5)
    keras_weights, _ = _run(keras.optimizers.Adam(1e-3, amsgrad=True), num_steps=5)
    for fused, reference in zip(fused_weights, keras_weights):
        np.testing.assert_array_equal(fused, reference)


def test_unfused_path_runs_the_same_arithmetic():
    """Bfloat16 variables take the op-by-op path; in float32 it must equal the fused kernel."""
    fused = optimizers.create_adam(1e-3, 0.01)
    unfused = optimizers.create_adam(1e-3, 0.01)
    unfused.update_step = unfused._unfused_update_step  # pylint: disable=protected-access
    fused_weights, _ = _run(fused, num_steps=5)
    unfused_weights, _ = _run(unfused, num_steps=5)
    for a, b in zip(fused_weights, unfused_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=4 * np.spacing(np.abs(b).max()))


def test_amsgrad_with_the_torch_epsilon_is_refused():
    with pytest.raises(
        ValueError, match="amsgrad=True is only supported with corrected_epsilon=False"
    ):
        optimizers.FusedAdam(1e-3, amsgrad=True, corrected_epsilon=True)


def test_checkpoints_move_between_keras_adam_and_fused_adam(tmp_path):
    _, keras_slots = _run(keras.optimizers.Adam(1e-3), num_steps=3)
    rng = np.random.default_rng(0)
    source_vars = [tf.Variable(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    source = keras.optimizers.Adam(1e-3)
    source.build(source_vars)
    for slot, value in zip(source.variables, keras_slots):
        slot.assign(value)
    path = tf.train.Checkpoint(optimizer=source).save(str(tmp_path / "ckpt"))

    target = optimizers.create_adam(1e-3)
    target.build([tf.Variable(tf.zeros(s)) for s in SHAPES])
    tf.train.Checkpoint(optimizer=target).restore(path).assert_existing_objects_matched()
    assert int(target.iterations.numpy()) == 3
    for restored, saved in zip(target.variables, keras_slots):
        np.testing.assert_array_equal(restored.numpy(), saved)


def test_negative_weight_decay_is_rejected():
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        optimizers.create_adam(1e-4, -0.1)


# Under MirroredStrategy over 2 logical CPUs each device's component is updated by the fused
# kernel with that device's slots, and the result equals the default strategy's.
_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    from tf_iddpm import distribute
    distribute.split_cpu(2)
    import keras
    import numpy as np
    import tensorflow as tf
    from tf_iddpm import optimizers

    shapes = [(3, 3, 4, 8), (8,)]
    results = {}
    for name, strategy in (("default", tf.distribute.get_strategy()),
                           ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
        with strategy.scope():
            rng = np.random.default_rng(0)
            variables = [keras.Variable(rng.standard_normal(s).astype(np.float32)) for s in shapes]
            optimizer = optimizers.create_adam(1e-3)
            optimizer.build(variables)

        coefficients = [tf.constant(np.random.default_rng(7).standard_normal(s).astype(np.float32))
                        for s in shapes]

        def replica_fn():
            with tf.GradientTape() as tape:
                # Per-replica share of the loss: Keras sums the replicas' gradients.
                loss = tf.add_n([tf.reduce_sum(v * c) for v, c in zip(variables, coefficients)])
                loss /= strategy.num_replicas_in_sync
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

        @tf.function
        def step():
            strategy.run(replica_fn)

        graph = step.get_concrete_function().graph
        fused = sum(op.type == "ResourceApplyAdam" for op in graph.get_operations())
        for _ in range(3):
            step()
        components = [[c.numpy().tolist() for c in strategy.experimental_local_results(v.value)]
                      for v in variables]
        results[name] = {"fused_ops": fused, "components": components}
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
""")


@pytest.mark.slow
def test_fused_under_mirrored_strategy_equals_default(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, str(out)],
        check=True,
        cwd=REPO_ROOT,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    results = json.loads(out.read_text())
    assert results["default"]["fused_ops"] == 2
    assert results["mirrored"]["fused_ops"] == 4  # 2 variables x 2 devices
    for default_var, mirrored_var in zip(
        results["default"]["components"], results["mirrored"]["components"]
    ):
        (default_value,) = default_var
        first, second = mirrored_var
        np.testing.assert_array_equal(first, second)
        np.testing.assert_allclose(first, default_value, rtol=0, atol=1e-6)
