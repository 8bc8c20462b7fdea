"""Tests for tf_iddpm.data, tf_iddpm.data_sources and tf_iddpm.digits_dataset (all offline).

Every data_dir is under tmp_path; nothing is downloaded.
"""

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
from numpy import testing as npt
from PIL import Image
import pytest
from sklearn.datasets import load_digits
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import base
from tf_iddpm import data
from tf_iddpm import data_sources
from tf_iddpm import digits_dataset
from tf_iddpm import image_utils


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    digits_dataset.prepare_digits(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def sklearn_digits():
    digits = load_digits()
    return digits_dataset.digits_to_uint8(digits.images), digits.target


def _config(**overrides):
    config = base.get_config().data
    config.update(overrides)
    return config


def _digits_config(digits_dir, **overrides):
    return _config(data_dir=digits_dir, **{"image_size": 16, **overrides})


def _expected_digit(pixels_8x8, size):
    """A digit as the pipeline should deliver it: bicubic upscale, gray -> RGB, [-1, 1]."""
    resized = image_utils.center_crop_and_resize(pixels_8x8, size)
    return np.repeat(resized, 3, axis=-1).astype(np.float32) / np.float32(127.5) - 1


def _key(image):
    return np.asarray(image).tobytes()


# ------------------------------------------------------------------------------------------------
# The digits builder
# ------------------------------------------------------------------------------------------------


def test_digits_to_uint8_maps_0_16_to_0_255():
    npt.assert_array_equal(
        digits_dataset.digits_to_uint8([0, 1, 8, 15, 16]), [0, 16, 128, 239, 255]
    )


@pytest.mark.parametrize("split,start,stop", [("train", 0, 1500), ("test", 1500, 1797)])
def test_digits_builder_serves_sklearn_values(digits_dir, sklearn_digits, split, start, stop):
    images, labels = sklearn_digits
    builder = digits_dataset.prepare_digits(digits_dir)
    assert builder.name == "iddpm_digits"
    assert builder.info.splits[split].num_examples == stop - start
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    served_images = np.stack([example["image"] for example in examples])
    served_labels = np.array([example["label"] for example in examples])
    assert served_images.shape == (stop - start, 8, 8, 1) and served_images.dtype == np.uint8
    npt.assert_array_equal(served_images[..., 0], images[start:stop])
    npt.assert_array_equal(served_labels, labels[start:stop])


def test_digits_prepared_only_once(digits_dir):
    info_file = os.path.join(digits_dir, "iddpm_digits", "1.0.0", "dataset_info.json")
    before = os.stat(info_file).st_mtime_ns
    assert digits_dataset.prepare_digits(digits_dir).is_prepared()
    assert os.stat(info_file).st_mtime_ns == before


# ------------------------------------------------------------------------------------------------
# Training pipeline
# ------------------------------------------------------------------------------------------------


def test_train_batches_are_real_digits_with_labels_and_low_res(digits_dir, sklearn_digits):
    images, labels = sklearn_digits
    config = _digits_config(digits_dir, class_cond=True, num_classes=10, low_res_size=8)
    batch = next(iter(data.make_train_dataset(config, batch_size=32)))
    assert set(batch) == {"image", "label", "low_res"}
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == tf.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == tf.int32
    assert batch["low_res"].shape == (32, 8, 8, 3) and batch["low_res"].dtype == tf.float32
    image = batch["image"].numpy()
    assert image.min() == -1.0 and image.max() == 1.0
    npt.assert_array_equal(image[..., 0], image[..., 2])  # Grayscale replicated.
    # Every example is one of the 1500 training digits, with its own label.
    expected = {_key(_expected_digit(images[i], 16)): labels[i] for i in range(1500)}
    for example_image, label in zip(image, batch["label"].numpy()):
        assert expected[_key(example_image)] == label
    # low_res is the 2x2 area average of the [-1, 1] target (reference super_res_train.py).
    block_mean = image.reshape(32, 8, 2, 8, 2, 3).mean(axis=(2, 4))
    npt.assert_allclose(batch["low_res"].numpy(), block_mean, atol=1e-6)


def test_train_pipeline_without_labels_or_low_res_yields_only_images(digits_dir):
    config = _digits_config(digits_dir, num_channels=1)
    batch = next(iter(data.make_train_dataset(config, batch_size=4)))
    assert set(batch) == {"image"} and batch["image"].shape == (4, 16, 16, 1)


def test_train_pipeline_is_deterministic_given_seed(digits_dir):
    config = _digits_config(digits_dir, image_size=8, random_flip=True)

    def first_batches(seed):
        dataset = data.make_train_dataset(config, batch_size=16, seed=seed)
        return np.stack([batch["image"].numpy() for batch in dataset.take(3)])

    npt.assert_array_equal(first_batches(7), first_batches(7))
    assert not np.array_equal(first_batches(7), first_batches(8))


def test_random_flip_mirrors_some_images(digits_dir, sklearn_digits):
    images, _ = sklearn_digits
    config = _digits_config(digits_dir, image_size=8, train_split="train[:64]", random_flip=True)
    originals = {_key(_expected_digit(images[i], 8)) for i in range(64)}
    mirrored = {_key(_expected_digit(images[i], 8)[:, ::-1]) for i in range(64)}
    batch = next(iter(data.make_train_dataset(config, batch_size=64)))["image"].numpy()
    kinds = [(_key(image) in originals, _key(image) in mirrored) for image in batch]
    assert all(is_original or is_mirror for is_original, is_mirror in kinds)
    assert sum(is_original and not is_mirror for is_original, is_mirror in kinds) > 10
    assert sum(is_mirror and not is_original for is_original, is_mirror in kinds) > 10


def test_distribute_datasets_from_function_gives_per_replica_batches(digits_dir):
    config = _digits_config(digits_dir, image_size=8)
    strategy = tf.distribute.get_strategy()
    distributed = strategy.distribute_datasets_from_function(
        lambda context: data.make_train_dataset(
            config, batch_size=context.get_per_replica_batch_size(12), input_context=context
        )
    )
    assert next(iter(distributed))["image"].shape == (12, 8, 8, 3)


# ------------------------------------------------------------------------------------------------
# Training data order: a pure function of (seed, step), for every source and replica layout
# ------------------------------------------------------------------------------------------------

ORDER_NUM_EXAMPLES = 40  # Every order source has 40 training examples.
ORDER_SOURCES = [
    "digits",  # memory: decoded once, indexed by the permutation
    "digits_tfrecord_stream",  # TFRecord stream (over the memory limit); two file instructions
    "tfds_array_record",  # TFDS prepared as ArrayRecord: random access
    "tfds_mock",  # a named TFDS dataset under tfds.testing.mock_data: memory
    "folder",  # memory
    "folder_random_access",  # decode the file at the permuted index
]


@pytest.fixture(scope="module")
def array_record_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds_array_record"))
    builder = tfds.builder(
        digits_dataset.DIGITS_BUILDER_NAME, data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def order_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("order_folder")
    rng = np.random.default_rng(2)
    for i in range(ORDER_NUM_EXAMPLES):
        array = rng.integers(0, 256, [8, 8, 3], dtype=np.uint8)
        Image.fromarray(array).save(str(root / f"c{i % 3}_{i:02d}.png"))
    return str(root)


@pytest.fixture(params=ORDER_SOURCES)
def order_source(
    request, digits_dir, array_record_dir, order_folder, tmp_path, monkeypatch, caplog
):
    """``(config, mechanism)``; the test must log that it read the order by ``mechanism``."""
    kind = request.param
    small = {"image_size": 8, "random_flip": True}
    if kind in ("digits_tfrecord_stream", "tfds_array_record", "folder_random_access"):
        monkeypatch.setattr(data, "_CACHE_LIMIT_BYTES", 0)  # Too large for memory.
    with contextlib.ExitStack() as stack:
        if kind == "digits":
            config = _digits_config(digits_dir, train_split="train[:40]", **small)
            mechanism = "memory"
        elif kind == "digits_tfrecord_stream":
            config = _digits_config(
                digits_dir, train_split="train[:20]+train[30:50]", shuffle_buffer=16, **small
            )
            mechanism = "stream"
        elif kind == "tfds_array_record":
            config = _config(
                name=digits_dataset.DIGITS_BUILDER_NAME,
                data_dir=array_record_dir,
                train_split="train[:40]",
                **small,
            )
            mechanism = "random_access"
        elif kind == "tfds_mock":
            stack.enter_context(tfds.testing.mock_data(num_examples=ORDER_NUM_EXAMPLES))
            config, mechanism = _config(name="cifar10", data_dir=str(tmp_path), **small), "memory"
        elif kind == "folder":
            config, mechanism = _config(name="folder", folder=order_folder, **small), "memory"
        else:
            config = _config(name="folder", folder=order_folder, **small)
            mechanism = "random_access"
        stack.enter_context(caplog.at_level("INFO", logger="absl"))
        yield config, mechanism
    messages = [record.getMessage() for record in caplog.get_records("call")]
    assert any(f"training order {mechanism!r}" in message for message in messages)


def _train_images(config, *, batch_size, steps, **kwargs):
    """``[steps, batch_size, H, W, C]``: the first ``steps`` batches of a training pipeline."""
    dataset = data.make_train_dataset(config, batch_size=batch_size, **kwargs)
    return np.stack([batch["image"] for batch in dataset.take(steps).as_numpy_iterator()])


def test_train_order_resumes_exactly_across_epochs(order_source):
    config, _ = order_source
    # 10 steps of 6 = 60 positions; epoch 0 ends inside step 6 (positions 36..41).
    uninterrupted = _train_images(config, batch_size=6, steps=10, seed=3)
    for start_step in (1, 5, 7):  # inside epoch 0, just before the boundary, inside epoch 1
        resumed = _train_images(
            config, batch_size=6, steps=10 - start_step, seed=3, start_step=start_step
        )
        npt.assert_array_equal(resumed, uninterrupted[start_step:])


def test_train_order_is_a_permutation_per_epoch(order_source):
    config, _ = order_source
    config.random_flip = False  # So every image is exactly one split example.
    split, _ = _collect(data.make_eval_dataset(config, batch_size=8, split=config.train_split))
    index_of = {_key(image): i for i, image in enumerate(split["image"][split["mask"]])}
    assert len(index_of) == ORDER_NUM_EXAMPLES  # The examples are distinct.

    def order(seed):
        images = _train_images(config, batch_size=8, steps=10, seed=seed)
        return [index_of[_key(image)] for image in images.reshape(80, *images.shape[2:])]

    first, second = order(0)[:40], order(0)[40:]
    assert sorted(first) == sorted(second) == list(range(ORDER_NUM_EXAMPLES))
    assert first != second
    assert order(1)[:40] != first


@pytest.mark.parametrize("num_pipelines,num_replicas", [(2, 2), (1, 2), (2, 4)])
def test_input_pipelines_together_read_the_global_batch(order_source, num_pipelines, num_replicas):
    config, _ = order_source
    batch_size, steps, start_step = 3, 3, 4
    global_batches = _train_images(
        config, batch_size=batch_size * num_replicas, steps=steps, seed=5, start_step=start_step
    )
    local_replicas = num_replicas // num_pipelines
    per_pipeline = []
    for pipeline_id in range(num_pipelines):
        context = tf.distribute.InputContext(num_pipelines, pipeline_id, num_replicas)
        images = _train_images(
            config,
            batch_size=batch_size,
            steps=steps * local_replicas,
            seed=5,
            start_step=start_step,
            input_context=context,
        )
        # Consecutive batches of a pipeline go to its local replicas in turn.
        per_pipeline.append(images.reshape(steps, local_replicas * batch_size, *images.shape[2:]))
    npt.assert_array_equal(np.concatenate(per_pipeline, axis=1), global_batches)


def test_folder_order_is_the_same_in_memory_and_by_file(order_folder, monkeypatch):
    config = _config(name="folder", folder=order_folder, image_size=8, random_flip=True)
    in_memory = _train_images(config, batch_size=7, steps=8, seed=4)
    monkeypatch.setattr(data, "_CACHE_LIMIT_BYTES", 0)
    npt.assert_array_equal(_train_images(config, batch_size=7, steps=8, seed=4), in_memory)


# The per-replica batches of MirroredStrategy over 2 logical CPUs next to the global batches of
# one single-device pipeline, for the memory and the TFRecord-stream orders. Logical devices must
# exist before TensorFlow initialises, hence a fresh interpreter.
_MIRRORED_ORDER_SCRIPT = textwrap.dedent("""
    import json, sys
    from tf_iddpm import distribute
    distribute.split_cpu(2)
    import numpy as np
    import tensorflow as tf
    from configs import base
    from tf_iddpm import data

    data_dir, out_path = json.loads(sys.argv[1])
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    for name, limit in (("memory", data._CACHE_LIMIT_BYTES), ("stream", 0)):
        data._CACHE_LIMIT_BYTES = limit
        config = base.get_config().data
        config.update(data_dir=data_dir, image_size=8, train_split="train[:40]",
                      random_flip=True, shuffle_buffer=16)
        make = lambda batch_size, context=None: data.make_train_dataset(
            config, batch_size=batch_size, input_context=context, seed=5, start_step=3)
        results[name + "/global"] = np.stack(
            [batch["image"] for batch in make(6).take(4).as_numpy_iterator()])
        iterator = iter(strategy.distribute_datasets_from_function(
            lambda context: make(context.get_per_replica_batch_size(6), context)))
        results[name + "/replicas"] = np.stack([
            np.stack([replica.numpy() for replica in
                      strategy.experimental_local_results(next(iterator)["image"])])
            for _ in range(4)])
    np.savez(out_path, **results)
""")


@pytest.mark.slow
def test_mirrored_replicas_see_slices_of_the_global_batch(digits_dir, tmp_path):
    out_path = str(tmp_path / "order.npz")
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(
        PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]), TF_CPP_MIN_LOG_LEVEL="2"
    )
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_ORDER_SCRIPT, json.dumps([digits_dir, out_path])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    results = np.load(out_path)
    for name in ("memory", "stream"):
        global_batches, replicas = results[name + "/global"], results[name + "/replicas"]
        assert global_batches.shape == (4, 6, 8, 8, 3) and replicas.shape == (4, 2, 3, 8, 8, 3)
        # Replica r of step s holds positions [6 s + 3 r, 6 s + 3 r + 3) of the global batch.
        npt.assert_array_equal(replicas.reshape(global_batches.shape), global_batches)
    assert not np.array_equal(results["memory/global"], results["stream/global"])


