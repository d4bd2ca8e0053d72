"""One report for the jobs of a sweep, side by side.

    python -m ddpm_lightning.tools.compare SWEEP_DIR [--out SWEEP_DIR/compare]

It reads every job folder of a Hydra sweep (``SWEEP_DIR/0``, ``1``, …: the ones holding a
``config.yaml``), from its CSV log (``RUN/csv``, which every run writes whatever its logger;
runs made before that are read from their W&B offline files), and writes into ``--out``:

  report.md         a summary table per job (best FID, its step, final bits/dim ± its
                    standard error, final loss), a table per setting over its seeds (the jobs
                    grouped by every varying key except ``seed``: the mean and its 95%
                    Student-t interval; a setting with one seed has none), and the figures;
  summary.json      ``groups``: each setting's overrides, seeds, jobs, and per metric its
                    ``mean``, ``low``, ``high`` (null with one seed) and ``n``;
  fid.png, bpd.png  eval/fid (or val/fid) and eval/bpd against the step, one line per job;
  bands.png         the bound per t-band (``eval/vb_band*``) at the last evaluation, and the
                    training loss per quarter of t (``train/loss_q*``), one line per job;
  schedules.png     each job's ᾱ_t and log-SNR(t), overlaid;
  grids.png         each job's last sample grid, under its name.

A job is named by the overrides that differ between the jobs (``schedule=cosine``). Nothing
is needed beyond the sweep folder: it works offline.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from ddpm_lightning.metrics.intervals import t_interval
from ddpm_lightning.tools.report import side_by_side


def job_dirs(sweep: Path) -> list[Path]:
    if not sweep.is_dir():
        raise FileNotFoundError(f"SWEEP_DIR={sweep} is not a folder")
    jobs = [p for p in sweep.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    if not jobs:
        raise FileNotFoundError(f"SWEEP_DIR={sweep} holds no job folder with a config.yaml "
                                "(run train.py -m … hydra.sweep.dir=SWEEP_DIR first)")
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit()
                                       else 0, p.name))


def varying(jobs: list[Path]) -> dict[Path, dict[str, str]]:
    """Each job's overrides whose values differ between the jobs, ``{key: value}``."""
    from omegaconf import OmegaConf

    overrides = {}
    for job in jobs:
        path = job / ".hydra" / "overrides.yaml"
        items = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
        overrides[job] = {k.lstrip("+~"): v for k, v in
                          (o.split("=", 1) for o in items or [] if "=" in o)}
    keys = sorted({k for o in overrides.values() for k in o})
    keys = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    return {job: {k: overrides[job].get(k) for k in keys} for job in jobs}


def labels(jobs: list[Path]) -> dict[Path, str]:
    """Each job's name: its overrides whose values differ between the jobs."""
    return {job: ",".join(f"{k}={v}" for k, v in diff.items()) or job.name
            for job, diff in varying(jobs).items()}


GROUP_METRICS = ("best_fid", "final_bpd", "final_loss")


def groups(jobs: list[Path], summaries: dict[Path, dict]) -> list[dict]:
    """The jobs grouped by every varying setting except ``seed``: for each group its settings,
    its seeds, and for each metric the mean over its seeds with a 95% Student-t interval and
    n (a group of one seed has no interval)."""
    by_settings: dict[tuple, list[Path]] = {}
    diffs = varying(jobs)
    for job in jobs:
        key = tuple((k, v) for k, v in diffs[job].items() if k != "seed")
        by_settings.setdefault(key, []).append(job)
    out = []
    for key, members in by_settings.items():
        metrics = {}
        for name in GROUP_METRICS:
            values = [summaries[j][name] for j in members if summaries[j][name] is not None]
            if values:
                metrics[name] = t_interval(values)
        out.append({"settings": dict(key),
                    "name": ",".join(f"{k}={v}" for k, v in key) or "all jobs",
                    "seeds": [diffs[j].get("seed") for j in members],
                    "jobs": [j.name for j in members], "metrics": metrics})
    return out


