"""Pins the top-level Bazel `BUILD` file to the Python sources, without running Bazel.

`BUILD` is Starlark, which for these rules is a subset of Python: executing it with stub rule
functions that only record their arguments gives every target. The tests then check that the
targets cover the sources (one py_library per module, one py_test per test file, a py_binary for
run.py) and that every first-party import is a direct dependency, so adding a module or an import
without updating `BUILD` fails here instead of only under `make bazel-test`.

Under Bazel this file runs from the test's runfiles tree, which holds `BUILD` and the sources as
data, so the same relative paths work there and in a checkout.
"""

import ast
import fnmatch
import glob as globlib
import os
import re
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages of this repository whose imports must be Bazel dependencies; run.py is imported as `run`.
FIRST_PARTY_PACKAGES = ("tf_iddpm", "export", "ablation", "tools", "tests", "configs", "run")
# The pytest entry point every py_test runs (see tools/python/pytest_main.py).
PYTEST_MAIN = "//tools/python:pytest_main.py"
RULE_KINDS = ("py_library", "py_test", "py_binary", "filegroup")
# A string naming a module for a dynamic import, e.g. "tf_iddpm.train_lib".
_DOTTED_MODULE = re.compile(r"(%s)(\.[A-Za-z_][A-Za-z0-9_]*)+" % "|".join(FIRST_PARTY_PACKAGES))


def _glob(include, exclude=(), exclude_directories=1, allow_empty=True):
    """Bazel's glob() for the top-level package: sorted repo-relative paths of matching files."""
    del exclude_directories, allow_empty  # Only files are matched; an empty result is allowed.
    matched = set()
    for pattern in include:
        for path in globlib.glob(os.path.join(REPO_ROOT, pattern), recursive=True):
            if os.path.isfile(path):
                matched.add(os.path.relpath(path, REPO_ROOT))
    return sorted(p for p in matched if not any(fnmatch.fnmatch(p, e) for e in exclude))


def load_build_targets(build_path=None):
    """Executes a BUILD file with recording stubs.

    Args:
        build_path: the BUILD file; the repository's top-level `BUILD` by default.

    Returns:
        A dict from target name to a dict with the rule `kind` and the rule's keyword arguments.

    Raises:
        ValueError: if two targets share a name, or a rule is called with positional arguments.
    """
    build_path = build_path or os.path.join(REPO_ROOT, "BUILD")
    targets = {}

    def make_rule(kind):
        def rule(*args, **attrs):
            if args:
                raise ValueError(f"{kind} takes keyword arguments only, got positional {args!r}")
            name = attrs.get("name")
            if name in targets:
                raise ValueError(f"target name {name!r} is defined twice in {build_path}")
            targets[name] = dict(attrs, kind=kind)

        return rule

    namespace = {kind: make_rule(kind) for kind in RULE_KINDS}
    namespace.update(
        glob=_glob,
        load=lambda *args, **kwargs: None,
        package=lambda **kwargs: None,
        exports_files=lambda *args, **kwargs: None,
        licenses=lambda *args: None,
    )
    with open(build_path) as f:
        source = f.read()
    exec(compile(source, build_path, "exec"), namespace)  # pylint: disable=exec-used
    return targets


def _label_to_name(label):
    """`":x"` or `"//:x"` -> `"x"`; labels of other packages are returned unchanged."""
    if label.startswith("//:"):
        return label[3:]
    if label.startswith(":"):
        return label[1:]
    return label


def _module_path(dotted):
    """Repo-relative path of the first-party module `dotted` (e.g. `tf_iddpm.unet`), or None."""
    parts = dotted.split(".")
    if parts[0] not in FIRST_PARTY_PACKAGES:
        return None
    if parts == ["run"]:
        return "run.py"
    base = os.path.join(*parts)
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(os.path.join(REPO_ROOT, candidate)):
            return candidate
    return None


