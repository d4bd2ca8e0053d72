"""Loggers for train.py: the run's identity (W&B name, group, swept keys), the W&B offline
fallback and resume, CSV resume folders, and finishing the W&B run at the end of every job.

Application layer: it reads the Hydra config of the job.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from ddpm_lightning.app.runtime import ConfigError, ensure_wandb_mode, one_line, to_container

# The command line as typed, before train.py rewrites sys.argv for DDP children in a sweep.
ORIGINAL_ARGV = list(sys.argv)

_W_AND_B_GROUP_MAX = 128  # W&B's limit on a group name


def _key(override: str) -> str:
    """``+a.b=1`` → ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def _task_overrides(hydra_cfg) -> list[str]:
    """The command-line overrides of this job (``schedule=cosine``, ...), minus bookkeeping."""
    exclude = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    return [o for o in hydra_cfg.overrides.task
            if _key(o) not in exclude and not _key(o).startswith("hydra.")]


def swept_keys(hydra_cfg, argv: list[str] | None = None) -> set[str]:
    """The keys a sweep varies: sweep overrides on the command line (``schedule=a,b``,
    ``x=range(…)``, ``choice(…)``) and the sweeper's own ``params`` (Table 2's rows, Optuna)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in (ORIGINAL_ARGV if argv is None else argv)[1:]
            if "=" in a and not a.startswith("-")]
    keys = set()
    try:
        for o in OverridesParser.create().parse_overrides(args):
            if o.is_sweep_override():
                keys.add(o.key_or_group)
    except Exception:  # an argv that is not ours (e.g. pytest's): nothing is swept
        pass
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    keys |= {str(k).lstrip("+~") for k in params}
    return keys


def run_identity(cfg: DictConfig, hydra_cfg, argv: list[str] | None = None) -> dict:
    """W&B name, group and the swept settings of this job.

    A single run is named after the experiment plus every command-line override. In a sweep
    (``-m``) the name carries only what differs between the jobs, the swept keys
    (``cpu_embedded:schedule=cosine``), and the fixed overrides go into the group, shared by
    the whole sweep: ``cpu_embedded/<sweep dir>:trainer.max_steps=30``."""
    overrides = _task_overrides(hydra_cfg)
    multirun = str(hydra_cfg.mode) == "RunMode.MULTIRUN"
    keys = swept_keys(hydra_cfg, argv) if multirun else set()
    swept = [o for o in overrides if _key(o) in keys]
    fixed = [o for o in overrides if o not in swept]
    shown = swept if multirun else overrides
    name = cfg.get("job_name") or cfg.name + (":" + ",".join(shown) if shown else "")
    group = cfg.name
    if multirun:
        group = f"{cfg.name}/{Path(hydra_cfg.sweep.dir).name}"
        if fixed:
            group = f"{group}:{','.join(fixed)}"[:_W_AND_B_GROUP_MAX]
    sweep = {_key(o): o.split("=", 1)[1] for o in swept}
    return {"name": name, "group": group, "overrides": overrides, "sweep": sweep}


def _csv_version(run_dir: Path, name: str, resuming: bool) -> str:
    """The CSV log's folder under ``run_dir/name``: "" for a new run; a resume logs to its own
    ``resume_N`` (Lightning's CSV writer deletes an existing metrics.csv)."""
    if not resuming:
        return ""
    n = 1
    while (run_dir / name / f"resume_{n}").exists():
        n += 1
    return f"resume_{n}"


def make_loggers(cfg: DictConfig, hydra_cfg, run_dir: Path, resuming: bool) -> list:
    """The configured logger (or none), with the run's identity and its resume folder; and,
    unless that is a CSV logger already, the run's CSV log in ``RUN/csv``: every job has one,
    whatever its logger, so that offline tools (``compare``) never read W&B's internal files."""
    from lightning.pytorch.loggers import CSVLogger

    loggers = _configured(cfg, hydra_cfg, run_dir, resuming)
    if not any(isinstance(lg, CSVLogger) for lg in loggers):
        csv_log = CSVLogger(save_dir=str(run_dir), name="csv",
                            version=_csv_version(run_dir, "csv", resuming))
        csv_log.log_hyperparams(_hparams(cfg, run_identity(cfg, hydra_cfg)))
        loggers.append(csv_log)
    return loggers


def _hparams(cfg: DictConfig, identity: dict) -> dict:
    hparams = to_container(cfg)
    hparams["overrides"] = identity["overrides"]
    hparams["sweep"] = identity["sweep"]  # flat, so that W&B's group-by works on them
    return hparams


def _configured(cfg: DictConfig, hydra_cfg, run_dir: Path, resuming: bool) -> list:
    """The configured logger (or none), with the run's identity and its resume folder."""
    from hydra.utils import get_object, instantiate
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    logger_cfg = cfg.get("logger")
    if not logger_cfg or "_target_" not in logger_cfg:
        return []
    identity = run_identity(cfg, hydra_cfg)
    target = logger_cfg._target_
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigError(f"logger._target_={target}: {one_line(err)}") from err
    is_class = isinstance(obj, type)  # a factory function is neither of the two below
    is_wandb = is_class and issubclass(obj, WandbLogger)
    extra = {"save_dir": str(run_dir)}
    run_id_file = run_dir / "wandb_run_id.txt"
    if is_wandb:
        ensure_wandb_mode()
        extra.update(name=logger_cfg.get("name") or identity["name"],
                     group=logger_cfg.get("group") or identity["group"])
        if resuming and run_id_file.is_file():
            extra.update(id=run_id_file.read_text().strip(), resume="allow")
    elif is_class and issubclass(obj, CSVLogger) and resuming:
        extra["version"] = _csv_version(run_dir, logger_cfg.name, resuming)
    try:
        logger = instantiate(logger_cfg, **extra)
    except Exception as err:
        raise ConfigError(f"logger._target_={target}: {one_line(err)}") from err
    logger.log_hyperparams(_hparams(cfg, identity))
    if is_wandb:
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank == 0:
            run_id_file.write_text(logger.experiment.id)
    return [logger]


def finish_wandb(failed: bool) -> None:
    """End this process's W&B run, if one is open, so that the next job of a sweep starts its
    own run instead of logging into this one. A failed or diverged job ends with exit code 1."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
