"""Sample from a trained DDPM and evaluate it (see README):

    python sample.py ckpt_path=RUN/checkpoints/last.ckpt num_samples=50000 metrics=[fid,is]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning import runtime

METRICS = ("fid", "is", "nll")


def validate(cfg: DictConfig, T: int) -> dict:
    """Check the request before any work; return the sampler settings to use."""
    for key in ("num_samples", "batch_size", "devices", "grid_size"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "grid_size" else 1):
            raise runtime.ConfigError(f"{key}={value!r} is invalid; it must be an integer >= 1")
    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise runtime.ConfigError(f"metrics={list(cfg.metrics)} has unknown {unknown[0]!r}; "
                                  f"valid: {', '.join(METRICS)}")
    return {k: v for k, v in cfg.sampler.items() if v is not None}


def gather(fabric, indices, images):
    """All ranks' (indices, images) on every rank, ordered by index, without duplicates."""
    import torch

    if fabric.world_size == 1:
        return indices, images
    n = torch.tensor([indices.numel()], device=fabric.device)
    most = int(fabric.all_gather(n).max())
    pad_idx = torch.full((most,), -1, dtype=torch.long)
    pad_img = torch.zeros((most, *images.shape[1:]), dtype=torch.uint8)
    pad_idx[: indices.numel()] = indices
    pad_img[: images.shape[0]] = images
    all_idx = fabric.all_gather(pad_idx.to(fabric.device)).reshape(-1).cpu()
    all_img = fabric.all_gather(pad_img.to(fabric.device)).reshape(-1, *images.shape[1:]).cpu()
    keep = all_idx >= 0
    order = torch.argsort(all_idx[keep])
    idx, img = all_idx[keep][order], all_img[keep][order]
    if not torch.equal(idx, torch.arange(idx.numel())):
        raise RuntimeError("gathered sample indices are not 0..N-1 exactly once")
    return idx, img


