"""Tests for tf_iddpm.metrics: the Fréchet distance and the Inception feature extractor."""

import os

import keras
import numpy as np
import pytest

from tf_iddpm import metrics

# Keras' own saving code converts variables with np.array(..., copy=False), which numpy 2 warns
# about; the warning is Keras', not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


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
    return (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
            - 2.0 * np.sum(np.sqrt(np.clip(middle, 0, None))))


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


def test_frechet_distance_without_scipy_matches_scipy(monkeypatch):
    rng = np.random.default_rng(8)
    mu1, mu2 = rng.normal(size=30), rng.normal(size=30)
    sigma1, sigma2 = _random_covariance(rng, 30), _random_covariance(rng, 30, rank=10)
    with_scipy = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    monkeypatch.setattr(metrics, "_scipy_linalg", None)
    without_scipy = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    # sigma2 has 20 zero eigenvalues; square roots of their round-off (~1e-8 each) bound the
    # agreement, hence rtol 1e-8 rather than 1e-9.
    np.testing.assert_allclose(without_scipy, with_scipy, rtol=1e-8)
    np.testing.assert_allclose(without_scipy, _general_closed_form(mu1, sigma1, mu2, sigma2),
                               rtol=1e-8)


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
    expected = (_diagonal_closed_form(mu1, var1, mu2, var2)
                + 2.0 * np.sum(np.sqrt(var1 * var2) - np.sqrt((var1 + eps) * (var2 + eps))))
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
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError,
                                                     match="imaginary component of 0.1"):
        metrics.frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2)


@pytest.mark.parametrize("args,message", [
    ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), r"sigma1 must be a \[D, D\] = \(3, 3\)"),
    ((np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)), r"mu1 has shape \(3,\), mu2 has shape"),
    ((np.zeros((2, 2)), np.eye(2), np.zeros(2), np.eye(2)), r"mu1 must be a vector \[D\]"),
])
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


def test_statistics_npz_round_trip(tmp_path):
    rng = np.random.default_rng(10)
    mu, sigma = rng.normal(size=4), _random_covariance(rng, 4)
    metrics.save_statistics(tmp_path / "stats.npz", mu, sigma)
    loaded_mu, loaded_sigma = metrics.load_statistics(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"has no \['mu', 'sigma'\] arrays"):
        metrics.load_statistics(tmp_path / "images.npz")


# ---------------------------------------------------------------------------------------------
# Inception feature extractor (with small stand-in networks; no Inception weights needed)


