"""FID and Inception Score, offline, plus ``FIDCallback`` for FID during training.

Features come from torch-fidelity's ``FeatureExtractorInceptionV3("inception-v3-compat")``,
the TF-FID Inception-v3 with its standard preprocessing: uint8 RGB images, resized with the
TF-1 bilinear resize to 299², scaled to (x − 128)/128. Grey images are repeated to 3 channels.
The extractor is always in eval mode and never part of the LightningModule.

Weights, in this order: an explicit ``weights_path``; else torch-fidelity's default file
``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`` if present; else,
with ``download=True``, torch-fidelity downloads it (network needed); else a clear error.
``python -m ddpm_lightning.inception`` writes the default file offline (no fc layer: FID
only, see ``ddpm_lightning.inception``).

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

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .callbacks import SamplingCallback
from .inception import default_weights_path, load_extractor

FEATURE_DIM = 2048
_EXTRACTORS: dict[tuple[str | None, str], torch.nn.Module] = {}


# --------------------------------------------------------------------------- weights


def resolve_weights(weights_path: str | os.PathLike | None = None,
                    download: bool = False) -> str | None:
    """The Inception weight file to use; ``None`` means "let torch-fidelity download it"."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found; build them offline with "
                                    f"`python -m ddpm_lightning.inception --out {path}`")
        return str(path)
    default = default_weights_path()
    if default.is_file():
        return str(default)
    if download:
        return None
    raise FileNotFoundError(
        f"no Inception weights at {default}: run `python -m ddpm_lightning.inception` to build "
        "them offline, or pass download=True to let torch-fidelity download them (network needed)"
    )


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
            f"{tuple(batch.shape)}; convert model outputs with ddpm_lightning.data.to_uint8"
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


# --------------------------------------------------------------------------- reference stats


def cache_dir() -> Path:
    return Path(os.environ.get("DDPM_FID_CACHE") or "~/.cache/ddpm_lightning/fid_stats").expanduser()


def save_stats(path: str | os.PathLike, mu, sigma, **info) -> Path:
    """Write (µ, Σ) and a JSON ``info`` record to ``path`` (.npz) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                     info=np.array(json.dumps(info, sort_keys=True)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_stats(path: str | os.PathLike, info: dict | None = None):
    """(µ, Σ) from a ``.npz`` with ``mu`` and ``sigma`` (ours, or e.g. the TTUR/ADM files).
    With ``info`` given, return None when the file's record differs (a stale cache)."""
    with np.load(Path(path).expanduser()) as f:
        if info is not None:
            stored = json.loads(str(f["info"])) if "info" in f else None
            if stored != json.loads(json.dumps(info, sort_keys=True)):
                return None
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def _reference_set(source, split: str, max_images: int | None, name: str | None, seed: int = 0,
                   fingerprint: bool = True):
    """(dataset, indices, cache key, info) of the images that make the reference; ``info``
    holds the images' fingerprint when there is a cache key and ``fingerprint`` is set (the
    rank that reads and writes the cache)."""
    from .data import DiffusionDataModule
    from .datasets import NATIVE_CHANNELS

    if split not in ("train", "val", "test"):
        raise ValueError(f"reference split={split!r} is unknown; use train (the paper's), val or test")
    if isinstance(source, DiffusionDataModule):
        source.setup("fit")
        dataset = source.train_set if split == "train" else source.val_set
        name, suffix = source.dataset, ""
        info = {"dataset": name, "split": split, "image_size": source.image_size,
                "channels": source.channels}
        if source.channels != NATIVE_CHANNELS.get(name):
            suffix += f"_c{source.channels}"
        if source.dataset in ("embedded", "folder"):  # its own split: depends on seed, fraction
            info.update(seed=source.seed, val_fraction=source.val_fraction)
            suffix += f"_s{source.seed}v{source.val_fraction:g}"
        if source.dataset == "folder":
            info["root"] = str(Path(source.root).resolve())
            suffix += "_" + hashlib.sha1(info["root"].encode()).hexdigest()[:8]
    else:
        dataset, suffix = source, ""
        info = {"dataset": name, "split": split}
    n = len(dataset)
    first = dataset[0]
    size = (first[0] if isinstance(first, (tuple, list)) else first).shape[-1]
    info["image_size"] = int(size)
    indices = torch.arange(n)
    if max_images is not None and max_images < n:
        g = torch.Generator().manual_seed(seed)  # a fixed random subset, not the first images
        indices = torch.randperm(n, generator=g)[:max_images].sort().values
        info["max_images"] = int(max_images)
    info["num_images"] = len(indices)
    content = dataset_fingerprint(dataset, indices.tolist()) if fingerprint and name else None
    if content is not None:  # a dataset that changed under the same settings is recomputed
        info["content"] = content
    key = None
    if name is not None:
        key = f"{name}_{split}_{size}{suffix}" + (f"_n{len(indices)}" if len(indices) < n else "")
    return dataset, indices.tolist(), key, info