def run(cfg: DictConfig, out_dir: Path) -> dict:
    import numpy as np
    from lightning.fabric import Fabric

    from ddpm_lightning.checkpoint import load_module
    from ddpm_lightning.generate import bits_per_dim, generate

    module, run_config, ckpt = load_module(cfg.ckpt_path, model_config=cfg.model)
    overrides = validate(cfg, module.diffusion.num_timesteps)
    settings = module.sampler.updated(overrides, module.diffusion.num_timesteps, key="sampler")
    if {"fid", "is"} & set(cfg.metrics):
        check_inception(cfg)  # missing or fc-less weights fail before hours of sampling
        if cfg.num_samples < 50_000:
            print(f"note: num_samples={cfg.num_samples}: FID and IS are biased with fewer than "
                  "the paper's 50,000 samples (2,000 samples leave an FID floor near 30)",
                  file=sys.stderr)
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, precision=cfg.precision,
                    strategy="ddp" if cfg.devices > 1 else "auto")
    fabric.launch()
    net = module.ema_model if cfg.use_ema else module.model
    from ddpm_lightning.inference import prepare

    net = prepare(fabric.to_device(net), channels_last=cfg.channels_last, compile=cfg.compile)
    diffusion = module.diffusion
    shape = (net.in_channels, net.image_size, net.image_size)
    results: dict = {"ckpt_path": str(cfg.ckpt_path), "global_step": ckpt.get("global_step"),
                     "use_ema": cfg.use_ema, "sampler": settings.config(), "num_samples": cfg.num_samples}

    indices, images = generate(net, diffusion, cfg.num_samples, cfg.batch_size, shape,
                               seed=cfg.seed, rank=fabric.global_rank,
                               world_size=fabric.world_size, device=fabric.device,
                               settings=settings,
                               progress=cfg.progress and fabric.is_global_zero,
                               autocast=fabric.autocast)
    _, images = gather(fabric, indices, images)

    if fabric.is_global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        tmp = out_dir / "samples.tmp.npz"
        np.savez(tmp, arr_0=nhwc)  # uint8 NHWC: the layout of the TF FID/IS evaluators
        tmp.replace(out_dir / "samples.npz")
        if cfg.grid_size:
            from torchvision.utils import save_image

            grid = images[: cfg.grid_size].float() / 255.0
            save_image(grid, out_dir / "grid.png", nrow=int(np.ceil(np.sqrt(grid.shape[0]))))

    if "nll" in cfg.metrics:
        from hydra.utils import instantiate

        dm = instantiate(dict(run_config["data"]), batch_size=cfg.nll.batch_size, num_workers=0)
        dm.setup("test")
        loader = dm.test_dataloader() if cfg.nll.split == "test" else dm.train_dataloader()
        sums = bits_per_dim(net, diffusion, loader, fabric.global_rank, fabric.world_size,
                            fabric.device, cfg.nll.max_images,
                            progress=cfg.progress and fabric.is_global_zero)
        sums = {k: fabric.all_reduce(v.to(fabric.device), reduce_op="sum").cpu()
                if fabric.world_size > 1 else v for k, v in sums.items()}
        n = float(sums.pop("count"))
        results["nll"] = {"split": cfg.nll.split, "images": int(n),
                          **{f"{k}_bpd": float(v) / n for k, v in sums.items()}}

    if fabric.is_global_zero and {"fid", "is"} & set(cfg.metrics):
        from ddpm_lightning import fid as fidlib

        weights = cfg.fid.weights_path
        device = fabric.device
        if "fid" in cfg.metrics:
            from hydra.utils import instantiate

            dm = instantiate(dict(run_config["data"]), num_workers=0)
            from ddpm_lightning.reference import reference_stats

            mu, sigma = reference_stats(dm, split=cfg.fid.reference_split,
                                        max_images=cfg.fid.reference_max_images,
                                        device=device, weights_path=weights,
                                        download=cfg.fid.download)
            value = fidlib.compute_fid(images, (mu, sigma), device=device, weights_path=weights,
                                       download=cfg.fid.download)
            results["fid"] = {"value": value, "reference": cfg.fid.reference_split,
                              "num_samples": int(images.shape[0])}
        if "is" in cfg.metrics:
            mean, std = fidlib.inception_score(images, splits=cfg.fid.is_splits, device=device,
                                               weights_path=weights, download=cfg.fid.download)
            results["is"] = {"mean": mean, "std": std, "splits": cfg.fid.is_splits}

    if fabric.is_global_zero:
        (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def check_inception(cfg: DictConfig) -> None:
    """Fail fast when the Inception weights are missing, or lack the classifier IS needs."""
    from ddpm_lightning import fid as fidlib

    path = fidlib.resolve_weights(cfg.fid.weights_path, cfg.fid.download)
    if "is" in cfg.metrics and path is not None:
        import torch

        from ddpm_lightning.inception import has_fc

        if not has_fc(torch.load(path, map_location="cpu", weights_only=True)):
            raise runtime.ConfigError(
                f"metrics=[is]: Inception Score needs the 1008-class fc layer, which the offline "
                f"weights at {path} lack; use the original torch-fidelity weights "
                "(fid.download=true online, or fid.weights_path=that file)"
            )


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ddpm_lightning.checkpoint import CheckpointError

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if OmegaConf.is_missing(cfg, "ckpt_path"):
            raise runtime.ConfigError("ckpt_path is required: ckpt_path=RUN/checkpoints/last.ckpt")
        results = run(cfg, out_dir)
    except (CheckpointError, runtime.ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        runtime.fail_before_work(err, out_dir)
        return
    runtime.end_distributed()  # every rank finished: shut the process group down cleanly
    if not runtime.is_ddp_child():
        print(f"samples: {out_dir / 'samples.npz'}  grid: {out_dir / 'grid.png'}")
        for key, value in results.items():
            if isinstance(value, dict):
                print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
