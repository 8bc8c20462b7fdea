"""Sample-quality metrics: FID, sFID, Inception Score, precision and recall, KID.

The numbers comparable with published ones (Nichol & Dhariwal 2021, Dhariwal & Nichol 2021 and the
rest of this line of work) all come from openai/guided-diffusion's ``evaluations/evaluator.py``.
This module computes the same quantities with the same arithmetic:

* :class:`InceptionGraph` runs the 2015 Inception graph ``classify_image_graph_def.pb`` (a local
  file; nothing is downloaded) on float32 NHWC images in [0, 255] fed at ``ExpandDims:0``, and
  returns the ``pool_3`` features (2048-d: FID, precision, recall, KID), the first 7 channels of
  ``mixed_6/conv`` flattened (sFID) and the softmax of ``pool_3`` times the weights of
  ``softmax/logits/MatMul`` (Inception Score).
* :func:`feature_statistics` / :func:`frechet_distance` (FID, sFID), :func:`inception_score`,
  :func:`precision_recall` (k-NN manifolds with float16 squared distances, in blocks) match the
  evaluator's functions (checked against its own outputs in ``tests/testdata/metrics.npz``).
* :func:`read_batch` / :func:`write_batch` read and write the evaluator's ``.npz`` batches
  (``arr_0`` uint8 images; ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` precomputed statistics).
* :func:`kernel_inception_distance` (KID, unbiased, cubic polynomial kernel) is for small sample
  counts, where FID is biased; the evaluator does not report it.

``python -m tf_iddpm.metrics REF.npz SAMPLES.npz --inception=classify_image_graph_def.pb`` prints
and writes (JSON) what the evaluator prints.

FID between two Gaussians N(mu, Sigma) fitted to the features:

    FID = |mu1 - mu2|^2 + tr(Sigma1 + Sigma2 - 2 (Sigma1 Sigma2)^{1/2}).
"""

import argparse
import hashlib
import json
import os
import sys
import warnings
from typing import Dict, Optional, Tuple, Union

from absl import logging
import keras
import numpy as np
import scipy.linalg as _scipy_linalg
import tensorflow as tf
import tqdm

from tf_iddpm import fileio

# Relative residual |X X - A| / |A| above which sqrtm's result is not trusted.
_SQRTM_MAX_RELATIVE_RESIDUAL = 1e-5
# Imaginary parts of sqrt(Sigma1 Sigma2) up to this size are round-off; larger ones mean the
# inputs were not covariance matrices.
_MAX_IMAGINARY_COMPONENT = 1e-3
_LINALG_WARNING = _scipy_linalg.LinAlgWarning


