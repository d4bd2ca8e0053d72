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
    proc = run_script("train.py", "-m", "schedule=linear,cosine", *TINY, *EVAL,
                      "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=2",
                      f"hydra.sweep.dir={sweep}", timeout=900,
                      env={"TORCH_HOME": str(home), "DDPM_FID_CACHE": str(tmp_path / "stats")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


@pytest.mark.slow
def test_report_of_a_sweep(sweep, capsys):
    compare.main([str(sweep)])
    out = sweep / "compare"
    report = (out / "report.md").read_text()
    per_job = report.split("Settings over their seeds")[0]  # the first table: one row a job
    rows = [line for line in per_job.splitlines() if line.startswith("| schedule=")]
    assert [r.split(" | ")[0] for r in rows] == ["| schedule=linear", "| schedule=cosine"]
    for job, row in zip(("0", "1"), rows):
        fids = series(read_metrics(sweep / job), "eval/fid")
        best_step, best = min(fids, key=lambda sv: sv[1])
        cells = row.split(" | ")
        assert cells[1] == f"{best:.2f}" and cells[2] == str(best_step)
        bpd = series(read_metrics(sweep / job), "eval/bpd")[-1][1]
        assert cells[3].startswith(f"{bpd:.4f} ± ")
    import json

    grouped = json.loads((out / "summary.json").read_text())["groups"]
    assert [(g["name"], g["metrics"]["best_fid"]["n"]) for g in grouped] == [
        ("schedule=linear", 1), ("schedule=cosine", 1)]  # one seed each: no interval
    for name in ("fid.png", "bpd.png", "bands.png", "schedules.png", "grids.png"):
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
    (job / "config.yaml").write_text("schedule: {name: linear, T: 10, _target_: "
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
    assert [g["seeds"] for g in got] == [["0", "1"], ["0", "1"], ["0"]]
    for g, schedule in zip(got, ("linear", "cosine")):
        want = t_interval([values[(schedule, 0)], values[(schedule, 1)]])
        assert g["metrics"]["final_loss"] == pytest.approx(want)
        assert g["metrics"]["final_loss"]["low"] < g["metrics"]["final_loss"]["mean"]
    assert got[2]["metrics"]["final_loss"]["low"] is None
    report = (sweep / "compare" / "report.md").read_text()
    assert "| schedule=sigmoid | 1 (0) | – | – | 0.7000 (1 seed: no interval) |" in report
