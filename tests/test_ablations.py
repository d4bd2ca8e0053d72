"""Parameterizations, objectives and variances (Table 2), against closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import paper_bound
import pytest
import torch

from ddpm_lightning.core.diffusion import GaussianDiffusion
from ddpm_lightning.core.samplers import sample
from ddpm_lightning.core.schedules import make_beta_schedule
from ddpm_lightning.core.unet import UNet

from helpers import TINY, run_main, run_script

ROWS = [
    "mu_vlb_learned",
    "mu_vlb_fixed",
    "mu_mse",
    "eps_vlb_learned",
    "eps_vlb_fixed",
    "eps_simple",
]


def _data(seed=0, shape=(4, 1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return x0, torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("t", [0, 1, 250, 999])
def test_oracle_gives_the_same_posterior_mean_for_every_parameterization(t):
    betas = make_beta_schedule("linear", 1000)
    x0, noise = _data()
    tt = torch.full((4,), t)
    ref = GaussianDiffusion(betas)
    x_t = ref.q_sample(x0, tt, noise)
    true_mean, _, _ = ref.q_posterior_mean_variance(x0, x_t, tt)
    truths = {"eps": noise, "x0": x0, "mu": true_mean}
    for param, target in truths.items():
        d = GaussianDiffusion(betas, parameterization=param)
        out = d.p_mean_variance(lambda x, s, target=target: target, x_t, tt, clip_denoised=False)
        assert torch.allclose(out["mean"], true_mean, atol=1e-9), param
        assert torch.allclose(out["pred_x0"], x0, atol=1e-6), param


def test_learned_range_endpoints_are_exact():
    betas = make_beta_schedule("linear", 100)
    d = GaussianDiffusion(betas, variance="learned_range", objective="hybrid")
    x_t = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 40, 99])
    for v, table in ((0.0, "posterior_log_variance_clipped"), (1.0, "log_betas")):
        out = torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], dim=1)
        got = d.p_mean_variance(None, x_t, t, output=out)["log_variance"]
        want = getattr(d, table)[t].view(-1, 1, 1, 1).expand_as(x_t)
        assert torch.equal(got, want), v


def _net(param, learned):
    """A fixed network output: the prediction, then v (log σ², or the interpolation weight).
    An ε̂ of tanh(x_t)·(0.3 + 0.05 t); an x̂_0 or µ of x_t + 0.05 t·tanh(x_t), near the data."""

    def torch_net(x_t, t):
        s = t.view(-1, 1, 1, 1)
        pred = (
            torch.tanh(x_t) * (0.3 + 0.05 * s)
            if param == "eps"
            else x_t + 0.05 * s * torch.tanh(x_t)
        )
        if learned == "learned":
            return torch.cat([pred, -4 + 0.2 * torch.sin(x_t)], dim=1)
        if learned == "learned_range":
            return torch.cat([pred, 0.5 + 0.4 * torch.sin(x_t)], dim=1)
        return pred

    def ref_net(x_t, t):
        pred = [
            math.tanh(x) * (0.3 + 0.05 * t) if param == "eps" else x + 0.05 * t * math.tanh(x)
            for x in x_t
        ]
        if learned == "learned":
            return pred + [-4 + 0.2 * math.sin(x) for x in x_t]
        if learned == "learned_range":
            return pred + [0.5 + 0.4 * math.sin(x) for x in x_t]
        return pred

    return torch_net, ref_net


@pytest.mark.parametrize(
    "param, variance",
    [
        ("eps", "fixed_large"),
        ("mu", "fixed_small"),
        ("x0", "learned"),
        ("eps", "learned_range"),
        ("x0", "fixed_large"),
        ("mu", "learned_range"),
    ],
)
def test_vlb_training_loss_is_the_paper_bound_term(param, variance):
    """The vlb loss at t equals L_{t−1} of the bound re-derived from the paper's formulas in
    float64 (tests/paper_bound.py), for each parameterization and variance."""
    torch_net, ref_net = _net(param, variance if variance.startswith("learned") else None)
    betas = paper_bound.linear_betas(10, 1e-4, 0.2)
    d = GaussianDiffusion(
        make_beta_schedule("linear", 10, beta_end=0.2),
        parameterization=param,
        variance=variance,
        objective="vlb",
    )
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (2, 1, 2, 2), generator=g).double() / 127.5 - 1
    x0[0, 0, 0] = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # both edge bins of L_0
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    want = [
        paper_bound.bound_terms(
            betas, x0[i].flatten().tolist(), noise[i].flatten().tolist(), ref_net, param, variance
        )[1]
        for i in range(2)
    ]
    for t in range(10):
        loss, _ = d.training_loss(torch_net, x0, t=torch.full((2,), t), noise=noise)
        np.testing.assert_allclose(loss.numpy(), [w[t] for w in want], rtol=1e-6, err_msg=t)


@pytest.mark.parametrize("variance", ["learned", "learned_range"])
def test_samplers_and_bpd_run_with_a_learned_variance(variance):
    torch.manual_seed(0)
    net = UNet(
        in_channels=1,
        out_channels=2,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        image_size=8,
        dropout=0.0,
    ).eval()
    d = GaussianDiffusion(make_beta_schedule("linear", 20), variance=variance, objective="vlb")
    for kwargs in (
        dict(sampler="ddpm"),
        dict(sampler="ddpm", steps=5),
        dict(sampler="ddim", steps=5),
    ):
        x = sample(net, d, (2, 1, 8, 8), device="cpu", **kwargs)
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.isfinite(d.bits_per_dim(net, x0)["total"]).all()


@pytest.mark.slow
def test_table2_sweep_trains_every_row(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script(
        "train.py",
        "-m",
        "experiment=cifar10_table2",
        *TINY,
        "data=embedded",
        "model.in_channels=1",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_steps=50",
        "module.warmup_steps=10",
        f"hydra.sweep.dir={sweep}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 6
    names = set()
    for job in jobs:
        cfg = (job / "config.yaml").read_text()
        names.add(
            next(line.split(": ")[1] for line in cfg.splitlines() if line.startswith("job_name:"))
        )
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 50
        losses = [v for k, v in ckpt["state_dict"].items() if v.is_floating_point()]
        assert all(torch.isfinite(v).all() for v in losses)
    assert names == set(ROWS)


def test_learned_variance_needs_twice_the_channels(tmp_path):
    proc = run_main(
        "train.py",
        *TINY,
        f"hydra.run.dir={tmp_path / 'r'}",
        "module.variance=learned",
        "module.objective=vlb",
        "module.loss_weight=none",  # the default's min-SNR does not apply to the bound
    )
    assert proc.returncode == 1
    assert (
        "model.out_channels=1 does not fit module.variance='learned', which needs 2"
        in proc.stderr.strip().splitlines()[-1]
    )
    assert not Path(tmp_path / "r").exists()


def test_table2_at_cpu_scale_is_the_cpu_recipe_with_each_row():
    """experiment=table2_cpu: the sweep's six rows over the cpu_embedded recipe (digits, the
    CPU network and module=ddpm_cpu), each row changing only what the paper's row changes."""
    import ddpm_lightning.app  # noqa: F401  (registers the ${mul:} resolver)

    from helpers import compose

    base = compose("train", "experiment=cpu_embedded")
    cfg = compose("train", "experiment=table2_cpu", hydra=True)
    assert str(cfg.hydra.sweeper.params["+ablation"]).split(",") == ROWS
    rows = {row: compose("train", "experiment=table2_cpu", f"+ablation={row}") for row in ROWS}
    for row, c in rows.items():
        assert c.job_name == row and c.data.dataset == base.data.dataset == "embedded"
        assert c.module.lr == base.module.lr and c.model.ch == base.model.ch
        learned = c.module.variance == "learned"
        assert c.model.out_channels == (2 * c.model.in_channels if learned else None)  # None: C
    assert (rows["eps_simple"].module.parameterization, rows["eps_simple"].module.objective) == (
        "eps", "simple")
    assert (rows["mu_vlb_fixed"].module.parameterization, rows["mu_vlb_fixed"].module.objective) \
        == ("mu", "vlb")
