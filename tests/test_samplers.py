"""Samplers: respacing keeps the marginals, DDPM/DDIM recover known distributions."""

import numpy as np
import pytest
import torch

from ddpm_lightning.core.diffusion import GaussianDiffusion
from ddpm_lightning.core.samplers import SamplerSettings, respace, sample, timestep_subsequence
from ddpm_lightning.core.schedules import make_beta_schedule

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


def _ddim_code(T, S, kind):
    """The DDIM paper's released code (ermongroup/ddim, runners/diffusion.py), spelled out."""
    if kind == "uniform":
        return list(range(0, T, T // S))
    return [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), S) ** 2)]


@pytest.mark.parametrize("steps", [10, 50, 100])
def test_spacings_are_pinned(steps):
    T = 1000
    for kind in ("uniform", "quadratic"):
        assert timestep_subsequence(T, steps, kind).tolist() == _ddim_code(T, steps, kind)
    k = T // steps
    assert timestep_subsequence(T, steps, "uniform").tolist()[:3] == [0, k, 2 * k]
    assert timestep_subsequence(T, steps, "leading").tolist() == [i * k for i in range(steps)]
    assert timestep_subsequence(T, steps, "trailing").tolist() == \
        [T - 1 - i * k for i in range(steps)][::-1]
    lin = timestep_subsequence(T, steps, "linspace").tolist()
    assert lin == [round(i * (T - 1) / (steps - 1)) for i in range(steps)]
    quad = timestep_subsequence(T, steps, "quadratic_rounded")
    assert quad[-1] == round(0.8 * (T - 1)) and np.all(np.diff(quad) > 0) and len(quad) == steps


def test_pinned_spacing_values():
    """A few hand-checked values, independent of the formulas above."""
    assert timestep_subsequence(1000, 10, "quadratic").tolist() == \
        [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    assert timestep_subsequence(1000, 10, "trailing").tolist() == \
        [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert timestep_subsequence(1000, 10, "linspace").tolist() == \
        [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    # a stride T/S that is not an integer: trailing rounds (diffusers' rule), it does not floor
    assert timestep_subsequence(1000, 3, "trailing").tolist() == [332, 666, 999]
    assert timestep_subsequence(50, 7, "trailing").tolist() == [6, 13, 20, 28, 35, 42, 49]
    assert timestep_subsequence(1000, 100, "quadratic").tolist()[:8] == [0, 0, 0, 0, 1, 2, 2, 3]
    # today's quadratic (now quadratic_rounded) and DDIM's differ in 42 of 100 steps
    a = timestep_subsequence(1000, 100, "quadratic")
    b = timestep_subsequence(1000, 100, "quadratic_rounded")
    assert int((a != b).sum()) > 30


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
    x = sample(optimal_eps(diffusion), diffusion, (n, 1, 1, 1), clip="none",
               generator=g, device="cpu", **kwargs)
    seq = np.unique(timestep_subsequence(1000, kwargs.get("steps") or 1000,
                                         kwargs.get("spacing", "trailing")))
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
               clip="none", generator=g, device="cpu")
    want = exact_std(diffusion.alphas_cumprod.numpy(), timestep_subsequence(1000, 10, "trailing"))
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
    ({"clip": "hard"}, r"sampler.clip='hard'"),
    ({"name": "dpm_solver", "order": 3}, r"sampler.order=3"),
    ({"name": "dpm_solver", "sde": "yes"}, r"sampler.sde='yes'"),
    ({"name": "dpm_solver", "variance": "small"}, r"sampler.variance='small' does not apply"),
    ({"variance": "medium"}, r"sampler.variance='medium'"),
    ({"bogus": 1}, r"sampler.bogus is not a sampler setting"),
    ({"eta": True}, r"sampler.eta=True is invalid"),
])
def test_bad_sampler_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        SamplerSettings.parse(settings, 1000)


def test_sampler_settings_overrides_and_defaults():
    base = SamplerSettings.parse({"name": "ddpm", "variance": "small", "steps": None}, 1000,
                                 key="module.sampler")
    assert base == SamplerSettings(variance="small")  # null = the default
    # a null override keeps the base's value; the merged settings are checked as a whole
    grid = base.updated({"steps": 20, "variance": None}, 1000)
    assert grid.steps == 20 and grid.variance == "small"
    with pytest.raises(ValueError, match=r"^callbacks.fid.sampler.variance='small' does not"):
        base.updated({"name": "dpm_solver"}, 1000, key="callbacks.fid.sampler")
    with pytest.raises(ValueError, match=r"callbacks.x.sampler.steps=51 is invalid.*T=50"):
        base.updated({"steps": 51}, 50, key="callbacks.x.sampler")
    assert SamplerSettings.parse(grid.config(), 1000) == grid  # the config form round-trips


