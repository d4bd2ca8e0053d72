"""The random-number state of a training process (torch, CUDA, NumPy, Python), saved in
checkpoints per rank so that a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import random

import numpy as np
import torch

from ddpm_lightning.core.generate import SEED_STRIDE


def collect_rng_states() -> dict:


    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def fold_rank_into_rng(rank: int) -> None:
    """Reseed torch (CPU and CUDA), NumPy and Python from one number drawn from the current
    torch state plus ``rank``: ranks that start from the same state get distinct streams, and
    the result is still fixed by the run's seed."""


    base = int(torch.randint(0, 2**62, (1,)).item())
    seed = (base + SEED_STRIDE * rank) % 2**63
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_rng_states(states: dict) -> None:


    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
