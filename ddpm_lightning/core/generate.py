"""Batched sampling and bits/dim evaluation, sharded over ranks: plain loops, no Lightning.

Batch k of a request covers sample indices [k·B, (k+1)·B) and draws x_T and every z from a
generator seeded by (seed, k), so a sample depends on (seed, batch size, index) only, never on
how many devices shared the work. Rank r takes batches r, r + W, r + 2W, …
"""

from __future__ import annotations

import math

import torch

from ddpm_lightning.core.diffusion import GaussianDiffusion
from ddpm_lightning.core.pixels import to_model_range, to_uint8
from ddpm_lightning.core.samplers import SamplerSettings

SEED_STRIDE = 1_000_003  # seeds s·STRIDE + k: distinct for distinct (s, k) while k < STRIDE


def batch_plan(num: int, batch_size: int, rank: int = 0, world_size: int = 1):
    """The (batch index, first sample index, count) of this rank's batches."""
    if num < 1:
        raise ValueError(f"num_samples={num} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n_batches = math.ceil(num / batch_size)
    return [(k, k * batch_size, min(batch_size, num - k * batch_size))
            for k in range(rank, n_batches, world_size)]


@torch.no_grad()
def generate(net, diffusion: GaussianDiffusion, num: int, batch_size: int, image_shape,
             seed: int = 0, rank: int = 0, world_size: int = 1, device="cpu",
             settings: SamplerSettings | None = None, progress: bool = False):
    """This rank's share of ``num`` samples: (indices [n], uint8 images [n, C, H, W])."""
    settings = settings or SamplerSettings()
    plan = batch_plan(num, batch_size, rank, world_size)
    indices, images = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(c for _, _, c in plan), desc=f"sampling (rank {rank})", unit="img")
    for k, start, count in plan:
        gen = torch.Generator(device=device).manual_seed(seed * SEED_STRIDE + k)
        x = settings.sample(net, diffusion, (count, *image_shape), generator=gen, device=device)
        images.append(to_uint8(x.float()).cpu())
        indices.append(torch.arange(start, start + count))
        if bar is not None:
            bar.update(count)
    if bar is not None:
        bar.close()
    if not images:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, *image_shape, dtype=torch.uint8)
    return torch.cat(indices), torch.cat(images)


@torch.no_grad()
def bits_per_dim(net, diffusion: GaussianDiffusion, loader, rank: int = 0, world_size: int = 1,
                 device="cpu", max_images: int | None = None, progress: bool = False) -> dict:
    """Sums over this rank's share of ``loader`` (uint8 batches) of the bound's parts, in
    bits/dim per image: {"count", "total", "prior", "vb", "decoder"} as float64 tensors."""
    sums = {k: torch.zeros((), dtype=torch.float64) for k in ("total", "prior", "vb", "decoder")}
    count = 0
    seen = 0
    batches = list(loader) if progress else loader
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc=f"bits/dim (rank {rank})", unit="batch")
    for i, batch in enumerate(batches):
        if max_images is not None and seen >= max_images:
            break
        take = batch if max_images is None else batch[: max_images - seen]
        seen += take.shape[0]
        if i % world_size == rank:
            x0 = to_model_range(take.to(device))
            out = diffusion.bits_per_dim(net, x0)
            for key in sums:
                sums[key] += out[key].double().sum().cpu()
            count += take.shape[0]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    sums["count"] = torch.tensor(float(count), dtype=torch.float64)
    return sums
