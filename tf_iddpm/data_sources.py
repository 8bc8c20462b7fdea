"""Data sources: find, check and describe one split of the configured data (``config.data``).

This module answers "what are the examples of this split, and are they usable?"; the order in
which training and evaluation read them is :mod:`tf_iddpm.data`'s job. The two are apart because
they fail and change differently: everything here touches the file system or TFDS metadata and
turns a wrong path, an unprepared dataset or unreadable files into a message for the user, while
the order is pure tf.data whose batches must stay bit for bit the same (a resumed run reads the
batches the uninterrupted one read).

There are three sources:

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
  files are decoded once when the split is resolved. Unreadable files are then skipped, with
  one warning that counts and names them, or refused when ``data.strict``; a folder with no
  image files, or none readable, is refused.
* **``"digits"``** (the offline default): scikit-learn's 8x8 handwritten digits through our
  TFDS builder :class:`tf_iddpm.digits_dataset.IddpmDigits`. It is prepared into ``data_dir``
  on first use. The digits are upscaled with the same crop-and-resize (BICUBIC), which gives
  smooth strokes that look like handwriting; NEAREST would give 8x8 blocks.

:func:`resolve_source` checks ``config.data`` (the field rules are
:func:`tf_iddpm.config_utils.data_field_errors`'s) and one split of its source (name, prepared
data, split, labels, channels), and describes the split as a :class:`Source`: its size, its
canonical order of undecoded records, how to decode one record to uint8 pixels, and how it can
be read at random or as TFRecord files. Nothing is decoded there but the folder probe (and
the digits are prepared on first use).
:func:`validate_data_config`, :func:`dataset_num_examples` and :func:`dataset_num_classes` are
the public questions asked of a configuration.

A problem that the user must fix in the data, or in where ``config.data`` points, raises
:class:`DataSourceError` (a ``ValueError``): one line saying what is wrong and what is
expected, which ``run.py`` prints as its one-line refusal. An invalid field or a bad argument
stays a plain ``ValueError``.
"""

import concurrent.futures
import dataclasses
import difflib
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
_MAX_LISTED_BAD_FILES = 20
# Indices looked up at once in a random-access read (the ArrayRecord records here, and the
# memory and random-access training orders of tf_iddpm.data).
LOOKUP_CHUNK = 64


class DataSourceError(ValueError):
    """The data, or where ``config.data`` points, cannot be used; the user must fix it.

    Raised for a missing or empty image folder, image files that cannot be read, an unknown or
    unprepared TFDS dataset, a missing or empty split, and data that contradict ``config.data``
    (labels, classes, channels). The message is one line: what is wrong and what is expected.
    """


def _one_line(text):
    """``text`` (e.g. another library's error message) with its whitespace runs as one space."""
    return " ".join(str(text).split())


def _extensions_text():
    """The image file endings that are read, for messages: ".png, .jpg or .jpeg (any case)"."""
    return f"{', '.join(IMAGE_EXTENSIONS[:-1])} or {IMAGE_EXTENSIONS[-1]} (any case)"


# --------------------------------------------------------------------------------------------
# Configuration checks
# --------------------------------------------------------------------------------------------


def field(data_config, name):
    """Reads ``data_config.<name>`` (a ConfigDict or a dict); a missing field is a ValueError
    naming it. The pipelines of :mod:`tf_iddpm.data` read ``config.data`` through it too."""
    try:
        if isinstance(data_config, dict):
            return data_config[name]
        return getattr(data_config, name)
    except (AttributeError, KeyError):
        raise ValueError(
            f"config.data has no field {name!r}; see configs/base.py for the data fields."
        ) from None


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
        field(data_config, name)  # a missing field is named as such
    errors = config_utils.data_field_errors(data_config)
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
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
        raise DataSourceError(
            f"Unknown dataset config.data.name={name!r}: not 'digits', not 'folder' and not a "
            f"TFDS dataset. Close TFDS names: {close or 'none'}."
        )
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:  # DatasetNotFoundError, unknown builder config, bad version.
        known_names = [n for n in known if n.startswith(dataset_part)][:5]
        raise DataSourceError(
            f"TFDS cannot load config.data.name={name!r}: {_one_line(error)}. Similar names: "
            f"{known_names}."
        ) from error


