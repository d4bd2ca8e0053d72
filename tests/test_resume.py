"""A run stopped in the middle of an epoch and resumed repeats the uninterrupted run's losses
bit for bit: the loader's position, t, ε, flips, dropout, EMA, lr schedule and the loss-aware
t history all resume. Every test stops where an epoch is not over."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, TINY, read_metrics, run_main, run_script, series

# batch 8 of the 4,500 embedded training digits: 562 batches an epoch, so every stop below is
# mid-epoch; no grids (they do not touch the training streams, but cost time)
BASE = [*TINY, "callbacks.sample_grid=null", "callbacks.checkpoint.every_n_train_steps=1000"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _losses(run: Path) -> list[tuple[int, float]]:
    return series(read_metrics(run), "train/loss")


def _compare(tmp_path, args, stop: int, total: int, timeout=600):
    """Run uninterrupted for ``total`` steps; run again stopping at ``stop``, resume to
    ``total`` in a fresh process (as after a preemption); return both loss sequences. The
    first two run in this process, unless ``args`` ask for DDP."""
    ddp = "trainer=ddp" in args
    run = functools.partial(run_script, timeout=timeout) if ddp else run_main
    full, part = tmp_path / "full", tmp_path / "part"
    _ok(run("train.py", *args, f"hydra.run.dir={full}", f"trainer.max_steps={total}"))
    _ok(run("train.py", *args, f"hydra.run.dir={part}", f"trainer.max_steps={stop}"))
    resumed = _ok(run_script("train.py", *args, f"hydra.run.dir={tmp_path / 'unused'}",
                             f"trainer.max_steps={total}",
                             f"resume={part / 'checkpoints' / 'last.ckpt'}", timeout=timeout))
    assert "not resumable" not in resumed.stdout + resumed.stderr
    return _losses(full), _losses(part)


def _assert_bit_equal(want, got, total):
    assert [s for s, _ in want] == [s for s, _ in got] == list(range(total)), (want, got)
    diff = max(abs(a - b) for (_, a), (_, b) in zip(want, got))
    assert diff == 0.0, f"largest loss difference after the resume: {diff:.3g}"


def test_mid_epoch_resume_single_process(tmp_path):
    want, got = _compare(tmp_path, BASE, stop=5, total=10)
    _assert_bit_equal(want, got, 10)


def test_mid_epoch_resume_with_two_workers_and_flips(tmp_path):
    args = [*BASE, "data.num_workers=2", "data.random_flip=true", "model.dropout=0.1"]
    want, got = _compare(tmp_path, args, stop=4, total=8)
    _assert_bit_equal(want, got, 8)


def test_mid_epoch_resume_with_loss_aware_t(tmp_path):
    # T = 8 and a history of 1: importance sampling of t starts within the first steps
    args = [*BASE, "schedule.T=8", "module.objective=vlb", "module.loss_weight=none",
            "module.timesteps.sampler=loss_aware", "module.timesteps.history=1"]
    want, got = _compare(tmp_path, args, stop=5, total=9)
    _assert_bit_equal(want, got, 9)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (18, 18), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.slow  # the DataLoader path of the other mid-epoch tests, on image files
def test_mid_epoch_resume_on_an_image_folder(tmp_path, image_folder):
    # 36 training images in batches of 4: 9 batches an epoch; stop at 6, go on into epoch 2
    args = [*BASE, "data=folder", f"data.root={image_folder}", "data.channels=1",
            "data.batch_size=4", "data.num_workers=0"]
    want, got = _compare(tmp_path, args, stop=6, total=14)
    _assert_bit_equal(want, got, 14)


def test_sigterm_mid_epoch_then_resume_auto(tmp_path):
    env = {"PYTHONPATH": str(ROOT / "tests")}
    full, run = tmp_path / "full", tmp_path / "run"
    _ok(run_main("train.py", *BASE, f"hydra.run.dir={full}", "trainer.max_steps=12"))
    stopped = _ok(run_script("train.py", *BASE, f"hydra.run.dir={run}", "trainer.max_steps=12",
                             "+callbacks.kill._target_=helpers.SigtermAt",
                             "+callbacks.kill.step=7", env=env))
    assert "received SIGTERM: saved" in stopped.stdout and "at step 8" in stopped.stdout
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    _ok(run_script("train.py", *BASE, f"hydra.run.dir={run}", "trainer.max_steps=12",
                   "resume=auto", env=env))
    _assert_bit_equal(_losses(full), _losses(run), 12)


@pytest.mark.slow  # two 12-step runs and a resume; the default path is in test_posthoc_ema
def test_posthoc_ema_profiles_survive_a_mid_epoch_resume(tmp_path):
    """module.ema=posthoc: a run stopped at step 5 and resumed to 12 writes the same snapshots
    (steps 4, 8 and 12; 5 where it stopped) as a run never stopped, bit for bit."""
    args = [*BASE, "module.ema=posthoc", "module.posthoc.every_n_steps=4"]
    want, got = _compare(tmp_path, args, stop=5, total=12)
    _assert_bit_equal(want, got, 12)
    full, part = tmp_path / "full" / "posthoc_ema", tmp_path / "part" / "posthoc_ema"
    assert sorted(p.name for p in part.glob("step_*.pt")) == [
        "step_0000004.pt", "step_0000005.pt", "step_0000008.pt", "step_0000012.pt"]
    for name in ("step_0000008.pt", "step_0000012.pt"):
        a, b = (torch.load(d / name, weights_only=True)["state_dicts"] for d in (full, part))
        for sa, sb in zip(a, b):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_a_signal_stops_a_local_sweep_not_only_its_job(tmp_path):
    """SIGTERM (or Ctrl-C) in job 0 of a 2-job local sweep: job 0 saves its checkpoint and the
    sweep ends there, with exit status 143 and one line; job 1 is never started (before, each
    signal only stopped one job, and the next began)."""
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "schedule=linear,cosine", *BASE, "trainer.max_steps=12",
                      "+callbacks.kill._target_=helpers.SigtermAt", "+callbacks.kill.step=3",
                      f"hydra.sweep.dir={sweep}", env={"PYTHONPATH": str(ROOT / "tests")})
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "error: SIGTERM stopped job 0 of the sweep at step 4" in proc.stderr
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file() and not (sweep / "1").exists()


@pytest.mark.slow
def test_mid_epoch_resume_under_two_rank_ddp(tmp_path):
    args = [*BASE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "data.random_flip=true"]
    want, got = _compare(tmp_path, args, stop=4, total=8, timeout=900)
    _assert_bit_equal(want, got, 8)


def test_resume_refuses_another_batch_size_mid_epoch(tmp_path):
    """resume=auto refuses another batch size as any other setting; resume=PATH, which may change
    settings, refuses this one mid-epoch (the loader's position would not be the same)."""
    part = tmp_path / "part"
    _ok(run_main("train.py", *BASE, f"hydra.run.dir={part}", "trainer.max_steps=3"))
    proc = run_main("train.py", *BASE, "data.batch_size=4", f"hydra.run.dir={part}",
                    "trainer.max_steps=6", "resume=auto")
    assert proc.returncode != 0
    assert "data.batch_size=8 (this run: 4)" in proc.stderr, proc.stderr[-2000:]
    proc = run_main("train.py", *BASE, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'x'}",
                    "trainer.max_steps=6", f"resume={part / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode != 0
    assert "batch_size=8, this run has batch_size=4" in proc.stderr, proc.stderr[-2000:]


def test_device_data_gives_the_dataloader_batches_and_resumes(tmp_path):
    """data.on_device=true (the GPU path, here on the CPU) against the DataLoader: the same
    losses bit for bit, also when stopped mid-epoch (4-batch epochs, stop at 6) and resumed."""
    args = [*BASE, "data.random_flip=true", "trainer.limit_train_batches=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    _ok(run_main("train.py", *args, "data.on_device=false", f"hydra.run.dir={full}",
                 "trainer.max_steps=10"))
    device = [*args, "data.on_device=true"]
    _ok(run_main("train.py", *device, f"hydra.run.dir={part}", "trainer.max_steps=6"))
    _ok(run_script("train.py", *device, f"hydra.run.dir={tmp_path / 'unused'}",
                   "trainer.max_steps=10", f"resume={part / 'checkpoints' / 'last.ckpt'}"))
    _assert_bit_equal(_losses(full), _losses(part), 10)


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_resume_auto_continues_only_a_run_with_the_same_settings(tmp_path):
    """resume=auto with another lr neither continues the earlier run nor writes into its
    folder: it starts afresh, and says why in one line. With the same settings (a longer run)
    it continues the newest such run. In a folder whose own checkpoint was trained otherwise
    it refuses in one line, before anything is written there."""
    exp = tmp_path / "exp"
    first, second, third = exp / "first", exp / "second", exp / "third"
    _ok(run_main("train.py", *BASE, f"hydra.run.dir={first}", "trainer.max_steps=4",
                 "module.lr=1e-3"))
    before = _tree(first)
    proc = _ok(run_main("train.py", *BASE, f"hydra.run.dir={second}", "trainer.max_steps=6",
                        "module.lr=5e-4", "resume=auto"))
    assert (f"resume=auto: starting a fresh run: the newest run of this experiment, {first}, "
            "was trained with other settings: module.lr=0.001 (this run: 0.0005)") in proc.stderr
    assert "resuming from" not in proc.stderr
    assert _tree(first) == before
    assert [s for s, _ in _losses(second)] == list(range(6))  # a run of its own from step 0

    # the same settings as the first run, longer: skips the newer second run, continues the first
    proc = _ok(run_main("train.py", *BASE, f"hydra.run.dir={third}", "trainer.max_steps=6",
                        "module.lr=1e-3", "resume=auto"))
    assert f"resuming from {first / 'checkpoints' / 'last.ckpt'} at step 4" in proc.stderr
    assert [s for s, _ in _losses(first)] == list(range(6))

    before = _tree(first)
    proc = run_main("train.py", *BASE, f"hydra.run.dir={first}", "trainer.max_steps=8",
                    "module.lr=2e-3", "resume=auto")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: resume=auto: {first / 'checkpoints' / 'last.ckpt'} was trained with other "
        "settings: module.lr=0.001 (this run: 0.002); give "
        f"resume={first / 'checkpoints' / 'last.ckpt'} to continue it with this run's settings, "
        "or choose another directory")
    assert _tree(first) == before


