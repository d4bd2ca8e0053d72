"""What the benchmark times: a training step as the LightningModule runs it, the EMA
network's forward, the sampler's overhead over bare forwards, and the dataloader."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from ddpm_lightning.tools.measure import autocast, interleaved, rate, summary


class TrainStep:
    """One training step of a ``DDPM`` module on a fixed batch, as the LightningModule runs it
    (fresh t and ε every call), without Lightning's logging."""

    def __init__(self, module, x0: torch.Tensor, precision: str):
        self.module, self.x0, self.precision = module, x0, precision
        cfg = module.configure_optimizers()
        self.opt, self.sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
        self.last_loss: torch.Tensor | None = None

    def __call__(self) -> None:
        m = self.module
        with autocast(self.precision, self.x0.device):
            losses, _ = m.diffusion.training_loss(m.model, self.x0)
            loss = losses.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        m.update_ema()
        self.last_loss = loss.detach()


def forward_fn(module, x: torch.Tensor, t: torch.Tensor, precision: str) -> Callable[[], object]:
    net = module.ema_model  # what the samplers call

    def fwd():
        with torch.no_grad(), autocast(precision, x.device):
            return net(x, t)

    return fwd


# ------------------------------------------------------------------- sampler and dataloader

def sampler_overhead(module, shape, precision: str, steps: int, reps: int, warmup: int,
                     device: torch.device) -> dict:
    """Time per step of DDPM and DDIM sampling (``samplers.sample``, ``steps`` respaced steps,
    EMA network) over the time of one bare forward of the same network at the same batch.

    Every round times ``steps`` bare forwards and one run of each sampler, and the ratio is
    taken within the round (so that drifts cancel); ``step_over_forward`` is the median over
    the rounds. The loop's own cost is also timed directly, with the network replaced by a
    stub that returns a stored output: ``loop_over_forward`` = loop time per step / forward
    time, a precise estimate of ``step_over_forward`` - 1 (which, as a ratio of two noisy
    times, scatters by a percent or two even on a quiet machine)."""
    from ddpm_lightning.core.samplers import sample

    net, diffusion = module.ema_model, module.diffusion
    x = torch.randn(shape, device=device)
    t = torch.full((shape[0],), diffusion.num_timesteps - 1, device=device, dtype=torch.long)
    with torch.no_grad(), autocast(precision, device):
        stored = net(x, t)

    def bare():
        with torch.no_grad(), autocast(precision, device):
            for _ in range(steps):
                net(x, t)

    def sampler(name, model):
        def go():
            with autocast(precision, device):
                sample(model, diffusion, shape, sampler=name, steps=steps, device=device)
        return go

    def stub(x_t, t_):
        return stored

    fns = {"forward": bare, "ddpm": sampler("ddpm", net), "ddim": sampler("ddim", net)}
    times = interleaved(fns, reps, warmup, device)
    loops = interleaved({n: sampler(n, stub) for n in ("ddpm", "ddim")}, max(reps, 5), 1, device)
    per_step = {k: [s / steps for s in v] for k, v in times.items()}
    fwd = statistics.median(per_step["forward"])
    out = {"steps": steps, "rounds": reps, "forward_s": summary(per_step["forward"])}
    for name in ("ddpm", "ddim"):
        ratios = [s / f for s, f in zip(per_step[name], per_step["forward"])]
        loop = statistics.median(loops[name]) / steps
        out[name] = {"step_s": summary(per_step[name]), "step_over_forward": summary(ratios),
                     "loop_s": loop, "loop_over_forward": loop / fwd}
    return out


def dataloader_throughput(batch: int, device: torch.device, reps: int, quick: bool) -> dict:
    """Images per second of one epoch of the default training data: ``DiffusionDataModule()``
    (embedded digits) at ``batch``, moved to ``device`` and through ``on_after_batch_transfer``
    (uint8 → [-1, 1] on the device)."""
    from ddpm_lightning.training.data import DiffusionDataModule

    dm = DiffusionDataModule(batch_size=batch)
    dm.setup("fit")
    loader = dm.train_dataloader()
    limit = 50 if quick else None
    counted = []

    def epoch():
        n = 0
        for i, images in enumerate(loader):
            if limit is not None and i == limit:
                break
            n += dm.on_after_batch_transfer(images.to(device, non_blocking=True), 0).shape[0]
        counted.append(n)

    secs = interleaved({"epoch": epoch}, reps, 1, device)["epoch"]
    images = counted[-1]
    return {"dataset": dm.dataset, "images_per_epoch": images, "batch": batch,
            "images_per_s": rate(secs, images)}
