"""One report for the jobs of a sweep, side by side, with intervals and verdicts.

    python -m ddpm_lightning.tools.compare SWEEP_DIR [--out SWEEP_DIR/compare]
                                           [--baseline KEY=VALUE[,KEY=VALUE]]

It reads every job folder of a Hydra sweep (``SWEEP_DIR/0``, ``1``, …: the ones holding a
``config.yaml``), from its CSV log (``RUN/csv``, which every run writes whatever its logger;
runs made before that are read from their W&B offline files) and its per-image bits/dim
(``RUN/eval/bpd_step_*.npz``) and leave-a-group-out FIDs and KIDs
(``RUN/eval/jackknife_step_*.npz``), and writes into ``--out``. Every setting is summarised, and
every pair compared, at the last evaluation step that all the jobs involved reached (``step``);
a job's seed is the one it ran with (its ``config.yaml``).

  report.md         a table per job (best FID, its step, final bits/dim ± its standard error,
                    final loss); a table per setting over its seeds (the jobs grouped by every
                    varying key except ``seed``: the mean and its 95% Student-t interval of the
                    best and final FID, final KID, bits/dim and loss; one seed, no interval);
                    the differences between settings (every pair, or each against
                    ``--baseline``) with 95% intervals and a verdict (``tools.pairs``); the
                    figures;
  summary.json      ``groups``: each setting's overrides, seeds, jobs, and per metric its
                    ``mean``, ``low``, ``high`` (null with one seed), ``n`` and ``step``;
                    ``pairs``: per pair and metric the ``step``, ``difference``, ``low``,
                    ``high``, ``n``, what it is ``over``, the ``verdict`` and, unresolved, what
                    would resolve it;
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
from ddpm_lightning.tools.pairs import common_step, find_baseline, pairs
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
# group metric: the series it is read from at the group's common step (best_fid: the lowest
# FID over the steps every member reached; final_loss: each job's own last 50 steps)
AT_COMMON_STEP = {"final_fid": "fid", "final_kid": "kid", "final_bpd": "bpd"}


def _dedupe(members: list[Path], summaries: dict[Path, dict]) -> tuple[list[Path], list[str]]:
    """One job per seed: of jobs that ran the same setting with the same seed (a rerun), the
    one that got furthest is kept (the later folder on a tie); a note names the others."""
    kept: dict[int | None, Path] = {}
    notes = []
    for job in members:
        seed = summaries[job]["seed"]
        other = kept.get(seed)
        if other is None:
            kept[seed] = job
            continue
        last = (summaries[job]["last_step"] or -1, summaries[other]["last_step"] or -1)
        keep, drop = (job, other) if last[0] >= last[1] else (other, job)
        kept[seed] = keep
        notes.append(f"job {drop.name} repeats seed {seed} of job {keep.name} with the same "
                     f"settings; job {keep.name} (step {summaries[keep]['last_step']}) is used")
    return [j for j in members if j in kept.values()], notes


def groups(jobs: list[Path], summaries: dict[Path, dict]) -> tuple[list[dict], list[str]]:
    """The jobs grouped by every varying setting except ``seed`` (one job per seed, as it ran,
    from ``config.yaml``): for each group its settings, its seeds, and for each metric the mean
    over its seeds with a 95% Student-t interval and n (a group of one seed has no interval),
    at the last evaluation step that all its jobs reached (``step``). Also the notes on
    repeated seeds."""
    by_settings: dict[tuple, list[Path]] = {}
    diffs = varying(jobs)
    for job in jobs:
        key = tuple((k, v) for k, v in diffs[job].items() if k != "seed")
        by_settings.setdefault(key, []).append(job)
    out, notes = [], []
    for key, members in by_settings.items():
        members, repeated = _dedupe(members, summaries)
        notes += repeated
        rows = [summaries[j] for j in members]
        metrics = {}
        for name in GROUP_METRICS:
            if name in AT_COMMON_STEP:
                series = AT_COMMON_STEP[name]
                step = common_step(rows, series)
                values = [] if step is None else [r["series"][series][step] for r in rows]
            elif name == "best_fid":
                fids = [r["series"].get("fid", {}) for r in rows]
                shared = set.intersection(*(set(f) for f in fids))
                step = None
                values = [min(f[s] for s in shared) for f in fids] if shared else []
            else:
                step = None
                values = [r[name] for r in rows if r[name] is not None]
            if values:
                metrics[name] = t_interval(values)
                if step is not None:
                    metrics[name]["step"] = step
        out.append({"settings": dict(key),
                    "name": ",".join(f"{k}={v}" for k, v in key) or "all jobs",
                    "seeds": [summaries[j]["seed"] for j in members],
                    "jobs": [j.name for j in members], "metrics": metrics})
    return out, notes


def _interval(entry: dict | None, digits: int) -> str:
    if entry is None:
        return "–"
    if entry["low"] is None:
        return f"{entry['mean']:.{digits}f} (1 seed: no interval)"
    return (f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, "
            f"{entry['high']:.{digits}f}]")


def _version(path: Path) -> tuple:
    """A CSV log's order: Lightning's version_N folders by N (not by file time, which a copy
    changes)."""
    name = path.parent.name
    number = name.removeprefix("version_")
    return (int(number) if number.isdigit() else -1, str(path))


def history(job: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} of a job, from its CSV log or else its W&B offline files."""
    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted((job / "csv").rglob("metrics.csv"), key=_version)
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


