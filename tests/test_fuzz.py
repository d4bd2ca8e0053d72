"""Fuzz: random invalid values for every numeric config key never give a silent success.

Each numeric key of the default config has a validity rule below (a new numeric key without
a rule fails the test). Random values are drawn; every value the rule calls invalid must make
``app.training.build`` (plus the data's setup) raise before any training."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, open_dict

from helpers import compose

ROOT = Path(__file__).resolve().parents[1]


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_ge(lo):
    return lambda v: _is_int(v) and v >= lo


ANY_INT = _is_int
RULES = {
    "seed": ANY_INT,
    "schedule.T": int_ge(1),
    "schedule.beta_start": lambda v: _finite(v) and 0 < v < 1,
    "schedule.beta_end": lambda v: _finite(v) and 0 < v < 1,
    "model.in_channels": lambda v: v == 1,  # the embedded data has one channel
    "model.ch": lambda v: _is_int(v) and v >= 32 and v % 32 == 0,
    "model.num_res_blocks": int_ge(1),
    "model.dropout": lambda v: _finite(v) and 0 <= v < 1,
    "model.image_size": lambda v: v == 16,  # must equal data.image_size
    "module.hybrid_lambda": lambda v: _finite(v) and v >= 0,
    "module.min_snr_gamma": lambda v: _finite(v) and v > 0,
    "module.posthoc.every_n_steps": int_ge(1),
    "module.lr": lambda v: _finite(v) and v > 0,
    "module.adam_eps": lambda v: _finite(v) and v > 0,
    "module.weight_decay": lambda v: _finite(v) and v >= 0,
    "module.warmup_steps": int_ge(0),
    "module.ema_decay": lambda v: _finite(v) and 0 <= v < 1,
    "module.timesteps.history": int_ge(1),
    "module.timesteps.uniform_prob": lambda v: _finite(v) and 0 < v <= 1,
    "module.sampler.eta": lambda v: v == 0,  # the CPU recipe samples with dpm_solver: no η
    "module.sampler.order": lambda v: _is_int(v) and v in (1, 2),
    "module.check_every_n_steps": int_ge(1),
    "module.sampler.steps": lambda v: _is_int(v) and 1 <= v <= 20,  # T = 20 below
    "callbacks.sample_grid.sampler.steps": lambda v: _is_int(v) and 1 <= v <= 20,
    "data.image_size": lambda v: v == 16,  # must equal model.image_size
    "data.channels": lambda v: v == 1,
    "data.batch_size": lambda v: _is_int(v) and 1 <= v <= 4500,  # 4,500 training images
    "data.num_workers": int_ge(0),
    "data.seed": ANY_INT,
    "data.shuffle_seed": ANY_INT,
    "data.val_fraction": lambda v: _finite(v) and 0 <= v < 1,
    "trainer.devices": lambda v: _is_int(v) and 1 <= v <= (os.cpu_count() or 1),
    "trainer.max_steps": lambda v: _is_int(v) and (v >= 1 or v == -1),
    "trainer.gradient_clip_val": lambda v: _finite(v) and v >= 0,
    "trainer.log_every_n_steps": int_ge(1),
    "trainer.limit_train_batches": lambda v: (_is_int(v) and v >= 1) or (_finite(v) and 0 < v <= 1),
    "trainer.limit_val_batches": lambda v: (_is_int(v) and v >= 0) or (_finite(v) and 0 <= v <= 1),
    "trainer.val_check_interval": lambda v: (_is_int(v) and v >= 1) or (_finite(v) and 0 < v <= 1),
    "trainer.num_sanity_val_steps": lambda v: _is_int(v) and v >= -1,
    "callbacks.checkpoint.every_n_train_steps": int_ge(0),
    "callbacks.checkpoint.save_top_k": int_ge(-1),
    "callbacks.sample_grid.every_n_steps": int_ge(1),
    "callbacks.sample_grid.num_images": int_ge(1),
    "callbacks.sample_grid.seed": ANY_INT,
    "callbacks.preemption.check_every_n_steps": int_ge(1),
}
BASE = ["logger=none", "model.image_size=16", "data.image_size=16", "data.batch_size=8",
        "schedule.T=20", "module.sampler.steps=5", "++callbacks.sample_grid.sampler.steps=5"]


def _numeric_keys(node, prefix=""):
    for key in node:
        path = f"{prefix}{key}"
        if path == "hydra":
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            yield from _numeric_keys(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not isinstance(value, ListConfig):
            yield path


def _compose(overrides):
    return compose("train", *overrides, hydra=True)


def test_every_numeric_key_has_a_rule():
    keys = set(_numeric_keys(_compose(BASE)))
    missing = sorted(k for k in keys if k not in RULES)
    assert not missing, f"numeric config keys without a fuzz rule: {missing}"


def _draw(rng: random.Random):
    pool = [0, -1, -7, 1, 2, 3, 17, 31, 64, 2.5, 0.5, 1.0, -0.25, 1.5, 1e-12, 1e12, 10**9,
            float("nan"), float("inf"), float("-inf")]
    if rng.random() < 0.5:
        return rng.choice(pool)
    return rng.choice([rng.randint(-10**6, 10**6), rng.uniform(-3, 3), rng.uniform(-1e6, 1e6)])


def _override(key, value):
    if isinstance(value, float) and math.isnan(value):
        text = "nan"
    elif isinstance(value, float) and math.isinf(value):
        text = "inf" if value > 0 else "-inf"
    else:
        text = repr(value)
    return f"{key}={text}"


def test_random_invalid_values_never_succeed_silently(tmp_path, monkeypatch):
    from ddpm_lightning.app.training import build as train_build

    monkeypatch.chdir(tmp_path)

    def build(cfg, name):
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / name)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        hc = HydraConfig.get()
        with open_dict(cfg):
            del cfg["hydra"]  # as in a real run, the job's config has no hydra node
        _, datamodule, _, _, _ = train_build(cfg, hc, tmp_path / name)
        datamodule.setup("fit")

    build(_compose(BASE), "control")  # the harness itself accepts a valid config
    rng = random.Random(1234)
    tried = rejected = 0
    messages = []
    for key, rule in RULES.items():
        draws = 0
        while draws < 4:
            value = _draw(rng)
            if rule(value):
                continue  # only invalid values are of interest here
            draws += 1
            tried += 1
            try:
                cfg = _compose([*BASE, _override(key, value)])
            except Exception:
                rejected += 1  # refused while parsing the override itself
                continue
            try:
                build(cfg, f"run{tried}")
            except Exception as err:
                rejected += 1
                cause = err.__cause__ if "Instantiation" in type(err).__name__ else err
                messages.append((key, value, str(cause or err)))
                continue
            pytest.fail(f"{key}={value!r} is invalid but was accepted")
    print(f"fuzz: {tried} invalid values tried, {rejected} rejected")
    assert tried == rejected == 4 * len(RULES)
    # the errors are about the value that was set, not some unrelated failure
    named = [m for k, v, m in messages if k.rsplit(".", 1)[-1] in m or repr(v) in m or str(v) in m]
    assert len(named) >= 0.9 * len(messages), [m for m in messages if m[2] not in
                                                 {n for n in named}][:10]
