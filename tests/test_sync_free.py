"""The training step makes no device-to-host sync: ``Tensor.item``, ``Tensor.tolist``,
``Tensor.__bool__`` (and ``__int__``, ``__float__``) raise inside ``training_step`` and the optimizer step, and training still
runs. The non-finite checks are read every ``module.check_every_n_steps`` steps instead."""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
from test_reliability import NaNAfter

from ddpm_lightning.core.schedules import make_beta_schedule
from ddpm_lightning.core.unet import UNet
from ddpm_lightning.training.data import DiffusionDataModule
from ddpm_lightning.training.module import DDPM


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync(allowed):
    """Make the three host-sync entry points raise, except on ``allowed()`` tensors."""
    saved = {name: getattr(torch.Tensor, name)
             for name in ("item", "tolist", "__bool__", "__int__", "__float__")}

    def guard(name):
        def method(self, *args, **kwargs):
            if any(self is a for a in allowed()):
                return saved[name](self, *args, **kwargs)
            raise HostSync(f"Tensor.{name} called in the training step")
        return method

    for name in saved:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


class Guarded(DDPM):
    """DDPM whose training_step and optimizer_step run under ``no_host_sync``. Allowed: the
    optimizer's own step counters (CPU scalars that non-capturable Adam reads with .item();
    on CUDA, fused/capturable Adam keeps them on the device)."""

    def _allowed(self):
        return [s["step"] for opt in self.trainer.optimizers for s in opt.state.values()
                if "step" in s]

    def training_step(self, batch, batch_idx):
        with no_host_sync(self._allowed):
            return super().training_step(batch, batch_idx)

    def optimizer_step(self, *args, **kwargs):
        with no_host_sync(self._allowed):
            return super().optimizer_step(*args, **kwargs)


def _fit(module, steps=6, **trainer_kwargs):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0,
                        gradient_clip_val=1.0, **trainer_kwargs)
    trainer.fit(module, datamodule=DiffusionDataModule(image_size=16, batch_size=8))
    return trainer


def _net():
    torch.manual_seed(0)
    return UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                image_size=16, dropout=0.0)


def test_the_training_step_makes_no_host_sync():
    module = Guarded(_net(), make_beta_schedule("linear", 50), warmup_steps=0,
                     check_every_n_steps=4)
    trainer = _fit(module)
    assert trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_the_guard_catches_a_sync():
    class Syncing(Guarded):
        def training_step(self, batch, batch_idx):
            with no_host_sync(self._allowed):
                loss = DDPM.training_step(self, batch, batch_idx)
                if not torch.isfinite(loss):  # the old per-step check
                    raise FloatingPointError
                return loss

    with pytest.raises(HostSync, match="Tensor.__bool__"):
        _fit(Syncing(_net(), make_beta_schedule("linear", 50), warmup_steps=0), steps=1)


def test_a_nonfinite_loss_is_raised_within_n_steps_naming_its_step():
    module = DDPM(NaNAfter(_net(), at=3), make_beta_schedule("linear", 20), warmup_steps=0,
                  check_every_n_steps=5)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at global step 3 "):
        _fit(module, steps=50)
    assert module.global_step == 5  # found at the first check after step 3
