"""Tests for tf_iddpm.metrics: the Fréchet distance, the 2015 Inception graph loader, and the
guided-diffusion evaluator's metrics (against its own outputs in testdata/metrics.npz)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests import golden
from tests import inception_stand_in
from tf_iddpm import metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _random_orthogonal(rng, dim):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def _random_covariance(rng, dim, rank=None):
    factor = rng.normal(size=(dim, rank or dim))
    return factor @ factor.T / (rank or dim) + (0.0 if rank else 0.1 * np.eye(dim))


def _diagonal_closed_form(mu1, var1, mu2, var2):
    return np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2))


def _general_closed_form(mu1, sigma1, mu2, sigma2):
    """|dmu|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), through symmetric eigendecompositions."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = eigenvectors @ np.diag(np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    middle = np.linalg.eigvalsh(sqrt_sigma1 @ sigma2 @ sqrt_sigma1)
    return (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(sigma1)
        + np.trace(sigma2)
        - 2.0 * np.sum(np.sqrt(np.clip(middle, 0, None)))
    )


# ---------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("dim", [1, 3, 64])
def test_frechet_distance_diagonal_closed_form(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    var1, var2 = rng.uniform(0.1, 3.0, size=dim), rng.uniform(0.1, 3.0, size=dim)
    got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    np.testing.assert_allclose(got, _diagonal_closed_form(mu1, var1, mu2, var2), rtol=1e-10)


def test_frechet_distance_diagonal_with_zero_variances():
    # Singular covariances (zero variance in some directions): sqrt(0 * b) = 0 still holds.
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 0.5]), np.array([1.0, 1.0, -1.0, 0.0])
    var1, var2 = np.array([0.0, 2.0, 0.0, 1.0]), np.array([3.0, 0.0, 0.0, 4.0])
    got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    np.testing.assert_allclose(got, _diagonal_closed_form(mu1, var1, mu2, var2), rtol=1e-10)


