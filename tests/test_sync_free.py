"""The training step makes no device-to-host sync and no host-to-device copy, so a GPU never
waits for the host between the checks. Inside every training batch as Lightning's loop runs it
(the training and optimizer steps, the batch transfer with flips on, the module's and the
callbacks' batch ends with the progress bar on and preemption active, and the loop's own
work), ``Tensor.item``, ``tolist``, ``__bool__``, ``__int__`` and ``__float__`` raise, and so do
``torch.tensor(data, device=...)`` and a tensor drawn or filled with no ``device=`` (on a GPU,
both are a synchronous host-to-device copy). Training still runs, in one process and on 2 gloo
ranks. The non-finite checks are read every ``module.check_every_n_steps`` steps instead,
where the guard is off."""

from __future__ import annotations

import contextlib
import functools
import json

import lightning as L
import pytest
import torch
from test_reliability import NaNAfter

from ddpm_lightning.core.schedules import make_beta_schedule
from ddpm_lightning.core.unet import UNet
from ddpm_lightning.training.callbacks import Preemption, ProgressBar
from ddpm_lightning.training.data import DiffusionDataModule
from ddpm_lightning.training.module import DDPM

from helpers import run_script

READS = ("item", "tolist", "__bool__", "__int__", "__float__")


class HostSync(AssertionError):
    pass


HOST_FACTORIES = ("rand", "randn", "randint", "randperm", "zeros", "ones", "full", "empty",
                  "arange")


