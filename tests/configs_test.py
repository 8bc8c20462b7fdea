"""Tests for configs/*.py and tf_iddpm/config_utils.py (validation, the workdir's stored config)."""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from configs import base
from tf_iddpm import config_utils

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"

EXPERIMENTS = (
    "digits",
    "digits_cond",
    "tiny",
    "ablation",
    "cifar10_hybrid",
    "cifar10_vlb",
    "imagenet64_hybrid",
    "imagenet64_vlb",
    "imagenet64_cond",
    "lsun_bedroom",
    "upsample_64_256",
)


def load_with_config_flags(path, *overrides):
    """Loads a config file exactly as run.py does: config_flags, locked, with overrides."""
    flag_values = flags.FlagValues()
    argv = ["prog", f"--config={path}", *overrides]
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def flat(config):
    return config_utils._flatten(config.to_dict())  # pylint: disable=protected-access


def get_config(name):
    return importlib.import_module(f"configs.{name}").get_config()


# ------------------------------------------------------------------------------------------------
# Experiment files.
# ------------------------------------------------------------------------------------------------


def test_every_config_file_is_covered():
    files = {p.stem for p in CONFIG_DIR.glob("*.py")} - {"__init__", "base", "from_workdir"}
    assert files == set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_loads_through_config_flags_and_is_valid(name):
    config = load_with_config_flags(CONFIG_DIR / f"{name}.py")
    assert isinstance(config, ml_collections.ConfigDict)
    assert flat(config) == flat(get_config(name))
    config_utils.validate_config(config)
    # Same schema as base: experiments override fields, never add or drop them.
    assert set(flat(config)) == set(flat(base.get_config()))


