"""The speckle share of a set of samples (no Lightning): the README's sampler study found that
deterministic samplers on under-trained models leave a share of samples covered in
pixel-level noise, which FID at small N barely sees. A sample is *speckled* when its total
variation exceeds that of every one of a set of real images (1,000 held-out images)."""

from __future__ import annotations

import torch


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per image: the mean of |x[i, j+1] − x[i, j]| and of |x[i+1, j] − x[i, j]|, for images
    in [−1, 1] (uint8 images are mapped there first)."""
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return (dx + dy) / 2


def speckle_threshold(real: torch.Tensor) -> float:
    """The largest total variation among real images: the speckle threshold."""
    return float(total_variation(real).max())


def speckle_share(samples: torch.Tensor, threshold: float) -> float:
    """The share of ``samples`` whose total variation exceeds ``threshold``."""
    return float((total_variation(samples) > threshold).float().mean())
