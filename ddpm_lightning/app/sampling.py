"""What ``sample.py`` does, importable: build a sampling job from the sample config (the
checkpoint's module, the sampler settings, Fabric, the prepared network), draw the samples,
save them, and evaluate FID, KID, IS and bits/dim."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from ddpm_lightning.app.runtime import ConfigError, check_int

METRICS = ("fid", "kid", "is", "nll")
INCEPTION_METRICS = {"fid", "kid", "is"}
PRECISIONS = ("32-true", "bf16-mixed")


@dataclass
class SamplingJob:
    """A checkpoint ready to sample from: the module, the sampler settings, the Fabric of the
    run and the network (EMA or raw) prepared on its device."""
    cfg: DictConfig
    module: object
    settings: object
    fabric: object
    net: torch.nn.Module
    run_config: dict
    ckpt: dict
    results: dict = field(default_factory=dict)
    nll_net: torch.nn.Module | None = None  # the network in fp32, for bits/dim

    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero


def validate(cfg: DictConfig) -> dict:
    """Check the request before any work; return the sampler settings given (non-null)."""
    for key in ("num_samples", "batch_size", "devices", "grid_size"):
        check_int(key, cfg[key], 0 if key == "grid_size" else 1)
    for key, lo in (("jackknife_groups", 0), ("kid_subsets", 1), ("kid_subset_size", 2)):
        check_int(f"fid.{key}", cfg.fid[key], lo)
    groups = cfg.fid.jackknife_groups
    if groups == 1 or groups > cfg.num_samples:
        raise ConfigError(f"fid.jackknife_groups={groups} is invalid; use 0 (none) or 2 to "
                          f"num_samples={cfg.num_samples}")
    if str(cfg.precision) not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r} is not supported for sampling; use "
                          f"{' or '.join(PRECISIONS)} (the U-Net under bf16 autocast)")
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"metrics={list(cfg.metrics)} has unknown {unknown[0]!r}; "
                          f"valid: {', '.join(METRICS)}")
    return {k: v for k, v in cfg.sampler.items() if v is not None}


def check_inception(cfg: DictConfig) -> None:
    """Fail fast when the Inception weights are missing, or lack the classifier IS needs."""
    from ddpm_lightning.metrics import fid as fidlib
    from ddpm_lightning.metrics.inception import has_fc

    path = fidlib.resolve_weights(cfg.fid.weights_path, cfg.fid.download)
    if "is" in cfg.metrics and path is not None \
            and not has_fc(torch.load(path, map_location="cpu", weights_only=True)):
        raise ConfigError(
            f"metrics=[is]: Inception Score needs the 1008-class fc layer, which the offline "
            f"weights at {path} lack; use the original torch-fidelity weights "
            "(fid.download=true online, or fid.weights_path=that file)"
        )


def build(cfg: DictConfig) -> SamplingJob:
    """Load the checkpoint, check every setting, start Fabric and prepare the network."""
    from lightning.fabric import Fabric

    from ddpm_lightning.core.inference import prepare
    from ddpm_lightning.training.checkpoint import load_module

    module, run_config, ckpt = load_module(cfg.ckpt_path, model_config=cfg.model)
    T = module.diffusion.num_timesteps
    settings = module.sampler.updated(validate(cfg), T, key="sampler")
    if INCEPTION_METRICS & set(cfg.metrics):
        check_inception(cfg)  # missing or fc-less weights fail before hours of sampling
        if cfg.num_samples < 50_000:
            print(f"note: num_samples={cfg.num_samples}: FID and IS are biased with fewer than "
                  "the paper's 50,000 samples (2,000 samples leave an FID floor near 30)",
                  file=sys.stderr)
    # The precision is applied by prepare (bf16 autocast around the network only, the chain in
    # fp32), not by Fabric, whose autocast would also cover the sampler's arithmetic.
    strategy = "auto"
    if cfg.devices > 1:  # with the training runs' process-group timeout (trainer=ddp)
        from datetime import timedelta

        from lightning.fabric.strategies import DDPStrategy

        strategy = DDPStrategy(timeout=timedelta(minutes=10))
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, precision="32-true",
                    strategy=strategy)
    fabric.launch()
    raw = fabric.to_device(module.ema_model if cfg.use_ema else module.model)
    bf16 = str(cfg.precision) == "bf16-mixed"
    net = prepare(raw, channels_last=cfg.channels_last, compile=cfg.compile, bf16=bf16)
    # bits/dim always in fp32 (a bound, not a look): a second wrapper only under bf16
    nll_net = prepare(raw, channels_last=cfg.channels_last, compile=cfg.compile) if bf16 else net
    results = {"ckpt_path": str(cfg.ckpt_path), "global_step": ckpt.get("global_step"),
               "use_ema": cfg.use_ema, "sampler": settings.config(),
               "num_samples": cfg.num_samples}
    return SamplingJob(cfg, module, settings, fabric, net, run_config, ckpt, results,
                       nll_net=nll_net)


def draw(job: SamplingJob) -> torch.Tensor | None:
    """All the samples (uint8) in index order on rank 0, each rank drawing its share; None on
    the other ranks."""
    from ddpm_lightning.core.generate import generate
    from ddpm_lightning.training.distributed import gather_to_rank_zero, on_rank_zero

    cfg, fabric = job.cfg, job.fabric
    shape = (job.net.in_channels, job.net.image_size, job.net.image_size)
    indices, images = generate(job.net, job.module.diffusion, cfg.num_samples, cfg.batch_size,
                               shape, seed=cfg.seed, rank=fabric.global_rank,
                               world_size=fabric.world_size, device=fabric.device,
                               settings=job.settings, progress=cfg.progress and job.is_global_zero)
    indices, images = gather_to_rank_zero(indices, images, fabric.device)
    # rank 0's check of the gathered indices fails on every rank (none is left waiting)
    return on_rank_zero("gathering the samples", check_indices, indices, images)


def check_indices(indices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``images`` in index order, checked to be samples 0..N-1 exactly once."""
    order = torch.argsort(indices)
    if not torch.equal(indices[order], torch.arange(indices.numel())):
        raise RuntimeError("gathered sample indices are not 0..N-1 exactly once")
    return images[order]


