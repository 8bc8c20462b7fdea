"""Input pipelines: training (shuffled, repeated, per-replica batches) and evaluation (one pass).

Everything is driven by ``config.data`` (see ``configs/base.py``). There are three sources:

* **any TFDS name** (``"cifar10"``, ``"imagenet_resized/64x64"``, ``"lsun/bedroom"``, ...): read
  from ``data.data_dir`` (``""`` = the TFDS default). Only data that are already prepared are
  used; nothing is downloaded. Images of another size are resized with
  :func:`tf_iddpm.image_utils.center_crop_and_resize` (improved-diffusion's BOX halving, then
  BICUBIC, then a centre crop).
* **``"folder"``**: every ``.png``/``.jpg``/``.jpeg`` below ``data.folder`` (recursive, sorted).
  The class label is the file name's prefix before the first ``_``; the sorted distinct prefixes
  get ids ``0..K-1`` (improved-diffusion's ``image_datasets.py``). Ids are computed over the whole
  folder, so they agree across splits. If ``data.folder/<split>/`` is a directory (e.g. ``train/``
  and ``test/``), that split reads only it; otherwise every split reads the whole folder. All
  files are decoded once when the pipeline is built. Unreadable files are then skipped, with
  one warning that counts and names them, or refused with a ``ValueError`` when
  ``data.strict``.
* **``"digits"``** (the offline default): scikit-learn's 8x8 handwritten digits through our
  TFDS builder :class:`tf_iddpm.digits_dataset.IddpmDigits`. It is prepared into ``data_dir``
  on first use. The digits are upscaled with the same crop-and-resize (BICUBIC), which gives
  smooth strokes that look like handwriting; NEAREST would give 8x8 blocks. Grayscale is
  replicated to 3 channels when ``num_channels == 3``.

Every example becomes ``{"image": float32 [H, W, C] in [-1, 1]}``
(:func:`tf_iddpm.image_utils.normalize_images`). It also gets ``"label"`` (int32) when
``class_cond``, and ``"low_res"`` (area-downsampled image, float32 ``[h, w, C]``) when
``low_res_size > 0``. The low-res image is the area average of the normalised target, as in
improved-diffusion's ``super_res_train.py``.

The configuration and the source (name, prepared data, split, labels, channels) are checked
before any pipeline is built. Problems raise ``ValueError``s that say what is wrong and what
is allowed.
"""

import concurrent.futures
import dataclasses
import difflib
import math
import os
from typing import Callable, Optional

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_iddpm import digits_dataset
from tf_iddpm import image_utils

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SUPPORTED_NUM_CHANNELS = (1, 3)
# Decoded (resized, uint8) images of a pipeline shard up to this size are cached in memory,
# so small datasets (digits, CIFAR-10) are decoded and resized only once.
_CACHE_LIMIT_BYTES = 256 * 2**20
_MAX_LISTED_BAD_FILES = 20
_AUTOTUNE = tf.data.AUTOTUNE


# --------------------------------------------------------------------------------------------
# Configuration checks
# --------------------------------------------------------------------------------------------