def test_sampler_settings_sample_is_sample():
    d = GaussianDiffusion(make_beta_schedule("linear", 50))
    net = lambda x, t: 0.1 * x  # noqa: E731
    settings = SamplerSettings.parse({"name": "ddim", "steps": 5, "eta": 0.5}, 50)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = settings.sample(net, d, None, noise=x_T, generator=torch.Generator().manual_seed(1))
    b = sample(net, d, None, sampler="ddim", steps=5, eta=0.5, noise=x_T,
               generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def _gaussian_flow(diffusion, seq, x_T):
    """What an exact probability-flow ODE solve from seq[-1] down to seq[0], followed by the
    final step to σ = 0 (x̂_0 at seq[0]), gives for N(0, S²) data: the flow scales x by the
    ratio of the marginal stds, and x̂_0 = √ᾱ S² / (ᾱ S² + 1 − ᾱ) · x."""
    abar = diffusion.alphas_cumprod.numpy()
    var = lambda t: abar[t] * S**2 + 1 - abar[t]  # noqa: E731
    lo, hi = seq[0], seq[-1]
    return x_T * np.sqrt(var(lo) / var(hi)) * np.sqrt(abar[lo]) * S**2 / var(lo)


def test_dpm_solver_tracks_the_probability_flow_ode_at_its_order(diffusion):
    """With the exact ε of Gaussian data the error against the exact flow falls by about 2^k
    when the steps double, k = the order (measured: order 1 ×1.9, order 2 ×3.2 from 160 to
    320 steps); order 1 is DDIM (η = 0) exactly."""
    x_T = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).view(-1, 1, 1, 1)
    errors = {1: [], 2: []}
    for steps in (80, 160, 320):
        seq = np.unique(timestep_subsequence(1000, steps, "trailing"))
        want = _gaussian_flow(diffusion, seq, x_T.numpy())
        for order in (1, 2):
            x = sample(optimal_eps(diffusion), diffusion, None, sampler="dpm_solver",
                       steps=steps, order=order, clip="none", noise=x_T, device="cpu")
            errors[order].append(float(np.abs(x.numpy() - want).max()))
        ddim = sample(optimal_eps(diffusion), diffusion, None, sampler="ddim", steps=steps,
                      clip="none", noise=x_T, device="cpu")
        first = sample(optimal_eps(diffusion), diffusion, None, sampler="dpm_solver",
                       steps=steps, order=1, clip="none", noise=x_T, device="cpu")
        torch.testing.assert_close(first, ddim, rtol=0, atol=1e-12)
    ratio = {k: [a / b for a, b in zip(e, e[1:])] for k, e in errors.items()}
    assert 1.8 < ratio[1][-1] < 2.2, errors
    assert ratio[2][-1] > 2.8 and ratio[2][0] > 2.0, errors
    assert errors[2][-1] < 2e-3 and errors[2][-1] < errors[1][-1] / 5, errors


def test_sde_dpm_solver_matches_the_closed_form_std(diffusion):
    """SDE-DPM-Solver++ on N(0, S²) data: at 200 steps the samples have the data's std
    (measured: 0.487 at 20 steps, 0.518 at 50, 0.501 at 200, for S = 0.5)."""
    g = torch.Generator().manual_seed(0)
    x = sample(optimal_eps(diffusion), diffusion, (20_000, 1, 1, 1), sampler="dpm_solver",
               steps=200, sde=True, clip="none", generator=g, device="cpu")
    assert x.std().item() == pytest.approx(S, rel=0.015)
    assert abs(x.mean().item()) < 4 * S / np.sqrt(20_000)


def _tiny_net(diffusion):
    """A fixed network whose samples stay O(1): the Gaussian-data optimum plus a nonlinear,
    t-dependent convolution."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
    best = optimal_eps(diffusion)

    def net(x, t):
        x = x.double()
        return best(x, t) + 0.1 * torch.tanh(conv(x)) * (1 + t.double().view(-1, 1, 1, 1) / 1000)
    return net


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("sde", [False, True], ids=["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("steps", [10, 25])
def test_dpm_solver_matches_diffusers(diffusion, sde, steps, final):
    """Golden: diffusers' DPMSolverMultistepScheduler (order 2, midpoint), same network, same
    x_T and, for the SDE, the same noise (diffusers draws it in float32, so float32 here)."""
    diffusers = pytest.importorskip("diffusers")
    net = _tiny_net(diffusion)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=diffusion.betas.numpy(), solver_order=2,
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", timestep_spacing="trailing",
        final_sigmas_type=final, lower_order_final=True)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(2)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((2,), int(t), dtype=torch.long)
            x = sched.step(net(x, tt), t, x, generator=g).prev_sample
    ours = sample(lambda x, t: net(x, t).float(), diffusion, None, sampler="dpm_solver",
                  steps=steps, sde=sde, clip="none", final=final, noise=x_T,
                  generator=torch.Generator().manual_seed(2), device="cpu")
    assert x.abs().max() > 0.5  # not a trivial output
    assert (ours - x).abs().max().item() < 1e-4


@pytest.mark.parametrize("sde", [False, pytest.param(True, marks=pytest.mark.slow)])  # 24 s each
def test_dpm_solver_keeps_one_earlier_prediction_alive_whatever_the_step_count(diffusion, sde):
    """Memory does not grow with the step count: the network counts, at every call, the live
    tensors of the sample's shape (x_t, the last x̂_0 and the step's temporaries). A sampler that
    kept every step's x̂_0 would hold one more per step."""
    import gc
    import warnings

    shape = (2, 1, 4, 4)
    base = optimal_eps(diffusion)
    counts = []

    def model(x_t, t):
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
            warnings.simplefilter("ignore")
            counts.append(sum(1 for o in gc.get_objects()
                              if isinstance(o, torch.Tensor) and tuple(o.shape) == shape))
        return base(x_t, t)

    sample(model, diffusion, shape, sampler="dpm_solver", steps=40, sde=sde,
           generator=torch.Generator().manual_seed(0))
    assert len(counts) == 40
    assert max(counts[1:]) == min(counts[1:]), counts  # the first call precedes any x̂_0
