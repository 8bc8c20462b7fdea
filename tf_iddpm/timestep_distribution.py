"""The distribution of training timesteps p(t) and its importance weights (paper Section 3.3).

(Not a sampler of images: those are :mod:`tf_iddpm.samplers`.  The config field keeps the
reference's name, ``train.schedule_sampler``, and so does the checkpoint's ``schedule_sampler``.)

The training loss is an expectation over t ~ U{0..T-1}.  A distribution draws t from p(t) instead
and returns the importance weight 1 / (T p(t)) with every draw, so that
E_{t~p}[w(t) L_t] = (1/T) sum_t L_t: the objective is unchanged and only its variance depends on p.

* :class:`UniformTimesteps`: p(t) = 1/T, every weight is 1.
* :class:`LossSecondMomentTimesteps`: p(t) ∝ sqrt(E[L_t^2]) over the last `history_per_term` losses
  seen for each t (Eq. 18), mixed with a little uniform mass; uniform until every t has a full
  history.  The paper uses it to reduce the gradient noise of L_vlb.

Both are ``tf.Module``\\ s.  The loss-aware state lives in ``tf.Variable``\\ s, so it is saved by
``tf.train.Checkpoint(schedule_sampler=distribution)``; create it inside ``strategy.scope()`` when
training under a ``tf.distribute`` strategy.  Sampling is stateless (the caller passes a seed into
which it has folded the step and the replica id), so it works in ``tf.function`` and in
``strategy.run``.

Distributed updates: every replica calls :meth:`LossSecondMomentTimesteps.update_with_all_losses`
with the same losses gathered from *all* replicas (``get_replica_context().all_gather``, or
:meth:`~LossSecondMomentTimesteps.update_with_local_losses`, which does the gather).  Each replica
then computes the identical new table in-graph, processing the entries in gathered order exactly as
the reference's Python loop does, and assigns it to variables with ``ONLY_FIRST_REPLICA``
aggregation, so the copies never drift apart.
"""

import numbers
from typing import Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from tf_iddpm import choices
from tf_iddpm import config_utils

TensorLike = Union[tf.Tensor, np.ndarray, list, int]


class TimestepDistribution(tf.Module):
    """A distribution over the timesteps 0..T-1 with unbiased importance weights.

    Subclasses implement :meth:`weights`; everything else is shared.
    """

    def __init__(self, num_timesteps: int, name: Optional[str] = None):
        """Initialises the sampler.

        Args:
          num_timesteps: T, the number of diffusion steps of the *training* diffusion.
          name: the module name (variable name scope).
        """
        super().__init__(name=name)
        self._num_timesteps = config_utils.check_positive_int("num_timesteps", num_timesteps)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def weights(self) -> tf.Tensor:
        """Unnormalised, strictly positive sampling weights.

        Returns:
          float64 tensor [T].
        """
        raise NotImplementedError

    def probabilities(self) -> tf.Tensor:
        """The sampling distribution p(t) = weights / sum(weights).

        Returns:
          float64 tensor [T] that sums to 1.
        """
        weights = self.weights()
        return weights / tf.reduce_sum(weights)

    def sample(
        self, batch_size: Union[int, tf.Tensor], seed: TensorLike
    ) -> Tuple[tf.Tensor, tf.Tensor]:
        """Importance-samples one timestep per example.

        Deterministic in `seed` and the current state: the same seed gives the same timesteps.

        Args:
          batch_size: B, the number of timesteps to draw (python int or int scalar tensor).
          seed: int32/int64 tensor [2], the stateless RNG seed.  Under a distribution strategy fold
            the replica id into it (``tf.random.experimental.stateless_fold_in``) so that replicas
            draw different timesteps.

        Returns:
          (t, weights): int32 tensor [B] of timesteps in [0, T) and float32 tensor [B] of importance
          weights 1 / (T p(t)), by which the per-example losses are multiplied.
        """
        if isinstance(batch_size, bool) or (
            isinstance(batch_size, numbers.Integral) and batch_size <= 0
        ):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        seed = tf.convert_to_tensor(seed)
        if (
            seed.dtype not in (tf.int32, tf.int64)
            or seed.shape.rank not in (None, 1)
            or (seed.shape.rank == 1 and seed.shape[0] not in (None, 2))
        ):
            raise ValueError(
                f"seed must be an int32/int64 tensor of shape [2], got {seed.dtype.name} "
                f"{seed.shape}"
            )
        probs = self.probabilities()
        # Categorical sampling from log-probabilities; every p(t) > 0, so the logits are finite.
        t = tf.random.stateless_categorical(
            tf.math.log(probs)[tf.newaxis], batch_size, seed=seed, dtype=tf.int32
        )[0]
        importance = 1.0 / (tf.cast(self._num_timesteps, tf.float64) * tf.gather(probs, t))
        return t, tf.cast(importance, tf.float32)

    def update_with_all_losses(self, ts: TensorLike, losses: TensorLike) -> None:
        """Updates the sampler with per-example losses gathered from every replica (no-op here).

        Args:
          ts: int tensor [M] of timesteps.
          losses: float tensor [M] of the per-example losses at those timesteps.
        """
        del ts, losses

    def update_with_local_losses(self, local_ts: TensorLike, local_losses: TensorLike) -> None:
        """Gathers this replica's (t, loss) from all replicas, then calls update_with_all_losses.

        Call it in replica context (inside ``strategy.run`` or a Keras ``train_step``; plain eager
        code is in the default strategy's replica context).  Every replica must call it.

        Args:
          local_ts: int tensor [B_local] of this replica's timesteps.
          local_losses: float tensor [B_local] of this replica's per-example losses.
        """
        context = tf.distribute.get_replica_context()
        if context is None:
            raise RuntimeError(
                "update_with_local_losses must be called in replica context (inside "
                "strategy.run); in cross-replica context gather the losses with strategy.gather "
                "and call update_with_all_losses"
            )
        local_ts = tf.convert_to_tensor(local_ts)
        local_losses = tf.convert_to_tensor(local_losses)
        all_ts = context.all_gather(local_ts, axis=0)
        all_losses = context.all_gather(local_losses, axis=0)
        self.update_with_all_losses(all_ts, all_losses)

    def warmed_up(self) -> tf.Tensor:
        """Whether the non-uniform weights are in use (always true for stateless samplers).

        Returns:
          bool scalar tensor.
        """
        return tf.constant(True)


