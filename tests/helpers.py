"""Shared test helpers: run the entry points as subprocesses, read their CSV logs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny, fast run on the embedded data: every test that trains starts from these.
TINY = [
    "logger=csv",
    "model.ch=32",
    "model.ch_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[8]",
    "model.image_size=16",
    "data.image_size=16",
    "data.batch_size=8",
    "schedule.T=50",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.sample_grid.num_images=4",
    "callbacks.sample_grid.every_n_steps=1000",
    "module.sampler.steps=5",
    "++callbacks.sample_grid.sampler.steps=5",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
                **(env or {})}
    for key, value in list(full_env.items()):
        if value is None:
            del full_env[key]
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    """All CSV metrics of a run, including those of its resumed parts (csv/resume_N/)."""
    files = sorted((run_dir / "csv").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows: list[dict] = []
    for path in files:
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


class SigtermAt:
    """A Lightning callback for tests: the process sends itself SIGTERM at the start of
    training batch ``step`` (mid-step, as a cluster's preemption would), once. Used as
    ``+callbacks.kill._target_=helpers.SigtermAt +callbacks.kill.step=N`` with tests/ on
    PYTHONPATH."""

    def __new__(cls, step: int):
        import lightning as L

        class _Sigterm(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                import signal

                if trainer.global_step == step:
                    os.kill(os.getpid(), signal.SIGTERM)

        return _Sigterm()