def _embedded_script(text):
    """The syntax tree of a string constant that is a Python script with imports, else None.

    Tests run code in fresh interpreters (`subprocess.run([sys.executable, "-c", SCRIPT])`); what
    such a script imports must be in the test's runfiles as much as the test's own imports.
    """
    if "import " not in text or "\n" not in text:
        return None
    try:
        return ast.parse(textwrap.dedent(text))
    except SyntaxError:
        return None


def first_party_imports(path):
    """The first-party files that the Python file `path` imports, at any nesting level.

    Handles `import pkg.mod`, `from pkg import mod`, `from pkg.mod import name` and relative
    imports. A name imported from a package that is not a module of it resolves to the package's
    `__init__.py`. Also counted: a string constant that is exactly the dotted name of an existing
    first-party module (`importlib.import_module("tf_iddpm.train_lib")`, run.py's mode table), and
    the imports of a string constant that parses as a Python script (code run in a subprocess).

    Args:
        path: a repo-relative `.py` path.

    Returns:
        A sorted list of repo-relative paths, excluding `path` itself.

    Raises:
        ValueError: if an import names a first-party module that does not exist.
    """
    with open(os.path.join(REPO_ROOT, path)) as f:
        tree = ast.parse(f.read(), filename=path)
    package_parts = os.path.dirname(path).split(os.sep) if os.path.dirname(path) else []
    found = set()

    def add(dotted, lineno):
        if dotted.split(".")[0] not in FIRST_PARTY_PACKAGES:
            return
        resolved = _module_path(dotted)
        if resolved is None:
            raise ValueError(
                f"{path}:{lineno} imports {dotted!r}, which is not a file of this repository"
            )
        found.add(resolved)

    def scan(tree, script_lineno=None):
        """`script_lineno`: where the string holding `tree` starts, for an embedded script."""
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if _DOTTED_MODULE.fullmatch(node.value) and _module_path(node.value):
                    found.add(_module_path(node.value))
                script = _embedded_script(node.value)
                if script is not None:
                    scan(script, script_lineno or node.lineno)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, script_lineno or node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module
                if base.split(".")[0] not in FIRST_PARTY_PACKAGES:
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if alias.name != "*" and _module_path(submodule) is not None:
                        add(submodule, script_lineno or node.lineno)
                    else:
                        add(base, script_lineno or node.lineno)

    scan(tree)
    found.discard(path)
    return sorted(found)


def _transitive(targets, name, seen=None):
    """Every file in the runfiles of `name`: its srcs and data, and its deps' (recursively)."""
    seen = set() if seen is None else seen
    if name in seen or name not in targets:
        return set()
    seen.add(name)
    files = set()
    for attr in ("srcs", "data", "deps"):
        for item in targets[name].get(attr, []):
            if item.startswith((":", "//:")):
                files |= _transitive(targets, _label_to_name(item), seen)
            else:
                files.add(item)
    return files


@pytest.fixture(scope="module")
def targets():
    return load_build_targets()


def _of_kind(targets, kind):
    return {name: t for name, t in targets.items() if t["kind"] == kind}


def _owners(targets):
    """Maps each repo-relative source to the names of the py_* targets listing it in `srcs`."""
    owners = {}
    for name, target in targets.items():
        if target["kind"].startswith("py_"):
            for src in target.get("srcs", []):
                owners.setdefault(src, []).append(name)
    return owners


# Python files that are never imported: run by path under another interpreter (a filegroup each).
NOT_IMPORTED = ("tools/benchmark_reference.py",)


@pytest.mark.parametrize("package", ["tf_iddpm", "export", "ablation", "tools", "tests", "configs"])
def test_every_library_module_is_in_exactly_one_py_library(targets, package):
    """Test helpers (tests/*.py that are not *_test.py) and config files are libraries too."""
    libraries = _of_kind(targets, "py_library")
    modules = [
        m
        for m in _glob([f"{package}/*.py"])
        if not m.endswith("_test.py") and m not in NOT_IMPORTED
    ]
    assert modules, f"no modules found under {package}/"
    problems = []
    for module in modules:
        owners = [n for n, t in libraries.items() if module in t.get("srcs", [])]
        if len(owners) != 1:
            problems.append(
                f"{module} is in the srcs of {len(owners)} py_library targets "
                f"{owners}; exactly one is required"
            )
    assert not problems, "\n".join(problems)


