"""Confidence intervals for comparisons across seeds (no Lightning): the mean of a metric over
the seeds of one setting, with its Student-t interval."""

from __future__ import annotations

import math
from collections.abc import Sequence


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """``{"mean", "low", "high", "n"}``: the mean of ``values`` (one per seed) and its
    two-sided Student-t interval, mean ± t_{(1+c)/2, n−1} · s / √n with s the sample standard
    deviation. With fewer than 2 values there is no interval (``low`` and ``high`` None)."""
    from scipy.stats import t as student_t

    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(xs) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(student_t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}
