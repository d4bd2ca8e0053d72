"""FLOPs of the network, counted by torch's FlopCounterMode (no Lightning)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm_lightning.core.inference import eval_mode


@torch.no_grad()
def forward_flops_per_image(net: torch.nn.Module, image_shape, device) -> int:
    """FLOPs of one forward pass of ``net`` on one image of ``image_shape`` (C, H, W), in eval
    mode (dropout off, so no random numbers are drawn); a multiply-add counts as 2."""
    x = torch.zeros((1, *image_shape), device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with eval_mode(net), FlopCounterMode(display=False) as counter:
        net(x, t)
    return int(counter.get_total_flops())


def train_flops_per_image(net: torch.nn.Module, image_shape, device) -> int:
    """FLOPs of one training step per image: forward plus backward, taken as 3 × the forward
    (the backward costs two forwards: gradients of the inputs and of the weights)."""
    return 3 * forward_flops_per_image(net, image_shape, device)


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting (for the device's peak FLOP/s)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32
