"""Config checks and the config stored in a workdir.

A workdir belongs to one experiment.  The first training run in it writes the resolved config to
``<workdir>/config.json`` once training really starts (:func:`resolve_config` decides and writes
nothing; ``train_lib.train`` calls :func:`persist_config`), so a start refused for a bad field or
missing data leaves the workdir as it was; every later run (resumed training, sampling, evaluation, export) reads
it back, so ``run.py --workdir=W --mode=sample`` needs no ``--config``.  A later run that does give
a config must agree with the stored one on every field that defines the experiment; it may differ
only in the fields of :data:`MUTABLE_FIELDS` (run length, logging cadence, where the data lives,
and everything about sampling, evaluation and export).

:func:`validate_config` turns the mistakes that would otherwise surface deep inside training
(an unknown schedule name, an image size the UNet has no default for, a global batch that the
replicas cannot share, ...) into one ``ValueError`` that lists them all, before any step runs.
It is the one owner of the rules on config fields: :func:`data_field_errors` (the ``config.data``
fields, also checked by ``tf_iddpm.data_sources`` before it reads anything), the model name rule
(:func:`model_name_error`, also used by ``export.export_lib``), the replica split
(:func:`batch_split_error`), the sampler (:class:`tf_iddpm.samplers.SamplerSpec`) and the names
options accept (:mod:`tf_iddpm.choices`).  Every entry point and mode calls it for the config it
runs; a config's fields are checked once per process (a valid config is remembered by its
content), so callers need not track whether someone checked it before.

Nothing here imports TensorFlow (only a ``gs://``-style workdir reaches for ``tf.io.gfile``), so
``run.py --help`` and config errors stay fast.
"""

import fnmatch
import json
import numbers
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import ml_collections

from tf_iddpm import choices
from tf_iddpm import fileio
from tf_iddpm import samplers
from tf_iddpm import schedules
from tf_iddpm import unet_options

CONFIG_FILENAME = "config.json"

MODES = ("train", "sample", "eval", "fid", "export")

# The config field of each UNet option (tf_iddpm.unet_options), for its messages.
UNET_OPTION_FIELDS = {
    "image_size": "data.image_size",
    "num_channels": "model.num_channels",
    "num_res_blocks": "model.num_res_blocks",
    "channel_mult": "model.channel_mult",
    "attention_resolutions": "model.attention_resolutions",
    "num_heads": "model.num_heads",
    "num_heads_upsample": "model.num_heads_upsample",
    "dropout": "model.dropout",
    "class_cond": "data.class_cond",
    "num_classes": "data.num_classes",
    "class_dropout": "model.class_dropout",
}

# Fields (glob patterns over dotted names) that may change between runs in one workdir: they
# say how long to train, how often to log or save, where the data is stored, or how to sample,
# evaluate and export, but not what is being trained.  Everything else must stay as stored,
# because the checkpoints in the workdir were produced by it.  `train.jit_compile` and
# `train.deterministic_ops` change how the step is compiled / which kernels run, not what it computes; `data.eval_split` only feeds evaluation.
MUTABLE_FIELDS = (
    "train.num_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "train.fid_*",
    "train.jit_compile",
    "train.deterministic_ops",
    "data.data_dir",
    "data.folder",
    "data.shuffle_buffer",
    "data.eval_split",
    "eval.*",
    "sample.*",
    "export.*",
    "fid.*",
)

# Mutable fields that name where the data lives: they change when the data moves to another disk.
LOCATION_FIELDS = ("data.data_dir", "data.folder")

# Image channels the data pipeline and the UNet support: grayscale or RGB.
SUPPORTED_NUM_CHANNELS = (1, 3)

# Names of exported models (TF-Serving model names and directory names).
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigConflictError(ValueError):
    """A config given for a workdir differs from the stored one in an experiment-defining field."""


# --------------------------------------------------------------------------------------------
# Parsing comma-separated fields.
# --------------------------------------------------------------------------------------------