def test_every_test_file_has_a_py_test(targets):
    tests = _of_kind(targets, "py_test")
    test_files = _glob(["tests/*_test.py"])
    assert "tests/build_file_test.py" in test_files
    by_src = {
        src: name
        for name, t in tests.items()
        for src in t.get("srcs", [])
        if src.startswith("tests/")
    }
    missing = [f for f in test_files if f not in by_src]
    assert not missing, (
        f"test files without a py_test in BUILD: {missing}; add e.g. "
        f'py_test(name="<module>_test", srcs=["{(missing or [""])[0]}", '
        f'"{PYTEST_MAIN}"], main="{PYTEST_MAIN}", ...)'
    )


def test_py_tests_run_their_file_through_pytest(targets):
    problems = []
    for name, test in _of_kind(targets, "py_test").items():
        test_srcs = [s for s in test.get("srcs", []) if s.startswith("tests/")]
        if len(test_srcs) != 1:
            problems.append(f"{name}: srcs must hold exactly one tests/ file, got {test_srcs}")
            continue
        if test.get("main") != PYTEST_MAIN or PYTEST_MAIN not in test.get("srcs", []):
            problems.append(f"{name}: main must be {PYTEST_MAIN!r} and be listed in srcs")
        if test.get("args") != test_srcs:
            problems.append(f"{name}: args must be {test_srcs}, got {test.get('args')}")
        if test.get("size") not in ("small", "medium", "large", "enormous"):
            problems.append(f"{name}: size must be set, got {test.get('size')!r}")
        if name != os.path.basename(test_srcs[0])[: -len(".py")]:
            problems.append(f"{name}: should be named after its file {test_srcs[0]}")
    assert not problems, "\n".join(problems)


def test_run_py_has_a_py_binary(targets):
    binaries = [t for t in _of_kind(targets, "py_binary").values() if "run.py" in t.get("srcs", [])]
    if not os.path.isfile(os.path.join(REPO_ROOT, "run.py")):
        pytest.skip("run.py does not exist yet")
    assert len(binaries) == 1, f"run.py needs exactly one py_binary, found {len(binaries)}"
    assert binaries[0].get("main", "run.py") == "run.py"


def test_every_listed_file_exists(targets):
    missing = []
    for name, target in targets.items():
        for attr in ("srcs", "data"):
            for item in target.get(attr, []):
                if item.startswith((":", "//")):
                    continue
                if not os.path.isfile(os.path.join(REPO_ROOT, item)):
                    missing.append(f"{name}.{attr}: {item}")
    assert not missing, "files named in BUILD that do not exist:\n" + "\n".join(missing)


def test_every_dependency_is_a_defined_target(targets):
    undefined = []
    for name, target in targets.items():
        for attr in ("deps", "data"):
            for label in target.get(attr, []):
                if label.startswith(":") or label.startswith("//:"):
                    if _label_to_name(label) not in targets:
                        undefined.append(f"{name}.{attr}: {label}")
    assert not undefined, "labels that name no target in BUILD:\n" + "\n".join(undefined)


def test_first_party_imports_are_direct_deps(targets):
    owners = _owners(targets)
    problems = []
    for name, target in targets.items():
        if not target["kind"].startswith("py_"):
            continue
        provided = set(target.get("srcs", []))
        for dep in target.get("deps", []):
            provided.update(targets.get(_label_to_name(dep), {}).get("srcs", []))
        for src in target.get("srcs", []):
            # This file's string constants are scanner fixtures, not code it runs.
            if src.startswith("//") or src == "tests/build_file_test.py":
                continue
            for imported in first_party_imports(src):
                if imported not in provided:
                    suggestion = [f":{o}" for o in owners.get(imported, [])] or "a new py_library"
                    problems.append(
                        f"{name}: {src} imports {imported}; add {suggestion} to its deps"
                    )
    assert not problems, "\n".join(problems)


