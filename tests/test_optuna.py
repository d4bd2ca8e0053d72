"""Hyper-parameter search with Optuna (hparams_search=optuna): each trial returns its
optimized_metric; a diverged trial fails alone; the best parameters are written."""

from __future__ import annotations

from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch
import yaml

from ddpm_lightning.app.runtime import ConfigError, objective

from helpers import TINY, read_metrics, run_script, series


def test_objective_is_the_logged_metric_or_none():
    trainer = SimpleNamespace(callback_metrics={"eval/best_fid": torch.tensor(12.5),
                                                "train/loss": torch.tensor(0.25)})
    assert objective("eval/best_fid", trainer) == 12.5
    assert objective(None, trainer) is None
    assert objective("eval/best_fid", None) is None  # a failed job: Optuna fails the trial
    with pytest.raises(ConfigError) as err:
        objective("eval/fid", trainer)
    assert str(err.value) == ("optimized_metric='eval/fid' was not logged by this run; logged: "
                              "eval/best_fid, train/loss")


@pytest.mark.skipif(find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
                    reason="the optuna extra is not installed")
def test_optuna_search_returns_metrics_and_survives_a_diverged_trial(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script(
        "train.py", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
        "optimized_metric=train/loss", "callbacks=default", *TINY, "trainer.max_steps=4",
        'hydra.sweeper.params={module.lr:"choice(1e30,2e-3)",schedule:"choice(linear,cosine)"}',
        f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    final = {}
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        lr = float(next(o for o in overrides if o.startswith("module.lr=")).split("=")[1])
        losses = series(read_metrics(job), "train/loss")
        final[job.name] = (lr, losses[-1][1] if losses else None)
    assert {lr for lr, _ in final.values()} == {1e30, 2e-3}  # both, by the seeded sampler
    assert "not finite" in proc.stderr or "non-finite" in proc.stderr, proc.stderr[-2000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    good = [loss for lr, loss in final.values() if lr == 2e-3]
    assert result["best_params"]["module.lr"] == 2e-3
    assert result["best_value"] == pytest.approx(min(good), rel=1e-6)
