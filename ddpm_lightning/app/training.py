"""What ``train.py`` does, importable: build a training job from the composed config (resume
resolution, the module, data, callbacks, loggers and the Trainer), then fit it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ddpm_lightning.app import runtime
from ddpm_lightning.app.loggers import make_loggers
from ddpm_lightning.training.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    check_fits,
    read_checkpoint,
)
from ddpm_lightning.training.distributed import RankFailure


def build(cfg: DictConfig, hc, run_dir: Path):
    """Instantiate everything (no data is loaded here), so bad configs fail before any work.
    ``hc`` is the Hydra config of the job and ``run_dir`` its output folder. Returns
    ``(module, datamodule, trainer, resume_ckpt, run_dir)``; ``run_dir`` is the folder of the
    run being resumed, if any."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from ddpm_lightning.training.callbacks import ProgressBar
    from ddpm_lightning.training.distributed import collective_checkpoint_saves

    sweep = runtime.in_sweep(hc)  # a job of a sweep resumes only its own folder
    notes: list[str] = []
    resume_ckpt = runtime.find_resume_checkpoint(cfg.resume, run_dir,
                                                 None if sweep else run_dir.parent,
                                                 runtime.to_container(cfg), notes)
    for note in notes:
        print(note, file=sys.stderr)
    # train.py makes this check before Hydra writes into the folder (KeepEarlierRuns)
    runtime.check_no_earlier_outputs(run_dir, ["checkpoints"], resume_ckpt)
    if resume_ckpt is not None and resume_ckpt.parent.name == "checkpoints":
        run_dir = resume_ckpt.parent.parent  # keep writing into the run that is resumed

    runtime.check_int("seed", cfg.seed)
    runtime.validate_trainer(cfg.trainer)
    if (note := runtime.bf16_note(cfg.trainer)) is not None:
        print(note, file=sys.stderr)
    runtime.validate_callbacks(cfg.get("callbacks"))
    module = instantiate(cfg.module, model=instantiate(cfg.model),
                         betas=instantiate(cfg.schedule), run_config=runtime.to_container(cfg),
                         _recursive_=False)
    module.schedule_name = cfg.schedule.name
    if resume_ckpt is not None:  # refuse a corrupt or foreign checkpoint before any work
        ckpt = read_checkpoint(resume_ckpt, key="resume")
        runtime.check_same_run(ckpt["hyper_parameters"]["run_config"], cfg, resume_ckpt)
        check_fits(module, ckpt["state_dict"], "resume", resume_ckpt)
        module.timesteps.load_state_dict(ckpt.get("timestep_sampler") or {})  # fits this run?
        resumed_data = ckpt["hyper_parameters"]["run_config"].get("data") or {}
        del ckpt
    data_kwargs = {}
    if resume_ckpt is not None and "shuffle_seed" in cfg.data:  # the checkpoint's data order
        data_kwargs["shuffle_seed"] = resumed_data.get("shuffle_seed", resumed_data.get("seed"))
    datamodule = instantiate(cfg.data, **data_kwargs)
    datamodule.check_source()
    module.check_data(datamodule)
    callbacks = make_callbacks(cfg.get("callbacks"), run_dir / "checkpoints")
    for cb in callbacks:  # a callback that owns settings about the module checks them now
        if hasattr(cb, "check_module"):
            cb.check_module(module)
    if cfg.trainer.get("enable_progress_bar", True) and \
            not any(isinstance(cb, ProgressBarBase) for cb in callbacks):
        callbacks.append(ProgressBar())  # shows host numbers only: no sync per step
    loggers = make_loggers(cfg, hc, run_dir, resuming=resume_ckpt is not None)
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # Preemption handles SLURM's signal (and requeues), at a step
        plugins.append(SLURMEnvironment(auto_requeue=False))  # boundary; Lightning's: mid-step
    trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks,
                          logger=loggers or False, plugins=plugins)
    collective_checkpoint_saves(trainer.strategy)  # a failed write ends every rank
    return module, datamodule, trainer, resume_ckpt, run_dir