def parse_float_list(text: str, *, field: str) -> Tuple[float, ...]:
    """Parses "0.9999,0.999" into (0.9999, 0.999); "" gives ().

    Raises:
      ValueError: if an item is not a number.
    """
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        return tuple(float(item) for item in items)
    except ValueError:
        raise ValueError(
            f"{field}={text!r}: expected comma-separated numbers, e.g. '0.9999'"
        ) from None


def ema_rates(config: ml_collections.ConfigDict) -> Tuple[float, ...]:
    """The EMA decay rates of ``config.train.ema_rate``, each checked to lie in (0, 1)."""
    rates = parse_float_list(config.train.ema_rate, field="train.ema_rate")
    if not rates:
        raise ValueError("train.ema_rate is empty; give at least one rate, e.g. '0.9999'")
    for rate in rates:
        if not 0.0 < rate < 1.0:
            raise ValueError(
                f"train.ema_rate={config.train.ema_rate!r}: every rate must lie in "
                f"(0, 1), got {rate}"
            )
    return rates


def channel_mult(config: ml_collections.ConfigDict) -> Tuple[int, ...]:
    """The UNet's per-level channel multipliers: ``model.channel_mult`` or the image size's default.

    Raises:
      ValueError: as :func:`tf_iddpm.unet_options.resolve_channel_mult`.
    """
    return unet_options.resolve_channel_mult(
        config.data.image_size, config.model.channel_mult, names=UNET_OPTION_FIELDS
    )


def attention_downsample_rates(config: ml_collections.ConfigDict) -> Tuple[int, ...]:
    """``model.attention_resolutions`` (pixel sizes, as in the reference) as downsample rates.

    Raises:
      ValueError: as :func:`tf_iddpm.unet_options.attention_downsample_rates`.
    """
    return unet_options.attention_downsample_rates(
        config.data.image_size,
        channel_mult(config),
        config.model.attention_resolutions,
        names=UNET_OPTION_FIELDS,
    )


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int; a ValueError naming ``name`` unless it is an int > 0 (bools are not)."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def model_name_error(name: Any, *, field: str = "export.model_name") -> Optional[str]:
    """Why ``name`` cannot name an exported model (TF-Serving model and directory), or None."""
    if isinstance(name, str) and MODEL_NAME_PATTERN.match(name):
        return None
    return (
        f"{field}={name!r} must be letters, digits, '_', '.' or '-' (it names TF-Serving "
        "models and directories)"
    )


def data_field_errors(data) -> List[str]:
    """Every problem of the ``config.data`` fields that needs no data access.

    The one place these rules live: :func:`validate_config` reports them with the rest of the
    config, and ``tf_iddpm.data_sources`` checks them before it reads a source (the data functions
    take ``config.data`` from any caller).

    Args:
      data: ``config.data`` (a ConfigDict or a dict with the fields of ``configs/base.py``).

    Returns:
      One message per invalid field (empty if all are valid).
    """
    errors = []
    name = data["name"]
    if not isinstance(name, str) or not name:
        errors.append(
            f"data.name={name!r} must be 'digits', 'folder' or a TFDS dataset name such "
            "as 'cifar10'"
        )
    elif name == "folder" and not data["folder"]:
        errors.append("data.name='folder' needs data.folder, the root directory of the images")
    image_size = data["image_size"]
    if not _is_int(image_size) or image_size < 8 or image_size % 8:
        errors.append(
            f"data.image_size={image_size!r} must be a multiple of 8 and at least 8 "
            "(8, 16, 32, 64, 128, 256, ...)"
        )
    num_channels = data["num_channels"]
    if not _is_int(num_channels) or num_channels not in SUPPORTED_NUM_CHANNELS:
        errors.append(f"data.num_channels={num_channels!r} must be one of {SUPPORTED_NUM_CHANNELS}")
    low_res_size = data["low_res_size"]
    if (
        not _is_int(low_res_size)
        or low_res_size < 0
        or (
            low_res_size
            and _is_int(image_size)
            and (low_res_size >= image_size or image_size % low_res_size)
        )
    ):
        errors.append(
            f"data.low_res_size={low_res_size!r} must be 0 (no super-resolution) or a "
            f"proper divisor of data.image_size={image_size!r}, e.g. 64 for 256"
        )
    num_classes, class_cond = data["num_classes"], data["class_cond"]
    if not _is_int(num_classes) or num_classes < 0:
        errors.append(f"data.num_classes={num_classes!r} must be an int >= 0")
    if not isinstance(class_cond, bool):
        errors.append(f"data.class_cond={class_cond!r} must be a bool")
    elif class_cond and _is_int(num_classes) and num_classes < 1:
        errors.append(f"data.class_cond=True needs data.num_classes >= 1, got {num_classes}")
    shuffle_buffer = data["shuffle_buffer"]
    if not _is_int(shuffle_buffer) or shuffle_buffer <= 0:
        errors.append(f"data.shuffle_buffer={shuffle_buffer!r} must be a positive int")
    return errors


