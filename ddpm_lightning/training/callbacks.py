"""Lightning callbacks: sample grids, the schedule plot, preemption, the final and periodic checkpoints."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import TQDMProgressBar

from ddpm_lightning.core.generate import generate
from ddpm_lightning.core.inference import eval_mode
from ddpm_lightning.core.samplers import SamplerSettings
from ddpm_lightning.training.distributed import on_rank_zero, slurm_job_id


def _log_image(trainer: L.Trainer, key: str, path: Path, step: int) -> None:
    """Send a saved PNG to every logger that takes images (W&B); others keep the file only."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)], step=step)


class EveryNSteps(L.Callback):
    """Base of the periodic callbacks: call ``run(trainer, pl_module)`` when the optimizer step
    ``global_step`` reaches a multiple of ``every_n_steps``, and once more at the end of
    training (if ``on_train_end``) unless the last step was just done. ``run`` records the step
    it did in ``self._last_step``. ``key`` names the setting in the error for a bad interval."""

    def __init__(self, every_n_steps: int, on_train_end: bool = True,
                 key: str = "every_n_steps"):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) \
                or every_n_steps < 1:
            raise ValueError(f"{key}={every_n_steps!r} must be an integer >= 1")
        self.every_n_steps = every_n_steps
        self.run_on_train_end = on_train_end
        self._last_step = -1

    def run(self, trainer: L.Trainer, pl_module) -> object:
        raise NotImplementedError

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # not when a signal stopped the run: the scheduler is ending the job (all ranks agree)
        if self.run_on_train_end and trainer.global_step != self._last_step \
                and not stopped_by_preemption(trainer):
            self.run(trainer, pl_module)


