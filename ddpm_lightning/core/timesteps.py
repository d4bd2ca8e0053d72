"""How training draws the timestep t: uniformly (the paper), or by importance sampling.

Importance sampling follows improved DDPM (Nichol & Dhariwal 2021, §3.3) for the true bound:
draw t with probability p_t ∝ √E[L_t²], estimated from the last ``history`` losses seen at each
t, and weight each loss by 1 / (T·p_t). The weighted mean is an unbiased estimate of the
uniform-t mean (1/T)·Σ_t E[L_t] whatever p is, so the objective is unchanged; only its variance
drops. Until every t has ``history`` losses, t stays uniform. A share ``uniform_prob`` of
uniform probability is mixed in so that no p_t is ever 0.

No Lightning here: the module gathers the (t, loss) pairs of all ranks and calls ``update``
with them on every rank, so that every rank keeps the same history and draws from the same p.
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLERS = ("uniform", "loss_aware")


class UniformTimesteps:
    """t ~ Uniform({0, …, T − 1}) (the paper's t ~ Uniform({1, …, T})), weights 1."""

    name = "uniform"

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` timesteps on ``device`` and their loss weights 1 / (T·p_t). A
        ``generator`` draws on its own device; without one, the global RNG of ``device``."""
        where = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), device=where, generator=generator)
        return t.to(device), torch.ones(batch, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareTimesteps(UniformTimesteps):
    """p_t ∝ √(mean of the last ``history`` squared losses at t), mixed with ``uniform_prob``
    of uniform; uniform until every t has ``history`` losses. The state (a T × history ring
    of losses and the count seen at each t) is small and kept on the CPU."""

    name = "loss_aware"

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 1e-3):
        super().__init__(num_timesteps)
        _check_settings(history, uniform_prob)
        self.history = history
        self.uniform_prob = float(uniform_prob)
        self.losses = torch.zeros(self.num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(self.num_timesteps, dtype=torch.long)

    @property
    def warm(self) -> bool:
        """True once every t has ``history`` losses (importance sampling is on)."""
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        T = self.num_timesteps
        if not self.warm:
            return super().probabilities()
        w = self.losses.pow(2).mean(dim=1).sqrt()
        total = w.sum()
        if not torch.isfinite(total) or total <= 0:
            return super().probabilities()
        return (1.0 - self.uniform_prob) * w / total + self.uniform_prob / T

    def sample(self, batch: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.warm:  # the same draw as uniform sampling until the history is full
            return super().sample(batch, device, generator)
        p = self.probabilities()
        if batch == 0:
            return (torch.zeros(0, dtype=torch.long, device=device),
                    torch.zeros(0, device=device))
        # on the generator's device (the global CPU RNG without one): restored on resume
        p_where = p.to(generator.device) if generator is not None else p
        t = torch.multinomial(p_where, batch, replacement=True, generator=generator).cpu()
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record each loss at its timestep, in the order given; each t keeps its last
        ``history`` losses (a ring: slot = number seen so far mod ``history``). Non-finite
        losses are skipped. Vectorized: a global batch costs microseconds, not a Python loop."""
        t = t.detach().flatten().cpu().long().numpy()
        losses = losses.detach().flatten().cpu().double().numpy()
        if t.size != losses.size:
            raise ValueError(f"update got {t.size} timesteps and {losses.size} losses")
        if t.size and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}); got "
                             f"{int(t.min())}..{int(t.max())}")
        keep = np.isfinite(losses)
        t, losses = t[keep], losses[keep]
        if t.size == 0:
            return
        order = np.argsort(t, kind="stable")  # group by t, keeping the given order within
        t, losses = t[order], losses[order]
        starts = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
        sizes = np.diff(np.r_[starts, t.size])
        seen = self.counts.numpy()  # shares memory with the tensor
        position = seen[t] + np.arange(t.size) - np.repeat(starts, sizes)  # in t's own stream
        last = np.repeat(seen[t[starts]] + sizes, sizes)  # t's count after this update
        fresh = position >= last - self.history  # only the newest `history` survive
        self.losses.numpy()[t[fresh], position[fresh] % self.history] = losses[fresh]
        seen[t[starts]] += sizes

    def recent(self, t: int) -> list[float]:
        """The losses kept for timestep ``t``, oldest first."""
        n = int(self.counts[t])
        row = self.losses[t, :min(n, self.history)]
        if n > self.history:
            row = torch.roll(row, -(n % self.history))
        return row.tolist()

    def state_dict(self) -> dict:
        return {"name": self.name, "history": self.history, "uniform_prob": self.uniform_prob,
                "losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return  # a checkpoint from a uniform run: start the history afresh
        losses, counts = state["losses"].cpu(), state["counts"].cpu()
        if tuple(losses.shape) != tuple(self.losses.shape) \
                or tuple(counts.shape) != tuple(self.counts.shape):
            raise ValueError(
                f"module.timesteps.history={self.history} does not fit the checkpoint's loss "
                f"history of shape {tuple(losses.shape)} (T × history; this run has "
                f"T={self.num_timesteps}); resume with the same module.timesteps settings"
            )
        self.losses = losses.to(torch.float64).clone()
        self.counts = counts.to(torch.long).clone()


def make_timestep_sampler(num_timesteps: int, sampler: str = "uniform", history: int = 10,
                          uniform_prob: float = 1e-3, **unknown):
    """``uniform`` or ``loss_aware``; ``history`` and ``uniform_prob`` are checked either way,
    so that a bad value fails at once and not when the sampler is later switched."""
    if unknown:
        raise ValueError(f"module.timesteps.{min(unknown)} is not a setting; valid: "
                         "sampler, history, uniform_prob")
    _check_settings(history, uniform_prob)
    if sampler == "uniform":
        return UniformTimesteps(num_timesteps)
    if sampler == "loss_aware":
        return LossAwareTimesteps(num_timesteps, history, uniform_prob)
    raise ValueError(f"module.timesteps.sampler={sampler!r} is unknown; valid: "
                     f"{', '.join(SAMPLERS)}")


def _check_settings(history, uniform_prob) -> None:
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"module.timesteps.history={history!r} must be an integer >= 1")
    if isinstance(uniform_prob, bool) or not isinstance(uniform_prob, (int, float)) \
            or not 0.0 < uniform_prob <= 1.0:
        raise ValueError(f"module.timesteps.uniform_prob={uniform_prob!r} must be a number "
                         "in (0, 1]")
