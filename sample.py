"""Sample from a trained DDPM and evaluate it (see README):

    python sample.py ckpt_path=RUN/checkpoints/last.ckpt num_samples=50000 metrics=[fid,is]

compose (Hydra) → build (``app.sampling.build``: checkpoint, settings, Fabric) → sample and
evaluate (``app.sampling.run``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning.app import runtime, sampling


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ddpm_lightning.training.checkpoint import CheckpointError

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if OmegaConf.is_missing(cfg, "ckpt_path"):
            raise runtime.ConfigError("ckpt_path is required: ckpt_path=RUN/checkpoints/last.ckpt")
        results = sampling.run(sampling.build(cfg), out_dir)
    except (CheckpointError, runtime.ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        runtime.fail_before_work(err, out_dir)
        return
    runtime.end_distributed()  # every rank finished: shut the process group down cleanly
    if not runtime.is_ddp_child():
        print(f"samples: {out_dir / 'samples.npz'}  grid: {out_dir / 'grid.png'}")
        for key, value in results.items():
            if isinstance(value, dict):
                print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