class SamplingCallback(EveryNSteps):
    """A periodic callback that samples with the module's ``sampler`` settings plus its own
    ``sampler`` overrides (config form), checked against the module by ``check_module``, which
    train.py calls before any work and ``setup`` calls again for a Trainer built by hand."""

    sampler_key = "sampler"

    def __init__(self, every_n_steps: int, on_train_end: bool, key: str,
                 sampler: Mapping | None = None):
        super().__init__(every_n_steps, on_train_end, key=key)
        self.sampler = dict(sampler or {})
        self.settings: SamplerSettings | None = None

    def check_module(self, pl_module) -> None:
        self.settings = pl_module.sampler.updated(self.sampler, pl_module.diffusion.num_timesteps,
                                                  key=self.sampler_key)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.check_module(pl_module)

    def generate(self, pl_module, num: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        """(indices, uint8 images) of rank ``rank``'s share of ``num`` samples, with the EMA
        weights in eval mode. Sample i comes from the x_T of ``generate``'s (seed, batch) rule,
        the one sample.py uses: the same noise in every run, on any number of ranks."""
        if self.settings is None:
            self.check_module(pl_module)
        model = pl_module.model
        shape = (model.in_channels, model.image_size, model.image_size)
        with eval_mode(pl_module.eval_model) as net:
            return generate(net, pl_module.diffusion, num, batch_size, shape, seed=seed,
                            rank=rank, world_size=world_size, device=pl_module.device,
                            settings=self.settings)


class SampleGrid(SamplingCallback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training), sample a grid with
    the EMA weights, on rank zero, from the same x_T in every run (``seed``), save it as
    ``<run dir>/samples/step_XXXXXXX.png`` and log it as ``samples``.

    ``sampler`` holds overrides of ``module.sampler`` (config form: name, steps, eta, …).
    """

    sampler_key = "callbacks.sample_grid.sampler"

    def __init__(self, every_n_steps: int = 1000, num_images: int = 64, seed: int = 0,
                 sampler: dict | None = None, on_train_end: bool = True):
        super().__init__(every_n_steps, on_train_end, key="callbacks.sample_grid.every_n_steps",
                         sampler=sampler)
        if num_images < 1:
            raise ValueError(f"callbacks.sample_grid.num_images={num_images} must be >= 1")
        self.num_images = num_images
        self.seed = seed
        self.last_path: Path | None = None

    def make_grid(self, trainer: L.Trainer, pl_module) -> Path | None:
        """The grid on rank 0 (None elsewhere); a failure there raises on every rank."""
        path = on_rank_zero(f"the sample grid at step {trainer.global_step}", self._make_grid,
                            trainer, pl_module)
        self._last_step = trainer.global_step
        return path

    def _make_grid(self, trainer: L.Trainer, pl_module) -> Path:
        from torchvision.utils import save_image

        step = trainer.global_step
        # generate's own generators: grids are reproducible and leave the training RNG alone
        _, images = self.generate(pl_module, self.num_images, self.num_images, self.seed)
        out_dir = Path(trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{step:07d}.png"
        tmp = path.with_suffix(".tmp.png")
        save_image(images.float() / 255, tmp, nrow=int(math.ceil(math.sqrt(self.num_images))))
        tmp.replace(path)
        _log_image(trainer, "samples", path, step)
        self.last_path = path
        return path

    def run(self, trainer: L.Trainer, pl_module) -> Path | None:
        return self.make_grid(trainer, pl_module)


class SchedulePlot(L.Callback):
    """At the start of training, plot ᾱ_t and log-SNR(t) = log(ᾱ_t / (1 − ᾱ_t)) against t to
    ``<run dir>/schedule.png`` and log it as ``schedule``, so schedules compare by eye."""

    def on_fit_start(self, trainer, pl_module) -> None:
        on_rank_zero("the schedule plot", self.plot, trainer, pl_module)

    def plot(self, trainer, pl_module) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        abar = pl_module.diffusion.alphas_cumprod.numpy()
        t = np.arange(1, len(abar) + 1)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
        ax1.plot(t, abar)
        ax1.set(xlabel="t", ylabel="ᾱ_t", title="ᾱ_t")
        ax2.plot(t, np.log(abar) - np.log1p(-abar))
        ax2.set(xlabel="t", ylabel="log SNR", title="log(ᾱ_t / (1 − ᾱ_t))")
        name = getattr(pl_module, "schedule_name", None)
        if name:
            fig.suptitle(f"schedule: {name}")
        fig.tight_layout()
        path = Path(trainer.default_root_dir) / "schedule.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        _log_image(trainer, "schedule", path, trainer.global_step)


class Preemption(L.Callback):
    """On SIGTERM, SIGINT or SIGUSR1 (preemption, Ctrl-C, SLURM's warning before its time
    limit, ``#SBATCH --signal=USR1@90``): finish the current step, save
    ``<run dir>/checkpoints/last.ckpt``, and stop cleanly, so that ``resume=auto`` continues.
    A second SIGINT interrupts at once.

    After one of ``requeue_signals`` in a SLURM job, rank 0 then requeues the job
    (``scontrol requeue JOB``), and the requeued job resumes this run in this folder (see
    ``runtime.find_resume_checkpoint``). This handler replaces Lightning's own SLURM one, which
    saves ``hpc_ckpt_N.ckpt`` from inside the signal handler, mid-step, where no resume looks.

    The run stops right after an optimizer step (never between the micro-batches of gradient
    accumulation), and not at the last step (the run is complete: nothing to requeue).

    Under DDP the decision is shared by all ranks (a signal to any rank stops them all, at the
    same step). Sharing it is an all-reduce and a host read, so it is made every
    ``check_every_n_steps`` steps only: the run stops within that many steps of the signal,
    which must fit in the grace period of the scheduler (SLURM's KillWait, 30 s by default). In
    a single process the flag is read at every step, with no sync. While its handlers are
    installed (from the start of training to the teardown) Lightning's own per-step SIGTERM
    broadcast under DDP (a copy, a broadcast and a host read at every step since Lightning
    2.5.2) is switched off: only this callback's handlers run then, so it could never carry a
    signal."""

    def __init__(self, signals=("SIGTERM", "SIGINT", "SIGUSR1"), requeue_signals=("SIGUSR1",),
                 check_every_n_steps: int = 10):
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) \
                or check_every_n_steps < 1:
            raise ValueError(f"callbacks.preemption.check_every_n_steps={check_every_n_steps!r} "
                             "must be an integer >= 1")
        self.check_every_n_steps = check_every_n_steps
        self.signals, self.requeue_signals = tuple(signals), tuple(requeue_signals)
        self.requeued: str | None = None  # the job id requeued
        self.received: str | None = None
        self.saved_step: int | None = None
        self._previous: dict = {}
        self._seen_step: int | None = None  # the optimizer step of the last batch end seen
        self._lightning_broadcast = None

    def _handler(self, signum, frame):
        import signal

        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            raise KeyboardInterrupt
        self.received = name

    def on_train_start(self, trainer, pl_module) -> None:
        import signal
        import threading

        self._seen_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return
        if getattr(trainer, "received_sigterm", False):  # Lightning's handler saw it first
            self.received = "SIGTERM"
        for name in self.signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        loop = trainer.fit_loop.epoch_loop
        if "SIGTERM" in self.signals and hasattr(loop, "_broadcast_sigterm_tensor"):
            self._lightning_broadcast = loop._broadcast_sigterm_tensor
            loop._broadcast_sigterm_tensor = lambda: None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # no optimizer step since the last batch end
            return
        self._seen_step = step
        if 0 < trainer.max_steps <= step:
            return  # the last step: the run is complete (FinalCheckpoint saves it)
        if trainer.world_size == 1:
            stop = self.received is not None
        elif step % self.check_every_n_steps == 0:
            stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        else:
            return
        if stop and not trainer.should_stop:
            path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            trainer.save_checkpoint(path, weights_only=False)
            self.saved_step = trainer.global_step
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"received {self.received or 'a stop signal'}: saved {path} at step "
                      f"{trainer.global_step}; continue with resume=auto", flush=True)
                if self.received in self.requeue_signals:
                    self.requeue()

    def requeue(self) -> None:
        """``scontrol requeue`` this SLURM job (nothing outside SLURM); a failure is reported
        in one line, and the checkpoint stays for a manual resume."""
        import subprocess

        job = slurm_job_id()
        if not job:
            return
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                  timeout=60)
            ok, why = done.returncode == 0, (done.stderr or done.stdout).strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            ok, why = False, str(err)
        if ok:
            self.requeued = job
            print(f"requeued SLURM job {job}: it resumes this run when it starts again",
                  flush=True)
        else:
            print(f"warning: scontrol requeue {job} failed ({' '.join(why.split())}); "
                  "resume by hand with resume=auto", flush=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Put Lightning's handlers and its broadcast back (after the end-of-training work, so
        a signal during the final grid or FID meets this handler, not Lightning's SLURM one)."""
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._lightning_broadcast is not None:
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = self._lightning_broadcast
            self._lightning_broadcast = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown(trainer, pl_module, "fit")


def stopped_by_preemption(trainer) -> bool:
    """True when a ``Preemption`` callback stopped this run (its last.ckpt is from this step,
    and the end-of-training work is skipped: the job is being stopped)."""
    return any(getattr(cb, "saved_step", None) == trainer.global_step
               for cb in trainer.callbacks if isinstance(cb, Preemption))


class FinalCheckpoint(L.Callback):
    """Save ``<run dir>/checkpoints/last.ckpt`` after the last training step, whatever the
    periodic checkpoint interval. It saves in ``on_train_batch_end`` of the step that reaches
    ``max_steps`` (the moment periodic checkpoints are taken, so resuming from it steps the lr
    schedule exactly as an uninterrupted run), and in ``on_train_end`` only if that did not
    happen (a run ended by max_epochs)."""

    def __init__(self):
        self._saved_step: int | None = None

    def _save(self, trainer) -> None:
        if self._saved_step != trainer.global_step:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt",
                                    weights_only=False)
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # A run stopped by a signal mid-epoch has its last.ckpt from that step's batch end; a
        # save here would record the epoch as finished, and a resume would skip the rest of it.
        if stopped_by_preemption(trainer):
            return
        self._save(trainer)


class PeriodicCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (``step_*.ckpt`` every N steps, ``last.ckpt`` updated with
    each), minus its save at the end of training. The last ``last.ckpt`` of a run is
    ``FinalCheckpoint``'s, or ``Preemption``'s, taken at the batch end of the last step so that a
    resume continues mid-epoch; Lightning's end-of-training save would record the epoch as
    finished. It overwrites (atomically) rather than versions: ``last.ckpt`` is one file that
    FinalCheckpoint and Preemption write too, and a versioned ``last-v1.ckpt`` beside it would
    hold the newer state where ``resume=auto`` does not look. Its state in checkpoints keeps
    ``ModelCheckpoint``'s key, so either class resumes the other's."""

    def __init__(self, *args, enable_version_counter: bool = False, **kwargs):
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def on_train_end(self, trainer, pl_module) -> None:
        pass

    @property
    def state_key(self) -> str:
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing host numbers only: the module's ``progress_values`` (the
    mean loss of the last check window). A metric logged with ``prog_bar=True`` is a device
    tensor that the bar reads with ``.item()`` at every step: a host sync per step on a GPU.
    train.py adds this bar when the trainer's progress bar is on."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.update({k: f"{v:.4g}" for k, v in getattr(pl_module, "progress_values", {}).items()})
        return items