# ------------------------------------------------------------------------------------------------
# Evaluation pipeline
# ------------------------------------------------------------------------------------------------


def _collect(dataset):
    batches = list(dataset)
    joined = {key: np.concatenate([batch[key].numpy() for batch in batches]) for key in batches[0]}
    return joined, len(batches)


def test_eval_visits_every_example_once_with_padding(digits_dir, sklearn_digits):
    images, labels = sklearn_digits
    config = _digits_config(digits_dir, class_cond=True, num_classes=10)
    dataset = data.make_eval_dataset(config, batch_size=40)  # 297 = 7 * 40 + 17
    assert int(dataset.cardinality()) == 8
    seen, num_batches = _collect(dataset)
    assert num_batches == 8 and seen["mask"].dtype == bool and seen["index"].dtype == np.int64
    npt.assert_array_equal(seen["mask"], np.arange(320) < 297)
    npt.assert_array_equal(seen["index"], np.where(np.arange(320) < 297, np.arange(320), -1))
    expected = np.stack([_expected_digit(images[1500 + i], 16) for i in range(297)])
    npt.assert_array_equal(seen["image"][:297], expected)
    npt.assert_array_equal(seen["label"][:297], labels[1500:])
    npt.assert_array_equal(seen["image"][297:], 0.0)