def _field(data_config, name):
    """Reads ``data_config.<name>``; a missing field is a ValueError naming it."""
    try:
        if isinstance(data_config, dict):
            return data_config[name]
        return getattr(data_config, name)
    except (AttributeError, KeyError):
        raise ValueError(
            f"config.data has no field {name!r}; see configs/base.py for the data fields."
        ) from None


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_positive_int(name, value):
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_config_fields(data_config):
    """Checks the fields of ``config.data`` that need no data access."""
    name = _field(data_config, "name")
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"config.data.name must be 'digits', 'folder' or a TFDS dataset name, got {name!r}."
        )
    image_size = _field(data_config, "image_size")
    if not _is_int(image_size) or image_size < 8 or image_size % 8:
        raise ValueError(
            f"config.data.image_size must be a multiple of 8 and at least 8 "
            f"(8, 16, 32, 64, 128, 256, ...), got {image_size!r}."
        )
    num_channels = _field(data_config, "num_channels")
    if num_channels not in SUPPORTED_NUM_CHANNELS or not _is_int(num_channels):
        raise ValueError(
            f"config.data.num_channels must be one of {SUPPORTED_NUM_CHANNELS}, "
            f"got {num_channels!r}."
        )
    low_res_size = _field(data_config, "low_res_size")
    if not _is_int(low_res_size) or not 0 <= low_res_size < image_size:
        raise ValueError(
            f"config.data.low_res_size must be 0 (no low-resolution input) or in "
            f"[1, image_size - 1 = {image_size - 1}], got {low_res_size!r}."
        )
    num_classes = _field(data_config, "num_classes")
    if not _is_int(num_classes) or num_classes < 0:
        raise ValueError(f"config.data.num_classes must be an int >= 0, got {num_classes!r}.")
    if not isinstance(_field(data_config, "class_cond"), bool):
        raise ValueError(
            f"config.data.class_cond must be a bool, got {_field(data_config, 'class_cond')!r}."
        )
    _check_positive_int("config.data.shuffle_buffer", _field(data_config, "shuffle_buffer"))
    if name == "folder" and not _field(data_config, "folder"):
        raise ValueError(
            "config.data.name is 'folder' but config.data.folder is empty; set it to the "
            "directory that holds the images."
        )


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    """One split of a data source, resolved and checked.

    Attributes:
        description: human-readable name for messages, e.g. "TFDS 'cifar10' split 'train'".
        num_examples: examples in the split, or None when unknown (under tfds mocking).
        num_classes: number of classes, or None when the source has no labels.
        channels: channels of the decoded images (1 or 3).
        make_records: ``(shuffle_files, seed, input_context) -> (dataset, sharded)``. It gives
            cheap, undecoded records. ``sharded`` tells whether ``input_context`` was already
            applied (file-level sharding).
        decode: record -> ``{"image": uint8 [S, S, channels], "label": int64 []}`` (label
            only when ``num_classes`` is not None). Traceable by tf.data.
    """

    description: str
    num_examples: Optional[int]
    num_classes: Optional[int]
    channels: int
    make_records: Callable
    decode: Callable


def _crop_and_resize_tensor(image, size, channels):
    """:func:`image_utils.center_crop_and_resize` on a uint8 tensor [H, W, C] via Pillow."""
    resized = tf.numpy_function(
        lambda array: image_utils.center_crop_and_resize(array, size), [image], tf.uint8,
        stateful=False,
    )
    resized.set_shape([size, size, channels])
    return resized


def _tfds_builder(name, data_dir):
    """Returns the TFDS builder for ``name``; unknown names get close matches suggested."""
    dataset_part = name.split("/")[0]
    known = sorted(set(tfds.list_builders(with_community_datasets=False)))
    # Namespaced or versioned names ("ns:name", "name:1.0.0") are left for TFDS to resolve.
    if ":" not in dataset_part and dataset_part not in known:
        close = difflib.get_close_matches(dataset_part, known, n=5)
        raise ValueError(
            f"Unknown dataset config.data.name={name!r}: not 'digits', not 'folder' and not a "
            f"TFDS dataset. Close TFDS names: {close or 'none'}."
        )
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:  # DatasetNotFoundError, unknown builder config, bad version.
        known_names = [n for n in known if n.startswith(dataset_part)][:5]
        raise ValueError(
            f"TFDS cannot load config.data.name={name!r}: {error}. Similar names: {known_names}."
        ) from error


