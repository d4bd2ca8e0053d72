"""The study that chooses the CPU recipe: variants trained for the same wall-clock budget, then
scored the same way.

    python -m ddpm_lightning.tools.recipe_study OUT [--minutes 20] [--seeds 0 1]
        [--variants today v v_zt today_minsnr v_minsnr v_zt_minsnr] [--n 1000] [--nfe 20 50]
        [--posthoc 0.05 0.1 0.2] [--posthoc-nfe 20] [--experiment fashion_mnist_cpu]
        [--archive DEST] [OVERRIDE ...]

For each variant and seed it trains ``train.py experiment=EXPERIMENT`` with the variant's
overrides for ``--minutes`` of wall-clock time (``trainer.max_time``; evaluations included,
the same for every variant), with ``callbacks=eval`` (FID against training time) and
``module.ema=posthoc`` (snapshots for the EMA length afterwards, every half
``--eval-every``), into ``OUT/runs/NAME_sSEED``.
Then it scores each run's EMA weights with ``tools/nfe`` (``--n`` samples against the test
split at each ``--nfe``, with SDE-DPM-Solver++, DDIM η = 0 and the DPM-Solver++ ODE, and each
entry's speckle share), and, with ``--posthoc``, the best variant again at each σ_rel
(``tools/posthoc_ema``; at ``--posthoc-nfe``, by default every ``--nfe``; the report shows "–"
for the rest). It writes ``OUT/report.md`` and ``OUT/summary.json`` (each variant's mean and
95% interval over its seeds), ``OUT/fid_vs_time.png`` and ``OUT/grids.png`` (the
deterministic samplers' rows of each variant, seed 0). Finished runs and scored entries are
reused, so a stopped study continues where it was. ``--archive DEST`` copies the results
without the checkpoints (``archive``); a study pointed at that copy reuses its scored runs, so
a study can grow over several sessions whose run folders are not kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from ddpm_lightning.metrics.intervals import t_interval

# The switches the study varies, each pinned in every variant, so that a variant means the same
# whatever the experiment's recipe has adopted since (the 2020 recipe is "today").
_EPS, _V = "module.parameterization=eps", "module.parameterization=v"
_ZT0, _ZT1 = "schedule.rescale_zero_terminal_snr=false", "schedule.rescale_zero_terminal_snr=true"
_W0, _W1 = "module.loss_weight=none", "module.loss_weight=min_snr"
_FP32, _BF16 = "trainer.precision=32-true", "trainer.precision=bf16-mixed"
_EAGER, _COMPILED = "module.compile=false", "module.compile=true"
VARIANTS = {
    "today": [_EPS, _ZT0, _W0, _FP32, _EAGER],
    "v": [_V, _ZT0, _W0, _FP32, _EAGER],
    "v_zt": [_V, _ZT1, _W0, _FP32, _EAGER],
    "today_minsnr": [_EPS, _ZT0, _W1, _FP32, _EAGER],
    "v_minsnr": [_V, _ZT0, _W1, _FP32, _EAGER],
    "v_zt_minsnr": [_V, _ZT1, _W1, _FP32, _EAGER],
    "today_bf16": [_EPS, _ZT0, _W0, _BF16, _EAGER],
    "v_zt_bf16": [_V, _ZT1, _W0, _BF16, _EAGER],
    "v_zt_minsnr_bf16": [_V, _ZT1, _W1, _BF16, _EAGER],
    "v_zt_minsnr_bf16_compile": [_V, _ZT1, _W1, _BF16, _COMPILED],
}
SAMPLERS = ("dpm_sde", "ddim0", "dpm_ode")  # stochastic, and the two deterministic ones
DONE = "study_done.json"


def max_time(minutes: float) -> str:
    """Lightning's DD:HH:MM:SS for a budget in minutes (at least one second)."""
    seconds = max(1, round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# Keys the study sets itself, after the overrides, for every run alike (its flags own them).
STUDY_KEYS = {"seed": "--seeds", "logger": "", "callbacks": "", "module.ema": "",
              "callbacks.eval.every_n_steps": "--eval-every", "trainer.max_steps": "--minutes",
              "trainer.max_time": "--minutes", "hydra.run.dir": "OUT"}


def run_overrides(experiment: str, overrides: list[str], seed: int, minutes: float,
                  eval_every: int) -> list[str]:
    """One run's ``train.py`` overrides but its folder: the study's defaults (the overrides may
    change them: the post-hoc snapshot interval), the variant's and the user's overrides, then
    what the study owns (``STUDY_KEYS``; an override of one is refused in one line)."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in STUDY_KEYS:
            flag = STUDY_KEYS[key]
            raise ValueError(f"override {override!r}: recipe_study sets {key} itself"
                             + (f" (use {flag})" if flag else ""))
    return [f"experiment={experiment}",
            f"module.posthoc.every_n_steps={max(1, eval_every // 2)}", *overrides,
            f"seed={seed}", "logger=csv", "callbacks=eval",
            f"callbacks.eval.every_n_steps={eval_every}", "module.ema=posthoc",
            "trainer.max_steps=100000000", f"++trainer.max_time={max_time(minutes)}"]


def train(run: Path, command: list[str]) -> None:
    """Train one run with ``command`` (``run_overrides``), unless ``run`` holds a finished one."""
    from ddpm_lightning.app import CONF_DIR

    if (run / DONE).is_file():
        return
    script = CONF_DIR.parent / "train.py"
    if not script.is_file():
        raise FileNotFoundError(f"no train.py next to {CONF_DIR}; run from a checkout")
    cmd = [sys.executable, str(script), *command, f"hydra.run.dir={run}"]
    print(f"training {run.name}: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training {run.name} failed (exit {proc.returncode}); its output "
                           f"is in {run}/train.log")
    (run / DONE).write_text(json.dumps({"command": command}) + "\n")


def check_settings(run: Path, command: list[str]) -> None:
    """Refuse to reuse a finished run whose saved config (``run/config.yaml``) contradicts one of
    this study's ``key=value`` overrides (a variant redefined since, another budget, or another
    OUT's runs). ``experiment=`` is not in config.yaml: it is compared with the command that
    ``study_done.json`` recorded, where it did."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run / "config.yaml")
    done = json.loads((run / DONE).read_text()) if (run / DONE).is_file() else {}
    recorded = {o.split("=", 1)[0]: o for o in done.get("command", [])}
    parsed = OverridesParser.create().parse_overrides(command)
    last = {o.key_or_group: o for o in parsed}  # as Hydra does, the last value of a key wins
    for override in last.values():
        if override.is_delete():
            continue
        key, want = override.key_or_group, override.value()
        if key == "experiment":
            have = recorded.get(key, f"experiment={want}").split("=", 1)[1]
        else:
            have = OmegaConf.select(saved, key, default="<absent>")
        if OmegaConf.is_dict(have):  # a group choice (model=...): config.yaml has its content
            continue
        have = OmegaConf.to_container(have) if OmegaConf.is_config(have) else have
        if have != want:
            raise ValueError(f"{run} was trained with {key}={have}, not {want}; move it away "
                             f"or choose another OUT")


def score(ckpt: Path, out: Path, n: int, nfes: list[int], extra: list[str]) -> dict:
    """``tools/nfe`` entries of one checkpoint (reused when already there)."""
    from ddpm_lightning.tools import nfe

    args = nfe.parse_args([str(ckpt), "--out", str(out), "--n", str(n), "--nfe",
                           *map(str, nfes), "--long-nfe", "0", "--samplers", *SAMPLERS,
                           "--ref-split", "test", "--no-progress", *extra])
    return nfe.run(args)


def archived(run: Path, n: int, nfes: list[int], extra: list[str],
             folder: str = "nfe") -> tuple[dict, int] | None:
    """A scored run kept without its checkpoints (``archive``): its entries and step from
    ``run/folder/results.json``; None when the run still has its checkpoint (then ``score``
    decides) or was never scored. A kept run that lacks a requested entry is refused: it cannot
    be scored again."""
    from ddpm_lightning.tools import nfe

    path = run / folder / "results.json"
    if (run / "checkpoints" / "last.ckpt").is_file() or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    a = nfe.parse_args(["-", "--out", "-", "--n", str(n), "--grid", "0", *extra])
    for key in ("n", "seed", "ref_split", "ref_max_images", "bf16"):
        if saved["meta"].get(key) != getattr(a, key):
            raise ValueError(f"{run} is kept without its checkpoint and was scored with "
                             f"{key}={saved['meta'].get(key)!r}, not {getattr(a, key)!r}")
    missing = [k for k in (nfe.entry_key(s, f) for f in nfes for s in SAMPLERS)
               if "speckle" not in saved["entries"].get(k, {})]
    if missing:
        raise ValueError(f"{run} is kept without its checkpoint and has no {', '.join(missing)}; "
                         f"score it where it was trained, or drop those NFEs")
    return saved["entries"], int(saved["meta"]["global_step"])


KEEP = ("study_done.json", "config.yaml", "csv/*.yaml", "csv/metrics.csv",
        "nfe*/results.json", "nfe/results.md", "nfe/rows/*.png")  # nfe_posthoc_* too


def archive(out: Path, dest: Path) -> list[Path]:
    """Copy a study's results without its checkpoints, snapshots and samples (some MB instead of
    some GB) from ``out`` to ``dest``: the report, the summary, the figures, the real-image
    floor and, of each run, what ``archived`` and the report read. A study pointed at ``dest``
    reuses those runs and trains only what is new."""
    import shutil

    files = [p for pattern in ("*.md", "*.json", "*.png") for p in out.glob(pattern)]
    for run in sorted((out / "runs").glob("*")):
        if (run / DONE).is_file():
            files += [p for pattern in KEEP for p in run.glob(pattern)]
    for src in files:
        target = dest / src.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return files


def real_floor(out: Path, ckpt: Path, n: int, extra: list[str]) -> float:
    """FID of ``n`` real training images (a fixed random subset) against the reference the
    scores use (the test split, ``tools/nfe``'s settings): the floor a model's FID at this N can
    reach. Cached in ``OUT/real_floor.json``."""
    import torch

    from ddpm_lightning.app.runtime import saved_run_config
    from ddpm_lightning.metrics.fid import compute_fid
    from ddpm_lightning.metrics.reference import reference_stats
    from ddpm_lightning.tools import nfe
    from ddpm_lightning.training.data import DiffusionDataModule

    cache = out / "real_floor.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if str(n) in known:
        return known[str(n)]
    a = nfe.parse_args([str(ckpt), "--out", str(out), "--n", str(n), *extra])
    run_config = saved_run_config(ckpt)  # memory-mapped: the weights are not read
    if run_config is None:
        raise ValueError(f"{ckpt} is not a readable ddpm-lightning checkpoint")
    config = run_config["data"]
    data = DiffusionDataModule(**{k: v for k, v in config.items() if k != "_target_"})
    ref = reference_stats(data, split="test", max_images=a.ref_max_images, device=a.device,
                          weights_path=a.weights_path)
    data.setup("fit")
    pick = torch.randperm(len(data.train_set), generator=torch.Generator().manual_seed(0))[:n]
    images = torch.stack([data.train_set[int(i)] for i in pick])
    known[str(n)] = compute_fid(images, ref, device=a.device, weights_path=a.weights_path)
    cache.write_text(json.dumps(known) + "\n")
    return known[str(n)]


def eval_history(run: Path) -> list[tuple[float, float]]:
    """(training seconds, FID) of a run's evaluations, from its CSV log."""
    from ddpm_lightning.tools.compare import history

    hist = history(run)
    seconds = dict(hist.get("eval/train_seconds") or [])
    return [(seconds[s], fid) for s, fid in hist.get("eval/fid") or [] if s in seconds]


def summarize(results: dict[str, dict[int, dict]], steps: dict[str, list[int]]) -> dict:
    """Per variant and entry (sampler@NFE): FID and speckle share, mean and interval over
    seeds; and the optimizer steps each seed reached in the budget."""
    out = {}
    for variant, by_seed in results.items():
        entries = {}
        for key in sorted({k for e in by_seed.values() for k in e}):
            rows = [e[key] for e in by_seed.values() if key in e]
            entries[key] = {"fid": t_interval([r["fid"] for r in rows]),
                            "speckle": t_interval([r.get("speckle", float("nan"))
                                                   for r in rows])}
        out[variant] = {"seeds": sorted(by_seed), "steps": steps.get(variant, []),
                        "entries": entries}
    return out


def _cell(entry: dict | None, what: str, fmt: str) -> str:
    if entry is None:
        return "–"
    iv = entry[what]
    text = format(iv["mean"], fmt)
    if iv["low"] is not None:
        text += f" [{format(iv['low'], fmt)}, {format(iv['high'], fmt)}]"
    return text


def write_report(out: Path, summary: dict, nfes: list[int], histories: dict, grids: dict,
                 minutes: float, floor: float | None = None, n: int | None = None) -> Path:
    from ddpm_lightning.tools.compare_plots import figure, save_figure
    from ddpm_lightning.tools.report import side_by_side

    keys = [f"{s}@{n}" for n in nfes for s in SAMPLERS]
    lines = [f"# Recipe study ({minutes:g} minutes of training per run)", "",
             "FID of the EMA weights against the test split (mean over seeds, 95% interval "
             "with 2+ seeds); the share of speckled samples below."
             + (f" {n:,} real training images score {floor:.1f} against the same reference: "
                "the floor at this N." if floor is not None else ""), "",
             "| variant | seeds | steps | " + " | ".join(keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for variant, s in summary.items():
        trained = ", ".join(f"{n:,}" for n in s["steps"]) or "–"
        lines.append(f"| {variant} | {len(s['seeds'])} | {trained} | "
                     + " | ".join(_cell(s["entries"].get(k), "fid", ".1f") for k in keys) + " |")
    lines += ["", "| variant | " + " | ".join(f"speckle {k}" for k in keys) + " |",
              "|---|" + "---|" * len(keys)]
    for variant, s in summary.items():
        lines.append(f"| {variant} | "
                     + " | ".join(_cell(s["entries"].get(k), "speckle", ".1%") for k in keys)
                     + " |")
    fig, axes = figure(1, (6.5, 4))
    for variant, runs in histories.items():
        for i, points in enumerate(runs):
            if points:
                axes[0].plot([t / 60 for t, _ in points], [f for _, f in points], marker="o",
                             label=variant if i == 0 else None,
                             color=f"C{list(histories).index(variant)}")
    axes[0].set(xlabel="training minutes (evaluations excluded)", ylabel="FID (callbacks=eval)",
                title="FID against training time, every seed")
    save_figure(fig, axes, out / "fid_vs_time.png")
    lines += ["", "![FID against training time](fid_vs_time.png)", ""]
    if grids:
        side_by_side(grids, out / "grids.png", columns=2)  # a variant per row: DDIM, ODE
        lines += ["Deterministic samplers, seed 0 (the same x_T in every row):", "",
                  "![grids](grids.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({**summary, "real_floor": floor}, indent=1)
                                      + "\n")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_lightning.tools.recipe_study",
                                description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS)[:6], choices=list(VARIANTS))
    p.add_argument("--experiment", default="fashion_mnist_cpu")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--nfe", type=int, nargs="+", default=[20, 50])
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--posthoc", type=float, nargs="*", default=[],
                   help="σ_rel values to score the best variant at (post-hoc EMA)")
    p.add_argument("--posthoc-nfe", type=int, nargs="+", default=None,
                   help="the NFEs to score the post-hoc EMA entries at (default: --nfe's)")
    p.add_argument("--nfe-args", default="",
                   help="extra arguments of tools/nfe, one string (--nfe-args='--batch-size 100')")
    p.add_argument("--archive", default=None, metavar="DEST",
                   help="afterwards, copy the results without checkpoints to DEST (a study "
                        "pointed at DEST reuses them)")
    p.add_argument("overrides", nargs="*", default=[], help="overrides for every run")
    args = p.parse_args(argv)
    args.nfe_args = shlex.split(args.nfe_args)
    out = Path(args.out)
    import torch

    results: dict[str, dict[int, dict]] = {}
    steps: dict[str, list[int]] = {}
    histories: dict[str, list] = {}
    grids = {}
    try:
        for variant in args.variants:
            for seed in args.seeds:
                run = out / "runs" / f"{variant}_s{seed}"
                command = run_overrides(args.experiment, [*VARIANTS[variant], *args.overrides],
                                        seed, args.minutes, args.eval_every)
                if (run / DONE).is_file():
                    check_settings(run, command)
                kept = archived(run, args.n, args.nfe, args.nfe_args)
                if kept is None:
                    train(run, command)
                    ckpt = run / "checkpoints" / "last.ckpt"
                    kept = (score(ckpt, run / "nfe", args.n, args.nfe, args.nfe_args),
                            int(torch.load(ckpt, map_location="cpu", weights_only=True,
                                           mmap=True)["global_step"]))
                results.setdefault(variant, {})[seed] = kept[0]
                steps.setdefault(variant, []).append(kept[1])
                histories.setdefault(variant, []).append(eval_history(run))
                for sampler, label in (("ddim0", "DDIM η=0"), ("dpm_ode", "DPM-Solver++ ODE")):
                    row = run / "nfe" / "rows" / f"{sampler}@{min(args.nfe)}.png"
                    if seed == args.seeds[0] and row.is_file():
                        grids[f"{variant}: {label} @ {min(args.nfe)}"] = row
        if args.posthoc:
            key = f"dpm_sde@{min(args.nfe)}"
            best = min(results, key=lambda v: sum(e[key]["fid"] for e in results[v].values()))
            from ddpm_lightning.tools import posthoc_ema

            posthoc_nfe = args.posthoc_nfe or args.nfe

            for seed in args.seeds:
                run = out / "runs" / f"{best}_s{seed}"
                todo = []
                for sigma in args.posthoc:
                    kept = archived(run, args.n, posthoc_nfe, args.nfe_args,
                                    f"nfe_posthoc_{sigma:.3f}")
                    if kept is None:
                        todo.append(sigma)
                    else:
                        results.setdefault(f"{best}+posthoc σ_rel={sigma}", {})[seed] = kept[0]
                unsolved = [sigma for sigma in todo
                            if not posthoc_ema.solved(run / "posthoc_ema", sigma)]
                if unsolved:  # a finished run's snapshots do not change: solve each σ once
                    posthoc_ema.main([str(run), "--sigma-rel", *map(str, unsolved)])
                for sigma in todo:
                    for ckpt in posthoc_ema.solved(run / "posthoc_ema", sigma):
                        results.setdefault(f"{best}+posthoc σ_rel={sigma}", {})[seed] = score(
                            ckpt, run / f"nfe_posthoc_{sigma:.3f}", args.n, posthoc_nfe,
                            args.nfe_args)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    first = out / "runs" / f"{args.variants[0]}_s{args.seeds[0]}" / "checkpoints" / "last.ckpt"
    floor = real_floor(out, first, args.n, args.nfe_args)
    summary = summarize(results, steps)
    report = write_report(out, summary, args.nfe, histories, grids, args.minutes, floor, args.n)
    print(f"wrote {report}")
    if args.archive:
        files = archive(out, Path(args.archive))
        print(f"copied {len(files)} files without checkpoints to {args.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
