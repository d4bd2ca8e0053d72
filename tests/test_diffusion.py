"""The diffusion math against closed forms and golden numbers."""

import math

import numpy as np
import paper_bound
import pytest
import torch

from ddpm_lightning.core.diffusion import GaussianDiffusion
from ddpm_lightning.core.losses import discretized_gaussian_log_likelihood, normal_kl
from ddpm_lightning.core.schedules import make_beta_schedule


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(make_beta_schedule("linear", 1000))


def _t(i, n=1):
    return torch.full((n,), i, dtype=torch.long)


# Golden numbers: the linear schedule in 50-digit decimal arithmetic (0-indexed t).
GOLDEN = {  # t: (ᾱ_t, β̃_t)
    0: (9.999000000000000e-01, 0.0),
    1: (9.997800920720721e-01, 5.453187661302605e-05),
    10: (9.978065725078461e-01, 2.584636204081056e-04),
    100: (8.951415908975369e-01, 2.054553529969664e-03),
    487: (8.858573232059309e-02, 9.791571985690042e-03),
    999: (4.035829765375684e-05, 1.999998352656061e-02),
}


@pytest.mark.parametrize("t", sorted(GOLDEN))
def test_golden_alphas_cumprod_and_posterior_variance(diffusion, t):
    abar, post_var = GOLDEN[t]
    assert diffusion.alphas_cumprod.dtype == torch.float64
    assert diffusion.alphas_cumprod[t].item() == pytest.approx(abar, rel=1e-12)
    assert diffusion.posterior_variance[t].item() == pytest.approx(post_var, rel=1e-10, abs=1e-18)


