"""The uncertainty of the sample-quality metrics: KID against torch-fidelity's formula, FID's
fast form against ``fid_from_stats``, the FID bootstrap's standard error against the spread of
FID over independent draws, and the in-repo FID against torchmetrics' (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_lightning.metrics.fid import (
    FeatureMoments,
    FrechetToReference,
    bootstrap_indices,
    fid_from_stats,
)
from ddpm_lightning.metrics.kid import kid_bootstrap, kid_from_features


def _gaussian(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def test_kid_equals_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    x, y = _gaussian(120, 64, 0), _gaussian(150, 64, 1, scale=1.1, shift=0.05)
    ours = kid_from_features(x, y, subsets=30, subset_size=100, seed=7)
    theirs = kid_features_to_metric(x, y, kid_subsets=30, kid_subset_size=100, rng_seed=7,
                                    verbose=False)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-12)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-10)
    assert ours["kid"] > 3 * ours["kid_std"] / 30**0.5  # the two distributions do differ


def test_kid_is_unbiased_for_one_distribution():
    """Two samples of one distribution: KID averages to 0 within its noise (the biased
    V-statistic, which keeps the kernel's diagonal, would sit well above it)."""
    x, y = _gaussian(400, 32, 2), _gaussian(400, 32, 3)
    out = kid_from_features(x, y, subsets=200, subset_size=50, seed=0)
    assert abs(out["kid"]) < 4 * out["kid_std"] / 200**0.5, out


def test_kid_refuses_a_subset_larger_than_a_set():
    with pytest.raises(ValueError, match=r"subset_size=100 .*samples=50"):
        kid_from_features(_gaussian(50, 8, 0), _gaussian(200, 8, 1), subset_size=100)


@pytest.mark.parametrize("n", [40, 300])  # fewer and more samples than the dimension
def test_fast_fid_equals_fid_from_stats(n):
    ref = _gaussian(500, 128, 4) @ torch.linalg.qr(_gaussian(128, 128, 5))[0] * 0.7
    mu_r, sigma_r = FeatureMoments(128).add(ref).stats()
    x = _gaussian(n, 128, 6, scale=0.8, shift=0.1)
    mu, sigma = FeatureMoments(128).add(x).stats()
    assert FrechetToReference(mu_r, sigma_r)(x) == pytest.approx(
        fid_from_stats(mu, sigma, mu_r, sigma_r), rel=1e-10)


def test_fid_bootstrap_se_matches_the_spread_over_independent_draws():
    """The standard deviation of FID over 200 independent draws of N = 150 samples, and the
    bootstrap's standard error from one draw, agree within 35% (a mutant that resamples the
    indices without replacement gives an SE of 0 and fails)."""
    d, n = 16, 150
    mu_r, sigma_r = np.zeros(d), np.diag(np.linspace(0.5, 1.5, d))
    frechet = FrechetToReference(mu_r, sigma_r)

    def draw(seed):
        return _gaussian(n, d, seed, scale=1.2, shift=0.2)

    spread = np.std([frechet(draw(100 + i)) for i in range(200)], ddof=1)
    ses = [frechet.bootstrap(draw(i), replicates=200, seed=i)["se"] for i in range(5)]
    assert np.mean(ses) == pytest.approx(spread, rel=0.35), (ses, spread)
    boot = frechet.bootstrap(draw(0), replicates=50, seed=0)
    assert boot["low"] < boot["fid"] < boot["high"]
    assert boot["high"] - boot["fid"] == pytest.approx(1.959964 * boot["se"], rel=1e-6)


def test_kid_bootstrap_replicates_leave_out_pairs_of_one_sample():
    """Each replicate is the unbiased MMD² of the resampled set, its within-set mean taken over
    the pairs of draws of different samples: equal, up to the reference's constant term, to a
    brute-force loop (a mutant that pairs a sample drawn twice with itself fails)."""
    x, y = _gaussian(40, 6, 0), _gaussian(50, 6, 1, shift=0.3)
    idx = bootstrap_indices(40, 6, seed=3)
    got = kid_bootstrap(x, y, idx)

    def k(a, b):
        return (a @ b.T / 6 + 1) ** 3

    want = []
    for row in idx:
        xs = x[row]
        distinct = row[:, None] != row[None, :]
        want.append(float(k(xs, xs)[distinct].mean() - 2 * k(xs, y).mean()))
    want = np.array(want)
    np.testing.assert_allclose(got["deviations"], want - want.mean(), atol=1e-12)
    assert got["se"] == pytest.approx(np.std(want, ddof=1), rel=1e-9)


def test_kid_bootstrap_se_matches_the_spread_over_independent_draws():
    """KID's error at N: the standard deviation of KID (the subset average that eval/kid logs)
    over 80 independent draws of N = 200 samples and the bootstrap's SE from one draw agree
    within 25%; the spread of single subsets (kid_std) overstates it by more than 1.4×."""
    d, n = 16, 200
    ref = _gaussian(1000, d, 0)

    def draw(seed):
        return _gaussian(n, d, 1000 + seed, scale=1.1, shift=0.2)

    kids = [kid_from_features(draw(i), ref, 100, 100, seed=0) for i in range(80)]
    spread = np.std([k["kid"] for k in kids], ddof=1)
    ses = [kid_bootstrap(draw(i), ref, bootstrap_indices(n, 100, seed=0))["se"] for i in range(8)]
    assert np.mean(ses) == pytest.approx(spread, rel=0.25), (ses, spread)
    assert np.mean([k["kid_std"] for k in kids]) > 1.4 * spread


def test_fid_and_kid_bootstraps_draw_the_same_resamplings():
    """FID's bootstrap resamples with ``bootstrap_indices``: its replicates are the FIDs of
    those very index sets, so KID's bootstrap (given the same indices) pairs with it, and two
    jobs with the same seed and N resample the same samples."""
    mu_r, sigma_r = np.zeros(8), np.eye(8)
    frechet = FrechetToReference(mu_r, sigma_r)
    x = _gaussian(60, 8, 5, shift=0.1)
    boot = frechet.bootstrap(x, replicates=5, seed=7)
    reps = np.array([frechet(x[i]) for i in bootstrap_indices(60, 5, seed=7)])
    np.testing.assert_allclose(boot["deviations"], reps - reps.mean(), atol=1e-12)
    assert torch.equal(bootstrap_indices(60, 5, seed=7), bootstrap_indices(60, 5, seed=7))


def test_fid_equals_torchmetrics_without_antialiasing(weights):
    """The oracle: torchmetrics' FrechetInceptionDistance (antialias=False, the TF-FID resize)
    on the same images, with the same weight file, within 1e-3 relative."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ddpm_lightning.metrics.fid import compute_fid
    from ddpm_lightning.training.data import DiffusionDataModule

    dm = DiffusionDataModule("embedded", image_size=28, batch_size=8)
    dm.setup("fit")
    real = dm.train_set.images[:24].expand(-1, 3, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    noisy = real[:24].float() + 60 * torch.randn(real.shape, generator=g)
    fake = noisy.clamp(0, 255).to(torch.uint8)

    ours = compute_fid(fake, real, batch_size=24, weights_path=weights)
    metric = FrechetInceptionDistance(feature=2048, antialias=False,
                                      feature_extractor_weights_path=str(weights))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute())
    print(f"\nFID ours {ours:.4f}, torchmetrics {theirs:.4f}")
    assert ours > 10 and ours == pytest.approx(theirs, rel=1e-3)
