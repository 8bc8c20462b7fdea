"""Tests for run.py: flags, config resolution in the workdir, per-run overrides and mode dispatch.

run.py is always run in a fresh interpreter, because absl flags are process-global.  The mode
modules (train_lib, sample_lib, eval_lib, export_lib) are replaced by stand-ins that record what
run.py passed them, or are made unimportable, so these tests neither train nor depend on whether
those modules exist yet.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from configs import tiny
from tf_iddpm import config_utils

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO_ROOT / "configs" / "tiny.py")

MODE_MODULES = {
    "train": ("tf_iddpm.train_lib", "train"),
    "sample": ("tf_iddpm.sample_lib", "sample"),
    "eval": ("tf_iddpm.eval_lib", "evaluate"),
    "fid": ("tf_iddpm.quality_lib", "evaluate_fid"),
    "export": ("export.export_lib", "export_from_workdir"),
}

# Installs stand-in mode modules (which write their arguments to a JSON file) or poisons them,
# then runs run.py as __main__ with the given arguments.
_DRIVER = textwrap.dedent("""
    import importlib.machinery, json, runpy, sys, types
    repo, record, stand_ins, missing_function, poisoned, argv = json.loads(sys.argv[1])
    sys.path.insert(0, repo)
    for name in poisoned:
        sys.modules[name] = None          # import raises ImportError, find_spec returns None
    for name, function in stand_ins:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        def entry(config, workdir, third, _name=name, **options):  # checkpoint
            if not isinstance(third, str):
                third = [type(third).__name__, third.num_replicas_in_sync]
            with open(record, "w") as f:
                json.dump({"module": _name, "config": config.to_dict(), "workdir": workdir,
                           "third": third, "options": options}, f)
        if name not in missing_function:
            setattr(module, function, entry)
        sys.modules[name] = module
    sys.argv = ["run.py"] + argv
    runpy.run_path(repo + "/run.py", run_name="__main__")
