"""Train a DDPM: ``python train.py [experiment=cifar10_ddpm] [key=value ...]`` (see README).

compose (Hydra) → build (``app.training.build``: module, data, callbacks, loggers, Trainer)
→ fit (``app.training.run``)."""

from __future__ import annotations

import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ddpm_lightning.app import runtime, training
from ddpm_lightning.app.loggers import finish_wandb


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Train; return ``optimized_metric`` (what a sweeper such as Optuna minimises), or None
    (no metric asked for, or a failed job: Optuna records a failed trial)."""
    import lightning as L

    hc = HydraConfig.get()
    if str(hc.mode) == "RunMode.MULTIRUN" and not runtime.is_ddp_child():
        runtime.fix_hydra_multirun_for_ddp(hc)
    L.seed_everything(cfg.seed, workers=True)
    trainer = None
    try:
        trainer = training.run(cfg, hc)
    finally:
        # every job of a sweep gets its own W&B run, a failed or diverged one included
        finish_wandb(trainer is None)
    try:
        return runtime.objective(cfg.get("optimized_metric"), trainer)
    except runtime.ConfigError as err:
        return training.job_failed(err, hc)  # in a sweep: a failed trial, and the sweep goes on


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