def _check_statistics(mu, sigma, which: str) -> Tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{which} must be a vector [D], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"sigma{which} must be a [D, D] = {(mu.shape[0],) * 2} matrix matching "
            f"mu{which}, got shape {sigma.shape}"
        )
    return mu, sigma


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr((sigma1 sigma2)^{1/2}) for covariance matrices, robust to singular products."""

    def sqrtm_with_residual(product):
        with warnings.catch_warnings():
            # scipy warns about singular inputs; the residual below is the accuracy check.
            warnings.simplefilter("ignore", _LINALG_WARNING)
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
                "and sigma2 finite, symmetric positive semi-definite matrices?"
            )
        warnings.warn(
            f"sqrt(sigma1 @ sigma2) has relative residual {residual:.3g}; retried with {eps} * I "
            f"added to both covariances (residual {offset_residual:.3g}) and kept the more "
            "accurate root",
            RuntimeWarning,
            stacklevel=2,
        )
        if offset_residual < residual:
            root = offset_root
    if np.iscomplexobj(root):
        largest_imaginary = np.max(np.abs(np.diagonal(root).imag))
        if largest_imaginary > _MAX_IMAGINARY_COMPONENT:
            raise ValueError(
                f"sqrt(sigma1 @ sigma2) has an imaginary component of {largest_imaginary:.3g} "
                f"(allowed up to {_MAX_IMAGINARY_COMPONENT}); are sigma1 and sigma2 covariance "
                "matrices?"
            )
        root = root.real
    return float(np.trace(root))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}), with the matrix
    square root from ``scipy.linalg.sqrtm``.  When the product is too close to singular for an
    accurate root, eps * I is added to both covariances; round-off imaginary parts of the root are
    dropped.

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
        raise ValueError(
            f"the two feature dimensions differ: mu1 has shape {mu1.shape}, mu2 has "
            f"shape {mu2.shape}"
        )
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
        raise ValueError(
            f"features must be an [N, D] array with N >= 2, got shape {features.shape}"
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


# ---------------------------------------------------------------------------------------------
# The guided-diffusion evaluator's metrics: Inception Score, precision / recall, and KID.
# ---------------------------------------------------------------------------------------------


def _check_features(features, name: str, min_rows: int = 1) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < min_rows or features.shape[1] < 1:
        raise ValueError(
            f"{name} must be an [N, D] array with N >= {min_rows}, got shape {features.shape}"
        )
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name} holds non-finite values")
    return features


def warn_if_too_few(num_features: int, dim: int) -> None:
    """Warns when N <= D: the covariance is then singular and FID unreliable."""
    if num_features <= dim:
        warnings.warn(
            f"FID from {num_features} feature vectors of dimension {dim}: with N <= D the "
            "covariance is singular and FID is unreliable (and biased upwards at any small N); "
            "published FIDs use 50 000 samples (KID is unbiased at small N)",
            RuntimeWarning,
            stacklevel=2,
        )


def inception_score(probs, split_size: int = 5000) -> float:
    """Inception Score: mean over splits of exp(E_x KL(p(y|x) || p(y))).

    As the evaluator (after improved-gan): the images are cut into consecutive splits of
    ``split_size`` (the last may be shorter), p(y) is the mean prediction of a split, and the
    per-split scores are averaged.

    Args:
      probs: [N, C] class probabilities (softmax outputs; rows sum to 1).
      split_size: images per split (the evaluator uses 5000).

    Returns:
      The score, a python float in [1, C].
    """
    probs = _check_features(probs, "probs")
    if (
        isinstance(split_size, bool)
        or not isinstance(split_size, (int, np.integer))
        or split_size <= 0
    ):
        raise ValueError(f"split_size must be a positive int, got {split_size!r}")
    if np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(
            "probs must be probabilities: non-negative rows summing to 1 (softmax "
            "outputs, not logits or pool features)"
        )
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        kl = part * (np.log(part) - np.log(marginal))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _squared_distances(u: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0) for every row pair, [Nu, Nv], in u's dtype."""
    norm_u = tf.reshape(tf.reduce_sum(tf.square(u), axis=1), [-1, 1])
    norm_v = tf.reshape(tf.reduce_sum(tf.square(v), axis=1), [1, -1])
    return tf.maximum(norm_u - 2 * tf.matmul(u, v, transpose_b=True) + norm_v, 0.0)


@tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)] * 2, reduce_retracing=True)
def _distance_block(u, v):
    # The evaluator's DistanceBlock: float16 arithmetic, float32 only if a float16 value overflows.
    half = _squared_distances(tf.cast(u, tf.float16), tf.cast(v, tf.float16))
    return tf.cond(
        tf.reduce_all(tf.math.is_finite(half)),
        lambda: tf.cast(half, tf.float32),
        lambda: _squared_distances(u, v),
    )


@tf.function(
    input_signature=[tf.TensorSpec([None, None], tf.float32)] * 2 + [tf.TensorSpec([], tf.int32)],
    reduce_retracing=True,
)
def _smallest_distances_block(u, v, count):
    """The `count` smallest squared distances from each row of u to the rows of v, ascending."""
    distances = _distance_block(u, v)
    count = tf.minimum(count, tf.shape(distances)[1])
    return -tf.math.top_k(-distances, k=count, sorted=True).values


@tf.function(
    input_signature=[tf.TensorSpec([None, None], tf.float32)] * 2
    + [tf.TensorSpec([None], tf.float32)] * 2,
    reduce_retracing=True,
)
def _inside_block(u, v, radii_u, radii_v):
    """(u rows inside some v hypersphere [Nu], v rows inside some u hypersphere [Nv])."""
    distances = _distance_block(u, v)
    u_in = tf.reduce_any(distances <= radii_v[None, :], axis=1)
    v_in = tf.reduce_any(distances <= radii_u[:, None], axis=0)
    return u_in, v_in


def _check_block_size(block_size) -> int:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size <= 0
    ):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return int(block_size)


