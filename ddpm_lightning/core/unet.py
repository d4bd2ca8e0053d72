"""The noise-prediction network ε_θ(x_t, t) of DDPM (Ho et al. 2020, Appendix B).

A U-Net backbone after PixelCNN++: wide ResNet blocks with GroupNorm (32 groups) and
swish, single-head self-attention at the 16×16 resolution, and a sinusoidal
(Transformer) embedding of the timestep t that is added inside every residual block.
The layout follows the authors' TensorFlow code one-to-one (also ported as
diffusers' ``google/ddpm-cifar10-32``), so published weights can be mapped onto it:

* ``time_embed.{0,2}``; ``conv_in``;
* ``down[i].blocks[j]`` / ``down[i].attns[j]`` / ``down[i].resample`` (a Downsample), level i
  at resolution ``image_size / 2**i``;
* ``mid.block1`` / ``mid.attn`` / ``mid.block2``;
* ``up[k]`` in execution order (k = 0 is the lowest resolution), each with
  ``num_res_blocks + 1`` blocks, optional attentions and ``resample`` (an Upsample);
* ``norm_out``, ``conv_out``.

The weights are stored ``channels_last`` and activations stay ``channels_last`` throughout
(attention reshapes are free views); the output has the memory format of the input.

On the CPU a few layers take faster routes to the same function (up to float rounding; the
parameters and their names do not change): the attention projections run as one fused 1x1
convolution, attention over short sequences as two batched GEMMs, each Upsample as one
transposed convolution, and bf16 GroupNorm inputs are normalised in float32. See
``AttnBlock``, ``_attention``, ``Upsample`` and ``_norm_act``; ``python -m
ddpm_lightning.tools.bench`` measures the result against diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` [B] → [B, dim]: ``[sin(t·ω_i), cos(t·ω_i)]``
    with ω_i = exp(-log(10000) · i / (dim/2 - 1)), i = 0 … dim/2 - 1 (as in the paper's code)."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1))
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def _norm_act(norm: nn.GroupNorm, x: torch.Tensor, act: bool = True) -> torch.Tensor:
    """GroupNorm, then swish unless ``act`` is False. Under CPU bf16 autocast (bf16 activations,
    float32 GroupNorm parameters) a channels-last input is normalised in float32: the CPU's
    channels-last GroupNorm backward is 2-6x slower for bf16 than for fp32 inputs (the
    statistics are float32 either way)."""
    if (x.dtype == torch.bfloat16 and norm.weight.dtype == torch.float32
            and x.device.type == "cpu" and _is_channels_last(x)):
        x = x.float()
    y = norm(x)
    return F.silu(y) if act else y


class ResBlock(nn.Module):
    """Wide ResNet block: GN→swish→conv3x3, + Linear(swish(temb)), GN→swish→dropout→conv3x3,
    plus a 1x1-conv shortcut when the channel count changes. The last conv is zero-initialised."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``temb`` is the already swish-activated time embedding [B, temb_ch]."""
        h = self.conv1(_norm_act(self.norm1, x))
        h += self.temb_proj(temb)[:, :, None, None]  # in place: conv outputs aren't saved
        h = self.conv2(self.dropout(_norm_act(self.norm2, h)))
        return h.add_(x if self.shortcut is None else self.shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions with a residual connection:
    x + proj(softmax(q kᵀ / √C) v), q, k, v = Linear(GN(x)). The output projection is zero-init.

    The four projections are ``nn.Linear`` layers (their names and shapes are the checkpoint
    format) but run as 1x1 convolutions on the feature map, with q, k and v fused into one:
    on channels-last maps that is the same matrix product, and on the CPU it goes to oneDNN,
    about 2x faster (forward and backward) than the fp32 GEMM behind ``F.linear`` here.
    """

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Linear(ch, ch)
        self.k = nn.Linear(ch, ch)
        self.v = nn.Linear(ch, ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        scale = c**-0.5  # folded into the q projection
        weight = torch.cat([self.q.weight * scale, self.k.weight, self.v.weight])
        bias = torch.cat([self.q.bias * scale, self.k.bias, self.v.bias])
        qkv = F.conv2d(_norm_act(self.norm, x, act=False), weight[:, :, None, None], bias)
        # [B, 3C, H, W] -> [B, HW, 3C]: a free view when channels_last.
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b, h * w, 3 * c).chunk(3, dim=2)
        out = _attention(q, k, v)
        # [B, HW, C] as a channels-last [B, C, H, W] map (a view: no copy).
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return F.conv2d(out, self.proj_out.weight[:, :, None, None], self.proj_out.bias).add_(x)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ) v for [B, L, C] (q already scaled). On the CPU, for the short sequences
    of this U-Net, two batched GEMMs beat the fused SDPA kernel (forward and backward: 1.1x
    in fp32, 2.4x in bf16 here); the softmax is taken in float32 at least, as SDPA does.
    Long sequences (whose [B, L, L] weights would be large) and other devices use SDPA."""
    if q.device.type == "cpu" and q.shape[1] <= _MAX_EXPLICIT_ATTENTION:
        scores = torch.bmm(q, k.transpose(1, 2))
        weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        return torch.bmm(weights.to(v.dtype), v)
    out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=1.0)
    return out[:, 0]


