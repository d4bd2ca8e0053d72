"""make gpu-check: one prepared check of the paper recipe on one CUDA GPU (≤ 5 minutes).

    python tools/gpu_check.py [--out gpu_check.json] [--quick --device cpu]

It writes one JSON file with:
  (a) bench: ``python -m ddpm_lightning.tools.bench`` at batch 128 on the GPU, fp32 and bf16-mixed,
      channels-last, eager and compiled, against diffusers' UNet2DModel: img/s, GFLOP/s and
      the share of the measured dense peak;
  (b) fit: 300 steps of ``train.py experiment=cifar10_ddpm trainer=gpu`` (bf16-mixed) on
      synthetic CIFAR-shaped uint8 data (no download), held on the GPU: steady-state img/s
      (the ``train/images_per_sec`` windows of 50 steps after step 100, with their TFLOP/s
      and MFU) and the projected time of the paper's 800k steps;
  (c) sampling 1,000 images with the default fast sampler (SDE-DPM-Solver++, 50 steps) and
      with DDPM-1000, the U-Net in bf16: images/s;
  (d) the Inception feature throughput (FID), images/s;
  (e) the peak GPU memory of each part.

A part that fails is recorded with its error and the others still run; the exit code is then
1. Without a CUDA device it stops at once with a one-line message. ``--quick --device cpu``
runs the same code on a tiny model and a few steps (the test suite does this).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_STEPS, PAPER_BATCH = 800_000, 128
TINY_MODEL = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
              "model.attn_resolutions=[8]", "model.image_size=16", "data.image_size=16"]


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_memory_gib": round(peak, 2)}


def part_bench(args, device) -> dict:
    from ddpm_lightning.tools import bench

    out = {}
    for compiled in (False, True):
        argv = ["--device", device.type, "--precision", "32", "bf16-mixed"]
        argv += ["--quick"] if args.quick else ["--batch", "128", "--reps", "10"]
        argv += ["--compile"] if compiled else []
        result = bench.run(bench.parse_args(argv))
        rows = {}
        for precision, entry in result["precision"].items():
            rows[precision] = {
                side: {"images_per_s": entry[side]["train"]["images_per_s"]["median"],
                       "gflops": entry[side]["train"]["gflops"],
                       "fraction_of_peak": entry[side]["train"]["fraction_of_peak"]}
                for side in ("ours", "diffusers") if side in entry}
            if "speedup" in entry:
                rows[precision]["train_speedup_over_diffusers"] = entry["speedup"]["train"]
        out["compiled" if compiled else "eager"] = {
            "train_step": rows, "peak_gflops": result["peak_gflops"], "notes": result["notes"]}
    return out


def part_fit(args, device) -> dict:
    steps = 30 if args.quick else 300
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), "experiment=cifar10_ddpm",
               "data.dataset=synthetic", "data.on_device=true", "logger=csv",
               "callbacks.sample_grid=null", f"trainer.max_steps={steps}",
               "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
               "trainer.limit_val_batches=0", f"hydra.run.dir={tmp}/run"]
        cmd += ["trainer=cpu", *TINY_MODEL, "data.batch_size=8",
                "module.check_every_n_steps=5"] if args.quick else \
            ["trainer=gpu", "trainer.precision=bf16-mixed"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"train.py exited with {proc.returncode}: {last}")
        windows = _windows(Path(tmp) / "run", first_step=steps // 3)
    batch = 8 if args.quick else PAPER_BATCH
    rates = [w["images_per_sec"] for w in windows]
    img_s = len(rates) / sum(1 / r for r in rates)  # equal windows: total images / total time
    out = {"steps": steps, "batch": batch, "wall_s": round(wall, 1),
           "steady_images_per_s": round(img_s, 1), "windows": len(rates),
           "projected_800k_steps_h": round(PAPER_STEPS * PAPER_BATCH / img_s / 3600, 2)}
    for key in ("tflops_per_sec", "mfu"):
        values = [w[key] for w in windows if key in w]
        if values:
            out[key] = round(sum(values) / len(values), 4)
    return out


def _windows(run: Path, first_step: int) -> list[dict]:
    """The throughput rows (``train/images_per_sec``, ``…tflops_per_sec``, ``…mfu``) logged
    after ``first_step``."""
    import csv

    rows = []
    for path in run.rglob("metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if row.get("train/images_per_sec") and step and int(step) > first_step:
                    rows.append({k.removeprefix("train/"): float(v) for k, v in row.items()
                                 if k.startswith("train/") and v and k != "train/loss"})
    if not rows:
        raise RuntimeError(f"no train/images_per_sec after step {first_step} in {run}")
    return rows


def part_sampling(args, device) -> dict:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ddpm_lightning.core.diffusion import GaussianDiffusion
    from ddpm_lightning.core.generate import generate
    from ddpm_lightning.core.inference import prepare
    from ddpm_lightning.core.samplers import SamplerSettings
    from ddpm_lightning.core.schedules import make_beta_schedule

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "unet_cifar10.yaml")
    if args.quick:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(
            [o.removeprefix("model.") for o in TINY_MODEL if o.startswith("model.")]))
    T = 20 if args.quick else 1000
    net = prepare(instantiate(cfg).to(device), bf16=True)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", T))
    shape = (net.in_channels, net.image_size, net.image_size)
    n, batch = (8, 4) if args.quick else (1000, 500)
    out = {"num_samples": n, "batch": batch, "precision": "bf16 U-Net, fp32 chain"}
    for label, settings in (("dpm_solver_sde_50", {"name": "dpm_solver", "sde": True,
                                                   "steps": 4 if args.quick else 50}),
                            ("ddpm_1000", {"name": "ddpm", "steps": None})):
        settings = SamplerSettings.parse(settings, T, key=label)
        generate(net, diffusion, batch, batch, shape, device=device, settings=settings)  # warm-up
        _sync(device)
        start = time.perf_counter()
        generate(net, diffusion, n, batch, shape, device=device, settings=settings)
        _sync(device)
        seconds = time.perf_counter() - start
        out[label] = {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2)}
    return out


def part_inception(args, device) -> dict:
    from ddpm_lightning.metrics import fid

    n = 16 if args.quick else 5000
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    fid.inception_features(images[:8], batch_size=8, device=device)  # load and warm up
    _sync(device)
    start = time.perf_counter()
    fid.inception_features(images, batch_size=8 if args.quick else 500, device=device)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images": n, "images_per_s": round(n / seconds, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PARTS = {"bench": part_bench, "fit": part_fit, "sampling": part_sampling,
         "inception": part_inception}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (tests)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: make gpu-check needs a CUDA GPU, and torch {torch.__version__} sees none "
              "on this machine (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "quick": args.quick, "parts": {}}
    failed = False
    for name in args.parts:
        start = time.perf_counter()
        print(f"gpu-check: {name} …", file=sys.stderr, flush=True)
        try:
            entry = PARTS[name](args, device)
        except Exception as err:  # noqa: BLE001 - record it, run the other parts
            entry, failed = {"error": f"{type(err).__name__}: {err}"}, True
        entry.update(_memory(device), seconds=round(time.perf_counter() - start, 1))
        result["parts"][name] = entry
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # kept if stopped later
    print(f"wrote {args.out}" + (" (a part failed: see its error)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