class UniformTimesteps(TimestepDistribution):
    """p(t) = 1/T: the plain DDPM objective, every importance weight is exactly 1."""

    def __init__(self, num_timesteps: int, name: Optional[str] = "uniform_sampler"):
        super().__init__(num_timesteps, name=name)

    def weights(self) -> tf.Tensor:
        return tf.ones([self.num_timesteps], dtype=tf.float64)


class LossSecondMomentTimesteps(TimestepDistribution):
    """p(t) ∝ sqrt(E[L_t^2]) over a ring buffer of recent losses per t (Section 3.3, Eq. 18).

    State, in non-trainable ``tf.Variable``\\ s with ``ONLY_FIRST_REPLICA`` aggregation:

    * ``loss_history``: float64 [T, history_per_term], the most recent losses of each t, oldest
      first; only the first ``loss_counts[t]`` entries of a row are filled.
    * ``loss_counts``: int64 [T], how many entries of each row are filled (at most
      history_per_term).
    """

    def __init__(
        self,
        num_timesteps: int,
        history_per_term: int = 10,
        uniform_prob: float = 0.001,
        name: Optional[str] = "loss_second_moment_resampler",
    ):
        """Initialises an empty history (so the sampler starts uniform).

        Args:
          num_timesteps: T.
          history_per_term: how many recent losses are kept per timestep (10 in the paper).
          uniform_prob: the mass mixed in uniformly once warmed up, so every t keeps being visited
            and its history stays current.
          name: the module name.
        """
        super().__init__(num_timesteps, name=name)
        self.history_per_term = config_utils.check_positive_int(
            "history_per_term", history_per_term
        )
        if isinstance(uniform_prob, bool) or not 0.0 <= float(uniform_prob) <= 1.0:
            raise ValueError(f"uniform_prob must be a float in [0, 1], got {uniform_prob!r}")
        self.uniform_prob = float(uniform_prob)
        with self.name_scope:
            self.loss_history = tf.Variable(
                tf.zeros([self.num_timesteps, self.history_per_term], tf.float64),
                trainable=False,
                name="loss_history",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self.loss_counts = tf.Variable(
                tf.zeros([self.num_timesteps], tf.int64),
                trainable=False,
                name="loss_counts",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )

    def warmed_up(self) -> tf.Tensor:
        """True once every timestep has a full history of `history_per_term` losses.

        Returns:
          bool scalar tensor.
        """
        return tf.reduce_all(tf.equal(self.loss_counts, self.history_per_term))

    def weights(self) -> tf.Tensor:
        """Ones before warm-up; after it, sqrt(E[L^2]) normalised and mixed with uniform_prob.

        Returns:
          float64 tensor [T].
        """
        num_timesteps = self.num_timesteps

        def second_moment_weights():
            weights = tf.sqrt(tf.reduce_mean(tf.square(self.loss_history), axis=-1))
            # All-zero losses would make 0/0; divide_no_nan leaves only the uniform part, which
            # still normalises to the uniform distribution.
            weights = tf.math.divide_no_nan(weights, tf.reduce_sum(weights))
            return weights * (1.0 - self.uniform_prob) + self.uniform_prob / num_timesteps

        return tf.cond(
            self.warmed_up(), second_moment_weights, lambda: tf.ones([num_timesteps], tf.float64)
        )

    def update_with_all_losses(self, ts: TensorLike, losses: TensorLike) -> None:
        """Appends each (t, loss) to t's history, in order, dropping the oldest when full.

        Entries are applied one after another, exactly as the reference's loop: while a row has
        fewer than `history_per_term` losses the new one is written at position count[t] and the
        count grows; once full, the row shifts left by one and the loss goes in the last slot.
        The whole update runs in-graph and is deterministic, so replicas that receive the same
        gathered (ts, losses) compute the same table.

        Args:
          ts: int tensor [M] of timesteps in [0, T) — from all replicas, in gathered order.
          losses: float tensor [M] of the losses at those timesteps (kept in float64).
        """
        ts = tf.cast(tf.reshape(tf.convert_to_tensor(ts), [-1]), tf.int64)
        losses = tf.cast(tf.reshape(tf.convert_to_tensor(losses), [-1]), tf.float64)
        if (
            ts.shape[0] is not None
            and losses.shape[0] is not None
            and ts.shape[0] != losses.shape[0]
        ):
            raise ValueError(
                f"ts and losses must have the same length, got {ts.shape[0]} and {losses.shape[0]}"
            )
        checks = [
            tf.debugging.assert_equal(
                tf.size(ts), tf.size(losses), message="ts and losses must have the same length"
            ),
            tf.debugging.assert_non_negative(ts, message="timesteps must be >= 0"),
            tf.debugging.assert_less(
                ts,
                tf.constant(self.num_timesteps, tf.int64),
                message=f"timesteps must be < {self.num_timesteps}",
            ),
        ]
        history_len = self.history_per_term
        with tf.control_dependencies(checks):
            num_entries = tf.size(ts)

        def body(i, history, counts):
            t = ts[i]
            loss = losses[i]
            count = counts[t]
            row = history[t]
            is_full = count >= history_len
            shifted_row = tf.concat([row[1:], loss[tf.newaxis]], axis=0)
            write_at = tf.minimum(count, history_len - 1)  # only used when not full
            appended_row = tf.tensor_scatter_nd_update(
                row, write_at[tf.newaxis, tf.newaxis], loss[tf.newaxis]
            )
            new_row = tf.where(is_full, shifted_row, appended_row)
            history = tf.tensor_scatter_nd_update(
                history, t[tf.newaxis, tf.newaxis], new_row[tf.newaxis]
            )
            counts = tf.tensor_scatter_nd_add(
                counts,
                t[tf.newaxis, tf.newaxis],
                tf.where(is_full, tf.constant(0, tf.int64), tf.constant(1, tf.int64))[tf.newaxis],
            )
            return i + 1, history, counts

        _, new_history, new_counts = tf.while_loop(
            lambda i, *_: i < num_entries,
            body,
            (
                tf.constant(0, tf.int32),
                tf.identity(self.loss_history.read_value()),
                tf.identity(self.loss_counts.read_value()),
            ),
        )
        # Inside tf.function, automatic control dependencies run both assignments.
        self.loss_history.assign(new_history)
        self.loss_counts.assign(new_counts)


def create_timestep_distribution(name: str, num_timesteps: int) -> TimestepDistribution:
    """Builds a sampler by name (the reference's factory; ``config.train.schedule_sampler``).

    Args:
      name: one of choices.SCHEDULE_SAMPLERS: "uniform" or "loss-second-moment".
      num_timesteps: T.

    Returns:
      A new sampler (create it inside ``strategy.scope()`` when distributing).
    """
    if name == "uniform":
        return UniformTimesteps(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentTimesteps(num_timesteps)
    allowed = ", ".join(repr(n) for n in choices.SCHEDULE_SAMPLERS)
    raise ValueError(f"unknown schedule sampler {name!r}; allowed: {allowed}")
