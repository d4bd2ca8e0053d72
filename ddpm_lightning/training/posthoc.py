"""Post-hoc EMA during training (``module.ema=posthoc``): power-function EMA profiles of the
network, updated after every optimizer step, kept in the checkpoint (so a resume continues
them exactly) and saved as snapshots that ``tools/posthoc_ema.py`` combines into the EMA of any
length after training. The maths: ``core/posthoc_ema.py``."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ddpm_lightning.core.files import atomic_write
from ddpm_lightning.core.posthoc_ema import power_ema_beta, sigma_rel_to_gamma

SNAPSHOT_DIR = "posthoc_ema"


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{int(step):07d}.pt"


class PosthocProfiles(nn.Module):
    """Copies of ``model``, one per σ_rel, each a power-function EMA of its weights (buffers
    are copied), and the period of their snapshots. The settings are checked by ``check``
    (the module checks them whether or not it tracks profiles).

    Args (``module.posthoc`` in the config):
        sigma_rels: the relative widths tracked (Karras et al. 2024 track 0.05 and 0.10).
        every_n_steps: a snapshot every this many optimizer steps (and at the end of
            training); more snapshots let the reconstruction follow more lengths.
    """

    def __init__(self, model: nn.Module, sigma_rels=(0.05, 0.10), every_n_steps: int = 1000):
        super().__init__()
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.every_n_steps = every_n_steps
        self.models = nn.ModuleList(copy.deepcopy(model).eval().requires_grad_(False)
                                    for _ in sigma_rels)

    @staticmethod
    def check(settings: Mapping | None) -> dict:
        """The ``module.posthoc`` settings, checked whether or not ``module.ema=posthoc``."""
        settings = dict(settings or {})
        unknown = set(settings) - {"sigma_rels", "every_n_steps"}
        if unknown:
            raise ValueError(f"module.posthoc.{min(unknown)} is unknown; valid: sigma_rels, "
                             "every_n_steps")
        every = settings.get("every_n_steps", 1000)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"module.posthoc.every_n_steps={every!r} must be an integer >= 1")
        sigma_rels = [float(s) for s in settings.get("sigma_rels", (0.05, 0.10))]
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"module.posthoc.sigma_rels={sigma_rels} must be distinct values")
        for s in sigma_rels:
            try:
                sigma_rel_to_gamma(s)
            except ValueError as err:
                raise ValueError(f"module.posthoc.{err}") from None
        return settings


    @torch.no_grad()
    def update(self, step: int, model: nn.Module) -> None:
        """After optimizer step ``step`` (1 for the first): θ̂ ← β θ̂ + (1 − β) θ per profile,
        β = (1 − 1/step)^(γ+1)."""
        raw = [p.detach() for p in model.parameters()]
        for gamma, avg in zip(self.gammas, self.models):
            torch._foreach_lerp_(list(avg.parameters()), raw, 1.0 - power_ema_beta(step, gamma))
            for b_avg, b in zip(avg.buffers(), model.buffers()):
                b_avg.copy_(b)

    def save(self, run_dir: str | Path, step: int) -> Path:
        """``RUN/posthoc_ema/step_XXXXXXX.pt``, written atomically: the step, the σ_rel and γ
        of each profile, and each profile's state dict (on the CPU)."""
        path = snapshot_path(run_dir, step)
        states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.models]
        with atomic_write(path) as f:
            torch.save({"step": int(step), "sigma_rels": self.sigma_rels, "gammas": self.gammas,
                        "state_dicts": states}, f)
        return path