def test_dependency_graph_has_no_cycles(targets):
    """Bazel rejects cyclic deps; a lazy import inside a function counts as an import too."""
    state = {}  # name -> "visiting" or "done"

    def visit(name, path):
        if state.get(name) == "done" or name not in targets:
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name) :] + [name]
            pytest.fail(
                "dependency cycle: " + " -> ".join(cycle) + " (break the import cycle "
                "between these modules; Bazel cannot build it)"
            )
        state[name] = "visiting"
        for dep in targets[name].get("deps", []):
            visit(_label_to_name(dep), path + [name])
        state[name] = "done"

    for name in targets:
        visit(name, [])


# The modules whose import graph must be acyclic and layered: the library, the export package, the
# ablation study, the measurement tools, the experiment configs and the entry point (tests may
# import anything).
_APPLICATION_SOURCES = (
    "tf_iddpm/*.py",
    "export/*.py",
    "ablation/*.py",
    "tools/*.py",
    "configs/*.py",
    "run.py",
)


def module_import_graph():
    """{repo-relative module: first-party modules it imports} over _APPLICATION_SOURCES.

    Computed from the sources (`first_party_imports`), so imports inside functions count, as do
    modules named by string for a dynamic import; package `__init__.py` files are left out (empty
    here, and every module of a package imports them implicitly).
    """
    modules = [m for m in _glob(list(_APPLICATION_SOURCES)) if not m.endswith("__init__.py")]
    return {
        m: [i for i in first_party_imports(m) if not i.endswith("__init__.py")] for m in modules
    }


def find_import_cycle(graph):
    """One import cycle of `graph` as a list of modules [a, b, ..., a], or None."""
    state = {}  # module -> "visiting" or "done"

    def visit(module, path):
        if state.get(module) == "done":
            return None
        if state.get(module) == "visiting":
            return path[path.index(module) :] + [module]
        state[module] = "visiting"
        for imported in graph.get(module, []):
            cycle = visit(imported, path + [module])
            if cycle:
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_modules_have_no_import_cycles():
    """No module imports itself through others, not even lazily inside a function: Bazel could not
    express the cycle, and each module would be half-initialised when the other first runs."""
    graph = module_import_graph()
    assert "tf_iddpm/chains.py" in graph and "run.py" in graph
    cycle = find_import_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The import layers of the README's Architecture section, lowest first: a module imports modules of
# its own layer or of lower ones, never of a higher one.  A new module must be placed here.
IMPORT_LAYERS = (
    (
        "foundations",
        (
            "configs/*.py",
            "tf_iddpm/fileio.py",
            "tf_iddpm/console.py",
            "tf_iddpm/choices.py",
            "tf_iddpm/schedules.py",
            "tf_iddpm/samplers.py",
            "tf_iddpm/losses.py",
            "tf_iddpm/config_utils.py",
            "tf_iddpm/unet_options.py",
            "tf_iddpm/image_utils.py",
            "tf_iddpm/checkpoints.py",
            "tf_iddpm/distribute.py",
        ),
    ),
    (
        "data, network, diffusion",
        (
            "tf_iddpm/data.py",
            "tf_iddpm/data_sources.py",
            "tf_iddpm/digits_dataset.py",
            "tf_iddpm/unet.py",
            "tf_iddpm/unet_ops.py",
            "tf_iddpm/unet_reference.py",
            "tf_iddpm/torch_checkpoint.py",
            "tf_iddpm/diffusion.py",
            "tf_iddpm/solvers.py",
            "tf_iddpm/timestep_distribution.py",
            "tf_iddpm/optimizers.py",
            "tf_iddpm/metrics.py",
        ),
    ),
    (
        "assembly",
        (
            "tf_iddpm/chains.py",
            "tf_iddpm/factory.py",
            "tf_iddpm/convert.py",
            "tf_iddpm/inference.py",
        ),
    ),
    (
        "modes",
        (
            "tf_iddpm/train_lib.py",
            "tf_iddpm/eval_lib.py",
            "tf_iddpm/sample_lib.py",
            "tf_iddpm/quality_lib.py",
        ),
    ),
    ("entry points", ("export/*.py", "run.py", "ablation/*.py", "tools/*.py")),
)
# The layer whose modules never import each other: each mode is one job built from the layers below.
MODES = next(i for i, (name, _) in enumerate(IMPORT_LAYERS) if name == "modes")
# What the library (tf_iddpm/, the installed package) must not import: the checkout-only folders,
# which the wheel does not ship, and the entry point.
LIBRARY_MUST_NOT_IMPORT = ("export/", "ablation/", "tools/", "configs/", "run.py")
# What export/ must not reach, even indirectly: training and the run modes (a SavedModel export
# and the serving helpers need only the network, the diffusion and the checkpoint readers).
EXPORT_MUST_NOT_REACH = (
    "tf_iddpm/train_lib.py",
    "tf_iddpm/eval_lib.py",
    "tf_iddpm/sample_lib.py",
    "tf_iddpm/quality_lib.py",
    "tf_iddpm/optimizers.py",
    "tf_iddpm/timestep_distribution.py",
    "tf_iddpm/data.py",
    "tf_iddpm/data_sources.py",
    "tf_iddpm/distribute.py",
)


