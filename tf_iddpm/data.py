"""Input pipelines: training (shuffled, repeated, per-replica batches) and evaluation (one pass).

The training order is a pure function of (seed, step), so a resumed run reads exactly the
batches of the run it continues, on any replica layout (see :func:`make_train_dataset`). The
split itself comes from :mod:`tf_iddpm.data_sources`, which finds and checks the source and
describes it as a :class:`~tf_iddpm.data_sources.Source` (canonical order, decoding, random
access or TFRecord files); this module only decides which example each position reads, and
turns decoded uint8 examples into model inputs. Keeping the order apart from the file-system and
TFDS checks keeps it a small, pure tf.data function that the order tests pin bit for bit.

Every example becomes ``{"image": float32 [H, W, C] in [-1, 1]}``
(:func:`tf_iddpm.image_utils.normalize_images`). Grayscale is replicated to 3 channels when
``num_channels == 3``. An example also gets ``"label"`` (int32) when ``class_cond``, and
``"low_res"`` (area-downsampled image, float32 ``[h, w, C]``) when ``low_res_size > 0``. The
low-res image is the area average of the normalised target, as in improved-diffusion's
``super_res_train.py``.

The configuration and the source are checked (:func:`tf_iddpm.data_sources.resolve_source`)
before any pipeline is built. A problem with the data raises
:class:`tf_iddpm.data_sources.DataSourceError`, a bad argument a ``ValueError``; both say what
is wrong and what is allowed.
"""

import math

from absl import logging
import numpy as np
import tensorflow as tf

from tf_iddpm import config_utils
from tf_iddpm import data_sources
from tf_iddpm import image_utils

# A training split whose decoded (resized, uint8) images fit in this size is held in memory by
# every input pipeline, so small datasets (digits, CIFAR-10) are decoded and resized only once.
_CACHE_LIMIT_BYTES = 256 * 2**20
_AUTOTUNE = tf.data.AUTOTUNE


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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
    if source_channels == 1 and data_sources.field(data_config, "num_channels") == 3:
        image = tf.tile(image, [1, 1, 3])
    image = image_utils.normalize_images(image)
    if flip_seed is not None:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    features = {"image": image}
    if data_sources.field(data_config, "class_cond"):
        features["label"] = tf.cast(example["label"], tf.int32)
    low_res_size = data_sources.field(data_config, "low_res_size")
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
        raise data_sources.DataSourceError(
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
    raise data_sources.DataSourceError(
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
        DataSourceError: the data are missing, unreadable, empty, or contradict
            ``config.data`` (:class:`tf_iddpm.data_sources.DataSourceError`).
        ValueError: on a bad argument or field, or a ``num_replicas_in_sync`` that is not a
            multiple of ``num_input_pipelines``.
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
    source = data_sources.resolve_source(
        data_config, data_sources.field(data_config, "train_split")
    )
    num_examples = source.num_examples
    if num_examples is None:
        num_examples = data_sources.count_records(source)
    if num_examples == 0:
        raise data_sources.DataSourceError(f"{source.description} is empty; nothing to train on.")
    num_pipelines, pipeline_id, replicas_per_pipeline = _pipeline_position(input_context)
    local_size = batch_size * replicas_per_pipeline
    global_batch = local_size * num_pipelines
    start_position = int(start_step) * global_batch
    positions = _local_positions(
        start_position + pipeline_id * local_size, global_batch, local_size
    )
    permutation_key = _order_key(seed, _PERMUTATION_KEY)
    mechanism = _order_mechanism(
        source, num_examples, data_sources.field(data_config, "image_size")
    )
    random_flip = bool(data_sources.field(data_config, "random_flip"))
    flip_key = _order_key(seed, _FLIP_KEY)

    if mechanism == "stream":
        records = _record_stream(
            source,
            num_examples,
            seed,
            start_position,
            window=min(data_sources.field(data_config, "shuffle_buffer"), num_examples),
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
            positions.batch(data_sources.LOOKUP_CHUNK)
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
    split = split or data_sources.field(data_config, "eval_split")
    source = data_sources.resolve_source(data_config, split)
    num_pipelines, pipeline_id, local_replicas = _pipeline_position(input_context)

    records = source.make_records()
    total = (
        source.num_examples
        if source.num_examples is not None
        else data_sources.count_records(source)
    )
    if num_examples > 0:
        total = min(total, num_examples)
        records = records.take(total)
    if total == 0:
        raise data_sources.DataSourceError(f"{source.description} is empty; nothing to evaluate.")

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
