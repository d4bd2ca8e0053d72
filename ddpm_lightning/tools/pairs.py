"""Differences between the settings of a sweep, with intervals and verdicts (``compare``'s
``pairs``). The statistics are in ``metrics.intervals``; this module decides what is paired.

For two settings A and B and each metric (bits/dim, KID, FID at each job's last evaluation),
the difference A − B is taken

* **over seeds** when they share two or more seeds: the per-seed differences, paired by seed,
  with their Student-t interval (a seed's bits/dim difference is itself paired over images);
* within their **one shared seed** otherwise:
  - bits/dim **paired over images**: every job evaluates held-out image i with the same t and
    ε (``callbacks.eval.seed``), and keeps each image's value (``RUN/eval/bpd_step_*.npz``),
    so the differences a_i − b_i cancel what the images share;
  - FID from the two jobs' **bootstrap** standard errors, KID from their **subset** spreads,
    combined as independent (conservative: the jobs share x_T, so their errors correlate
    positively).

A verdict says "lower" or "higher" when the 95% interval excludes 0, and otherwise what would
resolve the difference if it and the measured spread stayed the same: a number of seeds,
held-out images or samples.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ddpm_lightning.metrics.intervals import (
    UNRESOLVED,
    normal_interval,
    paired_difference,
    replicates_to_resolve,
    samples_to_resolve,
    verdict,
)

# metric: (summary key, its within-job error, what that error is over, the setting that sets n)
METRICS = {
    "bpd": ("final_bpd", "final_bpd_se", "images (unpaired)", "callbacks.eval.nll_images"),
    "kid": ("final_kid", "final_kid_std", "KID subsets", "callbacks.eval.num_samples"),
    "fid": ("final_fid", "final_fid_se", "bootstrap", "callbacks.eval.num_samples"),
}


def per_image_bpd(job: Path, step: int | None) -> dict | None:
    """The bits/dim of each held-out image at ``step`` (``RUN/eval/bpd_step_*.npz``), with the
    seed and strata that fixed its t and ε; None when the job kept none."""
    if step is None:
        return None
    path = job / "eval" / f"bpd_step_{int(step):07d}.npz"
    if not path.is_file():
        return None
    with np.load(path) as f:
        return {"bpd": f["bpd"].astype(np.float64), "seed": int(f["seed"]),
                "timesteps": int(f["timesteps"])}


def _same_images(a: dict | None, b: dict | None) -> bool:
    return (a is not None and b is not None and a["bpd"].shape == b["bpd"].shape
            and (a["seed"], a["timesteps"]) == (b["seed"], b["timesteps"]))


def _to_resolve(need: int | None, unit: str, setting: str | None) -> str:
    if need is None:
        return f"more {unit} than can be estimated (the difference measured is about 0)"
    where = f" ({setting})" if setting else ""
    return f"about {need:,} {unit}{where}"


def difference(a: dict, b: dict, summaries: dict[str, dict], metric: str) -> dict | None:
    """The entry of ``pairs`` for ``metric`` between groups ``a`` and ``b`` (A − B), or None
    when they have no shared seed with a value of it."""
    key, err_key, within, setting = METRICS[metric]
    seeds_b = dict(zip(b["seeds"], b["jobs"]))
    matched = [(summaries[ja], summaries[seeds_b[s]]) for s, ja in zip(a["seeds"], a["jobs"])
               if s in seeds_b]
    matched = [(x, y) for x, y in matched if x[key] is not None and y[key] is not None]
    if not matched:
        return None
    if len(matched) >= 2:
        iv = paired_difference([x[key] for x, _ in matched], [y[key] for _, y in matched])
        over, need, unit, setting = "seeds", replicates_to_resolve(iv["sd"], iv["mean"]), \
            "seeds", "seed=…"
    else:
        (x, y), = matched
        if metric == "bpd" and _same_images(x["per_image"], y["per_image"]):
            iv = paired_difference(x["per_image"]["bpd"], y["per_image"]["bpd"])
            over, need, unit = "images (paired)", replicates_to_resolve(iv["sd"], iv["mean"]), \
                "held-out images"
        else:
            d = x[key] - y[key]
            errors = (x[err_key], y[err_key])
            if None in errors:
                iv = {"mean": d, "low": None, "high": None, "n": 1}
                need = None
            else:
                se = math.hypot(*errors)
                iv = {**normal_interval(d, se), "n": 1}
                size = x["nll_images"] if metric == "bpd" else x["num_samples"]
                need = samples_to_resolve(se, size, d) if size else None
            over = within
            unit = "held-out images" if metric == "bpd" else "samples"
    entry = {"a": a["name"], "b": b["name"], "metric": metric, "difference": iv["mean"],
             "low": iv["low"], "high": iv["high"], "n": iv["n"], "over": over,
             "verdict": verdict(iv)}
    entry["to_resolve"] = (_to_resolve(need, unit, setting) if entry["verdict"] == UNRESOLVED
                           else None)
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
