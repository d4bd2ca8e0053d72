"""FID against the number of network evaluations (NFE), for several samplers, from one checkpoint.

    python -m ddpm_lightning.tools.nfe CKPT --out DIR [--n 1000] [--nfe 10 20 50 100]
        [--samplers ddpm_small dpm_sde …] [--long-nfe 1000] [--ref-split test] [--bf16 --compile]

For every (sampler, NFE) it draws ``--n`` samples with the EMA weights, sample i from the same
x_T for every sampler (``generate``'s seeding: x_T of batch k comes first from the generator
seeded by (seed, k), as in sample.py), and computes their FID against the reference statistics
of ``--ref-split`` (cached; see ``reference.reference_stats``). It writes into DIR:

  results.json     every entry with its FID, its speckle share (``metrics.speckle``: samples
                   rougher than every one of 1,000 held-out images), N, sampler settings and
                   sampling time; entries
                   already there (same checkpoint, N, seed, settings) are reused, so an
                   interrupted study continues where it stopped;
  results.md       the table, samplers × NFE;
  fid_vs_nfe.png   FID against NFE on a log axis, one line per sampler;
  rows/<sampler>@<NFE>.png  the first ``--grid`` samples of each entry;
  grid_<sampler>.png  those rows stacked, NFE increasing downwards (same x_T in each column);
  grids.png        the per-sampler grids side by side, under their labels.

FID at small N is biased upwards (by roughly a constant for a given N): compare entries of one
study with each other, not with published numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm_lightning.tools.report import side_by_side, stack_rows

# name → (label, sampler settings); the DDIM entries name their clip, whose default changed
# (rederive → raw_eps), so that an entry means the same before and after. "ddim0"/"ddim1" are DDIM as this project ships
# it (trailing spacing; clip x̂₀ and keep the raw ε̂); "_old" is what DDIM meant before
# (linspace, clip and re-derive ε̂).
SAMPLERS = {
    "ddpm_small": ("ddpm, σ² = β̃_t (small)", {"name": "ddpm", "variance": "small"}),
    "ddpm_large": ("ddpm, σ² = β_t (large)", {"name": "ddpm", "variance": "large"}),
    "ddim0": ("ddim η = 0 (default: raw ε̂, trailing)", {"name": "ddim", "clip": "raw_eps"}),
    "ddim0_old": ("ddim η = 0, re-derived ε̂, linspace (old)",
                  {"name": "ddim", "clip": "rederive", "spacing": "linspace"}),
    "ddim1": ("ddim η = 1 (default: raw ε̂, trailing)",
              {"name": "ddim", "eta": 1.0, "clip": "raw_eps"}),
    "ddim1_old": ("ddim η = 1, re-derived ε̂, linspace (old)",
                  {"name": "ddim", "eta": 1.0, "clip": "rederive", "spacing": "linspace"}),
    "dpm_ode": ("dpm_solver++ 2M, ODE", {"name": "dpm_solver", "sde": False}),
    "dpm_sde": ("dpm_solver++ 2M, SDE", {"name": "dpm_solver", "sde": True}),
}
LONG_NFE_SAMPLERS = ("ddpm_small", "ddpm_large")  # also run at --long-nfe (the full chain)


def entry_key(sampler: str, nfe: int) -> str:
    return f"{sampler}@{nfe}"


def plan(samplers, nfes, long_nfe) -> list[tuple[str, int]]:
    """(sampler, NFE) pairs, short NFEs first so that a stopped study has the cheap ones."""
    pairs = [(s, n) for n in sorted(nfes) for s in samplers]
    if long_nfe:
        pairs += [(s, long_nfe) for s in samplers if s in LONG_NFE_SAMPLERS]
    return pairs


def markdown_table(results: dict, samplers, nfes) -> str:
    """Samplers (rows) × NFE (columns): FID (and the share of speckled samples); the best FID
    of each column in bold; "–" = not run."""
    best = {}
    for n in nfes:
        values = [results[entry_key(s, n)]["fid"] for s in samplers if entry_key(s, n) in results]
        best[n] = min(values) if values else None
    head = "| sampler | " + " | ".join(f"{n} NFE" for n in nfes) + " |"
    lines = [head, "|---|" + "---|" * len(nfes)]
    for s in samplers:
        cells = []
        for n in nfes:
            entry = results.get(entry_key(s, n))
            if entry is None:
                cells.append("–")
            else:
                cell = f"{entry['fid']:.1f}"
                cell = f"**{cell}**" if entry["fid"] == best[n] else cell
                cells.append(cell + (f" ({entry['speckle']:.0%})" if "speckle" in entry else ""))
        lines.append(f"| {SAMPLERS[s][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, samplers, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in samplers:
        points = sorted((e["nfe"], e["fid"]) for e in results.values() if e["sampler"] == s)
        if points:
            ax.plot(*zip(*points), marker="o", label=SAMPLERS[s][0])
    ax.set_xscale("log")
    ticks = sorted({e["nfe"] for e in results.values() if e["sampler"] in samplers})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("network evaluations (NFE), log scale")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_results(path: Path, meta: dict) -> dict:
    """The entries of an earlier run of the same study into this folder, to be reused; a folder
    holding a study of other settings is refused rather than overwritten."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    for key, value in meta.items():
        if key == "samplers":  # a study may add samplers; the shared ones must not differ
            value = {s: v for s, v in value.items() if s in old["meta"][key]}
            before = {s: v for s, v in old["meta"][key].items() if s in value}
        else:
            before = old["meta"].get(key)
        if before != value:
            raise ValueError(f"--out={path.parent} holds a study with {key}={before!r}, not "
                             f"{value!r}; choose another --out (its results are kept)")
    meta["samplers"] = {**old["meta"]["samplers"], **meta["samplers"]}
    return old["entries"]


