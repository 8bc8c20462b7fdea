"""Input pipelines: training (shuffled, repeated, per-replica batches) and evaluation (one pass).

The training order is a pure function of (seed, step), so a resumed run reads exactly the
batches of the run it continues, on any replica layout (see :func:`make_train_dataset`).

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
from typing import Callable, Optional, Tuple

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_iddpm import config_utils
from tf_iddpm import digits_dataset
from tf_iddpm import image_utils

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# A training split whose decoded (resized, uint8) images fit in this size is held in memory by
# every input pipeline, so small datasets (digits, CIFAR-10) are decoded and resized only once.
_CACHE_LIMIT_BYTES = 256 * 2**20
_MAX_LISTED_BAD_FILES = 20
# Stream positions whose examples are looked up at once (memory and random-access orders).
_LOOKUP_CHUNK = 64
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


# The fields of ``config.data`` whose rules live in config_utils.data_field_errors.
_CHECKED_FIELDS = (
    "name",
    "folder",
    "image_size",
    "num_channels",
    "low_res_size",
    "num_classes",
    "class_cond",
    "shuffle_buffer",
)


def _check_config_fields(data_config):
    """Checks the fields of ``config.data`` that need no data access.

    The rules are :func:`tf_iddpm.config_utils.data_field_errors`'s, which ``validate_config``
    reports too; they are checked here as well because the data functions take ``config.data``
    from any caller.
    """
    for name in _CHECKED_FIELDS:
        _field(data_config, name)  # a missing field is named as such
    errors = config_utils.data_field_errors(data_config)
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))


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
        make_records: ``() -> dataset`` of cheap, undecoded records of the whole split in its
            canonical order (the order example indices refer to).
        decode: record -> ``{"image": uint8 [S, S, channels], "label": int64 []}`` (label
            only when ``num_classes`` is not None). Traceable by tf.data.
        random_access: None, or ``() -> lookup`` where ``lookup(indices)`` maps int64
            ``[n]`` indices (canonical order) to ``n`` raw records. Called once per pipeline.
        stream_files: TFRecord ``(filename, skip, take)`` triples whose records, read in this
            order, are the split; empty when the source is not read as TFRecord files.
        parse: raw record (from ``random_access`` or ``stream_files``) -> record for
            ``decode``; None means the raw record already is one.
    """

    description: str
    num_examples: Optional[int]
    num_classes: Optional[int]
    channels: int
    make_records: Callable
    decode: Callable
    random_access: Optional[Callable] = None
    stream_files: Tuple[Tuple[str, int, int], ...] = ()
    parse: Optional[Callable] = None


