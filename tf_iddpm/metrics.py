"""Sample-quality metrics: the Fréchet Inception Distance (FID).

FID compares two sets of images through the statistics of their Inception-v3 pool features
(2048-d): fitting a Gaussian N(mu, Sigma) to each set,

    FID = |mu1 - mu2|^2 + tr(Sigma1 + Sigma2 - 2 (Sigma1 Sigma2)^{1/2}),

the Fréchet (2-Wasserstein) distance between the two Gaussians.

Nothing is downloaded: the Inception network comes from a local file or directory given by the user
(see :class:`InceptionFeatureExtractor`).  FID values depend on the exact network: statistics made
with Keras' ImageNet InceptionV3 are *not* comparable with ones made with the original TF FID graph
(the one behind the published numbers and the guided-diffusion evaluator's ``VIRTUAL_*.npz``
reference batches).  Compare only statistics computed by the same network.
"""

import os
import warnings
from typing import Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

try:  # scipy comes with scikit-learn; without it a numpy eigenvalue route is used.
    import scipy.linalg as _scipy_linalg
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _scipy_linalg = None

INCEPTION_IMAGE_SIZE = 299
# Relative residual |X X - A| / |A| above which sqrtm's result is not trusted.
_SQRTM_MAX_RELATIVE_RESIDUAL = 1e-5
# Imaginary parts of sqrt(Sigma1 Sigma2) up to this size are round-off; larger ones mean the
# inputs were not covariance matrices.
_MAX_IMAGINARY_COMPONENT = 1e-3

_HOW_TO_GET_INCEPTION = (
    "FID needs a locally available Inception network; nothing can be downloaded here. Accepted: "
    "a TensorFlow SavedModel directory, a Keras '.keras' file or a full-model '.h5' file of a "
    "network mapping 299x299 RGB images in [-1, 1] to pool features (InceptionV3 with "
    "include_top=False, pooling='avg'), or a Keras InceptionV3 weights file ('.h5' such as "
    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5, or '.weights.h5'). To make one on a "
    "machine with internet access, run\n"
    "  python -c \"import keras; keras.applications.InceptionV3(weights='imagenet', "
    "include_top=False, pooling='avg').save('inception.keras')\"\n"
    "and copy inception.keras here.")

StatsOrImages = Union[str, os.PathLike, np.ndarray, Tuple[np.ndarray, np.ndarray]]


