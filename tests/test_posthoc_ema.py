"""Post-hoc EMA (Karras et al. 2024): σ_rel ↔ γ, the reconstruction of profiles that were never
tracked from snapshots of two that were (against the EMA computed directly on a synthetic
weight trajectory), the refusal of what the snapshots cannot represent, and the whole path:
module.ema=posthoc → snapshots → tools/posthoc_ema → a checkpoint that sample.py takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_lightning.core.posthoc_ema import (
    PowerEMA,
    gamma_to_sigma_rel,
    sigma_rel_to_gamma,
    solve_weights,
)

from helpers import TINY, run_main


def test_sigma_rel_and_gamma():
    """The paper's pairs: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.02, 0.07, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_rel=0.3 must be in"):
        sigma_rel_to_gamma(0.3)


def _trajectory(steps=4000, dim=40, period=200, tracked=(0.05, 0.10), direct=(0.03, 0.07, 0.15)):
    """A smooth, noisy synthetic weight trajectory; snapshots of the ``tracked`` profiles every
    ``period`` steps; and the ``direct`` profiles computed step by step."""
    rng = np.random.default_rng(0)
    freqs, phase = rng.uniform(0.5, 6, dim), rng.uniform(0, 6.28, dim)
    zero = [torch.zeros(dim, dtype=torch.float64)]
    track, ref = PowerEMA(zero, tracked), PowerEMA(zero, direct)
    snaps = []
    for step in range(1, steps + 1):
        theta = [torch.tensor(np.sin(freqs * 3 * step / steps + phase)
                              + 0.3 * rng.normal(size=dim))]
        track.update(step, theta)
        ref.update(step, theta)
        if step % period == 0:
            snaps += [(step, g, p[0].clone()) for g, p in zip(track.gammas, track.profiles)]
    return snaps, ref


def _combine(snaps, step, gamma):
    x, residual = solve_weights([s for s, _, _ in snaps], [g for _, g, _ in snaps], step, gamma)
    return sum(float(w) * p for w, (_, _, p) in zip(x, snaps)), x, residual


def test_a_tracked_profile_is_reconstructed_exactly():
    snaps, _ = _trajectory()
    last = snaps[-1]  # σ_rel 0.10 at step 4000
    rec, x, residual = _combine(snaps, 4000, last[1])
    assert residual < 1e-6 and x[-1] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(rec, last[2], atol=1e-8)


def test_reconstructed_profiles_match_the_ema_computed_directly():
    """σ_rel 0.03, 0.07 and 0.15 from snapshots of 0.05 and 0.10 every 200 of 4,000 steps: within
    3e-3 of the directly computed EMA (weights of size ~1; a mutant whose inner product uses
    max instead of min of the two steps misses by far more)."""
    snaps, ref = _trajectory()
    for gamma, profile in zip(ref.gammas, ref.profiles):
        rec, _, residual = _combine(snaps, 4000, gamma)
        err = float((rec - profile[0]).abs().max())
        assert err < 3e-3 and residual < 0.05, (gamma_to_sigma_rel(gamma), err, residual)


def test_what_the_snapshots_cannot_represent_has_a_large_residual():
    snaps, _ = _trajectory(steps=600)
    assert _combine(snaps, 600, sigma_rel_to_gamma(0.07))[2] < 0.05
    assert _combine(snaps, 600, sigma_rel_to_gamma(0.01))[2] > 0.1


def test_posthoc_run_snapshots_tool_and_sample(tmp_path):
    """module.ema=posthoc on a tiny run: snapshots at steps 3, 6 and 8 (the end), the tool
    writes a checkpoint per σ_rel (0.10 is the tracked profile at step 8 itself), refuses one
    it cannot represent in one line, and sample.py samples from its output."""
    from ddpm_lightning.tools import posthoc_ema

    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, f"hydra.run.dir={run}", "trainer.max_steps=8",
                    "module.ema=posthoc", "module.posthoc.every_n_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(p.name for p in (run / "posthoc_ema").glob("step_*.pt"))
    assert found == ["step_0000003.pt", "step_0000006.pt", "step_0000008.pt"]
    code = posthoc_ema.main([str(run), "--sigma-rel", "0.10", "0.07", "0.005"])
    assert code == 1  # 0.005 refused, the others written
    out = run / "posthoc_ema" / "sigma_rel_0.100_step_0000008.ckpt"
    ckpt = torch.load(out, weights_only=True)
    last = torch.load(run / "posthoc_ema" / "step_0000008.pt", weights_only=True)
    tracked = last["state_dicts"][last["sigma_rels"].index(0.10)]
    for name, value in tracked.items():
        assert torch.allclose(ckpt["state_dict"][f"ema_model.{name}"].double(), value.double(),
                              atol=1e-6), name
    assert ckpt["posthoc_ema"]["sigma_rel"] == 0.10 and "optimizer_states" not in ckpt
    assert (run / "posthoc_ema" / "sigma_rel_0.070_step_0000008.ckpt").is_file()
    assert not list((run / "posthoc_ema").glob("sigma_rel_0.005*"))
    samples = tmp_path / "samples"
    proc = run_main("sample.py", f"ckpt_path={out}", "num_samples=4", "sampler.steps=4",
                    "progress=false", f"hydra.run.dir={samples}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (samples / "samples.npz").is_file()
