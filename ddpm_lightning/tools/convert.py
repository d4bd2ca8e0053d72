"""Import diffusers-format DDPM U-Net weights (``UNet2DModel``) into our ``UNet``.

The released CIFAR-10 model of Ho et al. 2020 is on the Hugging Face Hub as
``google/ddpm-cifar10-32``, in diffusers' ``UNet2DModel`` format. Our ``UNet``
(``ddpm_lightning/core/unet.py``) has the same layers, parameter shapes and computation
(35,746,307 parameters), so the weights map one-to-one, by name only::

    python -m ddpm_lightning.tools.convert SRC OUT.ckpt [--experiment cifar10_ddpm]

``SRC`` is a diffusers model folder (``diffusion_pytorch_model.safetensors`` or ``.bin``, and
``config.json``; a pipeline folder whose model sits in ``unet/`` works too) or a single
weights file. When there is a ``config.json``, it must describe the architecture of the
experiment's ``model`` config (for ``cifar10_ddpm``: block_out_channels [128, 256, 256, 256],
layers_per_block 2, attention in the second down block and the third up block, single-head
attention, GroupNorm(32, eps 1e-6), silu, positional time embedding with
flip_sin_to_cos=False and freq_shift=1, downsample_padding=0); anything else is refused with
an error naming the key. Nothing is downloaded. With a network, fetch the weights once with
``huggingface_hub`` (installed with diffusers)::

    from huggingface_hub import snapshot_download
    src = snapshot_download("google/ddpm-cifar10-32",
                            allow_patterns=["*.json", "*.safetensors"])
    # then: python -m ddpm_lightning.tools.convert <src> ddpm_cifar10_ema.ckpt

(use ``"*.bin"`` in ``allow_patterns`` where a repository has no safetensors file).

The output is a Lightning-style checkpoint (``torch.load(path, weights_only=True)`` reads it):
``state_dict`` holds the weights twice, as ``model.*`` and as ``ema_model.*`` (the released
weights are the EMA weights), and ``hyper_parameters["run_config"]`` is the resolved
configuration of ``python train.py experiment=cifar10_ddpm`` (linear β from 1e-4 to 0.02,
T = 1000, as the released model was trained), so the model rebuilds with
``hydra.utils.instantiate(run_config["model"])``. ``global_step`` and ``epoch`` are 0: this is
an import for sampling and evaluation, not a resumable training state (no optimizer state).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ddpm_lightning.app import CONF_DIR
from ddpm_lightning.core.files import atomic_write
from ddpm_lightning.tools.diffusers_unet import (
    check_diffusers_config,
    diffusers_key,
    expected_diffusers_config,
    load_diffusers_weights,
    unet_from_diffusers,
)
from ddpm_lightning.training.hparams import to_plain

__all__ = [
    "CONF_DIR",
    "check_diffusers_config",
    "compose_run_config",
    "convert",
    "diffusers_key",
    "expected_diffusers_config",
    "load_diffusers_weights",
    "main",
    "unet_from_diffusers",
    "write_checkpoint",
]


DEFAULT_EXPERIMENT = "cifar10_ddpm"

# ----------------------------------------------------------------------- the checkpoint

def compose_run_config(experiment: str = DEFAULT_EXPERIMENT, overrides: Sequence[str] = (),
                       config_dir: str | os.PathLike | None = None) -> dict:
    """The resolved run configuration of ``python train.py experiment=<experiment>
    [overrides]``, as plain dicts and lists, without the ``hydra`` section (composed with
    Hydra's compose API from ``conf/``; an already initialised Hydra is left as it was)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    config_dir = Path(config_dir or CONF_DIR).resolve()
    if not (config_dir / "train.yaml").is_file():
        raise FileNotFoundError(f"no Hydra config folder with train.yaml at {config_dir}; "
                                f"run from a checkout of ddpm-lightning or pass config_dir")
    gh = GlobalHydra.instance()
    previous = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name="train",
                          overrides=[f"experiment={experiment}", *overrides])
    except HydraException as err:
        raise ValueError(f"cannot compose experiment={experiment} "
                         f"{' '.join(overrides)}: {err}") from err
    finally:
        if previous is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(previous)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config.pop("hydra", None)
    return run_config


