"""Our ``UNet`` and diffusers' ``UNet2DModel``: parameter names, the architecture config
that matches ours, and reading and mapping the weights (``convert`` builds on it).

Name mapping (ours → diffusers):

* ``time_embed.0`` / ``time_embed.2`` → ``time_embedding.linear_1`` / ``linear_2``;
* ``conv_in``, ``conv_out`` → same names; ``norm_out`` → ``conv_norm_out``;
* ``down.i.blocks.j`` → ``down_blocks.i.resnets.j`` (``temb_proj`` → ``time_emb_proj``,
  ``shortcut`` → ``conv_shortcut``); ``down.i.attns.j`` → ``down_blocks.i.attentions.j``
  (``norm``/``q``/``k``/``v``/``proj_out`` → ``group_norm``/``to_q``/``to_k``/``to_v``/
  ``to_out.0``; the older names ``query``/``key``/``value``/``proj_attn`` are read too);
  ``down.i.resample.conv`` → ``down_blocks.i.downsamplers.0.conv``;
* ``mid.block1``/``mid.attn``/``mid.block2`` → ``mid_block.resnets.0``/``attentions.0``/
  ``resnets.1``;
* ``up.k`` → ``up_blocks.k`` likewise, ``up.k.resample.conv`` → ``up_blocks.k.upsamplers.0.conv``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ddpm_lightning.training.hparams import to_plain

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
UNET_TARGET = "ddpm_lightning.core.unet.UNet"


# --------------------------------------------------------------------------- key names

_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj",
           "norm2": "norm2", "conv2": "conv2", "shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers' attention parameter names before its Attention class (still in older checkpoints)
_ATTN_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_PATH = {"down": ("down_blocks", "downsamplers"), "up": ("up_blocks", "upsamplers")}

_LEVEL_RE = re.compile(r"(down|up)\.(\d+)\.(?:(blocks|attns)\.(\d+)\.(\w+)|resample\.conv)"
                       r"\.(weight|bias)")
_MID_RE = re.compile(r"mid\.(block1|block2|attn)\.(\w+)\.(weight|bias)")
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}


def diffusers_key(key: str) -> str:
    """The diffusers ``UNet2DModel`` name of our ``UNet`` parameter ``key``."""
    m = _LEVEL_RE.fullmatch(key)
    if m:
        path, i, kind, j, sub, param = m.groups()
        blocks, samplers = _PATH[path]
        if kind is None:
            return f"{blocks}.{i}.{samplers}.0.conv.{param}"
        table, group = (_RESNET, "resnets") if kind == "blocks" else (_ATTN, "attentions")
        if sub in table:
            return f"{blocks}.{i}.{group}.{j}.{table[sub]}.{param}"
    m = _MID_RE.fullmatch(key)
    if m:
        part, sub, param = m.groups()
        table = _ATTN if part == "attn" else _RESNET
        if sub in table:
            group = {"block1": "resnets.0", "block2": "resnets.1", "attn": "attentions.0"}[part]
            return f"mid_block.{group}.{table[sub]}.{param}"
    head, _, param = key.rpartition(".")
    if head in _TOP and param in ("weight", "bias"):
        return f"{_TOP[head]}.{param}"
    raise KeyError(f"no diffusers name for UNet parameter {key!r}")


_ATTN_PARAM_RE = re.compile(r"(.+\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.(weight|bias)")


def _candidates(dkey: str) -> list[str]:
    """``dkey`` and, for an attention parameter, its older diffusers name."""
    m = _ATTN_PARAM_RE.fullmatch(dkey)
    if m:
        head, name, param = m.groups()
        return [dkey, f"{head}{_ATTN_LEGACY[name]}.{param}"]
    return [dkey]


# ------------------------------------------------------------------- our architecture

def _model_kwargs(model_config: Mapping | None) -> dict:
    """Our ``UNet`` keyword arguments from a ``model`` config (``_target_`` allowed; None = the
    UNet defaults, which are the paper's CIFAR-10 network)."""
    kwargs = dict(to_plain(model_config or {}))
    target = kwargs.pop("_target_", UNET_TARGET)
    if target != UNET_TARGET:
        raise ValueError(f"model._target_={target!r}: only {UNET_TARGET} can take diffusers "
                         f"UNet2DModel weights")
    return kwargs


def _meta_unet(model_config: Mapping | None):
    """Our UNet built on the meta device (no memory, no init cost): for names and shapes."""
    from ddpm_lightning.core.unet import UNet

    with torch.device("meta"):
        return UNet(**_model_kwargs(model_config))


def expected_diffusers_config(model_config: Mapping | None = None) -> dict:
    """The diffusers ``UNet2DModel`` config whose weights map onto our UNet built from
    ``model_config``. For the CIFAR-10 model this is ``google/ddpm-cifar10-32``'s config."""
    net = _meta_unet(model_config)
    chs = [level.blocks[-1].conv2.out_channels for level in net.down]
    has_attn = [len(level.attns) > 0 for level in net.down]
    return {
        "sample_size": net.image_size,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        "block_out_channels": chs,
        "layers_per_block": len(net.down[0].blocks),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": True,
        # None = one head of all channels in every attention block
        "attention_head_dim": None,
        "norm_num_groups": 32,
        "attn_norm_num_groups": None,
        "norm_eps": 1e-6,
        "act_fn": "silu",
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "center_input_sample": False,
        "mid_block_scale_factor": 1,
        "resnet_time_scale_shift": "default",
        "class_embed_type": None,
        "num_class_embeds": None,
        "num_train_timesteps": None,
    }


# UNet2DModel's defaults (diffusers 0.30 … 0.42) for the keys that we check: a config.json
# leaves out the keys that keep their default.
_DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}