def save(out_dir: Path, images: torch.Tensor, grid_size: int) -> None:
    """samples.npz (uint8 NHWC, the layout the TF FID/IS evaluators read; written atomically)
    and grid.png of the first ``grid_size`` images."""
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "samples.tmp.npz"
    np.savez(tmp, arr_0=images.permute(0, 2, 3, 1).contiguous().numpy())
    tmp.replace(out_dir / "samples.npz")
    if grid_size:
        from torchvision.utils import save_image

        grid = images[:grid_size].float() / 255.0
        save_image(grid, out_dir / "grid.png", nrow=int(np.ceil(np.sqrt(grid.shape[0]))))


def _datamodule(job: SamplingJob, **kwargs):
    from hydra.utils import instantiate

    return instantiate(dict(job.run_config["data"]), num_workers=0, **kwargs)


def nll(job: SamplingJob) -> dict:
    """The bound in bits/dim (and its parts) on the configured split, summed over ranks."""
    from ddpm_lightning.core.generate import bits_per_dim

    cfg, fabric = job.cfg, job.fabric
    dm = _datamodule(job, batch_size=cfg.nll.batch_size)
    dm.setup("test")
    loader = dm.test_dataloader() if cfg.nll.split == "test" else dm.train_dataloader()
    sums = bits_per_dim(job.nll_net or job.net, job.module.diffusion, loader, fabric.global_rank,
                        fabric.world_size, fabric.device, cfg.nll.max_images,
                        progress=cfg.progress and job.is_global_zero)
    if fabric.world_size > 1:
        sums = {k: fabric.all_reduce(v.to(fabric.device), reduce_op="sum").cpu()
                for k, v in sums.items()}
    n = float(sums.pop("count"))
    return {"split": cfg.nll.split, "images": int(n),
            **{f"{k}_bpd": float(v) / n for k, v in sums.items()}}


def quality(job: SamplingJob, images: torch.Tensor) -> dict:
    """FID (with its jackknife standard error when ``fid.jackknife_groups`` > 0) and KID against
    the cached reference (statistics, and features for KID), and the Inception Score, as
    requested. The samples' features are computed once for FID and KID."""
    from ddpm_lightning.metrics import fid as fidlib
    from ddpm_lightning.metrics.kid import kid_from_features, kid_jackknife
    from ddpm_lightning.metrics.reference import reference_stats

    cfg, device, out = job.cfg.fid, job.fabric.device, {}
    wanted = set(job.cfg.metrics)
    n = int(images.shape[0])
    if {"fid", "kid"} & wanted:
        ref = reference_stats(_datamodule(job), split=cfg.reference_split,
                              max_images=cfg.reference_max_images, device=device,
                              weights_path=cfg.weights_path, download=cfg.download,
                              features="kid" in wanted)
        features = fidlib.inception_features(images, device=device,
                                             weights_path=cfg.weights_path,
                                             download=cfg.download).cpu()
        where = {"reference": cfg.reference_split, "num_samples": n}
        if "fid" in wanted:
            frechet = fidlib.FrechetToReference(*ref[:2])
            out["fid"] = {"value": frechet(features), **where}
            if cfg.jackknife_groups:
                jack = frechet.jackknife(features, cfg.jackknife_groups)
                out["fid"].update(se=jack["se"], low=jack["low"], high=jack["high"],
                                  jackknife_groups=cfg.jackknife_groups)
        if "kid" in wanted:
            size = min(cfg.kid_subset_size, n, len(ref[2]))
            kid = kid_from_features(features, ref[2], cfg.kid_subsets, size, seed=job.cfg.seed)
            out["kid"] = {"value": kid["kid"], "std": kid["kid_std"], "subsets": kid["subsets"],
                          "subset_size": kid["subset_size"], **where}
            if cfg.jackknife_groups:  # KID's error at this N, from the same groups as FID's
                out["kid"].update(se=kid_jackknife(features, ref[2], cfg.jackknife_groups)["se"],
                                  jackknife_groups=cfg.jackknife_groups)
    if "is" in wanted:
        mean, std = fidlib.inception_score(images, splits=cfg.is_splits, device=device,
                                           weights_path=cfg.weights_path, download=cfg.download)
        out["is"] = {"mean": mean, "std": std, "splits": cfg.is_splits}
    return out


def run(job: SamplingJob, out_dir: Path) -> dict:
    """Sample, save, evaluate; metrics.json on rank 0. Returns the results."""
    from ddpm_lightning.training.distributed import on_rank_zero

    images = draw(job)
    metrics = set(job.cfg.metrics)
    # the other ranks go on to the bits/dim, a collective: a failed save must end them too
    on_rank_zero(f"saving the samples in {out_dir}", save, out_dir, images, job.cfg.grid_size)
    if "nll" in metrics:
        job.results["nll"] = nll(job)
    if job.is_global_zero and INCEPTION_METRICS & metrics:
        job.results.update(quality(job, images))
    if job.is_global_zero:
        (out_dir / "metrics.json").write_text(json.dumps(job.results, indent=2) + "\n")
    return job.results
