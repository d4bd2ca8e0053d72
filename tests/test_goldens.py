"""Tests that a plausible bug makes fail: EMA direction and decay, the warm-up lr, the hybrid
loss's gradient and factor, x̂₀ handling in DDIM, and goldens against diffusers' DDPMScheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_lightning.core.diffusion import GaussianDiffusion
from ddpm_lightning.core.samplers import denoise
from ddpm_lightning.core.schedules import make_beta_schedule
from ddpm_lightning.core.unet import UNet
from ddpm_lightning.training.module import DDPM


def _net(out_channels=1):
    torch.manual_seed(0)
    return UNet(in_channels=1, out_channels=out_channels, ch=32, ch_mult=(1, 2),
                num_res_blocks=1, attn_resolutions=(4,), image_size=8, dropout=0.0)


def test_ema_moves_toward_the_weights_by_one_minus_decay():
    module = DDPM(_net(), make_beta_schedule("linear", 10), ema_decay=0.9, warmup_steps=0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)  # the raw weights move; the EMA copy has the old ones
    old = [p.clone() for p in module.ema_model.parameters()]
    module.update_ema()
    for e, o, p in zip(module.ema_model.parameters(), old, module.model.parameters()):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * p)  # θ_ema ← d·θ_ema + (1 − d)·θ


def test_warmup_lr_is_linear_then_constant():
    module = DDPM(_net(), make_beta_schedule("linear", 10), lr=2e-4, warmup_steps=4)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, [0, 5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4, 2e-4], rtol=1e-12)


def test_hybrid_bound_term_trains_only_the_variance_with_weight_lambda_T():
    net = _net(out_channels=2)
    T, lam = 10, 1e-3
    d = GaussianDiffusion(make_beta_schedule("linear", T), variance="learned_range",
                          objective="hybrid", hybrid_lambda=lam)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([0, 3, 6, 9])
    out = net(d.q_sample(x0, t, noise), t).detach().requires_grad_(True)
    hybrid, _ = d.training_loss(lambda x, s: out, x0, t=t, noise=noise)
    mse = ((out[:, :1] - noise) ** 2).mean(dim=(1, 2, 3))
    vb = d._vb_terms_bpd(None, x0, d.q_sample(x0, t, noise), t,
                         output=torch.cat([out[:, :1].detach(), out[:, 1:]], 1),
                         clip_denoised=False)
    torch.testing.assert_close(hybrid, mse + lam * T * vb)  # the factor is exactly λ·T
    (hybrid - mse).sum().backward()  # the bound term alone
    assert out.grad[:, :1].abs().max() == 0  # no gradient into the mean channels
    assert out.grad[:, 1:].abs().max() > 0  # but into v


def test_ddim_clip_modes_follow_their_formulas():
    d = GaussianDiffusion(make_beta_schedule("linear", 1000))
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.full((3,), 990)
    eps_hat = 0.9 * x  # the shrunk ε̂ of an under-trained model (README, Samplers)
    net = lambda x_t, s: eps_hat  # noqa: E731
    raw_x0 = d.predict_x0_from_eps(x, t, eps_hat)
    assert raw_x0.abs().max() > 1  # clipping matters here
    none = denoise(d, net, x, t, clip="none")
    torch.testing.assert_close(none["pred_x0"], raw_x0)
    torch.testing.assert_close(none["pred_eps"], eps_hat)
    rederive = denoise(d, net, x, t, clip="rederive")
    torch.testing.assert_close(rederive["pred_x0"], raw_x0.clamp(-1, 1))
    torch.testing.assert_close(rederive["pred_eps"],
                               d.predict_eps_from_x0(x, t, raw_x0.clamp(-1, 1)))
    raw = denoise(d, net, x, t, clip="raw_eps")
    torch.testing.assert_close(raw["pred_x0"], raw_x0.clamp(-1, 1))
    torch.testing.assert_close(raw["pred_eps"], eps_hat)
    dyn = denoise(d, net, x, t, clip="dynamic")
    s = torch.quantile(raw_x0.flatten(1).abs(), 0.995, dim=1).clamp(min=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(dyn["pred_x0"], raw_x0.clamp(-s, s) / s)
    assert not torch.allclose(rederive["pred_eps"], raw["pred_eps"])


diffusers = pytest.importorskip("diffusers", reason="diffusers (the dev extra) is not installed")


@pytest.fixture(scope="module")
def pair():
    betas = make_beta_schedule("linear", 1000)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, trained_betas=betas,
                                    variance_type="fixed_small", clip_sample=True)
    return GaussianDiffusion(betas, variance="fixed_small"), sched


def test_add_noise_equals_q_sample(pair):
    d, sched = pair
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(sched.add_noise(x0, noise, t), d.q_sample(x0, t, noise))


def test_posterior_variance_equals_diffusers(pair):
    d, sched = pair
    sched.set_timesteps(1000)
    for t in (1, 2, 10, 500, 999):  # diffusers clamps t = 0 to 1e-20; we use β̃ at t = 1 in logs
        # diffusers works in float32: up to 1.1e-4 relative at small t, where 1 − ᾱ is small
        assert sched._get_variance(t) == pytest.approx(d.posterior_variance[t].item(), rel=5e-4)


def test_one_ddpm_step_equals_diffusers(pair):
    d, sched = pair
    sched.set_timesteps(1000)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in (999, 500, 10):
        tt = torch.full((2,), t)
        ours = d.p_mean_variance(lambda *_: eps, x, tt, variance="small", clip_denoised=True)
        want = ours["mean"] + torch.exp(0.5 * ours["log_variance"]) * z
        got = sched.step(eps, t, x, generator=torch.Generator().manual_seed(2))  # draws the same z
        torch.testing.assert_close(got.prev_sample, want, rtol=1e-5, atol=1e-5)
