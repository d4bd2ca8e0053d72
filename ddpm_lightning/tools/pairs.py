"""Differences between the settings of a sweep, with intervals and verdicts (``compare``'s
``pairs``). The statistics are in ``metrics.intervals``; this module decides what is paired.

For two settings A and B and each metric (bits/dim, KID, FID), the difference A − B is taken
at the **last evaluation step that every job of the pair reached** (a job that stopped short
is compared where it stopped, never with another job's later step), and

* **over seeds** when they share two or more seeds (each job's ``seed`` as it ran, from its
  ``config.yaml``): the per-seed differences, paired by seed, with their Student-t interval;
* within their **one shared seed** otherwise:
  - bits/dim **paired over images**: every job evaluates held-out image i with the same t and
    ε (``callbacks.eval.seed``), and keeps each image's value (``RUN/eval/bpd_step_*.npz``),
    so the differences a_i − b_i cancel what the images share;
  - FID and KID **paired over jackknife groups**: jobs with the same seed and N leave out
    the same groups of samples (which share their x_T), and keep each leave-out value
    (``RUN/eval/jackknife_step_*.npz``), so the jackknife of the group-by-group differences is
    the error of the difference. Without those files, the two jobs' standard errors are
    combined as independent (conservative: their errors correlate positively).

FID and KID of jobs that used different ``num_samples`` or reference images are not
compared (FID's bias depends on N). A verdict says "lower" or "higher" when the 95% interval
excludes 0, and otherwise what would resolve the difference with an 80% chance if it and
the measured spread stayed the same: a number of seeds, held-out images or samples.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ddpm_lightning.metrics.fid import jackknife_se
from ddpm_lightning.metrics.intervals import (
    UNRESOLVED,
    normal_interval,
    paired_difference,
    replicates_to_resolve,
    samples_to_resolve,
    verdict,
)

# metric: (its standard error's series, the setting that sets its n, the unit of that n)
METRICS = {
    "bpd": ("bpd_se", "callbacks.eval.nll_images", "held-out images"),
    "kid": ("kid_se", "callbacks.eval.num_samples", "samples"),
    "fid": ("fid_se", "callbacks.eval.num_samples", "samples"),
}
# the evaluation settings that must agree for FID and KID to compare (their bias depends on N)
SAME_FOR_SAMPLE_METRICS = ("num_samples", "reference")


def _npz(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def per_image_bpd(job: Path, step: int | None) -> dict | None:
    """The bits/dim of each held-out image at ``step`` (``values``, from
    ``RUN/eval/bpd_step_*.npz``), with the seed and strata that fixed its t and ε; None when
    the job kept none."""
    f = None if step is None else _npz(job / "eval" / f"bpd_step_{int(step):07d}.npz")
    return None if f is None else {"values": f["bpd"].astype(np.float64),
                                   "seed": int(f["seed"]), "timesteps": int(f["timesteps"])}


def jackknife_values(job: Path, step: int | None, metric: str) -> dict | None:
    """The jackknife's leave-a-group-out values of ``metric`` (fid or kid) at ``step``
    (``RUN/eval/jackknife_step_*.npz``), with the seed and N that fixed the samples."""
    f = None if step is None else _npz(job / "eval" / f"jackknife_step_{int(step):07d}.npz")
    if f is None or metric not in f:
        return None
    return {"values": f[metric].astype(np.float64), "seed": int(f["seed"]),
            "num_samples": int(f["num_samples"])}


def _same_draws(a: dict | None, b: dict | None, keys: tuple[str, ...]) -> bool:
    """Whether two jobs' per-image or per-replicate values come from the same draws."""
    return (a is not None and b is not None and a["values"].shape == b["values"].shape
            and all(a[k] == b[k] for k in keys))


def _to_resolve(need: int | None, unit: str, setting: str | None, why: str) -> str:
    if need is None:
        return why
    where = f" ({setting})" if setting else ""
    return f"about {need:,} {unit}{where} for an 80% chance, if the difference stays as measured"


def _why_none(difference: float, error: float | None, unit: str) -> str:
    if error is None or not math.isfinite(error):
        return "no error was measured to say how many would resolve it"
    if not difference:
        return "the difference measured is 0"
    return f"more {unit} than can be estimated"


def common_step(jobs: list[dict], series: str) -> int | None:
    """The last step at which every one of ``jobs`` logged ``series``; None if there is none."""
    steps = [set(job["series"].get(series, {})) for job in jobs]
    shared = set.intersection(*steps) if steps else set()
    return max(shared) if shared else None


def _not_comparable(jobs: list[dict], metric: str) -> str | None:
    if metric == "bpd":
        return None
    for key in SAME_FOR_SAMPLE_METRICS:
        values = {repr(job["eval_settings"].get(key)) for job in jobs}
        if len(values) > 1:
            return (f"not comparable: callbacks.eval.{key} differs between the jobs "
                    f"({', '.join(sorted(values))})")
    return None


def _seeds(group: dict) -> str:
    return ",".join(str(s) for s in group["seeds"])