def batch_split_error(
    config: ml_collections.ConfigDict, *, mode: str, num_replicas: int
) -> Optional[str]:
    """Why the batch size ``mode`` uses cannot be split over ``num_replicas`` replicas, or None."""
    batch_field = {
        "train": "train.batch_size",
        "sample": "sample.batch_size",
        "eval": "eval.batch_size",
        "fid": "sample.batch_size",
    }.get(mode)
    if batch_field is None:
        return None
    group, name = batch_field.split(".")
    batch_size = config[group][name]
    if batch_size > 0 and batch_size % num_replicas:
        return (
            f"{batch_field}={batch_size} is not divisible by the {num_replicas} replicas of "
            f"the distribution strategy; use a multiple of {num_replicas}"
        )
    return None


def _check_choice(errors: List[str], field: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        errors.append(f"{field}={value!r} is unknown; allowed: {', '.join(allowed)}")


def _check_positive(
    errors: List[str], config: ml_collections.ConfigDict, *fields: str, allow_zero: bool = False
) -> None:
    for field in fields:
        group, name = field.split(".")
        value = config[group][name]
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            errors.append(f"{field}={value!r} must be {bound}")


def _check_respacing(errors: List[str], field: str, respacing: str, num_timesteps: int) -> None:
    if not respacing:
        return
    try:
        schedules.space_timesteps(num_timesteps, respacing)
    except ValueError as e:
        errors.append(
            f"{field}={respacing!r} is not a valid respacing of diffusion.steps="
            f"{num_timesteps}: {e}"
        )


def _betas(config: ml_collections.ConfigDict):
    """The float64 betas of the config's process, or None when its fields are invalid (then
    reported by their own checks)."""
    diffusion = config.diffusion
    if diffusion.noise_schedule not in schedules.NOISE_SCHEDULES or not (
        _is_int(diffusion.steps) and diffusion.steps > 0
    ):
        return None
    return schedules.get_named_beta_schedule(diffusion.noise_schedule, diffusion.steps)


def _check_fid(errors: List[str], config: ml_collections.ConfigDict, mode: str) -> None:
    fid, train = config.fid, config.train
    _check_positive(errors, config, "fid.num_samples", "fid.batch_size", "train.fid_num_samples")
    _check_positive(errors, config, "train.fid_every", allow_zero=True)
    for field in ("fid.num_samples", "train.fid_num_samples"):
        group, name = field.split(".")
        if 0 < config[group][name] < 2:
            errors.append(
                f"{field}={config[group][name]} must be >= 2 (a covariance needs two samples)"
            )
    if config.diffusion.steps > 0:
        try:
            specs = samplers.sweep_specs(
                samplers.from_config(config.sample),
                fid.sweep,
                fid.sweep_samplers,
                config.diffusion.steps,
                betas=_betas(config),
                guidance_text=fid.guidance_sweep,
            )
        except ValueError as e:
            errors.append(str(e))
            specs = []
        for spec in specs:
            guidance = samplers.guidance_error(
                spec,
                class_cond=bool(config.data.class_cond),
                has_null_label=bool(config.data.class_cond) and config.model.class_dropout > 0,
                prefix="fid.guidance_sweep: sample.",
            )
            if guidance:
                errors.append(guidance)
                break
    needs = []
    if mode == "fid":
        needs = [("fid.ref_batch", fid.ref_batch), ("fid.inception", fid.inception)]
    elif mode == "train" and train.fid_every > 0:
        needs = [
            ("train.fid_ref_batch (or fid.ref_batch)", train.fid_ref_batch or fid.ref_batch),
            ("train.fid_inception (or fid.inception)", train.fid_inception or fid.inception),
        ]
    for field, value in needs:
        what = (
            "an evaluator-format reference batch .npz"
            if "ref_batch" in field
            else "the local path of classify_image_graph_def.pb (the 2015 Inception graph; "
            "see docs/sampling.md, 'The Inception graph')"
        )
        if not value:
            flag = "--ref_batch" if "ref_batch" in field else "--inception"
            errors.append(
                f"{field} is empty: {'run.py ' + flag if mode == 'fid' else field} needs {what}"
            )
        elif not _exists(value):
            errors.append(f"{field}={value!r} does not exist; it must be {what}")


# Configs (canonical JSON, mode) that validate_config found valid in this process.
_VALID_CONFIGS = set()


def validate_config(
    config: ml_collections.ConfigDict, *, num_replicas: Optional[int] = None, mode: str = "train"
) -> None:
    """Checks a config before anything is built from it; reports every problem at once.

    Every entry point and every mode calls this for the config it runs; the fields of one config
    are checked once per process (a config found valid is remembered by its content, so a later
    call for the same config and mode costs a JSON dump), and the replica split whenever
    ``num_replicas`` is given.

    Args:
      config: a config with the schema of ``configs/base.py``.
      num_replicas: the distribution strategy's replica count.  When given, the batch size used by
        ``mode`` (``train.batch_size``, ``sample.batch_size`` or ``eval.batch_size``) must divide by
        it, since each replica takes an equal share of the global batch.
      mode: one of :data:`MODES`; selects which batch size ``num_replicas`` constrains and which
        files the mode needs.

    Raises:
      ValueError: listing every invalid field, its value and what is allowed.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    key = (config_to_json(config), mode)
    errors = [] if key in _VALID_CONFIGS else _field_errors(config, mode)
    if num_replicas is not None:
        split_error = batch_split_error(config, mode=mode, num_replicas=num_replicas)
        if split_error:
            errors.append(split_error)
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
    _VALID_CONFIGS.add(key)


def _field_errors(config: ml_collections.ConfigDict, mode: str) -> List[str]:
    """Every problem of the config's fields (see validate_config)."""
    errors: List[str] = []
    data, model, diffusion, train = config.data, config.model, config.diffusion, config.train

    # data
    errors.extend(data_field_errors(data))

    # model
    errors.extend(
        unet_options.option_errors(
            image_size=data.image_size,
            num_channels=model.num_channels,
            num_res_blocks=model.num_res_blocks,
            channel_mult=model.channel_mult,
            attention_resolutions=model.attention_resolutions,
            num_heads=model.num_heads,
            num_heads_upsample=model.num_heads_upsample,
            dropout=model.dropout,
            class_cond=bool(data.class_cond),
            num_classes=data.num_classes if data.class_cond else None,
            class_dropout=model.class_dropout,
            names=UNET_OPTION_FIELDS,
        )
    )

    # diffusion
    _check_choice(
        errors, "diffusion.noise_schedule", diffusion.noise_schedule, schedules.NOISE_SCHEDULES
    )
    _check_choice(errors, "diffusion.cdf", diffusion.cdf, choices.CDF_MODES)
    _check_positive(errors, config, "diffusion.steps")
    if diffusion.steps > 0:
        for field, respacing in (
            ("diffusion.timestep_respacing", diffusion.timestep_respacing),
            ("eval.timestep_respacing", config.eval.timestep_respacing),
        ):
            _check_respacing(errors, field, respacing, diffusion.steps)

    # train
    _check_choice(
        errors, "train.schedule_sampler", train.schedule_sampler, choices.SCHEDULE_SAMPLERS
    )
    _check_choice(
        errors, "train.mixed_precision", train.mixed_precision, choices.MIXED_PRECISION_POLICIES
    )
    _check_positive(
        errors,
        config,
        "train.batch_size",
        "train.lr",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
    )
    _check_positive(
        errors,
        config,
        "train.weight_decay",
        "train.grad_clip",
        "train.num_steps",
        "train.sample_every",
        allow_zero=True,
    )
    try:
        ema_rates(config)
    except ValueError as e:
        errors.append(str(e))

    # eval, sample, export
    _check_positive(
        errors,
        config,
        "eval.batch_size",
        "sample.num_samples",
        "sample.batch_size",
        "export.max_batch_size",
    )
    _check_positive(errors, config, "eval.num_samples", allow_zero=True)
    spec = samplers.from_config(config.sample)
    base_kind = samplers.SAMPLER_KINDS.get(spec.kind)
    if mode == "fid" and config.fid.sweep.strip() and base_kind and not base_kind.solver:
        # In a sweep over network calls, sample.grid and sample.solver_order are the swept
        # solvers' (checked with the sweep's points in _check_fid), not the base sampler's.
        spec = spec.replace(grid=samplers.SamplerSpec.grid, order=0)
    errors.extend(spec.errors(max(diffusion.steps, 0), betas=_betas(config)))
    guidance = samplers.guidance_error(
        spec,
        class_cond=bool(data.class_cond),
        has_null_label=bool(data.class_cond) and model.class_dropout > 0,
    )
    if guidance:
        errors.append(guidance)
    label = config.sample.class_label
    if data.class_cond:
        if not -1 <= label < max(data.num_classes, 0):
            errors.append(
                f"sample.class_label={label} must be -1 (random labels) or lie in "
                f"[0, {data.num_classes})"
            )
    elif label != -1:
        errors.append(
            f"sample.class_label={label} given for an unconditional model "
            "(data.class_cond=False); leave it at -1"
        )
    _check_fid(errors, config, mode)
    name_error = model_name_error(config.export.model_name)
    if name_error:
        errors.append(name_error)

    # A rule two owners share (data.class_cond needs data.num_classes, for the data pipeline and
    # the network) is reported once.
    return list(dict.fromkeys(errors))


# --------------------------------------------------------------------------------------------
# The config stored in a workdir.
# --------------------------------------------------------------------------------------------


def _is_url(path: str) -> bool:
    return "://" in path


def _exists(path: str) -> bool:
    if _is_url(path):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def _read_text(path: str) -> str:
    if _is_url(path):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        with tf.io.gfile.GFile(path, "r") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The canonical JSON of a config: sorted keys, two-space indent, trailing newline."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"


def _deep_merge(defaults: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _migrate_renamed_fields(stored: Dict[str, Any], path: str) -> None:
    """Rewrites, in place, fields of configs stored before a field was renamed.

    * ``sample.use_ddim`` (bool) became ``sample.sampler`` ("ddim" or "ancestral").
    """
    sample = stored.get("sample")
    if isinstance(sample, dict) and "use_ddim" in sample:
        use_ddim = sample.pop("use_ddim")
        sample.setdefault("sampler", "ddim" if use_ddim else "ancestral")
        logging.info(
            "%s: sample.use_ddim=%s read as sample.sampler=%r", path, use_ddim, sample["sampler"]
        )


def load_config_json(
    path: str, defaults: Optional[ml_collections.ConfigDict] = None
) -> ml_collections.ConfigDict:
    """Reads a config written by :func:`config_to_json` into a locked ConfigDict.

    Args:
      path: the JSON file.
      defaults: optional config whose fields fill in any field the file lacks (a workdir started
        before the field was added to the schema); each filled field is logged.

    Returns:
      The config, locked like the ones ``run.py`` loads (no new fields can be added).

    Raises:
      ValueError: if the file is not a JSON object.
    """
    try:
        stored = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); restore it or start a new workdir"
        ) from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(stored).__name__}")
    _migrate_renamed_fields(stored, path)
    if defaults is not None:
        default_tree = defaults.to_dict()
        missing = sorted(set(_flatten(default_tree)) - set(_flatten(stored)))
        if missing:
            logging.warning("%s lacks %s; using the default values", path, ", ".join(missing))
        stored = _deep_merge(default_tree, stored)
    config = ml_collections.ConfigDict(stored)
    config.lock()
    return config