def test_resume_path_with_new_settings_trains_with_them_and_records_the_step(tmp_path):
    """An explicit resume=PATH may change settings: the new lr (and Adam settings) apply from
    the resumed step on, although the checkpoint's optimizer state holds the old ones, and
    RUN/resumes.jsonl says which settings changed at which step (and that a new seed does not
    apply: the checkpoint's random streams continue)."""
    import json

    args = [*BASE, "module.warmup_steps=8", "module.adam_eps=1e-6"]
    full, part = tmp_path / "full", tmp_path / "part"
    _ok(run_main("train.py", *args, f"hydra.run.dir={full}", "trainer.max_steps=8",
                 "module.lr=1e-3"))
    _ok(run_main("train.py", *args, f"hydra.run.dir={part}", "trainer.max_steps=4",
                 "module.lr=1e-3"))
    proc = _ok(run_script("train.py", *args, f"hydra.run.dir={tmp_path / 'unused'}",
                          "trainer.max_steps=8", "module.lr=5e-4", "module.adam_eps=1e-5",
                          "seed=1", f"resume={part / 'checkpoints' / 'last.ckpt'}"))
    assert "from step 4 on: module.adam_eps=1e-06 (this run: 1e-05), module.lr=0.001 " \
           "(this run: 0.0005), trainer.max_steps=4 (this run: 8)" in proc.stderr
    want = dict(series(read_metrics(full), "train/lr"))
    got = dict(series(read_metrics(part), "train/lr"))
    assert sorted(got) == sorted(want)
    for step, lr in got.items():  # logged after step `step`: the lr of the next one
        assert lr == pytest.approx(want[step] * (0.5 if step >= 4 else 1.0), rel=1e-6), step
    record = [json.loads(line) for line in (part / "resumes.jsonl").read_text().splitlines()]
    assert record == [{"step": 4, "checkpoint": str(part / "checkpoints" / "last.ckpt"),
                       "changed": {"module.adam_eps": [1e-06, 1e-05],
                                   "module.lr": [0.001, 0.0005],
                                   "trainer.max_steps": [4, 8]},
                       "not_applied": {"data.shuffle_seed": [0, 1], "seed": [0, 1]}}]
    assert "note: seed=0 (this run: 1), data.shuffle_seed=0 (this run: 1) does not apply: a " \
           "resume continues the checkpoint's random streams" in proc.stderr
    ckpt = __import__("torch").load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["eps"] == 1e-5


