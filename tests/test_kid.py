"""The uncertainty of the sample-quality metrics: KID against torch-fidelity's formula, FID's
fast form against ``fid_from_stats``, FID's and KID's jackknife standard errors against the
spread over independent draws, and the in-repo FID against torchmetrics' (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm_lightning.metrics.fid import FeatureMoments, FrechetToReference, fid_from_stats
from ddpm_lightning.metrics.kid import kid_from_features, kid_jackknife


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


def _decaying(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0):
    """Gaussian features whose variances fall like Inception features' (1 / (1 + i/10))."""
    g = torch.Generator().manual_seed(seed)
    spectrum = 1.0 / torch.sqrt(1 + torch.arange(d, dtype=torch.float64) / 10)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * spectrum * scale + shift


@pytest.mark.parametrize("n", [30, 200])  # below and above the reference's rank (d = 16 → 16)
def test_fid_jackknife_leaves_out_each_group_exactly(n):
    """Each leave-a-group-out value (sample i in group i mod K) equals the FID of the kept
    samples computed from scratch, whether the Gram matrix is taken in sample space (N ≤ r)
    or in the reference's range (N > r); se² = (K − 1)/K · Σ (v_k − v̄)²."""
    x = _gaussian(n, 16, 0, scale=1.2, shift=0.1)
    ref = _gaussian(500, 16, 1)
    frechet = FrechetToReference(ref.mean(0).numpy(), np.cov(ref.numpy(), rowvar=False))
    jack = frechet.jackknife(x, groups=5)
    want = np.array([frechet(x[torch.arange(n) % 5 != k]) for k in range(5)])
    np.testing.assert_allclose(jack["values"], want, rtol=1e-9)
    assert jack["se"] == pytest.approx((4 / 5 * ((want - want.mean()) ** 2).sum()) ** 0.5)
    assert jack["fid"] == pytest.approx(frechet(x), rel=1e-12)
    assert jack["high"] - jack["fid"] == pytest.approx(1.959964 * jack["se"], rel=1e-6)
    with pytest.raises(ValueError, match="jackknife groups=1 must be an integer in"):
        frechet.jackknife(x, groups=1)


def test_fid_jackknife_se_matches_the_spread_over_independent_draws():
    """FID's error at N where N is below the feature dimension (N = 100 samples of d = 512,
    as 200 samples of Inception's 2048): the jackknife's SE from one draw and the standard
    deviation of FID over 100 independent draws agree within 40%. The bootstrap (the mutant:
    FIDs of resamplings with replacement) overstates it about 5-fold here, as duplicated
    samples lower the rank of Σ_g."""
    d, n = 512, 100
    ref = _decaying(2000, d, 0)
    frechet = FrechetToReference(ref.mean(0).numpy(), np.cov(ref.numpy(), rowvar=False))

    def draw(seed):
        return _decaying(n, d, seed, scale=1.1, shift=0.02)

    spread = np.std([frechet(draw(100 + i)) for i in range(100)], ddof=1)
    ses = [frechet.jackknife(draw(i), groups=50)["se"] for i in range(5)]
    assert np.mean(ses) == pytest.approx(spread, rel=0.4), (ses, spread)


def test_kid_jackknife_leaves_out_each_group_exactly():
    """Each leave-out value is the unbiased MMD² of the kept samples against all the reference
    features, up to the reference's within-set term (the same in every value), computed from
    scratch; the groups are FID's (sample i in group i mod K)."""
    x, y = _gaussian(40, 6, 0), _gaussian(50, 6, 1, shift=0.3)

    def k(a, b):
        return (a @ b.T / 6 + 1) ** 3

    got = kid_jackknife(x, y, groups=4)
    want = []
    for g in range(4):
        xs = x[torch.arange(40) % 4 != g]
        kxx = k(xs, xs)
        m = len(xs)
        want.append(float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                          - 2 * k(xs, y).mean()))
    np.testing.assert_allclose(got["values"], want, atol=1e-12)
    assert got["se"] == pytest.approx((3 / 4 * ((np.array(want) - np.mean(want)) ** 2).sum())
                                      ** 0.5)


def test_kid_jackknife_se_matches_the_spread_over_independent_draws():
    """KID's error at N: the standard deviation of KID (the subset average that eval/kid logs)
    over 50 independent draws of N = 200 samples and the jackknife's SE from one draw agree
    within 25%; the spread of single subsets (kid_std) overstates it by more than 1.4×."""
    d, n = 16, 200
    ref = _gaussian(1000, d, 0)

    def draw(seed):
        return _gaussian(n, d, 1000 + seed, scale=1.1, shift=0.2)

    kids = [kid_from_features(draw(i), ref, 50, 100, seed=0) for i in range(50)]
    spread = np.std([k["kid"] for k in kids], ddof=1)
    ses = [kid_jackknife(draw(i), ref, groups=50)["se"] for i in range(8)]
    assert np.mean(ses) == pytest.approx(spread, rel=0.25), (ses, spread)
    assert np.mean([k["kid_std"] for k in kids]) > 1.4 * spread


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
