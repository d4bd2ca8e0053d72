"""Bad input fails fast with one line; faults lose nothing (CPU, tiny models)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from ddpm_lightning.core.schedules import make_beta_schedule
from ddpm_lightning.core.unet import UNet
from ddpm_lightning.training.checkpoint import AtomicCheckpointIO, CheckpointError
from ddpm_lightning.training.data import DiffusionDataModule
from ddpm_lightning.training.module import DDPM

from helpers import ROOT, TINY, run_main, run_script

# ------------------------------------------------------------------ bad configuration

BAD_TRAIN = [
    (["schedule.T=0"], "schedule.T=0 is invalid; T must be an integer >= 1"),
    (["schedule.beta_end=1.5"], "schedule.beta_end=1.5 is outside (0, 1)"),
    (["schedule.name=bogus"], "schedule.name='bogus' is unknown; valid names: linear, cosine"),
    (["model.image_size=15", "data.image_size=15"], "model.image_size=15 must be divisible"),
    (["model.ch=48"], "model.ch=48"),
    (["model.attn_resolutions=[5]"], "model.attn_resolutions=[5] contains 5"),
    (["data.dataset=imagenet"], "data.dataset='imagenet'"),
    (["data=folder", "data.root=/nonexistent/images", "model.in_channels=3", "data.channels=3"],
     "/nonexistent/images"),
    (["data.channels=3"], "data.channels=3 does not match dataset 'embedded'"),
    (["trainer.devices=64"], "trainer.devices=64 is more than the"),
    (["trainer.devices=0"], "trainer.devices=0 is invalid; use an integer >= 1 or -1"),
    (["module.sampler.steps=51"], "module.sampler.steps=51 is invalid"),
    (["module.sampler.eta=-0.1"], "module.sampler.eta=-0.1 is invalid"),
    (["resume=/nonexistent/last.ckpt"], "resume=/nonexistent/last.ckpt does not exist"),
    (["+callbacks.foo._target_=nonexistent.Foo"],
     "callbacks.foo._target_=nonexistent.Foo: Error loading 'nonexistent.Foo'"),
    (["+callbacks.checkpoint.mode=foo"], "callbacks.checkpoint: `mode` can be min, max but got foo"),
    (["resume=/tmp"], "resume=/tmp is a directory; give a checkpoint file (e.g. "
                      "/tmp/checkpoints/last.ckpt) or resume=auto"),
]


@pytest.mark.parametrize("args, message", BAD_TRAIN, ids=[a[0] for a, _ in BAD_TRAIN])
def test_bad_train_config_fails_before_any_work(args, message, tmp_path):
    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, f"hydra.run.dir={run}", *args)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert "Traceback" not in proc.stderr
    assert not run.exists()  # nothing half-written


def test_full_traceback_only_with_hydra_full_error(tmp_path):
    # a real process: the one-line error above is also what the command line prints
    proc = run_script("train.py", *TINY, f"hydra.run.dir={tmp_path / 'r0'}", "schedule.T=0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: schedule.T=0 is invalid")
    proc = run_main("train.py", *TINY, f"hydra.run.dir={tmp_path / 'r'}", "schedule.T=0",
                    env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr


BAD_SAMPLE = [
    (["num_samples=0"], "num_samples=0 is invalid"),
    (["sampler.steps=51"], "sampler.steps=51 is invalid"),
    (["sampler.eta=-1"], "sampler.eta=-1 is invalid"),
]


@pytest.mark.parametrize("args, message", BAD_SAMPLE, ids=[a[0] for a, _ in BAD_SAMPLE])
def test_bad_sample_request_fails_before_any_work(args, message, tmp_path, tiny_ckpt):
    out = tmp_path / "s"
    proc = run_main("sample.py", f"ckpt_path={tiny_ckpt}", f"hydra.run.dir={out}", *args)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not out.exists()


def test_missing_checkpoint_path_for_sampling(tmp_path):
    proc = run_main("sample.py", "ckpt_path=/no/such.ckpt", f"hydra.run.dir={tmp_path / 's'}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: ckpt_path=/no/such.ckpt does not exist"
    proc = run_main("sample.py", f"ckpt_path={tmp_path}", f"hydra.run.dir={tmp_path / 's'}")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: ckpt_path={tmp_path} is a directory; give a checkpoint file, e.g. "
        f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")


# ------------------------------------------------------------------ faults

def test_truncated_or_foreign_checkpoint_is_refused_on_resume(tmp_path, tiny_ckpt):
    bad = tmp_path / "trunc.ckpt"
    bad.write_bytes(tiny_ckpt.read_bytes()[:3000])
    proc = run_main("train.py", *TINY, f"hydra.run.dir={tmp_path / 'r'}", f"resume={bad}")
    assert proc.returncode == 1 and "is not a readable checkpoint" in proc.stderr
    proc = run_main("train.py", *TINY, f"hydra.run.dir={tmp_path / 'r2'}", f"resume={tiny_ckpt}",
                      "schedule=cosine")
    assert proc.returncode == 1
    assert "was trained with schedule.name='linear', but this run has schedule.name='cosine'" \
        in proc.stderr
    proc = run_main("train.py", *TINY, f"hydra.run.dir={tmp_path / 'r3'}", f"resume={tiny_ckpt}",
                      "model.ch=64")
    assert proc.returncode == 1 and "was trained with model.ch=32" in proc.stderr


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_new_run_never_overwrites_an_existing_runs_outputs(tmp_path, tiny_ckpt):
    """Not its checkpoints, nor the .hydra/ record of how it was run (Hydra rewrites that before
    the job starts): refused before Hydra writes anything. Likewise sample.py's outputs, and a
    sweep into an earlier sweep's folder; resume=auto still continues there."""
    run = tiny_ckpt.parent.parent
    before = _files(run)
    assert (run / ".hydra" / "overrides.yaml").is_file()
    proc = run_main("train.py", *TINY, f"hydra.run.dir={run}", "trainer.max_steps=2",
                    "schedule=cosine")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: hydra.run.dir={run} already holds checkpoints; pass resume=auto to continue "
        "that run, or choose another directory")
    assert _files(run) == before
    steps_only = tmp_path / "steps_only"  # no last.ckpt for resume=auto: name a checkpoint
    (steps_only / "checkpoints").mkdir(parents=True)
    (steps_only / "checkpoints" / "step_0000002.ckpt").write_bytes(b"x")
    proc = run_main("train.py", *TINY, f"hydra.run.dir={steps_only}", "resume=auto")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: hydra.run.dir={steps_only} already holds checkpoints; pass "
        f"resume={steps_only / 'checkpoints'}/<one of its .ckpt files> to continue that run, "
        "or choose another directory")
    elsewhere = tmp_path / "elsewhere.ckpt"  # resuming another checkpoint into this folder
    elsewhere.write_bytes(tiny_ckpt.read_bytes())
    proc = run_main("train.py", *TINY, f"hydra.run.dir={run}", "trainer.max_steps=4",
                    f"resume={elsewhere}")
    assert proc.returncode == 1 and "already holds checkpoints" in proc.stderr
    assert _files(run) == before

    out = tmp_path / "s"
    args = [f"ckpt_path={tiny_ckpt}", f"hydra.run.dir={out}", "num_samples=2", "progress=false"]
    assert run_main("sample.py", *args).returncode == 0
    first = _files(out)
    proc = run_main("sample.py", *args, "seed=1")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == \
        f"error: hydra.run.dir={out} already holds samples.npz; choose another directory"
    assert _files(out) == first

    sweep = tmp_path / "sweep"
    (sweep / "0" / "checkpoints").mkdir(parents=True)
    (sweep / "0" / "checkpoints" / "last.ckpt").write_bytes(b"an earlier job's")
    proc = run_main("train.py", "-m", "schedule=linear,cosine", *TINY, "trainer.max_steps=1",
                    f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        f"error: hydra.sweep.dir={sweep} (job 0) already holds checkpoints;")
    assert sorted(p.name for p in sweep.iterdir()) == ["0"]


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    script = f"""
import sys, torch
from ddpm_lightning.training.checkpoint import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"step": 1, "w": torch.ones(3)}}, {str(path)!r})
print("first saved", flush=True)
io.save_checkpoint({{"step": 2, "w": torch.zeros(150_000_000)}}, {str(path)!r})
print("second saved", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "first saved"
    time.sleep(0.3)  # now inside the 600 MB save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left


@pytest.mark.slow  # a real external SIGTERM; tests/test_resume.py stops mid-epoch in-process
def test_sigterm_saves_and_resume_reaches_the_same_step(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    args = [*TINY, "trainer.max_steps=120", "callbacks.checkpoint.every_n_train_steps=1000"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    runs = tmp_path / "outputs" / "cpu_embedded"
    while time.time() < deadline and not list(runs.glob("*/schedule.png")):
        time.sleep(0.2)
    time.sleep(2)  # a few training steps
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out
    [run] = list(runs.iterdir())
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 120
    resumed = run_script("train.py", *args, "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert final == 120  # the same step count as a run that was never stopped


class NaNAfter(nn.Module):
    """Wraps a network and returns NaN from the ``at``-th training call on."""

    def __init__(self, net: nn.Module, at: int):
        super().__init__()
        self.net, self.at, self.calls = net, at, 0
        self.in_channels, self.image_size = net.in_channels, net.image_size

    def forward(self, x, t):
        out = self.net(x, t)
        if self.training:
            self.calls += 1
            if self.calls > self.at:
                return out * float("nan")
        return out


def test_injected_nan_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    L.seed_everything(0)
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
               image_size=16, dropout=0.0)
    module = DDPM(NaNAfter(net, at=4), make_beta_schedule("linear", 20), warmup_steps=0,
                  ema_decay=0.9, sampler={"steps": 2})
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2,
                                                  save_last=True, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, callbacks=[ckpt_cb],
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, plugins=[AtomicCheckpointIO()])
    dm = DiffusionDataModule(image_size=16, batch_size=8)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at global step 4 "
                                                 r"\(batch timesteps t=\[\d+(, \d+){7}\]\)"):
        trainer.fit(module, datamodule=dm)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_diverging_cli_run_exits_with_one_line(tmp_path):
    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, f"hydra.run.dir={run}", "trainer.max_steps=50",
                      "module.lr=1e9", "module.warmup_steps=0", "trainer.gradient_clip_val=null",
                      "callbacks.checkpoint.every_n_train_steps=1")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite") and "at global step" in last, last
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < ckpt["global_step"] < 50