# The improved-diffusion README "Models and Hyperparameters" flags, plus the defaults they rely on.
_PAPER_COMMON = {
    "diffusion.learn_sigma": True,
    "train.ema_rate": "0.9999",
    "model.num_heads": 4,
    "model.use_scale_shift_norm": True,
    "model.attention_resolutions": "16,8",
    "diffusion.rescale_timesteps": True,
    "diffusion.rescale_learned_sigmas": True,
    "diffusion.sigma_small": False,
    "diffusion.predict_xstart": False,
    "train.weight_decay": 0.0,
    "data.class_cond": False,
}
EXPECTED = {
    "cifar10_hybrid": {
        **_PAPER_COMMON,
        "data.name": "cifar10",
        "data.image_size": 32,
        "model.num_channels": 128,
        "model.num_res_blocks": 3,
        "model.dropout": 0.3,
        "diffusion.steps": 4000,
        "diffusion.noise_schedule": "cosine",
        "diffusion.use_kl": False,
        "train.lr": 1e-4,
        "train.batch_size": 128,
        "train.schedule_sampler": "uniform",
        "train.num_steps": 500_000,
    },
    "cifar10_vlb": {
        **_PAPER_COMMON,
        "data.name": "cifar10",
        "data.image_size": 32,
        "model.num_channels": 128,
        "model.num_res_blocks": 3,
        "model.dropout": 0.3,
        "diffusion.steps": 4000,
        "diffusion.noise_schedule": "cosine",
        "diffusion.use_kl": True,
        "train.lr": 1e-4,
        "train.batch_size": 128,
        "train.schedule_sampler": "loss-second-moment",
    },
    "imagenet64_hybrid": {
        **_PAPER_COMMON,
        "data.name": "imagenet_resized/64x64",
        "data.image_size": 64,
        "model.num_channels": 128,
        "model.num_res_blocks": 3,
        "model.dropout": 0.0,
        "diffusion.steps": 4000,
        "diffusion.noise_schedule": "cosine",
        "diffusion.use_kl": False,
        "train.lr": 1e-4,
        "train.batch_size": 128,
        "train.schedule_sampler": "uniform",
        "train.num_steps": 1_500_000,
    },
    "imagenet64_vlb": {
        **_PAPER_COMMON,
        "data.name": "imagenet_resized/64x64",
        "data.image_size": 64,
        "model.num_channels": 128,
        "model.num_res_blocks": 3,
        "diffusion.steps": 4000,
        "diffusion.noise_schedule": "cosine",
        "diffusion.use_kl": True,
        "train.lr": 1e-4,
        "train.batch_size": 128,
        "train.schedule_sampler": "loss-second-moment",
    },
    "imagenet64_cond": {
        **_PAPER_COMMON,
        "data.name": "imagenet_resized/64x64",
        "data.image_size": 64,
        "data.class_cond": True,
        "data.num_classes": 1000,
        "model.num_channels": 192,
        "model.num_res_blocks": 3,
        "diffusion.steps": 4000,
        "diffusion.noise_schedule": "cosine",
        "diffusion.use_kl": False,
        "diffusion.rescale_learned_sigmas": False,
        "diffusion.rescale_timesteps": False,
        "train.lr": 3e-4,
        "train.batch_size": 2048,
        "train.num_steps": 250_000,
    },
    "lsun_bedroom": {
        **_PAPER_COMMON,
        "data.name": "lsun/bedroom",
        "data.image_size": 256,
        "model.num_channels": 128,
        "model.num_res_blocks": 2,
        "model.num_heads": 1,
        "model.use_scale_shift_norm": False,
        "model.attention_resolutions": "16",
        "diffusion.steps": 1000,
        "diffusion.noise_schedule": "linear",
        "diffusion.rescale_learned_sigmas": False,
        "diffusion.rescale_timesteps": False,
        "train.lr": 1e-4,
        "train.batch_size": 128,
        "train.num_steps": 1_200_000,
    },
    "upsample_64_256": {
        **_PAPER_COMMON,
        "data.name": "imagenet2012",
        "data.image_size": 256,
        "data.low_res_size": 64,
        "data.class_cond": True,
        "data.num_classes": 1000,
        "model.num_channels": 192,
        "model.num_res_blocks": 2,
        "diffusion.steps": 4000,
        "diffusion.noise_schedule": "linear",
        "diffusion.rescale_learned_sigmas": False,
        "diffusion.rescale_timesteps": False,
        "train.lr": 3e-4,
        "train.batch_size": 256,
        "train.num_steps": 500_000,
    },
    "digits": {
        "data.name": "digits",
        "data.image_size": 16,
        "data.num_channels": 1,
        "model.num_channels": 32,
        "model.num_res_blocks": 2,
        "model.channel_mult": "1,2",
        "model.attention_resolutions": "8",
        "model.dropout": 0.1,
        "diffusion.steps": 1000,
        "diffusion.noise_schedule": "cosine",
        "diffusion.learn_sigma": True,
        "diffusion.use_kl": False,
        "train.batch_size": 64,
        "train.lr": 5e-4,
        "train.ema_rate": "0.99",
    },
    "tiny": {
        "data.name": "digits",
        "data.image_size": 8,
        "data.num_channels": 3,
        "model.num_channels": 32,
        "model.num_res_blocks": 1,
        "model.channel_mult": "1,2",
        "diffusion.steps": 100,
        "diffusion.learn_sigma": True,
        "train.batch_size": 16,
        "train.num_steps": 20,
        "train.checkpoint_every": 10,
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hyperparameters_match_the_paper_and_readme(name):
    values = flat(get_config(name))
    mismatches = {
        field: (values[field], want)
        for field, want in EXPECTED[name].items()
        if values[field] != want
    }
    assert not mismatches, mismatches


# improved-diffusion@1bc7bbb: the defaults of scripts/image_train.py's flags
# (script_util.model_and_diffusion_defaults() and create_argparser()) and
# super_res_train.py's (sr_model_and_diffusion_defaults(): large_size 256, small_size 64).
REFERENCE_DEFAULTS = {
    "image_size": "64",
    "num_channels": "128",
    "num_res_blocks": "2",
    "num_heads": "4",
    "num_heads_upsample": "-1",
    "attention_resolutions": "16,8",
    "dropout": "0.0",
    "learn_sigma": "False",
    "sigma_small": "False",
    "class_cond": "False",
    "diffusion_steps": "1000",
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": "False",
    "predict_xstart": "False",
    "rescale_timesteps": "True",
    "rescale_learned_sigmas": "True",
    "use_scale_shift_norm": "True",
    "schedule_sampler": "uniform",
    "lr": "1e-4",
    "weight_decay": "0.0",
    "ema_rate": "0.9999",
}
SUPER_RES_DEFAULTS = {"large_size": "256", "small_size": "64"}
# reference flag -> config field
REFERENCE_FLAG_FIELDS = {
    "image_size": "data.image_size",
    "large_size": "data.image_size",
    "small_size": "data.low_res_size",
    "class_cond": "data.class_cond",
    "num_channels": "model.num_channels",
    "num_res_blocks": "model.num_res_blocks",
    "num_heads": "model.num_heads",
    "num_heads_upsample": "model.num_heads_upsample",
    "attention_resolutions": "model.attention_resolutions",
    "dropout": "model.dropout",
    "use_scale_shift_norm": "model.use_scale_shift_norm",
    "learn_sigma": "diffusion.learn_sigma",
    "sigma_small": "diffusion.sigma_small",
    "diffusion_steps": "diffusion.steps",
    "noise_schedule": "diffusion.noise_schedule",
    "timestep_respacing": "diffusion.timestep_respacing",
    "use_kl": "diffusion.use_kl",
    "predict_xstart": "diffusion.predict_xstart",
    "rescale_timesteps": "diffusion.rescale_timesteps",
    "rescale_learned_sigmas": "diffusion.rescale_learned_sigmas",
    "schedule_sampler": "train.schedule_sampler",
    "lr": "train.lr",
    "weight_decay": "train.weight_decay",
    "batch_size": "train.batch_size",
    "ema_rate": "train.ema_rate",
}
# The improved-diffusion README's commands ("Models and Hyperparameters"), as given in issue #13.
README_FLAGS = {
    "cifar10_hybrid": "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
    "--dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine --lr 1e-4 "
    "--batch_size 128",
    "imagenet64_hybrid": "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
    "--diffusion_steps 4000 --noise_schedule cosine --lr 1e-4 --batch_size 128",
}
README_FLAGS["cifar10_vlb"] = README_FLAGS["cifar10_hybrid"] + (
    " --use_kl True --schedule_sampler loss-second-moment --lr 1e-4"
)
README_FLAGS["imagenet64_vlb"] = README_FLAGS["imagenet64_hybrid"] + (
    " --use_kl True --schedule_sampler loss-second-moment --lr 1e-4"
)
PAPER_CONFIGS = (
    "cifar10_hybrid",
    "cifar10_vlb",
    "imagenet64_hybrid",
    "imagenet64_vlb",
    "imagenet64_cond",
    "lsun_bedroom",
    "upsample_64_256",
)


def _parse_flags(text):
    tokens = text.split()
    assert len(tokens) % 2 == 0 and all(t.startswith("--") for t in tokens[::2]), text
    return {name[2:]: value for name, value in zip(tokens[::2], tokens[1::2])}


def _docstring_flags(name):
    """The reference command a config's docstring says it reproduces (its *_FLAGS="..." lines)."""
    doc = importlib.import_module(f"configs.{name}").__doc__
    flags_text = " ".join(re.findall(r'^\s*[A-Z_]+_FLAGS="([^"]*)"', doc, re.M))
    assert flags_text, f"configs/{name}.py's docstring quotes no reference flags"
    return _parse_flags(flags_text)


def _as_config_value(text, current):
    if isinstance(current, bool):
        return {"True": True, "False": False}[text]
    return type(current)(text)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_resolve_to_the_reference_command(name):
    """Each paper config, resolved, equals the reference script's flags (its docstring's command,
    on top of the script's defaults); the docstrings quote the improved-diffusion README."""
    given = _docstring_flags(name)
    if name in README_FLAGS:
        assert given == _parse_flags(README_FLAGS[name])
    reference = {
        **REFERENCE_DEFAULTS,
        **(SUPER_RES_DEFAULTS if "large_size" in given or name.startswith("upsample") else {}),
        **given,
    }
    if "large_size" in reference:
        del reference["image_size"]
    values = flat(get_config(name))
    mismatches = {}
    for flag, text in reference.items():
        field = REFERENCE_FLAG_FIELDS[flag]
        want = _as_config_value(text, values[field])
        if values[field] != want:
            mismatches[f"--{flag} {text}"] = (field, values[field])
    assert not mismatches, mismatches


_ASSIGNMENT = re.compile(r"^\s+config\.(\w+)\.(\w+) = ", re.M)
_PARENT = re.compile(r"^from configs import (\w+)$", re.M)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_files_hold_only_real_overrides(name):
    """configs/base.py's promise: nothing is copied. Every field an experiment file sets differs
    from the config it derives from."""
    text = (CONFIG_DIR / f"{name}.py").read_text()
    parents = _PARENT.findall(text)
    assert len(parents) == 1, f"configs/{name}.py should derive from exactly one config"
    parent_values = flat(get_config(parents[0]))
    values = flat(get_config(name))
    restated = [
        f"{group}.{field}"
        for group, field in _ASSIGNMENT.findall(text)
        if values[f"{group}.{field}"] == parent_values[f"{group}.{field}"]
    ]
    assert not restated, (
        f"configs/{name}.py restates {restated}, already the values of configs/{parents[0]}.py"
    )


def test_config_files_need_no_sys_path_preamble():
    """One loading mechanism: configs import each other as the `configs` package."""
    offenders = [
        p.name
        for p in CONFIG_DIR.glob("*.py")
        if re.search(r"^\s*(import sys|sys\.path\.)", p.read_text(), re.M)
    ]
    assert not offenders


@pytest.mark.parametrize(
    "name, want_channel_mult, want_attention_rates",
    [
        ("cifar10_hybrid", (1, 2, 2, 2), (2, 4)),
        ("imagenet64_hybrid", (1, 2, 3, 4), (4, 8)),
        ("lsun_bedroom", (1, 1, 2, 2, 4, 4), (16,)),
        ("upsample_64_256", (1, 1, 2, 2, 4, 4), (16, 32)),
        ("digits", (1, 2), (2,)),
        ("tiny", (1, 2), (2,)),
    ],
)
def test_resolved_unet_levels(name, want_channel_mult, want_attention_rates):
    config = get_config(name)
    assert config_utils.channel_mult(config) == want_channel_mult
    assert config_utils.attention_downsample_rates(config) == want_attention_rates


# (variant, the config it derives from, the fields it is meant to change)
VARIANTS = [
    (
        "ablation",
        "tiny",
        {
            "diffusion.steps",
            "train.batch_size",
            "train.log_every",
            "train.checkpoint_every",
            "eval.batch_size",
            "sample.batch_size",
            "export.model_name",
        },
    ),
    (
        "cifar10_vlb",
        "cifar10_hybrid",
        {"diffusion.use_kl", "train.schedule_sampler", "export.model_name"},
    ),
    (
        "imagenet64_vlb",
        "imagenet64_hybrid",
        {"diffusion.use_kl", "train.schedule_sampler", "export.model_name"},
    ),
    (
        "imagenet64_cond",
        "imagenet64_hybrid",
        {
            "data.class_cond",
            "data.num_classes",
            "model.num_channels",
            "diffusion.rescale_learned_sigmas",
            "diffusion.rescale_timesteps",
            "train.lr",
            "train.batch_size",
            "train.num_steps",
            "export.model_name",
        },
    ),
    (
        "cifar10_hybrid",
        "imagenet64_hybrid",
        {
            "data.name",
            "data.eval_split",
            "data.image_size",
            "model.dropout",
            "train.num_steps",
            "export.model_name",
        },
    ),
]


@pytest.mark.parametrize("variant, parent, intended", VARIANTS)
def test_variants_differ_from_their_parent_only_where_intended(variant, parent, intended):
    variant_values, parent_values = flat(get_config(variant)), flat(get_config(parent))
    changed = {f for f in parent_values if parent_values[f] != variant_values[f]}
    assert changed == intended


def test_override_on_the_command_line_changes_only_that_field():
    config = load_with_config_flags(
        CONFIG_DIR / "cifar10_hybrid.py",
        "--config.train.batch_size=64",
        "--config.model.dropout=0.1",
    )
    default = get_config("cifar10_hybrid")
    changed = {f: v for f, v in flat(config).items() if flat(default)[f] != v}
    assert changed == {"train.batch_size": 64, "model.dropout": 0.1}


def test_override_with_a_typo_fails():
    with pytest.raises(AttributeError, match='Did you mean "batch_size"'):
        load_with_config_flags(CONFIG_DIR / "tiny.py", "--config.train.batchsize=3")


@pytest.mark.slow
def test_config_file_loads_from_outside_the_repository(tmp_path):
    # run.py started in an unrelated directory, without PYTHONPATH: Python puts run.py's directory
    # (the checkout) first on sys.path, so a config file's `from configs import ...` resolves to
    # this checkout's configs package, with no path code in the config files.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "run.py"),
            f"--config={CONFIG_DIR / 'imagenet64_cond.py'}",
            f"--workdir={tmp_path / 'work'}",
            "--mode=export",
            f"--checkpoint={tmp_path / 'none'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Loaded and summarised; then refused (exit 3) for the checkpoint that does not exist.
    assert result.returncode == 3 and "no such checkpoint" in result.stderr, result.stderr
    summary = re.search(r"export in .*: (.*)", result.stderr).group(1)
    assert re.search(r"UNet 192 ch\b", summary), summary
    assert "lr 0.0003" in summary and "T=4000" in summary, summary


def test_from_workdir_config_returns_the_stored_config(tmp_path):
    stored = get_config("tiny")
    stored.train.lr = 1e-3
    config_utils.resolve_and_persist_config(stored, str(tmp_path), config_given=True)
    loaded = load_with_config_flags(
        f"{CONFIG_DIR / 'from_workdir.py'}:{tmp_path}", "--config.sample.eta=0.5"
    )
    assert loaded.train.lr == 1e-3
    assert loaded.sample.eta == 0.5
    assert flat(loaded) == {**flat(stored), "sample.eta": 0.5}


def test_from_workdir_config_fills_fields_the_stored_config_predates(tmp_path):
    old = get_config("tiny").to_dict()
    del old["diffusion"]["cdf"]  # a field added to the schema later
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = load_with_config_flags(
        f"{CONFIG_DIR / 'from_workdir.py'}:{tmp_path}", "--config.train.num_steps=40"
    )
    assert loaded.diffusion.cdf == base.get_config().diffusion.cdf
    assert loaded.train.num_steps == 40


def test_from_workdir_config_needs_a_workdir():
    # config_flags re-raises the file's ValueError as a flag error, with the message kept.
    with pytest.raises(flags.IllegalFlagValueError, match="needs the workdir after a colon"):
        load_with_config_flags(CONFIG_DIR / "from_workdir.py")


# ------------------------------------------------------------------------------------------------
# validate_config.
# ------------------------------------------------------------------------------------------------


def _tiny_with(**overrides):
    config = get_config("tiny")
    for field, value in overrides.items():
        group, key = field.split("__")
        config[group][key] = value
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"diffusion__noise_schedule": "cosin"},
            "diffusion.noise_schedule='cosin' is unknown; allowed: linear, cosine",
        ),
        (
            {"train__schedule_sampler": "importance"},
            "train.schedule_sampler='importance' is unknown; allowed: uniform, loss-second-moment",
        ),
        (
            {"train__mixed_precision": "mixed_float16"},
            "train.mixed_precision='mixed_float16' is unknown; allowed: float32, mixed_bfloat16",
        ),
        ({"diffusion__cdf": "tanh"}, "diffusion.cdf='tanh' is unknown"),
        (
            {"data__image_size": 48, "model__channel_mult": ""},
            "data.image_size=48 has no default UNet channel_mult (defaults exist for 32, 64, 128, 256)",
        ),
        ({"data__image_size": 9}, "data.image_size=9 is not divisible by 2"),
        ({"model__attention_resolutions": "16"}, "16 is not a resolution of this UNet"),
        ({"model__num_channels": 40}, "not divisible by the 32 groups of GroupNorm"),
        ({"model__num_heads": 3}, "model.num_heads=3 must be >= 1 and divide"),
        (
            {"model__channel_mult": "1,x"},
            "model.channel_mult='1,x': expected comma-separated integers",
        ),
        ({"train__ema_rate": "0.99,1.5"}, "every rate must lie in (0, 1), got 1.5"),
        ({"train__batch_size": 0}, "train.batch_size=0 must be > 0"),
        ({"train__lr": -1e-4}, "train.lr=-0.0001 must be > 0"),
        ({"data__class_cond": True}, "data.class_cond=True needs data.num_classes >= 1"),
        (
            {"data__low_res_size": 3},
            "data.low_res_size=3 must be 0 (no super-resolution) or a proper",
        ),
        ({"data__name": "folder"}, "data.name='folder' needs data.folder"),
        (
            {"sample__timestep_respacing": "ddim51"},
            "sample.timestep_respacing='ddim51' is not a valid",
        ),
        ({"eval__timestep_respacing": "200"}, "eval.timestep_respacing='200' is not a valid"),
        ({"sample__eta": 0.5}, "sample.eta=0.5 only applies to ddim"),
        ({"sample__class_label": 3}, "sample.class_label=3 given for an unconditional model"),
        ({"export__model_name": "my model"}, "export.model_name='my model' must be letters"),
    ],
)
def test_validate_config_rejects(overrides, message):
    with pytest.raises(ValueError) as error:
        config_utils.validate_config(_tiny_with(**overrides))
    assert message in str(error.value)


