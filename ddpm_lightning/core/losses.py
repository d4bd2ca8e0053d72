"""Closed-form pieces of the variational bound (Ho et al. 2020, §3.3 and eq. 5).

All functions work elementwise, broadcast their arguments, and return nats.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) ‖ N(mean2, exp(logvar2))), elementwise, in nats."""
    mean1, logvar1, mean2, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        for v in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) of the decoder L_0: a Gaussian N(means, exp(log_scales)²) integrated over
    the 256 bins of width 2/255 that split [−1, 1]; the edge bins extend to ±∞.

    ``x`` holds data scaled to [−1, 1] (bin centres). Returns the log-likelihood in nats.
    """
    if not (x.shape == means.shape):
        raise ValueError(f"x {tuple(x.shape)} and means {tuple(means.shape)} differ in shape")
    half_bin = 1.0 / 255.0
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + half_bin)
    lower = inv_std * (centered - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(upper): leftmost bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log (1 − Φ(lower)): rightmost bin
    # Φ(upper) − Φ(lower), computed on whichever tail keeps precision.
    delta = torch.where(
        lower > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_delta = torch.log(delta.clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_delta)
    )


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))
