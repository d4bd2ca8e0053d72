"""Confidence intervals for comparisons (no Lightning): the mean of a metric over the seeds of
one setting with its Student-t interval, paired differences between two settings (over seeds,
or over images with the same t and ε), a verdict, and how many seeds, images or samples would
resolve a difference that the interval does not."""

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


def normal_interval(value: float, se: float, confidence: float = 0.95) -> dict:
    """``{"mean", "low", "high", "se"}``: value ± z_{(1+c)/2} · se (a jackknife's or a
    subset spread's standard error, where there are no replicates to take a t from)."""
    from scipy.stats import norm

    half = float(norm.ppf((1 + confidence) / 2)) * float(se)
    return {"mean": float(value), "low": value - half, "high": value + half, "se": float(se)}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """The mean of the differences a_i − b_i of paired values (the same image, or the same
    seed, in two settings) with its Student-t interval, and their standard deviation ``sd``.
    Pairing removes what a_i and b_i share: with positively correlated pairs the interval is
    far narrower than that of the difference of two unpaired means."""
    if len(a) != len(b):
        raise ValueError(f"paired values must come in equal numbers, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    out = t_interval(diffs, confidence)
    n = out["n"]
    out["sd"] = math.sqrt(sum((d - out["mean"]) ** 2 for d in diffs) / (n - 1)) if n > 1 else None
    return out


UNRESOLVED = "no difference resolved at this N and seed count"


def verdict(interval: dict) -> str:
    """"lower" or "higher" when the interval of a difference excludes 0, else ``UNRESOLVED``."""
    if interval.get("low") is None:
        return UNRESOLVED
    if interval["high"] < 0:
        return "lower"
    if interval["low"] > 0:
        return "higher"
    return UNRESOLVED


def replicates_to_resolve(sd: float, difference: float, confidence: float = 0.95,
                          power: float = 0.8, limit: int = 100_000) -> int | None:
    """The smallest number n of paired replicates (seeds, or images) with which the Student-t
    interval would exclude 0 with probability ``power``, if the mean difference and the spread
    stayed as measured: (t_{(1+c)/2, n−1} + t_{power, n−1}) · sd / √n ≤ |difference| (a
    one-sample t-test's power, to the usual normal approximation of its noncentral t). None
    when the difference is 0 or not finite, or more than ``limit`` would be needed."""
    from scipy.stats import t as student_t

    if not difference or not math.isfinite(difference) or not math.isfinite(sd):
        return None
    q = (1 + confidence) / 2
    n = 2
    while n <= limit:
        z = float(student_t.ppf(q, n - 1)) + float(student_t.ppf(power, n - 1))
        if z * sd / math.sqrt(n) <= abs(difference):
            return n
        n = n + 1 if n < 100 else int(n * 1.05) + 1
    return None


def samples_to_resolve(se: float, n: int, difference: float, confidence: float = 0.95,
                       power: float = 0.8, limit: int = 10_000_000) -> int | None:
    """For a standard error ``se`` measured at ``n`` samples and shrinking as 1/√n (a
    jackknife's): the n at which the normal interval would exclude 0 with probability
    ``power`` if the difference stayed as measured, (z_{(1+c)/2} + z_{power}) · se(n) ≤
    |difference|; None when the difference is 0 or not finite, or more than ``limit`` would
    be needed."""
    from scipy.stats import norm

    if not difference or not math.isfinite(difference) or not se or not math.isfinite(se):
        return None
    z = float(norm.ppf((1 + confidence) / 2)) + float(norm.ppf(power))
    need = math.ceil(n * (z * se / abs(difference)) ** 2)
    return need if need <= limit else None
