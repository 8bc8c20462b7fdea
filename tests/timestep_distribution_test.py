"""Tests for tf_iddpm.timestep_distribution: the training timesteps p(t) (paper Section 3.3)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tf_iddpm import timestep_distribution

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NumpyLossHistory:
    """The reference's loss-second-moment bookkeeping, written sequentially in numpy."""

    def __init__(self, num_timesteps, history_per_term, uniform_prob):
        self.history = np.zeros([num_timesteps, history_per_term], np.float64)
        self.counts = np.zeros([num_timesteps], np.int64)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob

    def update(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self.counts[t] == self.history_per_term:
                self.history[t] = np.append(self.history[t, 1:], loss)
            else:
                self.history[t, self.counts[t]] = loss
                self.counts[t] += 1

    def weights(self):
        if not np.all(self.counts == self.history_per_term):
            return np.ones(len(self.counts))
        weights = np.sqrt(np.mean(self.history**2, axis=-1))
        weights = weights / weights.sum()
        return weights * (1 - self.uniform_prob) + self.uniform_prob / len(weights)


def _random_stream(rng, num_timesteps, num_entries):
    ts = rng.integers(0, num_timesteps, size=num_entries)
    # float32 losses, as a float32 model produces them; the history keeps them in float64.
    losses = rng.gamma(2.0, 1.0, size=num_entries).astype(np.float32)
    return ts, losses


def _warm_up(sampler, per_t_losses):
    """Feeds every t the same loss `history_per_term` times."""
    num_timesteps = sampler.num_timesteps
    ts = np.tile(np.arange(num_timesteps), sampler.history_per_term)
    sampler.update_with_all_losses(ts, np.tile(per_t_losses, sampler.history_per_term))


def test_uniform_sampler_weights_and_importance_weights():
    sampler = timestep_distribution.UniformTimesteps(7)
    np.testing.assert_array_equal(sampler.weights().numpy(), np.ones(7))
    t, weights = sampler.sample(64, tf.constant([3, 4]))
    assert t.dtype == tf.int32 and weights.dtype == tf.float32
    assert t.shape == (64,) and weights.shape == (64,)
    assert np.all((t.numpy() >= 0) & (t.numpy() < 7))
    np.testing.assert_array_equal(weights.numpy(), np.ones(64, np.float32))
    assert len(sampler.variables) == 0
    sampler.update_with_all_losses([1, 2], [0.5, 0.25])  # a no-op that must not fail
    np.testing.assert_array_equal(sampler.weights().numpy(), np.ones(7))


def test_weights_uniform_before_warm_up():
    sampler = timestep_distribution.LossSecondMomentTimesteps(6, history_per_term=3)
    np.testing.assert_array_equal(sampler.weights().numpy(), np.ones(6))
    assert not sampler.warmed_up().numpy()
    # Every t but the last full: still uniform.
    sampler.update_with_all_losses(np.repeat(np.arange(5), 3), np.arange(1.0, 16.0))
    assert not sampler.warmed_up().numpy()
    np.testing.assert_array_equal(sampler.weights().numpy(), np.ones(6))
    t, weights = sampler.sample(32, tf.constant([0, 1]))
    np.testing.assert_array_equal(weights.numpy(), np.ones(32, np.float32))


def test_weights_after_warm_up_are_root_mean_square_of_history():
    num_timesteps, history_len, uniform_prob = 5, 4, 0.001
    sampler = timestep_distribution.LossSecondMomentTimesteps(
        num_timesteps, history_per_term=history_len, uniform_prob=uniform_prob
    )
    # Row t holds the losses (t + 1) * [1, 2, 3, 4]: E[L^2] = (t + 1)^2 * 30 / 4.
    ts = np.tile(np.arange(num_timesteps), history_len)
    losses = np.concatenate([(np.arange(num_timesteps) + 1.0) * k for k in range(1, 5)])
    sampler.update_with_all_losses(ts, losses)
    assert sampler.warmed_up().numpy()
    rms = (np.arange(num_timesteps) + 1.0) * np.sqrt(30.0 / 4.0)
    expected = rms / rms.sum() * (1 - uniform_prob) + uniform_prob / num_timesteps
    np.testing.assert_allclose(sampler.weights().numpy(), expected, rtol=1e-14)
    np.testing.assert_allclose(sampler.probabilities().numpy().sum(), 1.0, rtol=1e-14)


def test_all_zero_losses_give_uniform_distribution():
    sampler = timestep_distribution.LossSecondMomentTimesteps(4, history_per_term=2)
    _warm_up(sampler, np.zeros(4))
    assert sampler.warmed_up().numpy()
    np.testing.assert_allclose(sampler.probabilities().numpy(), np.full(4, 0.25), rtol=1e-14)


def test_ring_buffer_matches_sequential_numpy_reference():
    num_timesteps, history_len = 7, 10
    rng = np.random.default_rng(0)
    sampler = timestep_distribution.LossSecondMomentTimesteps(num_timesteps)
    reference = NumpyLossHistory(num_timesteps, history_len, 0.001)
    # 300 entries over 7 timesteps: ~43 per t, so every row wraps around several times; fed in
    # uneven chunks (including an empty one) to cross update boundaries.
    ts, losses = _random_stream(rng, num_timesteps, 300)
    for start, stop in [(0, 5), (5, 5), (5, 64), (64, 200), (200, 300)]:
        sampler.update_with_all_losses(ts[start:stop], losses[start:stop])
        reference.update(ts[start:stop], losses[start:stop])
        np.testing.assert_array_equal(sampler.loss_history.numpy(), reference.history)
        np.testing.assert_array_equal(sampler.loss_counts.numpy(), reference.counts)
    assert np.bincount(ts).min() > history_len
    np.testing.assert_allclose(sampler.weights().numpy(), reference.weights(), rtol=1e-14)


def test_ring_buffer_partial_history_matches_reference():
    # Fewer entries than T * history: rows are partly filled, counts differ between t.
    num_timesteps = 9
    rng = np.random.default_rng(1)
    sampler = timestep_distribution.LossSecondMomentTimesteps(num_timesteps, history_per_term=6)
    reference = NumpyLossHistory(num_timesteps, 6, 0.001)
    ts, losses = _random_stream(rng, num_timesteps, 30)
    sampler.update_with_all_losses(ts, losses)
    reference.update(ts, losses)
    np.testing.assert_array_equal(sampler.loss_history.numpy(), reference.history)
    np.testing.assert_array_equal(sampler.loss_counts.numpy(), reference.counts)
    assert len(set(reference.counts)) > 1


def test_update_inside_tf_function_matches_reference():
    num_timesteps = 5
    rng = np.random.default_rng(2)
    sampler = timestep_distribution.LossSecondMomentTimesteps(num_timesteps, history_per_term=4)
    reference = NumpyLossHistory(num_timesteps, 4, 0.001)
    update = tf.function(sampler.update_with_all_losses)
    for _ in range(6):
        ts, losses = _random_stream(rng, num_timesteps, 8)
        update(tf.constant(ts, tf.int32), tf.constant(losses))
        reference.update(ts, losses)
    np.testing.assert_array_equal(sampler.loss_history.numpy(), reference.history)
    np.testing.assert_array_equal(sampler.loss_counts.numpy(), reference.counts)
    # One trace for one input signature: the loop over entries is a tf.while_loop.
    assert update.experimental_get_tracing_count() == 1


def test_update_with_local_losses_in_default_strategy():
    sampler = timestep_distribution.LossSecondMomentTimesteps(3, history_per_term=2)
    sampler.update_with_local_losses(tf.constant([2, 0, 2, 2]), tf.constant([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(sampler.loss_history.numpy(), [[2, 0], [0, 0], [3, 4]])
    np.testing.assert_array_equal(sampler.loss_counts.numpy(), [1, 0, 2])


def _warmed_up_sampler():
    """T = 10 with p(t) ∝ t + 1 (mixed with uniform_prob), so no probability is tiny."""
    sampler = timestep_distribution.LossSecondMomentTimesteps(10, history_per_term=3)
    _warm_up(sampler, np.arange(1.0, 11.0))
    return sampler


def test_importance_weights_are_exactly_one_over_t_p():
    sampler = _warmed_up_sampler()
    probs = sampler.probabilities().numpy()
    t, weights = sampler.sample(5000, tf.constant([7, 11], tf.int64))
    np.testing.assert_array_equal(
        weights.numpy(), (1.0 / (10 * probs[t.numpy()])).astype(np.float32)
    )
    # The expectation of w(t) L[t] under p, summed exactly, is the uniform mean of L.
    loss_table = np.random.default_rng(3).gamma(1.5, 2.0, size=10)
    exact = np.sum(probs * (1.0 / (10 * probs)) * loss_table)
    np.testing.assert_allclose(exact, loss_table.mean(), rtol=1e-14)


def test_importance_weighted_estimator_is_unbiased():
    sampler = _warmed_up_sampler()
    probs = sampler.probabilities().numpy()
    num_samples = 200_000
    # A loss table unrelated to the sampling weights, so w * L varies from draw to draw.
    loss_table = np.random.default_rng(4).gamma(1.5, 2.0, size=10)
    t, weights = sampler.sample(num_samples, tf.constant([123, 456]))
    t, weights = t.numpy(), weights.numpy().astype(np.float64)
    estimates = weights * loss_table[t]
    # Standard error of the mean from the exact variance of w(t) L[t] under p.
    second_moment = np.sum(probs * (loss_table / (10 * probs)) ** 2)
    std_error = np.sqrt((second_moment - loss_table.mean() ** 2) / num_samples)
    assert std_error > 1e-3  # the test is not trivially satisfied
    # Tolerance: 5 standard errors (~0.02 here, ~0.5% of the mean); fixed seed, so deterministic.
    assert abs(estimates.mean() - loss_table.mean()) < 5 * std_error
    # The draws follow p: every frequency within 5 binomial standard deviations.
    frequencies = np.bincount(t, minlength=10) / num_samples
    np.testing.assert_array_less(
        np.abs(frequencies - probs), 5 * np.sqrt(probs * (1 - probs) / num_samples)
    )


def test_same_seed_same_timesteps_and_different_seed_different_timesteps():
    sampler = _warmed_up_sampler()
    t1, w1 = sampler.sample(256, tf.constant([1, 2]))
    t2, w2 = sampler.sample(256, tf.constant([1, 2], tf.int64))
    t3, _ = sampler.sample(256, tf.constant([1, 3]))
    np.testing.assert_array_equal(t1.numpy(), t2.numpy())
    np.testing.assert_array_equal(w1.numpy(), w2.numpy())
    assert np.mean(t1.numpy() != t3.numpy()) > 0.5
    t4, w4 = tf.function(sampler.sample)(tf.constant(256), tf.constant([1, 2]))
    np.testing.assert_array_equal(t1.numpy(), t4.numpy())
    np.testing.assert_array_equal(w1.numpy(), w4.numpy())


def test_checkpoint_round_trip_restores_history_exactly(tmp_path):
    rng = np.random.default_rng(5)
    sampler = timestep_distribution.LossSecondMomentTimesteps(6, history_per_term=5)
    ts, losses = _random_stream(rng, 6, 40)
    sampler.update_with_all_losses(ts, losses)
    path = tf.train.Checkpoint(sampler=sampler).save(str(tmp_path / "ckpt"))

    restored = timestep_distribution.LossSecondMomentTimesteps(6, history_per_term=5)
    tf.train.Checkpoint(sampler=restored).restore(path).assert_consumed()
    np.testing.assert_array_equal(restored.loss_history.numpy(), sampler.loss_history.numpy())
    np.testing.assert_array_equal(restored.loss_counts.numpy(), sampler.loss_counts.numpy())
    np.testing.assert_array_equal(restored.weights().numpy(), sampler.weights().numpy())
    # The restored sampler continues the same stream identically.
    more_ts, more_losses = _random_stream(rng, 6, 25)
    sampler.update_with_all_losses(more_ts, more_losses)
    restored.update_with_all_losses(more_ts, more_losses)
    np.testing.assert_array_equal(restored.loss_history.numpy(), sampler.loss_history.numpy())


def test_variables_are_non_trainable_and_only_first_replica():
    sampler = timestep_distribution.LossSecondMomentTimesteps(4)
    assert sampler.trainable_variables == ()
    assert {v.dtype for v in sampler.variables} == {tf.float64, tf.int64}
    for variable in (sampler.loss_history, sampler.loss_counts):
        assert variable.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA


@pytest.mark.parametrize(
    "name,cls",
    [
        ("uniform", timestep_distribution.UniformTimesteps),
        ("loss-second-moment", timestep_distribution.LossSecondMomentTimesteps),
    ],
)
def test_create_timestep_distribution(name, cls):
    sampler = timestep_distribution.create_timestep_distribution(name, 12)
    assert type(sampler) is cls and sampler.num_timesteps == 12
    if cls is timestep_distribution.LossSecondMomentTimesteps:
        assert sampler.history_per_term == 10 and sampler.uniform_prob == 0.001


@pytest.mark.parametrize("name", ["Uniform", "loss_second_moment", "", "importance"])
def test_unknown_sampler_name_raises(name):
    with pytest.raises(
        ValueError,
        match=r"unknown schedule sampler .*allowed: 'uniform', "
        r"'loss-second-moment'",
    ) as error:
        timestep_distribution.create_timestep_distribution(name, 10)
    assert repr(name) in str(error.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_timesteps=0), "num_timesteps must be a positive int, got 0"),
        (dict(num_timesteps=2.5), "num_timesteps must be a positive int, got 2.5"),
        (dict(num_timesteps=4, history_per_term=0), "history_per_term must be a positive int"),
        (
            dict(num_timesteps=4, uniform_prob=1.5),
            r"uniform_prob must be a float in \[0, 1\], got 1.5",
        ),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timestep_distribution.LossSecondMomentTimesteps(**kwargs)


def test_bad_sample_and_update_arguments_raise():
    sampler = timestep_distribution.LossSecondMomentTimesteps(4, history_per_term=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        sampler.sample(0, tf.constant([0, 0]))
    with pytest.raises(ValueError, match=r"seed must be an int32/int64 tensor of shape \[2\]"):
        sampler.sample(4, tf.constant([0.0, 1.0]))
    with pytest.raises(ValueError, match="ts and losses must have the same length, got 2 and 3"):
        sampler.update_with_all_losses([0, 1], [1.0, 2.0, 3.0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="timesteps must be < 4"):
        sampler.update_with_all_losses([1, 4], [1.0, 2.0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="timesteps must be >= 0"):
        sampler.update_with_all_losses([-1], [1.0])
    # A rejected update leaves the state untouched.
    np.testing.assert_array_equal(sampler.loss_counts.numpy(), np.zeros(4))


# Runs in a fresh interpreter: logical devices must be configured before TF initialises, which
# has already happened in this process (and in other test modules sharing a pytest worker).
_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tf_iddpm import timestep_distribution

    num_timesteps, history_len, per_replica, num_steps = 5, 10, 4, 20
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        sampler = timestep_distribution.LossSecondMomentTimesteps(num_timesteps)
    rng = np.random.default_rng(int(sys.argv[1]))
    stream_ts = rng.integers(0, num_timesteps, size=[num_steps, 2, per_replica])
    stream_losses = rng.gamma(2.0, 1.0, size=[num_steps, 2, per_replica]).astype(np.float32)

    @tf.function
    def step(ts, losses, seed):
        def replica_fn(ts, losses):
            context = tf.distribute.get_replica_context()
            gathered_ts = context.all_gather(ts, axis=0)
            gathered_losses = context.all_gather(losses, axis=0)
            sampler.update_with_all_losses(gathered_ts, gathered_losses)
            replica_seed = tf.random.experimental.stateless_fold_in(
                seed, context.replica_id_in_sync_group)
            return sampler.sample(per_replica, replica_seed)
        return strategy.run(replica_fn, args=(ts, losses))

    sampled = []
    for i in range(num_steps):
        ts = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(stream_ts[i, ctx.replica_id_in_sync_group], tf.int32))
        losses = strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(stream_losses[i, ctx.replica_id_in_sync_group]))
        t, w = step(ts, losses, tf.constant([i, 17], tf.int64))
        sampled.append([[x.numpy().tolist() for x in strategy.experimental_local_results(v)]
                        for v in (t, w)])
    # Under default seeding the replicas' gathered order is replica 0 then replica 1.
    print(json.dumps({
        "stream_ts": stream_ts.tolist(),
        "stream_losses": stream_losses.astype(np.float64).tolist(),
        "histories": [v.numpy().tolist() for v in sampler.loss_history.values],
        "counts": [v.numpy().tolist() for v in sampler.loss_counts.values],
        "devices": [v.device for v in sampler.loss_history.values],
        "last_sample": sampled[-1],
        "final_probs": sampler.probabilities().numpy().tolist(),
        "num_replicas": strategy.num_replicas_in_sync,
    }))
""")


@pytest.mark.slow
def test_update_under_mirrored_strategy_keeps_replicas_identical():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["num_replicas"] == 2
    assert out["devices"][0] != out["devices"][1]

    reference = NumpyLossHistory(5, 10, 0.001)
    for step_ts, step_losses in zip(out["stream_ts"], out["stream_losses"]):
        # all_gather concatenates replica 0's entries, then replica 1's.
        reference.update(np.concatenate(step_ts), np.concatenate(step_losses))
    assert np.all(reference.counts == 10)  # warmed up, and rows have wrapped
    for history, counts in zip(out["histories"], out["counts"]):
        np.testing.assert_array_equal(np.array(history), reference.history)
        np.testing.assert_array_equal(np.array(counts), reference.counts)

    probs = reference.weights() / reference.weights().sum()
    np.testing.assert_allclose(out["final_probs"], probs, rtol=1e-14)
    (t_replica0, t_replica1), (w_replica0, w_replica1) = out["last_sample"]
    # Replicas fold their id into the seed, so they draw different timesteps ...
    assert t_replica0 != t_replica1
    # ... and each weight is 1 / (T p(t)) from the shared, identical table.
    for t, w in zip(t_replica0 + t_replica1, w_replica0 + w_replica1):
        np.testing.assert_allclose(w, 1.0 / (5 * probs[t]), rtol=1e-6)
