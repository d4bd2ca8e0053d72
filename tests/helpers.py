"""Shared test helpers: compose the configs, run the entry points (in this process or as
subprocesses), read their CSV logs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny, fast run on the embedded data: every test that trains starts from these.
TINY = [
    "logger=csv",
    "model.ch=32",
    "model.ch_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[8]",
    "model.image_size=16",
    "data.image_size=16",
    "data.batch_size=8",
    "schedule.T=50",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.sample_grid.num_images=4",
    "callbacks.sample_grid.every_n_steps=1000",
    "module.sampler.steps=5",
    "++callbacks.sample_grid.sampler.steps=5",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def compose(config: str, *overrides: str, hydra: bool = False):
    """The config ``conf/CONFIG.yaml`` composes to with these command-line overrides (Hydra's
    compose API); with ``hydra``, the ``hydra`` node is kept."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides), return_hydra_config=hydra)


def _run_env(env: dict | None, **defaults: str) -> dict:
    """This process's environment with W&B disabled, ``defaults`` and then ``env`` on top; a
    value None in ``env`` removes that variable."""
    full_env = {**os.environ, "WANDB_MODE": "disabled", **defaults, **(env or {})}
    return {key: value for key, value in full_env.items() if value is not None}


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = _run_env(env, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    """All CSV metrics of a run, including those of its resumed parts (csv/resume_N/)."""
    files = sorted((run_dir / "csv").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows: list[dict] = []
    for path in files:
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


class SigtermAt:
    """A Lightning callback for tests: the process sends itself ``signal`` (SIGTERM by
    default) at the start of training batch ``step`` (mid-step, as a cluster's preemption
    would), once. Used as ``+callbacks.kill._target_=helpers.SigtermAt +callbacks.kill.step=N``
    with tests/ on PYTHONPATH."""

    def __new__(cls, step: int, signal: str = "SIGTERM"):
        import signal as signals

        import lightning as L

        number = getattr(signals, signal)

        class _Sigterm(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    os.kill(os.getpid(), number)

        return _Sigterm()


def run_main(script: str, *args: str, env: dict | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run an entry point's Hydra ``main`` in this process, as ``python SCRIPT ARGS`` would
    run it (its command line, environment, exit status, stdout and stderr), without the
    interpreter start and imports a subprocess pays (about 4 s each). For single-process runs;
    DDP, multirun and signals keep ``run_script``. Lightning's console messages are captured
    into stderr as a process would print them. Python warnings stay with pytest (a process
    under run_script has PYTHONWARNINGS=ignore). The environment, working directory, argv,
    logging and Hydra's global state are restored afterwards."""
    import contextlib
    import importlib
    import io
    import logging
    import traceback

    from hydra.core.global_hydra import GlobalHydra

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    entry = importlib.import_module(Path(script).stem)
    # Hydra finds conf/ next to the script only for a main defined in __main__
    entry.main.__wrapped__.__module__ = "__main__"
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    root_log = logging.getLogger()
    saved_log = (list(root_log.handlers), root_log.level)
    out, err = io.StringIO(), io.StringIO()
    # Lightning prints through these loggers, with a console handler of its own only when the
    # root logger has none (under pytest it has): capture them as a process's stderr
    console = logging.StreamHandler(err)
    lightning_logs = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    for log in lightning_logs:
        log.addHandler(console)
    code: int | None = 0
    run_env = _run_env(env, HYDRA_FULL_ERROR="0")  # as train.py's __main__ sets it
    os.environ.clear()
    os.environ.update(run_env)
    argv = [str(ROOT / script), *args]
    sys.argv = list(argv)
    GlobalHydra.instance().clear()
    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except Exception:  # as an uncaught exception ends a process: a traceback, exit 1
                traceback.print_exc()
                code = 1
    finally:
        GlobalHydra.instance().clear()
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in root_log.handlers:
            if handler not in saved_log[0]:
                handler.close()  # Hydra's job log file
        root_log.handlers[:] = saved_log[0]
        root_log.setLevel(saved_log[1])
        for log in lightning_logs:
            log.removeHandler(console)
    return subprocess.CompletedProcess(argv, code or 0, out.getvalue(), err.getvalue())


def checkpoint_every(n: int):
    """A factory ``_target_`` (a function, not a class) for a ModelCheckpoint, for tests."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(every_n_train_steps=n)
