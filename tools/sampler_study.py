"""Why deterministic sampling fails on an under-trained model, measured (README "Samplers").

    python tools/sampler_study.py CKPT [CKPT ...] [--n 64] [--out docs/sampler_study]

For each checkpoint it prints:
  * ε̂ against the truth on held-out images, at several t: mean, std, and RMSE of ε̂ − ε;
  * for each sampler variant at 100 and 20 network evaluations, from one fixed x_T per image:
    the share of "speckled" samples, i.e. images whose total variation (mean |Δx| between
    neighbouring pixels) exceeds the largest of (up to) 1,000 real held-out images;
and writes one grid per checkpoint with a row of 16 samples per variant (same x_T in every row).

``--fid N --fid-variants A B …`` adds, for the named variants, an FID of N samples against
the held-out test split (``--fid-ref`` images; the reference statistics are cached). FID at
small N is biased upwards: compare the numbers with each other, not with papers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm_lightning.core.pixels import to_model_range
from ddpm_lightning.core.samplers import denoise, sample
from ddpm_lightning.metrics.speckle import total_variation
from ddpm_lightning.training.checkpoint import load_module
from ddpm_lightning.training.data import DiffusionDataModule

VARIANTS = {
    "ddpm small": dict(sampler="ddpm", variance="small"),
    "ddpm large": dict(sampler="ddpm", variance="large"),
    "ddim η=0 clip+rederive linspace (old default)": dict(sampler="ddim", spacing="linspace"),
    "ddim η=0 clip+raw ε̂": dict(sampler="ddim", clip="raw_eps"),
    "ddim η=0 no clip": dict(sampler="ddim", clip="none"),
    "ddim η=0 dynamic threshold": dict(sampler="ddim", clip="dynamic"),
    "ddim η=0 leading": dict(sampler="ddim", spacing="leading"),
    "ddim η=0 trailing": dict(sampler="ddim", spacing="trailing"),
    "ddim η=1": dict(sampler="ddim", eta=1.0),
    "dpm-solver++ ODE": dict(sampler="dpm_solver"),
    "dpm-solver++ SDE": dict(sampler="dpm_solver", sde=True),
}


def eps_stats(net, diffusion, x0, ts=(999, 900, 500, 100, 10, 0)) -> list[dict]:
    """ε̂ (from v̂, x̂_0 or µ̃ where the network predicts those) against the true ε, at the t of
    a 1,000-step chain (scaled to the chain's T)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    T = diffusion.num_timesteps
    with torch.inference_mode():
        for t in dict.fromkeys(t * T // 1000 for t in ts):
            eps = torch.randn(x0.shape, generator=g)
            tt = torch.full((x0.shape[0],), t)
            e = denoise(diffusion, net, diffusion.q_sample(x0, tt, eps), tt, clip="none")["pred_eps"]
            rows.append({"t": t, "mean": e.mean().item(), "std": e.std().item(),
                         "rmse": (e - eps).pow(2).mean().sqrt().item()})
    return rows


def _fid(net, diffusion, data, kw, nfe, n, ref) -> float:
    from ddpm_lightning.core.pixels import to_uint8
    from ddpm_lightning.metrics.fid import compute_fid

    images = []
    for k in range(0, n, 250):
        x_T = torch.randn((min(250, n - k), *data.val_set[0].shape),
                          generator=torch.Generator().manual_seed(10_000 + k))
        x = sample(net, diffusion, None, steps=nfe, noise=x_T,
                   generator=torch.Generator().manual_seed(20_000 + k), **kw)
        images.append(to_uint8(x.float()))
    return compute_fid(torch.cat(images), ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--n", type=int, default=64, help="samples per variant and NFE")
    parser.add_argument("--nfe", type=int, nargs="+", default=[100, 20])
    parser.add_argument("--out", default="docs/sampler_study")
    parser.add_argument("--fid", type=int, default=0, help="samples per FID (0: no FID)")
    parser.add_argument("--fid-variants", nargs="*", default=[])
    parser.add_argument("--fid-ref", type=int, default=2000, help="test images in the reference")
    parser.add_argument("--skip-speckle", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from torchvision.utils import save_image

    results = {}
    for ckpt in args.ckpts:
        module, run_config, meta = load_module(ckpt)
        net, diffusion = module.ema_model.eval(), module.diffusion
        data = DiffusionDataModule(**{k: v for k, v in run_config["data"].items()
                                      if k != "_target_"})
        data.setup()
        # the held-out images, up to 1,000 (the embedded digits hold 500)
        real = to_model_range(torch.stack([data.val_set[i]
                                           for i in range(min(1000, len(data.val_set)))]))
        threshold = total_variation(real).max().item()
        shape = (args.n, *real.shape[1:])
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        step = meta["global_step"]
        row = {"step": step, "tv_threshold": threshold,
               "eps": eps_stats(net, diffusion, real[:64]), "speckled": {}}
        print(f"\n== {ckpt} (step {step}); speckle threshold TV > {threshold:.3f}")
        for r in row["eps"]:
            print(f"  t={r['t']:4d}  ε̂ mean {r['mean']:+.4f}  std {r['std']:.4f}  "
                  f"RMSE(ε̂−ε) {r['rmse']:.4f}")
        grids = {}
        if args.fid:
            from ddpm_lightning.metrics.reference import reference_stats

            ref = reference_stats(data, split="test", max_images=args.fid_ref)
        for nfe in args.nfe if args.fid else []:
            for name in args.fid_variants:
                t0 = time.perf_counter()
                fid = _fid(net, diffusion, data, VARIANTS[name], nfe, args.fid, ref)
                row.setdefault("fid", {})[f"{name} @ {nfe}"] = fid
                print(f"  {nfe:4d} NFE  {name:48s} FID {fid:7.2f} (N={args.fid}, "
                      f"ref {args.fid_ref} test images; {time.perf_counter() - t0:.0f} s)")
        for nfe in [] if args.skip_speckle else args.nfe:
            for name, kw in VARIANTS.items():
                t0 = time.perf_counter()
                x = sample(net, diffusion, None, steps=nfe, noise=x_T,
                           generator=torch.Generator().manual_seed(1), **kw)
                share = (total_variation(x) > threshold).float().mean().item()
                row["speckled"][f"{name} @ {nfe}"] = share
                grids.setdefault(nfe, []).append(x[:16])
                print(f"  {nfe:4d} NFE  {name:48s} speckled {share:6.1%}  "
                      f"({time.perf_counter() - t0:.1f} s)")
        for nfe, rows in grids.items():
            save_image((torch.cat(rows).float() + 1) / 2, out / f"step{step:05d}_nfe{nfe}.png",
                       nrow=16, padding=1)
        results[str(ckpt)] = row
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}/results.json and the grids (rows in the order of VARIANTS)")


if __name__ == "__main__":
    main()