@pytest.mark.parametrize("dim", [2, 16, 128])
def test_frechet_distance_commuting_covariances_closed_form(dim):
    # Simultaneously diagonalisable: S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T.
    rng = np.random.default_rng(100 + dim)
    q = _random_orthogonal(rng, dim)
    a, b = rng.uniform(0.05, 4.0, size=dim), rng.uniform(0.05, 4.0, size=dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    np.testing.assert_allclose(got, _diagonal_closed_form(mu1, a, mu2, b), rtol=1e-9)


@pytest.mark.parametrize("dim", [3, 50])
def test_frechet_distance_general_covariances_and_symmetry(dim):
    rng = np.random.default_rng(200 + dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    forward = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    backward = metrics.frechet_distance(mu2, sigma2, mu1, sigma1)
    expected = _general_closed_form(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(forward, expected, rtol=1e-9)
    np.testing.assert_allclose(backward, forward, rtol=1e-10)
    assert forward > 0


@pytest.mark.parametrize("rank", [None, 5])
def test_frechet_distance_is_zero_for_identical_statistics(rank):
    rng = np.random.default_rng(7)
    mu, sigma = rng.normal(size=20), _random_covariance(rng, 20, rank=rank)
    got = metrics.frechet_distance(mu, sigma, mu, sigma)
    # Round-off only: 1e-9 of the total variance at full rank.  Rank-deficient: the square root of
    # round-off-sized eigenvalues (~1e-16) contributes ~1e-8 per zero direction, so allow 1e-6.
    assert abs(got) < (1e-9 if rank is None else 1e-6) * np.trace(sigma)


def test_frechet_distance_rank_deficient_covariance_closed_form():
    rng = np.random.default_rng(8)
    mu1, mu2 = rng.normal(size=30), rng.normal(size=30)
    sigma1, sigma2 = _random_covariance(rng, 30), _random_covariance(rng, 30, rank=10)
    got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    # sigma2 has 20 zero eigenvalues; square roots of their round-off (~1e-8 each) bound the
    # agreement, hence rtol 1e-8 rather than 1e-9.
    np.testing.assert_allclose(got, _general_closed_form(mu1, sigma1, mu2, sigma2), rtol=1e-8)


class _FakeScipyLinalg:
    """scipy.linalg stand-in whose sqrtm fails (NaN) on the first call, then is exact."""

    def __init__(self, real_sqrtm):
        self.real_sqrtm = real_sqrtm
        self.calls = []

    def sqrtm(self, matrix):
        self.calls.append(matrix)
        if len(self.calls) == 1:
            return np.full_like(matrix, np.nan)
        return self.real_sqrtm(matrix)


def test_frechet_distance_retries_with_eps_offset_when_sqrtm_fails(monkeypatch):
    import scipy.linalg

    fake = _FakeScipyLinalg(scipy.linalg.sqrtm)
    monkeypatch.setattr(metrics, "_scipy_linalg", fake)
    mu1, mu2 = np.array([1.0, 0.0, -1.0]), np.zeros(3)
    var1, var2 = np.array([1.0, 2.0, 0.5]), np.array([0.25, 2.0, 4.0])
    eps = 1e-4
    with pytest.warns(RuntimeWarning, match="retried with 0.0001 \\* I"):
        got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2), eps=eps)
    assert len(fake.calls) == 2
    np.testing.assert_allclose(fake.calls[1], np.diag((var1 + eps) * (var2 + eps)), rtol=1e-15)
    # The offset enters only through the square-root term.
    expected = _diagonal_closed_form(mu1, var1, mu2, var2) + 2.0 * np.sum(
        np.sqrt(var1 * var2) - np.sqrt((var1 + eps) * (var2 + eps))
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_frechet_distance_drops_round_off_imaginary_parts_and_rejects_large_ones(monkeypatch):
    import scipy.linalg

    real_sqrtm = scipy.linalg.sqrtm
    sigma1, sigma2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    expected = _diagonal_closed_form(np.zeros(2), np.diag(sigma1), np.zeros(2), np.diag(sigma2))

    class TinyImaginary:
        @staticmethod
        def sqrtm(matrix):
            return real_sqrtm(matrix) + 1e-12j

    monkeypatch.setattr(metrics, "_scipy_linalg", TinyImaginary)
    got = metrics.frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, expected, rtol=1e-10)

    class LargeImaginary:
        @staticmethod
        def sqrtm(matrix):
            return real_sqrtm(matrix) + 0.1j * np.eye(2)

    monkeypatch.setattr(metrics, "_scipy_linalg", LargeImaginary)
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(ValueError, match="imaginary component of 0.1"),
    ):
        metrics.frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2)


@pytest.mark.parametrize(
    "args,message",
    [
        ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), r"sigma1 must be a \[D, D\] = \(3, 3\)"),
        ((np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)), r"mu1 has shape \(3,\), mu2 has shape"),
        ((np.zeros((2, 2)), np.eye(2), np.zeros(2), np.eye(2)), r"mu1 must be a vector \[D\]"),
    ],
)
def test_frechet_distance_bad_shapes_raise(args, message):
    with pytest.raises(ValueError, match=message):
        metrics.frechet_distance(*args)


