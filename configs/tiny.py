"""A minimal configuration for tests: 8x8 digits, a one-block UNet and a 100-step process.

Derived from ``digits.py``; every size is cut down so that a training step, a sampling loop and a
bpd evaluation each take well under a second on a CPU.  Not meant to produce good samples.
"""

from configs import digits


def get_config():
    config = digits.get_config()

    config.data.image_size = 8  # the digits' native size
    config.data.shuffle_buffer = 256
    config.data.num_channels = 3  # the golden fixtures (tests/golden.py) are 8x8x3

    config.model.num_res_blocks = 1
    config.model.attention_resolutions = "4"
    config.model.dropout = 0.0

    config.diffusion.steps = 100

    config.train.batch_size = 16
    config.train.num_steps = 20
    config.train.log_every = 5
    config.train.checkpoint_every = 10
    config.train.keep_checkpoints = 2
    config.train.sample_every = 0

    config.eval.batch_size = 8
    config.eval.num_samples = 16

    config.sample.num_samples = 4
    config.sample.batch_size = 4
    config.sample.timestep_respacing = "10"

    config.export.model_name = "tiny"
    config.export.max_batch_size = 4
    return config
