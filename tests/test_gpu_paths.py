"""Defects of the GPU and cluster paths, reproduced on this CPU: fp16 AMP with gradient clipping,
the throughput window, the MFU peak, and failures that must end every DDP rank at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision import MixedPrecision

from ddpm_lightning.core.schedules import make_beta_schedule
from ddpm_lightning.core.unet import UNet
from ddpm_lightning.training import optim as optim_lib
from ddpm_lightning.training.data import DiffusionDataModule
from ddpm_lightning.training.module import DDPM
from ddpm_lightning.training.optim import adam_fused

from helpers import ROOT, TINY, _run_env


class Recorder(Logger):
    """Every logged metric, per step."""
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict] = {}

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update(metrics)


def _module(**kwargs):
    torch.manual_seed(0)
    net = UNet(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
               image_size=16, dropout=0.0)
    return DDPM(net, make_beta_schedule("linear", 50), warmup_steps=0, **kwargs)


def _fit(module, steps, callbacks=(), **kwargs):
    L.seed_everything(0)
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=recorder,
                        log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, gradient_clip_val=1.0, callbacks=list(callbacks),
                        **kwargs)
    trainer.fit(module, datamodule=DiffusionDataModule(image_size=16, batch_size=8))
    return trainer, recorder.rows


# ------------------------------------------------------------------ 1. fp16 AMP
def test_adam_is_fused_on_cuda_except_under_fp16():
    assert adam_fused("cuda", "32-true") is True
    assert adam_fused("cuda", "bf16-mixed") is True
    assert adam_fused("cuda", "16-mixed") is None  # GradScaler unscales; clipping works
    assert adam_fused("cpu", "32-true") is None


def _fp16():
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def test_fp16_amp_with_clipping_trains_and_logs_the_unscaled_gradient_norm(monkeypatch):
    """fp16 AMP (Lightning's plugin with a GradScaler, here on the CPU) with gradient_clip_val:
    the module's optimizer steps, and train/grad_norm is the norm of the true gradients, close
    to the same run's in fp32, not 2^k times it. With fused Adam, which unscales its own
    gradients (what the module picked on CUDA), Lightning refuses to clip."""
    _, fp32 = _fit(_module(), 6)
    _, fp16 = _fit(_module(), 6, plugins=[_fp16()])
    finite = [s for s in range(6) if s in fp16 and torch.isfinite(
        torch.tensor(fp16[s]["train/grad_norm"]))]
    assert len(finite) >= 3  # the scaler skips its first overflowing steps, then trains
    step = finite[-1]
    ratio = fp16[step]["train/grad_norm"] / fp32[step]["train/grad_norm"]
    assert 0.5 < ratio < 2.0, (step, ratio)

    monkeypatch.setattr(optim_lib, "adam_fused", lambda device, precision: True)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        _fit(_module(), 2, plugins=[_fp16()])


# -------------------------------------------------------- 11, 12. throughput and MFU
class SlowCallback(L.Callback):
    """Callback work at the check steps, as checkpoints, grids and FID do."""

    def __init__(self, every: int, seconds: float):
        self.every, self.seconds = every, seconds

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step % self.every == 0:
            time.sleep(self.seconds)


def test_the_throughput_window_excludes_the_callbacks_work():
    """A callback sleeps 3 s at every check step (4, 8, 12); each window's images/s covers its
    4 training steps only, so it lasts less than the sleep. (It used to end after the
    callbacks, so a sleep fell inside every window after the first.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 4 tiny steps stay well under 3 s on a loaded machine
    try:
        module = _module(check_every_n_steps=4, peak_tflops=50.0)
        _, rows = _fit(module, 12, callbacks=[SlowCallback(4, 3.0)])
    finally:
        torch.set_num_threads(threads)
    windows = {s: r for s, r in rows.items() if "train/images_per_sec" in r}
    assert sorted(windows) == [4, 8, 12]
    for step, row in windows.items():
        seconds = 4 * 8 / row["train/images_per_sec"]  # 4 steps of 8 images
        if step > 4:  # the first window also holds the start-up
            assert seconds < 3.0, (step, seconds)
        # module.peak_tflops overrides Lightning's table (which has no entry for a CPU)
        assert row["train/mfu"] == pytest.approx(row["train/tflops_per_sec"] / 50.0)


def test_the_fp32_policy_is_set_on_cuda_only():
    """module.tf32 applies on CUDA (the MFU peak follows it there); a CPU run leaves torch's
    fp32 matmul precision as it was."""
    before = torch.get_float32_matmul_precision()
    _fit(_module(tf32=True), 1)
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match=r"^module.tf32='yes' is invalid; it must be true or"):
        _module(tf32="yes")
    with pytest.raises(ValueError, match=r"^module.peak_tflops=0 is invalid"):
        _module(peak_tflops=0)


# ------------------------------------------------- 5. collective failures under DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, what: str, out: str) -> None:
    """One of 2 gloo ranks: a failure on one rank (rank 0's work, or a non-finite loss seen on
    rank 1 only). A rank that did not raise then waits in a barrier, as Lightning does after a
    checkpoint write. Rank 0 stays alive 20 s after its outcome, as a rank stuck in NCCL
    would, so a peer that is not told waits that long."""
    import torch.distributed as dist

    from ddpm_lightning.training.distributed import on_rank_zero
    from ddpm_lightning.training.monitor import StepMonitor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    start = time.perf_counter()
    try:
        if what == "rank0_work":
            def write():
                raise OSError(28, "No space left on device")
            on_rank_zero("saving last.ckpt", write)
        else:
            monitor = StepMonitor(num_timesteps=50)
            t = torch.tensor([3, 7])
            loss = torch.tensor(float("nan") if rank == 1 else 1.0)
            monitor.record_nonfinite(loss, 0, t, step=3)
            monitor.record_nonfinite(torch.tensor(1.0), 0, t, step=4)
            monitor.raise_if_nonfinite(torch.device("cpu"))
        dist.barrier()
        outcome = "returned"
    except Exception as err:  # noqa: BLE001 - the outcome is the test's
        outcome = f"{type(err).__name__}: {err}"
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"outcome": outcome, "seconds": time.perf_counter() - start}, f)
    if rank == 0:
        time.sleep(20)


