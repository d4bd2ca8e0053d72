"""python -m ddpm_lightning.tools.compare on a real 2-job sweep (schedule=linear,cosine, callbacks=eval)."""

from __future__ import annotations

import pytest
from PIL import Image
from test_eval import EVAL

from ddpm_lightning.tools import compare

from helpers import TINY, read_metrics, run_script, series


@pytest.fixture
def sweep(tmp_path, weights):
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / weights.name).symlink_to(weights)
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "schedule=linear,cosine", "seed=0,1", *TINY, *EVAL,
                      "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=2",
                      f"hydra.sweep.dir={sweep}", timeout=900,
                      env={"TORCH_HOME": str(home), "DDPM_FID_CACHE": str(tmp_path / "stats")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


@pytest.mark.slow
def test_report_of_a_sweep(sweep, capsys):
    """A real 2-setting × 2-seed sweep (callbacks=eval): the per-job table, the groups over
    seeds with intervals, the pairs with verdicts, and the band plots."""
    compare.main([str(sweep)])
    out = sweep / "compare"
    report = (out / "report.md").read_text()
    per_job = report.split("Settings over their seeds")[0]  # the first table: one row a job
    rows = [line for line in per_job.splitlines() if line.startswith("| schedule=")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| schedule=linear,seed=0", "| schedule=linear,seed=1", "| schedule=cosine,seed=0",
        "| schedule=cosine,seed=1"]
    for job, row in zip(("0", "1", "2", "3"), rows):
        fids = series(read_metrics(sweep / job), "eval/fid")
        best_step, best = min(fids, key=lambda sv: sv[1])
        cells = row.split(" | ")
        assert cells[1] == f"{best:.2f}" and cells[2] == str(best_step)
        bpd = series(read_metrics(sweep / job), "eval/bpd")[-1][1]
        assert cells[3].startswith(f"{bpd:.4f} ± ")
    import json

    summary = json.loads((out / "summary.json").read_text())
    grouped = summary["groups"]
    assert [(g["name"], g["seeds"]) for g in grouped] == [
        ("schedule=linear", [0, 1]), ("schedule=cosine", [0, 1])]  # as the jobs ran
    for g in grouped:
        for metric in ("final_fid", "final_kid", "final_bpd"):
            m = g["metrics"][metric]
            assert m["n"] == 2 and m["low"] < m["mean"] < m["high"], (g["name"], metric, m)
    pairs = {p["metric"]: p for p in summary["pairs"]}
    assert set(pairs) == {"bpd", "kid", "fid"}
    for p in pairs.values():
        assert (p["a"], p["b"], p["over"], p["n"]) == ("schedule=cosine", "schedule=linear",
                                                       "seeds", 2)
        assert p["low"] <= p["difference"] <= p["high"] and p["step"] == 4
        assert p["verdict"] in ("lower", "higher",
                                "no difference resolved at this N and seed count")
        assert (p["to_resolve"] is None) == (p["verdict"] != "no difference resolved at this N "
                                             "and seed count")
    for name in ("fid.png", "kid.png", "bpd.png", "bands.png", "schedules.png", "grids.png"):
        assert f"({name})" in report and Image.open(out / name).width > 50
    # the two grids side by side: wider than one
    assert Image.open(out / "grids.png").width > 2 * Image.open(
        sorted((sweep / "0" / "samples").glob("*.png"))[-1]).width


def test_not_a_sweep_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.main([str(tmp_path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"SWEEP_DIR={tmp_path} holds no job folder" in err[0]


def test_t_interval_covers_the_mean_95_percent_of_the_time():
    """Simulated normal data (3 and 10 seeds): over 2,000 trials the 95% interval holds the
    true mean 93.5–96.5% of the time; a z-interval (t replaced by 1.96) covers far less at
    n = 3, so the t quantile matters."""
    import numpy as np

    from ddpm_lightning.metrics.intervals import t_interval

    rng = np.random.default_rng(0)
    for n in (3, 10):
        hits = 0
        for _ in range(2000):
            iv = t_interval(rng.normal(5.0, 2.0, n))
            hits += iv["low"] <= 5.0 <= iv["high"]
        assert 0.935 <= hits / 2000 <= 0.965, (n, hits)
    one = t_interval([2.5])
    assert one == {"mean": 2.5, "low": None, "high": None, "n": 1}
    iv = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t_{0.975, 2} = 4.3027
    assert (iv["low"], iv["high"]) == pytest.approx((2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5))


def _job(sweep, name, overrides, losses):
    """A job folder as train.py writes it, with only what compare reads."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    seed = next((o.split("=")[1] for o in overrides if o.startswith("seed=")), 0)  # as it ran
    (job / "config.yaml").write_text(f"seed: {seed}\nschedule: {{name: linear, T: 10, _target_: "
                                     "ddpm_lightning.core.schedules.make_beta_schedule}\n")
    (job / "csv").mkdir()
    (job / "csv" / "metrics.csv").write_text(
        "step,train/loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(losses)))


def test_groups_are_settings_over_their_seeds(tmp_path):
    """2 settings × 2 seeds and a third setting with one seed: summary.json has 3 groups, the
    seeds in each, the mean and the t-interval of the final loss; one seed, no interval."""
    import json

    from ddpm_lightning.metrics.intervals import t_interval

    sweep = tmp_path / "sweep"
    values = {("linear", 0): 1.0, ("linear", 1): 1.2, ("cosine", 0): 0.8, ("cosine", 1): 0.9,
              ("sigmoid", 0): 0.7}
    for i, ((schedule, seed), v) in enumerate(values.items()):
        _job(sweep, str(i), [f"schedule={schedule}", f"seed={seed}", "trainer.max_steps=3"],
             [v])  # final loss: the mean of the last 50 steps
    compare.main([str(sweep)])
    got = json.loads((sweep / "compare" / "summary.json").read_text())["groups"]
    assert [g["name"] for g in got] == ["schedule=linear", "schedule=cosine", "schedule=sigmoid"]
    assert [g["seeds"] for g in got] == [[0, 1], [0, 1], [0]]
    for g, schedule in zip(got, ("linear", "cosine")):
        want = t_interval([values[(schedule, 0)], values[(schedule, 1)]])
        assert g["metrics"]["final_loss"] == pytest.approx(want)
        assert g["metrics"]["final_loss"]["low"] < g["metrics"]["final_loss"]["mean"]
    assert got[2]["metrics"]["final_loss"]["low"] is None
    report = (sweep / "compare" / "report.md").read_text()
    assert "| schedule=sigmoid | 1 (0) | – | – | – | – | – | 0.7000 (1 seed: no interval) |" \
        in report


def _eval_job(sweep, name, overrides, fid, kid, per_image, step=10, jack=None,
              num_samples=200, extra_rows=""):
    """A job with one evaluation at ``step``: FID ± 1, KID ± 0.001 (its subset spread; no
    kid_se, as before the jackknife), each held-out image's bits/dim (their mean is eval/bpd),
    and with ``jack`` the jackknife's leave-a-group-out FIDs (and KIDs, ``jack`` / 1000)."""
    import numpy as np

    _job(sweep, name, overrides, [0.5])
    bpd = np.asarray(per_image, dtype=np.float64)
    se = bpd.std(ddof=1) / len(bpd) ** 0.5
    (sweep / name / "csv" / "metrics.csv").write_text(
        "step,train/loss,eval/fid,eval/fid_se,eval/kid,eval/kid_std,eval/bpd,eval/bpd_se\n"
        + extra_rows + f"{step},0.5,{fid},1.0,{kid},0.001,{bpd.mean()},{se}\n")
    seed = next((o.split("=")[1] for o in overrides if o.startswith("seed=")), 0)
    (sweep / name / "config.yaml").write_text(
        f"seed: {seed}\nschedule: {{name: linear, T: 10, _target_: ddpm_lightning.core."
        f"schedules.make_beta_schedule}}\ncallbacks: {{eval: {{num_samples: {num_samples}, "
        f"nll_images: {len(bpd)}, every_n_steps: 5}}}}\n")
    (sweep / name / "eval").mkdir()
    np.savez(sweep / name / "eval" / f"bpd_step_{step:07d}.npz", bpd=bpd, seed=0, timesteps=16)
    if jack is not None:
        np.savez(sweep / name / "eval" / f"jackknife_step_{step:07d}.npz", fid=jack, kid=jack / 1000,
                 seed=0, num_samples=num_samples)


def _correlated_images(n=400, shift=0.01, seed=0):
    """Per-image bits/dim of two settings on the same images: a large image effect shared by
    both (sd 0.5), a small independent part each (sd 0.02), and B higher by ``shift``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.normal(3.0, 0.5, n)
    return image + rng.normal(0, 0.02, n), image + shift + rng.normal(0, 0.02, n)


def test_paired_differences_are_narrower_on_correlated_data_and_equal_on_independent():
    """§6: the paired standard error is far smaller than the unpaired one when the two settings'
    values share the image, and the same (to sampling error) when they are independent."""
    import numpy as np

    from ddpm_lightning.metrics.intervals import paired_difference

    def unpaired_se(a, b):
        return (np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)) ** 0.5

    a, b = _correlated_images(n=2000)
    paired = paired_difference(a, b)
    assert paired["sd"] / len(a) ** 0.5 < unpaired_se(a, b) / 10
    rng = np.random.default_rng(1)
    a, b = rng.normal(3.0, 0.5, 2000), rng.normal(3.0, 0.5, 2000)
    paired = paired_difference(a, b)
    assert paired["sd"] / len(a) ** 0.5 == pytest.approx(unpaired_se(a, b), rel=0.1)


def test_pairs_of_one_seed_resolve_bits_per_dim_by_pairing_images(tmp_path):
    """One seed each: a bits/dim shift of 0.01 under an image spread of 0.5 is resolved by the
    pairing over images (an unpaired comparison, the mutant, cannot see it); FID 2 apart with
    standard errors of 1 is not, and the verdict says how many samples would resolve it."""
    import json

    sweep = tmp_path / "sweep"
    a, b = _correlated_images()
    _eval_job(sweep, "0", ["schedule=cosine"], fid=50.0, kid=0.020, per_image=a)
    _eval_job(sweep, "1", ["schedule=linear"], fid=52.0, kid=0.030, per_image=b)
    compare.main([str(sweep), "--baseline", "schedule=linear"])
    got = {p["metric"]: p for p in json.loads((sweep / "compare" / "summary.json").read_text())
           ["pairs"]}
    bpd, fid, kid = got["bpd"], got["fid"], got["kid"]
    assert (bpd["a"], bpd["b"], bpd["over"], bpd["n"]) == (
        "schedule=cosine", "schedule=linear", "images (paired)", 400)
    assert bpd["difference"] == pytest.approx(a.mean() - b.mean())
    assert bpd["verdict"] == "lower" and bpd["high"] < 0 and bpd["to_resolve"] is None
    # FID: −2 ± 1.96·√2 includes 0; an 80% chance needs (1.96 + 0.84)·√2 / 2 · se(n) ≤ 1,
    # n = 200 × 1.981² = 785 samples
    assert fid["over"] == "jackknife (unpaired)" and fid["difference"] == pytest.approx(-2.0)
    assert fid["verdict"] == "no difference resolved at this N and seed count"
    assert fid["to_resolve"].startswith("about 785 samples (callbacks.eval.num_samples) for an "
                                        "80% chance")
    assert kid["verdict"] == "lower"  # −0.01 with an error of 0.0014 (the subset spreads)
    assert kid["over"].startswith("KID subsets")
    report = (sweep / "compare" / "report.md").read_text()
    assert "Differences against schedule=linear" in report and "| schedule=cosine − " in report
    with pytest.raises(SystemExit):
        compare.main([str(sweep), "--baseline", "schedule=quadratic"])


def test_pairs_over_seeds(tmp_path):
    """2 settings × 3 seeds: the difference is paired by seed, with a Student-t interval over
    the three per-seed differences, and unresolved ones say how many seeds would do."""
    import json

    import numpy as np

    from ddpm_lightning.metrics.intervals import paired_difference

    sweep = tmp_path / "sweep"
    fids = {("linear", 0): 40.0, ("linear", 1): 44.0, ("linear", 2): 42.0,
            ("cosine", 0): 39.0, ("cosine", 1): 41.0, ("cosine", 2): 43.5}
    for i, ((schedule, seed), fid) in enumerate(fids.items()):
        a, _ = _correlated_images(seed=seed)
        _eval_job(sweep, str(i), [f"schedule={schedule}", f"seed={seed}"], fid=fid, kid=0.02,
                  per_image=a + (0.1 if schedule == "linear" else 0.0))
    compare.main([str(sweep)])
    summary = json.loads((sweep / "compare" / "summary.json").read_text())
    got = {p["metric"]: p for p in summary["pairs"]}
    want = paired_difference([39.0, 41.0, 43.5], [40.0, 44.0, 42.0])
    fid = got["fid"]
    assert (fid["a"], fid["b"], fid["over"], fid["n"]) == (
        "schedule=cosine", "schedule=linear", "seeds", 3)
    assert (fid["difference"], fid["low"], fid["high"]) == pytest.approx(
        (want["mean"], want["low"], want["high"]))
    assert fid["verdict"].startswith("no difference") and "seeds" in fid["to_resolve"]
    assert got["bpd"]["verdict"] == "lower" and got["bpd"]["difference"] == pytest.approx(-0.1)
    assert got["kid"]["difference"] == 0.0
    groups = {g["name"]: g for g in summary["groups"]}
    assert groups["schedule=cosine"]["metrics"]["final_fid"]["n"] == 3
    assert np.isclose(groups["schedule=linear"]["metrics"]["final_fid"]["mean"], 42.0)


def test_one_seed_fid_and_kid_pair_over_the_same_jackknife_groups(tmp_path):
    """One seed each, FID 2 apart with standard errors of about 1 each: the leave-a-group-out
    values of the two jobs move together (they leave out the same samples, which share x_T),
    so the paired error is about 0.3 and the difference is resolved; ignoring the pairing (the
    mutant: the files removed) leaves it unresolved."""
    import json
    import shutil

    import numpy as np

    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.1, 100)  # 100 groups: se = √(99/100 · Σ(v − v̄)²) ≈ 1
    jack_a, jack_b = 50 + shared + rng.normal(0, 0.02, 100), 52 + shared + rng.normal(0, 0.02, 100)
    sweep = tmp_path / "sweep"
    a, b = _correlated_images()
    _eval_job(sweep, "0", ["schedule=cosine"], 50.0, 0.020, a, jack=jack_a)
    _eval_job(sweep, "1", ["schedule=linear"], 52.0, 0.021, b, jack=jack_b)

    def got():
        compare.main([str(sweep), "--baseline", "schedule=linear"])
        return {p["metric"]: p for p in
                json.loads((sweep / "compare" / "summary.json").read_text())["pairs"]}

    fid, kid = got()["fid"], got()["kid"]
    diff = jack_a - jack_b
    error = (99 / 100 * ((diff - diff.mean()) ** 2).sum()) ** 0.5
    assert 0.2 < error < 0.4 and fid["over"] == "jackknife groups (paired)" and fid["n"] == 100
    assert (fid["low"], fid["high"]) == pytest.approx((-2 - 1.959964 * error,
                                                       -2 + 1.959964 * error))
    assert fid["verdict"] == "lower" and kid["verdict"] == "lower"
    for job in ("0", "1"):
        shutil.rmtree(sweep / job / "eval")
        (sweep / job / "eval").mkdir()
    fid = got()["fid"]
    assert fid["over"] == "jackknife (unpaired)" and fid["verdict"].startswith("no difference")


def test_a_job_that_stopped_short_is_compared_where_it_stopped(tmp_path):
    """Job 1 stopped at step 5 (its last evaluation); job 0 went on to step 10. The pair is
    compared at step 5, the last step both reached (never 0's step 10 against 1's step 5), with
    each job's per-image file of that step, and the report says so."""
    import json

    sweep = tmp_path / "sweep"
    a, b = _correlated_images()
    early = (f"5,0.6,60.0,1.0,0.05,0.001,{a.mean()},0.01\n")
    _eval_job(sweep, "0", ["schedule=cosine"], 40.0, 0.020, a, step=10, extra_rows=early)
    _eval_job(sweep, "1", ["schedule=linear"], 52.0, 0.030, b, step=5)
    import numpy as np

    np.savez(sweep / "0" / "eval" / "bpd_step_0000005.npz", bpd=a, seed=0, timesteps=16)
    compare.main([str(sweep), "--baseline", "schedule=linear"])
    pairs = {p["metric"]: p for p in
             json.loads((sweep / "compare" / "summary.json").read_text())["pairs"]}
    assert {p["step"] for p in pairs.values()} == {5}
    assert pairs["fid"]["difference"] == pytest.approx(60.0 - 52.0)  # not 40 − 52
    assert pairs["bpd"]["over"] == "images (paired)"
    report = (sweep / "compare" / "report.md").read_text()
    assert "schedule=linear stopped at step 5, before step 10" in report


def test_seeds_are_read_as_they_ran_and_a_rerun_counts_once(tmp_path):
    """A job run without ``seed=`` ran with the config's seed 0, and pairs with a ``seed=0``
    job; a rerun of a setting with the same seed counts once (the one that got furthest),
    with a note; a non-finite value is left out, named, and summary.json stays valid JSON."""
    import json

    sweep = tmp_path / "sweep"
    a, b = _correlated_images()
    _eval_job(sweep, "0", ["schedule=cosine"], 50.0, 0.02, a)
    _eval_job(sweep, "1", ["schedule=linear", "seed=0"], 52.0, 0.03, b)
    _eval_job(sweep, "2", ["schedule=linear", "seed=0"], 51.0, 0.03, b,
              extra_rows="5,0.5,nan,1.0,0.03,0.001,2.9,0.01\n")
    compare.main([str(sweep)])
    text = (sweep / "compare" / "summary.json").read_text()
    summary = json.loads(text)
    assert "NaN" not in text
    groups = {g["name"]: g for g in summary["groups"]}
    assert groups["schedule=linear"]["seeds"] == [0] and groups["schedule=linear"]["jobs"] == ["2"]
    assert groups["schedule=cosine"]["seeds"] == [0]
    pairs = {p["metric"]: p for p in summary["pairs"]}
    assert pairs["kid"]["n"] == 1 and pairs["kid"]["step"] is not None
    report = (sweep / "compare" / "report.md").read_text()
    assert "job 1 repeats seed 0 of job 2" in report
    assert "eval/fid is not finite at step 5" in report


def test_fid_at_different_sample_counts_is_not_compared(tmp_path):
    """FID's bias depends on N: jobs evaluated with different num_samples get no FID or KID
    difference, but a verdict that names the setting; bits/dim still compares."""
    import json

    sweep = tmp_path / "sweep"
    a, b = _correlated_images()
    _eval_job(sweep, "0", ["schedule=cosine"], 50.0, 0.02, a, num_samples=200)
    _eval_job(sweep, "1", ["schedule=linear"], 30.0, 0.03, b, num_samples=1000)
    compare.main([str(sweep), "--baseline", "schedule=linear"])
    pairs = {p["metric"]: p for p in
             json.loads((sweep / "compare" / "summary.json").read_text())["pairs"]}
    for metric in ("fid", "kid"):
        assert pairs[metric]["difference"] is None
        assert pairs[metric]["verdict"].startswith("not comparable: callbacks.eval.num_samples")
    assert pairs["bpd"]["verdict"] == "lower"


def test_to_resolve_counts_give_an_80_percent_chance():
    """The count of seeds that would resolve a difference gives the t-interval an 80% chance
    to exclude 0 (checked by simulation at that count), and the count for a jackknife error
    scales with 1/√N: (1.96 + 0.84)² · (se/d)² · N."""
    import numpy as np
    from scipy.stats import t as student_t

    from ddpm_lightning.metrics.intervals import replicates_to_resolve, samples_to_resolve

    n = replicates_to_resolve(1.0, 1.0)
    assert n == 10
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, (20000, n))
    half = student_t.ppf(0.975, n - 1) * x.std(1, ddof=1) / n**0.5
    assert (x.mean(1) - half > 0).mean() == pytest.approx(0.80, abs=0.02)
    assert samples_to_resolve(1.0, 200, 2.0) == 393  # 200 · (2.8016 / 2)² = 392.4
    assert replicates_to_resolve(1.0, 0.0) is None and samples_to_resolve(1.0, 200, 0.0) is None