SERIES = ("fid", "fid_se", "kid", "kid_se", "kid_std", "bpd", "bpd_se")
# evaluation settings that do not change what is measured
NOT_MEASURED = ("every_n_steps", "on_train_end", "cache_dir", "weights_path", "download",
                "inception_batch_size", "_target_")


def _series(hist: dict) -> tuple[dict[str, dict[int, float]], list[str]]:
    """{name: {step: value}} of the evaluation metrics (``eval/`` keys, else the FID callback's
    ``val/``, value and error from the same prefix), non-finite values left out and named."""
    prefix = "eval/" if hist.get("eval/fid") or hist.get("eval/bpd") else "val/"
    out, dropped = {}, []
    for name in SERIES:
        rows = hist.get(prefix + name) or []
        out[name] = {s: v for s, v in rows if math.isfinite(v)}
        bad = sorted({s for s, v in rows if not math.isfinite(v)})
        if bad:
            dropped.append(f"{prefix}{name} is not finite at step {', '.join(map(str, bad))}")
    return out, dropped


def _last_of(series: dict[int, float]) -> float | None:
    return series[max(series)] if series else None


def summary(hist: dict[str, list], job: Path | None = None) -> dict:
    """A job's figures: the evaluation metrics by step (``series``), the best FID and its step,
    the last evaluation's FID, KID and bits/dim with their errors, the final loss (mean of the
    last 50 logged steps); with ``job``, also its seed and evaluation settings as it ran
    (``config.yaml``) and its folder (for the per-image and per-replicate files)."""
    series, dropped = _series(hist)
    fid = series["fid"]
    best = min(fid.items(), key=lambda sv: sv[1]) if fid else (None, None)
    loss = [v for _, v in hist.get("train/loss") or [] if math.isfinite(v)]
    out = {"series": series, "notes": dropped, "best_fid": best[1], "best_fid_step": best[0],
           **{f"final_{name}": _last_of(series[name]) for name in SERIES},
           "final_loss": float(np.mean(loss[-50:])) if loss else None,
           "eval_seconds": sum(v for _, v in hist.get("eval/seconds")
                               or hist.get("val/fid_seconds") or []),
           "last_step": max((s for v in hist.values() for s, _ in v), default=None),
           "seed": None, "eval_settings": {}, "path": None}
    if job is not None:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(job / "config.yaml")
        seed = OmegaConf.select(cfg, "seed")
        out["seed"] = int(seed) if seed is not None else None
        settings = (OmegaConf.select(cfg, "callbacks.eval")
                    or OmegaConf.select(cfg, "callbacks.fid"))
        settings = OmegaConf.to_container(settings, resolve=True) if settings is not None else {}
        out["eval_settings"] = {k: v for k, v in settings.items() if k not in NOT_MEASURED}
        out["path"] = str(job)
    return out


def _pair_row(p: dict) -> str:
    digits = 4 if p["metric"] == "bpd" else (5 if p["metric"] == "kid" else 2)
    if p["difference"] is None:
        value = "–"
    else:
        iv = "–" if p["low"] is None else f"[{p['low']:+.{digits}f}, {p['high']:+.{digits}f}]"
        value = f"{p['difference']:+.{digits}f} {iv}"
    said = p["verdict"] if p["to_resolve"] is None else f"{p['verdict']}; {p['to_resolve']}"
    step = "–" if p["step"] is None else p["step"]
    return (f"| {p['a']} − {p['b']} | {p['metric']} | {step} | {value} | "
            f"{p['over']}, n = {p['n']} | {said} |")