def test_validate_config_reports_every_problem_at_once():
    config = _tiny_with(
        diffusion__noise_schedule="cosin", train__schedule_sampler="x", train__batch_size=15
    )
    with pytest.raises(ValueError) as error:
        config_utils.validate_config(config, num_replicas=2)
    lines = [line for line in str(error.value).splitlines() if line.startswith("  - ")]
    assert len(lines) == 3
    assert "train.batch_size=15 is not divisible by the 2 replicas" in str(error.value)


@pytest.mark.parametrize(
    "mode, field",
    [
        ("train", "train__batch_size"),
        ("sample", "sample__batch_size"),
        ("eval", "eval__batch_size"),
    ],
)
def test_validate_config_checks_the_batch_of_the_mode_against_replicas(mode, field):
    config = _tiny_with(**{field: 6})
    config_utils.validate_config(config, num_replicas=3, mode=mode)
    config_utils.validate_config(config, num_replicas=4, mode="export")  # no batch to split
    with pytest.raises(ValueError, match="=6 is not divisible by the 4 replicas"):
        config_utils.validate_config(config, num_replicas=4, mode=mode)


def test_validate_config_accepts_the_class_conditional_label_range():
    config = get_config("imagenet64_cond")
    config.sample.class_label = 999
    config_utils.validate_config(config)
    config.sample.class_label = 1000
    with pytest.raises(ValueError, match=r"sample.class_label=1000 must be -1 .* \[0, 1000\)"):
        config_utils.validate_config(config)


