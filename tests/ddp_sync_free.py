"""The guarded fit of test_sync_free on 2 gloo ranks (run as a script: Lightning's DDP launcher
starts rank 1 by running it again). Writes, into the folder given: rank{R}.json, the quarter
sums of rank R's own batches before each check, and logged.json, the quarter losses rank 0
logged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger
from test_sync_free import Guarded, GuardedData, _net, guard_the_loop, guarded

from ddpm_lightning.core.schedules import make_beta_schedule
from ddpm_lightning.training.callbacks import Preemption, ProgressBar
from ddpm_lightning.training.distributed import ddp

OUT = Path(sys.argv[1])


class Recorder(Logger):
    name, version = "recorder", 0
    logged: dict = {}

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        quarters = {k: v for k, v in metrics.items() if k.startswith("train/loss_q")}
        if quarters:
            self.logged[str(step)] = quarters


class Recording(Guarded):
    own: dict = {}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        if step % self.check_every_n_steps == 0 and step != self._window[1]:
            state = self.monitor._state
            self.own[str(step)] = {"sums": state["q_sums"].tolist(),
                                   "mass": state["q_mass"].tolist()}
        return super().on_train_batch_end(outputs, batch, batch_idx)


def main() -> None:
    L.seed_everything(0)
    module = Recording(_net(), make_beta_schedule("linear", 50), warmup_steps=0,
                       check_every_n_steps=4)
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ddp(timeout_minutes=1),
                        max_steps=8, logger=recorder, enable_progress_bar=True,
                        enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, gradient_clip_val=1.0,
                        callbacks=[guarded(ProgressBar)(),
                                   guarded(Preemption)(check_every_n_steps=4)])
    guard_the_loop(trainer, 4)  # Lightning's loop too: its per-step SIGTERM broadcast
    trainer.fit(module, datamodule=GuardedData(image_size=16, batch_size=8, random_flip=True))
    assert trainer.global_step == 8
    (OUT / f"rank{trainer.global_rank}.json").write_text(json.dumps(module.own))
    if trainer.is_global_zero:
        (OUT / "logged.json").write_text(json.dumps(recorder.logged))


if __name__ == "__main__":
    main()
