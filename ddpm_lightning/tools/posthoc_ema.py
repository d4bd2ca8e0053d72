"""The EMA of any length after training, from a ``module.ema=posthoc`` run's snapshots
(Karras et al. 2024, §3; the maths in ``core/posthoc_ema.py``).

    python -m ddpm_lightning.tools.posthoc_ema RUN --sigma-rel 0.02 0.05 0.1 0.2
        [--step S] [--out DIR] [--max-residual 0.1]

For each σ_rel it solves the least-squares combination of every snapshot in
``RUN/posthoc_ema/`` up to step S (default: the last snapshot) that best matches the
power-function EMA of that σ_rel at step S, and writes it as an ordinary checkpoint,
``DIR/sigma_rel_0.050_step_XXXXXXX.ckpt`` (DIR defaults to ``RUN/posthoc_ema``): the run's
``last.ckpt`` with its EMA weights replaced, which ``sample.py ckpt_path=…`` and
``python -m ddpm_lightning.tools.nfe`` take as they are. A σ_rel that the snapshots cannot
represent (relative residual of the fit above ``--max-residual``) is refused in one line, and
the others are still written; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ddpm_lightning.core.files import atomic_write
from ddpm_lightning.core.posthoc_ema import sigma_rel_to_gamma, solve_weights
from ddpm_lightning.training.posthoc import SNAPSHOT_DIR


def snapshots(run: Path, step: int | None = None) -> list[tuple[int, Path]]:
    """(step, file) of the run's snapshots up to ``step``, in order."""
    folder = run / SNAPSHOT_DIR
    found = sorted((int(p.stem.removeprefix("step_")), p) for p in folder.glob("step_*.pt"))
    if not found:
        raise FileNotFoundError(f"RUN={run} has no post-hoc EMA snapshots ({folder}/step_*.pt); "
                                "train with module.ema=posthoc")
    kept = [(s, p) for s, p in found if step is None or s <= step]
    if not kept:
        raise ValueError(f"--step={step} is before the first snapshot (step {found[0][0]})")
    return kept


def reconstruct(run: Path, sigma_rels: list[float], step: int | None = None,
                max_residual: float = 0.1) -> tuple[int, dict, dict]:
    """(target step, {σ_rel: state dict}, {σ_rel: (weights, residual) or the reason it was
    refused}). The snapshots are read one at a time and accumulated in float64."""
    found = snapshots(run, step)
    target = found[-1][0] if step is None else step
    meta = []  # (step, gammas, sigma_rels) of each snapshot; mmap reads only these
    for s, path in found:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        meta.append((s, data["gammas"], data["sigma_rels"]))
    steps = [s for s, gs, _ in meta for _ in gs]
    gammas = [g for _, gs, _ in meta for g in gs]
    tracked = sorted({float(v) for _, _, sr in meta for v in sr})
    fits, refused = {}, {}
    for sigma in sigma_rels:
        x, residual = solve_weights(steps, gammas, target, sigma_rel_to_gamma(sigma))
        if residual > max_residual:
            refused[sigma] = (f"σ_rel={sigma} cannot be represented by the {len(found)} "
                              f"snapshots up to step {target} (relative residual {residual:.3f} "
                              f"> --max-residual {max_residual}); they track σ_rel {tracked}")
        else:
            fits[sigma] = (x, residual)
    sums: dict[float, dict] = {sigma: {} for sigma in fits}
    dtypes: dict = {}
    k = 0
    for _, path in found:
        for state in torch.load(path, map_location="cpu", weights_only=True)["state_dicts"]:
            dtypes = {name: value.dtype for name, value in state.items()}
            for sigma, (x, _) in fits.items():
                acc = sums[sigma]
                for name, value in state.items():
                    if value.is_floating_point():
                        acc[name] = acc.get(name, 0) + float(x[k]) * value.double()
                    else:
                        acc[name] = value  # integer buffers: the latest
            k += 1
    states = {sigma: {n: v.to(dtypes[n]) for n, v in acc.items()} for sigma, acc in sums.items()}
    return target, states, {**fits, **refused}


def _name(sigma: float, step: str) -> str:
    return f"sigma_rel_{sigma:.3f}_step_{step}.ckpt"


def solved(out: Path, sigma: float) -> list[Path]:
    """The checkpoints ``write_checkpoint`` wrote into ``out`` for ``sigma``, by step."""
    return sorted(out.glob(_name(sigma, "*")))


def write_checkpoint(ckpt: dict, run: Path, out: Path, sigma: float, target: int, state: dict,
                     fit) -> Path:
    """``ckpt`` (the run's last.ckpt) with ``ema_model`` replaced by ``state``; no optimizer
    state."""
    sd = dict(ckpt["state_dict"])
    for name, value in state.items():
        key = f"ema_model.{name}"
        if key not in sd:
            raise ValueError(f"snapshot key {name} is not in {run}/checkpoints/last.ckpt")
        sd[key] = value
    weights, residual = fit
    keep = {k: v for k, v in ckpt.items()
            if k not in ("optimizer_states", "lr_schedulers", "loops", "callbacks")}
    keep.update(state_dict=sd, posthoc_ema={"sigma_rel": sigma, "step": target,
                                            "residual": residual,
                                            "weights": [float(w) for w in weights]})
    path = out / _name(sigma, f"{target:07d}")
    with atomic_write(path) as f:
        torch.save(keep, f)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_lightning.tools.posthoc_ema",
                                description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run folder trained with module.ema=posthoc")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the last snapshot")
    p.add_argument("--out", default=None, help="default: RUN/posthoc_ema")
    p.add_argument("--max-residual", type=float, default=0.1)
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        target, states, fits = reconstruct(run, args.sigma_rel, args.step, args.max_residual)
        out = Path(args.out) if args.out else run / SNAPSHOT_DIR
        failed = False
        template = None  # the run's last.ckpt, read once for every σ_rel written
        for sigma in args.sigma_rel:
            if isinstance(fits[sigma], str):
                print(f"error: {fits[sigma]}", file=sys.stderr)
                failed = True
                continue
            if template is None:
                from ddpm_lightning.training.checkpoint import read_checkpoint

                template = read_checkpoint(run / "checkpoints" / "last.ckpt", key="RUN")
            path = write_checkpoint(template, run, out, sigma, target, states[sigma],
                                    fits[sigma])
            print(f"σ_rel={sigma}: {path} (residual {fits[sigma][1]:.4f})")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