def _layer_of(module):
    layers = [
        i
        for i, (_, patterns) in enumerate(IMPORT_LAYERS)
        if any(fnmatch.fnmatch(module, p) for p in patterns)
    ]
    return layers[0] if len(layers) == 1 else None


def test_imports_go_down_the_layers():
    graph = module_import_graph()
    unplaced = [m for m in graph if _layer_of(m) is None]
    assert not unplaced, (
        f"modules in no layer (or several) of IMPORT_LAYERS: {unplaced}; place "
        "each in the layer of the README's Architecture section it belongs to"
    )
    problems = []
    for module, imported in graph.items():
        for target in imported:
            if _layer_of(target) > _layer_of(module):
                problems.append(
                    f"{module} ({IMPORT_LAYERS[_layer_of(module)][0]}) imports "
                    f"{target} ({IMPORT_LAYERS[_layer_of(target)][0]}), a higher layer"
                )
            if MODES in (_layer_of(module), _layer_of(target)) and _layer_of(module) == _layer_of(
                target
            ):
                problems.append(
                    f"{module} imports {target}: modes never import modes (what two modes share "
                    "belongs to a lower layer, e.g. tf_iddpm/inference.py)"
                )
            if module.startswith("tf_iddpm/") and target.startswith(LIBRARY_MUST_NOT_IMPORT):
                problems.append(
                    f"{module} imports {target}: the library never imports "
                    f"{', '.join(LIBRARY_MUST_NOT_IMPORT)} (the wheel ships none of them)"
                )
    assert not problems, "\n".join(problems)


def test_export_reaches_no_training_code():
    graph = module_import_graph()
    for module in (m for m in graph if m.startswith("export/")):
        reached, stack = set(), [module]
        while stack:
            for target in graph.get(stack.pop(), []):
                if target not in reached:
                    reached.add(target)
                    stack.append(target)
        forbidden = sorted(reached & set(EXPORT_MUST_NOT_REACH))
        assert not forbidden, f"{module} imports training code (directly or not): {forbidden}"


def test_the_layer_rules_catch_a_mode_importing_a_mode(monkeypatch):
    graph = module_import_graph()
    assert not [t for t in graph["tf_iddpm/train_lib.py"] if _layer_of(t) == MODES]
    planted = dict(graph, **{"tf_iddpm/train_lib.py": ["tf_iddpm/quality_lib.py"]})
    monkeypatch.setattr(sys.modules[__name__], "module_import_graph", lambda: planted)
    with pytest.raises(AssertionError, match="modes never import modes"):
        test_imports_go_down_the_layers()


def test_import_cycle_finder_on_known_cases():
    assert find_import_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert find_import_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_import_cycle({"a": ["a"]}) == ["a", "a"]