def make_callbacks(callbacks_cfg, checkpoint_dir: Path) -> list:
    """One callback per configured entry (``null`` entries are switched off). A checkpoint
    callback (a ``ModelCheckpoint``) given no ``dirpath`` writes into the run's checkpoints
    folder, where ``resume=auto`` looks (set after construction, as Lightning itself sets a
    missing dirpath at setup)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = []
    for key, cb_cfg in (callbacks_cfg or {}).items():
        if cb_cfg is None or "_target_" not in cb_cfg:
            continue
        try:
            cb = instantiate(cb_cfg)
        except InstantiationException as err:
            why = runtime.one_line(err.__cause__ or err)
            if why.startswith(f"callbacks.{key}"):
                raise  # the callback's own one-line error, naming its setting
            where = f"callbacks.{key}._target_={cb_cfg._target_}" \
                if str(err).startswith("Error locating target") else f"callbacks.{key}"
            raise runtime.ConfigError(f"{where}: {why}") from err
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = os.path.realpath(checkpoint_dir)
        callbacks.append(cb)
    return callbacks


def run(cfg: DictConfig, hc):
    """Build and fit; the trainer, or None if the job failed after its work began (diverged,
    or a checkpoint could not be saved). A config error before any work exits with one line."""
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        module, datamodule, trainer, resume_ckpt, run_dir = build(
            cfg, hc, Path(hc.runtime.output_dir))
    except (ValueError, FileNotFoundError, TypeError, InstantiationException,
            MisconfigurationException) as err:
        runtime.fail_before_work(err, Path(hc.runtime.output_dir))
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        job = runtime.slurm_job_id()
        if job is not None:  # a requeued job finds its run by this
            (run_dir / runtime.SLURM_MARK).write_text(job + "\n")
        if resume_ckpt is not None:
            record_resume(run_dir, resume_ckpt, runtime.to_container(cfg))
    env_before = dict(os.environ)
    try:
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    except (FloatingPointError, CheckpointError, RankFailure) as err:
        # A diverged run (or a failed save, or rank-0 work that failed under DDP) stops with
        # one line on every rank; its last good checkpoint stays. In a sweep, the other jobs
        # go on.
        return job_failed(err, hc)
    finally:
        if str(hc.mode) == "RunMode.MULTIRUN":
            runtime.reset_distributed(env_before)  # the next job of the sweep starts clean
    runtime.end_distributed()  # every rank got here: a clean shutdown of the process group
    if trainer.is_global_zero:
        print(f"run directory: {run_dir}")
    if str(hc.mode) == "RunMode.MULTIRUN":
        stop_sweep_if_signalled(trainer, hc)
    return trainer


def stop_sweep_if_signalled(trainer, hc) -> None:
    """A job of a local sweep stopped by a signal (Ctrl-C, SIGTERM; not a SLURM requeue) ends
    the sweep: its later jobs are not started, and the process exits with 128 + the signal's
    number. Otherwise each Ctrl-C would only stop one job, and the next would start."""
    import signal

    from ddpm_lightning.training.callbacks import Preemption

    for cb in trainer.callbacks:
        if isinstance(cb, Preemption) and cb.saved_step is not None and cb.requeued is None:
            if trainer.is_global_zero:
                sys.stderr.write(f"error: {cb.received} stopped job {hc.job.num} of the sweep at "
                                 f"step {cb.saved_step} (its last.ckpt is saved); the later jobs "
                                 "are not started\n")
                sys.stderr.flush()
            sys.exit(128 + int(getattr(signal, cb.received or "SIGTERM")))


def record_resume(run_dir: Path, ckpt_path: Path, settings: dict) -> None:
    """Say what is resumed, and append to ``RUN/resumes.jsonl`` the step it resumes at and the
    settings that changed there (``{key: [before, from this step on]}``): config.yaml holds
    the latest settings, and this record says from which step each applied."""
    import json

    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    step = int(ckpt.get("global_step", 0))
    changed = runtime.changed_settings(ckpt["hyper_parameters"]["run_config"], settings)
    ignored = {k: changed.pop(k) for k in runtime.NOT_APPLIED_ON_RESUME if k in changed}
    entry = {"step": step, "checkpoint": str(ckpt_path),
             "changed": {k: list(v) for k, v in changed.items()}}
    if ignored:
        entry["not_applied"] = {k: list(v) for k, v in ignored.items()}
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    what = f"; from step {step} on: {runtime.describe_changes(changed)}" if changed else ""
    print(f"resuming from {ckpt_path} at step {step}{what}", file=sys.stderr)
    if ignored:
        print(f"note: {runtime.describe_changes(ignored)} does not apply: a resume continues the "
              "checkpoint's random streams", file=sys.stderr)


def job_failed(err: BaseException, hc) -> None:
    """A job that failed after its work began: one line; exit 1 unless in a sweep, where the
    other jobs go on."""
    # one write, newline included: DDP ranks that fail together share the terminal
    sys.stderr.write(f"error: {runtime.one_line(err)}\n")
    sys.stderr.flush()
    if str(hc.mode) != "RunMode.MULTIRUN":
        sys.exit(1)