def test_validate_config_rejects_unknown_mode():
    with pytest.raises(
        ValueError, match="unknown mode 'serve'; allowed: train, sample, eval, fid, export"
    ):
        config_utils.validate_config(get_config("tiny"), mode="serve")


def test_ema_rates_parses_several_rates():
    config = _tiny_with(train__ema_rate="0.9999, 0.999")
    assert config_utils.ema_rates(config) == (0.9999, 0.999)


# ------------------------------------------------------------------------------------------------
# The config stored in a workdir.
# ------------------------------------------------------------------------------------------------


def test_first_run_stores_the_config_and_later_runs_reload_it(tmp_path):
    workdir = str(tmp_path / "run")
    config = get_config("tiny")
    config.train.lr = 1e-3
    returned = config_utils.resolve_and_persist_config(config, workdir, config_given=True)
    assert returned is config
    path = tmp_path / "run" / "config.json"
    assert json.loads(path.read_text()) == config.to_dict()
    assert os.listdir(tmp_path / "run") == ["config.json"]  # no temporary file left behind

    reloaded = config_utils.resolve_and_persist_config(None, workdir, config_given=False)
    assert flat(reloaded) == flat(config)
    assert isinstance(reloaded.train.lr, float) and isinstance(reloaded.train.batch_size, int)
    with pytest.raises(AttributeError):
        reloaded.train.new_field = 1  # locked like run.py's configs


