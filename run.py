"""Train, sample from, evaluate or export an Improved DDPM (Nichol & Dhariwal, 2021).

One workdir holds one experiment: its config (``config.json``, written once the first training run
really starts), checkpoints, TensorBoard logs, samples, bits/dim results and exports.

    # train (resumes from the newest readable checkpoint when the workdir already has one)
    python run.py --config=configs/cifar10_hybrid.py --workdir=/ckpt/cifar10 --mode=train
    # any config field can be overridden on the command line
    python run.py --config=configs/digits.py --config.train.batch_size=32 --workdir=w --mode=train
    # later runs reuse the stored config; --config.* overrides without --config apply to it
    python run.py --workdir=/ckpt/cifar10 --mode=train --config.train.num_steps=800000
    python run.py --workdir=/ckpt/cifar10 --mode=sample --sampler=ddim --steps=ddim50 --num_samples=64
    python run.py --workdir=/ckpt/cifar10 --mode=eval --num_samples=1000
    # FID, sFID, IS, precision, recall as guided-diffusion's evaluator (and a FID-vs-steps sweep)
    python run.py --workdir=/ckpt/cifar10 --mode=fid --ref_batch=ref.npz \\
        --inception=classify_image_graph_def.pb --num_samples=50000 --sweep=25,50,100,250,full
    python run.py --workdir=/ckpt/cifar10 --mode=export --export_dir=/models
    # an older checkpoint (e.g. when the newest is damaged)
    python run.py --workdir=/ckpt/cifar10 --mode=sample --checkpoint=/ckpt/cifar10/checkpoints/ckpt-5000

A start refused before training runs (an invalid field, a missing ``data.folder``, a conflict with
the stored config) writes nothing into the workdir.  Only the fields of
``config_utils.MUTABLE_FIELDS`` may differ from the stored config (run length, cadences, data
locations, sample / eval / export settings); a training run records them in ``config.json``.
Training skips a damaged newest checkpoint (kept in ``checkpoints/damaged/``); sampling, evaluation
and export refuse it with one line naming the damaged file.

Distribution: ``--strategy=auto|default|mirrored|multi_worker|tpu`` (``--tpu`` names the TPU;
``multi_worker`` reads the cluster from ``TF_CONFIG``).  ``--num_samples``, ``--batch_size``,
``--sampler``, ``--steps``, ``--ddim``, ``--eta``, ``--grid``, ``--order``, ``--class_label``, ``--use_ema``, ``--ref_batch``,
``--inception``, ``--sweep``, ``--sweep_samplers``, ``--guidance_scale`` and ``--guidance_sweep``
override the config's ``sample.*`` / ``eval.*`` / ``fid.*`` /
``export.*`` fields for one run; a flag that is not given leaves the config value alone.
``--checkpoint=PREFIX`` (sample / eval / fid / export) loads that checkpoint instead of the newest.

Output: the config summary, progress, losses and where results were written; TensorFlow's, oneDNN's
and TFDS's own INFO logging is hidden (``TF_CPP_MIN_LOG_LEVEL=2`` unless set, see
:mod:`tf_iddpm.console`).  ``-v 1`` (``--verbosity=1``) shows all of it and the full config.

Errors are printed as ``run.py: error: ...``; exit codes: 1 a config, flag or data error (nothing
ran), 2 a mode missing from this build, 3 a damaged or missing checkpoint.
"""

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Dict

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from configs import base as base_config
from tf_iddpm import config_utils
from tf_iddpm import console
from tf_iddpm import distribute
from tf_iddpm import fileio
from tf_iddpm import samplers

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. configs/cifar10_hybrid.py. Required on the first run in a "
    "workdir; later runs reuse <workdir>/config.json. Fields: --config.train.batch_size=64.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory of the experiment (config, checkpoints, logs).")
flags.DEFINE_enum("mode", "train", config_utils.MODES, "What to do.")
flags.DEFINE_enum(
    "strategy",
    "auto",
    distribute.STRATEGIES,
    "tf.distribute strategy; auto = tpu if --tpu is given, multi_worker if TF_CONFIG "
    "lists several tasks, mirrored if there are several GPUs, else default.",
)
flags.DEFINE_string("tpu", "", "TPU name, grpc://host:port, or 'local' on a TPU VM.")
flags.DEFINE_integer(
    "cpu_devices",
    0,
    "Split the CPU into this many logical devices (0: don't), so that "
    "--strategy=mirrored can run several replicas on a CPU-only machine.",
)

