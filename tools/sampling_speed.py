"""Sampling speed of a checkpoint's U-Net, before and after the inference switches (README).

    python tools/sampling_speed.py CKPT [--batch 250] [--nfe 100] [--sampler dpm_sde]

For each way of running the network (fp32 NCHW eager: how sample.py ran before; channels-last;
bf16 autocast; bf16 + torch.compile) it times one batch of ``--batch`` samples at ``--nfe``
network evaluations, and ``--nfe`` bare forward passes of the network at the same batch, and
prints a markdown table: seconds per 1,000 samples (batches of ``--batch``) and the ratio of
the sampler's time to the bare forward passes (1.0 = no sampler overhead). Compilation
happens in an untimed warm-up batch.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_lightning.core.inference import prepare  # noqa: E402
from ddpm_lightning.core.samplers import SamplerSettings  # noqa: E402
from ddpm_lightning.tools.nfe import SAMPLERS  # noqa: E402
from ddpm_lightning.training.checkpoint import load_module  # noqa: E402

WAYS = {
    "fp32, NCHW, eager (before)": dict(channels_last=False),
    "fp32, channels-last": dict(channels_last=True),
    "bf16 autocast, channels-last": dict(channels_last=True, bf16=True),
    "bf16 autocast, channels-last, torch.compile": dict(channels_last=True, bf16=True,
                                                        compile=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--nfe", type=int, default=100)
    p.add_argument("--sampler", default="dpm_sde", choices=list(SAMPLERS))
    args = p.parse_args()
    module, _, _ = load_module(args.ckpt)
    T = module.diffusion.num_timesteps
    settings = SamplerSettings.parse({**SAMPLERS[args.sampler][1], "steps": args.nfe}, T)
    base = module.ema_model.eval()
    shape = (args.batch, base.in_channels, base.image_size, base.image_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((args.batch,), T // 2)
    per_1000 = 1000 / args.batch
    print(f"{Path(args.ckpt).name}: {args.sampler} at {args.nfe} NFE, batches of {args.batch}, "
          f"{torch.get_num_threads()} threads\n")
    print("| network | 1,000 samples | bare forward passes | sampler / bare |")
    print("|---|---|---|---|")
    for label, way in WAYS.items():
        net = prepare(copy.deepcopy(base), **way)
        with torch.inference_mode():
            net(x, t)  # warm-up (and compilation, for this batch shape)
            start = time.perf_counter()
            for _ in range(args.nfe):
                net(x, t)
            bare = time.perf_counter() - start
            start = time.perf_counter()
            settings.sample(net, module.diffusion, None, noise=x,
                            generator=torch.Generator().manual_seed(1))
            full = time.perf_counter() - start
        print(f"| {label} | {full * per_1000:.0f} s | {bare * per_1000:.0f} s | "
              f"{full / bare:.3f} |", flush=True)


if __name__ == "__main__":
    main()
