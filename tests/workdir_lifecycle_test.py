"""A workdir over its life, through run.py as users run it (issue #11, "reproducible training").

On the tiny config with a few steps:

* a refused start (missing ``data.folder``; an invalid field; a folder without image files, or
  whose image files are all unreadable, in train and eval) prints one ``run.py: error:`` line,
  exits 1 and leaves the workdir byte for byte as it was, or absent, and the corrected command
  then starts and trains;
* ``--workdir=W --mode=train --config.train.num_steps=N`` (no ``--config``) extends a stored run;
* a damaged newest checkpoint (truncated or missing data file): training resumes from the previous
  one and keeps the damaged files aside; sampling refuses with one line naming the file, and
  ``--checkpoint=`` picks the older one;
* files written by training, sampling, evaluation and export have the mode ``open()`` gives.
"""

import hashlib
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

# Whole-pipeline tests (subprocesses, training, exports): the full suite only.
pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def run_py(args, *, umask=0o022):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "PYTHONPATH")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py")] + list(args),
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        umask=umask,
    )
    return result.returncode, result.stdout + result.stderr


def snapshot(root):
    """Every path under ``root`` with its mode, size, mtime and content hash."""
    state = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            digest = None
            if stat.S_ISREG(info.st_mode):
                digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
            state[os.path.relpath(path, root)] = (
                info.st_mode,
                info.st_size,
                info.st_mtime_ns,
                digest,
            )
    return state


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def error_lines(output):
    return [line for line in output.splitlines() if line.startswith("run.py: error:")]


def step_of(prefix):
    return int(str(prefix).rsplit("-", 1)[1])