# Per-run overrides of the sample / eval / export groups.  Default None = "not given".
flags.DEFINE_integer(
    "num_samples", None, "sample: images to draw; eval: images to evaluate (0 = the whole split)."
)
flags.DEFINE_integer("batch_size", None, "sample / eval: global batch size.")
flags.DEFINE_string(
    "steps",
    None,
    "sample / fid: network calls per image; for ancestral and DDIM a timestep respacing, e.g. "
    "'50', 'ddim50', '10,10,10' ('' = every step of the trained process).  eval: the respacing "
    "of the bits/dim chain.",
)
flags.DEFINE_enum(
    "sampler",
    None,
    list(samplers.SAMPLER_KINDS),
    "sample / fid: the sampler (" + samplers.describe_kinds() + ").",
)
flags.DEFINE_boolean("ddim", None, "sample / fid: --ddim is --sampler=ddim, --noddim ancestral.")
flags.DEFINE_float("eta", None, "sample / fid: DDIM eta in [0, 1] (0 = deterministic).")
flags.DEFINE_enum(
    "grid",
    None,
    list(samplers.SOLVER_GRIDS),
    "sample / fid: a solver's timesteps, uniform in log-SNR, in t, or Karras et al.'s.",
)
flags.DEFINE_integer("order", None, "sample / fid: UniPC's order, 1-3 (0 = its default, 2).")
flags.DEFINE_float(
    "guidance_scale",
    None,
    "sample / fid: classifier-free guidance s (1 = the conditional model as trained, 0 = "
    "unconditional, > 1 guided); class-conditional models trained with model.class_dropout > 0.",
)
flags.DEFINE_string(
    "guidance_sweep",
    None,
    "fid: guidance scales to sweep, e.g. '0,1,1.5,2,3,5' (a table and a plot of the metrics "
    "against s).",
)
flags.DEFINE_integer(
    "class_label",
    None,
    "sample: class of every image (-1 = random labels); class-conditional models only.",
)
flags.DEFINE_boolean("use_ema", None, "sample / eval / export: use the EMA weights.")
flags.DEFINE_string("export_dir", None, "export: output base directory (default <workdir>/export).")
flags.DEFINE_string(
    "ref_batch",
    None,
    "fid: reference batch .npz in the guided-diffusion "
    "evaluator's format (arr_0 uint8 images, optional mu/sigma/mu_s/sigma_s).",
)
flags.DEFINE_string("inception", None, "fid: local path of classify_image_graph_def.pb.")
flags.DEFINE_string(
    "sweep",
    None,
    "fid: network calls to sweep, e.g. '10,25,50,100,full' "
    "(writes a table and a FID-vs-calls plot); '' = only the sample.* settings.",
)
flags.DEFINE_string(
    "sweep_samplers",
    None,
    "fid: the samplers of a sweep, e.g. 'ancestral,ddim,dpmpp_2m,unipc'.",
)
flags.DEFINE_string(
    "checkpoint",
    None,
    "sample / eval / fid / export: the checkpoint prefix to load, e.g. "
    "<workdir>/checkpoints/ckpt-10 (default: the newest in <workdir>/checkpoints).",
)
flags.mark_flag_as_required("workdir")