def test_conflicting_config_is_refused_with_the_field_list(tmp_path):
    workdir = str(tmp_path)
    config_utils.resolve_and_persist_config(get_config("tiny"), workdir, config_given=True)
    before = (tmp_path / "config.json").read_text()
    given = get_config("tiny")
    given.train.lr = 1e-3
    given.model.num_channels = 64
    given.train.num_steps = 500  # allowed to change
    with pytest.raises(config_utils.ConfigConflictError) as error:
        config_utils.resolve_and_persist_config(given, workdir, config_given=True)
    message = str(error.value)
    listed = [line for line in message.splitlines() if line.startswith("  ")]
    assert listed == ["  model.num_channels: 32 -> 64", "  train.lr: 0.0005 -> 0.001"]
    assert "drop --config" in message and "new --workdir" in message
    assert (tmp_path / "config.json").read_text() == before


def test_mutable_fields_may_change_and_training_runs_record_them(tmp_path):
    workdir = str(tmp_path)
    config_utils.resolve_and_persist_config(get_config("tiny"), workdir, config_given=True)
    given = get_config("tiny")
    given.train.num_steps = 500
    given.sample.num_samples = 7
    given.data.data_dir = "/elsewhere"

    returned = config_utils.resolve_and_persist_config(
        given, workdir, config_given=True, update_mutable=False
    )
    assert returned.train.num_steps == 500
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == 20

    config_utils.resolve_and_persist_config(given, workdir, config_given=True, update_mutable=True)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert (
        stored["train"]["num_steps"],
        stored["sample"]["num_samples"],
        stored["data"]["data_dir"],
    ) == (500, 7, "/elsewhere")


