"""What `pip install` of this project puts into site-packages: the library, and nothing else.

configs/, export/, ablation/ and tools/ stay top-level folders of the checkout (run.py,
`python -m export`, `python -m ablation` and `python -m tools.benchmark` run from it), but a wheel
that installed them as top-level `configs` / `export` / `ablation` / `tools` packages would collide
with other projects'; tools/benchmark_reference.py runs under a PyTorch interpreter. The wheel is
built offline, with this interpreter's setuptools, from a copy of the sources.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and a virtualenv

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the build reads (pyproject.toml's readme and packages), plus the folders it must leave out.
SOURCES = (
    "pyproject.toml",
    "README.md",
    "run.py",
    "tf_iddpm",
    "configs",
    "export",
    "ablation",
    "tools",
)
# The checkout-only packages: top-level folders with an __init__.py that the wheel leaves out.
CHECKOUT_ONLY = ("configs", "export", "ablation", "tools")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(
                path,
                source / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "bazel-*"),
            )
        else:
            shutil.copy2(path, source / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (root / "dist").glob("tf_iddpm-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel_files(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level_txt = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        return names, [archive.read(n).decode().split() for n in top_level_txt]


# The library's command-line entry points (python -m tf_iddpm.X), which must run installed, each
# with a flag its --help must list.
INSTALLED_ENTRY_POINTS = {
    "tf_iddpm.convert": "--checkpoint",
    "tf_iddpm.metrics": "--inception",
    "tf_iddpm.quality_lib": "--num_images",
}


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh virtualenv with the wheel installed (--no-deps) and this environment's third-party
    packages on its path (a .pth file naming their directory; that directory's own .pth files,
    among them this checkout's editable install, are not read)."""
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p))
    pathlib.Path(site_packages, "third_party_packages.pth").write_text(ours + "\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    outside = root / "elsewhere"  # not the checkout: nothing of it is importable from here
    outside.mkdir()
    return python, outside, env


def test_the_installed_wheel_imports_and_runs_outside_the_checkout(wheel_files, installed):
    python, outside, env = installed
    names, _ = wheel_files
    modules = sorted(
        "tf_iddpm." + os.path.splitext(os.path.basename(n))[0]
        for n in names
        if n.startswith("tf_iddpm/") and n.endswith(".py") and not n.endswith("__init__.py")
    )
    program = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import tf_iddpm\n"
        "assert 'site-packages' in tf_iddpm.__file__, tf_iddpm.__file__\n"
        "for name in ('configs', 'export', 'ablation', 'tools'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "print('imported', len(sys.modules))\n"
    )
    result = subprocess.run(
        [str(python), "-c", program],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for module, flag in INSTALLED_ENTRY_POINTS.items():
        result = subprocess.run(
            [str(python), "-m", module, "--help"],
            cwd=outside,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        # absl's --help exits 1 after printing the flags, argparse's 0.
        assert result.returncode in (0, 1) and "Traceback" not in result.stderr, (
            module,
            result.stderr[-3000:],
        )
        assert flag in result.stdout, (module, result.stdout[-2000:])


def test_the_wheel_installs_only_the_tf_iddpm_package(wheel_files):
    names, top_level_txt = wheel_files
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"tf_iddpm"}, top_level
    for package in CHECKOUT_ONLY:
        assert (REPO_ROOT / package / "__init__.py").is_file(), package  # a package, left out
        assert package not in top_level, package
        assert not [n for n in names if n.startswith(package + "/")], package
    assert all(modules == ["tf_iddpm"] for modules in top_level_txt), top_level_txt
    assert "tf_iddpm/unet.py" in names and "tf_iddpm/__init__.py" in names


def test_the_wheel_holds_no_torch_side_file(wheel_files):
    names, _ = wheel_files
    assert not [n for n in names if os.path.basename(n) == "benchmark_reference.py"]
    assert not [n for n in names if n.startswith(("tools/", "tests/"))]


def test_the_library_holds_no_application(wheel_files):
    """The ablation study and the benchmarks moved out of tf_iddpm/: they import configs/."""
    names, _ = wheel_files
    for module in ("ablation", "benchmark", "benchmark_metrics"):
        assert f"tf_iddpm/{module}.py" not in names, module
