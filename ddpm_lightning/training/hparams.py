"""The module's hyperparameters: each number checked once, with a one-line error that names
its key; and the plain containers a checkpoint stores them in."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def check_number(key: str, value, valid: str, ok) -> None:
    """Raise a one-line ValueError unless ``value`` is a finite real number passing ``ok``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{key}={value!r} is invalid; it must be {valid}")


def to_plain(value):
    """Mappings and sequences (config containers included) → dicts and lists, recursively."""
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [to_plain(v) for v in value]
    return value