def test_feature_statistics_of_gaussian_samples_approach_closed_form():
    dim, num_samples = 3, 100_000
    rng = np.random.default_rng(9)
    q = _random_orthogonal(rng, dim)
    a, b = np.array([1.0, 0.5, 2.0]), np.array([0.2, 1.5, 2.0])
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.5, 0.0])
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    features1 = rng.multivariate_normal(mu1, sigma1, size=num_samples)
    features2 = rng.multivariate_normal(mu2, sigma2, size=num_samples)

    est_mu1, est_sigma1 = metrics.feature_statistics(features1)
    np.testing.assert_allclose(est_mu1, features1.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(est_sigma1, np.cov(features1.T), rtol=1e-12)
    got = metrics.frechet_distance(est_mu1, est_sigma1, *metrics.feature_statistics(features2))
    expected = _diagonal_closed_form(mu1, a, mu2, b)  # 2.0735
    # The estimate's sampling error at N = 1e5: standard deviation 0.015 (measured over 300
    # repeats, mostly from the mean term 2 dmu.(mu_hat - mu)).  Allow 5 SD = 0.08 (~4%).
    np.testing.assert_allclose(got, expected, atol=0.08)


@pytest.mark.parametrize("features", [np.zeros((1, 4)), np.zeros(5), np.zeros((2, 3, 4))])
def test_feature_statistics_bad_input_raises(features):
    with pytest.raises(ValueError, match=r"features must be an \[N, D\] array with N >= 2"):
        metrics.feature_statistics(features)


# ---------------------------------------------------------------------------------------------
# The guided-diffusion evaluator's arithmetic, against its own outputs (testdata/metrics.npz).


@pytest.fixture(scope="module")
def evaluator_golden():
    with golden.load("metrics") as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("name", ["small", "rankdef"])
def test_fid_matches_the_evaluator(evaluator_golden, name):
    a, b = evaluator_golden[f"fid_{name}_a"], evaluator_golden[f"fid_{name}_b"]
    mu_a, sigma_a = metrics.feature_statistics(a)
    np.testing.assert_allclose(mu_a, evaluator_golden[f"fid_{name}_mu_a"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        sigma_a, evaluator_golden[f"fid_{name}_sigma_a"], rtol=1e-10, atol=1e-12
    )
    fid = metrics.frechet_distance(mu_a, sigma_a, *metrics.feature_statistics(b))
    np.testing.assert_allclose(fid, evaluator_golden[f"fid_{name}_value"], rtol=1e-4)


def test_inception_score_matches_the_evaluator(evaluator_golden):
    score = metrics.inception_score(evaluator_golden["is_preds"], split_size=500)
    np.testing.assert_allclose(score, evaluator_golden["is_value_split500"], rtol=1e-4)


@pytest.mark.parametrize("name", ["near", "far"])
@pytest.mark.parametrize("block_size", [10_000, 97])
def test_precision_recall_match_the_evaluator(evaluator_golden, name, block_size):
    ref, sample = evaluator_golden[f"pr_{name}_ref"], evaluator_golden[f"pr_{name}_sample"]
    for features, key in ((ref, "ref"), (sample, "sample")):
        np.testing.assert_allclose(
            metrics.manifold_radii(features, block_size=block_size),
            evaluator_golden[f"pr_{name}_radii_{key}"][:, 0],
            rtol=1e-3,
        )
    precision, recall = metrics.precision_recall(ref, sample, block_size=block_size)
    assert abs(precision - evaluator_golden[f"pr_{name}_precision"]) <= 1 / len(sample)
    assert abs(recall - evaluator_golden[f"pr_{name}_recall"]) <= 1 / len(ref)


def test_identical_sets_give_zero_fid_and_full_precision_recall():
    features = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    assert metrics.frechet_distance(
        *metrics.feature_statistics(features), *metrics.feature_statistics(features)
    ) == pytest.approx(0.0, abs=1e-8)
    assert metrics.precision_recall(features, features, block_size=64) == (1.0, 1.0)
    assert abs(metrics.kernel_inception_distance(features, features)) < 0.05


def test_manifold_radius_is_the_kth_neighbour_distance_on_a_line():
    # Points 0, 1, 3, 6, 10 on a line: squared distances to the 1st/2nd neighbours by hand.
    features = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]], np.float32)
    np.testing.assert_array_equal(metrics.manifold_radii(features, k=1), [1, 1, 4, 9, 16])
    np.testing.assert_array_equal(
        metrics.manifold_radii(features, k=2, block_size=2), [9, 4, 9, 16, 49]
    )


