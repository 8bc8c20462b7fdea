"""Sample quality for the study: a feature network, and distances in its feature space.

Offline there are no Inception weights, so by default the features are the penultimate layer of a
small CNN digit classifier trained once on the training split (:class:`ProxyFeatures`, cached in
``<study_dir>/classifier``): a *proxy* for FID, self-consistent within one study and comparable
with nothing published, which the study checks against the data itself before use.  With
``--inception=classify_image_graph_def.pb`` the real Inception graph's pool features are used
(:class:`InceptionFeatures`).  :class:`Scorer` turns images into the study's quality numbers:
Fréchet distance, precision and recall against the training split.
"""

import copy
import os
import warnings
from typing import Callable, Dict, Tuple

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from ablation import cache
from tf_iddpm import data as data_lib
from tf_iddpm import data_sources
from tf_iddpm import image_utils
from tf_iddpm import metrics

FEATURE_DIM = 32  # the proxy classifier's penultimate width
CLASSIFIER_SUBDIR = "classifier"  # inside the study directory


def split_images_and_labels(data_config, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images [N, H, W, 3] and int labels [N] of a split (eval pipeline, in order)."""
    labelled = copy.deepcopy(data_config)
    num_classes = data_sources.dataset_num_classes(data_config, split)
    if num_classes is None:
        raise ValueError(
            f"the proxy classifier needs class labels, and {data_config.name!r} "
            f"split {split!r} has none; pass --inception=classify_image_graph_def.pb"
        )
    labelled.class_cond = True
    labelled.num_classes = num_classes
    dataset = data_lib.make_eval_dataset(labelled, batch_size=256, split=split)
    images, labels = [], []
    for batch in dataset:
        mask = batch["mask"]
        real = tf.boolean_mask(batch["image"], mask)
        images.append(image_utils.denormalize_images(real, round_to_nearest=True).numpy())
        labels.append(tf.boolean_mask(batch["label"], mask).numpy())
    return image_utils.to_rgb(np.concatenate(images)), np.concatenate(labels).astype(np.int64)


class ProxyFeatures:
    """Penultimate features of a small CNN classifier trained on the training split.

    A stand-in for Inception where its weights cannot be had: distances in its feature space are
    self-consistent within one study, comparable with nothing published.  ``network`` is the
    saved classifier as ``--mode=fid`` reads it (:class:`tf_iddpm.metrics.ClassifierFeatures`).
    """

    def __init__(self, network: metrics.ClassifierFeatures, accuracy: float):
        self.network = network
        self.path = network.path
        self.test_accuracy = float(accuracy)
        self.description = (
            f"proxy: penultimate {FEATURE_DIM}-d features of a small CNN digit "
            f"classifier trained on the training split (test accuracy "
            f"{self.test_accuracy:.3f}); NOT Inception, NOT comparable with "
            "published FIDs"
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.network(images)["pool"].astype(np.float64)

    @classmethod
    def train_or_load(cls, directory: str, train_data, test_data, *, epochs: int, seed: int):
        """The classifier cached in ``directory`` if it was trained on data of this shape with
        these settings; else one trained now (and cached)."""
        path = os.path.join(directory, "classifier.keras")
        info_path = os.path.join(directory, "classifier.json")
        (x_train, y_train), (x_test, y_test) = train_data, test_data
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        if num_classes < 2:
            raise ValueError(
                "the proxy classifier needs class labels (at least 2 classes) in the "
                "dataset; pass --inception=classify_image_graph_def.pb instead"
            )
        info = cache.read_json(info_path)
        key = {
            "epochs": epochs,
            "seed": seed,
            "shape": list(x_train.shape),
            "num_classes": num_classes,
        }
        if info is not None and info.get("key") == key and os.path.exists(path):
            accuracy = info["test_accuracy"]
            logging.info("loaded the proxy classifier from %s", path)
        else:
            model = _train_classifier(x_train, y_train, num_classes, epochs=epochs, seed=seed)
            _, accuracy = model.evaluate(x_test.astype(np.float32) / 127.5 - 1.0, y_test, verbose=0)
            os.makedirs(directory, exist_ok=True)
            model.save(path)
            cache.write_json(info_path, {"key": key, "test_accuracy": float(accuracy)})
            logging.info("trained the proxy classifier: test accuracy %.3f", accuracy)
        return cls(metrics.ClassifierFeatures(path), accuracy)


def _train_classifier(x_train, y_train, num_classes: int, *, epochs: int, seed: int):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(x_train.shape[1:])
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", strides=2)(h)
    # "spatial" and "features" name the layers tf_iddpm.metrics.ClassifierFeatures reads (sFID,
    # and FID / precision / recall) when the classifier serves --mode=fid as its feature network.
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="spatial")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(FEATURE_DIM, activation="relu", name="features")(h)
    outputs = keras.layers.Dense(num_classes, name="logits")(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x_train.astype(np.float32) / 127.5 - 1.0,
        y_train,
        batch_size=64,
        epochs=epochs,
        verbose=0,
        shuffle=True,
    )
    return model


class InceptionFeatures:
    """pool_3 features of the 2015 Inception graph (``metrics.InceptionGraph``)."""

    def __init__(self, path: str):
        self.graph = metrics.load_graph(path)
        self.description = f"Inception pool_3 features ({path}, sha256 {self.graph.sha256})"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.graph(images)["pool"].astype(np.float64)


def feature_network(
    study_dir: str, inception: str, train_data, test_data, *, classifier_epochs: int
) -> Callable[[np.ndarray], np.ndarray]:
    """Inception's features with ``inception`` (a graph path), else the proxy classifier's."""
    if inception:
        return InceptionFeatures(inception)
    return ProxyFeatures.train_or_load(
        os.path.join(study_dir, CLASSIFIER_SUBDIR),
        train_data,
        test_data,
        epochs=classifier_epochs,
        seed=0,
    )


def quality(ref_features: np.ndarray, features: np.ndarray) -> Dict[str, float]:
    """Fréchet distance, precision and recall of ``features`` against ``ref_features``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fd = metrics.frechet_distance(
            *metrics.feature_statistics(features), *metrics.feature_statistics(ref_features)
        )
    precision, recall = metrics.precision_recall(ref_features, features)
    return {"fd": float(fd), "precision": float(precision), "recall": float(recall)}


class Scorer:
    """Images -> their quality numbers against a reference set, in one feature network's space.

    Attributes:
      description: the feature network (part of every quality cache key: scores of different
        features are never mixed).
      proxy: whether the features are the proxy classifier's (not Inception's).
    """

    def __init__(self, features, reference_images: np.ndarray):
        self.features = features
        self.description = features.description
        self.proxy = isinstance(features, ProxyFeatures)
        self.ref_features = features(reference_images)

    def __call__(self, images: np.ndarray) -> Dict[str, float]:
        """{"fd", "precision", "recall"} of uint8 RGB ``images`` against the reference set."""
        return quality(self.ref_features, self.features(images))
