"""callbacks=eval on a tiny run: its keys in the CSV log, its W&B metric definitions and summary,
and the same noise in every job."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddpm_lightning.tools.wandb_records import find_runs, read_run

from helpers import TINY, read_metrics, run_main, run_script, series

EVAL = ["callbacks=eval", "callbacks.eval.every_n_steps=2", "callbacks.eval.num_samples=6",
        "callbacks.eval.batch_size=4", "callbacks.eval.reference.max_images=16",
        "callbacks.eval.nll_images=10", "callbacks.eval.nll_batch_size=4",
        "callbacks.eval.nll_timesteps=5", "callbacks.eval.inception_batch_size=16",
        "++callbacks.eval.sampler.steps=5"]


@pytest.fixture
def env(tmp_path, weights):
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / weights.name).symlink_to(weights)
    return {"TORCH_HOME": str(home), "DDPM_FID_CACHE": str(tmp_path / "stats")}


def _eval_rows(run):
    rows = read_metrics(run)
    return {k: series(rows, k) for k in ("eval/fid", "eval/bpd", "eval/bpd_se", "eval/seconds",
                                          "eval/vb_band0", "eval/vb_band4", "eval/vb_bpd",
                                          "eval/fid_se", "eval/kid", "eval/kid_std")}


def _csv_run(tmp_path, env):
    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, *EVAL, f"hydra.run.dir={run}", "trainer.max_steps=4",
                    env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _eval_rows(run)
    for key, values in got.items():
        assert [s for s, _ in values] == [2, 4], (key, values)
        assert all(math.isfinite(v) for _, v in values)
    (_, bpd), (_, se) = got["eval/bpd"][-1], got["eval/bpd_se"][-1]
    assert bpd > 0 and 0 < se < bpd
    bands = [v for k, vals in got.items() if k.startswith("eval/vb_band") for _, v in vals[-1:]]
    assert sum(bands) <= got["eval/vb_bpd"][-1][1] + 1e-6  # two of the five bands
    return got


@pytest.mark.slow
def test_eval_logs_fid_and_bits_per_dim_and_under_wandb_keeps_the_best(tmp_path, env):
    csv = _csv_run(tmp_path, env)
    run = tmp_path / "wb"
    args = [a for a in TINY if not a.startswith("logger=")] + ["logger=wandb"]
    proc = run_script("train.py", *args, *EVAL, f"hydra.run.dir={run}", "trainer.max_steps=4",
                      env={**env, "WANDB_MODE": None, "WANDB_API_KEY": None,
                           "NETRC": "/nonexistent", "HOME": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = find_runs(run / "wandb")
    got = read_run(folder)
    assert got["metrics"].get("eval/*") == "trainer/global_step", got["metrics"]
    fids = [(h["trainer/global_step"], h["eval/fid"]) for h in got["history"] if "eval/fid" in h]
    assert [s for s, _ in fids] == [2, 4]
    best_step, best = min(fids, key=lambda sv: sv[1])
    assert got["summary"]["eval/best_fid"] == pytest.approx(best)
    assert got["summary"]["eval/best_fid_step"] == best_step
    # the same job under another logger: the same samples and (t, ε), the same numbers
    assert fids == csv["eval/fid"]
    bpd = [(h["trainer/global_step"], h["eval/bpd"]) for h in got["history"] if "eval/bpd" in h]
    assert bpd == csv["eval/bpd"]
    # the sweep report reads a W&B-only job from its offline files
    from ddpm_lightning.tools.compare import history

    assert history(run)["eval/fid"] == fids and history(run)["eval/bpd"] == bpd


def test_eval_with_an_empty_torch_hub_cache_builds_the_weights(tmp_path):
    """A fresh machine: no Inception weights anywhere. callbacks=eval builds them offline on
    first use, in the torch hub cache, and evaluates."""
    home = tmp_path / "empty_torch_home"
    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, *EVAL, f"hydra.run.dir={run}", "trainer.max_steps=2",
                    env={"TORCH_HOME": str(home), "DDPM_FID_CACHE": str(tmp_path / "stats")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built the offline Inception weights" in proc.stdout + proc.stderr
    assert (home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").is_file()
    rows = read_metrics(run)
    assert [s for s, _ in series(rows, "eval/fid")] == [2]
    # FID's jackknife error and KID with its spread, from the cached reference features
    (_, se), (_, kid), (_, kid_std) = (series(rows, k)[0] for k in
                                       ("eval/fid_se", "eval/kid", "eval/kid_std"))
    assert se > 0 and kid_std > 0 and kid > 2 * kid_std  # an untrained model: far from data
    (_, trained), (_, evaluating) = (series(rows, k)[0] for k in
                                     ("eval/train_seconds", "eval/seconds"))
    assert 0 < trained < 120 and evaluating > 0
    with np.load(next((tmp_path / "stats").glob("*.npz"))) as f:
        assert f["features"].shape == (16, 2048)
    # each held-out image's bits/dim, kept for paired comparisons: their mean is eval/bpd
    with np.load(run / "eval" / "bpd_step_0000002.npz") as f:
        per_image, seed, strata = f["bpd"], int(f["seed"]), int(f["timesteps"])
    assert per_image.shape == (10,) and (seed, strata) == (0, 5)
    assert per_image.mean() == pytest.approx(series(rows, "eval/bpd")[0][1], rel=1e-9)
    # the jackknife's leave-a-group-out FIDs and KIDs, kept for paired comparisons (at most N
    # groups: 6 samples, 6 groups): their jackknife spread is the logged standard error
    from ddpm_lightning.metrics.fid import jackknife_se

    with np.load(run / "eval" / "jackknife_step_0000002.npz") as f:
        fids, kids, n = f["fid"], f["kid"], int(f["num_samples"])
    kid_se = series(rows, "eval/kid_se")[0][1]
    assert fids.shape == kids.shape == (6,) and n == 6
    assert jackknife_se(fids) == pytest.approx(se, rel=1e-9)
    assert jackknife_se(kids) == pytest.approx(kid_se, rel=1e-9) and kid_se > 0


def test_unbuildable_weights_stop_a_sweep_before_any_folder(tmp_path):
    """Where the Inception weights can neither be found nor built (here: TORCH_HOME under a
    file), a sweep with callbacks=eval, and sample.py with metrics=[kid], stop in one line
    naming the setting and the path, before any run or sweep folder is written."""
    home = "/dev/null/torch_home"
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "schedule=linear,cosine", *TINY, *EVAL,
                      f"hydra.sweep.dir={sweep}", "trainer.max_steps=2",
                      env={"TORCH_HOME": home}, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: callbacks.eval needs the Inception network: no "
                               f"Inception weights at {home}/hub/checkpoints/")
    assert not sweep.exists()
    out = tmp_path / "samples"
    proc = run_main("sample.py", f"ckpt_path={tmp_path / 'any.ckpt'}", "metrics=[kid]",
                    f"hydra.run.dir={out}", env={"TORCH_HOME": home})
    assert proc.returncode == 1 and "error: metrics=['kid'] needs the Inception network" in \
        proc.stderr and not out.exists()
