"""The stratified bits/dim estimator against the full variational bound."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.core.diffusion import GaussianDiffusion
from ddpm_lightning.core.likelihood import bits_per_dim_estimate, strata
from ddpm_lightning.core.pixels import to_model_range
from ddpm_lightning.core.schedules import make_beta_schedule


def test_strata_cover_every_kl_term_once():
    for T, k in [(1000, 1), (1000, 7), (1000, 999), (20, 3)]:
        s = strata(T, k)
        assert len(s) == k and s[0][0] == 1 and s[-1][1] == T
        assert all(a[1] == b[0] for a, b in zip(s, s[1:]))
        sizes = [hi - lo for lo, hi in s]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match=r"nll.num_timesteps=20 is invalid.*T − 1 = 19"):
        strata(20, 20)


def _setup():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 20))
    x0 = to_model_range(torch.randint(0, 256, (256, 1, 4, 4), dtype=torch.uint8))

    def net(x, t):  # an imperfect ε-predictor whose terms vary strongly with t
        return 0.8 * x + 0.01 * t.view(-1, 1, 1, 1)

    return diffusion, x0, net


def test_the_estimate_is_unbiased_and_cheaper():
    diffusion, x0, net = _setup()
    full = diffusion.bits_per_dim(net, x0)["total"]  # all 20 terms, fresh ε per term
    g = torch.Generator().manual_seed(1)
    reps = torch.stack([bits_per_dim_estimate(diffusion, net, x0, 3, g)["total"]
                        for _ in range(8)])  # 8 × 256 estimates with 4 calls each
    est, ref = reps.mean(), full.mean()
    se = (reps.var() / reps.numel() + full.var() / full.numel()).sqrt()
    assert abs(est - ref) < 4 * se, (est.item(), ref.item(), se.item())
    assert se / ref < 0.02  # a meaningful test: the error bar is tight


def test_more_strata_less_variance_and_the_parts_add_up():
    diffusion, x0, net = _setup()
    g = torch.Generator().manual_seed(2)
    one = bits_per_dim_estimate(diffusion, net, x0, 1, g)
    many = bits_per_dim_estimate(diffusion, net, x0, 19, g)
    assert many["vb"].var() < 0.5 * one["vb"].var()
    for out in (one, many):
        assert torch.allclose(out["total"], out["prior"] + out["vb"] + out["decoder"])
    exact = diffusion.bits_per_dim(net, x0)
    assert torch.allclose(many["prior"], exact["prior"])