def test_package_init_files_reach_every_module(targets):
    """Bazel creates no __init__.py files (.bazelrc), so each target must bring its package's."""
    problems = []
    for name, target in targets.items():
        if not target["kind"].startswith("py_"):
            continue
        closure = _transitive(targets, name)
        for src in closure:
            package = os.path.dirname(src)
            init = os.path.join(package, "__init__.py")
            if (
                package in FIRST_PARTY_PACKAGES
                and os.path.isfile(os.path.join(REPO_ROOT, init))
                and init not in closure
            ):
                problems.append(f"{name}: brings {src} but not {init}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_files_read_by_path_are_in_the_runfiles(targets):
    """Under Bazel a test sees only its runfiles: tests, test helpers and run.py that mention
    testdata/, configs/ or run.py must bring them (library modules name configs only in docs)."""
    problems = []
    for name, target in targets.items():
        if not target["kind"].startswith("py_"):
            continue
        runfiles = _transitive(targets, name)
        for src in target.get("srcs", []):
            # build_file_test.py names these paths without reading them.
            reads_files = src.startswith("tests/") or src == "run.py"
            if src == "tests/build_file_test.py" or not reads_files:
                continue
            with open(os.path.join(REPO_ROOT, src)) as f:
                text = f.read()
            if "testdata" in text and not any(r.startswith("tests/testdata/") for r in runfiles):
                problems.append(f'{name}: {src} mentions testdata; add ":testdata" to its data')
            if "configs" in text and not any(r.startswith("configs/") for r in runfiles):
                problems.append(f'{name}: {src} mentions configs; add ":configs" to its data')
            if "run.py" in text and src != "run.py" and "run.py" not in runfiles:
                problems.append(f'{name}: {src} mentions run.py; add ":run" to its data')
    assert not problems, "\n".join(problems)


def test_import_resolution_on_known_cases(tmp_path, monkeypatch):
    """The import scanner itself: absolute, from-package, from-module, relative, by-name and
    subprocess-script imports; a name that is not a module of the package (CONSTANT) resolves to
    the package's __init__.py."""
    (tmp_path / "tf_iddpm").mkdir()
    (tmp_path / "export").mkdir()
    for rel in (
        "tf_iddpm/__init__.py",
        "tf_iddpm/a.py",
        "tf_iddpm/b.py",
        "tf_iddpm/c.py",
        "tf_iddpm/loaded_by_name.py",
        "tf_iddpm/in_subprocess.py",
        "export/__init__.py",
        "export/lib.py",
    ):
        (tmp_path / rel).write_text("")
    (tmp_path / "tf_iddpm" / "d.py").write_text(
        textwrap.dedent('''\
        import os
        import numpy as np
        import tf_iddpm.a
        from tf_iddpm import b, CONSTANT
        from . import c
        SCRIPT = """
            import json
            from tf_iddpm import in_subprocess
        """
        def f():
            from export.lib import thing
            return importlib.import_module("tf_iddpm.loaded_by_name"), "tf_iddpm.nothing"
        ''')
    )
    monkeypatch.setitem(globals(), "REPO_ROOT", str(tmp_path))
    assert first_party_imports("tf_iddpm/d.py") == [
        "export/lib.py",
        "tf_iddpm/__init__.py",
        "tf_iddpm/a.py",
        "tf_iddpm/b.py",
        "tf_iddpm/c.py",
        "tf_iddpm/in_subprocess.py",
        "tf_iddpm/loaded_by_name.py",
    ]
    (tmp_path / "run.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "run_test.py").write_text("import run\n")
    assert first_party_imports("tests/run_test.py") == ["run.py"]
    (tmp_path / "tf_iddpm" / "e.py").write_text("X = 1\nimport tf_iddpm.nope\n")
    with pytest.raises(ValueError, match="e.py:2 imports 'tf_iddpm.nope'"):
        first_party_imports("tf_iddpm/e.py")


def test_evaluator_rejects_duplicate_names(tmp_path):
    build = tmp_path / "BUILD"
    build.write_text('py_library(name = "x", srcs = [])\npy_library(name = "x", srcs = [])\n')
    with pytest.raises(ValueError, match="'x' is defined twice"):
        load_build_targets(str(build))
