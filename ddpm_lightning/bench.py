"""Throughput benchmark: our DDPM training step and U-Net against diffusers' ``UNet2DModel``.

    python -m ddpm_lightning.bench [--model unet_cifar10 | conf/model/X.yaml] [--batch 16]
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
import contextlib
import copy
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
PRECISIONS = {"32": "32", "32-true": "32", "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed"}
# The goals of the project's performance issue (paper CIFAR-10 U-Net, batch 16, one CPU).
TARGETS = {
    "train_fp32_vs_diffusers_fp32": 1.1,
    "train_bf16_vs_diffusers_fp32": 1.6,
    "sampler_step_over_forward_max": 1.02,
    "dataloader_over_train_min": 10.0,
}
# A small U-Net for --quick: two levels, attention at the lower one.
QUICK_MODEL = {"_target_": "ddpm_lightning.unet.UNet", "in_channels": 1, "ch": 32,
               "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
               "dropout": 0.1, "image_size": 16}


# ---------------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(fns: Mapping[str, Callable[[], object]], reps: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every function, called in turn after ``warmup`` untimed rounds;
    the order alternates (a, b, b, a, a, b, ...), so that a slow spell of the machine or any
    drift hits every side alike."""
    order = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps):
        for name in order if rep % 2 == 0 else reversed(order):
            times[name].append(_timed(fns[name], device))
    return times


def summary(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "samples": list(values)}


def rate(seconds: Sequence[float], items: float) -> dict:
    """items/s: the median rate is items / median time; min and max come from the extremes."""
    out = summary([items / s for s in seconds])
    out["median"] = items / statistics.median(seconds)
    return out