def write_checkpoint(our_state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     config: Mapping | None = None, *, source: str | None = None) -> Path:
    """Write a Lightning-style checkpoint of ``DDPM`` that our sampling code can load.

    ``our_state_dict`` holds our ``UNet`` parameters (bare names, as ``unet_from_diffusers``
    gives them); they are stored twice, as ``model.*`` and ``ema_model.*``. ``config`` is the
    run configuration (a dict or DictConfig; None = ``compose_run_config("cifar10_ddpm")``):
    it becomes ``hyper_parameters["run_config"]``, and its ``module`` arguments the other
    hyper-parameters. The weights must fit ``config["model"]`` exactly (``ValueError``
    otherwise). The file is written to a temporary name and then renamed over ``path``.
    """
    from importlib.metadata import PackageNotFoundError, version

    from hydra.utils import instantiate

    run_config = compose_run_config() if config is None else to_plain(config)
    run_config = {k: v for k, v in run_config.items() if k != "hydra"}
    for key in ("model", "module", "schedule"):
        if not isinstance(run_config.get(key), Mapping):
            raise TypeError(f"config has no {key!r} section; pass a full run configuration "
                             f"(see compose_run_config)")
    with torch.device("meta"):
        net = instantiate(run_config["model"])
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for key, value in our_state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    got = {k: tuple(v.shape) for k, v in our_state_dict.items()}
    for key, shape in want.items():
        if key not in got:
            raise ValueError(f"state dict is missing our UNet parameter {key!r}")
        if got[key] != shape:
            raise ValueError(f"state dict entry {key!r} has shape {list(got[key])}, but "
                             f"config model needs {list(shape)}")
    for key in got:
        if key not in want:
            raise ValueError(f"unexpected state dict entry {key!r} for the config's model")

    weights = {k: v.detach().to("cpu").contiguous() for k, v in our_state_dict.items()}
    state_dict = {f"model.{k}": v.clone() for k, v in weights.items()}
    state_dict.update({f"ema_model.{k}": v.clone() for k, v in weights.items()})
    try:  # the installed version, without importing lightning (seconds)
        lightning_version = version("lightning")
    except PackageNotFoundError:
        import lightning

        lightning_version = lightning.__version__
    hparams = {k: v for k, v in run_config["module"].items() if k != "_target_"}
    hparams["run_config"] = run_config
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning_version,
        "state_dict": state_dict,
        "hparams_name": None,
        "hyper_parameters": hparams,
        "converted_from": source or "diffusers UNet2DModel weights",
    }
    path = Path(path).expanduser()
    with atomic_write(path) as f:
        torch.save(checkpoint, f)
    return path


# diffusers' scheduler settings → ours: (our key, {their value: ours} or None for the same value)
SCHEDULER_KEYS = {
    "prediction_type": ("module.parameterization",
                        {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}),
    "beta_schedule": ("schedule", {"linear": "linear", "squaredcos_cap_v2": "cosine"}),
    "num_train_timesteps": ("schedule.T", None),
    "rescale_betas_zero_snr": ("schedule.rescale_zero_terminal_snr", None),
}


def scheduler_overrides(src: str | os.PathLike) -> list[str]:
    """The overrides a diffusers pipeline folder's ``scheduler/scheduler_config.json`` implies:
    the prediction type (ε, v or x_0), the schedule (linear with its β range, or cosine), T and
    the zero-terminal-SNR rescaling; [] for a model folder or a weights file. A setting we have
    no equivalent for is refused in one line."""
    import json

    path = Path(src).expanduser() / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return []
    config = json.loads(path.read_text())
    out = []
    for theirs, (ours, mapping) in SCHEDULER_KEYS.items():
        if theirs not in config:
            continue
        value = config[theirs]
        if mapping is not None:
            if value not in mapping:
                raise ValueError(f"{path}: {theirs}={value!r} has no equivalent here; supported: "
                                 f"{', '.join(mapping)}")
            value = mapping[value]
        out.append(f"{ours}={str(value).lower() if isinstance(value, bool) else value}")
    if config.get("beta_schedule", "linear") == "linear":
        out += [f"schedule.{k}={config[k]}" for k in ("beta_start", "beta_end") if k in config]
    return out


def _merge_overrides(implied: Sequence[str], given: Sequence[str]) -> list[str]:
    """``implied`` then ``given``; a key both set to different values is refused."""
    said = dict(o.split("=", 1) for o in given if "=" in o)
    for item in implied:
        key, value = item.split("=", 1)
        if key in said and said[key] != value:
            raise ValueError(f"{key}={said[key]} contradicts the diffusers scheduler config "
                             f"({key}={value}); drop the override")
    return [*implied, *given]


def convert(src: str | os.PathLike, out: str | os.PathLike,
            experiment: str = DEFAULT_EXPERIMENT, overrides: Sequence[str] = ()) -> Path:
    """``src`` (diffusers folder or weights file) → our checkpoint at ``out``, for
    ``experiment`` (whose ``model`` config must match the weights). A pipeline folder's
    scheduler config sets the parameterization and schedule (``scheduler_overrides``)."""
    run_config = compose_run_config(experiment, _merge_overrides(scheduler_overrides(src),
                                                                  overrides))
    state_dict, diff_config, weights_file = load_diffusers_weights(src)
    if diff_config is not None:
        check_diffusers_config(diff_config, run_config["model"])
    ours = unet_from_diffusers(state_dict, run_config["model"])
    return write_checkpoint(ours, out, run_config, source=f"diffusers UNet2DModel: {weights_file}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_lightning.tools.convert",
        description="Convert diffusers UNet2DModel weights (e.g. google/ddpm-cifar10-32) into a "
                    "ddpm-lightning checkpoint (model.* and ema_model.*, with its run config).",
    )
    parser.add_argument("src", help="diffusers model folder (config.json + "
                                    "diffusion_pytorch_model.safetensors/.bin) or weights file")
    parser.add_argument("out", help="checkpoint to write, e.g. ddpm_cifar10_ema.ckpt")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help="experiment config whose model and settings go with the weights "
                             f"(default: {DEFAULT_EXPERIMENT})")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="further Hydra overrides of the run config (key=value)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.src, args.out, args.experiment, args.overrides)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
