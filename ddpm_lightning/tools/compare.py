"""One report for the jobs of a sweep, side by side, with intervals and verdicts.

    python -m ddpm_lightning.tools.compare SWEEP_DIR [--out SWEEP_DIR/compare]
                                           [--baseline KEY=VALUE[,KEY=VALUE]]

It reads every job folder of a Hydra sweep (``SWEEP_DIR/0``, ``1``, …: the ones holding a
``config.yaml``), from its CSV log (``RUN/csv``, which every run writes whatever its logger;
runs made before that are read from their W&B offline files) and its per-image bits/dim
(``RUN/eval/bpd_step_*.npz``), and writes into ``--out``:

  report.md         a table per job (best FID, its step, final bits/dim ± its standard error,
                    final loss); a table per setting over its seeds (the jobs grouped by every
                    varying key except ``seed``: the mean and its 95% Student-t interval of the
                    best and final FID, final KID, bits/dim and loss; one seed, no interval);
                    the differences between settings (every pair, or each against
                    ``--baseline``) with 95% intervals and a verdict (``tools.pairs``); the
                    figures;
  summary.json      ``groups``: each setting's overrides, seeds, jobs, and per metric its
                    ``mean``, ``low``, ``high`` (null with one seed) and ``n``; ``pairs``: per
                    pair and metric the ``difference``, ``low``, ``high``, ``n``, what it is
                    ``over``, the ``verdict`` and, unresolved, what would resolve it;
  fid.png, kid.png, bpd.png
                    the metric against the step, one line per setting (the mean over its
                    seeds) with its 95% band;
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
from ddpm_lightning.tools.compare_plots import band_series, plot_bands, plot_schedules, plot_t_bands
from ddpm_lightning.tools.pairs import find_baseline, pairs, per_image_bpd
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


GROUP_METRICS = ("best_fid", "final_fid", "final_kid", "final_bpd", "final_loss")


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


def _fmt(value, digits=2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _last(hist: dict, *keys: str) -> tuple[int | None, float | None]:
    for key in keys:
        if hist.get(key):
            return hist[key][-1]
    return None, None


def summary(hist: dict[str, list], job: Path | None = None) -> dict:
    """A job's figures: the best FID and its step, the last evaluation's FID, KID and bits/dim
    with their errors, the final loss (mean of the last 50 logged steps); with ``job``, also
    the evaluation sizes from its config and each held-out image's bits/dim at the last
    evaluation (for paired differences)."""
    fid = hist.get("eval/fid") or hist.get("val/fid") or []
    best = min(fid, key=lambda sv: sv[1]) if fid else (None, None)
    loss = hist.get("train/loss") or []
    bpd_step, bpd = _last(hist, "eval/bpd")
    out = {"best_fid": best[1], "best_fid_step": best[0],
           "final_fid": _last(hist, "eval/fid", "val/fid")[1],
           "final_fid_se": _last(hist, "eval/fid_se", "val/fid_se")[1],
           "final_kid": _last(hist, "eval/kid", "val/kid")[1],
           "final_kid_std": _last(hist, "eval/kid_std", "val/kid_std")[1],
           "final_bpd": bpd, "final_bpd_se": _last(hist, "eval/bpd_se")[1],
           "final_loss": float(np.mean([v for _, v in loss[-50:]])) if loss else None,
           "eval_seconds": sum(v for _, v in hist.get("eval/seconds")
                               or hist.get("val/fid_seconds") or []),
           "last_step": max((s for v in hist.values() for s, _ in v), default=None)}
    if job is not None:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(job / "config.yaml")
        for name in ("num_samples", "nll_images"):
            out[name] = (OmegaConf.select(cfg, f"callbacks.eval.{name}")
                         or OmegaConf.select(cfg, f"callbacks.fid.{name}"))
        out["per_image"] = per_image_bpd(job, bpd_step)
    return out


def _pair_row(p: dict) -> str:
    digits = 4 if p["metric"] == "bpd" else (5 if p["metric"] == "kid" else 2)
    iv = "–" if p["low"] is None else f"[{p['low']:+.{digits}f}, {p['high']:+.{digits}f}]"
    said = p["verdict"] if p["to_resolve"] is None else f"{p['verdict']}; {p['to_resolve']}"
    return (f"| {p['a']} − {p['b']} | {p['metric']} | {p['difference']:+.{digits}f} {iv} | "
            f"{p['over']}, n = {p['n']} | {said} |")


def run(sweep: Path, out: Path, baseline: str | None = None) -> Path:
    jobs = job_dirs(sweep)
    names = labels(jobs)
    hist = {job: history(job) for job in jobs}
    summaries = {job: summary(hist[job], job) for job in jobs}
    grouped = groups(jobs, summaries)
    base = find_baseline(grouped, baseline) if baseline else None
    differences = pairs(grouped, {j.name: summaries[j] for j in jobs}, base)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sweep {sweep}", "", f"{len(jobs)} jobs; each named by what differs.", "",
             "| job | best FID | at step | final bits/dim | final loss (last 50 steps) | "
             "evaluation |", "|---|---|---|---|---|---|"]
    for job in jobs:
        s = summaries[job]
        bpd = _fmt(s["final_bpd"], 4) + ("" if s["final_bpd_se"] is None
                                         else f" ± {s['final_bpd_se']:.4f}")
        lines.append(f"| {names[job]} | {_fmt(s['best_fid'])} | "
                     f"{s['best_fid_step'] if s['best_fid_step'] is not None else '–'} | "
                     f"{bpd} | {_fmt(s['final_loss'], 4)} | {s['eval_seconds']:.0f} s |")
    total = sum(summaries[j]["eval_seconds"] for j in jobs)
    lines += ["", f"Evaluation took {total:.0f} s over the {len(jobs)} jobs "
              "(eval/seconds, summed).", ""]
    lines += ["Settings over their seeds, at the last evaluation: the mean and its 95% "
              "Student-t interval (summary.json has the numbers).", "",
              "| settings | seeds | best FID | final FID | final KID | final bits/dim | final loss |",
              "|---|---|---|---|---|---|---|"]
    for g in grouped:
        m = g["metrics"]
        seeds = ",".join(str(x) for x in g["seeds"] if x is not None) or "–"
        lines.append(f"| {g['name']} | {len(g['jobs'])} ({seeds}) | "
                     f"{_interval(m.get('best_fid'), 2)} | {_interval(m.get('final_fid'), 2)} | "
                     f"{_interval(m.get('final_kid'), 5)} | {_interval(m.get('final_bpd'), 4)} | "
                     f"{_interval(m.get('final_loss'), 4)} |")
    lines.append("")
    if differences:
        against = f" against {base['name']}" if base else ""
        lines += [f"Differences{against} at the last evaluation (lower is better for all three), "
                  "with 95% intervals: over seeds where the settings share two or more, else "
                  "within the shared seed (bits/dim paired over images with the same t and ε; "
                  "FID from the bootstrap; KID from its subsets).", "",
                  "| A − B | metric | difference [95% interval] | over | verdict |",
                  "|---|---|---|---|---|", *map(_pair_row, differences), ""]
    (out / "summary.json").write_text(json.dumps({"groups": grouped, "pairs": differences},
                                                 indent=2) + "\n")
    members = {g["name"]: [j for j in jobs if j.name in g["jobs"]] for g in grouped}
    for key, se_key, png, label in (("fid", "fid_se", "fid.png", "FID"),
                                    ("kid", "kid_std", "kid.png", "KID"),
                                    ("bpd", "bpd_se", "bpd.png", "bits/dim")):
        prefix = "val/" if key == "fid" and not any(hist[j].get("eval/fid") for j in jobs) \
            else "eval/"
        bands = {name: band_series(js, hist, prefix + key, prefix + se_key)
                 for name, js in members.items()}
        if plot_bands(bands, out / png, label, f"{label} against step: the mean over seeds and "
                      "its 95% band (one seed: ±1.96 × its own error)"):
            lines += [f"![{label}]({png})", ""]
    if plot_t_bands(hist, {j: names[j] for j in jobs}, out / "bands.png"):
        lines += ["![per t-band](bands.png)", ""]
    plot_schedules({j: names[j] for j in jobs}, out / "schedules.png")
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
    p.add_argument("--baseline", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="compare every setting with this one (e.g. schedule=linear) instead of "
                        "every pair")
    args = p.parse_args(argv)
    sweep = Path(args.sweep_dir)
    try:
        report = run(sweep, Path(args.out) if args.out else sweep / "compare", args.baseline)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
