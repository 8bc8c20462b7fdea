"""Trains the study's proxy digit classifier on a labelled dataset, for use as a feature network.

    python -m ablation.classifier --config=configs/digits.py --out_dir=workdir/classifier

Writes ``<out_dir>/classifier.keras`` (cached: a second run with the same data and settings loads
it) and prints its test accuracy.  ``run.py --mode=fid --inception=<out_dir>/classifier.keras``
and ``python -m tf_iddpm.quality_lib --inception=...`` then score samples in its feature space:
a proxy FID offline, and for class-conditional models the agreement of each sample's predicted
class with its label (:class:`tf_iddpm.metrics.ClassifierFeatures`).  Run from the checkout root.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from ablation import features
from tf_iddpm import config_utils

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config whose data to classify, e.g. configs/digits.py."
)
flags.DEFINE_string("out_dir", None, "Directory for classifier.keras (and its cache record).")
flags.DEFINE_integer("epochs", 30, "Training epochs.")
flags.DEFINE_integer("seed", 0, "Weight initialisation and data order seed.")
flags.mark_flags_as_required(["config", "out_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    data = FLAGS.config.data
    config_utils.validate_config(FLAGS.config, mode="sample")
    classifier = features.ProxyFeatures.train_or_load(
        FLAGS.out_dir,
        features.split_images_and_labels(data, data.train_split),
        features.split_images_and_labels(data, data.eval_split),
        epochs=FLAGS.epochs,
        seed=FLAGS.seed,
    )
    print(f"classifier: {classifier.path} (test accuracy {classifier.test_accuracy:.3f})")


if __name__ == "__main__":
    app.run(main)
