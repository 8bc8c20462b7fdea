"""The ablation study's base model: ``python -m ablation`` (the checkout's ``ablation/``).

Derived from ``tiny.py`` (the embedded digits at 8x8, one res block per level, 32 channels,
attention at 4x4) with the paper's T=1000 diffusion steps, a global batch of 64 and one sampling
batch per quality point.  The study sets each arm's loss, noise schedule, timestep sampler, seed
and step budget on top (``ablation/arms.py``); everything else comes from here.

    python -m ablation --study_dir=workdir/study                                 # this config
    python -m ablation --study_dir=workdir/study --config.train.lr=1e-4          # one field changed
    python -m ablation --study_dir=workdir/quick --quick                         # the "quick" variant

The ``quick`` variant (``--config=configs/ablation.py:quick``, what ``--quick`` uses) is
``tiny.py`` as it is (T=100) with the quick study's 64 samples per quality point in one batch.
"""

from configs import tiny

VARIANTS = ("", "quick")


def get_config(variant=""):
    if variant not in VARIANTS:
        raise ValueError(
            f"configs/ablation.py has no variant {variant!r}; its variants are: "
            "configs/ablation.py (the default study) and configs/ablation.py:quick"
        )
    config = tiny.get_config()
    if variant == "quick":
        config.sample.batch_size = 64  # the quick study's 64 samples per point: one batch
        return config

    config.diffusion.steps = 1000

    config.train.batch_size = 64
    config.train.log_every = 25
    config.train.checkpoint_every = 200

    config.eval.batch_size = 64

    config.sample.batch_size = 256  # one batch per quality point: an 8x8 chain is cheap per image

    config.export.model_name = "study"
    return config