def test_resolving_writes_nothing_and_persisting_stores_the_config(tmp_path):
    workdir = tmp_path / "new_run"
    config = get_config("tiny")
    assert config_utils.resolve_config(config, str(workdir), config_given=True) is config
    assert not workdir.exists()  # a refused start leaves nothing behind
    assert config_utils.persist_config(config, str(workdir))
    assert json.loads((workdir / "config.json").read_text()) == config.to_dict()
    assert not config_utils.persist_config(config, str(workdir))  # unchanged: not rewritten
    assert os.listdir(workdir) == ["config.json"]

    other = get_config("tiny")
    other.model.num_channels = 64
    with pytest.raises(config_utils.ConfigConflictError, match="model.num_channels: 32 -> 64"):
        config_utils.persist_config(other, str(workdir))
    assert json.loads((workdir / "config.json").read_text()) == config.to_dict()


def test_moved_data_is_allowed_logged_and_recorded_once_training_persists(tmp_path, caplog):
    workdir = str(tmp_path)
    stored = _tiny_with(data__name="folder", data__folder="/old/disk/images")
    config_utils.persist_config(stored, workdir)
    given = _tiny_with(
        data__name="folder", data__folder="/new/disk/images", data__data_dir="/new/tfds"
    )
    with caplog.at_level("WARNING"):
        resolved = config_utils.resolve_config(given, workdir, config_given=True)
    assert resolved.data.folder == "/new/disk/images"
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith('data.folder moved: "/old/disk/images" -> "/new/disk/images"')
        for m in messages
    ), messages
    assert any(m.startswith('data.data_dir moved: "" -> "/new/tfds"') for m in messages), messages
    assert (
        json.loads((tmp_path / "config.json").read_text())["data"]["folder"] == "/old/disk/images"
    )
    config_utils.persist_config(resolved, workdir)
    assert (
        json.loads((tmp_path / "config.json").read_text())["data"]["folder"] == "/new/disk/images"
    )