_MAX_EXPLICIT_ATTENTION = 1024  # tokens; the [B, L, L] weights stay under 4 MB per image


class Downsample(nn.Module):
    """3x3 conv with stride 2 and TF "SAME" padding (pad right/bottom by one): H → H/2."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3x3 conv: H → 2H.

    On the CPU, for maps of at least 8x8, the pair runs as one transposed convolution
    (stride 2, 4x4 kernel, padding 1): output row 2i + a of the upsampled conv reads input rows
    i - 1 … i + 1 only, with the 3x3 taps that land on the same input row summed, so along each
    axis the kernel is ``_UP_TAPS @ w``. The same function up to float rounding, at 4/9 of the
    multiply-adds and without the 4x larger upsampled map (forward and backward 1.5x faster on
    8x8 inputs, 1.7x on 16x16 here; on smaller maps and on GPUs the plain pair is kept).
    """

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[-2] * x.shape[-1] >= 64:
            w = self.conv.weight
            with torch.autocast("cpu", enabled=False):  # the kernel in the weights' dtype
                taps = torch.tensor(_UP_TAPS, dtype=w.dtype)
                kernel = torch.einsum("kd,oidl,ml->iokm", taps, w, taps)  # [in, out, 4, 4]
            return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# Transposed-conv taps k = 0..3 (output row 2i - 1 + k from input row i) as sums of the 3x3
