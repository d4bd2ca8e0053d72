"""The variational bound of Ho et al. (2020), eq. 5, written out again from the paper's formulas
in float64 with Python's ``math``, element by element, sharing no code with the package.

It is the reference that the package's bits/dim and its vlb training loss are tested against.
The one convention taken from the original code rather than the paper: at the paper's t = 1
(0-indexed 0) the fixed variances use β̃_2 in place of β̃_1 = 0 (σ² = β_1 is not used there).
"""

from __future__ import annotations

import math

LN2 = math.log(2.0)


def linear_betas(T: int, beta_1: float, beta_T: float) -> list[float]:
    return [beta_1 + (beta_T - beta_1) * i / (T - 1) for i in range(T)]


def _tables(betas):
    alpha_bar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        alpha_bar.append(prod)
    prev = [1.0] + alpha_bar[:-1]
    tilde = [b * (1 - p) / (1 - a) for b, a, p in zip(betas, alpha_bar, prev)]
    return alpha_bar, prev, tilde


def _upper_tail(z: float) -> float:
    """1 − Φ(z), accurate in the tail."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _gauss_kl(m1, v1, m2, v2) -> float:
    """KL(N(m1, v1) ‖ N(m2, v2)) in nats."""
    return 0.5 * (math.log(v2 / v1) + v1 / v2 + (m1 - m2) ** 2 / v2 - 1.0)


def _decoder_nll(x: float, mean: float, var: float) -> float:
    """−log of the mass that N(mean, var) puts on x's bin of width 2/255 (edges to ±∞)."""
    sd = math.sqrt(var)
    lo = -math.inf if x < -0.999 else (x - 1 / 255 - mean) / sd
    hi = math.inf if x > 0.999 else (x + 1 / 255 - mean) / sd
    if lo > 0:  # P(lo < Z < hi) from the upper tail, where it keeps precision
        return -math.log(_upper_tail(lo) - _upper_tail(hi))
    return -math.log(_upper_tail(-hi) - _upper_tail(-lo))


def bound_terms(betas, x0, eps, model, parameterization="eps", variance="fixed_large"):
    """Per-term bits/dim of the bound for one image.

    ``x0`` and ``eps`` are flat lists of pixels; ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) eps`` at every t.
    ``model(x_t, t)`` returns a flat list: the prediction, followed by v for a learned variance.
    Returns (prior, terms) with terms[t] = L_{t−1} at 0-indexed t (terms[0] = L_0).
    """
    T, D = len(betas), len(x0)
    alpha_bar, prev, tilde = _tables(betas)
    terms = []
    for t in range(T):
        a_t, b_t = 1.0 - betas[t], betas[t]
        x_t = [
            math.sqrt(alpha_bar[t]) * x + math.sqrt(1 - alpha_bar[t]) * e for x, e in zip(x0, eps)
        ]
        out = model(x_t, t)
        pred, v = out[:D], out[D:]
        if parameterization == "eps":  # eq. 11
            mu = [
                (x - b_t / math.sqrt(1 - alpha_bar[t]) * p) / math.sqrt(a_t)
                for x, p in zip(x_t, pred)
            ]
        else:
            if parameterization == "x0":  # µ̃_t(x_t, x̂_0), eq. 7
                mu = [
                    math.sqrt(prev[t]) * b_t / (1 - alpha_bar[t]) * p
                    + math.sqrt(a_t) * (1 - prev[t]) / (1 - alpha_bar[t]) * x
                    for x, p in zip(x_t, pred)
                ]
            else:  # "mu": the network gives the mean itself
                mu = list(pred)
        small = tilde[t] if t > 0 else tilde[1]
        if variance == "fixed_large":
            var = [b_t if t > 0 else tilde[1]] * D
        elif variance == "fixed_small":
            var = [small] * D
        elif variance == "learned":  # v is log σ²
            var = [math.exp(u) for u in v]
        else:  # learned_range: log σ² = v log β_t + (1 − v) log β̃_t
            var = [math.exp(u * math.log(b_t) + (1 - u) * math.log(small)) for u in v]
        if t == 0:
            nats = sum(_decoder_nll(x, m, s) for x, m, s in zip(x0, mu, var)) / D
        else:
            true_mu = [
                math.sqrt(prev[t]) * b_t / (1 - alpha_bar[t]) * x
                + math.sqrt(a_t) * (1 - prev[t]) / (1 - alpha_bar[t]) * y
                for x, y in zip(x0, x_t)
            ]
            nats = sum(_gauss_kl(m1, tilde[t], m2, s) for m1, m2, s in zip(true_mu, mu, var)) / D
        terms.append(nats / LN2)
    a_T = alpha_bar[-1]
    prior = sum(_gauss_kl(math.sqrt(a_T) * x, 1 - a_T, 0.0, 1.0) for x in x0) / D / LN2
    return prior, terms