def test_overrides_of_the_stored_config_name_the_overrides_in_a_conflict(tmp_path):
    config_utils.persist_config(get_config("tiny"), str(tmp_path))
    given = get_config("tiny")
    given.seed = 3
    with pytest.raises(config_utils.ConfigConflictError) as error:
        config_utils.resolve_config(given, str(tmp_path), config_given=True, given_as="overrides")
    assert str(error.value).startswith("the --config.* overrides conflict with the config stored")
    assert "  seed: 0 -> 3" in str(error.value)


def test_config_differences_splits_conflicts_from_allowed_changes():
    stored, given = get_config("tiny"), get_config("tiny")
    given.seed = 1
    given.eval.batch_size = 2
    given.train.jit_compile = True
    given.data.eval_split = "train"
    conflicts, allowed = config_utils.config_differences(stored, given)
    assert conflicts == [("seed", 0, 1)]
    assert allowed == [
        ("data.eval_split", "test", "train"),
        ("eval.batch_size", 8, 2),
        ("train.jit_compile", False, True),
    ]


def test_no_config_and_no_stored_config_is_an_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="has no stored config .* --config=configs/digits.py"
    ):
        config_utils.resolve_and_persist_config(None, str(tmp_path), config_given=False)
    assert not (tmp_path / "config.json").exists()


