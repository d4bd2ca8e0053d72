"""A run stopped in the middle of an epoch and resumed repeats the uninterrupted run's losses
bit for bit: the loader's position, t, ε, flips, dropout, EMA, lr schedule and the loss-aware
t history all resume. Every test stops where an epoch is not over."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
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
    args = [*BASE, "schedule.T=8", "module.objective=vlb", "module.timesteps.sampler=loss_aware",
            "module.timesteps.history=1"]
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


@pytest.mark.slow
def test_mid_epoch_resume_under_two_rank_ddp(tmp_path):
    args = [*BASE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "data.random_flip=true"]
    want, got = _compare(tmp_path, args, stop=4, total=8, timeout=900)
    _assert_bit_equal(want, got, 8)


def test_resume_refuses_another_batch_size_mid_epoch(tmp_path):
    part = tmp_path / "part"
    _ok(run_main("train.py", *BASE, f"hydra.run.dir={part}", "trainer.max_steps=3"))
    proc = run_main("train.py", *BASE, "data.batch_size=4", f"hydra.run.dir={part}",
                      "trainer.max_steps=6", "resume=auto")
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