def listed_checkpoints(workdir):
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints"))
    return [os.path.basename(p) for p in state.all_model_checkpoint_paths]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Two refused starts, then the corrected command, then an extension without --config."""
    root = tmp_path_factory.mktemp("lifecycle")
    data_dir = root / "tfds"
    workdir = root / "work"
    start = [
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--mode=train",
        "--strategy=default",
        f"--config.data.data_dir={data_dir}",
        "--config.train.num_steps=4",
        "--config.train.checkpoint_every=2",
    ]
    eval_start = [arg.replace("--mode=train", "--mode=eval") for arg in start]

    def folder(path):
        return ["--config.data.name=folder", f"--config.data.folder={path}"]

    # A folder without image files, and one whose image files are all unreadable: refused inside
    # the mode (train_lib.train, eval_lib.evaluate), before it writes anything.
    empty_folder = root / "empty_folder"
    (empty_folder / "sub").mkdir(parents=True)
    (empty_folder / "sub" / "notes.txt").write_text("not an image\n")
    unreadable_folder = root / "unreadable_folder"
    unreadable_folder.mkdir()
    for i in range(3):
        (unreadable_folder / f"a_{i}.png").write_text("text, not an image\n")

    refusals = {}
    # The workdir does not exist yet: a refused start must not create it.
    code, output = run_py(start + folder(root / "no_such_folder"))
    refusals["missing_folder"] = (code, output, not workdir.exists())  # unchanged: absent
    code, output = run_py(start + folder(empty_folder))
    refusals["empty_folder"] = (code, output, not workdir.exists())
    code, output = run_py(eval_start + folder(unreadable_folder))
    refusals["unreadable_folder_eval"] = (code, output, not workdir.exists())
    # The workdir exists with unrelated content: it is left byte for byte as it was.
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine\n")
    before = snapshot(workdir)
    code, output = run_py(start + folder(root / "no_such_folder"))
    refusals["missing_folder_existing_workdir"] = (code, output, snapshot(workdir) == before)
    code, output = run_py(start + ["--config.train.lr=-1"])
    refusals["bad_value"] = (code, output, snapshot(workdir) == before)
    code, output = run_py(eval_start + folder(empty_folder))
    refusals["empty_folder_eval_existing_workdir"] = (code, output, snapshot(workdir) == before)
    code, output = run_py(start + folder(unreadable_folder))
    refusals["unreadable_folder_existing_workdir"] = (code, output, snapshot(workdir) == before)

    code, output = run_py(start)
    assert code == 0, output[-5000:]
    first_config = (workdir / "config.json").read_text()
    config_mode = mode(workdir / "config.json")

    # Extending the run: only the workdir and the new length.
    code, extend_output = run_py(
        [f"--workdir={workdir}", "--mode=train", "--strategy=default", "--config.train.num_steps=6"]
    )
    assert code == 0, extend_output[-5000:]
    return dict(
        root=root,
        workdir=workdir,
        refusals=refusals,
        first_config=first_config,
        config_mode=config_mode,
        extend_output=extend_output,
    )


# What the one error line of each refused start says (None: an invalid field, checked below).
REFUSALS = {
    "missing_folder": "config.data.folder='{root}/no_such_folder' does not exist",
    "missing_folder_existing_workdir": "config.data.folder='{root}/no_such_folder' does not exist",
    "bad_value": None,
    "empty_folder": (
        "config.data.folder='{root}/empty_folder' holds no image files: files ending in .png, "
        ".jpg or .jpeg (any case) are read, in the folder and all its subfolders."
    ),
    "empty_folder_eval_existing_workdir": "config.data.folder='{root}/empty_folder' holds no image",
    "unreadable_folder_eval": (
        "image folder '{root}/unreadable_folder' has no readable images: all 3 of its image files "
        "fail to decode, e.g. {root}/unreadable_folder/a_0.png (UnidentifiedImageError: "
    ),
    "unreadable_folder_existing_workdir": (
        "image folder '{root}/unreadable_folder' has no readable images: all 3 of"
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_start_changes_nothing_in_the_workdir(started, case):
    code, output, unchanged = started["refusals"][case]
    assert code == 1, output[-3000:]  # run.py's EXIT_CONFIG_ERROR
    assert unchanged, (
        "the refused start changed the workdir"
        if case.endswith("existing_workdir") or case == "bad_value"
        else "the refused start created the workdir"
    )
    assert "Traceback" not in output
    [line] = error_lines(output)
    if REFUSALS[case] is None:
        assert "train.lr" in output and line == "run.py: error: invalid config:"
    else:
        assert line.startswith("run.py: error: " + REFUSALS[case].format(root=started["root"]))


def test_the_corrected_command_starts_and_stores_its_config(started):
    assert '"num_steps": 4' in started["first_config"]
    assert started["config_mode"] == 0o644


def test_a_stored_run_is_extended_without_config(started):
    workdir = started["workdir"]
    assert "resumed from" in started["extend_output"] and "ckpt-4" in started["extend_output"]
    assert '"num_steps": 6' in (workdir / "config.json").read_text()
    assert listed_checkpoints(str(workdir)) == ["ckpt-4", "ckpt-6"]


def _copy(started, name):
    target = started["root"] / name
    shutil.copytree(started["workdir"], target)
    # The stored data location still points at the shared prepared digits.
    return target


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_newest_checkpoint(started, damage):
    workdir = _copy(started, f"damaged_{damage}")
    data_file = workdir / "checkpoints" / "ckpt-6.data-00000-of-00001"
    older = workdir / "checkpoints" / "ckpt-4"
    if damage == "truncated":
        size = data_file.stat().st_size
        with open(data_file, "r+b") as file:
            file.truncate(size // 2)
        expected = f"{data_file} is truncated or corrupt"
    else:
        data_file.unlink()
        expected = f"{data_file} is missing"

    # Sampling refuses in one line naming the damaged file and how to pick another.
    code, output = run_py(
        [f"--workdir={workdir}", "--mode=sample", "--num_samples=2", "--batch_size=2", "--steps=2"]
    )
    assert code == 3, output[-3000:]
    assert "Traceback" not in output
    [line] = error_lines(output)
    assert expected in line and f"--checkpoint={older}" in line
    # ... and so does the export.
    code, output = run_py(
        [f"--workdir={workdir}", "--mode=export", f"--export_dir={workdir / 'models'}"]
    )
    assert code == 3 and "Traceback" not in output, output[-3000:]
    [line] = error_lines(output)
    assert expected in line
    assert not (workdir / "models").exists()

    # --checkpoint= with the older one works.
    code, output = run_py(
        [
            f"--workdir={workdir}",
            "--mode=sample",
            "--num_samples=2",
            "--batch_size=2",
            "--steps=2",
            f"--checkpoint={older}",
        ]
    )
    assert code == 0, output[-3000:]
    assert (workdir / "samples" / "samples_2x8x8x3.npz").exists()

    if damage == "missing":
        return
    # Training resumes from the previous checkpoint, keeps the damaged files aside, and saves
    # step 6 again without touching them.
    damaged_bytes = data_file.read_bytes()
    code, output = run_py(
        [f"--workdir={workdir}", "--mode=train", "--strategy=default", "--config.train.num_steps=8"]
    )
    assert code == 0, output[-5000:]
    assert expected in output and "resuming from the older" in output
    assert f"resumed from {older} at step 4" in output
    assert listed_checkpoints(str(workdir)) == ["ckpt-6", "ckpt-8"]
    kept = workdir / "checkpoints" / "damaged"
    assert sorted(os.listdir(kept)) == ["ckpt-6.data-00000-of-00001", "ckpt-6.index"]
    assert (kept / "ckpt-6.data-00000-of-00001").read_bytes() == damaged_bytes
    from tf_iddpm import checkpoints

    checkpoints.check_readable(str(workdir / "checkpoints" / "ckpt-6"))  # the new step 6


def test_files_of_sample_eval_and_export_have_the_mode_open_gives(started):
    workdir = _copy(started, "modes")
    umask = 0o027
    code, output = run_py(
        [f"--workdir={workdir}", "--mode=sample", "--num_samples=2", "--batch_size=2", "--steps=2"],
        umask=umask,
    )
    assert code == 0, output[-3000:]
    code, output = run_py(
        [f"--workdir={workdir}", "--mode=eval", "--num_samples=4", "--batch_size=4", "--steps=2"],
        umask=umask,
    )
    assert code == 0, output[-3000:]
    code, output = run_py(
        [f"--workdir={workdir}", "--mode=export", f"--export_dir={workdir / 'models'}"], umask=umask
    )
    assert code == 0, output[-3000:]
    written = [
        workdir / "samples" / "samples_2x8x8x3.npz",
        workdir / "samples" / "samples_2x8x8x3.png",
        workdir / "eval" / "summary.json",
        workdir / "eval" / "vb_terms.npz",
        workdir / "models" / "models.config",
        workdir / "models" / "batching_parameters.txt",
    ]
    for model in ("tiny_sampler", "tiny_nll"):
        extra = workdir / "models" / model / "1" / "assets.extra"
        written += sorted(extra.iterdir())
    assert len(written) == 10
    for path in written:
        assert mode(path) == 0o640, path
    leftovers = [p for p in workdir.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert not leftovers