def _check_statistics(mu, sigma, which: str) -> Tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{which} must be a vector [D], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{which} must be a [D, D] = {(mu.shape[0],) * 2} matrix matching "
                         f"mu{which}, got shape {sigma.shape}")
    return mu, sigma


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr((sigma1 sigma2)^{1/2}) for covariance matrices, robust to singular products."""
    if _scipy_linalg is None:
        # The eigenvalues of a product of PSD matrices are real and >= 0 (it is similar to
        # sigma1^{1/2} sigma2 sigma1^{1/2}); clip the round-off.
        eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
        return float(np.sum(np.sqrt(np.clip(eigenvalues.real, 0.0, None))))

    def sqrtm_with_residual(product):
        with warnings.catch_warnings():
            # scipy warns about singular inputs; the residual below is the accuracy check.
            warnings.simplefilter("ignore", getattr(_scipy_linalg, "LinAlgWarning", Warning))
            root = _scipy_linalg.sqrtm(product)
        if not np.all(np.isfinite(root)):
            return root, np.inf
        scale = max(np.linalg.norm(product), np.finfo(np.float64).tiny)
        return root, np.linalg.norm(root @ root - product) / scale

    root, residual = sqrtm_with_residual(sigma1 @ sigma2)
    if residual > _SQRTM_MAX_RELATIVE_RESIDUAL:
        # Near-singular product: move both covariances eps away from singularity and retry,
        # keeping whichever root is more accurate.
        offset = eps * np.eye(sigma1.shape[0])
        offset_root, offset_residual = sqrtm_with_residual((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(min(residual, offset_residual)):
            raise ValueError(
                f"sqrt(sigma1 @ sigma2) is not finite, even with an eps={eps} offset; are sigma1 "
                "and sigma2 finite, symmetric positive semi-definite matrices?")
        warnings.warn(
            f"sqrt(sigma1 @ sigma2) has relative residual {residual:.3g}; retried with {eps} * I "
            f"added to both covariances (residual {offset_residual:.3g}) and kept the more "
            "accurate root", RuntimeWarning)
        if offset_residual < residual:
            root = offset_root
    if np.iscomplexobj(root):
        largest_imaginary = np.max(np.abs(np.diagonal(root).imag))
        if largest_imaginary > _MAX_IMAGINARY_COMPONENT:
            raise ValueError(
                f"sqrt(sigma1 @ sigma2) has an imaginary component of {largest_imaginary:.3g} "
                f"(allowed up to {_MAX_IMAGINARY_COMPONENT}); are sigma1 and sigma2 covariance "
                "matrices?")
        root = root.real
    return float(np.trace(root))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}), with the matrix
    square root from ``scipy.linalg.sqrtm`` (numpy eigenvalues when scipy is missing).  When the
    product is too close to singular for an accurate root, eps * I is added to both covariances;
    round-off imaginary parts of the root are dropped.

    Args:
      mu1: mean [D] of the first set (e.g. the samples' features).
      sigma1: covariance [D, D] of the first set.
      mu2: mean [D] of the second set (e.g. the reference data's features).
      sigma2: covariance [D, D] of the second set.
      eps: the diagonal offset used for near-singular products.

    Returns:
      The distance, a python float (>= 0 up to round-off).
    """
    mu1, sigma1 = _check_statistics(mu1, sigma1, "1")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two feature dimensions differ: mu1 has shape {mu1.shape}, mu2 has "
                         f"shape {mu2.shape}")
    diff = mu1 - mu2
    trace_sqrt = _trace_sqrt_product(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N - 1) covariance of a set of feature vectors.

    Args:
      features: [N, D] array, N >= 2.

    Returns:
      (mu [D], sigma [D, D]), float64.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be an [N, D] array with N >= 2, got shape "
                         f"{features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path: Union[str, os.PathLike], mu, sigma) -> None:
    """Writes reference statistics as an .npz with keys ``mu`` and ``sigma``."""
    mu, sigma = _check_statistics(mu, sigma, "")
    np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, np.ndarray]:
    """Reads (mu, sigma) from an .npz with keys ``mu`` and ``sigma``.

    This is also the layout of the guided-diffusion evaluator's reference batches
    (``VIRTUAL_*.npz``, which additionally hold ``mu_s``/``sigma_s`` and images, ignored here).

    Args:
      path: the .npz file.

    Returns:
      (mu [D], sigma [D, D]), float64.
    """
    with np.load(path) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(f"{os.fspath(path)!r} has no {sorted(missing)} arrays (keys: "
                             f"{sorted(data.files)}); reference statistics need 'mu' and 'sigma'")
        return _check_statistics(data["mu"], data["sigma"], "")


def _is_legacy_h5_full_model(path: str) -> Tuple[bool, bool]:
    """(whether the .h5 holds a whole model, whether its weights include the classifier)."""
    import h5py  # a Keras dependency

    with h5py.File(path, "r") as h5:
        if "model_config" in h5.attrs:
            return True, False
        layer_names = [name.decode() if isinstance(name, bytes) else str(name)
                       for name in h5.attrs.get("layer_names", [])]
        return False, "predictions" in layer_names


def _inception_v3_from_weights(path: str, include_top: bool):
    """Keras InceptionV3 with local weights, returning the 2048-d average-pool features."""
    input_shape = (INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE, 3)
    if not include_top:
        return keras.applications.InceptionV3(
            weights=path, include_top=False, pooling="avg", input_shape=input_shape)
    classifier = keras.applications.InceptionV3(weights=path, include_top=True)
    return keras.Model(classifier.inputs, classifier.get_layer("avg_pool").output)


