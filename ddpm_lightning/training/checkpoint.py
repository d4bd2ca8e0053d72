"""Checkpoints: atomic saving, and loading back into a model with one-line errors."""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, foreign or does not fit the model."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames
    it over the target, so that ``last.ckpt`` is always a complete file: a process killed
    mid-save, or a full disk, leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise CheckpointError(
                    f"could not save checkpoint {path}: {err.strerror or err}; the previous "
                    "checkpoint is intact"
                ) from err
            raise


def read_checkpoint(path, key: str = "ckpt_path") -> dict:
    """torch.load a ddpm-lightning checkpoint (weights only), or raise CheckpointError in one
    line naming ``key`` and the path."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        raise CheckpointError(f"{key}={path} is a directory; give a checkpoint file, e.g. "
                              f"{key}={p / 'checkpoints' / 'last.ckpt'}")
    if not p.is_file():
        raise CheckpointError(f"{key}={path} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, wrong format, pickled code
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{key}={path} is not a readable checkpoint (corrupt or truncated?): {first[:200]}"
        ) from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(f"{key}={path} is not a Lightning checkpoint (no state_dict)")
    run_config = (ckpt.get("hyper_parameters") or {}).get("run_config")
    if not isinstance(run_config, Mapping) or "model" not in run_config:
        raise CheckpointError(
            f"{key}={path} is not a ddpm-lightning checkpoint (no run_config in hyper_parameters)"
        )
    return ckpt


def load_module(path, key: str = "ckpt_path", model_config: Mapping | None = None):
    """Rebuild the DDPM LightningModule saved in ``path`` from the config it carries, and load
    its weights strictly. ``model_config`` requests a different network; a checkpoint that does
    not fit it is refused. Returns (module, run_config, checkpoint)."""
    from ddpm_lightning.training.module import DDPM

    ckpt = read_checkpoint(path, key)
    hp = dict(ckpt["hyper_parameters"])
    run_config = hp.pop("run_config")
    model = construct(model_config or run_config["model"], f"{key}: model")
    betas = construct(run_config["schedule"], f"{key}: schedule")
    module = DDPM(model, betas, run_config=run_config, **hp)
    check_fits(module, ckpt["state_dict"], key, path)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module, run_config, ckpt


# Where the package's classes lived before the layered tree (checkpoints name them).
MOVED = {"ddpm_lightning.unet.": "ddpm_lightning.core.unet.",
         "ddpm_lightning.schedules.": "ddpm_lightning.core.schedules."}


def construct(spec: Mapping, key: str):
    """Call the ``_target_`` of a saved config section with its other keys as arguments (the
    network and the schedule a checkpoint records; no interpolation, no recursion). Targets
    saved before the package was layered are found at their new homes."""
    spec = dict(spec)
    target = str(spec.pop("_target_", ""))
    for old, new in MOVED.items():
        if target.startswith(old):
            target = new + target[len(old):]
    module_name, _, attr = target.rpartition(".")
    if not module_name.startswith("ddpm_lightning."):
        raise CheckpointError(f"{key}._target_={target!r} is not a ddpm_lightning callable")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"{key}._target_={target!r} cannot be imported: {err}") from err
    return fn(**spec)


def check_fits(module: torch.nn.Module, state_dict: Mapping, key: str, path) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or extra or shapes:
        if shapes:
            k = shapes[0]
            what = (f"{k} has shape {tuple(state_dict[k].shape)} in the checkpoint but "
                    f"{tuple(own[k].shape)} in the model")
        elif missing:
            what = f"{missing[0]} is missing from the checkpoint"
        else:
            what = f"{extra[0]} is not a parameter of the model"
        raise CheckpointError(
            f"{key}={path} does not fit the model ({len(missing)} missing, {len(extra)} "
            f"unexpected, {len(shapes)} mis-shaped tensors): {what}"
        )