@pytest.mark.parametrize("replicas_per_pipeline,batches_per_pipeline", [(1, 4), (2, 4)])
def test_eval_is_sharded_over_input_pipelines_exactly_once(
    digits_dir, replicas_per_pipeline, batches_per_pipeline
):
    config = _digits_config(digits_dir, image_size=8)
    indices = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(2, pipeline_id, 2 * replicas_per_pipeline)
        dataset = data.make_eval_dataset(config, batch_size=40, input_context=context)
        seen, num_batches = _collect(dataset)
        # 297 examples in global steps of 40 * replicas: every pipeline gets the same number of
        # full batches (a multiple of its replicas), so no replica waits or gets a partial step.
        assert num_batches == batches_per_pipeline
        indices.append(seen["index"][seen["mask"]])
        npt.assert_array_equal(seen["index"][~seen["mask"]], -1)
    npt.assert_array_equal(np.sort(np.concatenate(indices)), np.arange(297))
    # Global batch order: replica r of a step gets positions [40 r, 40 r + 40).
    local = 40 * replicas_per_pipeline
    npt.assert_array_equal(indices[0][:local], np.arange(local))
    npt.assert_array_equal(indices[1][:local], np.arange(local, 2 * local))


def test_eval_pads_to_a_multiple_of_local_replicas(digits_dir):
    context = tf.distribute.InputContext(1, 0, 2)  # One pipeline feeding two replicas.
    config = _digits_config(digits_dir, image_size=8)
    seen, num_batches = _collect(
        data.make_eval_dataset(config, batch_size=64, input_context=context)
    )
    assert num_batches == 6  # ceil(297 / 128) = 3 steps of 2 batches.
    npt.assert_array_equal(seen["index"][seen["mask"]], np.arange(297))