def _crop_and_resize_tensor(image, size, channels):
    """:func:`image_utils.center_crop_and_resize` on a uint8 tensor [H, W, C] via Pillow."""
    resized = tf.numpy_function(
        lambda array: image_utils.center_crop_and_resize(array, size),
        [image],
        tf.uint8,
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
    num_examples, file_instructions = None, ()
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
        file_instructions = split_info.file_instructions
    label = f"{dataset_label} split {split!r}"
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
        raise ValueError(
            f"{label} has no 'image' feature of type tfds.features.Image "
            f"(its features: {sorted(features.keys())})."
        )
    image_feature = features["image"]
    height, width, channels = image_feature.shape
    if channels not in config_utils.SUPPORTED_NUM_CHANNELS:
        raise ValueError(
            f"{label} has {channels}-channel images; only "
            f"{config_utils.SUPPORTED_NUM_CHANNELS} are supported."
        )
    num_classes = None
    if "label" in features and isinstance(features["label"], tfds.features.ClassLabel):
        num_classes = int(features["label"].num_classes)
    needs_resize = (height, width) != (image_size, image_size)
    keys = ["image"] + (["label"] if num_classes is not None else [])

    def select(example):
        return {key: example[key] for key in keys}

    def parse(serialized):
        return select(
            features.deserialize_example(serialized, decoders={"image": tfds.decode.SkipDecoding()})
        )

    # Prepared files (none under tfds.testing.mock_data, whose splits are empty).
    file_format = builder.info.file_format if splits else None
    random_access, stream_files = None, ()
    if file_format == tfds.core.FileFormat.ARRAY_RECORD:
        # tfds' as_dataset() refuses ArrayRecord files; read them through the data source.

        def make_records():
            lookup = random_access()
            indices = tf.data.Dataset.range(num_examples).batch(_LOOKUP_CHUNK)
            return indices.map(lookup).unbatch().map(parse)

        def random_access():
            data_source = builder.as_data_source(
                split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
            )

            def fetch(indices):
                return np.array(data_source.__getitems__(indices.tolist()), dtype=object)

            def lookup(indices):
                serialized = tf.numpy_function(fetch, [indices], tf.string, stateful=False)
                return tf.ensure_shape(serialized, indices.shape)

            return lookup

    else:

        def make_records():
            records = builder.as_dataset(
                split=split,
                shuffle_files=False,
                decoders={"image": tfds.decode.SkipDecoding()},  # Decoded by decode().
                read_config=tfds.ReadConfig(try_autocache=False),
            )
            return records.map(select)

        if file_format == tfds.core.FileFormat.TFRECORD:
            stream_files = tuple(
                (os.fspath(instruction.filename), int(instruction.skip), int(instruction.take))
                for instruction in file_instructions
            )

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

    return _Source(
        label,
        num_examples,
        num_classes,
        channels,
        make_records,
        decode,
        random_access=random_access,
        stream_files=stream_files,
        parse=parse,
    )


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
        raise ValueError(
            f"Image file {path!r} was readable when the pipeline was built but now fails: {error}"
        ) from error
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

    def make_records():
        return tf.data.Dataset.from_tensor_slices({"path": paths, "label": labels})

    def random_access():
        return lambda indices: {
            "path": tf.gather(paths, indices),
            "label": tf.gather(labels, indices),
        }

    def decode(record):
        image = tf.numpy_function(
            lambda path: _load_folder_image(path, image_size, channels),
            [record["path"]],
            tf.uint8,
            stateful=False,
        )
        image.set_shape([image_size, image_size, channels])
        return {"image": image, "label": record["label"]}

    return _Source(
        label,
        len(good),
        len(class_ids),
        channels,
        make_records,
        decode,
        random_access=random_access,
    )


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


def dataset_num_classes(data_config, split):
    """Number of classes of ``split``'s labels, or None when it has none (e.g. an unlabelled set).

    Args:
        data_config: ``config.data``.
        split: split name, e.g. ``config.data.train_split``.

    Returns:
        int or None.
    """
    fields = data_config if isinstance(data_config, dict) else data_config.to_dict()
    return _resolve_source(dict(fields, class_cond=False), split).num_classes


def _count_records(source):
    records = source.make_records()
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


# Purposes of the keys derived from the training seed (see _order_key).
_PERMUTATION_KEY, _FLIP_KEY, _FILE_ORDER_KEY, _WINDOW_KEY = range(4)
# TFRecord files read at once by the stream order (the reader's interleave cycle).
_STREAM_CYCLE_LENGTH = 16


def _order_key(seed, purpose):
    """A 32-bit key for one use (``_*_KEY``) of the training seed, as a tf.int64 scalar."""
    key = int(np.random.SeedSequence([int(seed), purpose]).generate_state(1)[0])
    return tf.constant(key, tf.int64)


def _example_indices(positions, num_examples, permutation_key):
    """Canonical indices of the examples at stream ``positions`` (int64 ``[n]``).

    Epoch ``e = p // num_examples`` is one permutation of the split, a stateless function of
    ``(seed, e)``; position ``p`` takes element ``p % num_examples`` of it. (The raw op, since
    ``tf.random.experimental.index_shuffle`` cannot take one seed per element.)
    """
    epochs = positions // num_examples
    seeds = tf.stack(
        [tf.fill(tf.shape(epochs), permutation_key), epochs, tf.zeros_like(epochs)], axis=-1
    )
    return tf.raw_ops.RandomIndexShuffle(
        index=positions % num_examples,
        seed=seeds,
        max_index=tf.constant(num_examples - 1, tf.int64),
        rounds=4,
    )


def _local_positions(start_position, global_batch, local_size):
    """This pipeline's stream positions in order: ``local_size`` consecutive ones per step."""
    return tf.data.Dataset.counter().map(
        lambda j: start_position + (j // local_size) * global_batch + j % local_size
    )


def _decoded_arrays(source, num_examples):
    """The whole split decoded: ``{"image": uint8 [N, S, S, C], "label": int64 [N]}``."""
    dataset = source.make_records().map(source.decode, num_parallel_calls=_AUTOTUNE)
    parts = list(_deterministic(dataset.batch(1024)).as_numpy_iterator())
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    if len(arrays["image"]) != num_examples:
        raise ValueError(
            f"{source.description} declares {num_examples} examples but holds "
            f"{len(arrays['image'])}; re-prepare it."
        )
    return arrays


def _record_stream(source, num_examples, seed, start_position, window):
    """Undecoded records of the TFRecord order from ``start_position`` on (infinite).

    Epoch ``e`` reads the split's files in an order permuted by ``(seed, e)``,
    ``_STREAM_CYCLE_LENGTH`` files interleaved record by record, and permutes each window of
    ``window`` consecutive records by ``(seed, e, window index)``. Every step of that is
    deterministic, so the stream is a function of ``(seed, position)``. Starting inside an
    epoch reads (and drops) the records before ``start_position`` in that epoch.
    """
    names = tf.constant([name for name, _, _ in source.stream_files])
    skips = tf.constant([skip for _, skip, _ in source.stream_files], tf.int64)
    takes = tf.constant([take for _, _, take in source.stream_files], tf.int64)
    num_files = len(source.stream_files)
    file_key = _order_key(seed, _FILE_ORDER_KEY)
    window_key = _order_key(seed, _WINDOW_KEY)

    def epoch_records(epoch, first):
        order = tf.random.experimental.index_shuffle(
            tf.range(num_files, dtype=tf.int64),
            seed=tf.stack([file_key, epoch]),
            max_index=tf.constant(num_files - 1, tf.int64),
        )
        files = tf.data.Dataset.from_tensor_slices(
            (tf.gather(names, order), tf.gather(skips, order), tf.gather(takes, order))
        )
        cycle = min(num_files, _STREAM_CYCLE_LENGTH)
        records = files.interleave(
            lambda name, skip, take: tf.data.TFRecordDataset(name).skip(skip).take(take),
            cycle_length=cycle,
            block_length=1,
            num_parallel_calls=cycle,
            deterministic=True,
        )
        first_window = first // window
        windows = tf.data.Dataset.zip(
            tf.data.Dataset.counter(first_window),
            records.skip(first_window * window).batch(window),
        )

        def permute(index, batch):
            size = tf.shape(batch, out_type=tf.int64)[0]
            permutation = tf.random.experimental.index_shuffle(
                tf.range(size),
                seed=tf.random.experimental.stateless_fold_in(tf.stack([window_key, epoch]), index),
                max_index=size - 1,
            )
            return tf.gather(batch, permutation)

        return windows.map(permute).unbatch().skip(first - first_window * window)

    first_epoch, first = divmod(start_position, num_examples)
    if first:
        logging.info(
            "%s: resuming inside epoch %d; reading and dropping its first %d records once.",
            source.description,
            first_epoch,
            first,
        )
    stream = epoch_records(tf.constant(first_epoch, tf.int64), tf.constant(first, tf.int64))
    later = tf.data.Dataset.counter(first_epoch + 1).flat_map(
        lambda epoch: epoch_records(epoch, tf.constant(0, tf.int64))
    )
    return stream.concatenate(later)


def _order_mechanism(source, num_examples, image_size):
    """How the training order is read: ``"memory"``, ``"random_access"`` or ``"stream"``."""
    if num_examples * image_size**2 * source.channels <= _CACHE_LIMIT_BYTES:
        return "memory"
    if source.random_access is not None:
        return "random_access"
    if source.stream_files:
        return "stream"
    raise ValueError(
        f"{source.description} has {num_examples} examples, too many to hold decoded in "
        f"memory ({_CACHE_LIMIT_BYTES // 2**20} MiB), and is neither an image folder nor "
        f"prepared as ArrayRecord or TFRecord files, so its training order cannot be a "
        f"function of (seed, step). Prepare it with file_format='array_record' or 'tfrecord'."
    )


def make_train_dataset(data_config, *, batch_size, input_context=None, seed=0, start_step=0):
    """Infinite training batches for one input pipeline, in an order fixed by (seed, step).

    For several replicas use::

        strategy.distribute_datasets_from_function(
            lambda ctx: make_train_dataset(cfg.data, batch_size=ctx.get_per_replica_batch_size(
                global_batch_size), input_context=ctx, seed=cfg.seed, start_step=step))

    The data order is a pure function of ``(seed, step)``. The training examples form an
    infinite stream of positions ``p = 0, 1, 2, ...``; position ``p`` is in epoch
    ``p // N`` (N = examples in the train split), and every epoch is one permutation of the
    split chosen by ``(seed, epoch)``. Global step ``s`` reads positions
    ``[s * G, (s + 1) * G)`` (G = ``batch_size * num_replicas_in_sync``), and replica ``r``
    gets ``[s * G + r * B, s * G + (r + 1) * B)``, like the trainer's noise and timesteps.
    Pipeline ``i`` feeds replicas ``i * R ... (i + 1) * R - 1`` (R = replicas per pipeline)
    and yields, for each step from ``start_step`` on, those replicas' batches in order
    (tf.distribute hands consecutive batches of a pipeline to its local replicas in turn).
    So a run resumed at ``start_step`` reads exactly the batches the uninterrupted run reads
    there, whatever the number of devices. Random flips are a function of ``(seed, p)``.

    How the order is read depends on the source, never on the replicas:

    * ``"memory"``: a split whose decoded images fit in ``_CACHE_LIMIT_BYTES`` (digits,
      CIFAR-10, small folders) is decoded once and indexed by the permutation.
    * ``"random_access"``: larger image folders (decode the file at the permuted index) and
      TFDS splits prepared as ArrayRecord (``tfds.data_source``).
    * ``"stream"``: larger TFDS splits prepared as TFRecord (no random access). Epoch ``e``
      reads the files in a ``(seed, e)`` order and permutes windows of
      ``data.shuffle_buffer`` records by ``(seed, e, window)``; every pipeline reads all
      records and decodes only its own. A resume inside an epoch reads (and drops) that
      epoch's records before the resume position once.

    Args:
        data_config: ``config.data``.
        batch_size: examples per batch of this pipeline (the per-replica batch).
        input_context: optional ``tf.distribute.InputContext``.
        seed: non-negative int.
        start_step: non-negative int, the global step of the first batch.

    Returns:
        ``tf.data.Dataset`` of dicts: ``"image"`` float32 ``[B, H, W, C]`` in [-1, 1];
        ``"label"`` int32 ``[B]`` if ``class_cond``; ``"low_res"`` float32 ``[B, h, h, C]`` if
        ``low_res_size > 0``. B is static.

    Raises:
        ValueError: on a bad argument or configuration, an empty split, or a
            ``num_replicas_in_sync`` that is not a multiple of ``num_input_pipelines``.
    """
    config_utils.check_positive_int("batch_size", batch_size)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    if not _is_int(start_step) or start_step < 0:
        raise ValueError(f"start_step must be a non-negative int, got {start_step!r}.")
    if input_context is not None and (
        input_context.num_replicas_in_sync % input_context.num_input_pipelines
    ):
        raise ValueError(
            f"num_replicas_in_sync={input_context.num_replicas_in_sync} is not a multiple of "
            f"num_input_pipelines={input_context.num_input_pipelines}; every input pipeline "
            f"must feed the same number of replicas."
        )
    source = _resolve_source(data_config, _field(data_config, "train_split"))
    num_examples = source.num_examples
    if num_examples is None:
        num_examples = _count_records(source)
    if num_examples == 0:
        raise ValueError(f"{source.description} is empty; nothing to train on.")
    num_pipelines, pipeline_id, replicas_per_pipeline = _pipeline_position(input_context)
    local_size = batch_size * replicas_per_pipeline
    global_batch = local_size * num_pipelines
    start_position = int(start_step) * global_batch
    positions = _local_positions(
        start_position + pipeline_id * local_size, global_batch, local_size
    )
    permutation_key = _order_key(seed, _PERMUTATION_KEY)
    mechanism = _order_mechanism(source, num_examples, _field(data_config, "image_size"))
    random_flip = bool(_field(data_config, "random_flip"))
    flip_key = _order_key(seed, _FLIP_KEY)

    if mechanism == "stream":
        records = _record_stream(
            source,
            num_examples,
            seed,
            start_position,
            window=min(_field(data_config, "shuffle_buffer"), num_examples),
        )
        if num_pipelines > 1:
            records = records.batch(local_size).shard(num_pipelines, pipeline_id).unbatch()
        raw_examples = tf.data.Dataset.zip(positions, records)
    else:
        if mechanism == "memory":
            arrays = {
                key: tf.constant(array)
                for key, array in _decoded_arrays(source, num_examples).items()
            }

            def read(indices):
                return {key: tf.gather(array, indices) for key, array in arrays.items()}

        else:
            read = source.random_access()
        # Looked up in chunks: one small map per example is the pipeline's main cost.
        raw_examples = (
            positions.batch(_LOOKUP_CHUNK)
            .map(
                lambda chunk: (chunk, read(_example_indices(chunk, num_examples, permutation_key)))
            )
            .unbatch()
        )
    logging.info(
        "%s: training order %r, %d examples, from step %d (pipeline %d of %d).",
        source.description,
        mechanism,
        num_examples,
        start_step,
        pipeline_id,
        num_pipelines,
    )

    def finish(position, raw):
        if mechanism == "memory":
            example = raw
        else:
            example = source.decode(source.parse(raw) if source.parse else raw)
        flip_seed = tf.stack([flip_key, position]) if random_flip else None
        return _finish_example(example, data_config, source.channels, flip_seed)

    dataset = raw_examples.map(finish, num_parallel_calls=_AUTOTUNE)
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
    config_utils.check_positive_int("batch_size", batch_size)
    if not _is_int(num_examples) or num_examples < 0:
        raise ValueError(
            f"num_examples must be an int >= 0 (0 = whole split), got {num_examples!r}."
        )
    split = split or _field(data_config, "eval_split")
    source = _resolve_source(data_config, split)
    num_pipelines, pipeline_id, local_replicas = _pipeline_position(input_context)

    records = source.make_records()
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