def difference(a: dict, b: dict, summaries: dict[str, dict], metric: str) -> dict | None:
    """The entry of ``pairs`` for ``metric`` between groups ``a`` and ``b`` (A − B); None when
    no step has a value of it in every job of the pair."""
    err_series, setting, unit = METRICS[metric]
    jobs_b = dict(zip(b["seeds"], b["jobs"]))
    matched = [(summaries[ja], summaries[jobs_b[s]]) for s, ja in zip(a["seeds"], a["jobs"])
               if s in jobs_b]
    if not matched:
        return {"a": a["name"], "b": b["name"], "metric": metric, "step": None,
                "difference": None, "low": None, "high": None, "n": 0, "over": "–",
                "verdict": f"not compared: no seed in common (seeds {_seeds(a)} against "
                           f"{_seeds(b)})", "to_resolve": None}
    everyone = [j for pair in matched for j in pair]
    step = common_step(everyone, metric)
    if step is None:
        return None
    entry = {"a": a["name"], "b": b["name"], "metric": metric, "step": step}
    refused = _not_comparable(everyone, metric)
    if refused:
        return {**entry, "difference": None, "low": None, "high": None, "n": len(matched),
                "over": "–", "verdict": refused, "to_resolve": None}
    values = [(x["series"][metric][step], y["series"][metric][step]) for x, y in matched]
    if len(matched) >= 2:
        iv = paired_difference(*zip(*values))
        over, setting, unit = "seeds", "seed=…", "seeds"
        need, error = replicates_to_resolve(iv["sd"], iv["mean"]), iv["sd"]
    else:
        (x, y), = matched
        d = values[0][0] - values[0][1]
        if metric == "bpd":
            draws = [per_image_bpd(Path(j["path"]), step) for j in (x, y)]
            paired, over = ("seed", "timesteps"), "images (paired)"
        else:
            draws = [jackknife_values(Path(j["path"]), step, metric) for j in (x, y)]
            paired, over = ("seed", "num_samples"), "jackknife groups (paired)"
        same = _same_draws(*draws, paired)
        if same and metric == "bpd":
            iv = paired_difference(draws[0]["values"], draws[1]["values"])
            need, error = replicates_to_resolve(iv["sd"], iv["mean"]), iv["sd"]
        elif same:
            error = jackknife_se(draws[0]["values"] - draws[1]["values"])
            iv = {**normal_interval(d, error), "n": len(draws[0]["values"])}
            need = samples_to_resolve(error, x["eval_settings"].get("num_samples"), d)
        else:
            errors = [j["series"].get(err_series, {}).get(step) for j in (x, y)]
            if metric == "kid" and None in errors:  # runs from before kid_se: the subset spread
                errors = [j["series"].get("kid_std", {}).get(step) for j in (x, y)]
                over = "KID subsets (the spread of one subset: conservative)"
            else:
                over = {"bpd": "images (unpaired)", "kid": "jackknife (unpaired)",
                        "fid": "jackknife (unpaired)"}[metric]
            if None in errors:
                iv, need, error = {"mean": d, "low": None, "high": None, "n": 1}, None, None
            else:
                error = math.hypot(*errors)
                iv = {**normal_interval(d, error), "n": 1}
                size = x["eval_settings"].get("nll_images" if metric == "bpd" else "num_samples")
                need = samples_to_resolve(error, size, d) if size else None
    entry.update(difference=iv["mean"], low=iv["low"], high=iv["high"], n=iv["n"], over=over,
                 verdict=verdict(iv))
    entry["to_resolve"] = (_to_resolve(need, unit, setting, _why_none(iv["mean"], error, unit))
                           if entry["verdict"] == UNRESOLVED else None)
    return entry


def pairs(groups: list[dict], summaries: dict[str, dict],
          baseline: dict | None = None) -> list[dict]:
    """Every metric's difference for each pair of groups (later − earlier), or for each group
    against the ``baseline`` group (group − baseline)."""
    if baseline is not None:
        order = [(g, baseline) for g in groups if g is not baseline]
    else:
        order = [(groups[j], groups[i]) for i in range(len(groups))
                 for j in range(i + 1, len(groups))]
    out = []
    for a, b in order:
        for metric in METRICS:
            entry = difference(a, b, summaries, metric)
            if entry is not None:
                out.append(entry)
    return out


def find_baseline(groups: list[dict], spec: str) -> dict:
    """The one group whose settings include every ``key=value`` of ``spec`` (comma-separated),
    or a ValueError naming ``--baseline`` and the groups there are."""
    try:
        wanted = dict(item.split("=", 1) for item in spec.split(","))
    except ValueError:
        raise ValueError(f"--baseline={spec!r} must be key=value[,key=value]") from None
    found = [g for g in groups if all(str(g["settings"].get(k)) == v for k, v in wanted.items())]
    if len(found) != 1:
        names = "; ".join(g["name"] for g in groups)
        raise ValueError(f"--baseline={spec} matches {len(found)} settings, not one; the "
                         f"settings are: {names}")
    return found[0]