def _stand_in_network(pool=True):
    """Any network from 299x299x3 images to features: a strided conv and a dense layer."""
    inputs = keras.Input((299, 299, 3))
    hidden = keras.layers.Conv2D(
        4, 5, strides=16, activation="tanh",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=1))(inputs)
    if pool:
        hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    outputs = keras.layers.Dense(
        6, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=2),
        bias_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=3))(hidden)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(network, path of its .keras file)."""
    network = _stand_in_network()
    path = tmp_path_factory.mktemp("stand_in") / "features.keras"
    network.save(path)
    return network, str(path)


def _random_images(seed, count, size=24):
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3),
                                                dtype=np.uint8)


@pytest.mark.parametrize("path", [None, "", os.path.join("no", "such", "inception.keras")])
def test_missing_inception_network_error_explains_how_to_get_one(path):
    with pytest.raises(FileNotFoundError) as error:
        metrics.InceptionFeatureExtractor(path)
    message = str(error.value)
    assert "FID needs a locally available Inception network" in message
    assert "nothing can be downloaded here" in message
    for accepted in ("SavedModel directory", "'.keras'", "'.h5'", "'.weights.h5'"):
        assert accepted in message
    assert ("keras.applications.InceptionV3(weights='imagenet', include_top=False, "
            "pooling='avg').save('inception.keras')") in message
    if path:
        assert repr(path) in message


def test_directory_that_is_not_a_saved_model_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a TensorFlow SavedModel"):
        metrics.InceptionFeatureExtractor(tmp_path)


def test_unsupported_file_type_is_rejected(tmp_path):
    path = tmp_path / "inception.onnx"
    path.write_bytes(b"not a network")
    with pytest.raises(ValueError, match="unsupported Inception network file .*inception.onnx"):
        metrics.InceptionFeatureExtractor(path)


def test_preprocess_resizes_to_299_and_scales_to_unit_interval():
    native = _random_images(11, 2, size=299)
    np.testing.assert_allclose(metrics.InceptionFeatureExtractor.preprocess(native).numpy(),
                               native / 127.5 - 1.0, atol=1e-6)
    constant = np.full((3, 17, 40, 3), 51, np.uint8)
    resized = metrics.InceptionFeatureExtractor.preprocess(constant).numpy()
    assert resized.shape == (3, 299, 299, 3)
    np.testing.assert_allclose(resized, 51 / 127.5 - 1.0, atol=1e-6)
    # A vertical two-level image keeps its levels at the far ends after bilinear upsampling.
    halves = np.concatenate([np.zeros((1, 8, 16, 3)), np.full((1, 8, 16, 3), 255)],
                            axis=1).astype(np.uint8)
    resized = metrics.InceptionFeatureExtractor.preprocess(halves).numpy()
    np.testing.assert_allclose(resized[0, 0], -1.0, atol=1e-6)
    np.testing.assert_allclose(resized[0, -1], 1.0, atol=1e-6)


def test_extractor_end_to_end_with_keras_file(stand_in):
    network, path = stand_in
    extractor = metrics.InceptionFeatureExtractor(path, batch_size=3)
    images = _random_images(12, 7)
    features = extractor(images)  # batches of 3, 3 and 1
    assert features.shape == (7, 6) and features.dtype == np.float64
    expected = network(metrics.InceptionFeatureExtractor.preprocess(images), training=False)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(extractor(images, batch_size=7), features, rtol=1e-5, atol=1e-6)
    # Other image sizes go through the same resize.
    assert extractor(_random_images(13, 2, size=40)).shape == (2, 6)


def test_extractor_from_saved_model_and_h5_match_keras_file(stand_in, tmp_path):
    network, path = stand_in
    images = _random_images(14, 5)
    expected = metrics.InceptionFeatureExtractor(path)(images)
    network.export(str(tmp_path / "saved_model"), verbose=False)
    from_saved_model = metrics.InceptionFeatureExtractor(tmp_path / "saved_model", batch_size=2)
    np.testing.assert_allclose(from_saved_model(images), expected, rtol=1e-5, atol=1e-6)
    network.save(tmp_path / "features.h5")  # the legacy full-model format
    from_h5 = metrics.InceptionFeatureExtractor(tmp_path / "features.h5")
    np.testing.assert_allclose(from_h5(images), expected, rtol=1e-5, atol=1e-6)


def test_extractor_average_pools_spatial_outputs(tmp_path):
    network = _stand_in_network(pool=False)
    network.save(tmp_path / "spatial.keras")
    extractor = metrics.InceptionFeatureExtractor(tmp_path / "spatial.keras")
    images = _random_images(15, 3)
    spatial = network(metrics.InceptionFeatureExtractor.preprocess(images)).numpy()
    assert spatial.ndim == 4
    np.testing.assert_allclose(extractor(images), spatial.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_extractor_loads_inception_v3_weights_files(tmp_path):
    # The layout keras.applications downloads (legacy HDF5, no classifier), written by tf_keras,
    # and the Keras 3 '.weights.h5' layout: both must give the same 2048-d features as the
    # network that wrote them.  Random weights; this checks loading, not ImageNet accuracy.
    import tf_keras

    writer = tf_keras.applications.InceptionV3(weights=None, include_top=False, pooling="avg")
    writer.save_weights(str(tmp_path / "inception_notop.h5"))
    images = _random_images(16, 2, size=32)
    expected = writer(metrics.InceptionFeatureExtractor.preprocess(images), training=False)

    extractor = metrics.InceptionFeatureExtractor(tmp_path / "inception_notop.h5")
    features = extractor(images)
    assert features.shape == (2, 2048)
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-7)

    keras_inception = keras.applications.InceptionV3(weights=str(tmp_path / "inception_notop.h5"),
                                                     include_top=False, pooling="avg")
    keras_inception.save_weights(str(tmp_path / "inception.weights.h5"))
    from_weights_h5 = metrics.InceptionFeatureExtractor(tmp_path / "inception.weights.h5")
    np.testing.assert_allclose(from_weights_h5(images), features, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("images", [
    np.zeros((2, 8, 8, 3), np.float32),
    np.zeros((2, 8, 8, 1), np.uint8),
    np.zeros((8, 8, 3), np.uint8),
])
def test_extractor_rejects_bad_images(stand_in, images):
    extractor = metrics.InceptionFeatureExtractor(stand_in[1])
    with pytest.raises(ValueError, match=r"images must be a uint8 array \[N, H, W, 3\]"):
        extractor(images)


# ---------------------------------------------------------------------------------------------
# compute_fid


def test_compute_fid_from_images_arrays_and_npz_files(stand_in, tmp_path):
    extractor = metrics.InceptionFeatureExtractor(stand_in[1], batch_size=4)
    samples, reference = _random_images(17, 10), _random_images(18, 12)
    samples[:, :12] = 255  # make the two sets differ
    expected = metrics.frechet_distance(*metrics.feature_statistics(extractor(samples)),
                                        *metrics.feature_statistics(extractor(reference)))
    assert expected > 0.1

    np.testing.assert_allclose(metrics.compute_fid(samples, reference, extractor), expected,
                               rtol=1e-10)
    assert abs(metrics.compute_fid(samples, samples, extractor)) < 1e-8

    # Samples as run.py --mode=sample writes them; reference as images, statistics or a tuple.
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.zeros(10, np.int64))
    np.savez(tmp_path / "reference_images.npz", arr_0=reference)
    reference_stats = metrics.compute_statistics(reference, extractor)
    metrics.save_statistics(tmp_path / "reference_stats.npz", *reference_stats)
    for reference_source in (str(tmp_path / "reference_images.npz"),
                             tmp_path / "reference_stats.npz", reference_stats):
        got = metrics.compute_fid(str(tmp_path / "samples.npz"), reference_source, extractor)
        np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_compute_fid_uses_mu_sigma_of_a_virtual_reference_batch(stand_in, tmp_path):
    # guided-diffusion's VIRTUAL_*.npz holds images (arr_0) and their statistics (mu, sigma,
    # mu_s, sigma_s); the stored mu/sigma are used, not recomputed from the images.
    extractor = metrics.InceptionFeatureExtractor(stand_in[1])
    samples = _random_images(19, 6)
    stored_mu, stored_sigma = np.full(6, 3.0), 2.0 * np.eye(6)
    np.savez(tmp_path / "VIRTUAL_test.npz", arr_0=_random_images(20, 6), mu=stored_mu,
             sigma=stored_sigma, mu_s=np.zeros(7), sigma_s=np.eye(7))
    expected = metrics.frechet_distance(*metrics.feature_statistics(extractor(samples)),
                                        stored_mu, stored_sigma)
    got = metrics.compute_fid(samples, tmp_path / "VIRTUAL_test.npz", extractor)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_compute_fid_bad_reference_files_raise(stand_in, tmp_path):
    extractor = metrics.InceptionFeatureExtractor(stand_in[1])
    samples = _random_images(21, 3)
    np.savez(tmp_path / "other.npz", features=np.zeros((3, 6)))
    with pytest.raises(ValueError, match=r"holds neither images \('arr_0'\) nor statistics"):
        metrics.compute_fid(samples, tmp_path / "other.npz", extractor)
    with pytest.raises(ValueError, match="reference path must be an .npz file"):
        metrics.compute_fid(samples, str(tmp_path / "stats.json"), extractor)
    with pytest.raises(ValueError, match=r"features must be an \[N, D\] array with N >= 2"):
        metrics.compute_fid(samples[:1], samples, extractor)
