"""Exports a workdir's checkpoint as TF-Serving SavedModels (sampler and NLL).

    python -m export --workdir=workdir/digits --export_dir=/models [--model_name=digits] \\
        [--version=3] [--nouse_ema] [--checkpoint=workdir/digits/checkpoints/ckpt-2000]

The workdir is a training workdir or a converted reference checkpoint (``python -m
tf_iddpm.convert``); its ``config.json`` describes the model.  ``run.py --mode=export`` does the
same through :func:`export.export_lib.export_from_workdir`.  TensorFlow's own INFO logging is
hidden unless ``-v 1`` (:mod:`tf_iddpm.console`).
"""

import os
import sys

from absl import app
from absl import flags

from tf_iddpm import console
from tf_iddpm import fileio

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_string("workdir", None, "Training workdir or converted checkpoint directory.")
    flags.DEFINE_string("export_dir", None, "TF-Serving base directory (default <workdir>/export).")
    flags.DEFINE_string(
        "model_name",
        None,
        "Model name prefix (default config.export.model_name); "
        "the models are <name>_sampler and <name>_nll.",
    )
    flags.DEFINE_integer(
        "version",
        None,
        "Version number (default: the next free one); an existing version is never overwritten.",
    )
    flags.DEFINE_boolean(
        "use_ema",
        None,
        "Export the EMA weights (default config.export.use_ema); "
        "--nouse_ema exports the raw weights.",
    )
    flags.DEFINE_string("checkpoint", None, "A specific checkpoint prefix (default: the latest).")
    flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    export_dir = FLAGS.export_dir or os.path.join(FLAGS.workdir, "export")
    dir_error = fileio.directory_error(export_dir, what="--export_dir")
    if dir_error:
        print(f"python -m export: error: {dir_error}", file=sys.stderr)
        sys.exit(1)
    # TensorFlow is imported below, after the framework logging is quieted (unless -v 1).
    if console.configure(FLAGS.verbosity, first_party=[os.path.dirname(os.path.abspath(__file__))]):
        console.import_quietly(["tensorflow", "export.export_lib"])
    from export import export_lib  # pylint: disable=g-import-not-at-top
    from tf_iddpm import checkpoints  # pylint: disable=g-import-not-at-top

    try:
        export_lib.export_from_workdir(
            None,
            FLAGS.workdir,
            export_dir,
            checkpoint=FLAGS.checkpoint,
            model_name=FLAGS.model_name,
            version=FLAGS.version,
            use_ema=FLAGS.use_ema,
        )
    except checkpoints.CheckpointError as e:  # damaged or missing: one line, as run.py prints it
        print(f"python -m export: error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
