"""Throughput benchmark: our DDPM training step and U-Net against diffusers' ``UNet2DModel``.

    python -m ddpm_lightning.tools.bench [--model unet_cifar10 | conf/model/X.yaml] [--batch 16]
        [--precision 32 bf16-mixed] [--reps 5] [--threads N] [--json out.json]
        [--skip-diffusers] [--device cpu|cuda] [--compile [MODE]] [--no-channels-last]
        [--sampler-steps 4] [--sampler-rounds N] [--quick]

Everything runs in one process with one thread setting, so that both sides see the same
machine. For each precision it measures, in images per second:

* **train step**: what the LightningModule does per batch: ``GaussianDiffusion.training_loss``
  (t ~ U{0..T-1}, ε ~ N(0, I), L_simple) under the precision's autocast, backward, the Adam step
  and lr schedule of ``DDPM.configure_optimizers``, zero_grad and ``DDPM.update_ema``. Both
  networks run inside a ``DDPM`` module, so the loss, optimizer and EMA code are the same;
  only the network differs (Lightning's logging is left out).
* **forward**: one ``no_grad`` call of the EMA network, as the samplers make it.

The diffusers network (the optional extra ``bench``) is built with the identical architecture
(``convert.expected_diffusers_config``, same dropout and parameter count) and runs as shipped:
NCHW, eager (its attention reshapes with ``view``, which needs NCHW). ``--compile`` and
``--no-channels-last`` apply to our network only. Samples are interleaved (ours, diffusers,
diffusers, ours, ...) after warm-up rounds, and reported as median [min–max].

It also reports the sampler overhead (time per DDPM / DDIM step of ``samplers.sample`` divided
by the time of a bare forward at the same batch; plus the sampling loop alone, timed with a
stub network), the dataloader throughput on the default data (``DiffusionDataModule()`` on the
embedded digits, ``on_after_batch_transfer`` included) relative to our training throughput,
the FLOPs per image (``FlopCounterMode``, attention counted through its math decomposition;
"model" FLOPs of the textbook network and the "executed" ones of our CPU fast paths) and the
achieved GFLOP/s (model FLOPs) as a fraction of this machine's dense peak, measured in the same
run (large fp32 and bf16 matmul and 3x3 conv). It records how busy other processes kept the
CPUs, since a shared machine makes the timings noisy. ``--quick`` runs a tiny model with few
repetitions (used by the tests).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ddpm_lightning.app import CONF_DIR
from ddpm_lightning.tools.bench_parts import (
    TrainStep,
    dataloader_throughput,
    forward_fn,
    sampler_overhead,
)
from ddpm_lightning.tools.bench_report import report
from ddpm_lightning.tools.measure import (
    OtherLoad,
    cpu_name,
    flops_per_image,
    interleaved,
    measure_peak,
    package_version,
    rate,
    summary,
)

CONF_MODEL = CONF_DIR / "model"
PRECISIONS = {"32": "32", "32-true": "32", "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed"}
# The goals of the project's performance issue (paper CIFAR-10 U-Net, batch 16, one CPU).
TARGETS = {
    "train_fp32_vs_diffusers_fp32": 1.1,
    "train_bf16_vs_diffusers_fp32": 1.6,
    "train_bf16_vs_diffusers_bf16": 1.15,  # like for like: each precision against its own
    "sampler_step_over_forward_max": 1.02,
    "dataloader_over_train_min": 10.0,
}
# A small U-Net for --quick: two levels, attention at the lower one.
QUICK_MODEL = {"_target_": "ddpm_lightning.core.unet.UNet", "in_channels": 1, "ch": 32,
               "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
               "dropout": 0.1, "image_size": 16}


# ---------------------------------------------------------------------------------- models

def load_model_config(spec: str | Mapping) -> dict:
    """A ``model`` config from a mapping, a YAML path, or a name in ``conf/model``."""
    from omegaconf import OmegaConf

    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    if not path.suffix:
        path = CONF_MODEL / f"{spec}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONF_MODEL.glob("*.yaml")))
        raise SystemExit(f"--model {spec}: no such file; give a YAML path or one of: {names}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


class DiffusersEps(nn.Module):
    """diffusers' ``UNet2DModel`` as ε_θ(x_t, t): returns its output's ``.sample``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def build_diffusers(model_cfg: Mapping) -> nn.Module:
    """diffusers' UNet2DModel with the architecture of our ``model_cfg``."""
    from diffusers import UNet2DModel

    from ddpm_lightning.tools.convert import expected_diffusers_config

    config = expected_diffusers_config(model_cfg)
    config["dropout"] = float(model_cfg.get("dropout", 0.1))
    return DiffusersEps(UNet2DModel(**config))