def _interval(entry: dict | None, digits: int) -> str:
    if entry is None:
        return "–"
    if entry["low"] is None:
        return f"{entry['mean']:.{digits}f} (1 seed: no interval)"
    return (f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, "
            f"{entry['high']:.{digits}f}]")


def history(job: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} of a job, from its CSV log or else its W&B offline files."""
    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted((job / "csv").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if files:
        for path in files:
            with open(path) as f:
                for row in csv.DictReader(f):
                    for key, value in row.items():
                        if key not in ("step", "epoch") and value not in (None, ""):
                            out.setdefault(key, []).append((int(row["step"]), float(value)))
        return out
    from ddpm_lightning.tools.wandb_records import find_runs, read_run

    runs = find_runs(job / "wandb") if (job / "wandb").is_dir() else []
    if not runs:
        raise FileNotFoundError(f"{job} has neither a CSV log (csv/) nor W&B files (wandb/)")
    for run in runs:
        for h in read_run(run)["history"]:
            step = h.get("trainer/global_step")
            for key, value in h.items():
                if step is not None and isinstance(value, (int, float)) and "/" in key \
                        and not key.startswith(("trainer/", "_")):
                    out.setdefault(key, []).append((int(step), float(value)))
    return out


def _figure(ncols: int, size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size)
    return fig, list(np.atleast_1d(axes))


def _save(fig, axes, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_lines(series: dict[str, list], path: Path, ylabel: str, title: str) -> bool:
    if not any(series.values()):
        return False
    fig, (ax,) = _figure(1, (6.5, 4))
    for name, points in series.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xlabel="step", ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    _save(fig, [ax], path)
    return True


def _plot_bands(hist: dict, names: dict, path: Path) -> bool:
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(2, (10, 3.8))
    drawn = False
    for job, name in names.items():
        h = hist[job]
        bands = sorted((int(k.removeprefix("eval/vb_band")), v[-1][1]) for k, v in h.items()
                       if k.startswith("eval/vb_band") and v)
        if bands:
            axes[0].plot(*zip(*bands), marker="o", label=name)
            drawn = True
        quarters = sorted((int(k.removeprefix("train/loss_q")), v[-1][1]) for k, v in h.items()
                          if k.startswith("train/loss_q") and v)
        if quarters:
            axes[1].plot(*zip(*quarters), marker="o", label=name)
            drawn = True
    axes[0].set(xlabel="t-band (strata of t, increasing)", ylabel="bits/dim in the band",
                title="the bound per t-band, last evaluation")
    axes[0].set_yscale("log")
    axes[1].set(xlabel="quarter of t (0: t < T/4)", ylabel="loss",
                title="training loss per quarter of t, last window")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, axes, path)
    return drawn


def _plot_schedules(jobs: dict[Path, str], path: Path) -> None:
    from omegaconf import OmegaConf

    from ddpm_lightning.core.schedules import make_beta_schedule

    fig, axes = _figure(2, (10, 3.8))
    for job, name in jobs.items():
        schedule = OmegaConf.to_container(OmegaConf.load(job / "config.yaml").schedule)
        schedule.pop("_target_", None)
        betas = np.asarray(make_beta_schedule(**schedule), dtype=np.float64)
        abar = np.cumprod(1 - betas)
        axes[0].plot(abar, label=name)
        axes[1].plot(np.log(abar / (1 - abar)), label=name)
    axes[0].set(xlabel="t", ylabel="ᾱ_t", title="ᾱ_t")
    axes[1].set(xlabel="t", ylabel="log SNR", title="log-SNR(t) = log ᾱ_t / (1 − ᾱ_t)")
    _save(fig, axes, path)


def _fmt(value, digits=2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def summary(hist: dict[str, list]) -> dict:
    fid = hist.get("eval/fid") or hist.get("val/fid") or []
    best = min(fid, key=lambda sv: sv[1]) if fid else (None, None)
    bpd, se = hist.get("eval/bpd") or [], hist.get("eval/bpd_se") or []
    loss = hist.get("train/loss") or []
    return {"best_fid": best[1], "best_fid_step": best[0],
            "final_bpd": bpd[-1][1] if bpd else None, "final_bpd_se": se[-1][1] if se else None,
            "final_loss": float(np.mean([v for _, v in loss[-50:]])) if loss else None,
            "last_step": max((s for v in hist.values() for s, _ in v), default=None)}


def run(sweep: Path, out: Path) -> Path:
    jobs = job_dirs(sweep)
    names = labels(jobs)
    hist = {job: history(job) for job in jobs}
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sweep {sweep}", "", f"{len(jobs)} jobs; each named by what differs.", "",
             "| job | best FID | at step | final bits/dim | final loss (last 50 steps) |",
             "|---|---|---|---|---|"]
    for job in jobs:
        s = summary(hist[job])
        bpd = _fmt(s["final_bpd"], 4) + ("" if s["final_bpd_se"] is None
                                         else f" ± {s['final_bpd_se']:.4f}")
        lines.append(f"| {names[job]} | {_fmt(s['best_fid'])} | "
                     f"{s['best_fid_step'] if s['best_fid_step'] is not None else '–'} | "
                     f"{bpd} | {_fmt(s['final_loss'], 4)} |")
    lines.append("")
    grouped = groups(jobs, {job: summary(hist[job]) for job in jobs})
    lines += ["Settings over their seeds: the mean and its 95% Student-t interval "
              "(summary.json has the numbers).", "",
              "| settings | seeds | best FID | final bits/dim | final loss |", "|---|---|---|---|---|"]
    for g in grouped:
        m = g["metrics"]
        seeds = ",".join(str(x) for x in g["seeds"] if x is not None) or "–"
        lines.append(f"| {g['name']} | {len(g['jobs'])} ({seeds}) | "
                     f"{_interval(m.get('best_fid'), 2)} | {_interval(m.get('final_bpd'), 4)} | "
                     f"{_interval(m.get('final_loss'), 4)} |")
    lines.append("")
    (out / "summary.json").write_text(json.dumps({"groups": grouped}, indent=2) + "\n")
    fid = {names[j]: hist[j].get("eval/fid") or hist[j].get("val/fid") or [] for j in jobs}
    if _plot_lines(fid, out / "fid.png", "FID", "FID against step (same x_T in every job)"):
        lines += ["![FID](fid.png)", ""]
    bpd = {names[j]: hist[j].get("eval/bpd", []) for j in jobs}
    if _plot_lines(bpd, out / "bpd.png", "bits/dim", "bits/dim (estimate) against step"):
        lines += ["![bits/dim](bpd.png)", ""]
    if _plot_bands(hist, {j: names[j] for j in jobs}, out / "bands.png"):
        lines += ["![per t-band](bands.png)", ""]
    _plot_schedules({j: names[j] for j in jobs}, out / "schedules.png")
    lines += ["![schedules](schedules.png)", ""]
    grids = {}
    for job in jobs:
        pngs = sorted((job / "samples").glob("step_*.png"))
        if pngs:
            grids[f"{names[job]} ({pngs[-1].stem})"] = pngs[-1]
    if grids:
        side_by_side(grids, out / "grids.png")
        lines += ["Last sample grids (the same x_T in every job):", "", "![grids](grids.png)",
                  ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv=None) -> None:
    import sys

    p = argparse.ArgumentParser(prog="python -m ddpm_lightning.tools.compare",
                                description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="default: SWEEP_DIR/compare")
    args = p.parse_args(argv)
    sweep = Path(args.sweep_dir)
    try:
        report = run(sweep, Path(args.out) if args.out else sweep / "compare")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