@pytest.mark.parametrize("what, rank0, rank1", [
    ("rank0_work", "RankFailure: saving last.ckpt failed on rank 0: OSError: [Errno 28] No "
                   "space left on device",
     "RankFailure: saving last.ckpt failed on rank 0: OSError: [Errno 28] No space left on "
     "device"),
    ("nonfinite", "FloatingPointError: non-finite loss or gradient norm on another rank at "
                  "global step 3",
     "FloatingPointError: non-finite loss nan at global step 3 (batch timesteps t=[3, 7])"),
])
def test_a_failure_on_one_rank_ends_both_ranks_at_once(tmp_path, what, rank0, rank1):
    import torch.multiprocessing as mp

    ctx = mp.spawn(_rank, args=(_free_port(), what, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"rank{r}.json").is_file() for r in (0, 1)):
        assert time.monotonic() < deadline, "a rank is still waiting"
        time.sleep(0.2)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for p in ctx.processes:
        p.kill()
    assert outcomes[0]["outcome"].startswith(rank0), outcomes
    assert outcomes[1]["outcome"].startswith(rank1), outcomes
    assert max(o["seconds"] for o in outcomes) < 10, outcomes


def test_train_py_rank0_failure_ends_both_ranks_with_one_line(tmp_path):
    """train.py on 2 gloo ranks, with a fault only rank 0 meets: the run folder holds a file
    named ``samples``, so rank 0 cannot write the sample grid at step 2. Both processes end,
    non-zero, within a minute, each with a one-line error naming the failure."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples").write_text("not a folder")
    args = [*TINY, f"hydra.run.dir={run}", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=6",
            "callbacks.sample_grid.every_n_steps=2", "callbacks.schedule_plot=null"]
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                            env=_run_env(None, PYTHONWARNINGS="ignore"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
        while time.monotonic() - start < 90:  # rank 1, in the same session, ends too
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("a rank is still running")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert time.monotonic() - start < 60
    assert proc.returncode == 1, err[-3000:]
    message = "error: the sample grid at step 2 failed on rank 0: FileExistsError"
    assert err.count(message) == 2, err[-3000:]  # one line from each rank


# ------------------------------------------------------ 6. sample.py gathers to rank 0
def _gather_rank(rank: int, port: int, out: str) -> None:
    """Rank r holds samples r, r + 2, … (as generate's batch plan deals them, batch size 1) of
    7: rank 0 must end with all 7 in order, rank 1 with none."""
    import torch.distributed as dist

    from ddpm_lightning.training.distributed import gather_to_rank_zero

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    indices = torch.arange(rank, 7, 2)
    images = indices.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).to(torch.uint8).contiguous()
    idx, img = gather_to_rank_zero(indices, images, torch.device("cpu"), chunk=2)
    result = None if idx is None else sorted(zip(idx.tolist(), img[:, 0, 0, 0].tolist()))
    with open(os.path.join(out, f"gather{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_samples_are_gathered_on_rank_zero_only(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"gather{r}.json").read_text()) for r in (0, 1))
    assert zero == [[i, i] for i in range(7)]  # every sample once, with its own image
    assert one is None  # rank 1 never holds the other ranks' samples
    from ddpm_lightning.app.sampling import check_indices

    images = torch.arange(3).view(3, 1, 1, 1)
    assert check_indices(torch.tensor([2, 0, 1]), images).flatten().tolist() == [1, 2, 0]
    with pytest.raises(RuntimeError, match="not 0..N-1 exactly once"):
        check_indices(torch.tensor([0, 0, 2]), images)


# ------------------------------------------------ 16. preemption at a step boundary
class SignalAtBatch(L.Callback):
    """Sets the preemption flag (as its signal handler would) at the start of batch ``batch``."""

    def __init__(self, preemption, batch: int):
        self.preemption, self.batch = preemption, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            self.preemption.received = "SIGUSR1"


@pytest.mark.parametrize("signal_batch", [2, 3])
def test_preemption_stops_right_after_an_optimizer_step(tmp_path, signal_batch):
    """With 2 micro-batches per step, a signal at either micro-batch stops after the step they
    make up, never between them (a resume would then take a one-micro-batch step)."""
    from ddpm_lightning.training.callbacks import Preemption

    pre = Preemption(requeue_signals=())
    trainer, _ = _fit(_module(), 10, callbacks=[pre, SignalAtBatch(pre, signal_batch)],
                      accumulate_grad_batches=2, default_root_dir=str(tmp_path))
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    assert pre.saved_step == trainer.global_step == 2
    assert progress.completed == 2 * trainer.global_step  # whole steps only


def test_a_signal_at_the_last_step_neither_stops_nor_requeues(tmp_path, monkeypatch):
    """At max_steps the run is complete: no preemption save, no requeue; the end-of-training
    work runs as usual."""
    from ddpm_lightning.training.callbacks import Preemption

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    pre = Preemption()
    pre.requeue = lambda: pytest.fail("requeued a finished run")
    trainer, _ = _fit(_module(), 3, callbacks=[pre, SignalAtBatch(pre, 2)],
                      default_root_dir=str(tmp_path))
    assert trainer.global_step == 3 and pre.saved_step is None
