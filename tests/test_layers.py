"""The package's layers, as the tree shows them: each imports only from the layers above it,
and Hydra/OmegaConf stay in the application layer and the tools."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "ddpm_lightning"
ORDER = ["core", "metrics", "training", "app", "tools"]
# third-party packages each layer must not import
FORBIDDEN = {
    "core": {"lightning", "hydra", "omegaconf"},
    "metrics": {"lightning", "hydra", "omegaconf"},
    "training": {"hydra", "omegaconf"},
    "app": set(),
    "tools": set(),
}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions, as absolute names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for layer in ORDER:
        allowed = set(ORDER[:ORDER.index(layer) + 1])
        for path in sorted((root / layer).rglob("*.py")):
            for mod in sorted(imports(path)):
                top = mod.split(".")[0]
                if top in FORBIDDEN[layer]:
                    found.append(f"{path.relative_to(root)} imports {mod}")
                parts = mod.split(".")
                if top == "ddpm_lightning" and len(parts) > 1 and parts[1] in ORDER \
                        and parts[1] not in allowed:
                    found.append(f"{path.relative_to(root)} imports {mod}")
    return found


def test_every_package_file_lives_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    assert sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()) == \
        sorted(ORDER)


def test_layers_import_only_from_the_layers_above():
    assert violations() == []
    top = imports(PACKAGE / "__init__.py")
    assert not any(m.split(".")[0] in {"hydra", "omegaconf", "lightning"} for m in top)


@pytest.mark.parametrize("layer, line, needle", [
    ("core", "from lightning.pytorch import Callback\n", "imports lightning.pytorch"),
    ("training", "from omegaconf import OmegaConf\n", "imports omegaconf"),
    ("metrics", "    from ddpm_lightning.training.data import x\n", "imports ddpm_lightning.training"),
    ("core", "from ..app import runtime\n", "imports ddpm_lightning.app"),
])
def test_a_forbidden_import_is_found(tmp_path, layer, line, needle):
    """The check itself: a copy of the tree with one bad import (lazy or relative) fails."""
    root = tmp_path / "ddpm_lightning"
    for layer_name in ORDER:
        (root / layer_name).mkdir(parents=True)
    body = "def f():\n" + line if line.startswith("    ") else line
    (root / layer / "bad.py").write_text(body)
    global PACKAGE
    saved, PACKAGE = PACKAGE, root  # relative imports resolve against the copied tree
    try:
        found = violations(root)
    finally:
        PACKAGE = saved
    assert found and all(needle in f for f in found), found


def _with_targets(ckpt_path: Path, out: Path, model: str, schedule: str) -> Path:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    run_config = ckpt["hyper_parameters"]["run_config"]
    run_config["model"]["_target_"], run_config["schedule"]["_target_"] = model, schedule
    torch.save(ckpt, out)
    return out


def test_a_checkpoint_saved_before_the_layers_still_loads(tiny_ckpt, tmp_path):
    """Checkpoints record the network and schedule by import path; the old flat paths
    (ddpm_lightning.unet.UNet, ddpm_lightning.schedules.make_beta_schedule) are found."""
    from ddpm_lightning.core.unet import UNet
    from ddpm_lightning.training.checkpoint import load_module

    old = _with_targets(tiny_ckpt, tmp_path / "old.ckpt", "ddpm_lightning.unet.UNet",
                        "ddpm_lightning.schedules.make_beta_schedule")
    module, _, _ = load_module(old)
    new, _, _ = load_module(tiny_ckpt)
    assert isinstance(module.model, UNet)
    for (k, a), b in zip(module.state_dict().items(), new.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("target", ["os.system", "ddpm_lightning.core.unet.NoSuchNet"])
def test_a_foreign_or_missing_target_is_refused_in_one_line(tiny_ckpt, tmp_path, target):
    from ddpm_lightning.training.checkpoint import CheckpointError, load_module

    bad = _with_targets(tiny_ckpt, tmp_path / "bad.ckpt", target,
                        "ddpm_lightning.core.schedules.make_beta_schedule")
    with pytest.raises(CheckpointError) as err:
        load_module(bad)
    msg = str(err.value)
    assert "\n" not in msg and f"model._target_={target!r}" in msg, msg


def test_no_module_of_the_package_imports_one_that_imports_it():
    """The package's own import graph (top-level and function-level imports) has no cycle
    between two modules, e.g. metrics.fid ↔ metrics.reference."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        graph[name.removesuffix(".__init__")] = {m for m in imports(path)
                                                  if m.startswith("ddpm_lightning.")}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if b in graph and a in graph[b] and a != b})
    assert not pairs, pairs