@contextlib.contextmanager
def no_host_sync(allowed=lambda: ()):
    """Make the host-sync entry points raise, except on ``allowed()`` tensors: the reads, a
    tensor made from host data on a device (``torch.tensor(data, device=...)``), and a tensor
    drawn or filled with no ``device=`` (made on the host, so on a GPU it must be copied)."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}
    factories = {name: getattr(torch, name) for name in ("tensor", *HOST_FACTORIES)}

    def guard(name):
        def method(self, *args, **kwargs):
            if any(self is a for a in allowed()):
                return saved[name](self, *args, **kwargs)
            raise HostSync(f"Tensor.{name} called in the training step")
        return method

    def factory(name):
        def make(*args, **kwargs):
            on_device = kwargs.get("device") is not None or \
                getattr(kwargs.get("generator"), "device", None) is not None
            if name == "tensor" and on_device:
                raise HostSync("torch.tensor(data, device=...) in the training step")
            if name != "tensor" and not on_device:
                raise HostSync(f"torch.{name} with no device= in the training step")
            return factories[name](*args, **kwargs)
        return make

    for name in READS:
        setattr(torch.Tensor, name, guard(name))
    for name in factories:
        setattr(torch, name, factory(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in factories.items():
            setattr(torch, name, fn)


def _optimizer_steps(module):
    """The optimizer's own step counters (CPU scalars that non-capturable Adam reads with
    .item(); on CUDA, fused/capturable Adam keeps them on the device)."""
    return [s["step"] for opt in module.trainer.optimizers for s in opt.state.values()
            if "step" in s]


class Guarded(DDPM):
    """DDPM whose training step, optimizer step (after the first) and batch end (except at the
    check steps) run under ``no_host_sync``."""

    def _allowed(self):
        return _optimizer_steps(self)

    def training_step(self, batch, batch_idx):
        with no_host_sync(self._allowed):
            return super().training_step(batch, batch_idx)

    def optimizer_step(self, *args, **kwargs):
        # the first step is Adam's lazy state initialisation (host step counters by design)
        with no_host_sync(self._allowed) if self.global_step else contextlib.nullcontext():
            return super().optimizer_step(*args, **kwargs)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        check = self.global_step % self.check_every_n_steps == 0
        with contextlib.nullcontext() if check else no_host_sync(self._allowed):
            return super().on_train_batch_end(outputs, batch, batch_idx)


class GuardedData(DiffusionDataModule):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        with no_host_sync():
            return super().on_after_batch_transfer(batch, dataloader_idx)


def guarded(callback_class):
    """``callback_class`` with its ``on_train_batch_end`` under ``no_host_sync``, except at its
    own check steps (``check_every_n_steps``, if it has one)."""
    class GuardedCallback(callback_class):
        def on_train_batch_end(self, trainer, *args):
            every = getattr(self, "check_every_n_steps", None)
            check = every is not None and trainer.global_step % every == 0
            with contextlib.nullcontext() if check else no_host_sync():
                return super().on_train_batch_end(trainer, *args)
    return GuardedCallback


def guard_the_loop(trainer, every: int) -> None:
    """Every training batch as Lightning's loop runs it (fetch, transfer, step, batch ends and
    the loop's own work) under ``no_host_sync``, except the first (Adam's lazy state) and the
    batches that end at a check step (every ``every`` steps)."""
    loop = trainer.fit_loop.epoch_loop
    advance = loop.advance

    def guarded_advance(*args, **kwargs):
        step = trainer.global_step
        check = step == 0 or (step + 1) % every == 0
        allowed = functools.partial(_optimizer_steps, trainer.lightning_module)
        with contextlib.nullcontext() if check else no_host_sync(allowed):
            return advance(*args, **kwargs)

    loop.advance = guarded_advance


def _fit(module, steps=6, callbacks=(), **trainer_kwargs):
    trainer_kwargs.setdefault("enable_progress_bar", False)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False,
                        enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=list(callbacks), **trainer_kwargs)
    guard_the_loop(trainer, module.check_every_n_steps)
    trainer.fit(module, datamodule=GuardedData(image_size=16, batch_size=8, random_flip=True))
    return trainer


def _net():
    torch.manual_seed(0)
    return UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                image_size=16, dropout=0.0)


def test_the_training_step_makes_no_host_sync():
    module = Guarded(_net(), make_beta_schedule("linear", 50), warmup_steps=0,
                     check_every_n_steps=4)
    trainer = _fit(module, callbacks=[guarded(ProgressBar)(), guarded(Preemption)()],
                   enable_progress_bar=True)
    assert trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert "loss" in module.progress_values  # the bar's host number, from the check at step 4


@pytest.mark.parametrize("what, match", [
    ("item", "Tensor.__bool__"),
    ("flip", "torch.rand with no device="),
    ("bar", "Tensor.item"),
    ("lr", r"torch.tensor\(data, device=...\)"),
])
def test_the_guard_catches_each_sync(monkeypatch, what, match):
    """Each sync the step once had, put back, is caught: a per-step finiteness check, a flip
    mask drawn on the CPU and moved to the device, the loss on the progress bar, and the lr
    logged as a Python number."""
    import ddpm_lightning.training.data as data

    module = Guarded(_net(), make_beta_schedule("linear", 50), warmup_steps=0,
                     check_every_n_steps=4)
    if what == "item":
        def training_step(batch, batch_idx):
            loss = DDPM.training_step(module, batch, batch_idx)
            if not torch.isfinite(loss):  # the old per-step check
                raise FloatingPointError
            return loss
        monkeypatch.setattr(module, "training_step", lambda *a: _under_guard(training_step, *a))
    elif what == "flip":
        def old_flip(images, generator=None):
            flip = torch.rand(images.shape[0], generator=generator) < 0.5
            return torch.where(flip.to(images.device).view(-1, 1, 1, 1), images.flip(-1),
                               images)
        monkeypatch.setattr(data, "random_hflip", old_flip)
    elif what == "bar":
        def training_step(batch, batch_idx):
            loss = DDPM.training_step(module, batch, batch_idx)
            module.log("loss", loss, prog_bar=True)
            return loss
        monkeypatch.setattr(module, "training_step", training_step)
    else:
        def on_train_batch_end(outputs, batch, batch_idx):
            module.log("train/lr", module.trainer.optimizers[0].param_groups[0]["lr"])
        monkeypatch.setattr(module, "on_train_batch_end",
                            lambda *a: _under_guard(on_train_batch_end, *a))
    with pytest.raises(HostSync, match=match):
        _fit(module, steps=2, callbacks=[guarded(ProgressBar)()], enable_progress_bar=True)


def _under_guard(fn, *args):
    with no_host_sync():
        return fn(*args)


def test_a_nonfinite_loss_is_raised_within_n_steps_naming_its_step():
    module = DDPM(NaNAfter(_net(), at=3), make_beta_schedule("linear", 20), warmup_steps=0,
                  check_every_n_steps=5)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at global step 3 "):
        _fit(module, steps=50)
    assert module.global_step == 5  # found at the first check after step 3


def test_two_gloo_ranks_make_no_host_sync_and_log_every_ranks_quarter_losses(tmp_path):
    """tests/ddp_sync_free.py: the guarded fit above on 2 gloo ranks with the progress bar,
    flips and the preemption callback (which shares its decision every 4 steps only). Each rank
    writes the quarter sums of its own batches before every check; rank 0 writes what it
    logged, which must be the loss over both ranks' batches, not rank 0's alone."""
    proc = run_script("tests/ddp_sync_free.py", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    logged = json.loads((tmp_path / "logged.json").read_text())
    assert sorted(logged) == ["4", "8"]
    for step, metrics in logged.items():
        sums = [sum(r[step]["sums"][q] for r in ranks) for q in range(4)]
        mass = [sum(r[step]["mass"][q] for r in ranks) for q in range(4)]
        expected = {f"train/loss_q{q}": s / m for q, (s, m) in enumerate(zip(sums, mass)) if m}
        assert metrics == pytest.approx(expected, rel=1e-5)
        own = {f"train/loss_q{q}": s / m for q, (s, m) in
               enumerate(zip(ranks[0][step]["sums"], ranks[0][step]["mass"])) if m}
        assert metrics != pytest.approx(own, rel=1e-5)  # not rank 0's batches alone