def manifold_radii(features, k: int = 3, block_size: int = 10_000) -> np.ndarray:
    """Squared radius of each feature's k-NN hypersphere (Kynkäänniemi et al. 2019).

    The radius is the k-th smallest squared distance to the set, the point itself (at 0) not
    counted, with the evaluator's float16 distances.  Memory is O(block_size^2): the k + 1
    smallest distances are merged block by block instead of keeping whole distance rows.

    Args:
      features: [N, D] features, N > k.
      k: neighbourhood size (the evaluator uses 3).
      block_size: rows and columns per distance block (the evaluator's 10 000; the float32
        fallback on float16 overflow is decided per block, as there).

    Returns:
      float32 [N] squared radii.
    """
    features = _check_features(features, "features").astype(np.float32)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if features.shape[0] <= k:
        raise ValueError(
            f"manifold radii with k={k} need more than {k} feature vectors, got {features.shape[0]}"
        )
    block_size = _check_block_size(block_size)
    count = tf.constant(k + 1, tf.int32)
    radii = np.empty([features.shape[0]], np.float32)
    for row in range(0, features.shape[0], block_size):
        rows = tf.constant(features[row : row + block_size])
        smallest = None
        for col in range(0, features.shape[0], block_size):
            block = _smallest_distances_block(
                rows, tf.constant(features[col : col + block_size]), count
            ).numpy()
            merged = block if smallest is None else np.concatenate([smallest, block], axis=1)
            smallest = np.sort(merged, axis=1)[:, : k + 1]
        radii[row : row + block_size] = smallest[:, k]
    return radii


def precision_recall(
    ref_features, sample_features, block_size: int = 10_000
) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as the evaluator computes them.

    precision = fraction of samples inside the k-NN hypersphere (k = 3, as the evaluator) of some
    reference feature; recall = fraction of references inside the k-NN hypersphere of some sample
    feature.
    "Inside" is squared distance <= squared radius, with float16 squared distances.  Work goes
    in blocks of ``block_size`` x ``block_size`` distances, so 50 000 x 50 000 features need
    about 1 GB at the default size (smaller blocks: less memory).

    Args:
      ref_features: [N_ref, D] reference (data) features.
      sample_features: [N_sample, D] sample features.
      block_size: see :func:`manifold_radii`.

    Returns:
      (precision, recall), python floats in [0, 1].
    """
    ref = _check_features(ref_features, "ref_features").astype(np.float32)
    sample = _check_features(sample_features, "sample_features").astype(np.float32)
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(
            f"ref_features have dimension {ref.shape[1]}, sample_features {sample.shape[1]}"
        )
    block_size = _check_block_size(block_size)
    radii_ref = manifold_radii(ref, block_size=block_size)
    radii_sample = manifold_radii(sample, block_size=block_size)
    ref_in = np.zeros([ref.shape[0]], bool)
    sample_in = np.zeros([sample.shape[0]], bool)
    for row in range(0, ref.shape[0], block_size):
        for col in range(0, sample.shape[0], block_size):
            rows_in, cols_in = _inside_block(
                tf.constant(ref[row : row + block_size]),
                tf.constant(sample[col : col + block_size]),
                tf.constant(radii_ref[row : row + block_size]),
                tf.constant(radii_sample[col : col + block_size]),
            )
            ref_in[row : row + block_size] |= rows_in.numpy()
            sample_in[col : col + block_size] |= cols_in.numpy()
    return float(np.mean(sample_in)), float(np.mean(ref_in))


def kernel_inception_distance(features_a, features_b, block_size: int = 4096) -> float:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2, k(x, y) = (x.y/D + 1)^3.

    MMD^2_u = sum_{i != j} k(a_i, a_j) / (m (m - 1)) + sum_{i != j} k(b_i, b_j) / (n (n - 1))
              - 2 sum_{i, j} k(a_i, b_j) / (m n),
    over all features (no subsets), in float64.  Unbiased, so it can be slightly negative, and its
    expectation does not depend on the sample count (unlike FID's).

    Args:
      features_a: [m, D] features, m >= 2.
      features_b: [n, D] features, n >= 2.
      block_size: rows per kernel block (memory O(block_size * max(m, n))).

    Returns:
      KID, a python float.
    """
    a = _check_features(features_a, "features_a", 2).astype(np.float64)
    b = _check_features(features_b, "features_b", 2).astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a have dimension {a.shape[1]}, features_b {b.shape[1]}")
    block_size = _check_block_size(block_size)
    dim = a.shape[1]

    def kernel_sum(x, y, skip_diagonal):
        total = 0.0
        for start in range(0, x.shape[0], block_size):
            values = (x[start : start + block_size] @ y.T / dim + 1.0) ** 3
            total += values.sum()
            if skip_diagonal:
                rows = np.arange(values.shape[0])
                total -= values[rows, start + rows].sum()
        return total

    m, n = a.shape[0], b.shape[0]
    return float(
        kernel_sum(a, a, True) / (m * (m - 1))
        + kernel_sum(b, b, True) / (n * (n - 1))
        - 2.0 * kernel_sum(a, b, False) / (m * n)
    )


