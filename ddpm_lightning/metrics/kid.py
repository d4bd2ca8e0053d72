"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"), offline and
with no Lightning.

KID is the squared maximum mean discrepancy between the Inception features of two image sets
under the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, d = 2048. Its estimate is unbiased
at any N (FID's grows as N falls), so runs evaluated on a few hundred samples compare fairly.
It is averaged over ``subsets`` random subsets of ``subset_size`` images from each set; the
spread over subsets (``kid_std``) measures the estimate's noise at that subset size.

The subsets come from a ``numpy.random.RandomState(seed)`` of their own, drawn in the order
torch-fidelity draws them, so for the same features and seed the value equals torch-fidelity's
``kid_features_to_metric`` (a test checks it); the training RNG is never touched.
"""

from __future__ import annotations

import numpy as np
import torch

from ddpm_lightning.metrics.fid import check_groups, jackknife_se


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD² of two equal-size sets under the cubic polynomial kernel:
    the mean of k over distinct pairs within x and within y, minus twice its mean over x × y."""
    m, d = x.shape

    def kernel(a, b):
        return (a @ b.T / d + 1.0) ** 3

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
    return float(within / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kid_from_features(features, reference, subsets: int = 100, subset_size: int | None = 1000,
                      seed: int = 0) -> dict:
    """``{"kid", "kid_std", "subsets", "subset_size"}`` of generated ``features`` [N, d]
    against ``reference`` features [M, d] (tensors or arrays; computed in float64).

    ``subset_size`` images are drawn without replacement from each set for each of ``subsets``
    subsets; ``None`` means min(1000, N, M). ``kid_std`` is the standard deviation over the
    subsets (as torch-fidelity and the KID paper report it)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs features [N, d] and [M, d], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    n, m_ref = len(x), len(y)
    if subset_size is None:
        subset_size = min(1000, n, m_ref)
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"KID subsets={subsets!r} must be a positive integer")
    if not 2 <= subset_size <= min(n, m_ref):
        raise ValueError(f"KID subset_size={subset_size} must be in [2, min(samples={n}, "
                         f"reference images={m_ref})]")
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        xi = x[torch.from_numpy(rng.choice(n, subset_size, replace=False))]
        yi = y[torch.from_numpy(rng.choice(m_ref, subset_size, replace=False))]
        values[i] = _unbiased_mmd2(xi, yi)
    return {"kid": float(values.mean()), "kid_std": float(values.std()), "subsets": subsets,
            "subset_size": int(subset_size)}


def kid_jackknife(features, reference, groups: int = 50) -> dict:
    """KID's sampling error at this N, the reference fixed: the grouped jackknife of the
    unbiased MMD² of all the generated ``features`` [N, d] against all the ``reference``
    features, with the groups of ``metrics.fid.FrechetToReference.jackknife`` (sample i in
    group i mod K), so FID's and KID's leave-out values, and two jobs', pair group by group.

    The kernel matrices are computed once (N×N and N×M), so a leave-out value costs O(N²).
    ``{"se", "values"}``: the jackknife's standard error (the error of ``kid`` at this N,
    unlike ``kid_std``, which is the spread of single subsets) and the K leave-out values.
    The reference's within-set term is the same in every leave-out value, so it is left out
    of them (it cancels from their spread and from two jobs' differences)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs features [N, d] and [M, d], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    n, d = x.shape
    check_groups(groups, n)
    kxx = (x @ x.T / d + 1.0) ** 3
    kxy_mean = ((x @ y.T / d + 1.0) ** 3).mean(1)  # [N]: each sample's mean k to the reference
    kept = (torch.arange(n)[None, :] % groups != torch.arange(groups)[:, None]).double()  # [K, N]
    size = kept.sum(1)
    within = (((kept @ kxx) * kept).sum(1) - kept @ kxx.diagonal()) / (size * (size - 1))
    values = (within - 2.0 * (kept @ kxy_mean) / size).numpy()
    return {"se": jackknife_se(values), "values": values}