def autocast(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------ peak / FLOPs

def measure_peak(device: torch.device, reps: int, quick: bool) -> dict[str, float]:
    """Dense GFLOP/s of this machine now: a square matmul and a 3x3 convolution (channels-last,
    the faster layout here) in fp32 and bf16; the best of ``reps`` timings each."""
    n, (b, c, r) = (1024, (8, 128, 16)) if quick else (2048, (32, 256, 16))
    flops = {"matmul": 2 * n**3, "conv": 2 * b * r * r * c * c * 9}
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        mat = [torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2)]
        conv = nn.Conv2d(c, c, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
        x = torch.randn(b, c, r, r, generator=g).to(device, dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            fns = {"matmul": functools.partial(torch.mm, *mat), "conv": functools.partial(conv, x)}
            times = interleaved(fns, max(reps, 3), 1, device)
        for kind, secs in times.items():
            out[f"{name}_{kind}"] = flops[kind] / min(secs) / 1e9
    out["fp32"] = max(out["fp32_matmul"], out["fp32_conv"])
    out["bf16"] = max(out["bf16_matmul"], out["bf16_conv"])
    return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` by ``FlopCounterMode``; attention runs through the math backend so
    that its matmuls are counted (the fused CPU kernels have no FLOP formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_image(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """Forward and training-step (forward + backward) FLOPs per image of ``net``, on a plain
    eager copy in training mode.

    ``model`` counts the network's textbook formulation: the copy runs on the meta device,
    where no CPU-specific fast path applies (and nothing is computed). ``executed`` counts what
    actually runs on ``x``'s device; our U-Net's CPU paths do fewer multiply-adds (see
    ``unet.Upsample``). GFLOP/s figures use the model count for both networks, so that their
    ratio is the speed ratio."""
    out = {}
    for kind, device in (("model", torch.device("meta")), ("executed", x.device)):
        plain = copy.deepcopy(net).to(device).train().requires_grad_(True)
        xd, td = x.to(device), t.to(device)
        out[f"{kind}_forward"] = count_flops(functools.partial(plain, xd, td)) / len(x)
        out[f"{kind}_train"] = count_flops(
            lambda net=plain, xd=xd, td=td: net(xd, td).float().square().mean().backward()
        ) / len(x)
    return out


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

    from .convert import expected_diffusers_config

    config = expected_diffusers_config(model_cfg)
    config["dropout"] = float(model_cfg.get("dropout", 0.1))
    return DiffusersEps(UNet2DModel(**config))


def build_module(net: nn.Module, betas, **speed):
    from .module import DDPM

    return DDPM(net, betas, **speed).train()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TrainStep:
    """One training step of a ``DDPM`` module on a fixed batch, as the LightningModule runs it
    (fresh t and ε every call), without Lightning's logging."""

    def __init__(self, module, x0: torch.Tensor, precision: str):
        self.module, self.x0, self.precision = module, x0, precision
        cfg = module.configure_optimizers()
        self.opt, self.sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
        self.last_loss: torch.Tensor | None = None

    def __call__(self) -> None:
        m = self.module
        with autocast(self.precision, self.x0.device):
            losses, _ = m.diffusion.training_loss(m.model, self.x0)
            loss = losses.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        m.update_ema()
        self.last_loss = loss.detach()


def forward_fn(module, x: torch.Tensor, t: torch.Tensor, precision: str) -> Callable[[], object]:
    net = module.ema_model  # what the samplers call

    def fwd():
        with torch.no_grad(), autocast(precision, x.device):
            return net(x, t)

    return fwd


# ------------------------------------------------------------------- sampler and dataloader

def sampler_overhead(module, shape, precision: str, steps: int, reps: int, warmup: int,
                     device: torch.device) -> dict:
    """Time per step of DDPM and DDIM sampling (``samplers.sample``, ``steps`` respaced steps,
    EMA network) over the time of one bare forward of the same network at the same batch.

    Every round times ``steps`` bare forwards and one run of each sampler, and the ratio is
    taken within the round (so that drifts cancel); ``step_over_forward`` is the median over
    the rounds. The loop's own cost is also timed directly, with the network replaced by a
    stub that returns a stored output: ``loop_over_forward`` = loop time per step / forward
    time, a precise estimate of ``step_over_forward`` - 1 (which, as a ratio of two noisy
    times, scatters by a percent or two even on a quiet machine)."""
    from .samplers import sample

    net, diffusion = module.ema_model, module.diffusion
    x = torch.randn(shape, device=device)
    t = torch.full((shape[0],), diffusion.num_timesteps - 1, device=device, dtype=torch.long)
    with torch.no_grad(), autocast(precision, device):
        stored = net(x, t)

    def bare():
        with torch.no_grad(), autocast(precision, device):
            for _ in range(steps):
                net(x, t)

    def sampler(name, model):
        def go():
            with autocast(precision, device):
                sample(model, diffusion, shape, sampler=name, steps=steps, device=device)
        return go

    def stub(x_t, t_):
        return stored

    fns = {"forward": bare, "ddpm": sampler("ddpm", net), "ddim": sampler("ddim", net)}
    times = interleaved(fns, reps, warmup, device)
    loops = interleaved({n: sampler(n, stub) for n in ("ddpm", "ddim")}, max(reps, 5), 1, device)
    per_step = {k: [s / steps for s in v] for k, v in times.items()}
    fwd = statistics.median(per_step["forward"])
    out = {"steps": steps, "rounds": reps, "forward_s": summary(per_step["forward"])}
    for name in ("ddpm", "ddim"):
        ratios = [s / f for s, f in zip(per_step[name], per_step["forward"])]
        loop = statistics.median(loops[name]) / steps
        out[name] = {"step_s": summary(per_step[name]), "step_over_forward": summary(ratios),
                     "loop_s": loop, "loop_over_forward": loop / fwd}
    return out


def dataloader_throughput(batch: int, device: torch.device, reps: int, quick: bool) -> dict:
    """Images per second of one epoch of the default training data: ``DiffusionDataModule()``
    (embedded digits) at ``batch``, moved to ``device`` and through ``on_after_batch_transfer``
    (uint8 → [-1, 1] on the device)."""
    from .data import DiffusionDataModule

    dm = DiffusionDataModule(batch_size=batch)
    dm.setup("fit")
    loader = dm.train_dataloader()
    limit = 50 if quick else None
    counted = []

    def epoch():
        n = 0
        for i, images in enumerate(loader):
            if limit is not None and i == limit:
                break
            n += dm.on_after_batch_transfer(images.to(device, non_blocking=True), 0).shape[0]
        counted.append(n)

    secs = interleaved({"epoch": epoch}, reps, 1, device)["epoch"]
    images = counted[-1]
    return {"dataset": dm.dataset, "images_per_epoch": images, "batch": batch,
            "images_per_s": rate(secs, images)}


# ------------------------------------------------------------------------------------ main

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ddpm_lightning.bench", description=__doc__,
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

    from .schedules import make_beta_schedule

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
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
                            else _cpu_name()),
            "torch": torch.__version__,
            "diffusers": _version("diffusers") if has_diffusers else None,
            "ours": {"channels_last": args.channels_last, "compile": args.compile},
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


# ----------------------------------------------------------------------------------- report

def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


class OtherLoad:
    """How many CPUs other processes kept busy, on average, between ``start()`` and ``stop()``:
    system-wide busy time (``/proc/stat``) minus this process's CPU time. Linux only (None
    elsewhere). A shared machine makes timings noisy, and a second thread very noisy."""

    def start(self) -> OtherLoad:
        self._t0, self._busy0, self._own0 = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()
        return self

    def stop(self) -> float | None:
        if self._busy0 is None:
            return None
        busy, own = _busy_cpu_s() - self._busy0, _own_cpu_s() - self._own0
        return max(busy - own, 0.0) / (time.perf_counter() - self._t0)


def _busy_cpu_s() -> float | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _progress(message: str) -> None:
    print(f"[bench] {message} ...", file=sys.stderr, flush=True)


def _fmt_rate(r: Mapping | None) -> str:
    if r is None:
        return "-"
    return f"{r['median']:.3g} [{r['min']:.3g}–{r['max']:.3g}]"


def report(result: dict) -> str:
    cfg, peak, flops = result["config"], result["peak_gflops"], result["flops"]
    params = f"{cfg['params']['ours']:,} params"
    if cfg["params"]["diffusers"]:
        params += f"; diffusers {cfg['params']['diffusers']:,}"
    gflop = "; ".join(
        f"{side} {f['model_forward'] / 1e9:.2f} / {f['model_train'] / 1e9:.2f} model"
        + (f", {f['executed_forward'] / 1e9:.2f} / {f['executed_train'] / 1e9:.2f} executed"
           if f["executed_train"] != f["model_train"] else "")
        for side, f in flops.items())
    lines = [
        (f"DDPM benchmark: model {cfg['model']} ({params}), batch {cfg['batch']}, "
         f"{cfg['threads']} threads, {cfg['device']} ({cfg['device_name']}); other processes "
         f"busy {_fmt_cpus(cfg['other_processes_cpus'])} CPUs"),
        (f"torch {cfg['torch']}, diffusers {cfg['diffusers'] or 'not installed'}; ours: "
         f"channels_last={cfg['ours']['channels_last']}, compile={cfg['ours']['compile']}; "
         f"{cfg['reps']} interleaved reps after {cfg['warmup']} warm-up: median [min–max]"),
        (f"dense peak now (GFLOP/s): fp32 matmul {peak['fp32_matmul']:.0f}, fp32 conv "
         f"{peak['fp32_conv']:.0f}, bf16 matmul {peak['bf16_matmul']:.0f}, bf16 conv "
         f"{peak['bf16_conv']:.0f}"),
        f"GFLOP per image, forward / train step: {gflop}",
        "(GFLOP/s below count the model FLOPs, so that their ratio is the speed ratio)",
        "",
    ]
    head = (f"{'precision':<11}{'what':<11}{'ours img/s':<24}{'diffusers img/s':<24}"
            f"{'ours/diff':<11}{'ours GFLOP/s (peak)':<21}{'diff GFLOP/s (peak)'}")
    lines += [head, "-" * len(head)]
    base = result["precision"].get("32", {}).get("diffusers", {}).get("train")
    for p, entry in result["precision"].items():
        for what in ("train", "forward"):
            o, d = entry["ours"][what], entry.get("diffusers", {}).get(what)
            speed = f"{entry['speedup'][what]:.3f}x" if d else "-"
            eff_o = f"{o['gflops']:.0f} ({o['fraction_of_peak']:.0%})"
            eff_d = f"{d['gflops']:.0f} ({d['fraction_of_peak']:.0%})" if d else "-"
            lines.append(f"{p:<11}{what:<11}{_fmt_rate(o['images_per_s']):<24}"
                         f"{_fmt_rate(d['images_per_s'] if d else None):<24}{speed:<11}"
                         f"{eff_o:<21}{eff_d}")
        if base is not None and p != "32":
            ratio = entry["ours"]["train"]["images_per_s"]["median"] / base["images_per_s"]["median"]
            lines.append(f"{'':<11}our {p} train step vs diffusers' fp32: {ratio:.3f}x")
    lines += ["", (f"sampler overhead (ours, EMA net, batch {cfg['batch']}): time per step / "
                   "bare forward, median [min–max] over rounds")]
    for p, entry in result["precision"].items():
        s = entry["sampler"]
        parts = [f"{n.upper()} {_fmt_ratio(s[n]['step_over_forward'])} (loop alone "
                 f"{s[n]['loop_over_forward']:.2%})" for n in ("ddpm", "ddim")]
        lines.append(f"  {p:<11}{s['rounds']} rounds of {s['steps']} steps, forward "
                     f"{s['forward_s']['median'] * 1e3:.1f} ms:  " + ",  ".join(parts))
    dl = result["dataloader"]
    ratios = ", ".join(f"{v:,.0f}x our {p} train step" for p, v in dl["over_train"].items())
    speed = dl["images_per_s"]
    lines += ["", (f"dataloader ({dl['dataset']}, batch {dl['batch']}, {dl['images_per_epoch']} "
                   f"images/epoch, on_after_batch_transfer included): {speed['median']:,.0f} "
                   f"img/s [{speed['min']:,.0f}–{speed['max']:,.0f}] = {ratios}")]
    tg = result["targets"]
    if tg["checks"]:
        scope = ("this run" if tg["paper_config"] else
                 "set for unet_cifar10 at batch 16 on the CPU; this run differs: information only")
        lines += ["", f"targets ({scope}):"]
        for key, t in tg["checks"].items():
            cmp = ">=" if t["higher_is_better"] else "<="
            lines.append(f"  {key:<44}{t['value']:>10.4g}  (target {cmp} {t['target']:g})  "
                         f"{'met' if t['met'] else 'NOT met'}")
    if result["notes"]:
        lines += ["", "notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(lines)


def _fmt_cpus(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _fmt_ratio(r: Mapping) -> str:
    return f"{r['median']:.4f} [{r['min']:.4f}–{r['max']:.4f}]"


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
