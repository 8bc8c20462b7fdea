"""The embedded default: sklearn's handwritten digits, small enough to train on a laptop CPU.

Not a paper experiment.  It keeps the paper's recipe (L_hybrid = rescaled MSE + L_vlb with a
learned Sigma, cosine schedule, T=1000, Adam, EMA) and shrinks everything that costs time: 16x16
images (the 8x8 digits upscaled, one grayscale channel), a two-level UNet with 32 base channels and
attention only at 8x8.  The EMA rate is 0.99 rather than 0.9999 because a run lasts a thousand steps, not
hundreds of thousands: an EMA of rate r averages over roughly 1/(1-r) steps and starts from the
initial weights, so with 0.999 a third of the initial (untrained) network would still be in it.

    python run.py --config=configs/digits.py --workdir=workdir/digits --mode=train
"""

from configs import base


def get_config():
    config = base.get_config()

    config.data.image_size = 16
    config.data.num_channels = 1  # the digits are grayscale
    config.data.shuffle_buffer = 2_000  # the whole training split fits

    config.model.num_channels = 32
    config.model.channel_mult = "1,2"  # 16x16 and 8x8
    config.model.attention_resolutions = "8"
    config.model.dropout = 0.1

    config.train.batch_size = 64
    config.train.lr = 5e-4  # a 2M-parameter model tolerates more than the paper's 1e-4
    config.train.ema_rate = "0.99"
    config.train.num_steps = 1_000  # ~5 minutes on 2 CPU cores
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.sample_every = 500

    config.eval.batch_size = 128
    config.eval.num_samples = 128  # bpd over the full T=1000 chain: ~3 minutes on 2 CPU cores

    config.export.model_name = "digits"
    return config
