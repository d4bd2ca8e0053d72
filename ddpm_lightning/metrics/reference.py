"""Reference statistics (µ, Σ) of a dataset's Inception features, computed once and cached
(no Lightning). The cache key and the image fingerprint: see ``reference_stats``; the file
format is ``fid.save_stats``'s. It imports ``fid``, never the other way round."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ddpm_lightning.metrics import fid
from ddpm_lightning.metrics.fid import load_stats, save_stats


def cache_dir() -> Path:
    return Path(os.environ.get("DDPM_FID_CACHE") or "~/.cache/ddpm_lightning/fid_stats").expanduser()


def _reference_set(source, split: str, max_images: int | None, name: str | None, seed: int = 0,
                   fingerprint: bool = True):
    """(dataset, indices, cache key, info) of the images that make the reference; ``info``
    holds the images' fingerprint when there is a cache key and ``fingerprint`` is set (the
    rank that reads and writes the cache)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"reference split={split!r} is unknown; use train (the paper's), val or test")
    if hasattr(source, "reference_set"):  # a data module describes its own split and cache key
        dataset, name, suffix, info = source.reference_set(split)
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
    """A short hash of the reference images' contents, from the dataset's own ``fingerprint``
    (the pixels of an in-memory dataset; each file's path, size and modification time for a
    folder of images, as reading every image would cost as much as the features). None for
    datasets without one (then the cache trusts its key; ``recompute=True`` refreshes it)."""
    fingerprint = getattr(dataset, "fingerprint", None)
    return fingerprint(indices) if callable(fingerprint) else None


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
    moments = fid.FeatureMoments(device=device)
    for batch in _dataset_batches(dataset, indices, batch_size):
        moments.add(fid.inception_features(batch, batch_size, device, weights_path, download))
    return moments


def _dataset_features(dataset, indices, batch_size, device, weights_path, download):
    """The Inception features [len(indices), 2048] of the images, in order."""
    return torch.cat([fid.inception_features(batch, batch_size, device, weights_path, download)
                      for batch in _dataset_batches(dataset, indices, batch_size)])


def reference_stats(source, split: str = "train", max_images: int | None = None, *,
                    name: str | None = None, batch_size: int = 32, device=None,
                    weights_path=None, download: bool = False,
                    cache: str | os.PathLike | None = None, recompute: bool = False,
                    features: bool = False):
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

    With ``features``, returns (µ, Σ, features [N, 2048] float32), which KID needs; the file
    then keeps the features too (a file written without them is recomputed once).
    """
    dataset, indices, key, info = _reference_set(source, split, max_images, name)
    path = None if key is None else Path(cache or cache_dir()).expanduser() / f"{key}.npz"
    if path is not None and path.is_file() and not recompute:
        stats = load_stats(path, info, features=features)
        if stats is not None:
            return stats
    if features:
        feats = _dataset_features(dataset, indices, batch_size, device, weights_path, download)
        stats = (*fid.stats_of_features(feats), feats.cpu().numpy())
    else:
        stats = _dataset_moments(dataset, indices, batch_size, device, weights_path,
                                 download).stats()
    if path is not None:
        save_stats(path, *stats, **info)
    return stats