def _resolve_tfds(data_config, split, builder, dataset_label):
    """Checks a TFDS builder (prepared, split, features) and wraps it as a :class:`_Source`."""
    name = _field(data_config, "name")
    image_size = _field(data_config, "image_size")
    if not builder.is_prepared():
        try:
            builder.as_dataset(split=split)  # Succeeds under tfds.testing.mock_data.
        except AssertionError:
            root = os.fspath(builder.data_dir_root)
            raise ValueError(
                f"TFDS dataset {name!r} is known but not prepared in data_dir {root!r} "
                f"(looked for {os.fspath(builder.data_path)}). Prepare it once with "
                f"`tfds build {name} --data_dir={root}` (some datasets, e.g. ImageNet, need "
                f"manually downloaded files; see the TFDS catalog), or set config.data.data_dir "
                f"to the directory where it is prepared."
            ) from None
    splits = builder.info.splits
    num_examples, num_files = None, 0
    if splits:  # Empty only under tfds.testing.mock_data.
        try:
            split_info = splits[split]
        except (KeyError, ValueError, AssertionError) as error:
            reason = str(error.args[0] if error.args else error).rstrip(".")
            raise ValueError(
                f"Split {split!r} is not available in {dataset_label}: {reason}. Available "
                f"splits: {sorted(splits.keys())} (slices such as 'train[:90%]' work too)."
            ) from None
        num_examples = int(split_info.num_examples)
        num_files = len(split_info.file_instructions)
    label = f"{dataset_label} split {split!r}"
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
        raise ValueError(
            f"{label} has no 'image' feature of type tfds.features.Image "
            f"(its features: {sorted(features.keys())})."
        )
    image_feature = features["image"]
    height, width, channels = image_feature.shape
    if channels not in SUPPORTED_NUM_CHANNELS:
        raise ValueError(
            f"{label} has {channels}-channel images; only {SUPPORTED_NUM_CHANNELS} are supported."
        )
    num_classes = None
    if "label" in features and isinstance(features["label"], tfds.features.ClassLabel):
        num_classes = int(features["label"].num_classes)
    needs_resize = (height, width) != (image_size, image_size)

    def make_records(shuffle_files, seed, input_context):
        file_level = (
            input_context is not None
            and input_context.num_input_pipelines > 1
            and num_files >= input_context.num_input_pipelines
        )
        read_config = tfds.ReadConfig(
            shuffle_seed=seed,
            input_context=input_context if file_level else None,
            try_autocache=False,
        )
        records = builder.as_dataset(
            split=split,
            # Ordered datasets (disable_shuffling, like our digits) refuse shuffle_files.
            shuffle_files=shuffle_files and not builder.info.disable_shuffling,
            decoders={"image": tfds.decode.SkipDecoding()},  # Decode after shuffle and shard.
            read_config=read_config,
        )
        keys = ["image"] + (["label"] if num_classes is not None else [])
        return records.map(lambda example: {key: example[key] for key in keys}), file_level

    def decode(record):
        image = image_feature.decode_example(record["image"])
        if needs_resize:
            image = _crop_and_resize_tensor(image, image_size, channels)
        else:
            image = tf.ensure_shape(image, [image_size, image_size, channels])
        example = {"image": image}
        if num_classes is not None:
            example["label"] = tf.cast(record["label"], tf.int64)
        return example

    return _Source(label, num_examples, num_classes, channels, make_records, decode)


# Folder scan results, keyed by (path, size, mtime): each file is decoded once per process.
_SCAN_CACHE = {}
_WARNED_SUMMARIES = set()