def stored_config_path(workdir: str) -> str:
    """Where a workdir keeps its config."""
    return os.path.join(workdir, CONFIG_FILENAME)


def stored_config_exists(workdir: str) -> bool:
    """Whether ``workdir`` has a stored config (it has been trained in)."""
    return _exists(stored_config_path(workdir))


def load_stored_config(
    workdir_or_path: str, defaults: Optional[ml_collections.ConfigDict] = None
) -> ml_collections.ConfigDict:
    """Loads ``<workdir>/config.json`` (or the JSON file itself when given its path).

    Raises:
      FileNotFoundError: if there is no stored config, with what to do instead.
    """
    path = workdir_or_path
    if not path.endswith(".json"):
        path = stored_config_path(workdir_or_path)
    if not _exists(path):
        raise FileNotFoundError(
            f"no stored config at {path}: start the workdir with "
            "--config=configs/<experiment>.py first"
        )
    return load_config_json(path, defaults)


def _is_mutable(field: str) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern in MUTABLE_FIELDS)


def _show(value: Any) -> str:
    return json.dumps(value)


def config_differences(
    stored: ml_collections.ConfigDict, given: ml_collections.ConfigDict
) -> Tuple[List[Tuple[str, Any, Any]], List[Tuple[str, Any, Any]]]:
    """Compares two configs field by field, in canonical (JSON) form.

    A field present on one side only counts as neither: it comes from a schema change, not from
    the user, and is reported by :func:`resolve_and_persist_config` as a warning.

    Returns:
      (conflicts, allowed): lists of (dotted field, stored value, given value), sorted by field;
      ``allowed`` holds the differences in :data:`MUTABLE_FIELDS`.
    """
    stored_flat = _flatten(json.loads(config_to_json(stored)))
    given_flat = _flatten(json.loads(config_to_json(given)))
    conflicts, allowed = [], []
    for field in sorted(set(stored_flat) & set(given_flat)):
        if stored_flat[field] != given_flat[field]:
            diff = (field, stored_flat[field], given_flat[field])
            (allowed if _is_mutable(field) else conflicts).append(diff)
    return conflicts, allowed


