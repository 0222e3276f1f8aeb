"""Packaging with extras (SPEC §4): the base install is the optimizer with torch only, the extras hold what
sweeps/extras.py says they do, and a command whose extra is missing says in one line which one to install.

A missing module is simulated the way Python itself reads it: ``sys.modules[name] = None`` (what
``importlib.util.find_spec`` reads as not installed), or an import finder that finds neither it nor its submodules.
"""

import ast
import importlib.abc
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sweeps.extras import DISTRIBUTION, EXTRAS, MissingExtra, require

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser before it joined the standard library (the dev extra)
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PACKAGES = ("locoprop", "baselines", "sweeps", "analysis")
HARNESS_MODULES = list(EXTRAS["harness"].modules)


def _distributions(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, the extras of this project they name expanded."""
    names = set()
    for text in requirements:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == canonicalize_name(DISTRIBUTION):
            for extra in requirement.extras:
                names |= _distributions(PYPROJECT["optional-dependencies"][extra])
        else:
            names.add(canonicalize_name(requirement.name))
    return names


def _extra(name: str) -> set[str]:
    return _distributions(PYPROJECT["optional-dependencies"][name])


def _documented(*extras: str) -> set[str]:
    return {canonicalize_name(dist) for extra in extras for dist in EXTRAS[extra].modules.values()}


def _top_level_imports(package: str) -> set[str]:
    """The top-level names of every absolute import in ``package``'s modules, function-level ones included."""
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


class _NotInstalled(importlib.abc.MetaPathFinder):
    """Import finder first in line: ``module`` and its submodules are not found, as if not installed."""

    def __init__(self, module: str):
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name == self.module or name.startswith(f"{self.module}."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _uninstall(monkeypatch, module: str) -> None:
    """Make ``module`` (and its submodules) not importable for this test, as if it were not installed."""
    for name in [n for n in sys.modules if n == module or n.startswith(f"{module}.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(module), *sys.meta_path])


# ----------------------------------------------------------- what each install holds
def test_the_base_install_is_torch_only():
    assert {Requirement(text).name for text in PYPROJECT["dependencies"]} == {"torch"}


def test_locoprop_imports_nothing_but_torch_and_the_standard_library():
    third_party = _top_level_imports("locoprop") - set(sys.stdlib_module_names) - {"locoprop"}
    assert third_party == {"torch"}


@pytest.mark.parametrize(
    "extra, holds",
    [
        ("harness", ("harness",)),
        ("ray", ("harness", "ray")),
        ("postgres", ("harness", "postgres")),
        ("all", ("harness", "ray", "postgres")),
        ("dev", ("harness", "ray", "postgres")),
    ],
)
def test_each_extra_installs_the_modules_it_is_documented_to(extra, holds):
    assert _documented(*holds) <= _extra(extra)


def test_dev_is_every_extra_plus_the_test_runner_the_linter_the_test_models_and_their_trainers():
    # tomli: on Python 3.10 only; transformers: the real model classes of tests/test_models.py; accelerate and
    # lightning: the trainers of tests/test_hf_trainer.py and tests/test_lightning.py
    assert _extra("dev") == _extra("all") | {"pytest", "ruff", "tomli", "transformers", "accelerate", "lightning"}


def test_every_module_the_harness_imports_is_in_an_extra():
    harness_imports = set().union(*(_top_level_imports(p) for p in PACKAGES if p != "locoprop"))
    third_party = harness_imports - set(sys.stdlib_module_names) - set(PACKAGES) - {"torch"}
    assert third_party <= set().union(*(extra.modules for extra in EXTRAS.values()))


def test_a_wheel_carries_every_data_file(tmp_path):
    """A wheel built from the tree holds every file of the packages that is not Python (the search spaces,
    those in subfolders too), as a non-editable install needs them."""
    source = tmp_path / "source"  # a clean copy: a build/ folder left in the tree could hold stale files
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path),
         str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        held = set(archive.namelist())
    data = [path.relative_to(ROOT).as_posix() for package in PACKAGES for path in (ROOT / package).rglob("*")
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts]  # fmt: skip
    assert any(name.startswith("sweeps/search/spaces/hypergrad/") for name in data)
    assert [name for name in data if name not in held] == []


# ----------------------------------------------------------- a missing extra, one line
def test_the_console_script_without_the_harness_says_which_extra_to_install():
    """The entry of pyproject.toml, run with no harness module importable, imports none and prints one line."""
    module, function = PYPROJECT["scripts"]["locoprop"].split(":")
    code = (
        f"import sys\nfor name in {HARNESS_MODULES!r}: sys.modules[name] = None\n"
        f"from {module} import {function}\nsys.exit({function}(['train', '--help']))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("locoprop: ")
    assert f'pip install "{DISTRIBUTION}[harness]"' in result.stderr


def test_the_entry_names_only_the_missing_harness_modules(monkeypatch, capsys):
    from sweeps.__main__ import main

    monkeypatch.setitem(sys.modules, "optuna", None)  # what find_spec reads as not installed
    assert main(["--help"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "locoprop: the locoprop command (runner, baselines, sweeps, analysis) needs the 'harness' extra "
        f'(not installed: optuna); install it with: pip install "{DISTRIBUTION}[harness]"\n'
    )


def test_the_entry_exits_like_the_cli_on_bad_setup():
    from sweeps import __main__ as entry
    from sweeps.commands import cli

    assert entry.EXIT_BAD_INPUT == cli.EXIT_BAD_INPUT


def test_ctrl_c_while_the_cli_imports_prints_one_line(monkeypatch, capsys):
    """Importing torch, pandas and Optuna takes seconds, before the CLI can catch Ctrl-C."""
    from sweeps import __main__ as entry

    def interrupted_import():
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "_cli", interrupted_import)
    assert entry.main(["train"]) == 130
    assert capsys.readouterr().err == "locoprop: interrupted\n"


def test_sigterm_while_the_cli_imports_prints_one_line_and_exits_143(monkeypatch, capsys):
    """A scheduler's stop in the seconds of the imports: one line and SIGTERM's status, as the CLI gives."""
    from sweeps import __main__ as entry

    def sigterm_during_import():
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once: the import is not a training step
        raise AssertionError("SIGTERM was not taken")

    monkeypatch.setattr(entry, "_cli", sigterm_during_import)
    before = signal.getsignal(signal.SIGTERM)
    assert entry.main(["train"]) == 143
    assert capsys.readouterr().err == "locoprop: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler is back


SWEEP = ["sweep", "--optimizer", "adam", "--workload", "autoencoder", "--data", "synthetic", "--trials", "1"]
SWEEP += ["--batch-size", "64"]  # fits the 512 synthetic examples: the missing extra is the only problem


@pytest.mark.parametrize(
    "module, extra, flags",
    [
        ("ray", "ray", ["--backend", "ray"]),
        ("psycopg", "postgres", ["--storage", "postgresql://user:secretpw@127.0.0.1:9/db"]),
    ],
)
def test_a_sweep_without_its_extra_says_which_to_install_and_writes_nothing(
    monkeypatch, capsys, tmp_path, module, extra, flags
):
    from sweeps.commands.cli import main

    _uninstall(monkeypatch, module)
    out = tmp_path / "sweep"
    assert main([*SWEEP, "--study", "s", "--out", str(out), *flags]) == 2
    stdout, stderr = capsys.readouterr()
    assert stderr == (
        f"locoprop: {EXTRAS[extra].purpose} needs the {extra!r} extra (not installed: {module}); "
        f'install it with: pip install "{DISTRIBUTION}[{extra}]"\n'
    )
    assert "secretpw" not in stdout + stderr
    assert not out.exists()


def test_require_names_the_missing_dependency_of_a_module(monkeypatch, tmp_path):
    """Ray installed without its Tune dependencies is the 'ray' extra missing all the same."""
    (tmp_path / "tune_stand_in.py").write_text("import dependency_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtra, match=r"'ray' extra \(not installed: dependency_not_installed\)") as info:
        require("tune_stand_in", "ray")
    assert f'pip install "{DISTRIBUTION}[ray]"' in str(info.value)


def test_require_refuses_an_unknown_extra():
    with pytest.raises(ValueError, match="Unknown extra 'rays'; expected one of harness, ray, postgres"):
        require("json", "rays")