def _list_image_files(root):
    """Sorted image files below ``root`` (recursive, case-insensitive extensions)."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for file_name in files:
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(directory, file_name))
    return sorted(found)


def _probe_image(path):
    """Decodes one file fully. Returns ``(is_grayscale, None)`` or ``(None, error)``."""
    try:
        stat = os.stat(path)
    except OSError as error:
        return None, f"{type(error).__name__}: {error}"
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _SCAN_CACHE:
        try:
            with Image.open(path) as image:
                image.load()  # verify() misses truncated JPEGs; a full decode does not.
                if image.width == 0 or image.height == 0:
                    raise ValueError("empty image")
                _SCAN_CACHE[key] = (image_utils.is_grayscale_mode(image.mode), None)
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
            _SCAN_CACHE[key] = (None, f"{type(error).__name__}: {error}")
    return _SCAN_CACHE[key]


def _scan_images(paths):
    """Decodes every file (in threads; Pillow releases the GIL while decoding)."""
    workers = min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_probe_image, paths))


def _load_folder_image(path, size, channels):
    """Reads, crops and resizes one image file to uint8 [size, size, channels]."""
    path = path.decode() if isinstance(path, bytes) else path
    try:
        with Image.open(path) as image:
            image.load()
            array = image_utils.center_crop_and_resize(image, size)
    except Exception as error:
        raise ValueError(f"Image file {path!r} was readable when the pipeline was built but "
                         f"now fails: {error}") from error
    if array.shape[-1] == 4:
        array = array[..., :3]  # Drop alpha, as the reference's convert("RGB") does.
    if channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def _resolve_folder(data_config, split):
    """Lists, scans and labels an image folder split as a :class:`_Source`."""
    root = os.path.abspath(os.path.expanduser(_field(data_config, "folder")))
    image_size = _field(data_config, "image_size")
    if not os.path.isdir(root):
        raise ValueError(f"config.data.folder={root!r} does not exist or is not a directory.")
    all_files = _list_image_files(root)
    if not all_files:
        raise ValueError(
            f"config.data.folder={root!r} holds no image files "
            f"(searched recursively for {', '.join(IMAGE_EXTENSIONS)})."
        )
    # Labels as improved-diffusion: the file name up to the first "_", ids by sorted name.
    class_names = [os.path.basename(path).split("_")[0] for path in all_files]
    class_ids = {class_name: i for i, class_name in enumerate(sorted(set(class_names)))}
    label_of = dict(zip(all_files, (class_ids[c] for c in class_names)))

    split_dir = os.path.join(root, split)
    if os.path.isdir(split_dir):
        files = [path for path in all_files if path.startswith(split_dir + os.sep)]
        label = f"image folder {split_dir!r}"
        if not files:
            raise ValueError(f"Split folder {split_dir!r} holds no image files.")
    else:
        files = all_files
        label = f"image folder {root!r}"

    results = _scan_images(files)
    bad = [(path, error) for path, (_, error) in zip(files, results) if error is not None]
    good = [path for path, (_, error) in zip(files, results) if error is None]
    if bad:
        listed = "; ".join(f"{path} ({error})" for path, error in bad[:_MAX_LISTED_BAD_FILES])
        unlisted = len(bad) - _MAX_LISTED_BAD_FILES
        more = f"; and {unlisted} more" if unlisted > 0 else ""
        summary = (
            f"{len(bad)} of {len(files)} files in {label} are not readable images: {listed}{more}"
        )
        if _field(data_config, "strict"):
            raise ValueError(f"{summary}. config.data.strict is True; remove or fix them.")
        if summary not in _WARNED_SUMMARIES:  # One warning, not one per pipeline built.
            _WARNED_SUMMARIES.add(summary)
            logging.warning("Skipping %s.", summary)
    if not good:
        raise ValueError(f"{label} has no readable images ({len(bad)} unreadable files).")
    all_gray = all(results[i][0] for i, (_, error) in enumerate(results) if error is None)
    channels = 1 if all_gray else 3
    paths = tf.constant(good)
    labels = tf.constant([label_of[path] for path in good], tf.int64)

    def make_records(shuffle_files, seed, input_context):
        del shuffle_files, seed, input_context  # Shuffled and sharded by the caller.
        return tf.data.Dataset.from_tensor_slices({"path": paths, "label": labels}), False

    def decode(record):
        image = tf.numpy_function(
            lambda path: _load_folder_image(path, image_size, channels),
            [record["path"]], tf.uint8, stateful=False,
        )
        image.set_shape([image_size, image_size, channels])
        return {"image": image, "label": record["label"]}

    return _Source(label, len(good), len(class_ids), channels, make_records, decode)


def _resolve_source(data_config, split):
    """Checks ``config.data`` and resolves one split of its source; nothing is read yet."""
    _check_config_fields(data_config)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string such as 'train', got {split!r}.")
    name = _field(data_config, "name")
    data_dir = _field(data_config, "data_dir")
    if name == "folder":
        source = _resolve_folder(data_config, split)
    elif name == "digits":
        builder = digits_dataset.prepare_digits(data_dir)
        source = _resolve_tfds(data_config, split, builder, "digits")
    else:
        builder = _tfds_builder(name, data_dir)
        source = _resolve_tfds(data_config, split, builder, f"TFDS {name!r}")

    num_channels = _field(data_config, "num_channels")
    if source.channels == 3 and num_channels == 1:
        raise ValueError(
            f"{source.description} has RGB images but config.data.num_channels is 1; "
            f"converting colour to grayscale is refused. Set num_channels to 3."
        )
    if _field(data_config, "class_cond"):
        if source.num_classes is None:
            raise ValueError(
                f"config.data.class_cond is True but {source.description} has no class "
                f"labels (no ClassLabel feature 'label'). Set class_cond to False."
            )
        if _field(data_config, "num_classes") != source.num_classes:
            raise ValueError(
                f"config.data.num_classes={_field(data_config, 'num_classes')} does not match "
                f"the {source.num_classes} classes of {source.description}."
            )
    return source


def validate_data_config(data_config):
    """Checks ``config.data`` and its train and eval splits; raises ValueError on a problem.

    Call this before building a model, so a bad configuration fails at once. Checked: the
    fields, the source (known TFDS name, prepared data, an existing non-empty folder), both
    splits, labels for ``class_cond`` and ``num_classes``, and channels. The digits are
    prepared here on first use.

    Args:
        data_config: ``config.data``.

    Raises:
        ValueError: naming the bad value and what is allowed.
    """
    for split_field in ("train_split", "eval_split"):
        _resolve_source(data_config, _field(data_config, split_field))


def dataset_num_examples(data_config, split):
    """Number of examples in ``split`` (readable images for folders).

    Args:
        data_config: ``config.data``.
        split: split name, e.g. ``config.data.train_split``; TFDS slices work.

    Returns:
        int.
    """
    source = _resolve_source(data_config, split)
    if source.num_examples is not None:
        return source.num_examples
    return _count_records(source)


def _count_records(source):
    records, _ = source.make_records(False, 0, None)
    cardinality = int(records.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(records.reduce(np.int64(0), lambda count, _: count + 1))


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


def _pipeline_position(input_context):
    """``(num_input_pipelines, input_pipeline_id, replicas_per_pipeline)``."""
    if input_context is None:
        return 1, 0, 1
    num_pipelines = int(input_context.num_input_pipelines)
    replicas_per_pipeline = max(1, int(input_context.num_replicas_in_sync) // num_pipelines)
    return num_pipelines, int(input_context.input_pipeline_id), replicas_per_pipeline


def _finish_example(example, data_config, source_channels, flip_seed=None):
    """uint8 decoded example -> model inputs (channels, [-1, 1], flip, label, low_res)."""
    image = example["image"]
    if source_channels == 1 and _field(data_config, "num_channels") == 3:
        image = tf.tile(image, [1, 1, 3])
    image = image_utils.normalize_images(image)
    if flip_seed is not None:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    features = {"image": image}
    if _field(data_config, "class_cond"):
        features["label"] = tf.cast(example["label"], tf.int32)
    low_res_size = _field(data_config, "low_res_size")
    if low_res_size > 0:
        features["low_res"] = image_utils.area_resize(image, low_res_size)
    return features


def _deterministic(dataset):
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)


def make_train_dataset(data_config, *, batch_size, input_context=None, seed=0):
    """Infinite, shuffled training batches for one input pipeline.

    For several replicas use::

        strategy.distribute_datasets_from_function(
            lambda ctx: make_train_dataset(cfg.data, batch_size=ctx.get_per_replica_batch_size(
                global_batch_size), input_context=ctx, seed=cfg.seed))

    Each input pipeline reads a disjoint shard: whole TFDS files when the split has at least
    as many files as pipelines, else every ``num_input_pipelines``-th example. Given the seed
    the stream is deterministic: the file order, the shuffle buffer and the flips are all
    seeded per pipeline.

    Args:
        data_config: ``config.data``.
        batch_size: examples per batch of this pipeline (the per-replica batch).
        input_context: optional ``tf.distribute.InputContext``.
        seed: non-negative int.

    Returns:
        ``tf.data.Dataset`` of dicts: ``"image"`` float32 ``[B, H, W, C]`` in [-1, 1];
        ``"label"`` int32 ``[B]`` if ``class_cond``; ``"low_res"`` float32 ``[B, h, h, C]`` if
        ``low_res_size > 0``. Remainders are dropped, so B is static.
    """
    _check_positive_int("batch_size", batch_size)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    source = _resolve_source(data_config, _field(data_config, "train_split"))
    num_pipelines, pipeline_id, _ = _pipeline_position(input_context)
    if source.num_examples is not None and source.num_examples < num_pipelines:
        raise ValueError(
            f"{source.description} has {source.num_examples} examples, fewer than the "
            f"{num_pipelines} input pipelines; every pipeline needs at least one."
        )
    # One 32-bit seed per pipeline, so the shards are shuffled differently.
    pipeline_seed = int(np.random.SeedSequence([int(seed), pipeline_id]).generate_state(1)[0])

    records, sharded = source.make_records(True, pipeline_seed, input_context)
    if num_pipelines > 1 and not sharded:
        records = records.shard(num_pipelines, pipeline_id)
    image_size = _field(data_config, "image_size")
    local_examples = (source.num_examples or 0) / num_pipelines
    cache_decoded = (
        source.num_examples is not None
        and local_examples * image_size**2 * source.channels <= _CACHE_LIMIT_BYTES
    )
    dataset = records
    if cache_decoded:
        dataset = dataset.map(source.decode, num_parallel_calls=_AUTOTUNE).cache()
    dataset = dataset.shuffle(
        _field(data_config, "shuffle_buffer"), seed=pipeline_seed, reshuffle_each_iteration=True
    ).repeat()
    if not cache_decoded:
        dataset = dataset.map(source.decode, num_parallel_calls=_AUTOTUNE)
    random_flip = bool(_field(data_config, "random_flip"))

    def finish(counter, example):
        flip_seed = None
        if random_flip:
            flip_seed = tf.stack([tf.constant(pipeline_seed, tf.int64), counter])
        return _finish_example(example, data_config, source.channels, flip_seed)

    dataset = dataset.enumerate().map(finish, num_parallel_calls=_AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(_AUTOTUNE)
    return _deterministic(dataset)


def make_eval_dataset(data_config, *, batch_size, split=None, num_examples=0, input_context=None):
    """One deterministic pass over a split; no example is dropped or repeated.

    The split (first ``num_examples`` if > 0) is cut into global steps of
    ``batch_size * num_replicas_in_sync`` examples, in the order a global batch has: replica
    ``r`` gets positions ``[r * B, (r + 1) * B)`` of each step. The tail is padded, so every
    pipeline yields the same number of full batches, a multiple of its local replicas.
    Distributed evaluators then never wait on each other or get a partial step. ``"mask"``
    marks the real examples and ``"index"`` gives each one's position in the split (-1 for
    padding). Evaluators weight by the mask; the indices show that every example was seen
    exactly once.

    Args:
        data_config: ``config.data``.
        batch_size: examples per batch of this pipeline (per replica).
        split: split name; default ``config.data.eval_split``.
        num_examples: > 0 limits the pass to the first ``num_examples`` examples.
        input_context: optional ``tf.distribute.InputContext``.

    Returns:
        Finite ``tf.data.Dataset`` of dicts: ``"image"`` float32 ``[B, H, W, C]``, optional
        ``"label"`` int32 ``[B]`` and ``"low_res"`` float32 ``[B, h, h, C]`` (as in training, no
        flips), ``"mask"`` bool ``[B]``, ``"index"`` int64 ``[B]``. Padding rows are zeros.
    """
    _check_positive_int("batch_size", batch_size)
    if not _is_int(num_examples) or num_examples < 0:
        raise ValueError(
            f"num_examples must be an int >= 0 (0 = whole split), got {num_examples!r}."
        )
    split = split or _field(data_config, "eval_split")
    source = _resolve_source(data_config, split)
    num_pipelines, pipeline_id, local_replicas = _pipeline_position(input_context)

    records, _ = source.make_records(False, 0, None)
    total = source.num_examples if source.num_examples is not None else _count_records(source)
    if num_examples > 0:
        total = min(total, num_examples)
        records = records.take(total)
    if total == 0:
        raise ValueError(f"{source.description} is empty; nothing to evaluate.")

    # One round is one global step: batch_size examples for each of the
    # num_pipelines * local_replicas replicas. Replica r takes positions [r * B, (r + 1) * B) of
    # a round, and replica r is fed by pipeline r // local_replicas.
    local_size = batch_size * local_replicas
    num_rounds = math.ceil(total / (local_size * num_pipelines))
    num_batches = num_rounds * local_replicas
    full_rounds, remainder = divmod(total, local_size * num_pipelines)
    local_tail = min(max(remainder - pipeline_id * local_size, 0), local_size)
    local_real = full_rounds * local_size + local_tail
    num_padding = num_batches * batch_size - local_real

    dataset = records.enumerate()
    if num_pipelines > 1:
        dataset = dataset.filter(
            lambda index, _: (index // local_size) % num_pipelines == pipeline_id
        )

    def finish(index, record):
        features = _finish_example(source.decode(record), data_config, source.channels)
        features["mask"] = tf.constant(True)
        features["index"] = index
        return features

    dataset = dataset.map(finish, num_parallel_calls=_AUTOTUNE)
    padding = tf.nest.map_structure(
        lambda spec: tf.zeros(spec.shape, spec.dtype), dataset.element_spec
    )
    padding["index"] = tf.constant(-1, tf.int64)
    dataset = dataset.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_batches))
    return _deterministic(dataset.prefetch(_AUTOTUNE))
