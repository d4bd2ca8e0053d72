"""The Gaussian diffusion of Ho et al. 2020, in the paper's notation, with no Lightning.

Indexing: the paper counts t = 1 … T; tensors here are 0-indexed, so ``t`` = 0 is the
paper's t = 1 (the decoder step, L_0) and ``t`` = T − 1 is the paper's t = T.

The network is passed into each call, never owned: ``model(x_t, t) -> output``. What the
output means is set by ``parameterization`` (ε, x_0, µ̃, or the velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x_0
of Salimans & Ho 2022) and, when the variance is learned, its second half of channels carries
the variance interpolation (see ``p_mean_variance``).

A schedule with a zero terminal SNR (ᾱ_T = 0, β_T = 1; ``schedules.zero_terminal_snr``) is
supported for every parameterization but ε, for which x̂_0 at t = T is undefined.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from ddpm_lightning.core.losses import (
    LN2,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from ddpm_lightning.core.schedules import validate_betas

Parameterization = Literal["eps", "x0", "mu", "v"]
Variance = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
Objective = Literal["simple", "vlb", "hybrid"]

PARAMETERIZATIONS = ("eps", "x0", "mu", "v")
LOSS_WEIGHTS = ("none", "min_snr")
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
OBJECTIVES = ("simple", "vlb", "hybrid")
_VARIANCE_ALIASES = {"small": "fixed_small", "large": "fixed_large"}

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is unknown; valid values: {', '.join(valid)}")


def normalize_variance(variance: str) -> str:
    """Map the short names "small"/"large" onto "fixed_small"/"fixed_large" and validate."""
    variance = _VARIANCE_ALIASES.get(variance, variance)
    _check_choice("diffusion.variance", variance, VARIANCES)
    return variance


def loss_weights(snr: np.ndarray, parameterization: str, loss_weight: str,
                 gamma: float = 5.0) -> np.ndarray:
    """The weight of each t's squared error. "none": 1. "min_snr" (Hang et al. 2023): the
    weight that turns the parameterization's error into min(SNR_t, γ)·‖x_0 − x̂_0‖², since
    ‖ε − ε̂‖² = SNR·‖x_0 − x̂_0‖², ‖v − v̂‖² = (SNR + 1)·‖x_0 − x̂_0‖²: min(SNR, γ)/SNR for ε,
    min(SNR, γ) for x_0, min(SNR, γ)/(SNR + 1) for v."""
    snr = np.asarray(snr, dtype=np.float64)
    if loss_weight == "none":
        return np.ones_like(snr)
    clipped = np.minimum(snr, gamma)
    if parameterization == "eps":
        return clipped / snr
    if parameterization == "x0":
        return clipped
    if parameterization == "v":
        return clipped / (snr + 1.0)
    raise ValueError(f"loss_weight={loss_weight!r} does not apply to "
                     f"parameterization={parameterization!r}")


class GaussianDiffusion:
    """Forward process q(x_t | x_0), reverse process p_θ(x_{t−1} | x_t), and their bound.

    Args:
        betas: β_1 … β_T (any sequence; validated and kept in float64).
        parameterization: what the network predicts: "eps" (ε, the paper's choice), "x0"
            (x_0), "mu" (the posterior mean µ̃_t) or "v" (the velocity √ᾱ_t ε − √(1 − ᾱ_t) x_0,
            Salimans & Ho 2022).
        variance: Σ_θ of the reverse process: "fixed_small" (σ² = β̃_t), "fixed_large"
            (σ² = β_t), "learned" (the network outputs log σ² directly) or "learned_range"
            (log σ² = v·log β_t + (1 − v)·log β̃_t, improved DDPM). Learned variances make the
            network output 2·C channels: the prediction, then v.
        objective: "simple" (L_simple, Algorithm 1), "vlb" (the term L_{t−1} of the true bound,
            in bits/dim, for the sampled t) or "hybrid" (L_simple + λ·T·L_{t−1} with the mean
            frozen in the bound term, improved DDPM).
        hybrid_lambda: λ of the hybrid objective (0.001 in improved DDPM).
        loss_weight: "none" (the paper's) or "min_snr" (Hang et al. 2023): each t's squared
            error is weighted so that the loss is min(SNR_t, γ)·‖x_0 − x̂_0‖², SNR_t =
            ᾱ_t/(1 − ᾱ_t): the weight is min(SNR, γ)/SNR for ε, min(SNR, γ) for x_0 and
            min(SNR, γ)/(SNR + 1) for v (``loss_weights``). It weights the squared error of
            the simple and hybrid objectives; the bound (vlb) is never weighted.
        min_snr_gamma: γ of min_snr (5 in the paper).
    """

    def __init__(
        self,
        betas,
        parameterization: Parameterization = "eps",
        variance: Variance = "fixed_large",
        objective: Objective = "simple",
        hybrid_lambda: float = 1e-3,
        loss_weight: str = "none",
        min_snr_gamma: float = 5.0,
    ):
        _check_choice("diffusion.parameterization", parameterization, PARAMETERIZATIONS)
        _check_choice("diffusion.loss_weight", loss_weight, LOSS_WEIGHTS)
        variance = normalize_variance(variance)
        _check_choice("diffusion.objective", objective, OBJECTIVES)
        learned = variance in ("learned", "learned_range")
        if learned and objective == "simple":
            raise ValueError(
                f"diffusion.variance={variance!r} with diffusion.objective='simple' trains no "
                "variance; use objective=hybrid or objective=vlb"
            )
        if not learned and objective == "hybrid":
            raise ValueError(
                f"diffusion.objective='hybrid' needs a learned variance, got "
                f"diffusion.variance={variance!r}; use learned or learned_range"
            )
        if not (math.isfinite(hybrid_lambda) and hybrid_lambda >= 0):
            raise ValueError(f"diffusion.hybrid_lambda={hybrid_lambda!r} must be finite and >= 0")
        self.parameterization = parameterization
        self.variance = variance
        self.objective = objective
        self.hybrid_lambda = float(hybrid_lambda)
        if isinstance(min_snr_gamma, bool) or not isinstance(min_snr_gamma, (int, float)) \
                or not (math.isfinite(min_snr_gamma) and min_snr_gamma > 0):
            raise ValueError(f"diffusion.min_snr_gamma={min_snr_gamma!r} must be finite and > 0")
        if loss_weight == "min_snr" and (objective == "vlb" or parameterization == "mu"):
            raise ValueError(
                "diffusion.loss_weight='min_snr' weights the squared error of ε, x_0 or v; "
                f"it does not apply to diffusion.objective={objective!r} with "
                f"diffusion.parameterization={parameterization!r}")
        self.loss_weight, self.min_snr_gamma = loss_weight, float(min_snr_gamma)

        b = validate_betas(betas)
        self.num_timesteps = T = len(b)
        a = 1.0 - b
        abar = np.cumprod(a)
        self.zero_terminal_snr = bool(abar[-1] == 0.0)
        if self.zero_terminal_snr and parameterization == "eps":
            raise ValueError(
                "diffusion.parameterization='eps' is undefined with a zero terminal SNR (ᾱ_T = 0: "
                "x̂_0 = (x_T − √(1 − ᾱ_T) ε̂)/√ᾱ_T divides by 0); use "
                "module.parameterization=v (or x0), or keep ε with "
                "schedule.rescale_zero_terminal_snr=false")
        abar_prev = np.append(1.0, abar[:-1])
        # β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t   (eq. 7)
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        # β̃ at the paper's t = 1 is 0; the original code replaces it by β̃_2 in logs.
        first = post_var[1] if T > 1 else b[0]
        tables = {
            "betas": b,
            "alphas": a,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
            "snr": abar / (1.0 - abar),  # ᾱ_t/(1 − ᾱ_t); 0 at a zero terminal SNR
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.append(first, post_var[1:])),
            "posterior_mean_coef1": b * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(a) / (1.0 - abar),
            # σ² = β_t ("fixed large"), with β̃ at the paper's t = 1 as in the original code.
            "large_variance": np.append(first, b[1:]),
            "large_log_variance": np.log(np.append(first, b[1:])),
            "log_betas": np.log(b),
        }
        with np.errstate(divide="ignore"):  # ᾱ_T = 0: these are inf there (never used: ε)
            tables["sqrt_recip_alphas_cumprod"] = np.sqrt(1.0 / abar)
            tables["sqrt_recipm1_alphas_cumprod"] = np.sqrt(1.0 / abar - 1.0)
        tables["loss_weights"] = loss_weights(tables["snr"], parameterization, loss_weight,
                                              self.min_snr_gamma)
        self._tables = {k: torch.from_numpy(v) for k, v in tables.items()}
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ----------------------------------------------------------------- tables
    def __getattr__(self, name: str) -> torch.Tensor:
        tables = self.__dict__.get("_tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        cache = self._device_cache.get(device)
        if cache is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            cache = {k: v.to(device=device, dtype=dtype) for k, v in self._tables.items()}
            self._device_cache[device] = cache
        return cache

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] reshaped to broadcast against x, in x's dtype and on x's device."""
        values = self._on(x.device)[name][t.to(x.device)]
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return values.to(dtype).reshape(-1, *([1] * (x.ndim - 1)))

    # -------------------------------------------------------- forward process
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        var = 1.0 - self._extract("alphas_cumprod", t, x0)
        log_var = self._extract("log_one_minus_alphas_cumprod", t, x0)
        return mean, var.expand_as(x0), log_var.expand_as(x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None):
        """Sample from q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε  (eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self._extract("sqrt_alphas_cumprod", t, x0) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean µ̃_t(x_t, x_0), variance β̃_t and clipped log β̃_t of q(x_{t−1} | x_t, x_0)
        (eqs. 6–7)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x0
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        var = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_var = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, log_var

    # ----------------------------------------------------- reparameterizations
    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        """x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, the inverse of eq. 4."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor):
        """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t) (defined at ᾱ_T = 0 too: ε = x_T)."""
        return (
            x_t - self._extract("sqrt_alphas_cumprod", t, x_t) * x0
        ) / self._extract("sqrt_one_minus_alphas_cumprod", t, x_t)

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022), the v-prediction target."""
        return (self._extract("sqrt_alphas_cumprod", t, x0) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0)

    def predict_x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
        """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def predict_eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor):
        """ε = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
        return (self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
                + self._extract("sqrt_alphas_cumprod", t, x_t) * v)

    def predict_x0_from_mu(self, x_t: torch.Tensor, t: torch.Tensor, mu: torch.Tensor):
        """Invert µ̃_t = coef1·x_0 + coef2·x_t for x_0."""
        return (
            mu - self._extract("posterior_mean_coef2", t, x_t) * x_t
        ) / self._extract("posterior_mean_coef1", t, x_t)

    # -------------------------------------------------------- reverse process
    @property
    def learned_variance(self) -> bool:
        return self.variance in ("learned", "learned_range")

    def split_output(self, output: torch.Tensor, x_t: torch.Tensor):
        """Split the network output into (prediction, v); v is None for fixed variances."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.learned_variance else channels
        if output.shape[1] != expected:
            raise ValueError(
                f"the network returned {output.shape[1]} channels for {channels}-channel input; "
                f"diffusion.variance={self.variance!r} needs out_channels={expected}"
            )
        if self.learned_variance:
            pred, v = output.split(channels, dim=1)
            return pred, v
        return output, None

    def p_mean_variance(
        self,
        model: Model,
        x_t: torch.Tensor,
        t: torch.Tensor,
        variance: str | None = None,
        clip_denoised: bool = True,
        output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mean and variance of p_θ(x_{t−1} | x_t), and the implied prediction of x_0.

        ``variance`` overrides the fixed choice at sampling time: "small" (σ² = β̃_t, log
        clipped at t = 0 to log β̃_1) or "large" (σ² = β_t, with β̃_1 at t = 0, as in the
        original code). Learned variances come from the network. ``clip_denoised`` clips the
        predicted x_0 to [−1, 1] before forming µ̃_t (not applicable to µ̃-prediction).
        ``output`` is a precomputed ``model(x_t, t)``, to skip the network call.

        Returns a dict with ``mean``, ``variance``, ``log_variance``, ``pred_x0`` and ``pred_eps``.
        """
        if output is None:
            output = model(x_t, t)
        pred, v = self.split_output(output, x_t)

        var_type = self.variance if variance is None else normalize_variance(variance)
        if self.learned_variance and var_type != self.variance:
            raise ValueError(
                f"variance={variance!r} cannot override the learned variance "
                f"diffusion.variance={self.variance!r}"
            )
        if var_type == "fixed_small":
            log_var = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
            var = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        elif var_type == "fixed_large":
            log_var = self._extract("large_log_variance", t, x_t).expand_as(x_t)
            var = self._extract("large_variance", t, x_t).expand_as(x_t)
        elif var_type == "learned":
            log_var = v
            var = torch.exp(log_var)
        else:  # learned_range: interpolate in log space between β̃_t and β_t
            lo = self._extract("posterior_log_variance_clipped", t, x_t)
            hi = self._extract("log_betas", t, x_t)
            log_var = v * hi + (1.0 - v) * lo
            var = torch.exp(log_var)

        def clip(x):
            return x.clamp(-1.0, 1.0) if clip_denoised else x

        if self.parameterization == "mu":
            mean = pred
            pred_x0 = clip(self.predict_x0_from_mu(x_t, t, pred))
        else:
            if self.parameterization == "eps":
                pred_x0 = clip(self.predict_x0_from_eps(x_t, t, pred))
            elif self.parameterization == "v":
                pred_x0 = clip(self.predict_x0_from_v(x_t, t, pred))
            else:
                pred_x0 = clip(pred)
            mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        pred_eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        return {
            "mean": mean,
            "variance": var,
            "log_variance": log_var,
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
        }

    # --------------------------------------------------------------- training
    def sample_timesteps(self, batch: int, device, generator=None) -> torch.Tensor:
        """t ~ Uniform({0, …, T − 1}) (the paper's t ~ Uniform({1, …, T}))."""
        return torch.randint(
            0, self.num_timesteps, (batch,), device=device, generator=generator
        )

    def training_loss(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample training loss and the timesteps drawn (Algorithm 1 for L_simple).

        simple:  ‖target − f_θ(x_t, t)‖², averaged over pixels, where the target is ε, x_0,
                 µ̃_t(x_t, x_0) or v according to the parameterization, times the min-SNR
                 weight of t with ``loss_weight="min_snr"``.
        vlb:     the bound term at t in bits/dim: KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)) for
                 t > 0 and −log p_θ(x_0|x_1) for t = 0 (equal to ``bits_per_dim``'s terms).
        hybrid:  simple + λ·T·vlb, with the mean frozen inside the vlb term, so that it trains
                 only the variance (improved DDPM's L_hybrid).
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t)
        pred, v = self.split_output(output, x_t)

        if self.objective == "vlb":
            return self._vb_terms_bpd(model, x0, x_t, t, output=output, clip_denoised=False), t

        if self.parameterization == "eps":
            target = noise
        elif self.parameterization == "x0":
            target = x0
        elif self.parameterization == "v":
            target = self.velocity(x0, t, noise)
        else:
            target, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
        loss = mean_flat((target.float() - pred.float()) ** 2)
        if self.loss_weight != "none":
            loss = loss * self._extract("loss_weights", t, loss)
        if self.objective == "hybrid":
            frozen = torch.cat([pred.detach(), v], dim=1)
            vb = self._vb_terms_bpd(model, x0, x_t, t, output=frozen, clip_denoised=False)
            loss = loss + self.hybrid_lambda * self.num_timesteps * vb
        return loss, t

    # ------------------------------------------------------- variational bound
    def _vb_terms_bpd(self, model, x0, x_t, t, output=None, clip_denoised=True):
        """L_{t−1} in bits/dim for each sample: the KL term for t > 0, the decoder for t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, output=output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / LN2
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        ) / LN2
        return torch.where(t == 0, nll, kl)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, per sample (no parameters)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / LN2

    @torch.no_grad()
    def bits_per_dim(
        self, model: Model, x0: torch.Tensor, clip_denoised: bool = True, progress: bool = False,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The negative log-likelihood bound of Table 1, in bits/dim, per sample.

        Evaluates every one of the T terms (one network call each) on ``x0`` in [−1, 1]:
        L = L_T + Σ_{t>1} L_{t−1} + L_0. Returns a dict of per-sample tensors: ``total``,
        ``prior`` (L_T), ``vb`` (Σ_{t>1} L_{t−1}), ``decoder`` (L_0) and ``terms`` ([B, T],
        column t holding the term at 0-indexed t). ``noise`` fixes the ε of every x_t (fresh
        ε per t by default); either way each term is an unbiased estimate.
        """
        T = self.num_timesteps
        terms = torch.zeros(x0.shape[0], T, device=x0.device, dtype=torch.float32)
        steps = range(T - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="bits/dim", total=T, leave=False)
        for i in steps:
            t = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, t, noise)
            terms[:, i] = self._vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip_denoised)
        prior = self.prior_bpd(x0).float()
        decoder = terms[:, 0]
        vb = terms[:, 1:].sum(dim=1)
        return {"total": prior + vb + decoder, "prior": prior, "vb": vb, "decoder": decoder,
                "terms": terms}