def test_invalid_config_is_not_stored(tmp_path):
    config = _tiny_with(diffusion__noise_schedule="cosin")
    with pytest.raises(ValueError, match="noise_schedule"):
        config_utils.resolve_and_persist_config(config, str(tmp_path), config_given=True)
    assert not (tmp_path / "config.json").exists()


def test_stored_config_from_an_older_schema_is_completed_from_defaults(tmp_path):
    old = get_config("tiny").to_dict()
    del old["diffusion"]["cdf"]  # a field added to the schema later
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = config_utils.resolve_and_persist_config(
        None, str(tmp_path), config_given=False, defaults=base.get_config()
    )
    assert loaded.diffusion.cdf == base.get_config().diffusion.cdf
    assert loaded.model.num_channels == 32
    # Given a config, the field missing from the stored one is no conflict.
    config_utils.resolve_and_persist_config(get_config("tiny"), str(tmp_path), config_given=True)


def test_a_stored_config_with_the_older_use_ddim_field_reads_as_its_sampler(tmp_path):
    for use_ddim, kind in ((True, "ddim"), (False, "ancestral")):
        old = get_config("tiny").to_dict()
        del old["sample"]["sampler"]
        old["sample"]["use_ddim"] = use_ddim
        (tmp_path / "config.json").write_text(json.dumps(old))
        loaded = config_utils.load_stored_config(str(tmp_path), defaults=base.get_config())
        assert loaded.sample.sampler == kind and "use_ddim" not in loaded.sample


def test_validation_runs_once_per_config_and_mode():
    config = get_config("tiny")
    config_utils.validate_config(config, mode="sample")
    key = (config_utils.config_to_json(config), "sample")
    assert key in config_utils._VALID_CONFIGS
    # A changed config is checked again: the memory is of contents, not of objects.
    config.sample.eta = 0.5
    with pytest.raises(ValueError, match="sample.eta=0.5 only applies to ddim"):
        config_utils.validate_config(config, mode="sample")
    # The replica split is checked on every call, even for a config known to be valid.
    config.sample.eta = 0.0
    config.sample.batch_size = 3
    config_utils.validate_config(config, mode="sample")
    with pytest.raises(ValueError, match="sample.batch_size=3 is not divisible by the 2 replicas"):
        config_utils.validate_config(config, mode="sample", num_replicas=2)


def test_corrupt_stored_config_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        config_utils.resolve_and_persist_config(None, str(tmp_path), config_given=False)