def _load_feature_network(path: str):
    """Returns a callable float32 [B, 299, 299, 3] in [-1, 1] -> features (any structure)."""
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, name))
                   for name in ("saved_model.pb", "saved_model.pbtxt")):
            raise FileNotFoundError(
                f"directory {path!r} is not a TensorFlow SavedModel (no saved_model.pb).\n"
                + _HOW_TO_GET_INCEPTION)
        loaded = tf.saved_model.load(path)
        signature = loaded.signatures.get("serving_default")
        if signature is None:
            if not callable(loaded):
                raise ValueError(f"SavedModel {path!r} has neither a 'serving_default' signature "
                                 "nor a __call__ function")
            return loaded, loaded
        input_names = list(signature.structured_input_signature[1])
        if len(input_names) != 1:
            raise ValueError(f"SavedModel {path!r}: the 'serving_default' signature must take one "
                             f"image input, it takes {input_names}")
        return (lambda images: signature(**{input_names[0]: images})), loaded

    lower = path.lower()
    if lower.endswith(".keras"):
        return keras.saving.load_model(path, compile=False), None
    if lower.endswith(".weights.h5"):  # Keras 3 weights of InceptionV3(include_top=False)
        return _inception_v3_from_weights(path, include_top=False), None
    if lower.endswith((".h5", ".hdf5")):
        is_full_model, has_classifier = _is_legacy_h5_full_model(path)
        if is_full_model:
            return keras.saving.load_model(path, compile=False), None
        return _inception_v3_from_weights(path, include_top=has_classifier), None
    raise ValueError(f"unsupported Inception network file {path!r}.\n" + _HOW_TO_GET_INCEPTION)


