"""Samplers as plain loops that take the network: DDPM (Algorithm 2), DDIM and DPM-Solver++.

Sampling with S < T steps runs on a *respaced* chain: for kept timesteps s_1 < … < s_S the
chain's betas are recomputed as β'_i = 1 − ᾱ_{s_i}/ᾱ_{s_{i−1}} (ᾱ_{s_0} = 1), so that its
marginals q(x_{s_i} | x_0) match the original process. Skipping timesteps without this
recomputation is the "DDPM with fewer steps gives pure noise" bug of other projects.

Every step first forms the prediction x̂_0 and ε̂ from the network output; ``clip`` says what is
done with them (see ``denoise``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ddpm_lightning.core.diffusion import GaussianDiffusion, Model

SAMPLERS = ("ddpm", "ddim", "dpm_solver")
SPACINGS = ("trailing", "linspace", "uniform", "leading", "quadratic", "quadratic_rounded")
CLIPS = ("rederive", "raw_eps", "none", "dynamic")
DEFAULT_SPACING = "trailing"
FINALS = ("zero", "sigma_min")
SETTINGS = ("name", "steps", "eta", "spacing", "variance", "clip", "order", "sde", "final")
DYNAMIC_QUANTILE = 0.995  # Imagen's dynamic thresholding percentile


def timestep_subsequence(T: int, steps: int, spacing: str = DEFAULT_SPACING) -> np.ndarray:
    """The kept timesteps (0-indexed, increasing) of a chain of ``steps`` out of T.

    trailing           round(arange(T, 0, −T/S)) − 1: ends at T − 1, even gaps (Lin et al.
                       2024, "Common diffusion noise schedules and sample steps are flawed").
    linspace           round(linspace(0, T − 1, S)): improved-diffusion's; ends at T − 1.
    uniform            range(0, T, T // S), exactly the DDIM paper's released code (the same as
                       Lin et al.'s "leading"); starts its chain at T − T//S, not T − 1, and has
                       more than S steps when S does not divide T.
    leading            arange(S) · (T // S): diffusers' "leading"; exactly S steps.
    quadratic          int(linspace(0, √(0.8 T), S)²), exactly DDIM's CIFAR-10 code: dense near
                       t = 0, ends at 0.8 T, and repeats small timesteps when S is large.
    quadratic_rounded  round(linspace(0, √(0.8 (T − 1)), S)²), nudged to be strictly
                       increasing (this project's "quadratic" before DDIM's exact one).

    A repeated timestep is a no-op of the deterministic update and is dropped by ``sample``.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"sampler.steps={steps!r} is invalid; it must be an integer in [1, T={T}]")
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64)[::-1] - 1
    if spacing == "linspace":
        return _strictly_increasing(np.round(np.linspace(0, T - 1, steps)).astype(np.int64))
    if spacing == "uniform":
        return np.arange(0, T, T // steps, dtype=np.int64)
    if spacing == "leading":
        return np.arange(steps, dtype=np.int64) * (T // steps)
    if spacing == "quadratic":
        return np.array([int(s) for s in np.linspace(0, np.sqrt(T * 0.8), steps) ** 2])
    if spacing == "quadratic_rounded":
        seq = np.round(np.linspace(np.sqrt(0.8 * (T - 1)), 0, steps)[::-1] ** 2).astype(np.int64)
        return _strictly_increasing(seq)
    raise ValueError(f"sampler.spacing={spacing!r} is unknown; valid values: {', '.join(SPACINGS)}")


def _strictly_increasing(seq: np.ndarray) -> np.ndarray:
    """Nudge duplicates apart without leaving [seq[0], seq[-1]]."""
    seq = seq.copy()
    for i in range(1, len(seq)):
        seq[i] = max(seq[i], seq[i - 1] + 1)
    for i in range(len(seq) - 2, -1, -1):
        seq[i] = min(seq[i], seq[i + 1] - 1)
    return seq


class _TimestepMap:
    """Wraps the network so that the respaced chain's index i calls it at the original s_i."""

    def __init__(self, model: Model, timesteps: np.ndarray):
        self.model = model
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.long)
        self._cache: dict[torch.device, torch.Tensor] = {}

    def __call__(self, x_t, t):
        table = self._cache.get(t.device)
        if table is None:
            table = self._cache[t.device] = self.timesteps.to(t.device)
        return self.model(x_t, table[t])


def respace(diffusion: GaussianDiffusion, timesteps) -> GaussianDiffusion:
    """A GaussianDiffusion over the kept ``timesteps`` with its betas recomputed."""
    timesteps = np.asarray(timesteps, dtype=np.int64)
    abar = diffusion.alphas_cumprod.numpy()[timesteps]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1.0 - abar / abar_prev
    out = GaussianDiffusion(
        betas,
        parameterization=diffusion.parameterization,
        variance=diffusion.variance,
        objective="vlb" if diffusion.learned_variance else "simple",
    )
    out.objective = diffusion.objective
    return out


def chain_for(model, diffusion: GaussianDiffusion, steps, spacing):
    """(network, chain) for sampling ``steps`` of ``diffusion``'s T steps (None: all)."""
    T = diffusion.num_timesteps
    seq = np.arange(T) if steps is None else np.unique(timestep_subsequence(T, steps, spacing))
    if len(seq) == T:
        return model, diffusion
    return _TimestepMap(model, seq), respace(diffusion, seq)


def denoise(chain: GaussianDiffusion, net, x, t, clip: str = "raw_eps", variance=None):
    """One network call: p_θ(x_{t−1} | x_t) and the predictions, after ``clip``:

    raw_eps   clip x̂_0 to [−1, 1] but keep the network's own ε̂ (from v̂ for v-prediction;
              diffusers' DDIM default, and
              this project's: the DDIM variant without speckle in the README's study);
    rederive  clip x̂_0 and re-derive ε̂ from it (improved-diffusion's way; the default before);
    none      neither (the DDIM paper's code);
    dynamic   Imagen's dynamic thresholding: s = max(1, the 99.5th percentile of |x̂_0|) per
              image, x̂_0 ← clip(x̂_0, −s, s) / s, and ε̂ re-derived.
    The DDPM mean is the posterior mean given the handled x̂_0 (µ̃-prediction keeps its own)."""
    output = net(x, t)
    out = chain.p_mean_variance(net, x, t, variance=variance, output=output,
                                clip_denoised=clip in ("rederive", "raw_eps"))
    if clip == "dynamic":
        x0 = out["pred_x0"]
        s = torch.quantile(x0.flatten(1).abs().float(), DYNAMIC_QUANTILE, dim=1).clamp(min=1.0)
        s = s.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        x0 = x0.clamp(-s, s) / s
        mean = out["mean"] if chain.parameterization == "mu" else \
            chain.q_posterior_mean_variance(x0, x, t)[0]
        return {**out, "mean": mean, "pred_x0": x0,
                "pred_eps": chain.predict_eps_from_x0(x, t, x0)}
    if clip in ("none", "raw_eps") and chain.parameterization in ("eps", "v"):
        raw = chain.split_output(output, x)[0]  # the network's own ε̂ (or the one its v̂ gives)
        out["pred_eps"] = raw if chain.parameterization == "eps" else \
            chain.predict_eps_from_v(x, t, raw)
    return out


def _noise_like(x, generator):
    return torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)