def test_eval_num_examples_limits_to_the_first_ones(digits_dir):
    config = _digits_config(digits_dir)
    seen, num_batches = _collect(
        data.make_eval_dataset(config, batch_size=16, split="train", num_examples=50)
    )
    assert num_batches == 4
    npt.assert_array_equal(seen["index"][seen["mask"]], np.arange(50))


def test_dataset_num_examples(digits_dir):
    config = _digits_config(digits_dir)
    assert data_sources.dataset_num_examples(config, "train") == 1500
    assert data_sources.dataset_num_examples(config, "test") == 297
    assert data_sources.dataset_num_examples(config, "train[:10%]") == 150


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------


def _write_image(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    arrays = {
        "cat_1.png": rng.integers(0, 256, [20, 12, 3], dtype=np.uint8),
        "nested/dog_2.png": rng.integers(0, 256, [16, 16, 3], dtype=np.uint8),
        "nested/deeper/cat_3.png": rng.integers(0, 256, [8, 8], dtype=np.uint8),  # grayscale
        "bird_x.jpg": rng.integers(0, 256, [12, 12, 3], dtype=np.uint8),
        "nested/bird_y.JPEG": rng.integers(0, 256, [32, 24, 3], dtype=np.uint8),
    }
    for name, array in arrays.items():
        _write_image(str(root / name), array)
    (root / "nested" / "cat_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.txt").write_text("not an image, and not listed")
    return root, arrays


def test_folder_source_labels_from_prefixes_and_skips_bad_files(image_folder, caplog):
    root, arrays = image_folder
    config = _config(name="folder", folder=str(root), image_size=8, class_cond=True, num_classes=3)
    with caplog.at_level("WARNING"):
        seen, _ = _collect(data.make_eval_dataset(config, batch_size=8))
        data_sources.validate_data_config(config)  # Same bad files: no second warning.
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "1 of 6 files" in warnings[0] and "cat_broken.png" in warnings[0]
    # Sorted paths; labels are sorted prefixes: bird 0, cat 1, dog 2.
    order = [
        "bird_x.jpg",
        "cat_1.png",
        "nested/bird_y.JPEG",
        "nested/deeper/cat_3.png",
        "nested/dog_2.png",
    ]
    npt.assert_array_equal(seen["mask"], [True] * 5 + [False] * 3)
    npt.assert_array_equal(seen["label"][:5], [0, 1, 0, 1, 2])
    pixels = image_utils.denormalize_images(seen["image"][:5], round_to_nearest=True).numpy()
    for got, name in zip(pixels, order):
        if name.endswith(".png"):  # Lossless, so the exact pixels are known.
            expected = image_utils.center_crop_and_resize(arrays[name], 8)
            if expected.shape[-1] == 1:
                expected = np.repeat(expected, 3, axis=-1)
            npt.assert_array_equal(got, expected)
    assert data_sources.dataset_num_examples(config, "train") == 5


def test_folder_source_strict_refuses_bad_files(image_folder):
    root, _ = image_folder
    config = _config(name="folder", folder=str(root), image_size=8, strict=True)
    with pytest.raises(data_sources.DataSourceError, match=r"cat_broken\.png.*strict is True"):
        data.make_train_dataset(config, batch_size=2)


def test_folder_training_batches(image_folder):
    root, _ = image_folder
    config = _config(
        name="folder",
        folder=str(root),
        image_size=16,
        class_cond=True,
        num_classes=3,
        low_res_size=8,
    )
    batch = next(iter(data.make_train_dataset(config, batch_size=3)))
    assert batch["image"].shape == (3, 16, 16, 3) and batch["low_res"].shape == (3, 8, 8, 3)
    assert set(batch["label"].numpy()) <= {0, 1, 2}


def test_folder_train_and_test_subfolders_are_splits(tmp_path):
    rng = np.random.default_rng(1)
    for name in ["train/a_1.png", "train/b_1.png", "train/b_2.png", "test/c_1.png"]:
        _write_image(str(tmp_path / name), rng.integers(0, 256, [8, 8, 3], dtype=np.uint8))
    config = _config(
        name="folder", folder=str(tmp_path), image_size=8, class_cond=True, num_classes=3
    )
    assert data_sources.dataset_num_examples(config, "train") == 3
    assert data_sources.dataset_num_examples(config, "test") == 1
    seen, _ = _collect(data.make_eval_dataset(config, batch_size=2))
    npt.assert_array_equal(seen["label"][seen["mask"]], [2])  # Ids agree across splits: c = 2.


# ------------------------------------------------------------------------------------------------
# Named TFDS datasets (mocked: no download)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [32, 16])
def test_named_tfds_dataset_cifar10(tmp_path, image_size):
    config = _config(
        name="cifar10",
        data_dir=str(tmp_path),
        image_size=image_size,
        class_cond=True,
        num_classes=10,
    )
    with tfds.testing.mock_data(num_examples=10):
        batch = next(iter(data.make_train_dataset(config, batch_size=4)))
        seen, num_batches = _collect(data.make_eval_dataset(config, batch_size=4))
    assert batch["image"].shape == (4, image_size, image_size, 3)
    assert batch["label"].dtype == tf.int32
    assert -1.0 <= batch["image"].numpy().min() and batch["image"].numpy().max() <= 1.0
    assert num_batches == 3
    npt.assert_array_equal(seen["index"][seen["mask"]], np.arange(10))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_unknown_tfds_name_suggests_close_names(tmp_path):
    with pytest.raises(data_sources.DataSourceError, match=r"Unknown dataset.*'cifar11'.*cifar10"):
        data.make_train_dataset(_config(name="cifar11", data_dir=str(tmp_path)), batch_size=2)


def test_unknown_tfds_builder_config(tmp_path):
    message = r"TFDS cannot load.*'imagenet_resized/65x65'.*64x64"
    with pytest.raises(data_sources.DataSourceError, match=message) as error:
        config = _config(name="imagenet_resized/65x65", data_dir=str(tmp_path))
        data.make_train_dataset(config, batch_size=2)
    assert "\n" not in str(error.value)  # TFDS's own message is folded into the one line.


def test_known_but_unprepared_tfds_dataset(tmp_path):
    message = r"'mnist' is known but not prepared.*tfds build mnist"
    with pytest.raises(data_sources.DataSourceError, match=message) as error:
        data.make_train_dataset(_config(name="mnist", data_dir=str(tmp_path)), batch_size=2)
    assert str(tmp_path) in str(error.value)


def test_folder_missing_or_empty(tmp_path):
    with pytest.raises(data_sources.DataSourceError, match="does not exist"):
        data.make_train_dataset(_config(name="folder", folder=str(tmp_path / "nope")), batch_size=2)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(data_sources.DataSourceError) as error:
        data.make_train_dataset(
            _config(name="folder", folder=str(tmp_path / "empty")), batch_size=2
        )
    assert str(error.value) == (
        f"config.data.folder={str(tmp_path / 'empty')!r} holds no image files: files ending in "
        ".png, .jpg or .jpeg (any case) are read, in the folder and all its subfolders. Put the "
        "images there, or set config.data.folder to the folder that holds them."
    )
    # A field error is the config's (config_utils.data_field_errors), not a data problem.
    with pytest.raises(ValueError, match="data.name='folder' needs data.folder") as error:
        data.make_train_dataset(_config(name="folder", folder=""), batch_size=2)
    assert not isinstance(error.value, data_sources.DataSourceError)


def test_empty_split_folder(tmp_path):
    _write_image(str(tmp_path / "a_1.png"), np.zeros([8, 8, 3], np.uint8))
    (tmp_path / "test").mkdir()
    config = _config(name="folder", folder=str(tmp_path), image_size=8)
    assert data_sources.dataset_num_examples(config, "train") == 1  # no train/: the whole folder
    message = r"Split folder '.*/test' holds no image files \(\.png, \.jpg or \.jpeg"
    with pytest.raises(data_sources.DataSourceError, match=message):
        data_sources.validate_data_config(config)


@pytest.mark.parametrize("strict", [False, True])
def test_folder_of_only_unreadable_files(tmp_path, caplog, strict):
    for name in ("a_1.png", "b_2.jpg", "nested/c_3.png"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(f"text, not an image: {name}")
    config = _config(name="folder", folder=str(tmp_path), strict=strict)
    with caplog.at_level("WARNING"), pytest.raises(data_sources.DataSourceError) as error:
        data.make_eval_dataset(config, batch_size=2)
    message = str(error.value)
    assert message.startswith(
        f"image folder {str(tmp_path)!r} has no readable images: all 3 of its image files fail "
        f"to decode, e.g. {tmp_path / 'a_1.png'} (UnidentifiedImageError: cannot identify image "
    )
    assert message.endswith(
        "The files ending in .png, .jpg or .jpeg (any case) must be images that Pillow can read."
    )
    assert "\n" not in message
    # The error says it all: no warning about skipping them first.
    assert not [record for record in caplog.records if "Skipping" in record.getMessage()]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("image_size", 12, "multiple of 8"),
        ("image_size", 0, "multiple of 8"),
        ("num_channels", 2, "num_channels=2 must be one of"),
        ("low_res_size", 16, r"low_res_size=16 must be 0"),
        ("shuffle_buffer", 0, "shuffle_buffer=0 must be a positive int"),
        ("name", "", "data.name='' must be"),
    ],
)
def test_bad_config_fields(tmp_path, field, value, message):
    config = _config(data_dir=str(tmp_path), image_size=16)
    config[field] = value
    with pytest.raises(ValueError, match=message) as error:
        data_sources.validate_data_config(config)
    assert not isinstance(error.value, data_sources.DataSourceError)
    assert not os.listdir(tmp_path)  # Checked before the digits are prepared.