def test_slurm_sigusr1_requeue_resumes_the_run_in_its_folder_bit_exactly(tmp_path):
    """trainer=slurm in a (faked) SLURM job: SIGUSR1 mid-epoch (SLURM's warning before the time
    limit) stops the run at a step boundary with last.ckpt, and the job is requeued through
    ``scontrol`` (a stub on PATH). The requeued job, the same command in a new folder with
    SLURM_RESTART_COUNT=1 and no resume=, continues that run in its folder to bit-equal
    losses. Lightning's mid-step hpc_ckpt_*.ckpt is never written."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "tests")}
    job = [*BASE, "trainer=slurm", "trainer.accelerator=cpu", "trainer.devices=1",
           "trainer.num_nodes=1", "trainer.max_steps=12", "trainer.log_every_n_steps=1",
           "+callbacks.kill._target_=helpers.SigtermAt", "+callbacks.kill.step=7",
           "+callbacks.kill.signal=SIGUSR1"]
    full = tmp_path / "alone" / "full"
    _ok(run_script("train.py", *job, f"hydra.run.dir={full}",
                   "~callbacks.kill", env={"PYTHONPATH": str(ROOT / "tests")}))
    exp = tmp_path / "exp"
    first = _ok(run_script("train.py", *job, f"hydra.run.dir={exp / 'first'}", env=slurm))
    assert "received SIGUSR1: saved" in first.stdout and "at step 8" in first.stdout
    assert "requeued SLURM job 4242" in first.stdout
    assert log.read_text() == "requeue 4242\n"
    again = _ok(run_script("train.py", *job, f"hydra.run.dir={exp / 'second'}",
                           env={**slurm, "SLURM_RESTART_COUNT": "1"}))
    ckpt = exp / "first" / "checkpoints" / "last.ckpt"
    assert f"resuming from {ckpt} at step 8" in again.stderr
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))
    _assert_bit_equal(_losses(full), _losses(exp / "first"), 12)
