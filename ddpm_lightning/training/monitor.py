"""What the training step records on the device without a host sync, read on the host every
N steps: the first non-finite loss or gradient norm (with the step and the batch's t), and the
loss per quarter of [0, T). Under DDP both reads are collective, so every rank raises for a
non-finite value seen on any rank, and the quarter losses describe every rank's batches."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ddpm_lightning.training.distributed import over_ranks

NO_STEP = 2**62  # "no non-finite value yet" in the all-ranks minimum of the first bad step


class StepMonitor:
    """Device-side records of the training steps of one rank (see the module docstring)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self._state: dict[str, torch.Tensor] | None = None

    def _on(self, device, batch: int) -> dict[str, torch.Tensor]:
        if self._state is None or self._state["step"].device != device:
            self._state = {
                "step": torch.full((), -1, dtype=torch.long, device=device),  # first bad step
                "what": torch.zeros((), dtype=torch.long, device=device),  # 0 loss, 1 grad
                "value": torch.zeros((), device=device),
                "t": torch.zeros(batch, dtype=torch.long, device=device),
                "q_sums": torch.zeros(4, device=device),
                "q_mass": torch.zeros(4, device=device),
            }
        return self._state

    def record_nonfinite(self, value: torch.Tensor, what: int, t: torch.Tensor | None,
                         step: int) -> None:
        """Remember the first non-finite loss (what=0) or gradient norm (1), on the device."""
        w = self._on(value.device, t.shape[0] if t is not None else 1)
        first = ~torch.isfinite(value.detach()) & (w["step"] < 0)
        w["step"] = torch.where(first, step, w["step"])
        w["what"] = torch.where(first, what, w["what"])
        w["value"] = torch.where(first, value.detach().float(), w["value"])
        if t is not None and t.shape == w["t"].shape:
            w["t"] = torch.where(first, t, w["t"])

    def add_losses(self, losses: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> None:
        """Accumulate the loss of timesteps in each quarter of [0, T), as if t were uniform
        (importance weights self-normalized within each quarter)."""
        w = self._on(losses.device, t.shape[0])
        q = (t * 4) // self.num_timesteps
        wt = weights.float()
        w["q_sums"].index_add_(0, q, losses.float() * wt)
        w["q_mass"].index_add_(0, q, wt)

    def raise_if_nonfinite(self, device, collective: bool = True) -> None:
        """The host sync of the checks: raise FloatingPointError for the first non-finite loss
        or gradient norm recorded since the start. With ``collective`` (every rank calls it at
        the same step) the earliest bad step of any rank is raised on every rank."""
        w = self._state
        step = w["step"] if w is not None else torch.full((), -1, dtype=torch.long,
                                                          device=device)
        first = torch.where(step >= 0, step, torch.full_like(step, NO_STEP))
        if collective:
            first = over_ranks(first, dist.ReduceOp.MIN)
        first = int(first)
        if first == NO_STEP:
            return
        if w is None or int(w["step"]) != first:
            raise FloatingPointError(
                f"non-finite loss or gradient norm on another rank at global step {first}; "
                "the last good checkpoint is kept"
            )
        if int(w["what"]) == 0:
            raise FloatingPointError(
                f"non-finite loss {w['value'].item()} at global step {first} "
                f"(batch timesteps t={w['t'].tolist()}); the last good checkpoint is kept"
            )
        raise FloatingPointError(
            f"non-finite gradient norm {w['value'].item()} at global step {first}; "
            "the last good checkpoint is kept"
        )

    def flush_losses(self, collective: bool = True) -> dict[str, float]:
        """The mean loss per quarter since the last flush, ``train/loss_q0`` … ``q3`` (summed
        over ranks with ``collective``; a quarter with no t logs nothing, not a spurious 0),
        and ``loss``, the mean over all quarters; then start a new window."""
        w = self._state
        if w is None:
            return {}
        both = torch.stack([w["q_sums"], w["q_mass"]])
        if collective:
            both = over_ranks(both, dist.ReduceOp.SUM)
        sums, mass = both.tolist()
        w["q_sums"].zero_()
        w["q_mass"].zero_()
        out = {f"train/loss_q{i}": s / m for i, (s, m) in enumerate(zip(sums, mass)) if m > 0}
        if sum(mass) > 0:
            out["loss"] = sum(sums) / sum(mass)
        return out