def _conflict_error(path: str, conflicts, given_as: str) -> ConfigConflictError:
    lines = "\n".join(f"  {field}: {_show(old)} -> {_show(new)}" for field, old, new in conflicts)
    if given_as == "overrides":
        return ConfigConflictError(
            f"the --config.* overrides conflict with the config stored in {path} "
            f"(field: stored -> given):\n{lines}\n"
            "The checkpoints in this workdir belong to the stored config; only fields that may "
            f"differ between runs can be overridden ({', '.join(MUTABLE_FIELDS)}). To run a "
            "different experiment, use a new --workdir."
        )
    return ConfigConflictError(
        f"the given config conflicts with the one stored in {path} "
        f"(field: stored -> given):\n{lines}\n"
        "The checkpoints in this workdir belong to the stored config. To continue this "
        "experiment, drop --config (the stored config is used) or change only fields that may "
        f"differ between runs ({', '.join(MUTABLE_FIELDS)}); to run a different experiment, "
        "use a new --workdir."
    )


def resolve_config(
    config: Optional[ml_collections.ConfigDict],
    workdir: str,
    *,
    config_given: bool,
    defaults: Optional[ml_collections.ConfigDict] = None,
    given_as: str = "config",
) -> ml_collections.ConfigDict:
    """Decides which config a run uses.  Writes nothing: see :func:`persist_config`.

    * First run in ``workdir`` (no ``config.json``): ``config`` is returned; it is
      required.  It is stored only once training really starts (``train_lib.train`` calls
      :func:`persist_config`), so a start refused before that leaves the workdir as it was.
    * Later run without a config: the stored config is loaded and returned.
    * Later run with a config: it must equal the stored one outside :data:`MUTABLE_FIELDS`,
      otherwise :class:`ConfigConflictError` lists the differing fields.  The given config is
      returned; the allowed differences are logged (a moved ``data.folder`` / ``data.data_dir``
      with its own line).

    Args:
      config: the config given on the command line, or None.
      workdir: the experiment's directory (need not exist).
      config_given: whether the user gave a config (``--config``, or ``--config.*`` overrides of
        the stored config).
      defaults: fills fields missing from an older ``config.json`` (see :func:`load_config_json`).
      given_as: "config" (a ``--config`` file) or "overrides" (``--config.*`` overrides of the
        stored config); only changes the wording of a conflict.

    The returned config is not validated here: the caller validates it once, after applying its
    own overrides (``run.py``: :func:`validate_config`; :func:`resolve_and_persist_config` too).

    Returns:
      The config to run with.

    Raises:
      ConfigConflictError: if a given config contradicts the stored one.
      FileNotFoundError: if neither a config is given nor one is stored.
    """
    path = stored_config_path(workdir)
    if config_given and config is None:
        raise ValueError("config_given=True but config is None")

    if not _exists(path):
        if not config_given:
            raise FileNotFoundError(
                f"{workdir} has no stored config ({CONFIG_FILENAME}) and no --config was given; "
                "start the run with e.g. --config=configs/digits.py"
            )
        return config

    if not config_given:
        stored = load_config_json(path, defaults)
        logging.info("Using the config stored in %s", path)
        return stored

    # No defaults here: a field the stored file lacks predates it, and is no conflict.
    stored = load_config_json(path)
    conflicts, allowed = config_differences(stored, config)
    if conflicts:
        raise _conflict_error(path, conflicts, given_as)
    stored_only = sorted(set(_flatten(stored.to_dict())) - set(_flatten(config.to_dict())))
    if stored_only:
        logging.warning(
            "%s has fields the given config lacks (ignored): %s", path, ", ".join(stored_only)
        )
    for field, old, new in allowed:
        if field in LOCATION_FIELDS:
            logging.warning(
                "%s moved: %s -> %s (stored in %s once training starts)",
                field,
                _show(old),
                _show(new),
                path,
            )
    if allowed:
        changes = ", ".join(f"{field}: {_show(old)} -> {_show(new)}" for field, old, new in allowed)
        logging.info("Config differs from %s in fields allowed to change: %s", path, changes)
    return config