# ---------------------------------------------------------------------------------------------
# The 2015 Inception graph (classify_image_graph_def.pb), as the evaluator runs it.
# ---------------------------------------------------------------------------------------------

INCEPTION_GRAPH_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
    "classify_image_graph_def.pb"
)
INPUT_TENSOR = "ExpandDims:0"
POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
SOFTMAX_MATMUL_OP = "softmax/logits/MatMul"
SPATIAL_CHANNELS = 7  # sFID uses the first 7 channels of mixed_6/conv (17 x 17 x 7 = 2023 values)

_HOW_TO_GET_GRAPH = (
    "The Inception graph is the 2015 'classify_image_graph_def.pb' (inside TensorFlow's "
    "inception-2015-12-05.tgz; the guided-diffusion evaluator downloads it from "
    f"{INCEPTION_GRAPH_URL}). Download it on a machine with internet access and pass its local "
    "path; record its sha256 (printed when it is loaded) to be sure later runs use the same file."
)


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_images(images, what: str = "images") -> np.ndarray:
    """Validates images for the Inception graph: uint8 [N, H, W, 3].

    Returns:
      The images as a numpy array (not copied).

    Raises:
      ValueError: wrong rank, channel count or dtype.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(
            f"{what} must be a batch [N, H, W, 3] with N >= 1, got shape {images.shape}"
        )
    if images.shape[-1] != 3:
        raise ValueError(
            f"{what} must have 3 (RGB) channels, got {images.shape[-1]} (shape "
            f"{images.shape}); tile grayscale images to RGB first, e.g. "
            "np.repeat(images, 3, axis=-1)"
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 pixels (0..255), got dtype {images.dtype}; convert [-1, 1] "
            "model outputs with tf_iddpm.image_utils.denormalize_images"
        )
    return images


def _node(name: str, op: str, inputs, dtype_attr) -> "tf.compat.v1.NodeDef":
    node = tf.compat.v1.NodeDef(name=name, op=op, input=list(inputs))
    node.attr["T"].CopyFrom(dtype_attr)
    return node


def replace_deprecated_ops(graph_def):
    """A copy of ``graph_def`` without ops that TF2 functions refuse, rewritten as current ops.

    The 2015 Inception graph normalises with ``BatchNormWithGlobalNormalization`` (removed from new
    graphs at GraphDef version 9).  A ``tf.compat.v1.Session`` still runs it, but importing it into
    a function (``wrap_function``) fails, so each such node becomes the same arithmetic as its
    kernel: ``(x - mean) * (rsqrt(variance + epsilon) * gamma) + beta`` (``gamma`` only with
    ``scale_after_normalization``), the last op keeping the node's name so consumers are unchanged.
    """
    rewritten = tf.compat.v1.GraphDef()
    rewritten.versions.CopyFrom(graph_def.versions)
    rewritten.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.op != "BatchNormWithGlobalNormalization":
            rewritten.node.append(node)
            continue
        x, mean, variance, beta, gamma = node.input
        dtype = node.attr["T"]
        prefix = node.name + "/_batchnorm"
        epsilon = tf.compat.v1.NodeDef(name=prefix + "/epsilon", op="Const")
        epsilon.attr["dtype"].type = dtype.type
        epsilon.attr["value"].tensor.CopyFrom(
            tf.make_tensor_proto(
                node.attr["variance_epsilon"].f, dtype=tf.dtypes.as_dtype(dtype.type)
            )
        )
        nodes = [
            epsilon,
            _node(prefix + "/add", "AddV2", [variance, epsilon.name], dtype),
            _node(prefix + "/rsqrt", "Rsqrt", [prefix + "/add"], dtype),
        ]
        scale = prefix + "/rsqrt"
        if node.attr["scale_after_normalization"].b:
            nodes.append(_node(prefix + "/scale", "Mul", [scale, gamma], dtype))
            scale = prefix + "/scale"
        nodes += [
            _node(prefix + "/sub", "Sub", [x, mean], dtype),
            _node(prefix + "/mul", "Mul", [prefix + "/sub", scale], dtype),
            _node(node.name, "AddV2", [prefix + "/mul", beta], dtype),
        ]
        for new in nodes:
            new.device = node.device
        rewritten.node.extend(nodes)
    return rewritten


class InceptionGraph:
    """The 2015 Inception graph (``classify_image_graph_def.pb``) with the evaluator's outputs.

    Loaded into TF2 with ``tf.compat.v1.wrap_function`` + ``import_graph_def`` (after
    :func:`replace_deprecated_ops` rewrites its 2015 batch-norm ops) and pruned to
    images (float32 [B, H, W, 3] in [0, 255], fed at ``ExpandDims:0``; the graph resizes to 299
    itself) -> pool features [B, 2048], spatial features [B, 17 * 17 * 7] and class probabilities
    [B, 1008].  One compiled function serves every batch.  These are the features behind every
    published FID / sFID / IS / precision / recall of the guided-diffusion evaluator.
    """

    def __init__(
        self, path: Optional[Union[str, os.PathLike]], batch_size: int = 64, progress: bool = True
    ):
        """Loads the graph.

        Args:
          path: local path of ``classify_image_graph_def.pb``.
          batch_size: images per forward pass (the evaluator uses 64).
          progress: show a tqdm progress bar over batches.

        Raises:
          FileNotFoundError: no path given, or it does not exist (the message says where to get
            the file).
          ValueError: the file is not a GraphDef or lacks the evaluator's tensors; bad batch_size.
        """
        if path is None or not os.fspath(path):
            raise FileNotFoundError("no Inception graph path was given.\n" + _HOW_TO_GET_GRAPH)
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Inception graph {path!r} does not exist.\n" + _HOW_TO_GET_GRAPH
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.path, self.batch_size, self.progress = path, batch_size, progress
        self.sha256 = file_sha256(path)
        graph_def = tf.compat.v1.GraphDef()
        with open(path, "rb") as f:
            try:
                graph_def.ParseFromString(f.read())
            except Exception as e:  # google.protobuf.message.DecodeError
                raise ValueError(
                    f"{path!r} is not a TensorFlow GraphDef (.pb): {e}.\n" + _HOW_TO_GET_GRAPH
                ) from e
        names = {node.name for node in graph_def.node}
        required = [
            name.split(":")[0]
            for name in (INPUT_TENSOR, POOL_TENSOR, SPATIAL_TENSOR, SOFTMAX_MATMUL_OP)
        ]
        missing = [name for name in required if name not in names]
        if missing:
            raise ValueError(
                f"{path!r} is not the Inception graph the evaluator uses: it has no "
                f"{missing} node(s) ({len(names)} nodes).\n" + _HOW_TO_GET_GRAPH
            )

        graph_def = replace_deprecated_ops(graph_def)

        def import_graph(images):
            pool, spatial, matmul = tf.compat.v1.import_graph_def(
                graph_def,
                input_map={INPUT_TENSOR: images},
                return_elements=[POOL_TENSOR, SPATIAL_TENSOR, SOFTMAX_MATMUL_OP],
                name="inception",
            )
            return pool, spatial, matmul.inputs[1]

        wrapped = tf.compat.v1.wrap_function(
            import_graph, [tf.TensorSpec([None, None, None, 3], tf.float32)]
        )
        pool, spatial, weights = wrapped.outputs
        self._network = wrapped.prune(feeds=wrapped.inputs, fetches=[pool, spatial])
        self.softmax_weights = wrapped.prune(feeds=[], fetches=weights)().numpy()
        if self.softmax_weights.ndim != 2:
            raise ValueError(
                f"{path!r}: the weights of {SOFTMAX_MATMUL_OP} have shape "
                f"{self.softmax_weights.shape}, expected [2048, classes]"
            )
        self._weights = tf.constant(self.softmax_weights)
        self._extract = tf.function(
            self._extract_batch, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)]
        )
        logging.info("loaded Inception graph %s (sha256 %s)", path, self.sha256)

    def _extract_batch(self, images):
        pool, spatial = self._network(images)
        batch = tf.shape(images)[0]
        pool = tf.reshape(pool, [batch, -1])
        spatial = tf.reshape(spatial[..., :SPATIAL_CHANNELS], [batch, -1])
        probs = tf.nn.softmax(tf.matmul(pool, self._weights))
        return pool, spatial, probs

    def __call__(self, images) -> Dict[str, np.ndarray]:
        """Features of a set of images.

        Args:
          images: uint8 [N, H, W, 3] array.

        Returns:
          {"pool": float32 [N, 2048], "spatial": float32 [N, 2023], "probs": float32 [N, 1008]}.
        """
        images = check_images(images)
        outputs = {"pool": [], "spatial": [], "probs": []}
        for start in tqdm.trange(
            0,
            images.shape[0],
            self.batch_size,
            desc="Inception features",
            unit="batch",
            disable=not self.progress,
        ):
            batch = images[start : start + self.batch_size]
            pool, spatial, probs = self._extract(tf.constant(batch.astype(np.float32)))
            outputs["pool"].append(pool.numpy())
            outputs["spatial"].append(spatial.numpy())
            outputs["probs"].append(probs.numpy())
        return {key: np.concatenate(value, axis=0) for key, value in outputs.items()}


# ---------------------------------------------------------------------------------------------
# The evaluator's .npz batches.
# ---------------------------------------------------------------------------------------------

STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def read_batch(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """Reads an evaluator-format batch: ``arr_0`` images and, if present, the statistics.

    Reference batches (``VIRTUAL_imagenet64_labeled.npz``, ...) hold ``arr_0`` (uint8
    [N, H, W, 3]) and ``mu``/``sigma`` (pool) plus ``mu_s``/``sigma_s`` (spatial); sample batches
    (``run.py --mode=sample``'s ``samples_NxHxWxC.npz``) hold ``arr_0`` and maybe labels
    ``arr_1``.

    Returns:
      dict with "images" (uint8 array) and whichever of mu, sigma, mu_s, sigma_s are stored.

    Raises:
      FileNotFoundError / ValueError: missing file, no ``arr_0``, partial statistics, bad images.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"batch {path!r} does not exist")
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(
                f"{path!r} has no images 'arr_0' (keys: {sorted(data.files)}); an "
                "evaluator batch holds uint8 images [N, H, W, 3] as arr_0"
            )
        stored = [key for key in STATISTICS_KEYS if key in data.files]
        if len(stored) not in (0, 2, 4) or stored != list(STATISTICS_KEYS[: len(stored)]):
            raise ValueError(
                f"{path!r} has statistics {stored}; expected mu and sigma, "
                "optionally with mu_s and sigma_s"
            )
        batch = {key: data[key] for key in stored}
        batch["images"] = check_images(data["arr_0"], f"{path!r} arr_0")
    return batch