def _finite_or_null(value):
    """JSON has no NaN: a non-finite number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _notes(jobs: list[Path], names: dict, summaries: dict, repeated: list[str]) -> list[str]:
    """What the reader must know about the jobs: values left out, reruns, jobs that stopped
    before the others (compared at the steps they reached)."""
    notes = [f"{names[j]}: {n}" for j in jobs for n in summaries[j]["notes"]] + repeated
    furthest = max((summaries[j]["last_step"] or 0 for j in jobs), default=0)
    notes += [f"{names[j]} stopped at step {summaries[j]['last_step']}, before step {furthest}: "
              "it is compared at the last evaluation every job of a comparison reached"
              for j in jobs if (summaries[j]["last_step"] or 0) < furthest]
    return notes


def _step_of(m: dict) -> str:
    steps = {e.get("step") for e in m.values()} - {None}
    return ", ".join(str(s) for s in sorted(steps)) or "–"


def run(sweep: Path, out: Path, baseline: str | None = None) -> Path:
    jobs = job_dirs(sweep)
    names = labels(jobs)
    hist = {job: history(job) for job in jobs}
    summaries = {job: summary(hist[job], job) for job in jobs}
    grouped, repeated = groups(jobs, summaries)
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
    notes = _notes(jobs, names, summaries, repeated)
    if notes:
        lines += ["Notes:", "", *(f"* {n}" for n in notes), ""]
    lines += ["Settings over their seeds, at the last evaluation all of a setting's jobs "
              "reached (best FID: over the steps they all reached): the mean and its 95% "
              "Student-t interval (summary.json has the numbers).", "",
              "| settings | seeds | step | best FID | final FID | final KID | final bits/dim | "
              "final loss |", "|---|---|---|---|---|---|---|---|"]
    for g in grouped:
        m = g["metrics"]
        seeds = ",".join(str(x) for x in g["seeds"] if x is not None) or "–"
        lines.append(f"| {g['name']} | {len(g['jobs'])} ({seeds}) | {_step_of(m)} | "
                     f"{_interval(m.get('best_fid'), 2)} | {_interval(m.get('final_fid'), 2)} | "
                     f"{_interval(m.get('final_kid'), 5)} | {_interval(m.get('final_bpd'), 4)} | "
                     f"{_interval(m.get('final_loss'), 4)} |")
    lines.append("")
    if differences:
        against = f" against {base['name']}" if base else ""
        tested = sum(p["low"] is not None for p in differences)
        lines += [f"Differences{against} at the last evaluation every job of the pair reached "
                  "(lower is better for all three), with 95% intervals: over seeds where the "
                  "settings share two or more, else within the shared seed (bits/dim paired "
                  "over images with the same t and ε; FID and KID paired over the same "
                  "jackknife groups).", "",
                  "| A − B | metric | step | difference [95% interval] | over | verdict |",
                  "|---|---|---|---|---|---|", *map(_pair_row, differences), "",
                  f"{tested} intervals at 95% each: if no setting differed from another, about "
                  f"{0.05 * tested:.1f} of them would still exclude 0 by chance. A verdict "
                  "that matters is worth confirming with more seeds.", ""]
    (out / "summary.json").write_text(json.dumps(
        _finite_or_null({"groups": grouped, "pairs": differences}), indent=2,
        allow_nan=False) + "\n")
    members = {g["name"]: [summaries[j] for j in jobs if j.name in g["jobs"]] for g in grouped}
    has_kid_se = any(summaries[j]["series"]["kid_se"] for j in jobs)
    for key, se_key, png, label in (("fid", "fid_se", "fid.png", "FID"),
                                    ("kid", "kid_se" if has_kid_se else "kid_std", "kid.png",
                                     "KID"),
                                    ("bpd", "bpd_se", "bpd.png", "bits/dim")):
        bands = {name: band_series([s["series"][key] for s in rows],
                                   [s["series"][se_key] for s in rows])
                 for name, rows in members.items()}
        if plot_bands(bands, out / png, label, f"{label} against step: the mean over seeds and "
                      "its 95% band\n(one seed: ±1.96 × its own standard error)"):
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
