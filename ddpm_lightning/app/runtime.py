"""Run plumbing for the entry points: output folders, resume, W&B naming and offline fallback,
and Hydra multirun under DDP. Lightning-free except where it touches the Trainer's launcher."""

from __future__ import annotations

import netrc
import os
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddpm_lightning.training.distributed import slurm_job_id


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and the value."""


def one_line(err: BaseException | str) -> str:
    """An error's message folded onto one line (what the entry points print after error:)."""
    return " ".join(str(err).split())


def is_ddp_child() -> bool:
    """True in the processes Lightning's subprocess launcher starts for ranks > 0."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        path = os.environ.get("NETRC") or None
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def ensure_wandb_mode() -> str | None:
    """With no WANDB_MODE and no API key, switch W&B to offline mode and say so in one line."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if not wandb_api_key_configured():
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no API key configured; logging offline (upload later with `wandb sync`)",
              file=sys.stderr)
        return "offline"
    return None


def validate_trainer(trainer_cfg) -> None:
    """Check the trainer settings before any work, so that a bad one fails in one line naming
    the key and the value and leaves no run folder behind. Most are values Lightning accepts
    silently (max_steps=0 or 2.5, a negative clip or log interval, limit_train_batches=0, more
    devices than the machine has); the few that Lightning refuses too (devices=0, num_nodes=0, a
    negative limit_val_batches) it refuses only when the Trainer is built, after the loggers
    have written into the run folder."""
    import torch

    devices, accel = trainer_cfg.get("devices", 1), str(trainer_cfg.get("accelerator", "auto"))
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1 and devices != -1:
            raise ConfigError(f"trainer.devices={devices} is invalid; use an integer >= 1 or -1")
        available = (torch.cuda.device_count() if accel in ("gpu", "cuda")
                     else os.cpu_count() or 1 if accel == "cpu" else None)
        if available is not None and devices > available:
            raise ConfigError(
                f"trainer.devices={devices} is more than the {available} "
                f"{'GPUs' if accel in ('gpu', 'cuda') else 'CPU cores'} this machine has "
                f"(trainer.accelerator={accel})"
            )
    checks = {
        "max_steps": (lambda v: isinstance(v, int) and (v >= 1 or v == -1),
                      "an integer >= 1 (or -1 for no limit)"),
        "gradient_clip_val": (lambda v: v is None or (_is_number(v) and 0 <= v < float("inf")),
                              "a number >= 0, or null"),
        "log_every_n_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        "num_nodes": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        "limit_train_batches": (lambda v: _is_number(v) and v > 0, "a number > 0"),
        "limit_val_batches": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "val_check_interval": (lambda v: v is None or (_is_number(v) and v > 0),
                               "a number > 0, or null"),
        "check_val_every_n_epoch": (lambda v: v is None or (isinstance(v, int) and v >= 1),
                                    "an integer >= 1, or null"),
        "num_sanity_val_steps": (lambda v: isinstance(v, int) and v >= -1,
                                 "an integer >= 0 (or -1 for all)"),
    }
    for key, (ok, valid) in checks.items():
        if key in trainer_cfg and not ok(trainer_cfg[key]):
            raise ConfigError(f"trainer.{key}={trainer_cfg[key]!r} is invalid; it must be {valid}")


def bf16_note(trainer_cfg) -> str | None:
    """One line when bf16 autocast would run on a CPU without native bf16 arithmetic (no
    AVX512-BF16/AMX): oneDNN then emulates it, slower than float32. None otherwise."""
    import torch

    precision = str(trainer_cfg.get("precision", "32-true"))
    if not precision.startswith("bf16") or str(trainer_cfg.get("accelerator")) != "cpu":
        return None
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (f"note: trainer.precision={precision} on a CPU without native bf16 "
            f"({torch.backends.cpu.get_cpu_capability()}) is emulated and slower than 32-true; "
            f"trainer=cpu trains in float32")