def write_batch(
    path: Union[str, os.PathLike], images, *, pool_features=None, spatial_features=None
) -> None:
    """Writes an evaluator-format batch: ``arr_0`` and, given features, their statistics.

    Args:
      path: the .npz to write (written to a temporary file, then renamed).
      images: uint8 [N, H, W, 3].
      pool_features: optional [N, 2048] pool features -> ``mu``, ``sigma``.
      spatial_features: optional spatial features -> ``mu_s``, ``sigma_s`` (needs pool_features).
    """
    arrays = {"arr_0": check_images(images)}
    if spatial_features is not None and pool_features is None:
        raise ValueError("spatial statistics (mu_s, sigma_s) need the pool statistics too")
    if pool_features is not None:
        arrays["mu"], arrays["sigma"] = feature_statistics(pool_features)
    if spatial_features is not None:
        arrays["mu_s"], arrays["sigma_s"] = feature_statistics(spatial_features)
    fileio.atomic_write(path, lambda file: np.savez(file, **arrays))


def evaluate_features(
    ref: Dict[str, np.ndarray],
    sample: Dict[str, np.ndarray],
    *,
    ref_statistics: Optional[Dict[str, np.ndarray]] = None,
) -> Dict[str, float]:
    """The evaluator's five numbers (plus KID) from Inception outputs.

    Args:
      ref: :class:`InceptionGraph` outputs of the reference images ("pool", "spatial").
      sample: outputs of the samples ("pool", "spatial", "probs").
      ref_statistics: stored reference statistics (mu, sigma, mu_s, sigma_s), used instead of
        those of ``ref``'s features when given, as the evaluator does.

    Returns:
      {"inception_score", "fid", "sfid", "precision", "recall", "kid", "num_samples",
      "num_reference"}.
    """
    ref_statistics = ref_statistics or {}
    warn_if_too_few(sample["pool"].shape[0], sample["pool"].shape[1])
    if "mu" in ref_statistics:
        mu, sigma = ref_statistics["mu"], ref_statistics["sigma"]
    else:
        mu, sigma = feature_statistics(ref["pool"])
    if "mu_s" in ref_statistics:
        mu_s, sigma_s = ref_statistics["mu_s"], ref_statistics["sigma_s"]
    else:
        mu_s, sigma_s = feature_statistics(ref["spatial"])
    sample_mu, sample_sigma = feature_statistics(sample["pool"])
    sample_mu_s, sample_sigma_s = feature_statistics(sample["spatial"])
    precision, recall = precision_recall(ref["pool"], sample["pool"])
    return {
        "inception_score": inception_score(sample["probs"]),
        "fid": frechet_distance(sample_mu, sample_sigma, mu, sigma),
        "sfid": frechet_distance(sample_mu_s, sample_sigma_s, mu_s, sigma_s),
        "precision": precision,
        "recall": recall,
        "kid": kernel_inception_distance(sample["pool"], ref["pool"]),
        "num_samples": int(sample["pool"].shape[0]),
        "num_reference": int(ref["pool"].shape[0]),
    }


