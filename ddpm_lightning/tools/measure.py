"""Measuring this machine for the benchmarks: interleaved timings, dense peak GFLOP/s, FLOPs
per image (``FlopCounterMode``), and how busy other processes keep the CPUs."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

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
    the faster layout here) in fp32 and bf16; the best of ``reps`` timings each. On CUDA the
    fp32 figures are under the current TF32 policy (see ``cuda_peak``)."""
    if device.type == "cuda":
        return cuda_peak(device, reps, quick)
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


def cuda_seconds(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` on a CUDA device: CUDA events around ``calls`` back-to-back
    calls, after one untimed call. A host timer around one short kernel measures the launch
    overhead instead (a 30 µs kernel reads as several times slower than it is)."""
    fn()
    torch.cuda.synchronize(device)
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / calls


def cuda_peak(device: torch.device, reps: int, quick: bool) -> dict[str, float]:
    """Dense GFLOP/s of a CUDA device: an 8192² matmul and a 3x3 convolution of 512 channels at
    32² (batch 64), in bf16 and in fp32 as the current TF32 policy runs them, each timed over many back-to-back calls (``cuda_seconds``); the best of ``reps`` rounds."""
    n, (b, c, r), calls = (1024, (8, 64, 16), 5) if quick else (8192, (64, 512, 32), 50)
    flops = {"matmul": 2 * n**3, "conv": 2 * b * r * r * c * c * 9}
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, m = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        conv = nn.Conv2d(c, c, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
        x = torch.randn(b, c, r, r, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for kind, fn in (("matmul", functools.partial(torch.mm, a, m)),
                             ("conv", functools.partial(conv, x))):
                best = min(cuda_seconds(fn, calls, device) for _ in range(max(reps, 3)))
                out[f"{name}_{kind}"] = flops[kind] / best / 1e9
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


# ------------------------------------------------------------------------------ machine

def package_version(package: str) -> str | None:
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
        self._t0, self._busy0, self._own0 = time.perf_counter(), busy_cpu_s(), own_cpu_s()
        return self

    def stop(self) -> float | None:
        if self._busy0 is None:
            return None
        busy, own = busy_cpu_s() - self._busy0, own_cpu_s() - self._own0
        return max(busy - own, 0.0) / (time.perf_counter() - self._t0)


def busy_cpu_s() -> float | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