def check_int(key: str, value, lo: int | None = None) -> None:
    """Raise a one-line ConfigError unless ``value`` is an integer >= ``lo``."""
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
        bound = "" if lo is None else f" >= {lo}"
        raise ConfigError(f"{key}={value!r} is invalid; it must be an integer{bound}")


def validate_callbacks(callbacks_cfg) -> None:
    """Integer settings of the callbacks that Lightning would accept as floats or negatives."""
    bounds = {"every_n_train_steps": 0, "save_top_k": -1, "every_n_steps": 1, "num_images": 1,
              "seed": None, "num_samples": 1, "batch_size": 1}
    for name, cb in (callbacks_cfg or {}).items():
        for key, lo in bounds.items():
            if cb is not None and key in cb and cb[key] is not None:
                check_int(f"callbacks.{name}.{key}", cb[key], lo)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def check_same_run(saved: dict, cfg: DictConfig, path) -> None:
    """A checkpoint resumes only the run it came from: same network and same schedule."""
    current = OmegaConf.to_container(cfg, resolve=True)
    for group in ("model", "schedule"):
        keys = set(saved.get(group, {})) | set(current.get(group, {}))
        for key in sorted(keys, key=lambda k: (k not in ("name", "T"), k)):  # the name first
            old, new = saved.get(group, {}).get(key), current.get(group, {}).get(key)
            if old != new:
                raise ConfigError(
                    f"resume={path} was trained with {group}.{key}={old!r}, but this run has "
                    f"{group}.{key}={new!r}; resume with the same {group} settings"
                )


def check_no_earlier_outputs(run_dir: Path, marks, resume_ckpt: Path | None = None,
                             where: str | None = None):
    """Refuse a run folder that holds an earlier run's outputs: a non-empty folder or a file
    named in ``marks`` (e.g. ``checkpoints``, ``samples.npz``), unless the run resumes from a
    checkpoint of that folder (``resume_ckpt``, as ``find_resume_checkpoint`` gives it).
    ``where`` names the folder in the error (by default ``hydra.run.dir=RUN_DIR``)."""
    if resume_ckpt is not None and Path(resume_ckpt).parent == (run_dir / "checkpoints").resolve():
        return
    for mark in marks:
        path = run_dir / mark
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            hint = ""
            if mark == "checkpoints":  # resume=auto takes last.ckpt; else name a checkpoint
                hint = ("pass resume=auto" if (path / "last.ckpt").is_file() else
                        f"pass resume={path}/<one of its .ckpt files>") + \
                    " to continue that run, or "
            raise ConfigError(f"{where or f'hydra.run.dir={run_dir}'} already holds {mark}; "
                              f"{hint}choose another directory")


class KeepEarlierRuns(Callback):
    """A Hydra callback (``hydra.callbacks`` in conf/train.yaml and conf/sample.yaml): refuse, in
    one line, a run whose folder holds an earlier run's ``marks`` before Hydra writes anything
    into it. Hydra rewrites ``.hydra/{config,hydra,overrides}.yaml`` of the folder before the
    job starts, so a check in the job itself would come after the earlier run's record is gone.
    In a sweep, every job folder already under ``hydra.sweep.dir`` is checked."""

    def __init__(self, marks):
        self.marks = list(marks)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        settings = None
        if config.get("resume") == "auto":  # as build compares them (a sweep's jobs: below)
            job = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
            settings = OmegaConf.to_container(job, resolve=True)
        self._check({run_dir: None}, config, run_dir.parent, settings)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir()) if sweep.is_dir() else []
        # a job's settings are known only when it starts: its build compares them
        self._check({job: f"hydra.sweep.dir={sweep} (job {job.name})" for job in jobs}, config,
                    None, None)

    def _check(self, run_dirs: dict, config: DictConfig, outputs_root: Path | None,
               settings: dict | None) -> None:
        if is_ddp_child():  # rank 0 checked; the ranks it starts run in its folder
            return
        for run_dir, where in run_dirs.items():
            try:
                resume = find_resume_checkpoint(config.get("resume"), run_dir, outputs_root,
                                                settings)
                check_no_earlier_outputs(run_dir, self.marks, resume, where)
            except ConfigError as err:
                fail_before_work(err, run_dir)