def _resolve_tfds(data_config, split, builder, dataset_label):
    """Checks a TFDS builder (prepared, split, features) and wraps it as a :class:`Source`."""
    name = field(data_config, "name")
    image_size = field(data_config, "image_size")
    if not builder.is_prepared():
        try:
            builder.as_dataset(split=split)  # Succeeds under tfds.testing.mock_data.
        except AssertionError:
            root = os.fspath(builder.data_dir_root)
            raise DataSourceError(
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
            reason = _one_line(error.args[0] if error.args else error).rstrip(".")
            raise DataSourceError(
                f"Split {split!r} is not available in {dataset_label}: {reason}. Available "
                f"splits: {sorted(splits.keys())} (slices such as 'train[:90%]' work too)."
            ) from None
        num_examples = int(split_info.num_examples)
        file_instructions = split_info.file_instructions
    label = f"{dataset_label} split {split!r}"
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
        raise DataSourceError(
            f"{label} has no 'image' feature of type tfds.features.Image "
            f"(its features: {sorted(features.keys())})."
        )
    image_feature = features["image"]
    height, width, channels = image_feature.shape
    if channels not in config_utils.SUPPORTED_NUM_CHANNELS:
        raise DataSourceError(
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
            indices = tf.data.Dataset.range(num_examples).batch(LOOKUP_CHUNK)
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

    return Source(
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
        return None, f"{type(error).__name__}: {_one_line(error)}"
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _SCAN_CACHE:
        try:
            with Image.open(path) as image:
                image.load()  # verify() misses truncated JPEGs; a full decode does not.
                if image.width == 0 or image.height == 0:
                    raise ValueError("empty image")
                _SCAN_CACHE[key] = (image_utils.is_grayscale_mode(image.mode), None)
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
            _SCAN_CACHE[key] = (None, f"{type(error).__name__}: {_one_line(error)}")
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
    """Lists, scans and labels an image folder split as a :class:`Source`."""
    root = os.path.abspath(os.path.expanduser(field(data_config, "folder")))
    image_size = field(data_config, "image_size")
    if not os.path.isdir(root):
        raise DataSourceError(
            f"config.data.folder={root!r} does not exist or is not a directory; give the root "
            f"directory of the images."
        )
    all_files = _list_image_files(root)
    if not all_files:
        raise DataSourceError(
            f"config.data.folder={root!r} holds no image files: files ending in "
            f"{_extensions_text()} are read, in the folder and all its subfolders. Put the "
            f"images there, or set config.data.folder to the folder that holds them."
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
            raise DataSourceError(
                f"Split folder {split_dir!r} holds no image files ({_extensions_text()}, in it "
                f"and its subfolders). Put the {split!r} images there, or remove the folder so "
                f"that split {split!r} reads the whole of config.data.folder."
            )
    else:
        files = all_files
        label = f"image folder {root!r}"

    results = _scan_images(files)
    bad = [(path, error) for path, (_, error) in zip(files, results) if error is not None]
    good = [path for path, (_, error) in zip(files, results) if error is None]
    if not good:
        example, error = bad[0]
        raise DataSourceError(
            f"{label} has no readable images: all {len(bad)} of its image files fail to "
            f"decode, e.g. {example} ({error}). The files ending in {_extensions_text()} must "
            f"be images that Pillow can read."
        )
    if bad:
        listed = "; ".join(f"{path} ({error})" for path, error in bad[:_MAX_LISTED_BAD_FILES])
        unlisted = len(bad) - _MAX_LISTED_BAD_FILES
        more = f"; and {unlisted} more" if unlisted > 0 else ""
        summary = (
            f"{len(bad)} of {len(files)} files in {label} are not readable images: {listed}{more}"
        )
        if field(data_config, "strict"):
            raise DataSourceError(f"{summary}. config.data.strict is True; remove or fix them.")
        if summary not in _WARNED_SUMMARIES:  # One warning, not one per pipeline built.
            _WARNED_SUMMARIES.add(summary)
            logging.warning("Skipping %s.", summary)
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

    return Source(
        label,
        len(good),
        len(class_ids),
        channels,
        make_records,
        decode,
        random_access=random_access,
    )


def resolve_source(data_config, split):
    """Checks ``config.data`` and resolves one split of its source; nothing is read yet.

    Only an image folder is read here (listed and probed once per file and process); a TFDS
    split is checked through its builder's metadata.

    Args:
        data_config: ``config.data``.
        split: split name, e.g. ``"train"``; TFDS slices such as ``"train[:90%]"`` work.

    Returns:
        The split as a :class:`Source`.

    Raises:
        DataSourceError: the source is missing, unreadable or contradicts ``config.data``.
        ValueError: an invalid field or a bad ``split`` argument.
    """
    _check_config_fields(data_config)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string such as 'train', got {split!r}.")
    name = field(data_config, "name")
    data_dir = field(data_config, "data_dir")
    if name == "folder":
        source = _resolve_folder(data_config, split)
    elif name == "digits":
        builder = digits_dataset.prepare_digits(data_dir)
        source = _resolve_tfds(data_config, split, builder, "digits")
    else:
        builder = _tfds_builder(name, data_dir)
        source = _resolve_tfds(data_config, split, builder, f"TFDS {name!r}")

    num_channels = field(data_config, "num_channels")
    if source.channels == 3 and num_channels == 1:
        raise DataSourceError(
            f"{source.description} has RGB images but config.data.num_channels is 1; "
            f"converting colour to grayscale is refused. Set num_channels to 3."
        )
    if field(data_config, "class_cond"):
        if source.num_classes is None:
            raise DataSourceError(
                f"config.data.class_cond is True but {source.description} has no class "
                f"labels (no ClassLabel feature 'label'). Set class_cond to False."
            )
        if field(data_config, "num_classes") != source.num_classes:
            raise DataSourceError(
                f"config.data.num_classes={field(data_config, 'num_classes')} does not match "
                f"the {source.num_classes} classes of {source.description}."
            )
    return source


def validate_data_config(data_config):
    """Checks ``config.data`` and its train and eval splits; raises ValueError on a problem.

    Call this before building a model, so a bad configuration fails at once. Checked: the
    fields, the source (known TFDS name, prepared data, an existing folder with readable
    images), both splits, labels for ``class_cond`` and ``num_classes``, and channels. The
    digits are prepared here on first use.

    Args:
        data_config: ``config.data``.

    Raises:
        DataSourceError: the data are missing, unreadable or contradict ``config.data``.
        ValueError: an invalid field. Both name the bad value and what is allowed.
    """
    for split_field in ("train_split", "eval_split"):
        resolve_source(data_config, field(data_config, split_field))


def dataset_num_examples(data_config, split):
    """Number of examples in ``split`` (readable images for folders).

    Args:
        data_config: ``config.data``.
        split: split name, e.g. ``config.data.train_split``; TFDS slices work.

    Returns:
        int.
    """
    source = resolve_source(data_config, split)
    if source.num_examples is not None:
        return source.num_examples
    return count_records(source)


def dataset_num_classes(data_config, split):
    """Number of classes of ``split``'s labels, or None when it has none (e.g. an unlabelled set).

    Args:
        data_config: ``config.data``.
        split: split name, e.g. ``config.data.train_split``.

    Returns:
        int or None.
    """
    fields = data_config if isinstance(data_config, dict) else data_config.to_dict()
    return resolve_source(dict(fields, class_cond=False), split).num_classes


def count_records(source):
    """Counts the records of ``source``, for a split of unknown size (under tfds mocking)."""
    records = source.make_records()
    cardinality = int(records.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(records.reduce(np.int64(0), lambda count, _: count + 1))