def _same(key: str, got, want, expected: Mapping) -> bool:
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(_same(key, g, w, expected) for g, w in zip(got, want))
    if key == "sample_size":
        if got is None:  # diffusers' U-Net itself does not depend on the size
            return True
        if isinstance(got, (list, tuple)):
            return all(g == want for g in got)
    if key == "act_fn":
        return got in ("silu", "swish")
    if key == "attention_head_dim":
        # one head of C channels: None, or C where every attention block has C channels
        chs = expected["block_out_channels"]
        att = {c for c, t in zip(chs, expected["down_block_types"]) if t.startswith("Attn")}
        att.add(chs[-1])  # the middle block's attention
        return got is None or (len(att) == 1 and got == att.pop())
    if key == "attn_norm_num_groups":
        return got in (None, expected["norm_num_groups"])
    if key == "time_embedding_dim":
        return got in (None, 4 * expected["block_out_channels"][0])
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and abs(got - want) <= 1e-12 * max(abs(want), 1.0)
    if isinstance(want, bool):
        return got is want
    return got == want


def check_diffusers_config(config: Mapping, model_config: Mapping | None = None) -> None:
    """Raise ``ValueError`` naming the first ``config.json`` key whose value (or diffusers'
    default, where the key is absent) does not give the architecture of our UNet built from
    ``model_config`` (None = the CIFAR-10 U-Net). Keys that do not affect inference (dropout,
    ``_diffusers_version``, …) are ignored; an architectural difference that no checked key
    shows is still caught by the strict weight check of ``unet_from_diffusers``."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config.json must hold a JSON object, not {type(config).__name__}")
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"config.json: _class_name={cls!r} is not supported; only diffusers "
                         f"UNet2DModel weights map onto {UNET_TARGET}")
    expected = expected_diffusers_config(model_config)
    for key, want in expected.items():
        absent = key not in config
        got = _DIFFUSERS_DEFAULTS[key] if absent else config[key]
        if not _same(key, got, want, expected):
            shown = f"{got!r} (absent: diffusers' default)" if absent else repr(got)
            raise ValueError(
                f"config.json: {key}={shown} does not match the supported architecture, which "
                f"needs {key}={want!r} (diffusers UNet2DModel → {UNET_TARGET} "
                f"{_describe(model_config)})"
            )


def _describe(model_config: Mapping | None) -> str:
    kw = _model_kwargs(model_config)
    keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "image_size")
    return "(" + ", ".join(f"{k}={kw[k]}" for k in keys if k in kw) + ")" if kw else "(CIFAR-10)"


# ------------------------------------------------------------------------ the weights

def _fit(value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``value`` with ``shape``: as is, or with trailing singleton dims dropped (a 1x1 conv
    stored for a linear layer); None if it cannot be."""
    if tuple(value.shape) == shape:
        return value
    src = list(value.shape)
    while len(src) > len(shape) and src[-1] == 1:
        src.pop()
    return value.reshape(shape) if tuple(src) == shape else None


