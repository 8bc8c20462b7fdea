"""Adam(W) with the reference's arithmetic, one fused kernel per variable.

improved-diffusion trains with ``torch.optim.AdamW``, which adds its epsilon (1e-8) to the
*bias-corrected* root second moment::

    m += (g - m) * (1 - beta_1);   v += (g^2 - v) * (1 - beta_2)
    var -= lr * weight_decay * var                                  (decoupled, before the update)
    var -= lr / (1 - beta_1^t) * m / (sqrt(v / (1 - beta_2^t)) + epsilon)

Keras' Adam and TF's ``ResourceApplyAdam`` add theirs (default 1e-7) to the *uncorrected*
``sqrt(v)``.  The two agree only when the kernel's epsilon is ``epsilon * sqrt(1 - beta_2^t)`` at
step t, so :class:`FusedAdam` passes exactly that per-step value to ``ResourceApplyAdam``.  The
difference matters early in training: for a layer that starts at zero (the reference zeroes its
output convolutions) ``sqrt(v)`` is tiny and the epsilon placement changes the size of the first
updates by tens of percent (see ``tests/train_trajectory_test.py``).

Keras 3's Adam also builds ~45 graph nodes per variable (the bias-correction scalars recomputed for
each one, then separate multiply / add / sqrt / divide / assign ops); ``FusedAdam`` computes the
step's scalars once and updates each variable with one ``ResourceApplyAdam``.  The kernel forms
``1 - beta`` in float32 where Keras rounds it from float64: the second moment differs from Keras'
by 1.3e-5 relative, the weights by 1-2 ulp.

It *is* a ``keras.optimizers.Adam`` (same slots, names and checkpoint layout; decoupled weight
decay when ``weight_decay > 0``), so checkpoints move freely between the two.  Where a slot cannot
be resolved to a plain per-device variable (a strategy whose variables are not mirrored
components, e.g. TPU), the same arithmetic runs op by op.
"""

import keras
from keras import ops
import tensorflow as tf

# torch.optim.AdamW's default, the reference's value.
TORCH_EPSILON = 1e-8


class FusedAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` (optional decoupled weight decay) updated by ResourceApplyAdam.

    Args:
      corrected_epsilon: True (the reference's ``torch.optim.AdamW``): epsilon is added to the
        bias-corrected ``sqrt(v_hat)``.  False: Keras' placement, added to the uncorrected
        ``sqrt(v)``.
      **kwargs: ``keras.optimizers.Adam``'s arguments (``amsgrad`` only with Keras' placement).
    """

    def __init__(self, *args, corrected_epsilon: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if corrected_epsilon and self.amsgrad:
            raise ValueError(
                "FusedAdam: amsgrad=True is only supported with corrected_epsilon=False "
                "(Keras' epsilon placement)"
            )
        self.corrected_epsilon = bool(corrected_epsilon)

    def get_config(self):
        return {**super().get_config(), "corrected_epsilon": self.corrected_epsilon}

    def _step_epsilon(self, beta2_power):
        """The epsilon to add to the uncorrected sqrt(v) at this step (see the module docstring)."""
        epsilon = tf.constant(self.epsilon, tf.float32)
        return epsilon * tf.sqrt(1.0 - beta2_power) if self.corrected_epsilon else epsilon

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # One set of bias-correction scalars per step, shared by every variable's update.
        local_step = tf.cast(self.iterations + 1, tf.float32)
        beta1, beta2 = tf.constant(self.beta_1, tf.float32), tf.constant(self.beta_2, tf.float32)
        beta2_power = tf.pow(beta2, local_step)
        self._step_scalars = {
            "lr": tf.cast(learning_rate, tf.float32),
            "beta1": beta1,
            "beta2": beta2,
            "epsilon": self._step_epsilon(beta2_power),
            "beta1_power": tf.pow(beta1, local_step),
            "beta2_power": beta2_power,
        }
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._step_scalars = None

    def update_step(self, gradient, variable, learning_rate):
        scalars = getattr(self, "_step_scalars", None)
        index = self._get_variable_index(variable)
        m = _component_like(self._momentums[index], variable)
        v = _component_like(self._velocities[index], variable)
        if (
            scalars is None
            or self.amsgrad
            or m is None
            or v is None
            or variable.dtype != tf.float32
            or isinstance(gradient, tf.IndexedSlices)
        ):
            return self._unfused_update_step(gradient, variable, learning_rate)
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=m.handle,
            v=v.handle,
            beta1_power=scalars["beta1_power"],
            beta2_power=scalars["beta2_power"],
            lr=scalars["lr"],
            beta1=scalars["beta1"],
            beta2=scalars["beta2"],
            epsilon=scalars["epsilon"],
            grad=tf.cast(gradient, tf.float32),
            use_locking=False,
        )

    def _unfused_update_step(self, gradient, variable, learning_rate):
        """The same update op by op (Keras' own update when corrected_epsilon is False)."""
        if not self.corrected_epsilon:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, dtype), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, dtype), local_step)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
        step_size = ops.cast(learning_rate, dtype) / (1 - beta_1_power)
        denominator = ops.add(ops.sqrt(ops.divide(v, 1 - beta_2_power)), self.epsilon)
        self.assign_sub(variable, ops.divide(ops.multiply(m, step_size), denominator))


def _component_like(slot, variable):
    """The plain tf.Variable of `slot` that lives with `variable` (a slot's per-device copy).

    Under Mirrored / MultiWorkerMirrored strategies the optimizer updates each device's component
    of a mirrored variable in turn; the slot must be that device's component too.  Returns None
    when no such plain component exists (the caller then uses the generic update).
    """
    if isinstance(variable, tf.distribute.DistributedValues):
        return None
    slot = slot.value if isinstance(slot, keras.Variable) else slot
    if not isinstance(slot, tf.distribute.DistributedValues):
        return slot
    matches = [
        component
        for component in tf.distribute.get_strategy().experimental_local_results(slot)
        if component.device == variable.device
    ]
    if len(matches) != 1 or isinstance(matches[0], tf.distribute.DistributedValues):
        return None
    return matches[0]


def create_adam(learning_rate: float, weight_decay: float = 0.0) -> FusedAdam:
    """The reference's optimizer: ``torch.optim.AdamW(lr, weight_decay)`` arithmetic.

    betas (0.9, 0.999), epsilon 1e-8 on the bias-corrected root second moment, decoupled weight
    decay ``var -= lr * weight_decay * var`` before each update (none when weight_decay is 0).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return FusedAdam(
        learning_rate=learning_rate,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=TORCH_EPSILON,
        corrected_epsilon=True,
        weight_decay=weight_decay if weight_decay > 0 else None,
        name="adamw" if weight_decay > 0 else "adam",
    )
