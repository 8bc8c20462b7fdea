"""The names that string-valued config fields accept: one table, read by the code that implements
each option and by the config checks (:mod:`tf_iddpm.config_utils`, which must not import
TensorFlow, so the implementing modules cannot be asked directly).

Options whose implementing module is itself TensorFlow-free are listed there instead:
``schedules.NOISE_SCHEDULES`` (``diffusion.noise_schedule``) and ``samplers.SAMPLER_KINDS``
(``sample.sampler``).
"""

# diffusion.cdf: the normal CDF of the discretised decoder (tf_iddpm.losses).
CDF_MODES = ("exact", "approx")

# train.schedule_sampler: the distribution of training timesteps (tf_iddpm.timestep_distribution).
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")

# train.mixed_precision: the Keras dtype policy of training (tf_iddpm.train_lib).
MIXED_PRECISION_POLICIES = ("float32", "mixed_bfloat16")