def dataset_fingerprint(dataset, indices: list[int]) -> str | None:
    """A short hash of the reference images' contents: the pixels of an in-memory dataset,
    or each file's path, size and modification time for a folder of images (reading every
    image would cost as much as the features). None for other datasets (then the cache trusts
    its key; ``recompute=True`` refreshes it)."""
    from .datasets import ImageFolderDataset, TensorImageDataset

    h = hashlib.sha1()
    if isinstance(dataset, TensorImageDataset):
        images = dataset.images.numpy()
        chosen = images if len(indices) == len(images) else images[indices]
        h.update(str(chosen.shape).encode())
        h.update(np.ascontiguousarray(chosen).data)
    elif isinstance(dataset, ImageFolderDataset):
        for i in indices:
            path = Path(dataset.files[i])
            st = path.stat()
            h.update(f"{path.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        h.update(f"{dataset.image_size}{dataset.mode}".encode())
    else:
        return None
    return h.hexdigest()[:16]


def _dataset_batches(dataset, indices: list[int], batch_size: int):
    for i in range(0, len(indices), batch_size):
        chunk = indices[i:i + batch_size]
        if hasattr(dataset, "__getitems__"):
            batch = dataset.__getitems__(chunk)
        else:
            batch = [dataset[j] for j in chunk]
        if not isinstance(batch, torch.Tensor):
            batch = torch.stack([b[0] if isinstance(b, (tuple, list)) else b for b in batch])
        yield batch


def _dataset_moments(dataset, indices, batch_size, device, weights_path, download):
    moments = FeatureMoments(device=device)
    for batch in _dataset_batches(dataset, indices, batch_size):
        moments.add(inception_features(batch, batch_size, device, weights_path, download))
    return moments


def reference_stats(source, split: str = "train", max_images: int | None = None, *,
                    name: str | None = None, batch_size: int = 32, device=None,
                    weights_path=None, download: bool = False,
                    cache: str | os.PathLike | None = None, recompute: bool = False):
    """(µ, Σ) of a dataset's Inception features, computed once and cached.

    ``source`` is a ``DiffusionDataModule`` (the cache key comes from its dataset name,
    image size, channels and, for embedded/folder, its split settings) or any dataset of
    uint8 [C, H, W] images (then ``name`` keys the cache; without it nothing is cached).
    ``split``: "train" (the paper's protocol), or "val"/"test" (the datamodule's held-out
    set, which is the official test split for MNIST, Fashion-MNIST and CIFAR-10).
    ``max_images`` uses a fixed random subset. The file is
    ``{cache or $DDPM_FID_CACHE}/{dataset}_{split}_{size}[_n{max_images}].npz``; it records a
    fingerprint of the images (``dataset_fingerprint``), and a file whose images have changed
    since is recomputed and overwritten.
    """
    dataset, indices, key, info = _reference_set(source, split, max_images, name)
    path = None if key is None else Path(cache or cache_dir()).expanduser() / f"{key}.npz"
    if path is not None and path.is_file() and not recompute:
        stats = load_stats(path, info)
        if stats is not None:
            return stats
    stats = _dataset_moments(dataset, indices, batch_size, device, weights_path, download).stats()
    if path is not None:
        save_stats(path, *stats, **info)
    return stats


# --------------------------------------------------------------------------- the callback


class FIDCallback(SamplingCallback):
    """FID of EMA samples against the training set, every ``every_n_steps`` optimizer steps
    (and at the end of training), logged as ``val/fid`` (and ``val/fid_seconds``).

    Every rank samples its share of ``num_samples`` (batch k from the generator seeded by
    (seed, k), as in sample.py: the same x_T at every evaluation and in every job of a sweep,
    so FIDs differ by the model only, and equal sample.py's for the same settings) with
    ``pl_module.eval_model`` and computes its Inception feature moments; the moments are
    all-gathered and merged, rank 0 computes the FID and broadcasts it, so every rank holds
    the value (``trainer.callback_metrics["val/fid"]``, e.g. for a checkpoint monitor).
    Sampling uses its own ``torch.Generator``: the training RNG is not advanced.

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this.
        num_samples: samples per evaluation, over all ranks (the paper: 50k; a floor near 30
            remains with 2k, so compare runs at equal ``num_samples`` only).
        batch_size: sampling batch per rank.
        sampler: overrides of ``module.sampler``, e.g. ``{name: ddim, steps: 100}``.
        reference: ``split`` (train), ``max_images`` (null = all), ``cache_dir`` (null =
            $DDPM_FID_CACHE), or ``path`` to a precomputed ``.npz`` with mu/sigma. The
            reference images come from the trainer's ``DiffusionDataModule``; a missing cache
            is computed once, split over the ranks.
        weights_path, download: where the Inception weights come from (see ``resolve_weights``).
        on_train_end: also evaluate at the end of training.
        seed: base seed of the sampling noise.
        inception_batch_size: images per Inception forward pass.
    """

    sampler_key = "callbacks.fid.sampler"

    def __init__(self, every_n_steps: int = 10_000, num_samples: int = 10_000,
                 batch_size: int = 256, sampler: Mapping | None = None,
                 reference: Mapping | None = None, weights_path: str | None = None,
                 download: bool = False, on_train_end: bool = True, seed: int = 0,
                 inception_batch_size: int = 64):
        super().__init__(every_n_steps, on_train_end, key="callbacks.fid.every_n_steps",
                         sampler=sampler)
        for key, value in (("num_samples", num_samples), ("batch_size", batch_size),
                           ("inception_batch_size", inception_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"callbacks.fid.{key}={value!r} must be a positive integer")
        if num_samples < 2:
            raise ValueError(f"callbacks.fid.num_samples={num_samples} must be >= 2")
        self.reference = dict(reference or {})
        unknown = set(self.reference) - {"split", "max_images", "cache_dir", "path"}
        if unknown:
            raise ValueError(f"callbacks.fid.reference.{min(unknown)} is unknown; valid: "
                             "split, max_images, cache_dir, path")
        self.reference.setdefault("split", "train")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.weights_path = weights_path
        self.download = download
        self.seed = seed
        self.inception_batch_size = inception_batch_size
        self.last_fid: float | None = None
        self._ref: tuple[np.ndarray, np.ndarray] | None = None
        self._ref_ready = False

    # ------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Fail before training on bad settings or missing weights/reference."""
        from .data import DiffusionDataModule

        if stage != "fit":
            return
        self.check_module(pl_module)
        resolve_weights(self.weights_path, self.download)
        path = self.reference.get("path")
        if path:
            if not Path(path).expanduser().is_file():
                raise FileNotFoundError(f"callbacks.fid.reference.path={path} not found")
        elif not isinstance(trainer.datamodule, DiffusionDataModule):
            raise ValueError("callbacks.fid needs trainer.fit(..., datamodule=DiffusionDataModule)"
                             " for its reference images, or reference.path to a stats .npz")

    def run(self, trainer, pl_module) -> float:
        return self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------- work
    def evaluate(self, trainer, pl_module) -> float:
        """Run one FID evaluation on every rank; returns the FID (on every rank)."""
        start = time.perf_counter()
        # Whatever draws random numbers in here (data loaders, samplers), the training RNG
        # streams come out exactly as they went in.
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            reference = self._reference_stats(trainer, pl_module)
            moments = _all_gather_moments(trainer, self._sample_moments(trainer, pl_module))
        fid = None
        if trainer.is_global_zero:
            fid = fid_from_stats(*moments.stats(), *reference)
        fid = float(trainer.strategy.broadcast(fid, src=0))
        seconds = time.perf_counter() - start
        step = trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"val/fid": fid, "val/fid_seconds": seconds}, step=step)
            print(f"FID at step {step}: {fid:.3f} ({self.num_samples} samples, {seconds:.0f} s)",
                  flush=True)
        trainer.callback_metrics["val/fid"] = torch.tensor(fid)
        self.last_fid, self._last_step = fid, step
        return fid

    def _sample_moments(self, trainer, pl_module) -> FeatureMoments:
        """Moments of this rank's share of the samples: sample.py's samples for the same
        seed, batch size and sampler, so the two FIDs agree."""
        _, images = self.generate(pl_module, self.num_samples, self.batch_size, self.seed,
                                  trainer.global_rank, trainer.world_size)
        moments = FeatureMoments(device=pl_module.device)
        if images.shape[0]:
            moments.add(inception_features(images, self.inception_batch_size, pl_module.device,
                                           self.weights_path, self.download))
        return moments

    def _reference_stats(self, trainer, pl_module):
        """(µ, Σ) of the reference on rank 0 (None elsewhere). A cache miss is computed by all
        ranks together, each on every world_size-th image, and cached by rank 0."""
        if self._ref_ready:
            return self._ref
        ref, stats = self.reference, None
        if ref.get("path"):
            stats = load_stats(ref["path"]) if trainer.is_global_zero else None
        else:
            dataset, indices, key, info = _reference_set(
                trainer.datamodule, ref["split"], ref.get("max_images"), None,
                fingerprint=trainer.is_global_zero)
            path = Path(ref.get("cache_dir") or cache_dir()).expanduser() / f"{key}.npz"
            if trainer.is_global_zero and path.is_file():
                stats = load_stats(path, info)
            if not trainer.strategy.broadcast(stats is not None, src=0):
                rank, world = trainer.global_rank, trainer.world_size
                moments = _dataset_moments(dataset, indices[rank::world],
                                           self.inception_batch_size, pl_module.device,
                                           self.weights_path, self.download)
                moments = _all_gather_moments(trainer, moments)
                if trainer.is_global_zero:
                    stats = moments.stats()
                    save_stats(path, *stats, **info)
                    print(f"FID reference statistics ({len(indices)} images) cached in {path}",
                          flush=True)
        self._ref, self._ref_ready = stats, True
        return stats


def _all_gather_moments(trainer, moments: FeatureMoments) -> FeatureMoments:
    """Merge the moments of all ranks (same result on every rank)."""
    if trainer.world_size == 1:
        return moments
    strategy = trainer.strategy
    counts = strategy.all_gather(torch.tensor(float(moments.n), dtype=torch.float64,
                                              device=moments.mean.device))
    means = strategy.all_gather(moments.mean)
    m2s = strategy.all_gather(moments.m2)
    merged = FeatureMoments(moments.mean.shape[0], moments.mean.device)
    for n, mean, m2 in zip(counts.reshape(-1).tolist(), means, m2s):
        merged.merge(int(n), mean, m2)
    return merged