class InceptionWeights(Callback):
    """A Hydra callback (``hydra.callbacks`` in conf/train.yaml and conf/sample.yaml): when the
    run needs the Inception network (``callbacks=eval`` or ``fid``; sample.py's ``metrics``
    fid, kid or is), build its weights offline on first use *before* Hydra creates a run or
    sweep folder, or stop in one line saying why they cannot be had. Once, however many jobs
    the sweep has; the build is atomic, so jobs or ranks that start together are safe."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, Path(str(OmegaConf.select(config, "hydra.run.dir"))))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, Path(str(OmegaConf.select(config, "hydra.sweep.dir"))))

    @staticmethod
    def needs(config: DictConfig) -> list[tuple]:
        """(config key, weights_path, download) of each part of the run that embeds images."""
        out = []
        for name, cb in (OmegaConf.select(config, "callbacks") or {}).items():
            target = str(OmegaConf.select(cb, "_target_", default="")) if cb else ""
            if target.endswith(("FIDCallback", "EvalCallback")):
                out.append((f"callbacks.{name}", cb.get("weights_path"),
                            bool(cb.get("download", False))))
        metrics = OmegaConf.select(config, "metrics", default=None)
        if metrics and {"fid", "kid", "is"} & set(metrics):
            out.append((f"metrics={list(metrics)}", config.fid.get("weights_path"),
                        bool(config.fid.get("download", False))))
        return out

    def _check(self, config: DictConfig, where: Path) -> None:
        if is_ddp_child():
            return
        from ddpm_lightning.metrics.fid import resolve_weights

        for key, weights_path, download in self.needs(config):
            try:
                resolve_weights(weights_path, download)
            except FileNotFoundError as err:
                fail_before_work(ConfigError(f"{key} needs the Inception network: {err}"), where)


# Keys that do not change what a run computes: its length, where it reads its data from, and
# what it shows and records (callbacks draw from their own generators, never the training RNG).
# resume=auto continues a run whose other settings all equal this command's.
RUN_LENGTH = ("trainer.max_steps", "trainer.max_time")
NOT_SETTINGS = ("resume", "data.root", "data.num_workers", "data.on_device",
                "trainer.enable_progress_bar", "trainer.enable_model_summary",
                "trainer.log_every_n_steps", "trainer.strategy", "trainer.benchmark",
                "module.compile", "module.channels_last", "module.check_every_n_steps",
                "module.peak_tflops", "callbacks", "logger", "job_name", "optimized_metric")
# A resume continues the checkpoint's random streams and its data order (a loader resumed
# mid-epoch in another order would repeat and skip images): a new seed does not apply.
NOT_APPLIED_ON_RESUME = ("seed", "data.shuffle_seed")


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def changed_settings(saved: dict, current: dict, ignore=NOT_SETTINGS) -> dict:
    """``{key: (saved value, current value)}`` for every setting (dotted key) that differs
    between a checkpoint's run config and this run's, except the keys in ``ignore`` and the
    keys under them, and the keys the checkpoint does not record (options added since it was
    written, which take their defaults)."""
    old, new = _flat(saved), _flat(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(old)
            if old.get(k) != new.get(k)
            and not any(k == i or k.startswith(i + ".") for i in ignore)}


def describe_changes(changes: dict, limit: int = 4) -> str:
    """``module.lr=0.001 (this run: 0.0005), …`` on one line."""
    items = [f"{k}={old!r} (this run: {new!r})" for k, (old, new) in changes.items()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def saved_run_config(path: Path) -> dict | None:
    """The run config a checkpoint records (memory-mapped: the weights are not read), or None
    for a file that is not a readable ddpm-lightning checkpoint."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(ckpt["hyper_parameters"]["run_config"])
    except Exception:  # noqa: BLE001 - unreadable: not a candidate (resume=PATH reports why)
        return None


