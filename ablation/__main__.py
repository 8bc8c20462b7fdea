"""The paper's ablations (Tables 1-2, Figure 8) at a scale two CPU cores afford, in one command.

Run from the checkout's root (``ablation/`` is not installed with the package; it reads
``configs/``):

    python -m ablation --study_dir=workdir/study                          # the default study
    python -m ablation --study_dir=workdir/study --steps=4000 --seeds=3   # longer
    python -m ablation --study_dir=workdir/quick --quick                  # the test suite's variant
    python -m ablation --study_dir=S --config.train.lr=1e-4               # a field of the model
    python -m ablation --study_dir=S --config=configs/digits.py --arms=hybrid_cosine,simple_cosine
    python -m ablation --study_dir=workdir/study --samplers=ancestral,ddim,dpmpp_2m,unipc

The base model is ``configs/ablation.py`` (``--quick``: ``configs/ablation.py:quick``); the arms,
the evaluation and what is cached are described in ``ablation/study.py``.  The study directory
gets ``results.json``, ``results.md`` and ``figures/*.png``; a killed study resumes where it
stopped.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ablation import arms as arms_lib
from configs import ablation as ablation_configs
from tf_iddpm import samplers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "ablation.py")

DEFAULTS = {  # the default study (about 30-40 minutes on 2 CPU cores)
    "arms": "all",
    "seeds": 2,
    "steps": 400,
    "bpd_examples": 32,
    "bpd_respacing": "100",
    "sampling_steps": "10,25,50,100",
    "samplers": ",".join(arms_lib.DEFAULT_SAMPLERS),
    "quality_samples": 192,
    "classifier_epochs": 30,
}
QUICK = {  # --quick: the test suite's variant (configs/ablation.py:quick, T=100)
    "arms": ",".join(arms_lib.QUICK_ARMS),
    "seeds": 1,
    "steps": 10,
    "bpd_examples": 8,
    "bpd_respacing": "10",
    "sampling_steps": "5,10",
    "samplers": ",".join(arms_lib.DEFAULT_SAMPLERS),
    "quality_samples": 64,
    "classifier_epochs": 5,
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    DEFAULT_CONFIG,
    "Base config (default: configs/ablation.py, the tiny UNet with T=1000 and batch 64; with "
    "--quick: configs/ablation.py:quick). Any dataset tf_iddpm.data reads works.",
)
flags.DEFINE_string("study_dir", None, "Where the runs, results and figures go.")
flags.DEFINE_bool(
    "quick",
    False,
    "The test suite's variant: configs/ablation.py:quick (T=100), 2 arms, 1 seed, 10 steps, 2 "
    "sampling-step points.",
)
flags.DEFINE_string(
    "arms", None, f"Comma-separated arms or 'all' (default all): {', '.join(arms_lib.ARMS)}."
)
flags.DEFINE_integer("seeds", None, "Seeds per arm (default 2).")
flags.DEFINE_integer("steps", None, "Training steps per run (default 400).")
flags.DEFINE_integer("bpd_examples", None, "Test images for bits/dim (default 32).")
flags.DEFINE_string(
    "bpd_respacing",
    None,
    "Steps of the respaced bpd chain (default 100; '' = full chain only).",
)
flags.DEFINE_string(
    "sampling_steps",
    None,
    "Points of the quality sweep, network calls per image (NFE; default 10,25,50,100; 'full' = "
    "T): strided ancestral and DDIM take that many evenly strided steps, a solver makes that "
    "many calls and skips 'full'.",
)
flags.DEFINE_string(
    "samplers",
    None,
    "Comma-separated sampler kinds of the quality sweep (default "
    f"{','.join(arms_lib.DEFAULT_SAMPLERS)}), e.g. ancestral,ddim,dpmpp_2m,dpmpp_2m_sde,unipc. "
    "Each is measured at every --sampling_steps point; a solver's points are its numbers of "
    "network calls, so it has no 'full' point. Points already measured are not recomputed. "
    f"Kinds: {samplers.describe_kinds()}.",
)
flags.DEFINE_integer("quality_samples", None, "Samples per quality point (default 192).")
flags.DEFINE_string(
    "inception",
    "",
    "classify_image_graph_def.pb: real Inception features instead of the proxy classifier.",
)
flags.DEFINE_integer(
    "classifier_epochs", None, "Epochs of the proxy classifier (default 30; --quick: 5)."
)
flags.mark_flags_as_required(["study_dir"])


def base_config():
    """The --config given, else configs/ablation.py (with --quick: its quick variant).

    Raises:
      app.UsageError: for --quick with --config.* overrides but no --config: they would apply to
        the default study's config, which --quick replaces.
    """
    if FLAGS["config"].present or not FLAGS.quick:
        return FLAGS.config
    overrides = sorted(name for name in FLAGS if name.startswith("config.") and FLAGS[name].present)
    if overrides:
        raise app.UsageError(
            f"--quick with {', '.join('--' + name for name in overrides)}: name the config they "
            "change, --config=configs/ablation.py:quick"
        )
    return ablation_configs.get_config("quick")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    preset = QUICK if FLAGS.quick else DEFAULTS

    def pick(name):
        value = getattr(FLAGS, name)
        return preset[name] if value is None else value

    try:
        arms = arms_lib.parse_arms(pick("arms"))
        sampler_kinds = arms_lib.parse_samplers(pick("samplers"))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    base = base_config()
    # TensorFlow loads here, once the command line is known to be good.
    from ablation import study  # pylint: disable=g-import-not-at-top

    study.run_study(
        base,
        FLAGS.study_dir,
        arms=arms,
        seeds=int(pick("seeds")),
        steps=int(pick("steps")),
        bpd_examples=int(pick("bpd_examples")),
        bpd_respacing=pick("bpd_respacing"),
        sampling_steps=pick("sampling_steps"),
        samplers=sampler_kinds,
        quality_samples=int(pick("quality_samples")),
        inception=FLAGS.inception,
        classifier_epochs=int(pick("classifier_epochs")),
        quick=FLAGS.quick,
        command=" ".join(["python -m ablation"] + sys.argv[1:]),
    )


if __name__ == "__main__":
    app.run(main)
