"""Variance schedules β_1 … β_T, computed in float64.

Every schedule is chosen by name (``make_beta_schedule("linear", T=1000)``) and
validated before it is returned: T ≥ 1, every β_t finite and inside (0, 1).

Names:
    linear     Ho et al. 2020: β linear from 1e-4 to 0.02 (the paper's).
    cosine     Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2),
               s = 0.008, β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped to at most 0.999.
    quadratic  √β linear between √beta_start and √beta_end (the original code's "quad").
    sigmoid    β = beta_start + (beta_end − beta_start)·sigmoid(linspace(−6, 6, T)).
    constant   β_t = beta_end for every t.

``rescale_zero_terminal_snr=True`` rescales any of them to a zero terminal SNR (Lin et al. 2024,
"Common diffusion noise schedules and sample steps are flawed", Algorithm 1): √ᾱ_t is shifted
so that √ᾱ_T = 0 and scaled so that √ᾱ_1 is unchanged, and β_t = 1 − ᾱ_t/ᾱ_{t−1} recomputed,
which makes β_T = 1: x_T is then pure noise, as sampling assumes. ε-prediction is undefined at
t = T there (x̂_0 = (x_T − ε̂)/0), so such a schedule needs v- (or x_0-) prediction.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid", "constant")


def _linear(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def _quadratic(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def _sigmoid(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64)))
    return beta_start + (beta_end - beta_start) * s


def _constant(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.full(T, beta_end, dtype=np.float64)


def _cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    alphas_cumprod = f / f[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.minimum(betas, max_beta)


def zero_terminal_snr(betas) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1: the betas whose √ᾱ_t is an affine map of the given one
    with √ᾱ_1 kept and √ᾱ_T = 0 (so β_T = 1), in float64."""
    b = np.asarray(betas, dtype=np.float64)
    root = np.sqrt(np.cumprod(1.0 - b))
    first, last = root[0], root[-1]
    if len(b) < 2 or not first > last:
        raise ValueError("schedule.rescale_zero_terminal_snr=true needs T >= 2 and a decreasing "
                         "ᾱ_t")
    root = (root - last) * first / (first - last)
    abar = root**2
    alphas = np.append(abar[0], abar[1:] / abar[:-1])
    return 1.0 - alphas


def validate_betas(betas, key: str = "schedule.betas") -> np.ndarray:
    """Return ``betas`` as a 1-D float64 array, or raise ValueError naming the bad value.
    Every β_t must lie in (0, 1), except that the last may be exactly 1 (a zero terminal
    SNR, see ``zero_terminal_snr``)."""
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.size < 1:
        raise ValueError(f"{key} must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
    bad = np.flatnonzero(~np.isfinite(b))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{key}[{i}]={b[i]} is not finite; every β_t must be a finite number")
    not_last = (np.arange(b.size) < b.size - 1) | (b.size == 1)  # β_T = 1 needs T >= 2
    bad = np.flatnonzero((b <= 0.0) | (b > 1.0) | ((b == 1.0) & not_last))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{key}[{i}]={b[i]:.6g} is outside (0, 1); every β_t must satisfy "
                         "0 < β_t < 1 (the last may be 1: a zero terminal SNR)")
    return b


def make_beta_schedule(
    name: str = "linear",
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
    rescale_zero_terminal_snr: bool = False,
) -> np.ndarray:
    """β_1 … β_T of the named schedule as a float64 array of length T.

    ``beta_start``/``beta_end`` apply to linear, quadratic, sigmoid and constant;
    ``cosine_s``/``max_beta`` to cosine. ``rescale_zero_terminal_snr`` rescales the result to
    ᾱ_T = 0 (module docstring). Raises ValueError naming the key and value
    for an unknown name, T < 1, or any β outside (0, 1) or non-finite.
    """
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"schedule.T={T!r} is invalid; T must be an integer >= 1")
    for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise ValueError(f"schedule.{key}={value!r} is outside (0, 1)")
    if name == "linear":
        betas = _linear(T, beta_start, beta_end)
    elif name == "quadratic":
        betas = _quadratic(T, beta_start, beta_end)
    elif name == "sigmoid":
        betas = _sigmoid(T, beta_start, beta_end)
    elif name == "constant":
        betas = _constant(T, beta_start, beta_end)
    elif name == "cosine":
        if not (math.isfinite(cosine_s) and cosine_s >= 0.0):
            raise ValueError(f"schedule.cosine_s={cosine_s!r} must be a finite number >= 0")
        if not (0.0 < max_beta < 1.0):
            raise ValueError(f"schedule.max_beta={max_beta!r} is outside (0, 1)")
        betas = _cosine(T, cosine_s, max_beta)
    else:
        raise ValueError(f"schedule.name={name!r} is unknown; valid names: {', '.join(SCHEDULES)}")
    if not isinstance(rescale_zero_terminal_snr, bool):
        raise ValueError(f"schedule.rescale_zero_terminal_snr={rescale_zero_terminal_snr!r} "
                         "must be true or false")
    if rescale_zero_terminal_snr:
        betas = zero_terminal_snr(validate_betas(betas))
    return validate_betas(betas, key=f"schedule {name!r} β")
