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
    rows = [line for line in report.splitlines() if line.startswith("| schedule=")]
    assert [r.split(" | ")[0] for r in rows] == ["| schedule=linear", "| schedule=cosine"]
    for job, row in zip(("0", "1"), rows):
        fids = series(read_metrics(sweep / job), "eval/fid")
        best_step, best = min(fids, key=lambda sv: sv[1])
        cells = row.split(" | ")
        assert cells[1] == f"{best:.2f}" and cells[2] == str(best_step)
        bpd = series(read_metrics(sweep / job), "eval/bpd")[-1][1]
        assert cells[3].startswith(f"{bpd:.4f} ± ")
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