def test_log_variances_at_t0_follow_the_original_code(diffusion):
    beta_tilde_1 = diffusion.posterior_variance[1].item()
    assert diffusion.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(beta_tilde_1))
    assert diffusion.large_log_variance[0].item() == pytest.approx(math.log(beta_tilde_1))
    assert diffusion.large_log_variance[5].item() == pytest.approx(math.log(diffusion.betas[5].item()))


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_empirical_moments(diffusion, t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.tensor([-0.8, 0.0, 0.5]).view(1, 3, 1, 1).expand(200_000, 3, 1, 1)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = diffusion.q_sample(x0.double(), _t(t, x0.shape[0]), noise)
    abar = diffusion.alphas_cumprod[t].item()
    mean = xt.mean(0).flatten()
    var = xt.var(0).flatten()
    expected_mean = math.sqrt(abar) * torch.tensor([-0.8, 0.0, 0.5], dtype=torch.float64)
    assert torch.allclose(mean, expected_mean, atol=5 * math.sqrt((1 - abar) / 200_000) + 1e-12)
    assert torch.allclose(var, torch.full_like(var, 1 - abar), rtol=0.02, atol=1e-9)


def test_posterior_matches_bayes_rule(diffusion):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of Gaussians in x_{t-1}."""
    for t in (1, 2, 50, 500, 999):
        abar_prev = diffusion.alphas_cumprod[t - 1].item()
        beta = diffusion.betas[t].item()
        x0 = torch.tensor([[0.3]], dtype=torch.float64).view(1, 1, 1, 1)
        xt = torch.tensor([[-0.7]], dtype=torch.float64).view(1, 1, 1, 1)
        # q(x_t | x_{t-1}) = N(√(1-β) x_{t-1}, β): as a Gaussian in x_{t-1}, precision (1-β)/β
        prec1, m1 = (1 - beta) / beta, xt.item() / math.sqrt(1 - beta)
        # q(x_{t-1} | x_0) = N(√ᾱ_{t-1} x_0, 1 - ᾱ_{t-1})
        prec2, m2 = 1 / (1 - abar_prev), math.sqrt(abar_prev) * x0.item()
        var = 1 / (prec1 + prec2)
        mean = var * (prec1 * m1 + prec2 * m2)
        got_mean, got_var, got_logvar = diffusion.q_posterior_mean_variance(x0, xt, _t(t))
        assert got_mean.item() == pytest.approx(mean, rel=1e-9)
        assert got_var.item() == pytest.approx(var, rel=1e-9)
        assert got_logvar.item() == pytest.approx(math.log(var), rel=1e-9)


def test_normal_kl_closed_form():
    m = torch.randn(100, dtype=torch.float64)
    lv = torch.randn(100, dtype=torch.float64)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(100, dtype=torch.float64))
    m2, lv2 = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    s1, s2 = torch.exp(0.5 * lv), torch.exp(0.5 * lv2)
    expected = torch.log(s2 / s1) + (s1**2 + (m - m2) ** 2) / (2 * s2**2) - 0.5
    assert torch.allclose(normal_kl(m, lv, m2, lv2), expected)
    # against torch.distributions, independently
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, s1), torch.distributions.Normal(m2, s2)
    )
    assert torch.allclose(normal_kl(m, lv, m2, lv2), ref)


@pytest.mark.parametrize("mean, log_scale", [(0.0, math.log(0.1)), (0.9, math.log(0.02)),
                                             (-1.3, 0.5), (0.37, math.log(1e-3))])
def test_discretized_likelihood_sums_to_one(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    means = torch.full_like(bins, mean)
    logp = discretized_gaussian_log_likelihood(bins, means, torch.full_like(bins, log_scale))
    assert torch.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_prior_term_is_the_closed_form_kl_to_the_standard_normal(diffusion):
    """L_T = KL(N(√ᾱ_T x_0, 1 − ᾱ_T) ‖ N(0, 1)) / ln 2 per pixel, ≈ ᾱ_T·E[x²]/(2 ln 2) ≈ 9.7e-6 here."""
    x0 = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lt = diffusion.prior_bpd(x0)
    assert lt.shape == (64,)
    a = GOLDEN[999][0]  # ᾱ_T in 50-digit arithmetic
    x = x0.double()
    want = (0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x**2)).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(lt.double(), want, rtol=1e-4, atol=0)
    assert lt.mean().item() == pytest.approx(9.70e-6, rel=0.01)


def _oracle(diffusion, x0, noise):
    """A network that knows x_0 and ε, so it returns the true ε for any t."""
    def model(x_t, t):
        return noise
    return model


@pytest.mark.parametrize("t", [0, 1, 300, 999])
def test_oracle_eps_gives_true_posterior_mean(diffusion, t):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    tt = _t(t, 4)
    xt = diffusion.q_sample(x0, tt, noise)
    out = diffusion.p_mean_variance(_oracle(diffusion, x0, noise), xt, tt, variance="small")
    true_mean, true_var, _ = diffusion.q_posterior_mean_variance(x0, xt, tt)
    assert torch.allclose(out["pred_x0"], x0, atol=1e-8)
    assert torch.allclose(out["mean"], true_mean, atol=1e-8)
    assert torch.allclose(out["variance"], true_var)
    large = diffusion.p_mean_variance(_oracle(diffusion, x0, noise), xt, tt, variance="large")
    expected = diffusion.posterior_variance[1] if t == 0 else diffusion.betas[t]
    assert torch.allclose(large["variance"], expected.expand_as(x0))


def test_predict_x0_from_eps_inverts_q_sample(diffusion):
    x0 = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (8,))
    xt = diffusion.q_sample(x0, t, eps)
    assert torch.allclose(diffusion.predict_x0_from_eps(xt, t, eps), x0, atol=1e-6)
    assert torch.allclose(diffusion.predict_eps_from_x0(xt, t, x0), eps, atol=1e-6)


def test_training_loss_is_l_simple(diffusion):
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (16,))

    def model(x_t, tt):
        return torch.zeros_like(x_t)

    loss, t_out = diffusion.training_loss(model, x0, t=t, noise=noise)
    assert torch.equal(t_out, t)
    assert torch.allclose(loss, (noise**2).mean(dim=(1, 2, 3)))
    loss, t_drawn = diffusion.training_loss(model, x0)
    assert loss.shape == (16,) and t_drawn.shape == (16,)
    assert t_drawn.min() >= 0 and t_drawn.max() < 1000


def test_uniform_timesteps_cover_the_range():
    d = GaussianDiffusion(make_beta_schedule("linear", 10))
    t = d.sample_timesteps(20_000, "cpu", torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10).double()
    assert counts.numel() == 10 and (counts / 20_000 - 0.1).abs().max() < 0.01


# Bin centres that reach both edge bins, and a fixed ε: two 1×2×2 images.
_PIXELS = [0, 255, 3, 100, 128, 200, 17, 250]


def _bound_inputs():
    x0 = torch.tensor([k / 127.5 - 1 for k in _PIXELS], dtype=torch.float64).view(2, 1, 2, 2)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return x0, eps


def _eps_net(x_t, t):
    """A fixed, non-trivial ε̂(x_t, t), written once for torch and once for the reference."""
    return torch.tanh(x_t) * (0.3 + 0.07 * t.view(-1, 1, 1, 1)) + 0.1


def _eps_net_ref(x_t, t):
    return [math.tanh(x) * (0.3 + 0.07 * t) + 0.1 for x in x_t]


# bits/dim of each image under _eps_net, from paper_bound.py (T = 10, β from 1e-4 to 0.2).
GOLDEN_BPD = {"fixed_large": (6.71466, 8.22853), "fixed_small": (61.1594, 135.2141)}


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_bits_per_dim_equals_the_paper_bound_computed_independently(variance):
    """Every term, the prior and the total against a float64 re-derivation from the paper's
    formulas (tests/paper_bound.py), and against a golden total for this network and input."""
    betas = paper_bound.linear_betas(10, 1e-4, 0.2)
    np.testing.assert_allclose(make_beta_schedule("linear", 10, beta_end=0.2), betas, rtol=1e-12)
    d = GaussianDiffusion(make_beta_schedule("linear", 10, beta_end=0.2), variance=variance)
    x0, eps = _bound_inputs()
    out = d.bits_per_dim(_eps_net, x0, clip_denoised=False, noise=eps)
    for i in range(2):
        prior, terms = paper_bound.bound_terms(betas, x0[i].flatten().tolist(),
                                               eps[i].flatten().tolist(), _eps_net_ref,
                                               variance=variance)
        np.testing.assert_allclose(out["terms"][i].numpy(), terms, rtol=1e-5, atol=1e-7)
        assert out["prior"][i].item() == pytest.approx(prior, rel=1e-6)
        assert out["total"][i].item() == pytest.approx(prior + sum(terms), rel=1e-6)
        assert out["total"][i].item() == pytest.approx(GOLDEN_BPD[variance][i], abs=1e-4)
    assert torch.allclose(out["total"], out["prior"] + out["vb"] + out["decoder"])


def test_devices_and_dtypes_follow_inputs(diffusion):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x0 = torch.zeros(2, 1, 2, 2, dtype=dtype)
        assert diffusion.q_sample(x0, _t(5, 2)).dtype == dtype


def test_invalid_options_are_named():
    b = make_beta_schedule("linear", 10)
    with pytest.raises(ValueError, match="diffusion.parameterization='w'"):
        GaussianDiffusion(b, parameterization="w")
    with pytest.raises(ValueError, match="diffusion.variance='huge'"):
        GaussianDiffusion(b, variance="huge")
    with pytest.raises(ValueError, match="trains no variance"):
        GaussianDiffusion(b, variance="learned", objective="simple")
    with pytest.raises(ValueError, match=r"schedule.betas\[0\]"):
        GaussianDiffusion(np.array([0.0, 0.1]))
