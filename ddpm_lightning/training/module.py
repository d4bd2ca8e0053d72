"""The LightningModule: an ε-prediction network, its EMA, and the L_simple objective."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch import nn

from ddpm_lightning.core.diffusion import GaussianDiffusion
from ddpm_lightning.core.flops import precision_dtype, train_flops_per_image
from ddpm_lightning.core.samplers import SamplerSettings
from ddpm_lightning.core.timesteps import make_timestep_sampler
from ddpm_lightning.training.distributed import sync_device
from ddpm_lightning.training.hparams import check_number, to_plain
from ddpm_lightning.training.monitor import StepMonitor
from ddpm_lightning.training.optim import apply_settings, make_optimizer
from ddpm_lightning.training.posthoc import PosthocProfiles
from ddpm_lightning.training.rng import collect_rng_states, fold_rank_into_rng, set_rng_states

# The EMA copy is in eval mode on purpose; Lightning warns about any module in eval mode.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class DDPM(L.LightningModule):
    """Trains ``model`` on ``GaussianDiffusion(betas, ...).training_loss`` (Algorithm 1).

    The EMA copy ``ema_model`` is updated after every optimizer step, on every rank, from step
    1 with no warm-up (as in the paper); it is a submodule, so it is saved in checkpoints and
    moved with the module, and it is what validation, sampling and FID use by default. The raw
    weights in ``model`` are never overwritten by it.

    Args:
        model: the network ε_θ(x_t, t) (or x_0/µ̃ predictor, see ``parameterization``).
        betas: β_1 … β_T, e.g. ``make_beta_schedule("linear", 1000)``.
        parameterization, variance, objective, hybrid_lambda, loss_weight, min_snr_gamma: see
            ``GaussianDiffusion`` (v-prediction, and min-SNR-γ weighting).
        lr, adam_betas, adam_eps, weight_decay: Adam's settings.
        warmup_steps: the lr rises linearly as lr·min(step / warmup_steps, 1), as in the
            original code (so the very first update uses lr = 0 when warmup_steps > 0).
        ema_decay: the EMA decay (0.9999 in the paper); 0 disables averaging (EMA = weights).
        use_ema: evaluate and sample with the EMA weights (default) or with the raw ones.
        ema: "plain" (the EMA of ``ema_decay``, the paper's) or "posthoc": also track
            power-function EMA profiles (``posthoc``: ``sigma_rels``, ``every_n_steps``;
            ``training/posthoc.py``) and save their snapshots in ``RUN/posthoc_ema/``, from
            which ``tools/posthoc_ema.py`` makes the EMA of any length after training. The
            plain EMA still serves evaluation during training.
        sampler: default sampling settings for grids and evaluation (see ``samplers.sample``).
        timesteps: how t is drawn (see ``timesteps.py``): ``{"sampler": "uniform"}`` (the
            paper, the default) or ``{"sampler": "loss_aware", "history": 10,
            "uniform_prob": 0.001}``, improved DDPM's importance sampling for L_vlb. Its loss
            history is kept in checkpoints and identical on every rank.
        run_config: the resolved run configuration, kept in the checkpoint so that the model can
            be rebuilt without repeating the training overrides.
        channels_last: store the weights of ``model`` and ``ema_model`` channels-last (a layout
            change only: same function, same state_dict); False converts them to the classic
            NCHW layout. Our UNet is channels-last already.
        check_every_n_steps: how often (in optimizer steps) the device-side checks are read on
            the host: a non-finite loss or gradient norm is recorded on the device at every
            step with no host sync, and raised (with the step and the batch's t of the first
            one) every N steps and before any checkpoint is written, so a diverged run stops
            within N steps and never saves a non-finite checkpoint. The per-quarter losses are
            averaged on the device over the same window and logged then.
        compile: ``torch.compile`` the training network's call (``model.compile``): False, True,
            or a mode name ("default", "reduce-overhead", "max-autotune"). The EMA copy stays
            eager and the state_dict keys are unchanged. Compilation happens on the first
            step (slow once). Neither option is saved in the hyperparameters.
        tf32: the float32 policy on CUDA, set explicitly when training starts: True runs fp32
            matmuls and convolutions in TF32 (torch's default does so for cuDNN convolutions
            only), False in full fp32. ``train/mfu`` under 32-true uses the matching peak.
        peak_tflops: the device's peak TFLOP/s in the run's precision, for ``train/mfu``; null
            takes Lightning's table, which has no entry for some devices (the H200 among them:
            ``tools/gpu_check.py`` measures one).
    """

    def __init__(
        self,
        model: nn.Module,
        betas: Sequence[float],
        parameterization: str = "eps",
        variance: str = "fixed_large",
        objective: str = "simple",
        hybrid_lambda: float = 1e-3,
        loss_weight: str = "none",
        min_snr_gamma: float = 5.0,
        lr: float = 2e-4,
        adam_betas: Sequence[float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 5000,
        ema_decay: float = 0.9999,
        use_ema: bool = True,
        ema: str = "plain",
        posthoc: Mapping | None = None,
        sampler: Mapping | None = None,
        timesteps: Mapping | None = None,
        run_config: Mapping | None = None,
        channels_last: bool = True,
        compile: bool | str = False,
        check_every_n_steps: int = 50,
        tf32: bool = True,
        peak_tflops: float | None = None,
    ):
        super().__init__()
        check_number("module.lr", lr, "a finite number > 0", lambda v: v > 0)
        check_number("module.ema_decay", ema_decay, "a number in [0, 1)", lambda v: 0 <= v < 1)
        check_number("module.warmup_steps", warmup_steps, "an integer >= 0",
                      lambda v: v >= 0 and float(v).is_integer() and isinstance(v, int))
        check_number("module.weight_decay", weight_decay, "a finite number >= 0",
                      lambda v: v >= 0)
        check_number("module.adam_eps", adam_eps, "a finite number > 0", lambda v: v > 0)
        check_number("module.check_every_n_steps", check_every_n_steps, "an integer >= 1",
                      lambda v: isinstance(v, int) and v >= 1)
        self.check_every_n_steps = check_every_n_steps
        if not isinstance(tf32, bool):
            raise ValueError(f"module.tf32={tf32!r} is invalid; it must be true or false")
        if peak_tflops is not None:
            check_number("module.peak_tflops", peak_tflops, "a number > 0, or null",
                         lambda v: v > 0)
        self.tf32, self.peak_tflops = tf32, peak_tflops
        if len(adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in adam_betas):
            raise ValueError(f"module.adam_betas={list(adam_betas)!r} must be two numbers in [0, 1)")
        # Plain Python containers only, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(to_plain({
            "parameterization": parameterization, "variance": variance, "objective": objective,
            "hybrid_lambda": hybrid_lambda, "loss_weight": loss_weight,
            "min_snr_gamma": min_snr_gamma, "lr": lr, "adam_betas": adam_betas,
            "adam_eps": adam_eps, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
            "ema_decay": ema_decay, "use_ema": use_ema, "ema": ema, "posthoc": posthoc or {},
            "sampler": sampler or {},
            "timesteps": timesteps or {}, "run_config": run_config,
        }), ignore=["model", "betas"], logger=False)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=fmt)
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        if ema not in ("plain", "posthoc"):
            raise ValueError(f"module.ema={ema!r} is unknown; valid values: plain, posthoc")
        # power-function EMA profiles for post-hoc EMA (in the checkpoint; snapshots saved)
        settings = PosthocProfiles.check(posthoc)  # checked whatever module.ema says
        self.posthoc = PosthocProfiles(self.model, **settings) if ema == "posthoc" else None
        if compile:  # after the EMA copy; compiles __call__ in place, so no key changes
            self.model.compile(**({} if compile is True else {"mode": compile}))
        try:
            self.diffusion = GaussianDiffusion(
                betas, parameterization=parameterization, variance=variance, objective=objective,
                hybrid_lambda=hybrid_lambda, loss_weight=loss_weight, min_snr_gamma=min_snr_gamma)
        except ValueError as err:  # the settings are module.* in the config
            raise ValueError(str(err).replace("diffusion.", "module.")) from None
        self.sampler = SamplerSettings.parse(self.hparams.sampler, self.diffusion.num_timesteps,
                                             key="module.sampler")
        self.timesteps = make_timestep_sampler(self.diffusion.num_timesteps,
                                               **self.hparams.timesteps)
        if self.diffusion.learned_variance and self.sampler.variance is not None:
            raise ValueError(
                f"module.sampler.variance={self.sampler.variance!r} cannot be used with "
                f"module.variance={variance!r}: the network predicts Σ; set it to null"
            )
        self._window: tuple[float | None, int] = (None, -1)  # (clock, step) of the last check
        self._window_end: float | None = None  # the clock at the end of the window's last step
        self._paused = 0.0  # seconds of validation inside the current window (not training)
        self._flops: int | None = None  # training FLOPs per image
        self._own_rng_restored = False
        self._posthoc_saved = -1  # the step of the last post-hoc EMA snapshot written
        self.monitor = StepMonitor(self.diffusion.num_timesteps)  # device-side checks
        self.progress_values: dict[str, float] = {}  # host numbers for the progress bar

    def check_data(self, datamodule) -> None:
        """The network against the data it is given, and against the variance it must
        predict: a one-line ``ValueError`` naming both keys."""
        model = self.model
        want_out = model.in_channels * (2 if self.diffusion.learned_variance else 1)
        if model.out_channels != want_out:
            raise ValueError(
                f"model.out_channels={model.out_channels} does not fit "
                f"module.variance={self.diffusion.variance!r}, which needs {want_out} "
                f"({'2 × ' if want_out != model.in_channels else ''}in_channels)"
            )
        if datamodule.image_size != model.image_size:
            raise ValueError(f"data.image_size={datamodule.image_size} does not match "
                             f"model.image_size={model.image_size}")
        if datamodule.channels != model.in_channels:
            raise ValueError(f"data.channels={datamodule.channels} does not match "
                             f"model.in_channels={model.in_channels}")

    # ------------------------------------------------------------- networks
    @property
    def eval_model(self) -> nn.Module:
        """The network used for validation, sampling and FID: the EMA one unless disabled."""
        return self.ema_model if self.hparams.use_ema else self.model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x_t, t)

    @torch.no_grad()
    def update_ema(self) -> None:
        """θ_ema ← decay·θ_ema + (1 − decay)·θ, then copy buffers."""
        ema = list(self.ema_model.parameters())
        raw = list(self.model.parameters())
        decay = self.hparams.ema_decay
        if decay == 0.0:
            torch._foreach_copy_(ema, [p.detach() for p in raw])
        else:
            torch._foreach_lerp_(ema, [p.detach() for p in raw], 1.0 - decay)
        for b_ema, b in zip(self.ema_model.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    # ------------------------------------------------------------- training
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x0 = batch
        t, weights = self.timesteps.sample(x0.shape[0], x0.device)
        losses, t = self.diffusion.training_loss(self.model, x0, t=t)
        # weights = 1 / (T·p_t): an unbiased estimate of the uniform-t loss (1 for uniform t)
        loss = (losses * weights).mean()
        self.monitor.record_nonfinite(loss, 0, t, self.global_step)
        # not on the progress bar: the bar reads its values with .item() at every step; it
        # shows the window's mean loss instead (progress_values, a host number)
        self.log("train/loss", loss)
        self.monitor.add_losses(losses.detach(), t, weights)
        if self.timesteps.name != "uniform":
            # every rank records every rank's (t, loss), so that all draw from the same p_t
            self.timesteps.update(self.all_gather(t), self.all_gather(losses.detach()))
        return loss

    # ------------------------------------- device-side checks (no host sync per step)
    def raise_if_nonfinite(self, collective: bool = True) -> None:
        """Raise FloatingPointError for the first non-finite loss or gradient norm recorded on
        any rank (a host sync; under DDP a collective that every rank makes at the same step)."""
        self.monitor.raise_if_nonfinite(self.device, collective)

    def on_before_optimizer_step(self, optimizer) -> None:
        # after Lightning's unscaling under fp16 AMP, so the norm is of the true gradients
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            # fp16 AMP overflows on purpose: its grad scaler skips those steps itself
            if not str(self.trainer.precision).startswith("16"):
                self.monitor.record_nonfinite(norm, 1, None, self.global_step)
            self.log("train/grad_norm", norm)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()
        if self.posthoc is not None:  # Lightning counts this step after the hook
            self.posthoc.update(self.global_step + 1, self.model)
        # Lightning counts this step after the hook: it is step global_step + 1. A check window
        # ends here, before the callbacks' batch-end work (checkpoints, grids, FID) at this
        # step, so that work never counts as training time.
        if (self.global_step + 1) % self.check_every_n_steps == 0:
            sync_device(self.device)
            self._window_end = time.perf_counter()

    def save_posthoc_snapshot(self) -> None:
        """A post-hoc EMA snapshot at this step (rank 0 writes; a failure there ends every
        rank, see ``on_rank_zero``)."""
        from ddpm_lightning.training.distributed import on_rank_zero

        step, run_dir = self.global_step, self.trainer.default_root_dir
        on_rank_zero(f"saving the post-hoc EMA snapshot at step {step}",
                     self.posthoc.save, run_dir, step)
        self._posthoc_saved = step

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.posthoc is not None and self.global_step % self.posthoc.every_n_steps == 0 \
                and self.global_step != self._posthoc_saved:
            self.save_posthoc_snapshot()
        # a host tensor: a Python number would be copied to the device (a sync) at every step
        self.log("train/lr", torch.tensor(float(self.trainer.optimizers[0].param_groups[0]["lr"])))
        if self.global_step % self.check_every_n_steps == 0 and \
                self.global_step != self._window[1]:
            self.raise_if_nonfinite()  # a host sync, after the callbacks' work at this step
            self._log_window(self.monitor.flush_losses())
            self._log_throughput(batch)

    def _log_window(self, values: dict[str, float]) -> None:
        """The window's quarter losses to the loggers (rank 0), and its mean loss as a host
        number for the progress bar, which then never reads a device tensor."""
        if "loss" in values:
            self.progress_values["loss"] = values.pop("loss")
        if values and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(values, step=self.global_step)

    def _log_throughput(self, batch: torch.Tensor) -> None:
        """Over the window since the last check (``check_every_n_steps`` optimizer steps; the
        first window also holds the start-up): ``train/images_per_sec`` (all ranks), and with
        the network's FLOPs ``train/tflops_per_sec`` and, where the device's peak is known for
        the precision (``peak_tflops``, else Lightning's table), ``train/mfu``; on CUDA
        ``train/peak_memory_gib`` (the process's peak so far). The window runs
        from just after the callbacks of its first step to the end of its last optimizer step
        (before that step's callbacks), both after a device sync."""
        end, step, paused = self._window_end, self.global_step, self._paused
        start, first = self._window
        self._window, self._paused = (time.perf_counter(), step), 0.0  # callbacks are done
        if start is None or end is None or step <= first:
            return
        trainer = self.trainer
        images = (step - first) * batch.shape[0] * trainer.world_size \
            * trainer.accumulate_grad_batches
        rate = images / max(end - start - paused, 1e-9)
        metrics = {"train/images_per_sec": rate}
        metrics["train/tflops_per_sec"] = rate * self._flops / 1e12
        peak = self.peak_flops()
        if peak:
            metrics["train/mfu"] = rate * self._flops / (peak * trainer.world_size)
        if self.device.type == "cuda":  # the allocator's own count: no sync
            metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    def peak_flops(self) -> float | None:
        """The device's peak FLOP/s for this run's precision: ``peak_tflops`` if given, else
        Lightning's table (which reads TF32 for 32-true when ``tf32`` is on)."""
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        from lightning.fabric.utilities.throughput import get_available_flops

        return get_available_flops(self.device, precision_dtype(self.trainer.precision))

    # ----------------------------------------------------------- validation
    def on_validation_start(self) -> None:
        sync_device(self.device)  # validation inside a throughput window is not training time
        self._validation_start = time.perf_counter()

    def on_validation_end(self) -> None:
        sync_device(self.device)
        self._paused += time.perf_counter() - self._validation_start

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        # Fixed t and ε per batch index, so that val/loss is comparable across evaluations.
        g = torch.Generator(device="cpu").manual_seed(10_000 + batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (batch.shape[0],), generator=g)
        noise = torch.randn(batch.shape, generator=g).to(batch)
        losses, _ = self.diffusion.training_loss(self.eval_model, batch, t=t.to(batch.device),
                                                 noise=noise)
        self.log("val/loss", losses.mean(), sync_dist=True, batch_size=batch.shape[0])

    # --------------------------------------------------------- random streams
    def setup(self, stage: str) -> None:
        # the explicit fp32 policy (see tf32), on CUDA only: the CPU's fp32 stays untouched
        if stage == "fit" and self.trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision("high" if self.tf32 else "highest")
            torch.backends.cudnn.allow_tf32 = self.tf32

    def on_train_start(self) -> None:
        """Under DDP, give every rank its own random stream for t, ε and flips.

        ``seed_everything`` seeds every rank alike, so without this all ranks would draw the
        same t and ε for their (different) images: a global batch of B·N images would hold
        only B distinct (t, ε) pairs. A resume that restores every rank's own saved state
        keeps it; otherwise the rank is folded into the common state here."""
        if self._flops is None:  # before the first window: a forward pass, counted
            net = self.ema_model  # the same architecture, never compiled
            shape = (net.in_channels, net.image_size, net.image_size)
            self._flops = train_flops_per_image(net, shape, self.device)
        self._window = (time.perf_counter(), self.global_step)
        self._window_end, self._paused = None, 0.0
        self._apply_optimizer_settings()
        if self.trainer.world_size > 1 and not self._own_rng_restored:
            fold_rank_into_rng(self.trainer.global_rank)
        self._own_rng_restored = False  # a later fit of this module decides afresh

    # ------------------------------------------------------- checkpointing
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the RNG states (every rank's, under DDP), so that a resumed run draws the same
        t, ε and flips; and the timestep sampler's loss history. A run that has gone non-finite
        (on any rank) since the last check raises here instead, so no checkpoint holds
        non-finite weights. A save after an exception may run on one rank only: no collective
        then."""
        self.raise_if_nonfinite(collective=not self.trainer.interrupted)
        states = collect_rng_states()
        checkpoint["rng_states"] = states
        if self.trainer.world_size > 1 and not self.trainer.interrupted:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states_per_rank"] = gathered
        checkpoint["timestep_sampler"] = self.timesteps.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        per_rank = checkpoint.get("rng_states_per_rank")
        world = self.trainer.world_size if self._trainer is not None else 1
        if per_rank is not None and len(per_rank) == world:
            set_rng_states(per_rank[self.trainer.global_rank])
            self._own_rng_restored = True
        elif "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        self.timesteps.load_state_dict(checkpoint.get("timestep_sampler") or {})

    def on_train_end(self) -> None:
        """The last window's checks and quarter losses; then, under DDP, check that every rank
        holds the same EMA weights and the same timestep loss history (all-gathered
        checksums)."""
        self.raise_if_nonfinite()
        self._log_window(self.monitor.flush_losses())
        if self.posthoc is not None and self.global_step != self._posthoc_saved:
            self.save_posthoc_snapshot()  # the last step, whatever the period
        if self.trainer.world_size <= 1:
            return
        with torch.no_grad():
            checks = {"EMA weights": torch.stack(
                [p.double().sum() for p in self.ema_model.parameters()]).sum()}
            state = self.timesteps.state_dict()
            if "losses" in state:
                checks["timestep loss histories"] = (state["losses"].sum()
                                                     + state["counts"].sum()).double()
        for what, value in checks.items():
            gathered = self.all_gather(value.to(self.device).reshape(1)).flatten()
            if not torch.all(gathered == gathered[0]):
                raise RuntimeError(f"{what} differ across ranks: checksums {gathered.tolist()}")
            if self.trainer.is_global_zero:
                print(f"{what} identical across {gathered.numel()} ranks "
                      f"(checksum {gathered[0].item():.10e})")

    # ------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        return make_optimizer(self.model.parameters(), self.hparams, precision)

    def _apply_optimizer_settings(self) -> None:
        """A resume restores the optimizer and lr schedule with the settings they were saved
        with; train with this run's (see ``apply_settings``)."""
        configs = self.trainer.lr_scheduler_configs
        apply_settings(self.trainer.optimizers[0], configs[0].scheduler if configs else None,
                       self.hparams)