# mode -> (module, function).  Imported only when that mode runs, so --help stays fast and a mode
# whose module is missing does not break the others.
MODE_ENTRIES = {
    "train": ("tf_iddpm.train_lib", "train"),
    "sample": ("tf_iddpm.sample_lib", "sample"),
    "eval": ("tf_iddpm.eval_lib", "evaluate"),
    "fid": ("tf_iddpm.quality_lib", "evaluate_fid"),
    "export": ("export.export_lib", "export_from_workdir"),
}
# run flag -> {mode: config field it overrides in that mode}.
RUN_FLAG_FIELDS = {
    "num_samples": {
        "sample": "sample.num_samples",
        "eval": "eval.num_samples",
        "fid": "fid.num_samples",
    },
    "batch_size": {
        "sample": "sample.batch_size",
        "eval": "eval.batch_size",
        "fid": "sample.batch_size",
    },
    "steps": {
        "sample": "sample.timestep_respacing",
        "eval": "eval.timestep_respacing",
        "fid": "sample.timestep_respacing",
    },
    "sampler": {"sample": "sample.sampler", "fid": "sample.sampler"},
    "ddim": {"sample": "sample.sampler", "fid": "sample.sampler"},
    "eta": {"sample": "sample.eta", "fid": "sample.eta"},
    "grid": {"sample": "sample.grid", "fid": "sample.grid"},
    "order": {"sample": "sample.solver_order", "fid": "sample.solver_order"},
    "guidance_scale": {"sample": "sample.guidance_scale", "fid": "sample.guidance_scale"},
    "class_label": {"sample": "sample.class_label", "fid": "sample.class_label"},
    "use_ema": {
        "sample": "sample.use_ema",
        "eval": "eval.use_ema",
        "export": "export.use_ema",
        "fid": "sample.use_ema",
    },
    "export_dir": {"export": None},  # not a config field: passed to the exporter
    "ref_batch": {"fid": "fid.ref_batch"},
    "inception": {"fid": "fid.inception"},
    "sweep": {"fid": "fid.sweep"},
    "sweep_samplers": {"fid": "fid.sweep_samplers"},
    "guidance_sweep": {"fid": "fid.guidance_sweep"},
    "checkpoint": {
        "sample": None,
        "eval": None,
        "fid": None,
        "export": None,
    },  # passed to the mode entry
}

EXIT_CONFIG_ERROR = 1
EXIT_MODE_UNAVAILABLE = 2
EXIT_CHECKPOINT_ERROR = 3


class ModeUnavailableError(RuntimeError):
    """The module implementing a mode is not part of this build (or fails to import)."""


def check_mode_available(mode: str) -> None:
    """Fails fast, without importing anything heavy, when a mode's module does not exist.

    Raises:
      ModeUnavailableError: naming the mode and the missing module.
    """
    module_name, _ = MODE_ENTRIES[mode]
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as e:
        raise ModeUnavailableError(f"mode {mode!r} is not available in this build: {e}") from e
    if spec is None:
        raise ModeUnavailableError(
            f"mode {mode!r} is not available in this build: module {module_name} not found"
        )


def load_mode_entry(mode: str) -> Callable[..., Any]:
    """Imports and returns the function that runs ``mode``.

    Raises:
      ModeUnavailableError: if the module cannot be imported or lacks the function.
    """
    check_mode_available(mode)
    module_name, function_name = MODE_ENTRIES[mode]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModeUnavailableError(
            f"mode {mode!r} is not available in this build: importing {module_name} failed: {e}"
        ) from e
    entry = getattr(module, function_name, None)
    if entry is None:
        raise ModeUnavailableError(
            f"mode {mode!r} is not available in this build: {module_name} has no {function_name}()"
        )
    return entry


def given_run_flags(flag_values: flags.FlagValues) -> Dict[str, Any]:
    """The per-run flags given on the command line, with their values."""
    return {name: flag_values[name].value for name in RUN_FLAG_FIELDS if flag_values[name].present}


def apply_run_flags(config, mode: str, given: Dict[str, Any]) -> None:
    """Overrides ``config`` fields with the per-run flags given for ``mode``.

    Raises:
      ValueError: if a flag does not apply to ``mode`` (it would otherwise be silently ignored).
    """
    if "sampler" in given and "ddim" in given:
        raise ValueError("--ddim and --sampler both choose the sampler: give only --sampler")
    for name, value in sorted(given.items()):
        fields = RUN_FLAG_FIELDS[name]
        if mode not in fields:
            modes = " or ".join(f"--mode={m}" for m in fields)
            raise ValueError(f"--{name} applies to {modes}, not --mode={mode}")
        field = fields[mode]
        if field is None:
            continue
        if name == "ddim":  # the older flag of the DDIM sampler
            value = "ddim" if value else "ancestral"
        group, key = field.split(".")
        config[group][key] = value


def _fail(message: str, exit_code: int) -> None:
    print(f"run.py: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def _innermost_message(error: BaseException) -> str:
    # ConfigDict wraps a KeyError("'field'\nDid you mean ...") in an AttributeError.
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)


# The config file that loads a workdir's stored config (configs/from_workdir.py), found next to
# this file so that run.py works from any directory.
FROM_WORKDIR_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "configs", "from_workdir.py"
)

# Whose INFO log lines are shown without -v 1 (besides tf_iddpm's): this file and export/.
FIRST_PARTY_PATHS = (
    os.path.abspath(__file__),
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "export"),
)

# Set by parse_flags: the config is the workdir's stored one plus --config.* overrides.
_overrides_of_stored_config = False


