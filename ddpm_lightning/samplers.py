"""Samplers as plain loops that take the network: DDPM (Algorithm 2) and DDIM.

Sampling with S < T steps runs on a *respaced* chain: for kept timesteps s_1 < … < s_S the
chain's betas are recomputed as β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}} (ᾱ_{s_0} = 1), so that its
marginals q(x_{s_i} | x_0) match the original process. Skipping timesteps without this
recomputation is the "DDPM with fewer steps gives pure noise" bug of other projects.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .diffusion import GaussianDiffusion, Model

SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("uniform", "quadratic")


def timestep_subsequence(T: int, steps: int, spacing: Literal["uniform", "quadratic"] = "uniform"):
    """``steps`` distinct increasing timesteps in [0, T − 1] (0-indexed), always ending at T − 1
    for uniform spacing. ``quadratic`` follows DDIM's CIFAR-10 choice (dense near t = 0)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"sampler.steps={steps!r} is invalid; it must be an integer in [1, T={T}]")
    if spacing == "uniform":
        seq = np.round(np.linspace(T - 1, 0, steps)[::-1]).astype(np.int64)
    elif spacing == "quadratic":
        seq = np.round(np.linspace(np.sqrt(0.8 * (T - 1)), 0, steps)[::-1] ** 2).astype(np.int64)
    else:
        raise ValueError(f"sampler.spacing={spacing!r} is unknown; valid values: {', '.join(SPACINGS)}")
    for i in range(1, len(seq)):  # make strictly increasing without leaving [0, T − 1]
        seq[i] = max(seq[i], seq[i - 1] + 1)
    for i in range(len(seq) - 2, -1, -1):
        seq[i] = min(seq[i], seq[i + 1] - 1)
    return seq


class _TimestepMap:
    """Wraps the network so that the respaced chain's index i calls it at the original s_i."""

    def __init__(self, model: Model, timesteps: np.ndarray):
        self.model = model
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.long)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x_t, t):
        table = self._cache.get(t.device)
        if table is None:
            table = self._cache[t.device] = self.timesteps.to(t.device)
        return self.model(x_t, table[t])


def respace(diffusion: GaussianDiffusion, timesteps) -> GaussianDiffusion:
    """A GaussianDiffusion over the kept ``timesteps`` with its betas recomputed."""
    timesteps = np.asarray(timesteps, dtype=np.int64)
    abar = diffusion.alphas_cumprod.numpy()[timesteps]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1.0 - abar / abar_prev
    out = GaussianDiffusion(
        betas,
        parameterization=diffusion.parameterization,
        variance=diffusion.variance,
        objective="vlb" if diffusion.learned_variance else "simple",
    )
    out.objective = diffusion.objective
    return out


def _prepare(model, diffusion, steps, spacing):
    T = diffusion.num_timesteps
    if steps is None or steps == T:
        return model, diffusion
    seq = timestep_subsequence(T, steps, spacing)
    return _TimestepMap(model, seq), respace(diffusion, seq)


@torch.no_grad()
def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape,
    sampler: Literal["ddpm", "ddim"] = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: Literal["uniform", "quadratic"] = "uniform",
    variance: str | None = None,
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device=None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw samples x_0 in [−1, 1] of ``shape`` = (N, C, H, W).

    ddpm: ancestral sampling, x_{t−1} = µ_θ(x_t, t) + σ_t z (Algorithm 2), with σ_t² from
          ``variance`` ("large" = β_t, "small" = β̃_t; default: the diffusion's own).
    ddim: x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z with
          σ = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}) (Song et al. 2021, eq. 12).
    ``steps`` < T respaces the chain (``spacing`` uniform or quadratic). ``noise`` fixes x_T.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler.name={sampler!r} is unknown; valid values: {', '.join(SAMPLERS)}")
    if not (eta >= 0.0 and np.isfinite(eta)):
        raise ValueError(f"sampler.eta={eta!r} is invalid; it must be a finite number >= 0")
    if device is None:
        device = noise.device if noise is not None else next(_params(model), torch.zeros(0)).device
    net, chain = _prepare(model, diffusion, steps, spacing)
    x = noise.to(device) if noise is not None else torch.randn(
        *shape, device=device, generator=generator
    )
    n = x.shape[0]
    indices = range(chain.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"{sampler} sampling", leave=False)
    abar = chain._on(x.device)["alphas_cumprod"]
    for i in indices:
        t = torch.full((n,), i, device=x.device, dtype=torch.long)
        out = chain.p_mean_variance(net, x, t, variance=variance, clip_denoised=clip_denoised)
        z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype) if i > 0 else None
        if sampler == "ddpm":
            x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z if i > 0 else out["mean"]
        else:
            a_t = abar[i]
            a_prev = abar[i - 1] if i > 0 else abar.new_tensor(1.0)
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = (
                torch.sqrt(a_prev) * out["pred_x0"]
                + torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * out["pred_eps"]
            ).to(x.dtype)
            if i > 0 and eta > 0:
                x = x + sigma.to(x.dtype) * z
    return x


def sampler_kwargs(settings) -> dict:
    """Config form ``{name, steps, eta, spacing, variance}`` → keyword arguments of ``sample``."""
    settings = dict(settings or {})
    unknown = set(settings) - {"name", "steps", "eta", "spacing", "variance", "clip_denoised"}
    if unknown:
        raise ValueError(f"sampler.{sorted(unknown)[0]} is not a sampler setting; valid: "
                         "name, steps, eta, spacing, variance, clip_denoised")
    if "name" in settings:
        settings["sampler"] = settings.pop("name")
    return settings


def check_settings(settings, T: int, key: str = "sampler") -> dict:
    """Validate config-form sampler settings against a chain of T steps, before any work."""
    kwargs = sampler_kwargs(settings)
    name = kwargs.get("sampler", "ddpm")
    if name not in SAMPLERS:
        raise ValueError(f"{key}.name={name!r} is unknown; valid values: {', '.join(SAMPLERS)}")
    steps = kwargs.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or not 1 <= steps <= T):
        raise ValueError(f"{key}.steps={steps!r} is invalid; it must be an integer in [1, T={T}]")
    eta = kwargs.get("eta", 0.0)
    if not (isinstance(eta, (int, float)) and np.isfinite(eta) and eta >= 0):
        raise ValueError(f"{key}.eta={eta!r} is invalid; it must be a finite number >= 0")
    spacing = kwargs.get("spacing", "uniform")
    if spacing not in SPACINGS:
        raise ValueError(f"{key}.spacing={spacing!r} is unknown; valid values: {', '.join(SPACINGS)}")
    variance = kwargs.get("variance")
    if variance not in (None, "small", "large", "fixed_small", "fixed_large"):
        raise ValueError(f"{key}.variance={variance!r} is unknown; valid values: null, large, small")
    return kwargs


def _params(model):
    return model.parameters() if hasattr(model, "parameters") else iter(())
