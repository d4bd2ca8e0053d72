"""The periodic-callback schedule shared by SampleGrid and FIDCallback (in-process, tiny)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from ddpm_lightning.training.callbacks import EveryNSteps


class _Recorder(EveryNSteps):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []

    def run(self, trainer, pl_module):
        self.steps.append(trainer.global_step)
        self._last_step = trainer.global_step


class _Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(callback: EveryNSteps, tmp_path, max_steps: int) -> None:
    data = torch.utils.data.DataLoader(torch.randn(12, 2), batch_size=2)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(_Linear(), data)


@pytest.mark.parametrize("max_steps, on_end, expected", [
    (5, True, [2, 4, 5]),    # every 2 steps, then once at the end
    (4, True, [2, 4]),       # the last step was just done: not twice
    (5, False, [2, 4]),      # no end-of-training run
    (9, True, [2, 4, 6, 8, 9]),  # across epochs (6 batches per epoch)
])
def test_every_n_steps_schedule(tmp_path, max_steps, on_end, expected):
    recorder = _Recorder(every_n_steps=2, on_train_end=on_end)
    _fit(recorder, tmp_path, max_steps)
    assert recorder.steps == expected
