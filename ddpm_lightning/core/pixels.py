"""Pixels and model inputs: uint8 in [0, 255] and floats in [−1, 1] (the paper's scaling)."""

from __future__ import annotations

import torch
from torch import Tensor


def to_model_range(images: Tensor) -> Tensor:
    """``uint8`` pixels in ``[0, 255]`` -> ``float32`` in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """Floats in ``[-1, 1]`` -> ``uint8`` pixels, clamped and rounded; undoes ``to_model_range``."""
    return images.detach().clamp(-1.0, 1.0).add(1.0).mul_(127.5).round_().to(torch.uint8)