def persist_config(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Stores ``config`` as ``<workdir>/config.json`` (atomically), creating the workdir.

    Training calls this once it really starts (its model built and checkpoint restored, before
    the first step): the first run stores its config, and a later run its changed mutable fields
    (a raised ``train.num_steps``, a moved ``data.folder``), so that a later run without a config
    continues with them.  Written with :func:`tf_iddpm.fileio.atomic_write_text`.

    Returns:
      Whether the file was written (False: it already held exactly this config).

    Raises:
      ConfigConflictError: if a stored config differs in a field outside :data:`MUTABLE_FIELDS`
        (:func:`resolve_config` refuses that earlier; this guards direct callers).
    """
    path = stored_config_path(workdir)
    text = config_to_json(config)
    if _exists(path):
        if _read_text(path) == text:
            return False
        conflicts, _ = config_differences(load_config_json(path), config)
        if conflicts:
            raise _conflict_error(path, conflicts, "config")
    fileio.atomic_write_text(path, text)
    logging.info("Stored the config of this workdir in %s", path)
    return True


def resolve_and_persist_config(
    config: Optional[ml_collections.ConfigDict],
    workdir: str,
    *,
    config_given: bool,
    update_mutable: bool = True,
    defaults: Optional[ml_collections.ConfigDict] = None,
) -> ml_collections.ConfigDict:
    """:func:`resolve_config`, then :func:`persist_config` on a first run or with ``update_mutable``.

    For callers that set up a workdir without training (tests, tools); the resolved config is
    validated (:func:`validate_config`) before anything is stored.  ``run.py`` resolves only;
    training persists once it starts, so a refused start writes nothing.
    """
    first_run = not _exists(stored_config_path(workdir))
    resolved = resolve_config(config, workdir, config_given=config_given, defaults=defaults)
    validate_config(resolved)
    if first_run or (config_given and update_mutable):
        persist_config(resolved, workdir)
    return resolved
