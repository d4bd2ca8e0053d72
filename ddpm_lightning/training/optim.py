"""Adam with the paper's linear lr warm-up, and the settings a resume must re-apply."""

from __future__ import annotations

import torch


def adam_fused(device_type: str, precision: str) -> bool | None:
    """Adam's ``fused`` flag: the fused kernel on CUDA (one launch for all parameters, its step
    counters on the device, so no host sync), except under fp16 AMP. Fused Adam unscales its own
    gradients, so Lightning then refuses gradient clipping and ``train/grad_norm`` would read
    scaled gradients; the foreach kernel lets the GradScaler unscale them first. None (torch's
    default, foreach) elsewhere."""
    return True if device_type == "cuda" and not precision.startswith("16") else None


def make_optimizer(params, hp, precision: str) -> dict:
    """Adam with ``hp``'s lr, adam_betas, adam_eps and weight_decay, and the lr scaled by
    min(step / warmup_steps, 1) (1 without warm-up), stepped every optimizer step; in
    Lightning's ``configure_optimizers`` form."""
    params = list(params)
    device = params[0].device.type if params else "cpu"
    opt = torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.adam_betas), eps=hp.adam_eps,
                           weight_decay=hp.weight_decay, fused=adam_fused(device, precision))
    warmup = hp.warmup_steps

    def factor(step: int) -> float:
        return min(step / warmup, 1.0) if warmup > 0 else 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def apply_settings(opt: torch.optim.Optimizer, sched, hp) -> None:
    """Put ``hp``'s Adam settings and base lr into a restored optimizer and LambdaLR schedule,
    and set the lr of the coming step from them. A checkpoint restores both as they were saved,
    settings included, so a resume that changes them (resume=PATH module.lr=…) would otherwise
    go on with the old ones. Without a change this rewrites the same values."""
    for group in opt.param_groups:
        group.update(betas=tuple(hp.adam_betas), eps=hp.adam_eps,
                     weight_decay=hp.weight_decay, initial_lr=hp.lr)
    if sched is None:
        return
    sched.base_lrs = [hp.lr] * len(sched.base_lrs)
    for group, base, lr_lambda in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * lr_lambda(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]