class InceptionFeatureExtractor:
    """Inception pool features of uint8 images, from a network stored locally.

    Images are resized to 299x299 (bilinear) and scaled to [-1, 1] (Inception's preprocessing)
    before the network; a network with a spatial output [B, h, w, D] is average-pooled to [B, D].
    """

    def __init__(self, path: Optional[Union[str, os.PathLike]], batch_size: int = 64):
        """Loads the network.

        Args:
          path: a TF SavedModel directory, a Keras ``.keras`` / full-model ``.h5`` file, or a
            Keras InceptionV3 weights file: a legacy ``.h5`` (with or without the classifier, as
            keras.applications distributes them) or a Keras 3 ``.weights.h5`` of
            ``InceptionV3(include_top=False, pooling="avg")``.  Must exist locally.
          batch_size: default number of images per forward pass.

        Raises:
          FileNotFoundError: `path` is empty or does not exist (the message says how to get one).
          ValueError: unsupported file type or SavedModel signature, or bad batch_size.
        """
        if path is None or not os.fspath(path):
            raise FileNotFoundError("no Inception network path was given.\n"
                                    + _HOW_TO_GET_INCEPTION)
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Inception network {path!r} does not exist.\n"
                                    + _HOW_TO_GET_INCEPTION)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.path = path
        self.batch_size = batch_size
        network, self._keep_alive = _load_feature_network(path)
        if isinstance(network, keras.Model):  # inference mode: BatchNorm uses moving statistics
            self._network = lambda images: network(images, training=False)
        else:
            self._network = network
        self._extract = tf.function(
            self._extract_batch, reduce_retracing=True,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])

    @staticmethod
    def preprocess(images: tf.Tensor) -> tf.Tensor:
        """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1] (bilinear resize)."""
        images = tf.image.resize(tf.cast(images, tf.float32),
                                 [INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE], method="bilinear")
        return images / 127.5 - 1.0

    def _extract_batch(self, images: tf.Tensor) -> tf.Tensor:
        features = self._network(self.preprocess(images))
        if isinstance(features, dict):
            if len(features) != 1:
                raise ValueError(f"the Inception network returns several outputs "
                                 f"{sorted(features)}; it must return the pool features only")
            features = next(iter(features.values()))
        if isinstance(features, (list, tuple)):
            if len(features) != 1:
                raise ValueError(f"the Inception network returns {len(features)} outputs; it "
                                 "must return the pool features only")
            features = features[0]
        if features.shape.rank == 4:  # [B, h, w, D]: a network built without pooling
            features = tf.reduce_mean(features, axis=[1, 2])
        if features.shape.rank != 2:
            raise ValueError(f"the Inception network must return features [B, D] (or [B, h, w, D]),"
                             f" got shape {features.shape}")
        return tf.cast(features, tf.float32)

    def __call__(self, images, batch_size: Optional[int] = None) -> np.ndarray:
        """Features of a set of images.

        Args:
          images: uint8 array [N, H, W, 3] (values 0..255, as samples are saved).
          batch_size: images per forward pass; defaults to the constructor's.

        Returns:
          float64 array [N, D] (D = 2048 for InceptionV3).
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be a uint8 array [N, H, W, 3] with values 0..255, got "
                             f"{images.dtype} {images.shape}")
        batch_size = self.batch_size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        features = [self._extract(tf.constant(images[start:start + batch_size])).numpy()
                    for start in range(0, images.shape[0], batch_size)]
        if not features:
            raise ValueError("images is empty; FID needs at least 2 images per set")
        return np.concatenate(features, axis=0).astype(np.float64)


def _load_images_npz(path: str) -> np.ndarray:
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path!r} holds neither images ('arr_0') nor statistics ('mu', "
                             f"'sigma'); keys: {sorted(data.files)}")
        return data["arr_0"]


def compute_statistics(images, extractor: InceptionFeatureExtractor,
                       batch_size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the Inception features of uint8 images [N, H, W, 3] (N >= 2)."""
    return feature_statistics(extractor(images, batch_size=batch_size))


def _resolve_statistics(source: StatsOrImages, extractor, batch_size, what: str):
    if isinstance(source, tuple):
        if len(source) != 2:
            raise ValueError(f"{what} as a tuple must be (mu, sigma), got {len(source)} items")
        return _check_statistics(source[0], source[1], "")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not path.endswith(".npz"):
            raise ValueError(f"{what} path must be an .npz file (images as 'arr_0', or statistics "
                             f"as 'mu'/'sigma'), got {path!r}")
        with np.load(path) as data:
            has_statistics = {"mu", "sigma"} <= set(data.files)
        if has_statistics:
            return load_statistics(path)
        source = _load_images_npz(path)
    return compute_statistics(source, extractor, batch_size)


def compute_fid(sample_images: StatsOrImages, reference: StatsOrImages,
                extractor: InceptionFeatureExtractor,
                batch_size: Optional[int] = None) -> float:
    """FID between generated samples and reference data.

    Args:
      sample_images: uint8 array [N, H, W, 3], or an .npz path holding them as ``arr_0`` (the
        format ``run.py --mode=sample`` and the reference's sampling script write).
      reference: uint8 images [M, H, W, 3]; or an .npz path with statistics ``mu``/``sigma`` (used
        as they are, e.g. from :func:`save_statistics` or a ``VIRTUAL_*.npz`` reference batch, see
        the module docstring on comparability) or with images ``arr_0``; or a (mu, sigma) tuple.
      extractor: the Inception feature extractor.
      batch_size: images per forward pass; defaults to the extractor's.

    Returns:
      FID, a python float.
    """
    mu1, sigma1 = _resolve_statistics(sample_images, extractor, batch_size, "sample_images")
    mu2, sigma2 = _resolve_statistics(reference, extractor, batch_size, "reference")
    return frechet_distance(mu1, sigma1, mu2, sigma2)
