"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of
diffusion models", §3), with no Lightning: power-function EMA profiles, and the least-squares
combination of saved snapshots that gives the EMA of any length after training.

A power-function EMA with exponent γ averages the weights seen up to step t with density
p(τ) = (γ + 1) τ^γ / t^(γ+1) on [0, t]; per step it is θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t
with β_t = (1 − 1/t)^(γ+1). Its relative width (the standard deviation of p over t) is
σ_rel = √(γ + 1) / ((γ + 2) √(γ + 3)); σ_rel = 0.05 and 0.10 are γ ≈ 16.97 and 6.94.

Snapshots of two profiles saved during training are densities p_i (their own t_i and γ_i).
The EMA of a profile (t_r, γ_r) that was never tracked is Σ x_i θ̂_i, with the x minimising
‖Σ x_i p_i − p_r‖² in L²: A x = b with A_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, p_r⟩, where
⟨p(·; t_a, γ_a), p(·; t_b, γ_b)⟩ = (γ_a + 1)(γ_b + 1) (min(t_a, t_b))^(γ_a+γ_b+1)
/ ((γ_a + γ_b + 1) t_a^(γ_a+1) t_b^(γ_b+1)). The residual ‖Σ x_i p_i − p_r‖ / ‖p_r‖ says how
well the snapshots represent the request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

SIGMA_REL_MAX = 1.0 / (2.0 * math.sqrt(3.0))  # σ_rel at γ = 0 (a uniform average)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ ≥ 0 of the power-function EMA of relative width ``sigma_rel`` (the largest
    real root of σ²γ³ + 7σ²γ² + (16σ² − 1)γ + 12σ² − 1 = 0)."""
    s2 = float(sigma_rel) ** 2
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={sigma_rel!r} must be in (0, {SIGMA_REL_MAX:.4f}); the "
                         "usual range is 0.02 to 0.25")
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    g = float(gamma)
    return math.sqrt(g + 1) / ((g + 2) * math.sqrt(g + 3))


def power_ema_beta(step: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ+1) at optimizer step t ≥ 1 (0 at t = 1: the first weights)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


class PowerEMA:
    """Power-function EMA profiles of a set of tensors (one per σ_rel), updated after each
    optimizer step with ``update(step, tensors)``."""

    def __init__(self, tensors: Sequence[torch.Tensor], sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.profiles = [[t.detach().clone() for t in tensors] for _ in self.gammas]

    @torch.no_grad()
    def update(self, step: int, tensors: Sequence[torch.Tensor]) -> None:
        for gamma, profile in zip(self.gammas, self.profiles):
            beta = power_ema_beta(step, gamma)
            for avg, new in zip(profile, tensors):
                avg.lerp_(new.detach().to(avg.dtype), 1.0 - beta)


def _dot(t_a, g_a, t_b, g_b) -> np.ndarray:
    """⟨p_a, p_b⟩ of power-function densities, broadcast over arrays, computed in logs."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    m = np.minimum(t_a, t_b)
    log = (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(m)
           - np.log(g_a + g_b + 1) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def solve_weights(steps: Sequence[float], gammas: Sequence[float], target_step: float,
                  target_gamma: float) -> tuple[np.ndarray, float]:
    """(x, residual): the least-squares weights of the snapshots (``steps[i]``, ``gammas[i]``)
    for the profile (``target_step``, ``target_gamma``), and the relative L² residual
    ‖Σ x_i p_i − p_r‖ / ‖p_r‖ of that fit."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    if t.ndim != 1 or t.shape != g.shape or not len(t) or (t <= 0).any():
        raise ValueError("snapshots need matching positive steps and gammas")
    a = _dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = _dot(t, g, target_step, target_gamma)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    self_dot = float(_dot(target_step, target_gamma, target_step, target_gamma))
    err2 = max(float(x @ a @ x - 2 * x @ b + self_dot), 0.0)
    return x, math.sqrt(err2 / self_dot)