@torch.inference_mode()
def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = DEFAULT_SPACING,
    variance: str | None = None,
    clip: str = "raw_eps",
    order: int = 2,
    sde: bool = False,
    final: str = "zero",
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device=None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw samples x_0 in [−1, 1] of ``shape`` = (N, C, H, W).

    ddpm: ancestral sampling, x_{t−1} = µ_θ(x_t, t) + σ_t z (Algorithm 2), with σ_t² from
          ``variance`` ("large" = β_t, "small" = β̃_t; default: the diffusion's own).
    ddim: x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z with
          σ = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}) (Song et al. 2021, eq. 12).
    dpm_solver: DPM-Solver++ (Lu et al. 2022), multistep, of ``order`` 1 or 2, on the
          probability-flow ODE or (``sde``) its SDE form; see ``dpm_solver_step``. ``final``:
          "zero" ends with a first-order step to σ = 0, i.e. the last x̂_0 (diffusers'
          final_sigmas_type="zero"); "sigma_min" ends at the training chain's smallest σ
          (t = 0), with a first-order last step when there are fewer than 15 steps
          (diffusers' lower_order_final).
    ``steps`` < T respaces the chain (``spacing``). ``noise`` fixes x_T. ``clip``: see
    ``denoise``.
    """
    if device is None:
        device = noise.device if noise is not None else next(_params(model), torch.zeros(0)).device
    net, chain = chain_for(model, diffusion, steps, spacing)
    x = noise.to(device) if noise is not None else torch.randn(
        *shape, device=device, generator=generator
    )
    n = x.shape[0]
    indices = range(chain.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"{sampler} sampling", leave=False)
    abar = chain._on(x.device)["alphas_cumprod"]
    if sampler == "dpm_solver" and final == "sigma_min":  # one more point: t = 0 of training
        abar = torch.cat([diffusion._on(x.device)["alphas_cumprod"][:1], abar])
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # DPM-Solver++: the last (x̂_0, λ)
    for i in indices:
        t = torch.full((n,), i, device=x.device, dtype=torch.long)
        out = denoise(chain, net, x, t, clip=clip, variance=variance)
        if sampler == "ddpm":
            x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * _noise_like(x, generator) \
                if i > 0 else out["mean"]
        elif sampler == "ddim":
            a_t = abar[i]
            a_prev = abar[i - 1] if i > 0 else abar.new_tensor(1.0)
            sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = (
                torch.sqrt(a_prev) * out["pred_x0"]
                + torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * out["pred_eps"]
            ).to(x.dtype)
            if i > 0 and eta > 0:
                x = x + sigma.to(x.dtype) * _noise_like(x, generator)
        else:
            if final == "zero" and i == 0:
                x = out["pred_x0"]
                continue
            # with sigma_min, abar has t = 0 of training in front: chain index i is abar[i + 1]
            start = i + 1 if final == "sigma_min" else i
            short_final = final == "sigma_min" and i == 0 and chain.num_timesteps < 15
            use_order = 1 if not history or short_final else order
            x = dpm_solver_step(x, out["pred_x0"], history, abar, start, use_order, sde,
                                generator).to(x.dtype)
    return x


def _lambda(abar_t: torch.Tensor) -> torch.Tensor:
    """λ = log(α/σ) = ½ log(ᾱ / (1 − ᾱ)), the half log-SNR."""
    return 0.5 * (torch.log(abar_t) - torch.log1p(-abar_t))


def dpm_solver_step(x, x0, history, abar, i: int, order: int, sde: bool, generator):
    """One DPM-Solver++ step from ᾱ = abar[i] to abar[i − 1] (i ≥ 1), in float64
    coefficients, with α = √ᾱ, σ = √(1 − ᾱ), h = λ_{i−1} − λ_i:

    ODE, 1st order:  x' = (σ'/σ) x − α' (e^{−h} − 1) D
    SDE, 1st order:  x' = (σ'/σ) e^{−h} x + α' (1 − e^{−2h}) D + σ' √(1 − e^{−2h}) z
    with D = x̂_0 for order 1, and for order 2 (multistep, the midpoint form) D = x̂_0 plus
    ½ (x̂_0 − x̂_0^prev) / r with r = h_prev / h. (A step to σ' = 0 gives x' = x̂_0 in both
    forms; ``sample`` takes it directly.) ``history`` holds the previous step's (x̂_0, λ), the
    only one the multistep update reads; it is replaced by this step's, so a chain of any
    length keeps one earlier x̂_0 alive, not one per step.
    """
    a_t = abar[i]
    lam = _lambda(a_t)
    a_next = abar[i - 1]
    lam_next = _lambda(a_next)
    alpha_next, sigma_next, sigma = a_next.sqrt(), (1 - a_next).sqrt(), (1 - a_t).sqrt()
    h = lam_next - lam
    d = x0
    if order == 2 and history:
        x0_prev, lam_prev = history[-1]
        r = (lam - lam_prev) / h
        d = x0 + (0.5 / r).to(x0.dtype) * (x0 - x0_prev)
    history[:] = [(x0, lam)]
    if not sde:
        return (sigma_next / sigma).to(x.dtype) * x \
            - (alpha_next * torch.expm1(-h)).to(x.dtype) * d
    decay = torch.exp(-h)
    out = (sigma_next / sigma * decay).to(x.dtype) * x \
        + (alpha_next * -torch.expm1(-2 * h)).to(x.dtype) * d
    return out + (sigma_next * torch.sqrt(-torch.expm1(-2 * h))).to(x.dtype) \
        * _noise_like(x, generator)


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler settings, checked once, where they are made (``parse``); every user (the module's
    grids, the callbacks, sample.py, the NFE study) samples through ``sample`` below.

    The config form is ``{name, steps, eta, spacing, variance, clip, order, sde, final}``;
    a missing or null entry takes the default. See ``sample`` for their meaning."""

    name: str = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    spacing: str = DEFAULT_SPACING
    variance: str | None = None
    clip: str = "raw_eps"
    order: int = 2
    sde: bool = False
    final: str = "zero"

    @classmethod
    def parse(cls, settings: Mapping | None, T: int, key: str = "sampler") -> SamplerSettings:
        """Settings for a chain of T steps; a one-line ``ValueError`` naming ``key.<setting>``
        and its value for anything unusable."""
        given = {k: v for k, v in dict(settings or {}).items() if v is not None}
        unknown = set(given) - set(SETTINGS)
        if unknown:
            raise ValueError(f"{key}.{sorted(unknown)[0]} is not a sampler setting; valid: "
                             + ", ".join(SETTINGS))
        out = cls(**given)
        if out.name not in SAMPLERS:
            raise ValueError(f"{key}.name={out.name!r} is unknown; valid values: "
                             + ", ".join(SAMPLERS))
        steps = out.steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or not 1 <= steps <= T):
            raise ValueError(f"{key}.steps={steps!r} is invalid; it must be an integer in "
                             f"[1, T={T}]")
        eta = out.eta
        if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and np.isfinite(eta)
                                         and eta >= 0):
            raise ValueError(f"{key}.eta={eta!r} is invalid; it must be a finite number >= 0")
        choices = {"spacing": SPACINGS, "clip": CLIPS, "order": (1, 2), "sde": (False, True),
                   "final": FINALS}
        for setting, valid in choices.items():
            value = getattr(out, setting)
            if value not in valid or type(value) is not type(valid[0]):
                raise ValueError(f"{key}.{setting}={value!r} is unknown; valid values: "
                                 + ", ".join(str(v) for v in valid))
        if out.variance not in (None, "small", "large", "fixed_small", "fixed_large"):
            raise ValueError(f"{key}.variance={out.variance!r} is unknown; valid values: "
                             "null, large, small")
        if out.name == "dpm_solver" and (out.variance is not None or out.eta):
            what = "variance" if out.variance is not None else "eta"
            raise ValueError(f"{key}.{what}={getattr(out, what)!r} does not apply to {key}.name="
                             "'dpm_solver' (its steps have no free variance); set it to null")
        return out

    def updated(self, overrides: Mapping | None, T: int, key: str = "sampler") -> SamplerSettings:
        """These settings with ``overrides`` (config form) on top, checked as ``key``."""
        given = {k: v for k, v in dict(overrides or {}).items() if v is not None}
        return SamplerSettings.parse({**self.config(), **given}, T, key)

    def config(self) -> dict:
        """The config form, every setting spelled out (what checkpoints and logs record)."""
        return asdict(self)

    def sample(self, model: Model, diffusion: GaussianDiffusion, shape, **kwargs) -> torch.Tensor:
        """``sample`` with these settings (``noise``, ``generator``, ``device``, ``progress``)."""
        settings = self.config()
        return sample(model, diffusion, shape, sampler=settings.pop("name"), **settings,
                      **kwargs)


def _params(model):
    return model.parameters() if hasattr(model, "parameters") else iter(())
