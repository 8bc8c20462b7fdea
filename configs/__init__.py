"""Experiment configurations (ml_collections ConfigDicts), one file per experiment.

Pass a file to ``run.py --config=configs/<name>.py``; every field can then be overridden with
``--config.<group>.<field>=value``.  ``base.py`` holds the schema and defaults; every other file
starts from ``base.get_config()`` (or from another experiment) and overrides only what differs:

==========================  ===================================================================
``digits.py``               the embedded default: sklearn's handwritten digits, small and CPU-fast
``digits_cond.py``          ``digits.py`` class-conditional, with label dropout for guidance
``tiny.py``                 8x8 digits, a minimal UNet and T=100: for tests
``ablation.py``             the ablation study's base model (``python -m ablation``)
``cifar10_hybrid.py``       CIFAR-10, L_hybrid, cosine schedule (paper Table 2)
``cifar10_vlb.py``          CIFAR-10, L_vlb with the loss-second-moment timestep sampler
``imagenet64_hybrid.py``    unconditional ImageNet 64x64, L_hybrid
``imagenet64_vlb.py``       unconditional ImageNet 64x64, L_vlb
``imagenet64_cond.py``      class-conditional ImageNet 64x64, 270M parameters
``lsun_bedroom.py``         LSUN bedroom 256x256, linear schedule, T=1000
``upsample_64_256.py``      the class-conditional 64->256 super-resolution model
``from_workdir.py``         ``--config=configs/from_workdir.py:<workdir>``: the config stored in
                            a workdir, so that ``--config.x=...`` overrides work on it
==========================  ===================================================================

Loading: experiment files import each other as this package (``from configs import base``), with
no path code of their own.  ``run.py`` lives next to ``configs/``, and Python puts a script's
directory first on ``sys.path``, so ``python /path/to/checkout/run.py --config=...`` resolves
``configs`` to the checkout's package from any working directory (before an installed package of
that name; the wheel installs none).  ``python -m export`` / ``python -m tf_iddpm.<module>`` run
from the checkout root, pytest and Bazel put the root on the path.
"""