def _flag_value(args, name):
    """The value of ``--name=V`` / ``--name V`` in ``args`` (the last one wins), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def with_stored_config_as_base(argv):
    """``argv``, plus ``--config=configs/from_workdir.py:<workdir>`` when it overrides config
    fields (``--config.train.num_steps=N``) without naming a ``--config``.

    Such overrides then apply to the workdir's stored config (extending a run:
    ``run.py --workdir=W --config.train.num_steps=20000``), and the usual rules hold: only fields of
    ``config_utils.MUTABLE_FIELDS`` may differ from the stored config.

    Returns:
      (argv to parse, whether the stored config was added as the base).
    """
    args = argv[1:]
    if "--" in args:
        args = args[: args.index("--")]
    if any(arg == "--config" or arg.startswith("--config=") for arg in args):
        return argv, False
    if not any(arg.startswith("--config.") for arg in args):
        return argv, False
    workdir = _flag_value(args, "workdir")
    if not workdir:
        return argv, False  # absl then reports the missing --workdir
    return [argv[0], f"--config={FROM_WORKDIR_CONFIG}:{workdir}"] + list(argv[1:]), True


def parse_flags(argv):
    """absl's flag parsing, plus clear errors for what config_flags reports lazily or raw.

    A ``--config.group.field=...`` naming a field that does not exist (the config is locked, so a
    typo cannot add a field), and a ``--config`` file that cannot be loaded, both end the program
    here, before anything runs.  ``--config.*`` overrides without ``--config`` apply to the
    workdir's stored config (see :func:`with_stored_config_as_base`).
    """
    global _overrides_of_stored_config
    argv, _overrides_of_stored_config = with_stored_config_as_base(argv)
    if _overrides_of_stored_config:
        workdir = _flag_value(argv[1:], "workdir")
        path = config_utils.stored_config_path(workdir)
        if not config_utils.stored_config_exists(workdir):
            _fail(
                f"--config.* overrides without --config apply to the config stored in the "
                f"workdir, and there is none ({path} does not exist): start the workdir with "
                "--config=configs/<experiment>.py",
                EXIT_CONFIG_ERROR,
            )
    try:
        args = app.parse_flags_with_usage(argv)
        # Before anything imports TensorFlow (the config files and the modules imported so far do
        # not): hide the frameworks' INFO logging unless -v 1.
        console.configure(FLAGS.verbosity, first_party=FIRST_PARTY_PATHS)
    except (AttributeError, KeyError) as e:
        overrides = " ".join(arg for arg in argv[1:] if arg.startswith("--config."))
        _fail(
            f"a --config override names a field that does not exist ({overrides}): "
            f"{_innermost_message(e)}\nThe config is locked: overrides can only change the "
            "fields of configs/base.py.",
            EXIT_CONFIG_ERROR,
        )
    try:
        if FLAGS.config is not None:
            FLAGS.config.to_dict()  # config_flags defers file-loading errors to first access
    except OSError as e:
        _fail(f"--config could not be loaded: {e}", EXIT_CONFIG_ERROR)
    return args


def config_summary(config) -> str:
    """One line naming what is trained: data, network, diffusion process and optimisation."""
    data, model, diffusion, train = config.data, config.model, config.diffusion, config.train
    condition = f", {data.num_classes} classes" if data.class_cond else ""
    low_res = f" from {data.low_res_size}x{data.low_res_size}" if data.low_res_size else ""
    loss = "L_vlb" if diffusion.use_kl else "L_hybrid" if diffusion.learn_sigma else "L_simple"
    return (
        f"{data.name} {data.image_size}x{data.image_size}x{data.num_channels}{low_res}"
        f"{condition} | UNet {model.num_channels} ch, {model.num_res_blocks} res blocks, "
        f"channel_mult {model.channel_mult or 'auto'}, attention at {model.attention_resolutions}"
        f" | T={diffusion.steps} {diffusion.noise_schedule}, {loss} | batch {train.batch_size}, "
        f"lr {train.lr}, {train.num_steps} steps, {train.schedule_sampler} t-sampler"
    )


def check_export_dir(mode: str, export_dir: str) -> None:
    """Refuses, before anything runs, an ``--export_dir`` that is not a directory.

    Raises:
      ValueError: naming the path and what it is.
    """
    error = fileio.directory_error(export_dir, what="--export_dir") if mode == "export" else None
    if error:
        raise ValueError(error)


def check_data_location(config, mode: str) -> None:
    """Refuses, before anything runs, a ``data.folder`` that does not exist (train / eval).

    The full data checks run in the modes (``data_sources.validate_data_config``); this cheap one
    gives the commonest refusal, data that moved, a one-line error.

    Raises:
      FileNotFoundError: naming the field and the missing directory.
    """
    if mode not in ("train", "eval") or config.data.name != "folder":
        return
    folder = os.path.abspath(os.path.expanduser(config.data.folder)) if config.data.folder else ""
    if "://" not in folder and not os.path.isdir(folder):
        raise FileNotFoundError(
            f"config.data.folder={folder!r} does not exist or is not a directory; give the image "
            "folder with --config.data.folder=DIR (it may differ from the stored one when the data "
            "moved)"
        )


def _checkpoint_error(error: BaseException) -> bool:
    """Whether ``error`` is a checkpoint problem for the user (damaged or missing checkpoint)."""
    # tf_iddpm.checkpoints imports TensorFlow: look it up only if the mode has imported it.
    module = sys.modules.get("tf_iddpm.checkpoints")
    return module is not None and isinstance(error, module.CheckpointError)


def _export_dir(workdir: str) -> str:
    return FLAGS.export_dir or os.path.join(workdir, "export")


def _data_source_error(error: BaseException) -> bool:
    """Whether ``error`` is a data problem for the user (e.g. a folder without readable images)."""
    # tf_iddpm.data_sources imports TensorFlow: look it up only if the mode has imported it.
    module = sys.modules.get("tf_iddpm.data_sources")
    return module is not None and isinstance(error, module.DataSourceError)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    mode, workdir = FLAGS.mode, FLAGS.workdir
    try:
        check_mode_available(mode)
    except ModeUnavailableError as e:
        _fail(str(e), EXIT_MODE_UNAVAILABLE)

    # Nothing below writes to the workdir before the mode runs: training stores config.json once
    # it really starts (train_lib.train), so a refused start leaves the workdir as it was.
    try:
        config = config_utils.resolve_config(
            FLAGS.config,
            workdir,
            config_given=FLAGS.config is not None,
            defaults=base_config.get_config(),
            given_as="overrides" if _overrides_of_stored_config else "config",
        )
        given = given_run_flags(FLAGS)
        apply_run_flags(config, mode, given)
        logging.info("%s in %s: %s", mode, workdir, config_summary(config))
        check_data_location(config, mode)
        check_export_dir(mode, _export_dir(workdir))
        # Every field now, before TensorFlow starts, and the batch split once the strategy is
        # known (the modes validate their config too: config_utils remembers it is valid).
        config_utils.validate_config(config, mode=mode)
        if console.quiet() and MODE_ENTRIES[mode][0] not in sys.modules:
            # TensorFlow's start-up banners bypass TF_CPP_MIN_LOG_LEVEL; see tf_iddpm.console.
            data_modes = mode != "export"  # export reads no dataset and imports no TFDS
            console.import_quietly(
                ["tensorflow"]
                + (["tensorflow_datasets"] if data_modes else [])
                + [MODE_ENTRIES[mode][0]]
            )
            if data_modes:
                console.disable_tfds_progress_bars()
        strategy = None
        if mode != "export":
            if FLAGS.cpu_devices:
                distribute.split_cpu(FLAGS.cpu_devices)
            strategy = distribute.get_strategy(FLAGS.strategy, FLAGS.tpu)
            config_utils.validate_config(
                config, mode=mode, num_replicas=distribute.num_replicas(strategy)
            )
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e), EXIT_CONFIG_ERROR)

    logging.vlog(1, "Mode %s in %s with config:\n%s", mode, workdir, config)
    try:
        entry = load_mode_entry(mode)
    except ModeUnavailableError as e:
        _fail(str(e), EXIT_MODE_UNAVAILABLE)
    kwargs = {"checkpoint": FLAGS.checkpoint} if FLAGS["checkpoint"].present else {}
    try:
        if mode == "export":
            entry(config, workdir, _export_dir(workdir), **kwargs)
        else:
            entry(config, workdir, strategy, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
        if _data_source_error(e):
            _fail(str(e), EXIT_CONFIG_ERROR)
        if not _checkpoint_error(e):
            raise
        _fail(str(e), EXIT_CHECKPOINT_ERROR)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