def evaluate_batches(ref_path, sample_path, graph: InceptionGraph) -> Dict[str, float]:
    """The evaluator's numbers for a reference batch and a sample batch (.npz files)."""
    ref_batch = read_batch(ref_path)
    sample_batch = read_batch(sample_path)
    ref = graph(ref_batch.pop("images"))
    sample = graph(sample_batch.pop("images"))
    return evaluate_features(ref, sample, ref_statistics=ref_batch)


class ClassifierFeatures:
    """A Keras image classifier used in place of the Inception graph, for data Inception does not
    fit (offline, or small images such as the digits): a *proxy*, comparable with nothing
    published.

    The model (a ``.keras`` file) maps images in [-1, 1] to class logits and has a layer named
    ``features`` (its penultimate features: FID, precision, recall, KID) and a layer named
    ``spatial`` (a convolutional feature map: sFID, its first 7 channels as for Inception);
    softmax of the logits gives IS, and for class-conditional samples the agreement of the
    predicted class with the label asked for (:func:`label_agreement`).  ``python -m
    ablation.classifier`` trains one on a labelled dataset.
    """

    def __init__(self, path: Union[str, os.PathLike], batch_size: int = 256):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"classifier {path!r} does not exist")
        self.path, self.batch_size = path, int(batch_size)
        self.sha256 = file_sha256(path)
        model = keras.models.load_model(path)
        names = {layer.name for layer in model.layers}
        missing = [name for name in ("features", "spatial") if name not in names]
        if missing:
            raise ValueError(
                f"{path!r} has no layer(s) {missing}: a feature classifier names its penultimate "
                "layer 'features' and a convolutional feature map 'spatial'"
            )
        self._network = keras.Model(
            model.inputs,
            [
                model.get_layer("features").output,
                model.get_layer("spatial").output,
                model.outputs[0],
            ],
        )
        self.num_classes = int(model.outputs[0].shape[-1])
        logging.info("loaded feature classifier %s (sha256 %s)", path, self.sha256)

    def __call__(self, images, batch_size: Optional[int] = None) -> Dict[str, np.ndarray]:
        """{"pool": [N, D], "spatial": [N, H'W'7], "probs": [N, classes]} of uint8 RGB images."""
        images = check_images(images)
        pool, spatial, logits = self._network.predict(
            images.astype(np.float32) / 127.5 - 1.0,
            batch_size=batch_size or self.batch_size,
            verbose=0,
        )
        return {
            "pool": pool.reshape(len(images), -1).astype(np.float32),
            "spatial": spatial[..., :SPATIAL_CHANNELS].reshape(len(images), -1).astype(np.float32),
            "probs": tf.nn.softmax(logits).numpy().astype(np.float32),
        }