SLURM_MARK = "slurm_job_id"  # RUN/slurm_job_id: the SLURM job a run was started by


def slurm_requeued() -> bool:
    """True in a SLURM job that was requeued (SLURM counts the restarts)."""
    return (os.environ.get("SLURM_RESTART_COUNT") or "0").strip() not in ("", "0")


def _last_checkpoints(outputs_root: Path) -> list[Path]:
    """The ``*/checkpoints/last.ckpt`` of the runs under ``outputs_root``, newest first."""
    return sorted((p for p in outputs_root.glob("*/checkpoints/last.ckpt") if p.is_file()),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def _slurm_runs(candidates: list[Path], job: str) -> list[Path]:
    """The checkpoints among ``candidates`` whose run was started by SLURM job ``job``."""
    def mark(ckpt: Path) -> str | None:
        path = ckpt.parent.parent / SLURM_MARK
        return path.read_text().strip() if path.is_file() else None
    return [p for p in candidates if mark(p) == job]


def find_resume_checkpoint(resume: str | None, run_dir: Path, outputs_root: Path | None,
                           settings: dict | None = None, notes: list | None = None
                           ) -> Path | None:
    """Resolve ``resume``: None → None; a path → that file (which must exist); "auto" → the
    ``checkpoints/last.ckpt`` of this run directory or, failing that, the newest one under
    ``outputs_root`` (the runs of the same experiment name) trained with this run's
    ``settings`` (the resolved config; run length and ``NOT_SETTINGS`` aside). In a sweep
    ``outputs_root`` is None: a job resumes only its own folder, never a sibling job's.

    With ``settings``, resume=auto never continues a run trained otherwise: this folder's own
    checkpoint with other settings is refused in one line naming them (the folder is that
    run's); an earlier run with other settings is passed over, and ``notes`` gets one line
    saying why this run starts afresh.

    Under SLURM a run records its job id (``RUN/slurm_job_id``). A requeued job
    (SLURM_RESTART_COUNT > 0) continues the newest run of its own job, whatever ``resume``
    says (the command is the one that started that run: resume=null, auto or the PATH it first
    resumed from), so a preempted and requeued job resumes in its own folder, from its latest
    step."""
    job = slurm_job_id()
    if job is not None and slurm_requeued() and outputs_root is not None:
        own_job = _slurm_runs(_last_checkpoints(outputs_root), job)
        if own_job:
            if notes is not None:
                notes.append(f"SLURM job {job} (requeued): continuing its run "
                             f"{own_job[0].parent.parent}")
            return own_job[0].resolve()
    if resume in (None, "", "null"):
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if path.is_dir():
            raise ConfigError(f"resume={resume} is a directory; give a checkpoint file (e.g. "
                              f"{path / 'checkpoints' / 'last.ckpt'}) or resume=auto")
        if not path.is_file():
            raise ConfigError(f"resume={resume} does not exist; give a checkpoint file or resume=auto")
        return path.resolve()

    def changes(path: Path) -> dict:
        if settings is None:
            return {}
        saved = saved_run_config(path)
        if saved is None:
            return {"(the checkpoint)": ("unreadable", "")}
        return changed_settings(saved, settings, ignore=NOT_SETTINGS + RUN_LENGTH)

    def own_run(path: Path) -> Path:  # this folder's: no other choice
        diff = changes(path)
        if diff:
            raise ConfigError(
                f"resume=auto: {path} was trained with other settings: "
                f"{describe_changes(diff)}; give resume={path} to continue it with this run's "
                "settings, or choose another directory")
        return path.resolve()

    own = run_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        return own_run(own)
    if outputs_root is None:
        return None
    candidates = _last_checkpoints(outputs_root)
    for path in candidates:
        if not changes(path):
            return path.resolve()
    if candidates and notes is not None:
        notes.append(f"resume=auto: starting a fresh run: the newest run of this experiment, "
                     f"{candidates[0].parent.parent}, was trained with other settings: "
                     f"{describe_changes(changes(candidates[0]))}")
    return None


SWEEP_JOB_ENV = "DDPM_LIGHTNING_SWEEP_JOB"  # set for a sweep's job; its DDP ranks inherit it


def in_sweep(hydra_cfg) -> bool:
    """True in a job of a sweep (-m), including the DDP ranks > 0 it starts, which Lightning
    restarts as single runs."""
    return str(hydra_cfg.mode) == "RunMode.MULTIRUN" or os.environ.get(SWEEP_JOB_ENV) == "1"


def fix_hydra_multirun_for_ddp(hydra_cfg) -> None:
    """Make Lightning's DDP child processes re-run *this job only*, in *this job's* folder.

    Lightning restarts the script for ranks > 0 with ``sys.argv`` plus
    ``hydra.run.dir=<HydraConfig run.dir>``. Under ``-m`` that would relaunch the whole sweep
    and create a second folder (lightning-hydra-template #393). We rewrite argv to this job's
    own overrides without ``-m``, and point run.dir at this job's output folder.
    """
    from omegaconf import open_dict, read_write

    argv = [a for a in sys.argv[1:] if a not in ("-m", "--multirun")]
    # keep flags such as -cp/-cn, drop every key=value and put the job's own overrides back
    flags, skip = [], False
    for a in argv:
        if skip:
            flags.append(a)
            skip = False
        elif a.startswith("-") and "=" not in a:
            flags.append(a)
            skip = a in ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
    sys.argv = [sys.argv[0], *flags, *list(hydra_cfg.overrides.task)]
    os.environ[SWEEP_JOB_ENV] = "1"  # the ranks decide as this job does (e.g. resume=auto)
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def fail_before_work(err: BaseException, fresh_run_dir: Path) -> None:
    """Report a configuration error in one line and exit 1, removing the run folder Hydra just
    created if it holds nothing but Hydra's own files. HYDRA_FULL_ERROR=1 re-raises instead."""
    if fresh_run_dir.is_dir() and not is_ddp_child():
        if all(p.name == ".hydra" or p.suffix == ".log" for p in fresh_run_dir.iterdir()):
            shutil.rmtree(fresh_run_dir, ignore_errors=True)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    cause = err
    while cause.__cause__ is not None and "InstantiationException" in type(cause).__name__:
        cause = cause.__cause__  # hydra.utils.instantiate wraps the real error
    message = one_line(cause) or type(cause).__name__
    sys.stderr.write(f"error: {message}\n")  # one write: ranks failing together share stderr
    sys.stderr.flush()
    sys.exit(1)


def end_distributed() -> None:
    """Destroy the default process group after a run that every rank finished. Lightning and
    Fabric leave it alive, and at interpreter exit Gloo's worker threads can then abort the
    process (SIGABRT, "terminate called without an active exception") after a good run. Call
    it only on success: destroying while another rank is still in a collective would hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reset_distributed(env_before: dict) -> None:
    """Undo what a DDP launch left in this process (the process group and the LOCAL_RANK,
    WORLD_SIZE, MASTER_* variables), so that the next job of a sweep launches its own ranks."""
    end_distributed()
    for key in set(os.environ) - set(env_before):
        del os.environ[key]
    os.environ.update(env_before)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def objective(key: str | None, trainer) -> float | None:
    """What a job returns to a sweeper (Optuna): ``trainer.callback_metrics[key]`` after the
    fit; None when no ``optimized_metric`` is set, or for a job that failed (``trainer`` None;
    Optuna records the trial as failed, as a non-number, and goes on). A key the run never
    logged is an error naming it and the keys it did log."""
    if key is None or trainer is None:
        return None
    metrics = trainer.callback_metrics
    if key not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise ConfigError(f"optimized_metric={key!r} was not logged by this run; logged: {known}")
    return float(metrics[key])
