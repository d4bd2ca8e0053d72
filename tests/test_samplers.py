"""Samplers: respacing keeps the marginals, DDPM/DDIM recover known distributions."""

import numpy as np
import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion
from ddpm_lightning.samplers import check_settings, respace, sample, timestep_subsequence
from ddpm_lightning.schedules import make_beta_schedule

S = 0.5  # data x0 ~ N(0, S²)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(make_beta_schedule("linear", 1000))


def optimal_eps(diffusion):
    """E[ε | x_t] for Gaussian data N(0, S²): the best possible ε-predictor, in closed form."""
    abar = diffusion.alphas_cumprod

    def model(x_t, t):
        a = abar.to(x_t.device)[t].to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return torch.sqrt(1 - a) / (a * S**2 + 1 - a) * x_t

    return model


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("steps", [1, 10, 100, 1000])
def test_timestep_subsequence(steps, spacing):
    seq = timestep_subsequence(1000, steps, spacing)
    assert len(seq) == steps and np.all(np.diff(seq) > 0) and seq[0] >= 0 and seq[-1] <= 999
    if spacing == "uniform":
        assert seq[-1] == 999
    if spacing == "quadratic" and steps == 100:
        assert np.diff(seq)[0] < np.diff(seq)[-1]  # dense near t = 0


def test_respacing_recomputes_betas_so_marginals_match(diffusion):
    seq = timestep_subsequence(1000, 50)
    chain = respace(diffusion, seq)
    assert chain.num_timesteps == 50
    np.testing.assert_allclose(chain.alphas_cumprod.numpy(), diffusion.alphas_cumprod.numpy()[seq],
                               rtol=1e-12)
    # and its betas are not simply the original betas at the kept steps
    assert not np.allclose(chain.betas.numpy(), diffusion.betas.numpy()[seq])


def exact_std(abar_all, seq, sampler="ddpm", variance="large", eta=0.0):
    """The exact std of the samples for N(0, S²) data: every step is linear in x plus
    independent Gaussian noise, so the variance propagates in closed form (float64)."""
    abar = [float(abar_all[s]) for s in seq]
    var = 1.0
    for i in reversed(range(len(abar))):
        a, a_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
        c = np.sqrt(a) * S**2 / (a * S**2 + 1 - a)  # x̂_0 = c·x_t
        e = np.sqrt(1 - a) / (a * S**2 + 1 - a)  # ε̂ = e·x_t
        if sampler == "ddpm":
            beta = 1 - a / a_prev
            m = beta * np.sqrt(a_prev) / (1 - a) * c + (1 - a_prev) * np.sqrt(1 - beta) / (1 - a)
            noise = beta * (1 - a_prev) / (1 - a) if variance == "small" else beta
        else:
            noise = eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            m = np.sqrt(a_prev) * c + np.sqrt(1 - a_prev - noise) * e
        var = m**2 * var + (noise if i > 0 else 0.0)
    return np.sqrt(var)


@pytest.mark.parametrize("kwargs", [
    dict(sampler="ddpm", variance="large"),
    dict(sampler="ddpm", steps=20, variance="small"),
    dict(sampler="ddpm", steps=20, variance="large"),
    dict(sampler="ddim", steps=20, eta=0.0),
    dict(sampler="ddim", steps=50, eta=1.0, spacing="quadratic"),
])
def test_samplers_match_the_closed_form_on_gaussian_data(diffusion, kwargs):
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x = sample(optimal_eps(diffusion), diffusion, (n, 1, 1, 1), clip_denoised=False,
               generator=g, device="cpu", **kwargs)
    seq = timestep_subsequence(1000, kwargs.get("steps") or 1000, kwargs.get("spacing", "uniform"))
    want = exact_std(diffusion.alphas_cumprod.numpy(), seq, kwargs["sampler"],
                     kwargs.get("variance", "large"), kwargs.get("eta", 0.0))
    assert abs(x.mean().item()) < 4 * want / np.sqrt(n)
    assert x.std().item() == pytest.approx(want, rel=0.03)
    if kwargs.get("steps") in (None, 1000) or kwargs.get("steps", 0) >= 50:
        assert want == pytest.approx(S, rel=0.1)  # fine chains recover the data's std


def test_respaced_ddpm_is_not_pure_noise(diffusion):
    """The known bug: skipping timesteps without recomputing betas leaves noise behind."""
    g = torch.Generator().manual_seed(1)
    x = sample(optimal_eps(diffusion), diffusion, (20_000, 1, 1, 1), steps=10,
               clip_denoised=False, generator=g, device="cpu")
    want = exact_std(diffusion.alphas_cumprod.numpy(), timestep_subsequence(1000, 10))
    assert x.std().item() == pytest.approx(want, rel=0.03)
    assert x.std().item() < 0.7  # pure noise would have std ≈ 1


def test_same_generator_same_samples(diffusion):
    model = optimal_eps(diffusion)
    a = sample(model, diffusion, (3, 1, 2, 2), steps=5, generator=torch.Generator().manual_seed(3),
               device="cpu")
    b = sample(model, diffusion, (3, 1, 2, 2), steps=5, generator=torch.Generator().manual_seed(3),
               device="cpu")
    assert torch.equal(a, b)


@pytest.mark.parametrize("settings, match", [
    ({"steps": 1001}, r"sampler.steps=1001"),
    ({"steps": 0}, r"sampler.steps=0"),
    ({"eta": -0.5}, r"sampler.eta=-0.5"),
    ({"name": "euler"}, r"sampler.name='euler'"),
    ({"spacing": "log"}, r"sampler.spacing='log'"),
    ({"variance": "medium"}, r"sampler.variance='medium'"),
    ({"bogus": 1}, r"sampler.bogus is not a sampler setting"),
])
def test_bad_sampler_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        check_settings(settings, 1000)
