"""train.py end to end on tiny models (CPU): in this process (``run_main``), and as
subprocesses for DDP, multirun and the resumed half of a resume."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, read_metrics, run_main, run_script, series

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf/experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_two_steps(experiment, tmp_path, rgb_folder):
    run = tmp_path / "run"
    args = [f"experiment={experiment}", *TINY, f"hydra.run.dir={run}", "trainer.max_steps=2",
            "trainer.accelerator=cpu", "trainer.precision=32-true"]
    if experiment != "cpu_embedded":  # the paper's datasets are not on this machine
        args += ["data=folder", f"data.root={rgb_folder}", "data.num_workers=0",
                 "model.in_channels=3", "data.channels=3"]
    _ok(run_main("train.py", *args))
    # one last.ckpt, taken mid-epoch at the last step; no second, epoch-finished last-v1.ckpt
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert (run / "schedule.png").is_file()
    assert list((run / "samples").glob("step_*.png"))
    assert (run / "config.yaml").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("ema_model.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["run_config"]["name"] == experiment


def test_periodic_checkpoint_state_keeps_model_checkpoints_key():
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ddpm_lightning.training.callbacks import PeriodicCheckpoint

    kw = {"every_n_train_steps": 1000, "save_last": True}
    assert PeriodicCheckpoint(**kw).state_key == ModelCheckpoint(**kw).state_key


def test_logged_keys(tmp_path):
    run = tmp_path / "run"
    _ok(run_main("train.py", *TINY, f"hydra.run.dir={run}", "trainer.max_steps=4",
                 "trainer.val_check_interval=2", "module.check_every_n_steps=2"))
    rows = read_metrics(run)
    keys = set().union(*(r.keys() for r in rows))
    for key in ("train/loss", "train/loss_q0", "train/loss_q3", "train/lr", "train/grad_norm",
                "train/images_per_sec", "train/tflops_per_sec", "val/loss"):
        assert key in keys, sorted(keys)
    assert "train/mfu" not in keys  # Lightning knows no peak FLOP/s of a CPU
    # throughput per window of 2 steps (steps 2 and 4); FLOPs = 3 × the TINY U-Net's forward
    rates, tflops = series(rows, "train/images_per_sec"), series(rows, "train/tflops_per_sec")
    assert [s for s, _ in rates] == [s for s, _ in tflops] == [2, 4]  # after steps 2 and 4
    from ddpm_lightning.core.flops import forward_flops_per_image
    from ddpm_lightning.core.unet import UNet

    net = UNet(in_channels=1, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
               image_size=16)
    per_image = 3 * forward_flops_per_image(net, (1, 16, 16), "cpu")
    for (_, r), (_, f) in zip(rates, tflops):
        assert f * 1e12 == pytest.approx(r * per_image, rel=1e-6)
    lr = [v for _, v in series(rows, "train/lr")]
    assert lr == sorted(lr)  # linear warm-up


# loss-aware t: T = 8 and a history of 1, so that importance sampling starts within the run
LOSS_AWARE = ["schedule.T=8", "module.objective=vlb", "module.loss_weight=none",
              "module.timesteps.sampler=loss_aware", "module.timesteps.history=1"]


@pytest.mark.parametrize("extra", [
    pytest.param([], id="uniform_t"),
    # mid-epoch with loss-aware t is in the default suite (tests/test_resume.py)
    pytest.param(LOSS_AWARE, id="loss_aware_t", marks=pytest.mark.slow),
])
def test_resume_gives_the_same_losses(tmp_path, extra):
    common = [*TINY, *extra, "trainer.limit_train_batches=3",
              "callbacks.checkpoint.every_n_train_steps=3"]
    full = tmp_path / "full"
    _ok(run_main("train.py", *common, f"hydra.run.dir={full}", "trainer.max_steps=6"))
    part = tmp_path / "part"
    _ok(run_main("train.py", *common, f"hydra.run.dir={part}", "trainer.max_steps=3"))
    ckpt = part / "checkpoints" / "last.ckpt"
    resumed = _ok(run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'again'}",
                             "trainer.max_steps=6", f"resume={ckpt}"))
    assert "resuming from" in resumed.stderr
    # the resumed run keeps writing into the run it continues
    want = series(read_metrics(full), "train/loss")
    got = series(read_metrics(part), "train/loss")
    assert [s for s, _ in want] == list(range(6)), want
    assert [s for s, _ in got] == list(range(6)), got
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)
    # one last.ckpt each (the periodic save at the last step overwrites FinalCheckpoint's)
    for run in (full, part):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
            ["last.ckpt", "step_0000003.ckpt", "step_0000006.ckpt"]
    if extra:  # the history was full before the end, and it is restored on resume
        state = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["timestep_sampler"]
                 for d in (full, part)]
        assert state[0]["counts"].min() >= 1 and state[0]["counts"].sum() == 6 * 8
        assert state[1]["counts"].sum() == 6 * 8  # the resumed run wrote into `part`
        assert torch.equal(state[0]["losses"], state[1]["losses"])


def test_resume_auto_finds_the_last_checkpoint(tmp_path):
    outputs = tmp_path / "outputs"
    first = _ok(run_main("train.py", *TINY, "trainer.max_steps=2", cwd=tmp_path))
    assert "run directory:" in first.stdout
    second = _ok(run_main("train.py", *TINY, "trainer.max_steps=4", "resume=auto", cwd=tmp_path))
    assert "resuming from" in second.stderr
    runs = [p for p in (outputs / "cpu_embedded").iterdir() if (p / "checkpoints").is_dir()]
    assert len(runs) == 1
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4


def test_multirun_gives_one_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _ok(run_script("train.py", "-m", "schedule=linear,cosine", *TINY, "trainer.max_steps=2",
                          f"hydra.sweep.dir={sweep}"))
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"], proc.stdout
    for job, schedule in zip(jobs, ("linear", "cosine")):
        cfg = (sweep / job / "config.yaml").read_text()
        assert f"name: {schedule}" in cfg
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep / job / "schedule.png").is_file()


def test_ddp_on_cpu_keeps_ema_equal_and_one_output_dir(tmp_path):
    proc = _ok(run_script("train.py", *TINY, *LOSS_AWARE, "trainer=ddp", "trainer.accelerator=cpu",
                          "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=3",
                          cwd=tmp_path, timeout=600))
    assert re.search(r"EMA weights identical across 2 ranks", proc.stdout), proc.stdout
    # loss-aware t: both ranks record both ranks' losses, so their histories agree
    assert re.search(r"timestep loss histories identical across 2 ranks", proc.stdout), proc.stdout
    runs = list((tmp_path / "outputs" / "cpu_embedded").iterdir())
    assert len(runs) == 1, runs
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(ckpt["timestep_sampler"]["counts"].sum()) == 3 * 2 * 8  # steps × ranks × batch
    # each rank draws its own t, ε and flips: distinct random states, both saved for a resume
    states = ckpt["rng_states_per_rank"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


def test_ddp_resume_gives_the_same_losses(tmp_path):
    """2 ranks on the CPU: every rank resumes its own random stream (and the shared t history)."""
    common = [*TINY, *LOSS_AWARE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
              "trainer.precision=32-true", "trainer.limit_train_batches=3",
              "callbacks.checkpoint.every_n_train_steps=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    _ok(run_script("train.py", *common, f"hydra.run.dir={full}", "trainer.max_steps=6",
                   timeout=600))
    _ok(run_script("train.py", *common, f"hydra.run.dir={part}", "trainer.max_steps=3",
                   timeout=600))
    _ok(run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'again'}",
                   "trainer.max_steps=6", f"resume={part / 'checkpoints' / 'last.ckpt'}",
                   timeout=600))
    want = series(read_metrics(full), "train/loss")
    got = series(read_metrics(part), "train/loss")
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(6)), (got, want)
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)


def test_multirun_with_ddp_gives_one_directory_per_job(tmp_path):
    """Then the sweep is run again, one job longer, with resume=auto: job 0 resumes its own
    folder on both ranks, and job 1, which has none, starts afresh on both (its second rank,
    restarted by Lightning as a single run, must not resume job 0's checkpoint)."""
    sweep = tmp_path / "sweep"
    ddp = [*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.precision=32-true", f"hydra.sweep.dir={sweep}"]
    proc = _ok(run_script("train.py", "-m", "schedule=linear", *ddp, "trainer.max_steps=2",
                          cwd=tmp_path, timeout=900))
    proc = _ok(run_script("train.py", "-m", "schedule=linear,cosine", *ddp, "resume=auto",
                          "trainer.max_steps=3", cwd=tmp_path, timeout=900))
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"], proc.stdout
    assert proc.stdout.count("EMA weights identical across 2 ranks") == 2
    assert proc.stderr.count("resuming from") == 1 and "dirpath has changed" not in proc.stderr
    for job in ("0", "1"):
        ckpt = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 3
    assert not (tmp_path / "outputs").exists()  # no stray second sweep or run folder


def test_wandb_falls_back_to_offline(tmp_path):
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("logger=")]
    proc = _ok(run_script("train.py", *args, "logger=wandb", f"hydra.run.dir={run}",
                          "trainer.max_steps=3", "schedule=cosine",
                          env={"WANDB_MODE": None, "WANDB_API_KEY": None, "HOME": str(tmp_path),
                               "NETRC": str(tmp_path / "none")}))
    assert "logging offline" in proc.stderr
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    blob = b"".join(p.read_bytes() for p in offline[0].glob("*.wandb"))
    for key in (b"train/loss", b"train/loss_q0", b"samples", b"cpu_embedded:", b"schedule=cosine"):
        assert key in blob, key


def test_build_in_process(tmp_path, tiny_cfg):
    """app.training.build wires the composed config into (module, data, trainer) without Hydra's
    runtime, and a config whose groups do not fit fails in it with one line."""
    import lightning as L

    from ddpm_lightning.app import training
    from ddpm_lightning.training.data import DiffusionDataModule
    from ddpm_lightning.training.evaluation import FIDCallback
    from ddpm_lightning.training.module import DDPM

    module, data, trainer, resume, run_dir = training.build(
        *tiny_cfg("trainer.max_steps=7"), tmp_path)
    assert isinstance(module, DDPM) and isinstance(data, DiffusionDataModule)
    assert isinstance(trainer, L.Trainer) and trainer.max_steps == 7 and resume is None
    assert run_dir == tmp_path and module.diffusion.num_timesteps == 50
    assert module.sampler.name == "dpm_solver" and module.sampler.steps == 5
    assert not any(isinstance(cb, FIDCallback) for cb in trainer.callbacks)
    # a ModelCheckpoint given no dirpath, under any key, writes into the run's checkpoints/
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, _, trainer, _, _ = training.build(*tiny_cfg(
        "+callbacks.best._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.best.every_n_train_steps=7",
        "+callbacks.elsewhere._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.elsewhere.every_n_train_steps=9",
        f"+callbacks.elsewhere.dirpath={tmp_path / 'mine'}",
        "+callbacks.made._target_=helpers.checkpoint_every", "+callbacks.made.n=11"), tmp_path)
    dirs = sorted(cb.dirpath for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint))
    assert dirs == sorted([str(tmp_path / "checkpoints")] * 3 + [str(tmp_path / "mine")])
    with pytest.raises(ValueError, match=r"^data.image_size=32 does not match "
                                         r"model.image_size=16$"):
        training.build(*tiny_cfg("data.image_size=32"), tmp_path)
    with pytest.raises(ValueError, match=r"^callbacks.fid.sampler.steps=99 is invalid"):
        training.build(*tiny_cfg("callbacks=fid", "++callbacks.fid.sampler.steps=99"), tmp_path)