def unet_from_diffusers(state_dict: Mapping[str, torch.Tensor],
                        model_config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Map a diffusers ``UNet2DModel`` state dict onto the parameter names and shapes of our
    ``UNet`` built from ``model_config`` (a ``model`` config or UNet keyword arguments; None =
    the paper's CIFAR-10 U-Net, i.e. ``google/ddpm-cifar10-32``).

    Every parameter of ours must be found with its exact shape (or as a 1x1 conv of a linear
    layer's shape), and no diffusers entry may be left over; otherwise ``ValueError`` names the
    first problem (and says how many there are). Floating tensors come back as contiguous
    float32 (they may share memory with the input); ``UNet.load_state_dict(out)`` then loads
    them strictly.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state dict (name → tensor), got {type(state_dict).__name__}")
    shapes = {k: tuple(v.shape) for k, v in _meta_unet(model_config).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    problems: list[str] = []
    for key, shape in shapes.items():
        names = _candidates(diffusers_key(key))
        found = [n for n in names if n in state_dict]
        if not found:
            problems.append(f"missing key {names[0]!r} (for our {key!r}, shape {list(shape)})")
            continue
        name = found[0]
        used.add(name)
        value = state_dict[name]
        if not isinstance(value, torch.Tensor):
            problems.append(f"key {name!r} holds a {type(value).__name__}, not a tensor")
            continue
        fitted = _fit(value, shape)
        if fitted is None:
            problems.append(f"key {name!r} has shape {list(value.shape)}, but our {key!r} "
                            f"needs {list(shape)}")
            continue
        fitted = fitted.detach()
        if fitted.is_floating_point():
            fitted = fitted.to(torch.float32)
        out[key] = fitted.contiguous()
    problems += [f"unexpected key {name!r} (no UNet parameter maps to it)"
                 for name in state_dict if name not in used]
    if problems:
        more = f" ({len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ValueError(f"diffusers state dict does not fit {UNET_TARGET} "
                         f"{_describe(model_config)}: {problems[0]}{more}")
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"reading {path} needs the safetensors package "
                              f"(pip install safetensors), or give the .bin weights") from err
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        raise ValueError(f"cannot read {path} as PyTorch weights (torch.load with "
                         f"weights_only=True): {err}") from err
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (name → tensor)")
    return dict(obj)


def load_diffusers_weights(src: str | os.PathLike) -> tuple[dict[str, torch.Tensor],
                                                            dict | None, Path]:
    """Read ``src`` (a diffusers model folder, a pipeline folder with ``unet/``, or a weights
    file): returns the state dict, the parsed ``config.json`` of the folder (None for a single
    file) and the weights file read. Prefers safetensors over ``.bin``."""
    import json

    src = Path(src).expanduser()
    if src.is_file():
        return _read_weights(src), None, src
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist: give a diffusers model folder or a "
                                f"weights file ({' or '.join(WEIGHT_FILES)})")
    folder = src
    if not any((src / f).is_file() for f in WEIGHT_FILES) and (src / "unet").is_dir():
        folder = src / "unet"  # a pipeline folder (model_index.json, unet/, scheduler/)
    files = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{src} holds none of {', '.join(WEIGHT_FILES)} (nor a unet/ "
                                f"folder with them)")
    weights = files[0]
    if weights.suffix == ".safetensors" and len(files) > 1:
        try:
            import safetensors  # noqa: F401
        except ImportError:
            weights = files[1]
    config = None
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{folder / 'config.json'} is not valid JSON: {err}") from err
    return _read_weights(weights), config, weights