def build_module(net: nn.Module, betas, **speed):
    from ddpm_lightning.training.module import DDPM

    return DDPM(net, betas, **speed).train()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------ main

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ddpm_lightning.tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="conf/model name or YAML path (default unet_cifar10; --quick: a tiny net)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16; --quick: 4)")
    p.add_argument("--precision", nargs="+", default=["32", "bf16-mixed"],
                   choices=sorted(PRECISIONS), help="one or more (default: 32 bf16-mixed)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per side (default 5; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for everything (default: torch's current)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--skip-diffusers", action="store_true", help="measure our side only")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                   help="torch.compile our training network (DDPM compile=...); optional mode")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="our weights channels-last (DDPM channels_last; default on)")
    p.add_argument("--sampler-steps", type=int, default=None,
                   help="steps per sampler run for the overhead (default 4; --quick: 2)")
    p.add_argument("--sampler-rounds", type=int, default=None,
                   help="timed rounds of the sampler overhead (default: 2 x reps, at least 6)")
    p.add_argument("--quick", action="store_true", help="tiny model, few repetitions")
    args = p.parse_args(argv)
    quick = args.quick
    args.model = args.model or (QUICK_MODEL if quick else "unet_cifar10")
    args.batch = args.batch or (4 if quick else 16)
    args.reps = args.reps or (2 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.sampler_steps = args.sampler_steps or (2 if quick else 4)
    args.sampler_rounds = args.sampler_rounds or (2 if quick else max(2 * args.reps, 6))
    args.precision = list(dict.fromkeys(PRECISIONS[p] for p in args.precision))
    for key in ("batch", "reps", "sampler_steps", "sampler_rounds"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    from hydra.utils import instantiate

    from ddpm_lightning.core.schedules import make_beta_schedule

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # the training default (module.tf32: true), and its peak below
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    notes: list[str] = []
    model_cfg = load_model_config(args.model)
    model_name = args.model if isinstance(args.model, str) else "quick (tiny UNet)"
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    use_diffusers = has_diffusers and not args.skip_diffusers
    if not has_diffusers and not args.skip_diffusers:
        notes.append("diffusers is not installed (pip install 'ddpm-lightning[bench]'): "
                     "its columns are skipped")

    torch.manual_seed(0)
    betas = make_beta_schedule("linear", 1000)
    ours = build_module(instantiate(model_cfg), betas, channels_last=args.channels_last,
                        compile=args.compile).to(device)
    theirs = None
    if use_diffusers:
        try:
            theirs = build_module(build_diffusers(model_cfg), betas, channels_last=False)
        except ValueError as err:  # not a UNet config that diffusers can express
            notes.append(f"diffusers side skipped: {err}")
    if theirs is not None:
        theirs = theirs.to(device)
        if n_params(theirs.model) != n_params(ours.model):
            notes.append(f"parameter counts differ: ours {n_params(ours.model):,}, diffusers "
                         f"{n_params(theirs.model):,}")
    net = ours.model
    shape = (args.batch, net.in_channels, net.image_size, net.image_size)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    t_fwd = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    result: dict = {
        "config": {
            "model": model_name, "model_config": model_cfg, "batch": args.batch,
            "precisions": args.precision, "reps": args.reps, "warmup": args.warmup,
            "sampler_steps": args.sampler_steps, "sampler_rounds": args.sampler_rounds,
            "threads": torch.get_num_threads(), "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else cpu_name()),
            "torch": torch.__version__,
            "diffusers": package_version("diffusers") if has_diffusers else None,
            "ours": {"channels_last": args.channels_last, "compile": args.compile},
            "tf32": device.type == "cuda",  # fp32 matmuls and convolutions in TF32
            "params": {"ours": n_params(ours.model),
                       "diffusers": n_params(theirs.model) if theirs is not None else None},
        },
        "notes": notes,
    }
    load = OtherLoad().start()
    _progress("measuring the dense peak")
    result["peak_gflops"] = measure_peak(device, args.reps, args.quick)

    _progress("counting FLOPs")
    result["flops"] = {side: flops_per_image(module.ema_model, x0, t_fwd)
                       for side, module in (("ours", ours), ("diffusers", theirs))
                       if module is not None}

    result["precision"] = {}
    for precision in args.precision:
        _progress(f"timing train step and forward, precision {precision}")
        fns = {"ours/train": TrainStep(ours, x0, precision)}
        if theirs is not None:
            fns["diffusers/train"] = TrainStep(theirs, x0, precision)
        fns["ours/forward"] = forward_fn(ours, x0, t_fwd, precision)
        if theirs is not None:
            fns["diffusers/forward"] = forward_fn(theirs, x0, t_fwd, precision)
        times = interleaved(fns, args.reps, args.warmup, device)
        for name, step in fns.items():
            if isinstance(step, TrainStep) and not torch.isfinite(step.last_loss):
                notes.append(f"{name} ({precision}): non-finite loss {step.last_loss.item()}")
        peak = result["peak_gflops"]["bf16" if precision == "bf16-mixed" else "fp32"]
        entry: dict = {}
        for name, secs in times.items():
            side, what = name.split("/")
            r = rate(secs, args.batch)
            per_image = result["flops"][side][f"model_{what}"]
            gflops = per_image * r["median"] / 1e9
            entry.setdefault(side, {})[what] = {
                "images_per_s": r, "step_s": summary(secs), "gflops": gflops,
                "fraction_of_peak": gflops / peak}
        if "diffusers" in entry:
            entry["speedup"] = {w: entry["ours"][w]["images_per_s"]["median"]
                                / entry["diffusers"][w]["images_per_s"]["median"]
                                for w in ("train", "forward")}
        result["precision"][precision] = entry

    for precision in args.precision:
        _progress(f"timing the samplers, precision {precision}")
        result["precision"][precision]["sampler"] = sampler_overhead(
            ours, shape, precision, args.sampler_steps, args.sampler_rounds, 1, device)

    _progress("timing the dataloader")
    loader = dataloader_throughput(args.batch, device, max(args.reps, 3), args.quick)
    loader["over_train"] = {
        p: loader["images_per_s"]["median"]
        / result["precision"][p]["ours"]["train"]["images_per_s"]["median"]
        for p in args.precision}
    result["dataloader"] = loader
    other = load.stop()
    result["config"]["other_processes_cpus"] = other
    if other is not None and other > 0.2:
        notes.append(f"other processes kept {other:.1f} CPUs busy on average during this run: "
                     "the timings are noisy; re-run on a quiet machine")
    result["targets"] = targets(result)
    return result


def targets(result: dict) -> dict:
    """The measured values next to the project's goals, which are set for the paper's CIFAR-10
    U-Net at batch 16 on the CPU (``paper_config`` says whether this run is that case)."""
    cfg, prec = result["config"], result["precision"]
    checks = {}

    def add(key, value, target, higher_is_better=True):
        met = value >= target if higher_is_better else value <= target
        checks[key] = {"value": value, "target": target, "met": bool(met),
                       "higher_is_better": higher_is_better}

    base = prec.get("32", {}).get("diffusers", {}).get("train")
    if base is not None:
        base_rate = base["images_per_s"]["median"]
        for p, key in (("32", "train_fp32_vs_diffusers_fp32"),
                       ("bf16-mixed", "train_bf16_vs_diffusers_fp32")):
            if p in prec:
                add(key, prec[p]["ours"]["train"]["images_per_s"]["median"] / base_rate,
                    TARGETS[key])
    bf16 = prec.get("bf16-mixed", {})
    if "speedup" in bf16:
        add("train_bf16_vs_diffusers_bf16", bf16["speedup"]["train"],
            TARGETS["train_bf16_vs_diffusers_bf16"])
    for p, entry in prec.items():
        for name in ("ddpm", "ddim"):
            add(f"sampler_{name}_step_over_forward_{p}",
                entry["sampler"][name]["step_over_forward"]["median"],
                TARGETS["sampler_step_over_forward_max"], higher_is_better=False)
    for p, value in result["dataloader"]["over_train"].items():
        add(f"dataloader_over_train_{p}", value, TARGETS["dataloader_over_train_min"])
    paper = (cfg["model_config"] == load_model_config("unet_cifar10") and cfg["batch"] == 16
             and cfg["device"] == "cpu")
    return {"paper_config": paper, "checks": checks}


def _progress(message: str) -> None:
    print(f"[bench] {message} ...", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
        print(f"\nwrote {path}")
    return result


def _json_default(value):
    return str(value)  # e.g. a compile mode given as something other than a string


if __name__ == "__main__":
    main()
