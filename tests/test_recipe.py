"""The newer recipe's parts against closed forms and diffusers: v-prediction (Salimans & Ho
2022), min-SNR-γ weighting (Hang et al. 2023) and zero-terminal-SNR schedules (Lin et al. 2024),
including every sampler and the bound at ᾱ_T = 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_lightning.core.diffusion import GaussianDiffusion, loss_weights
from ddpm_lightning.core.samplers import sample
from ddpm_lightning.core.schedules import make_beta_schedule, zero_terminal_snr

T = 1000


def _tensors(seed=0, shape=(6, 3, 4, 4), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    return x0, eps, t


# ------------------------------------------------------------------------ v-prediction


def test_velocity_equals_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    x0, eps, t = _tensors(dtype=torch.float32)
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear").get_velocity(x0, eps, t)
    d = GaussianDiffusion(make_beta_schedule("linear", T), parameterization="v")
    assert torch.allclose(d.velocity(x0, t, eps), theirs, atol=1e-6)


def test_x0_and_eps_recovered_from_v_in_float64():
    x0, eps, t = _tensors()
    for schedule in ("linear", "cosine"):
        d = GaussianDiffusion(make_beta_schedule(schedule, T), parameterization="v")
        x_t = d.q_sample(x0, t, eps)
        v = d.velocity(x0, t, eps)
        assert torch.allclose(d.predict_x0_from_v(x_t, t, v), x0, atol=1e-12)
        assert torch.allclose(d.predict_eps_from_v(x_t, t, v), eps, atol=1e-12)
        out = d.p_mean_variance(None, x_t, t, clip_denoised=False, output=v)
        assert torch.allclose(out["pred_x0"], x0, atol=1e-12)
        assert torch.allclose(out["pred_eps"], eps, atol=1e-10)


def test_v_training_loss_is_the_velocity_error():
    x0, eps, t = _tensors()
    d = GaussianDiffusion(make_beta_schedule("linear", T), parameterization="v")
    loss, _ = d.training_loss(lambda x, s: torch.zeros_like(x), x0, t=t, noise=eps)
    want = (d.velocity(x0, t, eps) ** 2).flatten(1).mean(1)
    assert torch.allclose(loss.double(), want, rtol=1e-6)


# ---------------------------------------------------------------------- min-SNR-γ


def test_snr_equals_diffusers_compute_snr():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    t = torch.tensor([0, 3, 100, 500, 999])
    theirs = compute_snr(DDPMScheduler(num_train_timesteps=T, beta_schedule="linear"), t)
    d = GaussianDiffusion(make_beta_schedule("linear", T))
    assert torch.allclose(d.snr[t].float(), theirs, rtol=5e-4)  # theirs: float32 ᾱ


def test_min_snr_weights_on_a_table_of_t():
    snr = np.array([1e4, 50.0, 5.0, 1.0, 0.01])
    g = 5.0
    np.testing.assert_allclose(loss_weights(snr, "eps", "min_snr", g), [5e-4, 0.1, 1, 1, 1])
    np.testing.assert_allclose(loss_weights(snr, "x0", "min_snr", g), [5, 5, 5, 1, 0.01])
    np.testing.assert_allclose(loss_weights(snr, "v", "min_snr", g),
                               [5 / 10001, 5 / 51, 5 / 6, 0.5, 0.01 / 1.01])
    assert (loss_weights(snr, "v", "none") == 1).all()


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_loss_is_min_snr_times_the_x0_error(parameterization):
    """For a prediction whose x̂_0 misses x_0 by δ, each parameterization's min-SNR-weighted
    loss equals min(SNR_t, γ)·mean(δ²): the weighting makes the three agree."""
    x0, eps, t = _tensors()
    d = GaussianDiffusion(make_beta_schedule("linear", T), parameterization=parameterization,
                          loss_weight="min_snr", min_snr_gamma=5.0)
    delta = 0.01 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3),
                               dtype=x0.dtype)
    x_t = d.q_sample(x0, t, eps)
    x0_hat = x0 + delta
    eps_hat = d.predict_eps_from_x0(x_t, t, x0_hat)
    output = {"eps": eps_hat, "x0": x0_hat, "v": d.velocity(x0_hat, t, eps_hat)}[parameterization]
    loss, _ = d.training_loss(lambda x, s: output, x0, t=t, noise=eps)
    snr = d.snr[t]
    want = torch.minimum(snr, torch.tensor(5.0, dtype=snr.dtype)) * (delta**2).flatten(1).mean(1)
    assert torch.allclose(loss.double(), want, rtol=1e-5)


def test_min_snr_refuses_what_it_cannot_weight():
    betas = make_beta_schedule("linear", 10)
    with pytest.raises(ValueError, match="loss_weight='min_snr'.*objective='vlb'"):
        GaussianDiffusion(betas, objective="vlb", loss_weight="min_snr")
    with pytest.raises(ValueError, match="parameterization='mu'"):
        GaussianDiffusion(betas, parameterization="mu", loss_weight="min_snr")
    with pytest.raises(ValueError, match="min_snr_gamma=0"):
        GaussianDiffusion(betas, loss_weight="min_snr", min_snr_gamma=0)


# ------------------------------------------------------------------ zero terminal SNR


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_equals_diffusers(schedule):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    betas = make_beta_schedule(schedule, T)
    ours = make_beta_schedule(schedule, T, rescale_zero_terminal_snr=True)
    theirs = rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(ours, zero_terminal_snr(betas))
    abar = np.cumprod(1 - ours)
    assert ours[-1] == 1.0 and abar[-1] == 0.0
    assert abar[0] == pytest.approx(1 - betas[0], rel=1e-12)  # √ᾱ_1 kept


def test_eps_prediction_is_refused_at_zero_terminal_snr():
    betas = make_beta_schedule("linear", 50, rescale_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="parameterization='eps' is undefined with a zero "
                                         "terminal SNR.*module.parameterization=v"):
        GaussianDiffusion(betas)
    with pytest.raises(ValueError, match=r"schedule.betas\[3\]=1 is outside"):
        GaussianDiffusion([0.1, 0.1, 0.1, 1.0, 0.1], parameterization="v")


def _point_oracle(d: GaussianDiffusion, target: torch.Tensor):
    """The exact v̂ for data that is one image: ε = (x_t − √ᾱ x*)/√(1 − ᾱ), v = √ᾱ ε − √(1−ᾱ) x*."""
    def net(x_t, t):
        a = d._extract("sqrt_alphas_cumprod", t, x_t)
        s = d._extract("sqrt_one_minus_alphas_cumprod", t, x_t)
        eps = (x_t - a * target) / s
        return a * eps - s * target
    return net


@pytest.mark.parametrize("kwargs", [
    dict(sampler="ddpm"),
    dict(sampler="ddpm", steps=10),
    dict(sampler="ddim", steps=10),
    dict(sampler="ddim", steps=10, eta=1.0),
    dict(sampler="dpm_solver", steps=10),
    dict(sampler="dpm_solver", steps=10, sde=True),
    dict(sampler="dpm_solver", steps=10, final="sigma_min"),
    dict(sampler="ddim", steps=10, spacing="linspace"),
    dict(sampler="ddim", steps=10, clip="rederive"),  # ε̂ re-derived from x̂_0 at ᾱ_T = 0
    dict(sampler="dpm_solver", steps=10, clip="dynamic"),
])
def test_every_sampler_reaches_the_data_at_zero_terminal_snr(kwargs):
    """A v-prediction network that is exact for one-image data: every sampler, starting at
    t = T where ᾱ_T = 0 (λ_T = −∞ for DPM-Solver++), ends on that image, with no NaN."""
    d = GaussianDiffusion(make_beta_schedule("linear", 100, rescale_zero_terminal_snr=True),
                          parameterization="v")
    target = torch.linspace(-0.8, 0.8, 16).reshape(1, 1, 4, 4).double()
    g = torch.Generator().manual_seed(0)
    x = sample(_point_oracle(d, target), d, (3, 1, 4, 4),
               noise=torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), generator=g,
               **{"clip": "none", **kwargs})
    assert torch.isfinite(x).all()
    # final=sigma_min stops at the training chain's t = 0, σ = √β_1 = 0.01 from the data
    tol = 0.06 if kwargs.get("final") == "sigma_min" else 1e-6
    assert torch.allclose(x, target.expand_as(x), atol=tol), (x - target).abs().max()


def test_the_bound_stays_valid_at_zero_terminal_snr():
    """ᾱ_T = 0: the prior term L_T is exactly 0, and every term of the bound is finite."""
    d = GaussianDiffusion(make_beta_schedule("linear", 20, rescale_zero_terminal_snr=True),
                          parameterization="v")
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1
    assert torch.equal(d.prior_bpd(x0), torch.zeros(2, dtype=torch.float64))
    out = d.bits_per_dim(lambda x, t: torch.zeros_like(x), x0)
    assert torch.isfinite(out["terms"]).all() and torch.isfinite(out["total"]).all()