def test_labels_required_but_absent(tmp_path):
    config = _config(
        name="lsun/bedroom", data_dir=str(tmp_path), image_size=16, class_cond=True, num_classes=1
    )
    message = "class_cond is True but TFDS 'lsun/bedroom'.*no class labels"
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(data_sources.DataSourceError, match=message):
            data.make_train_dataset(config, batch_size=2)


def test_num_classes_mismatch(digits_dir):
    message = "num_classes=5 does not match the 10 classes"
    with pytest.raises(data_sources.DataSourceError, match=message):
        data_sources.validate_data_config(
            _digits_config(digits_dir, class_cond=True, num_classes=5)
        )


def test_rgb_to_grayscale_refused(tmp_path):
    config = _config(name="cifar10", data_dir=str(tmp_path), num_channels=1)
    with tfds.testing.mock_data(num_examples=2):
        message = "RGB images but config.data.num_channels is 1"
        with pytest.raises(data_sources.DataSourceError, match=message):
            data.make_train_dataset(config, batch_size=2)


def test_unknown_split_lists_available(digits_dir):
    message = r"Split 'validation' is not available in digits.*\['test', 'train'\]"
    with pytest.raises(data_sources.DataSourceError, match=message):
        data.make_eval_dataset(_digits_config(digits_dir), batch_size=2, split="validation")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"batch_size": 2, "seed": -1}, "seed must be a non-negative int"),
        ({"batch_size": 2, "start_step": -1}, "start_step must be a non-negative int"),
        ({"batch_size": 2, "start_step": 1.0}, "start_step must be a non-negative int"),
        (
            {"batch_size": 2, "input_context": tf.distribute.InputContext(2, 0, 3)},
            "num_replicas_in_sync=3 is not a multiple of num_input_pipelines=2",
        ),
    ],
)
def test_bad_train_arguments(digits_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.make_train_dataset(_digits_config(digits_dir), **kwargs)


def test_bad_eval_num_examples(digits_dir):
    with pytest.raises(ValueError, match="num_examples must be an int >= 0"):
        data.make_eval_dataset(_digits_config(digits_dir), batch_size=2, num_examples=-3)