def test_precision_recall_of_disjoint_sets_is_zero():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(50, 4)).astype(np.float32)
    assert metrics.precision_recall(ref, ref + 100.0) == (0.0, 0.0)


def test_inception_score_closed_forms():
    # Uniform predictions: p(y|x) = p(y), KL 0, score 1.  Confident and balanced over C classes: C.
    assert metrics.inception_score(np.full((40, 10), 0.1)) == pytest.approx(1.0)
    one_hot = np.eye(8)[np.arange(64) % 8] * (1 - 8e-9) + 1e-9
    assert metrics.inception_score(one_hot) == pytest.approx(8.0, rel=1e-6)
    # Split size: two splits of 8 classes each, of which 4 are used per split -> 4.
    halves = np.eye(8)[np.r_[np.arange(32) % 4, 4 + np.arange(32) % 4]] * (1 - 8e-9) + 1e-9
    assert metrics.inception_score(halves, split_size=32) == pytest.approx(4.0, rel=1e-6)
    assert metrics.inception_score(halves) == pytest.approx(8.0, rel=1e-6)


@pytest.mark.parametrize(
    "probs,message",
    [
        (np.random.default_rng(0).normal(size=(5, 4)), "probabilities"),
        (np.ones((3,)), r"\[N, D\]"),
    ],
)
def test_inception_score_rejects_non_probabilities(probs, message):
    with pytest.raises(ValueError, match=message):
        metrics.inception_score(probs)