""")


def run_py(
    args, tmp_path, *, stand_ins=tuple(MODE_MODULES), missing_function=(), poisoned=(), cwd=None
):
    """Runs run.py with ``args``; returns (exit code, stderr, what the mode entry received)."""
    record = tmp_path / "record.json"
    if record.exists():
        record.unlink()
    spec = [
        str(REPO_ROOT),
        str(record),
        [MODE_MODULES[m] for m in stand_ins],
        [MODE_MODULES[m][0] for m in missing_function],
        [MODE_MODULES[m][0] for m in poisoned],
        list(args),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "PYTHONPATH")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(spec)],
        cwd=cwd or REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    received = json.loads(record.read_text()) if record.exists() else None
    return result.returncode, result.stderr, received


def stored_config(workdir):
    return json.loads((workdir / "config.json").read_text())


def persist_as_training_does(workdir, config_dict):
    """What train_lib.train() does once training starts: store the config it was given."""
    import ml_collections

    config_utils.persist_config(ml_collections.ConfigDict(config_dict), str(workdir))


def start_workdir(workdir, lr=None):
    """What a first ``run.py --config=configs/tiny.py`` stores, without the cost of a subprocess."""
    config = tiny.get_config()
    if lr is not None:
        config.train.lr = lr
    config_utils.resolve_and_persist_config(config, str(workdir), config_given=True)
    return stored_config(workdir)


def test_help_lists_the_flags_and_importing_run_loads_no_tensorflow():
    script = (
        "import sys; sys.path.insert(0, %r); import run; "
        "print(any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules))"
        % str(REPO_ROOT)
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stderr == ""  # (absl exits with 1 after --help)
    for flag in (
        "--config",
        "--workdir",
        "--mode",
        "--strategy",
        "--tpu",
        "--num_samples",
        "--batch_size",
        "--steps",
        "--[no]ddim",
        "--eta",
        "--class_label",
        "--[no]use_ema",
        "--export_dir",
    ):
        assert flag in result.stdout, flag


def test_config_typo_fails_before_anything_runs(tmp_path):
    workdir = tmp_path / "w"
    code, stderr, received = run_py(
        [f"--config={TINY}", "--config.train.batchsize=3", f"--workdir={workdir}"], tmp_path
    )
    assert code == 1
    assert "--config.train.batchsize=3" in stderr
    assert 'Did you mean "batch_size" instead of "batchsize"?' in stderr
    assert received is None and not workdir.exists()


def test_a_typo_on_the_stored_config_gets_the_same_suggestion(tmp_path):
    workdir = tmp_path / "w"
    before = start_workdir(workdir)
    for typo, suggestion in (
        ("--config.train.batchsize=3", 'Did you mean "batch_size" instead of "batchsize"?'),
        ("--config.sampel.num_samples=3", 'Did you mean "sample" instead of "sampel"?'),
    ):
        code, stderr, received = run_py([f"--workdir={workdir}", typo], tmp_path)
        assert code == 1 and received is None
        assert typo in stderr and suggestion in stderr
    assert stored_config(workdir) == before


def test_missing_config_file_is_a_clear_error(tmp_path):
    code, stderr, _ = run_py(["--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"], tmp_path)
    assert code == 1
    assert "--config could not be loaded" in stderr and "configs/nope.py" in stderr


@pytest.mark.parametrize(
    "flag, message",
    [
        (
            "--mode=serve",
            "flag --mode=serve: value should be one of <train|sample|eval|fid|export>",
        ),
        (
            "--strategy=mirror",
            "flag --strategy=mirror: value should be one of <auto|default|mirrored|multi_worker|tpu>",
        ),
    ],
)
def test_unknown_mode_or_strategy_is_rejected(tmp_path, flag, message):
    code, stderr, received = run_py(
        [f"--config={TINY}", f"--workdir={tmp_path / 'w'}", flag], tmp_path
    )
    assert code == 1
    assert message in stderr
    assert received is None


def test_workdir_is_required(tmp_path):
    code, stderr, _ = run_py([f"--config={TINY}"], tmp_path)
    assert code == 1
    assert "--workdir" in stderr


@pytest.mark.parametrize("mode", ["sample", "export"])
def test_unavailable_mode_exits_2_before_touching_the_workdir(tmp_path, mode):
    workdir = tmp_path / "w"
    code, stderr, received = run_py(
        [f"--config={TINY}", f"--workdir={workdir}", f"--mode={mode}"],
        tmp_path,
        stand_ins=(),
        poisoned=(mode,),
    )
    assert code == 2
    module = MODE_MODULES[mode][0]
    assert (
        f"run.py: error: mode '{mode}' is not available in this build: module {module} not found"
    ) in stderr
    assert received is None and not workdir.exists()


def test_mode_module_without_its_entry_function_exits_2(tmp_path):
    code, stderr, _ = run_py(
        [f"--config={TINY}", f"--workdir={tmp_path / 'w'}", "--mode=export"],
        tmp_path,
        missing_function=("export",),
    )
    assert code == 2
    assert (
        "mode 'export' is not available in this build: export.export_lib has no "
        "export_from_workdir()" in stderr
    )


@pytest.mark.slow
def test_train_stores_config_then_resumes_and_refuses_a_conflict(tmp_path):
    workdir = tmp_path / "w"
    # First start, from another directory: the resolved config (with the override) is stored
    # and passed to train().
    code, stderr, received = run_py(
        [
            f"--config={TINY}",
            "--config.train.lr=0.001",
            f"--workdir={workdir}",
            "--mode=train",
            "--strategy=default",
            "-v",
            "1",
        ],
        tmp_path,
        cwd=tmp_path,
    )  # not from the repository root
    assert code == 0, stderr
    assert received["module"] == "tf_iddpm.train_lib"
    assert received["workdir"] == str(workdir)
    assert received["third"] == ["_DefaultDistributionStrategy", 1]
    assert received["config"]["train"]["lr"] == 0.001
    assert "Mode train in" in stderr and "lr: 0.001" in stderr  # the config, in full at -v 1
    # run.py itself writes nothing: train() stores the config once training really starts
    # (tested with the real train() in tests/workdir_lifecycle_test.py).
    assert not workdir.exists()
    persist_as_training_does(workdir, received["config"])
    assert stored_config(workdir) == received["config"]

    # Resume without --config: the stored config is used.
    code, stderr, resumed = run_py([f"--workdir={workdir}"], tmp_path)
    assert code == 0, stderr
    assert resumed["config"] == received["config"]

    # A conflicting config is refused, listing the fields; nothing runs, nothing is rewritten.
    code, stderr, refused = run_py(
        [f"--config={TINY}", f"--workdir={workdir}", "--config.model.num_res_blocks=2"], tmp_path
    )
    assert code == 1
    assert "  model.num_res_blocks: 1 -> 2\n  train.lr: 0.001 -> 0.0005\n" in stderr
    assert "drop --config" in stderr and "new --workdir" in stderr
    assert refused is None
    assert stored_config(workdir) == received["config"]

    # A longer run is allowed, and recorded for later runs without --config.
    code, stderr, longer = run_py(
        [
            f"--config={TINY}",
            "--config.train.lr=0.001",
            "--config.train.num_steps=50",
            f"--workdir={workdir}",
        ],
        tmp_path,
    )
    assert code == 0, stderr
    assert longer["config"]["train"]["num_steps"] == 50
    assert stored_config(workdir)["train"]["num_steps"] == 20  # until training starts
    persist_as_training_does(workdir, longer["config"])
    assert stored_config(workdir)["train"]["num_steps"] == 50

    # Extending the run needs no --config: overrides apply to the stored config.
    code, stderr, extended = run_py(
        [f"--workdir={workdir}", "--config.train.num_steps=80"], tmp_path
    )
    assert code == 0, stderr
    assert extended["config"]["train"]["num_steps"] == 80
    assert extended["config"]["train"]["lr"] == 0.001
    # ... but may not change what defines the experiment.
    code, stderr, refused = run_py([f"--workdir={workdir}", "--config.train.lr=0.1"], tmp_path)
    assert code == 1 and refused is None
    assert "the --config.* overrides conflict with the config stored in" in stderr
    assert "  train.lr: 0.001 -> 0.1\n" in stderr


@pytest.mark.slow
def test_sample_flags_override_the_stored_config_for_one_run(tmp_path):
    workdir = tmp_path / "w"
    before = start_workdir(workdir)
    code, stderr, received = run_py(
        [
            f"--workdir={workdir}",
            "--mode=sample",
            "--num_samples=3",
            "--batch_size=2",
            "--steps=ddim10",
            "--ddim",
            "--eta=0.5",
            "--nouse_ema",
        ],
        tmp_path,
    )
    assert code == 0, stderr
    assert received["module"] == "tf_iddpm.sample_lib"
    sample = received["config"]["sample"]
    assert (
        sample["num_samples"],
        sample["batch_size"],
        sample["timestep_respacing"],
        sample["sampler"],
        sample["eta"],
        sample["use_ema"],
    ) == (3, 2, "ddim10", "ddim", 0.5, False)
    assert sample["class_label"] == before["sample"]["class_label"]  # not given: unchanged
    assert received["config"]["eval"] == before["eval"]
    assert stored_config(workdir) == before  # one run only


@pytest.mark.slow
def test_sampler_flag_and_the_older_ddim_flag_choose_the_sampler(tmp_path):
    workdir = tmp_path / "w"
    start_workdir(workdir)
    for args, kind in (
        (["--sampler=ddim"], "ddim"),
        (["--ddim"], "ddim"),
        (["--noddim"], "ancestral"),
        (["--sampler=ancestral", "--steps=7"], "ancestral"),
    ):
        code, stderr, received = run_py([f"--workdir={workdir}", "--mode=sample"] + args, tmp_path)
        assert code == 0, stderr
        assert received["config"]["sample"]["sampler"] == kind, args
    code, stderr, received = run_py(
        [f"--workdir={workdir}", "--mode=sample", "--ddim", "--sampler=ancestral"], tmp_path
    )
    assert code == 1 and received is None
    assert "--ddim and --sampler both choose the sampler" in stderr
    code, stderr, received = run_py(
        [f"--workdir={workdir}", "--mode=sample", "--eta=0.5"], tmp_path
    )
    assert code == 1 and received is None
    assert "sample.eta=0.5 only applies to ddim" in stderr


def test_export_dir_naming_a_file_is_refused_before_anything_runs(tmp_path):
    workdir = tmp_path / "w"
    start_workdir(workdir)
    a_file = tmp_path / "models"
    a_file.write_text("not a directory")
    for export_dir in (a_file, a_file / "below"):
        code, stderr, received = run_py(
            [f"--workdir={workdir}", "--mode=export", f"--export_dir={export_dir}"], tmp_path
        )
        assert code == 1 and received is None
        assert stderr.strip().splitlines()[-1].startswith("run.py: error: --export_dir=")
        assert "a file, not a directory" in stderr and "Traceback" not in stderr
    assert a_file.read_text() == "not a directory"


@pytest.mark.slow
def test_eval_and_export_flags(tmp_path):
    workdir = tmp_path / "w"
    start_workdir(workdir)
    code, stderr, received = run_py(
        [f"--workdir={workdir}", "--mode=eval", "--num_samples=0", "--steps=", "--batch_size=4"],
        tmp_path,
    )
    assert code == 0, stderr
    assert received["module"] == "tf_iddpm.eval_lib"
    evaluation = received["config"]["eval"]
    assert (
        evaluation["num_samples"],
        evaluation["timestep_respacing"],
        evaluation["batch_size"],
    ) == (0, "", 4)

    code, stderr, received = run_py(
        [f"--workdir={workdir}", "--mode=export", "--nouse_ema"], tmp_path
    )
    assert code == 0, stderr
    assert received["module"] == "export.export_lib"
    assert received["third"] == str(workdir / "export")
    assert received["config"]["export"]["use_ema"] is False

    code, stderr, received = run_py(
        [f"--workdir={workdir}", "--mode=export", f"--export_dir={tmp_path / 'models'}"], tmp_path
    )
    assert code == 0, stderr
    assert received["third"] == str(tmp_path / "models")


@pytest.mark.slow
def test_fid_flags_override_the_sample_and_fid_fields_for_one_run(tmp_path):
    workdir = tmp_path / "w"
    before = start_workdir(workdir)
    ref, graph = tmp_path / "ref.npz", tmp_path / "graph.pb"
    ref.write_bytes(b"")
    graph.write_bytes(b"")
    code, stderr, received = run_py(
        [
            f"--workdir={workdir}",
            "--mode=fid",
            "--num_samples=30",
            "--batch_size=6",
            "--steps=ddim10",
            "--ddim",
            "--eta=0.5",
            f"--ref_batch={ref}",
            f"--inception={graph}",
            "--sweep=5,full",
        ],
        tmp_path,
    )
    assert code == 0, stderr
    assert received["module"] == "tf_iddpm.quality_lib"
    sample, fid = received["config"]["sample"], received["config"]["fid"]
    assert (
        sample["batch_size"],
        sample["timestep_respacing"],
        sample["sampler"],
        sample["eta"],
    ) == (6, "ddim10", "ddim", 0.5)
    assert sample["num_samples"] == before["sample"]["num_samples"]  # --num_samples: fid's
    assert (fid["num_samples"], fid["ref_batch"], fid["inception"], fid["sweep"]) == (
        30,
        str(ref),
        str(graph),
        "5,full",
    )
    assert stored_config(workdir) == before  # one run only
    code, stderr, _ = run_py(
        [f"--workdir={workdir}", "--mode=sample", f"--ref_batch={ref}"], tmp_path
    )
    assert code == 1 and "--ref_batch applies to --mode=fid, not --mode=sample" in stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--mode=train", "--ddim"],
            "--ddim applies to --mode=sample or --mode=fid, not --mode=train",
        ),
        (
            ["--mode=eval", "--eta=0.5"],
            "--eta applies to --mode=sample or --mode=fid, not --mode=eval",
        ),
        (
            ["--mode=sample", "--export_dir=/x"],
            "--export_dir applies to --mode=export, not --mode=sample",
        ),
        (
            ["--mode=sample", "--steps=500"],
            "sample.timestep_respacing='500' is not a valid respacing",
        ),
        (
            ["--mode=sample", "--class_label=3"],
            "sample.class_label=3 given for an unconditional model",
        ),
    ],
)
def test_run_flags_are_checked(tmp_path, args, message):
    code, stderr, received = run_py(
        [f"--config={TINY}", f"--workdir={tmp_path / 'w'}", *args], tmp_path
    )
    assert code == 1
    assert message in stderr
    assert received is None


@pytest.mark.slow
def test_batch_not_divisible_by_replicas_fails_before_training(tmp_path):
    code, stderr, received = run_py(
        [
            f"--config={TINY}",
            "--config.train.batch_size=15",
            f"--workdir={tmp_path / 'w'}",
            "--strategy=mirrored",
            "--cpu_devices=2",
        ],
        tmp_path,
    )
    assert code == 1
    assert "train.batch_size=15 is not divisible by the 2 replicas" in stderr
    assert received is None


@pytest.mark.slow
def test_config_from_workdir_allows_field_overrides_on_the_stored_config(tmp_path):
    workdir = tmp_path / "w"
    start_workdir(workdir, lr=0.001)
    code, stderr, received = run_py(
        [
            f"--config=configs/from_workdir.py:{workdir}",
            "--config.data.eval_split=train",
            f"--workdir={workdir}",
            "--mode=eval",
        ],
        tmp_path,
    )
    assert code == 0, stderr
    assert received["config"]["data"]["eval_split"] == "train"
    assert received["config"]["train"]["lr"] == 0.001
    assert stored_config(workdir)["data"]["eval_split"] == "test"  # not a training run


def test_no_config_and_empty_workdir_is_a_clear_error(tmp_path):
    code, stderr, _ = run_py([f"--workdir={tmp_path / 'w'}", "--mode=sample"], tmp_path)
    assert code == 1
    assert "has no stored config (config.json) and no --config was given" in stderr


def test_overrides_without_config_need_a_stored_config(tmp_path):
    workdir = tmp_path / "w"
    code, stderr, received = run_py(
        [f"--workdir={workdir}", "--config.train.num_steps=5"], tmp_path
    )
    assert code == 1 and received is None
    assert (
        "run.py: error: --config.* overrides without --config apply to the config stored in "
        "the workdir, and there is none"
    ) in stderr
    assert str(workdir / "config.json") in stderr
    assert not workdir.exists()


@pytest.mark.slow
def test_checkpoint_flag_reaches_the_inference_modes_only(tmp_path):
    # Whether the checkpoint exists is checked where it is read (tf_iddpm.checkpoints, exit 3,
    # tested in configs_test and workdir_lifecycle_test); run.py passes it on.
    workdir = tmp_path / "w"
    start_workdir(workdir)
    prefix = str(workdir / "checkpoints" / "ckpt-4")
    for mode in ("sample", "eval", "fid", "export"):
        extra = ["--ref_batch=r", "--inception=g"] if mode == "fid" else []
        if mode == "fid":
            (tmp_path / "r").write_bytes(b"")
            (tmp_path / "g").write_bytes(b"")
        code, stderr, received = run_py(
            [f"--workdir={workdir}", f"--mode={mode}", f"--checkpoint={prefix}"] + extra,
            tmp_path,
            cwd=tmp_path,
        )
        assert code == 0, stderr
        assert received["options"] == {"checkpoint": prefix}
    code, stderr, received = run_py(
        [f"--workdir={workdir}", "--mode=train", f"--checkpoint={prefix}"], tmp_path
    )
    assert code == 1 and received is None
    assert (
        "--checkpoint applies to --mode=sample or --mode=eval or --mode=fid or --mode=export"
        in stderr
    )