def label_agreement(probs, labels) -> float:
    """The fraction of samples whose most probable class is the label they were drawn for."""
    return float(np.mean(np.argmax(np.asarray(probs), axis=1) == np.asarray(labels)))


_GRAPHS: Dict[Tuple[str, int], Union[InceptionGraph, ClassifierFeatures]] = {}
_REFERENCES: Dict[Tuple[str, float, str], Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]] = {}


def load_graph(path: str, batch_size: int = 64) -> Union[InceptionGraph, ClassifierFeatures]:
    """The feature network at ``path``, loaded once per process (FID mode and training both ask):
    the Inception graph (a ``.pb``), or a Keras feature classifier (a ``.keras`` file, see
    :class:`ClassifierFeatures`)."""
    key = (os.path.abspath(path), int(batch_size))
    if key not in _GRAPHS:
        if os.fspath(path).endswith(".keras"):
            _GRAPHS[key] = ClassifierFeatures(path, batch_size=batch_size)
        else:
            _GRAPHS[key] = InceptionGraph(path, batch_size=batch_size)
    return _GRAPHS[key]


def reference_features(
    path: str, graph: InceptionGraph
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(features of a reference batch's images, its stored statistics), once per file and graph.

    Features are needed whatever the file stores (precision, recall and KID compare feature
    sets); stored ``mu``/``sigma``/``mu_s``/``sigma_s`` replace the ones computed from them, as in
    the evaluator.
    """
    key = (
        os.path.abspath(path),
        os.path.getmtime(path) if os.path.exists(path) else 0.0,
        graph.sha256,
    )
    if key not in _REFERENCES:
        batch = read_batch(path)
        features = graph(batch.pop("images"))
        _REFERENCES[key] = ({k: features[k] for k in ("pool", "spatial")}, batch)
    return _REFERENCES[key]


def fid_and_kid(
    sample_pool, ref_pool, ref_statistics: Optional[Dict[str, np.ndarray]] = None
) -> Dict[str, float]:
    """FID and KID of sample pool features against a reference's, for small sample counts.

    Used during training, where N is a few hundred: FID is then strongly biased upwards (compare
    runs at equal N only) and its small-N warning is not repeated; KID is unbiased.
    """
    ref_statistics = ref_statistics or {}
    if "mu" in ref_statistics:
        mu, sigma = ref_statistics["mu"], ref_statistics["sigma"]
    else:
        mu, sigma = feature_statistics(ref_pool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fid = frechet_distance(*feature_statistics(sample_pool), mu, sigma)
    return {"fid": fid, "kid": kernel_inception_distance(sample_pool, ref_pool)}


PRINTED_METRICS = (
    ("Inception Score", "inception_score"),
    ("FID", "fid"),
    ("sFID", "sfid"),
    ("Precision", "precision"),
    ("Recall", "recall"),
    ("KID", "kid"),
)


def format_results(results: Dict[str, float]) -> str:
    """The evaluator's printout: one 'Name: value' line per metric."""
    return "\n".join(f"{name}: {results[key]}" for name, key in PRINTED_METRICS if key in results)


def main(argv=None) -> int:
    """``python -m tf_iddpm.metrics REF.npz SAMPLES.npz --inception=PATH [--output=JSON]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tf_iddpm.metrics",
        description="Inception Score, FID, sFID, precision and recall of a sample batch against a "
        "reference batch, as openai/guided-diffusion's evaluator computes them (plus "
        "KID).",
    )
    parser.add_argument(
        "ref_batch",
        help="reference batch .npz (arr_0 uint8 images, optional mu/sigma/mu_s/sigma_s)",
    )
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0 uint8 images)")
    parser.add_argument(
        "--inception", required=True, help="local path of classify_image_graph_def.pb"
    )
    parser.add_argument(
        "--output",
        default="",
        help="JSON file for the results (default: next to the sample batch, "
        "<samples>_metrics.json)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    args = parser.parse_args(argv)
    try:
        graph = InceptionGraph(args.inception, batch_size=args.batch_size)
        print(f"Inception graph: {graph.path} (sha256 {graph.sha256})")
        results = evaluate_batches(args.ref_batch, args.sample_batch, graph)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results["inception_sha256"] = graph.sha256
    output = args.output or os.path.splitext(args.sample_batch)[0] + "_metrics.json"
    fileio.atomic_write_text(output, json.dumps(results, indent=2))
    print(format_results(results))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