def test_kid_equals_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(7, 3)), rng.normal(0.5, 1.2, size=(9, 3))

    def k(x, y):
        return (x @ y / 3 + 1.0) ** 3

    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    bb = sum(k(b[i], b[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    ab = sum(k(a[i], b[j]) for i in range(7) for j in range(9)) / (7 * 9)
    expected = aa + bb - 2 * ab
    np.testing.assert_allclose(metrics.kernel_inception_distance(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(
        metrics.kernel_inception_distance(a, b, block_size=2), expected, rtol=1e-12
    )


def test_kid_is_unbiased_at_small_sample_counts_where_fid_is_not():
    # Two samples of 20 from the same 8-d Gaussian: KID averages to ~0, FID to far above 0.
    rng = np.random.default_rng(3)
    kids, fids = [], []
    for _ in range(200):
        a, b = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
        kids.append(metrics.kernel_inception_distance(a, b))
        fids.append(
            metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
        )
    assert abs(np.mean(kids)) < 3 * np.std(kids) / np.sqrt(len(kids))
    assert np.mean(fids) > 1.0
    shifted = metrics.kernel_inception_distance(
        rng.normal(size=(20, 8)), rng.normal(1.0, 1.0, size=(20, 8))
    )
    assert shifted > 10 * np.std(kids)


# ---------------------------------------------------------------------------------------------
# The 2015 Inception graph loader, on a stand-in graph with the same tensor names.


@pytest.fixture(scope="module")
def stand_in_graph(tmp_path_factory):
    return inception_stand_in.write(tmp_path_factory.mktemp("inception") / "stand_in.pb")


@pytest.fixture(scope="module")
def small_stand_in_graph(tmp_path_factory):
    """64-d pool features: end-to-end runs without 2048 x 2048 matrix square roots."""
    return inception_stand_in.write(tmp_path_factory.mktemp("inception") / "small.pb", pool_dim=64)


def _rgb_images(n, size=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, [n, size, size, 3]).astype(np.uint8)


def test_inception_graph_returns_the_evaluators_tensors(stand_in_graph):
    # The stand-in has the 2015 graph's BatchNormWithGlobalNormalization, which the session
    # computing `expected` runs natively and the loader rewrites into current ops.
    graph_def = inception_stand_in.make_graph_def()
    batch_norm = "BatchNormWithGlobalNormalization"
    assert batch_norm in {node.op for node in graph_def.node}
    assert batch_norm not in {node.op for node in metrics.replace_deprecated_ops(graph_def).node}
    graph = metrics.InceptionGraph(stand_in_graph, batch_size=3, progress=False)
    images = _rgb_images(7, size=13)
    outputs = graph(images)
    expected = inception_stand_in.reference_features(inception_stand_in.make_graph_def(), images)
    assert outputs["pool"].shape == (7, 2048) and outputs["probs"].shape == (7, 1008)
    assert outputs["spatial"].shape == (7, 8 * 8 * 7)  # first 7 channels of mixed_6/conv

    # The session and the function sum the convolutions in different orders (one image at a time
    # there, batches of 3 here), so an element's float32 round-off is a few ulp of the terms summed
    # into it, which are of the tensor's scale, not of the element's: pool entries of ~0.03 next
    # to ones of ~50 differ by up to ~1.7 eps * max|pool| (measured over 40 image sets).  Hence an
    # absolute floor of 8 eps * max|expected| (~4e-5 for pool, ~1e-5 for spatial), 1e-6 of the
    # maximum.  A wrong layer or channel slice, or a batch-norm rewrite that drops epsilon, gamma
    # or beta, moves elements by >= 6e-4 of the maximum (each checked by planting it).
    def float32_atol(reference):
        return 8 * np.finfo(np.float32).eps * np.abs(reference).max()

    for key in ("pool", "spatial"):
        np.testing.assert_allclose(
            outputs[key], expected[key], rtol=1e-5, atol=float32_atol(expected[key])
        )
    # Logits of a few hundred: float32 rounding of the 2048-term products (batched here, one by one
    # there) moves the sharpest probabilities by up to ~1e-4.
    np.testing.assert_allclose(outputs["probs"], expected["probs"], atol=1e-4)
    # Any batch size gives the same features, up to the same round-off (another summation order).
    whole = metrics.InceptionGraph(stand_in_graph, batch_size=7, progress=False)(images)
    np.testing.assert_allclose(
        whole["pool"], outputs["pool"], rtol=1e-6, atol=float32_atol(outputs["pool"])
    )
    assert graph.sha256 == metrics.file_sha256(stand_in_graph) and len(graph.sha256) == 64
    assert graph.softmax_weights.shape == (2048, 1008)


def test_inception_graph_missing_or_wrong_file_errors(tmp_path, stand_in_graph):
    with pytest.raises(FileNotFoundError, match="classify_image_graph_def.pb"):
        metrics.InceptionGraph(tmp_path / "nope.pb")
    with pytest.raises(FileNotFoundError, match="no Inception graph path"):
        metrics.InceptionGraph("")
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff\xfe not a protobuf \x00" * 10)
    with pytest.raises(ValueError, match="not a TensorFlow GraphDef"):
        metrics.InceptionGraph(garbage)
    import tensorflow as tf

    other = tf.Graph()
    with other.as_default():
        tf.identity(tf.compat.v1.placeholder(tf.float32, [None, 3], name="x"), name="pool_3")
    wrong = tmp_path / "wrong.pb"
    wrong.write_bytes(other.as_graph_def().SerializeToString())
    with pytest.raises(ValueError, match=r"not the Inception graph.*ExpandDims.*mixed_6/conv"):
        metrics.InceptionGraph(wrong)
    with pytest.raises(ValueError, match="batch_size"):
        metrics.InceptionGraph(stand_in_graph, batch_size=0)


@pytest.mark.parametrize(
    "images,message",
    [
        (np.zeros((2, 8, 8, 1), np.uint8), "3 \\(RGB\\) channels, got 1"),
        (np.zeros((2, 8, 8, 4), np.uint8), "3 \\(RGB\\) channels, got 4"),
        (np.zeros((8, 8, 3), np.uint8), r"\[N, H, W, 3\]"),
        (np.zeros((2, 8, 8, 3), np.int32), "dtype int32"),
        (np.full((2, 8, 8, 3), 128.0, np.float32), "must be uint8 .*denormalize_images"),
    ],
)
def test_inception_graph_rejects_bad_images(stand_in_graph, images, message):
    graph = metrics.InceptionGraph(stand_in_graph, progress=False)
    with pytest.raises(ValueError, match=message):
        graph(images)


# ---------------------------------------------------------------------------------------------
# The evaluator's .npz batches, the evaluation and the command line.


def test_batch_npz_round_trip_both_ways(tmp_path):
    rng = np.random.default_rng(4)
    images = _rgb_images(30)
    pool, spatial = rng.normal(size=(30, 5)), rng.normal(size=(30, 3))
    path = tmp_path / "ref.npz"
    metrics.write_batch(path, images, pool_features=pool, spatial_features=spatial)
    with np.load(path) as data:  # what the evaluator reads: arr_0, mu, sigma, mu_s, sigma_s
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_allclose(data["sigma"], np.cov(pool, rowvar=False))
        np.testing.assert_allclose(data["mu_s"], spatial.mean(axis=0))
    batch = metrics.read_batch(path)
    np.testing.assert_array_equal(batch["images"], images)
    np.testing.assert_allclose(batch["sigma_s"], np.cov(spatial, rowvar=False))
    # A batch written by other code (np.savez positional: arr_0, arr_1 = labels) reads too.
    np.savez(tmp_path / "samples.npz", images, np.arange(30))
    assert set(metrics.read_batch(tmp_path / "samples.npz")) == {"images"}


def test_bad_batches_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metrics.read_batch(tmp_path / "missing.npz")
    np.savez(tmp_path / "no_images.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="no images 'arr_0'"):
        metrics.read_batch(tmp_path / "no_images.npz")
    np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        metrics.read_batch(tmp_path / "float.npz")
    np.savez(tmp_path / "partial.npz", _rgb_images(2), mu=np.zeros(3))
    with pytest.raises(ValueError, match="expected mu and sigma"):
        metrics.read_batch(tmp_path / "partial.npz")
    with pytest.raises(ValueError, match="need the pool statistics"):
        metrics.write_batch(tmp_path / "x.npz", _rgb_images(2), spatial_features=np.ones((2, 2)))


def test_evaluation_uses_stored_reference_statistics_and_warns_when_n_is_small(
    small_stand_in_graph,
):
    graph = metrics.InceptionGraph(small_stand_in_graph, progress=False)
    ref, sample = graph(_rgb_images(40, seed=5)), graph(_rgb_images(30, seed=6))
    with pytest.warns(RuntimeWarning, match="unreliable"):
        computed = metrics.evaluate_features(ref, sample)
    mu, sigma = metrics.feature_statistics(ref["pool"])
    shift = np.zeros_like(mu)
    shift[0] = 3.0
    stored = {"mu": mu + shift, "sigma": sigma}
    with pytest.warns(RuntimeWarning):
        moved = metrics.evaluate_features(ref, sample, ref_statistics=stored)
    # Moving the stored mean by a vector s changes FID by |s|^2 + 2 s.(mu_ref - mu_sample).
    sample_mu = sample["pool"].mean(axis=0)
    expected = computed["fid"] + 9.0 + 2 * shift @ (mu - sample_mu)
    np.testing.assert_allclose(moved["fid"], expected, rtol=1e-6)
    assert moved["sfid"] == computed["sfid"] and moved["precision"] == computed["precision"]


def _run_metrics_cli(args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "tf_iddpm.metrics"] + [str(a) for a in args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_metrics_command_line_end_to_end(small_stand_in_graph, tmp_path):
    stand_in_graph = small_stand_in_graph
    images = _rgb_images(24, size=10, seed=7)
    np.savez(tmp_path / "ref.npz", images)
    np.savez(tmp_path / "samples_24x10x10x3.npz", images, np.zeros(24, np.int32))
    result = _run_metrics_cli(
        [
            tmp_path / "ref.npz",
            tmp_path / "samples_24x10x10x3.npz",
            f"--inception={stand_in_graph}",
            "--batch_size=10",
        ]
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    for name in ("Inception Score", "FID", "sFID", "Precision", "Recall", "KID"):
        assert name in lines, result.stdout
    with open(tmp_path / "samples_24x10x10x3_metrics.json") as f:
        written = json.load(f)
    # Identical batches: FID and sFID 0 up to round-off (N < D: singular covariances), precision
    # = recall = 1.
    graph = metrics.InceptionGraph(stand_in_graph, progress=False)
    features = graph(images)
    for key, name in (("pool", "fid"), ("spatial", "sfid")):
        scale = np.trace(np.cov(features[key], rowvar=False))
        assert abs(written[name]) < 1e-5 * scale, (name, written[name], scale)
    assert written["precision"] == written["recall"] == 1.0
    assert float(lines["FID"]) == written["fid"]
    assert written["inception_sha256"] == metrics.file_sha256(stand_in_graph)
    np.testing.assert_allclose(
        written["inception_score"], metrics.inception_score(features["probs"]), rtol=1e-6
    )


@pytest.mark.slow
def test_metrics_command_line_errors(tmp_path, stand_in_graph):
    np.savez(tmp_path / "ref.npz", _rgb_images(4))
    result = _run_metrics_cli(
        [tmp_path / "ref.npz", tmp_path / "ref.npz", f"--inception={tmp_path / 'missing.pb'}"]
    )
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert "inception-2015-12-05.tgz" in result.stderr
    result = _run_metrics_cli(
        [tmp_path / "ref.npz", tmp_path / "nothing.npz", f"--inception={stand_in_graph}"]
    )
    assert result.returncode == 1 and "nothing.npz' does not exist" in result.stderr


def test_a_keras_classifier_serves_as_the_feature_network(tmp_path):
    """metrics.load_graph of a .keras file: its 'features' layer for FID, 'spatial' for sFID
    (first 7 channels), softmax of its logits for IS and label agreement."""
    import keras  # pylint: disable=g-import-not-at-top

    keras.utils.set_random_seed(0)
    inputs = keras.Input([8, 8, 3])
    spatial = keras.layers.Conv2D(9, 3, padding="same", activation="relu", name="spatial")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(spatial)
    features = keras.layers.Dense(5, activation="relu", name="features")(pooled)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(features))
    path = str(tmp_path / "classifier.keras")
    model.save(path)
    network = metrics.load_graph(path)
    assert isinstance(network, metrics.ClassifierFeatures) and network.num_classes == 4
    assert metrics.load_graph(path) is network  # loaded once per process
    images = np.random.default_rng(0).integers(0, 256, [6, 8, 8, 3]).astype(np.uint8)
    out = network(images)
    x = images.astype(np.float32) / 127.5 - 1.0
    direct = keras.Model(inputs, [features, spatial, model.outputs[0]]).predict(x, verbose=0)
    np.testing.assert_allclose(out["pool"], direct[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out["spatial"], direct[1][..., :7].reshape(6, -1), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(out["probs"].sum(1), 1.0, rtol=1e-5)
    labels = np.argmax(direct[2], axis=1)
    assert metrics.label_agreement(out["probs"], labels) == 1.0
    assert metrics.label_agreement(out["probs"], (labels + 1) % 4) == 0.0
    unnamed = keras.Model(inputs, keras.layers.Dense(4)(pooled))
    unnamed.save(str(tmp_path / "plain.keras"))
    with pytest.raises(ValueError, match=r"no layer\(s\) \['features'\]"):
        metrics.ClassifierFeatures(str(tmp_path / "plain.keras"))
