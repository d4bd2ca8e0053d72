"""What a sweep writes to W&B, read back from the offline ``.wandb`` files with wandb's own
protobufs (no server): one run per job, one group, names and configs that carry the swept key,
and each run's own losses and images."""

from __future__ import annotations

import pytest

from ddpm_lightning.tools.wandb_records import RecordError, find_runs, read_records, read_run

from helpers import TINY, read_metrics, run_script, series

OFFLINE = {"WANDB_MODE": None, "WANDB_API_KEY": None, "NETRC": "/nonexistent"}
WANDB_TINY = [a for a in TINY if not a.startswith("logger=")] + ["logger=wandb"]


def _sweep(tmp_path, *extra, timeout=600):
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "schedule=linear,cosine", *WANDB_TINY,
                      "trainer.max_steps=4", "callbacks.sample_grid.every_n_steps=2",
                      f"hydra.sweep.dir={sweep}", *extra,
                      env={**OFFLINE, "HOME": str(tmp_path)}, cwd=tmp_path, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "already in progress" not in proc.stdout + proc.stderr
    return sweep, proc


def _check_two_runs(sweep):
    runs = {job: find_runs(sweep / job / "wandb") for job in ("0", "1")}
    assert [len(r) for r in runs.values()] == [1, 1], runs  # one run per job, in its own folder
    got = {job: read_run(r[0]) for job, r in runs.items()}
    assert got["0"]["id"] != got["1"]["id"]
    for job in ("0", "1"):
        assert (sweep / job / "wandb_run_id.txt").read_text() == got[job]["id"]
    assert got["0"]["group"] == got["1"]["group"]  # one group for the sweep
    assert got["0"]["group"].startswith("cpu_embedded/sweep:")
    for run in got.values():  # the fixed overrides: in the group (cut at 128) and the config
        assert "trainer.max_steps=4" in run["config"]["overrides"]
        assert run["group"].startswith("cpu_embedded/sweep:model.ch=32,")
    for job, schedule in (("0", "linear"), ("1", "cosine")):
        run = got[job]
        assert run["name"] == f"cpu_embedded:schedule={schedule}"  # only what differs
        assert run["config"]["schedule"]["name"] == schedule
        assert run["config"]["sweep"] == {"schedule": schedule}
        steps = [h["trainer/global_step"] for h in run["history"] if "train/loss" in h]
        assert steps == [0, 1, 2, 3], steps  # its own loss history, not both jobs'
        images = [h for h in run["history"] if h.get("samples/_type") == "images/separated"]
        assert len(images) == 2  # the grids of steps 2 and 4
        for h in images:
            name = h["samples/filenames"][0]
            assert (runs[job][0] / "files" / name).is_file(), name
        assert run["exit_code"] == 0
    losses = [[h["train/loss"] for h in got[j]["history"] if "train/loss" in h] for j in "01"]
    assert losses[0] != losses[1]  # different schedules, different losses
    for job in ("0", "1"):  # every job also writes its own CSV log, with what W&B received
        csv_losses = [v for _, v in series(read_metrics(sweep / job), "train/loss")]
        assert csv_losses == pytest.approx(losses[int(job)], rel=1e-6)
    return got


def test_sweep_gives_one_wandb_run_per_job(tmp_path):
    sweep, _ = _sweep(tmp_path)
    _check_two_runs(sweep)


@pytest.mark.slow
def test_sweep_under_ddp_gives_one_wandb_run_per_job(tmp_path):
    sweep, _ = _sweep(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "trainer.precision=32-true", timeout=900)
    _check_two_runs(sweep)


def test_a_diverged_job_finishes_its_run_and_the_next_job_gets_its_own(tmp_path):
    """lr = 1e30 makes job 0 diverge at once; job 1 must still log into a run of its own."""
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "module.lr=1e30,0.001", *WANDB_TINY,
                      "trainer.max_steps=3", "module.warmup_steps=0",
                      f"hydra.sweep.dir={sweep}", env={**OFFLINE, "HOME": str(tmp_path)},
                      cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "non-finite" in proc.stderr
    first, second = (read_run(find_runs(sweep / j / "wandb")[0]) for j in ("0", "1"))
    assert first["exit_code"] == 1 and second["exit_code"] == 0
    assert first["id"] != second["id"]
    assert second["name"] == "cpu_embedded:module.lr=0.001"
    assert [h["trainer/global_step"] for h in second["history"] if "train/loss" in h] == [0, 1, 2]


def test_record_reader_rejects_a_foreign_file(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(RecordError, match="is not a W&B run file"):
        read_records(bad)