# taps d = 0..2: k=0 ← d2, k=1 ← d1 + d2, k=2 ← d0 + d1, k=3 ← d0.
_UP_TAPS = [[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


class Level(nn.Module):
    """One resolution of the U-Net: res blocks, their optional attentions, and a resampler."""

    def __init__(self, blocks: list[ResBlock], attns: list[AttnBlock], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)  # empty, or one per block
        self.resample = resample  # Downsample / Upsample, or None at the end of the path

    def run_block(self, i: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.blocks[i](h, temb)
        return self.attns[i](h) if len(self.attns) else h


class Mid(nn.Module):
    """Middle of the U-Net at the lowest resolution: res block, attention, res block."""

    def __init__(self, ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.block1 = ResBlock(ch, ch, temb_ch, dropout)
        self.attn = AttnBlock(ch)
        self.block2 = ResBlock(ch, ch, temb_ch, dropout)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(h, temb)), temb)


def _check_config(ch, ch_mult, num_res_blocks, attn_resolutions, dropout, image_size,
                  in_channels, out_channels) -> list[int]:
    """Raise ``ValueError`` naming the ``model.*`` key for an unusable configuration;
    return the resolutions image_size, image_size/2, ... of the levels."""
    for key, val in (("ch", ch), ("num_res_blocks", num_res_blocks), ("image_size", image_size),
                     ("in_channels", in_channels), ("out_channels", out_channels)):
        if val <= 0:
            raise ValueError(f"model.{key}={val} must be a positive integer")
    if not ch_mult or any(m <= 0 for m in ch_mult):
        raise ValueError(f"model.ch_mult={ch_mult} must be a non-empty list of positive integers")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
    factor = 2 ** (len(ch_mult) - 1)
    if image_size % factor:
        raise ValueError(f"model.image_size={image_size} must be divisible by 2**(levels-1)="
                         f"{factor} for ch_mult={ch_mult}")
    if ch % 32:  # then every level's ch * ch_mult[i] is a multiple of 32 as well
        raise ValueError(f"model.ch={ch} must be a multiple of 32: GroupNorm uses 32 groups on "
                         f"ch and on every ch * ch_mult[i] channels")
    resolutions = [image_size // 2**i for i in range(len(ch_mult))]
    for r in attn_resolutions:
        if r not in resolutions:
            raise ValueError(f"model.attn_resolutions={attn_resolutions} contains {r}, not a "
                             f"feature-map resolution for image_size={image_size} and "
                             f"ch_mult={ch_mult}; valid: {resolutions}")
    return resolutions


class UNet(nn.Module):
    """DDPM's ε_θ(x_t, t): maps a noisy image [B, C, H, W] and timesteps t [B] to [B, C', H, W].

    Args:
        in_channels: image channels C.
        out_channels: output channels C' (default C; 2·C for a learned variance).
        ch: base width; level i has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers, one per resolution (len(ch_mult) - 1 downsamplings).
        num_res_blocks: res blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (feature-map sides) that get self-attention.
        dropout: dropout rate inside every res block.
        image_size: side of the (square) input; must be divisible by 2**(len(ch_mult) - 1).
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 image_size: int = 32):
        super().__init__()
        ch_mult = [int(m) for m in ch_mult]  # also accepts Hydra ListConfig
        if isinstance(attn_resolutions, int):
            attn_resolutions = [attn_resolutions]
        attn_resolutions = [int(r) for r in attn_resolutions]
        out_channels = in_channels if out_channels is None else out_channels
        resolutions = _check_config(ch, ch_mult, num_res_blocks, attn_resolutions, float(dropout),
                                    image_size, in_channels, out_channels)
        self.ch, self.image_size = ch, image_size
        self.in_channels, self.out_channels = in_channels, out_channels
        temb_ch = 4 * ch

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, temb_ch, float(dropout))

        self.time_embed = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(),
                                        nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        skip_chs, cur = [ch], ch  # channels of every stored skip activation
        self.down = nn.ModuleList()
        for i, (mult, r) in enumerate(zip(ch_mult, resolutions)):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(res(cur, ch * mult))
                cur = ch * mult
                if r in attn_resolutions:
                    attns.append(AttnBlock(cur))
                skip_chs.append(cur)
            last = i == len(ch_mult) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(cur)))
            if not last:
                skip_chs.append(cur)

        self.mid = Mid(cur, temb_ch, float(dropout))

        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(res(cur + skip_chs.pop(), ch * ch_mult[i]))
                cur = ch * ch_mult[i]
                if resolutions[i] in attn_resolutions:
                    attns.append(AttnBlock(cur))
            self.up.append(Level(blocks, attns, Upsample(cur) if i > 0 else None))

        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        self._init_weights()
        self.to(memory_format=torch.channels_last)  # faster convs on CPU (oneDNN) and GPU

    def _init_weights(self) -> None:
        """As the paper's code: Xavier-uniform (fan_avg) weights and zero biases everywhere,
        and exactly zero for each res block's last conv, attention output and ``conv_out``."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        zero = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, AttnBlock)]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise ε̂ = ε_θ(x_t, t) with the shape of ``x_t`` (C' channels)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = timestep_embedding(t, self.ch).to(self.conv_in.weight.dtype)
        temb = F.silu(self.time_embed(emb))  # every res block applies swish before its Linear

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i in range(len(level.blocks)):
                h = level.run_block(i, h, temb)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid(h, temb)

        for level in self.up:
            for i in range(len(level.blocks)):
                h = level.run_block(i, torch.cat([h, skips.pop()], dim=1), temb)
            if level.resample is not None:
                h = level.resample(h)

        out = self.conv_out(_norm_act(self.norm_out, h))
        # Hand back the caller's memory format (a no-op for channels_last inputs).
        fmt = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        return out.contiguous(memory_format=fmt)