def save_results(path: Path, meta: dict, entries: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "entries": entries}, indent=1) + "\n")
    tmp.replace(path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ddpm_lightning.tools.nfe",
                                description=__doc__.split("\n")[0])
    p.add_argument("ckpt")
    p.add_argument("--out", required=True, help="folder for the report")
    p.add_argument("--n", type=int, default=1000, help="samples per entry")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--long-nfe", type=int, default=1000,
                   help="also run ddpm at this NFE (0: no); the paper's full chain")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--ref-split", default="test", choices=["train", "val", "test"])
    p.add_argument("--ref-max-images", type=int, default=None)
    p.add_argument("--weights-path", default=None,
                   help="Inception weights (default: torch-fidelity's file in the torch hub cache)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, default=8, help="samples per grid row (0: no grids)")
    p.add_argument("--bf16", action="store_true", help="the U-Net under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for key in ("n", "batch_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.grid > args.n:
        p.error(f"--grid={args.grid} must be <= --n={args.n}")
    return args


def run(args: argparse.Namespace) -> dict:
    from torchvision.utils import save_image
    from tqdm.auto import tqdm

    from ddpm_lightning.core.generate import generate
    from ddpm_lightning.core.inference import prepare
    from ddpm_lightning.core.samplers import SamplerSettings
    from ddpm_lightning.metrics import fid as fidlib
    from ddpm_lightning.metrics.reference import reference_stats
    from ddpm_lightning.metrics.speckle import speckle_share, speckle_threshold
    from ddpm_lightning.training.checkpoint import load_module
    from ddpm_lightning.training.data import DiffusionDataModule

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fidlib.resolve_weights(args.weights_path)  # no Inception weights: fail before sampling
    module, run_config, ckpt = load_module(args.ckpt)
    T = module.diffusion.num_timesteps
    pairs = plan(args.samplers, args.nfe, args.long_nfe)
    settings = {(s, n): SamplerSettings.parse({**SAMPLERS[s][1], "steps": n}, T, key=f"{s}@{n}")
                for s, n in pairs}
    device = torch.device(args.device)
    net = prepare(module.ema_model.to(device), bf16=args.bf16, compile=args.compile)
    shape = (net.in_channels, net.image_size, net.image_size)
    data = DiffusionDataModule(**{k: v for k, v in run_config["data"].items()
                                  if k != "_target_"})
    ref = reference_stats(data, split=args.ref_split, max_images=args.ref_max_images,
                          device=device, weights_path=args.weights_path)
    data.setup("fit")
    held_out = data.val_set
    threshold = speckle_threshold(torch.stack([held_out[i] for i in
                                               range(min(1000, len(held_out)))]))
    meta = {"ckpt": str(Path(args.ckpt).resolve()), "global_step": ckpt.get("global_step"),
            "n": args.n, "seed": args.seed, "batch_size": args.batch_size,
            "ref_split": args.ref_split, "ref_max_images": args.ref_max_images,
            "bf16": args.bf16, "samplers": {s: SAMPLERS[s][1] for s in args.samplers}}
    results_path = out / "results.json"
    entries = load_results(results_path, meta)
    rows = out / "rows"
    rows.mkdir(exist_ok=True)
    bar = tqdm(pairs, desc="entries", unit="entry", disable=args.no_progress)
    for s, n in bar:
        key = entry_key(s, n)
        bar.set_postfix_str(key)
        row_path = rows / f"{key}.png"
        if key in entries and "speckle" in entries[key] and (row_path.is_file() or not args.grid):
            continue
        t0 = time.perf_counter()
        _, images = generate(net, module.diffusion, args.n, args.batch_size, shape,
                             seed=args.seed, device=device, settings=settings[s, n],
                             progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        if args.grid:
            save_image(images[: args.grid].float() / 255, row_path, nrow=args.grid, padding=1)
        if key not in entries:
            value = fidlib.compute_fid(images, ref, device=device,
                                       weights_path=args.weights_path)
            entries[key] = {"sampler": s, "nfe": n, "fid": value, "n": args.n,
                            "sample_seconds": round(seconds, 1),
                            "ms_per_image_nfe": round(1e3 * seconds / (args.n * n), 3)}
        entries[key]["speckle"] = speckle_share(images, threshold)
        save_results(results_path, meta, entries)
        tqdm.write(f"{key:18s} FID {entries[key]['fid']:7.2f}  speckled "
                   f"{entries[key]['speckle']:5.1%}  sampling {seconds:6.0f} s")
    write_report(args, entries, out)
    return entries


def write_report(args, entries: dict, out: Path) -> None:
    nfes = sorted({*args.nfe, *([args.long_nfe] if args.long_nfe else [])})
    title = (f"{Path(args.ckpt).name}: FID of N={args.n} samples vs the {args.ref_split} split"
             + (" (bf16 U-Net)" if args.bf16 else ""))
    (out / "results.md").write_text(
        f"{title}\n\n" + markdown_table(entries, args.samplers, nfes))
    plot(entries, args.samplers, out / "fid_vs_nfe.png", title)
    grids = {}
    for s in args.samplers:
        paths = [out / "rows" / f"{entry_key(s, n)}.png" for n in nfes]
        paths = [p for p in paths if p.is_file()]
        if paths:
            grids[SAMPLERS[s][0]] = out / f"grid_{s}.png"
            stack_rows(paths, grids[SAMPLERS[s][0]])
    side_by_side(grids, out / "grids.png")


def main(argv=None) -> None:
    import sys

    from ddpm_lightning.training.checkpoint import CheckpointError

    args = parse_args(argv)
    try:
        entries = run(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {args.out}/results.md, results.json, fid_vs_nfe.png and the grids "
          f"({len(entries)} entries)")


if __name__ == "__main__":
    main()
