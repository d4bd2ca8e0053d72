"""Evaluation during training (the Lightning layer): ``FIDCallback`` (``callbacks=fid``) and
``EvalCallback`` (``callbacks=eval``: FID and bits/dim, cheap and comparable across jobs)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ddpm_lightning.core.files import atomic_write
from ddpm_lightning.core.generate import SEED_STRIDE, batch_plan
from ddpm_lightning.core.inference import eval_mode
from ddpm_lightning.core.pixels import to_model_range
from ddpm_lightning.metrics.fid import (
    FEATURE_DIM,
    FeatureMoments,
    FrechetToReference,
    inception_features,
    load_stats,
    resolve_weights,
    save_stats,
    stats_of_features,
)
from ddpm_lightning.metrics.kid import kid_from_features, kid_jackknife
from ddpm_lightning.metrics.reference import (
    _dataset_features,
    _dataset_moments,
    _reference_set,
    cache_dir,
)
from ddpm_lightning.training.callbacks import SamplingCallback
from ddpm_lightning.training.distributed import gather_to_rank_zero, on_rank_zero


class FIDCallback(SamplingCallback):
    """FID of EMA samples against the training set, every ``every_n_steps`` optimizer steps
    (and at the end of training), logged as ``val/fid`` (and ``val/fid_seconds``); with
    ``jackknife_groups`` its standard error ``val/fid_se``, and with ``kid`` the Kernel
    Inception Distance ``val/kid`` ± ``val/kid_std`` (the spread of single subsets) and, with
    both, KID's standard error ``val/kid_se`` (the same jackknife).

    Every rank samples its share of ``num_samples`` (batch k from the generator seeded by
    (seed, k), as in sample.py: the same x_T at every evaluation and in every job of a sweep,
    so FIDs differ by the model only, and equal sample.py's for the same settings) with
    ``pl_module.eval_model`` and computes its Inception feature moments; the moments are
    sent to rank 0, which computes the scores and broadcasts them, so every rank holds
    them (``trainer.callback_metrics["val/fid"]``, e.g. for a checkpoint monitor).
    Sampling and KID's subsets use generators of their own, seeded by
    ``seed``: the training RNG is not advanced.

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this.
        num_samples: samples per evaluation, over all ranks (the paper: 50k; a floor near 30
            remains with 2k, so compare runs at equal ``num_samples`` only).
        batch_size: sampling batch per rank.
        sampler: overrides of ``module.sampler``, e.g. ``{name: ddim, steps: 100}``.
        reference: ``split`` (train), ``max_images`` (null = all), ``cache_dir`` (null =
            $DDPM_FID_CACHE), or ``path`` to a precomputed ``.npz`` with mu/sigma. The
            reference images come from the trainer's ``DiffusionDataModule``; a missing cache
            is computed once, split over the ranks.
        weights_path, download: where the Inception weights come from (see ``resolve_weights``).
        on_train_end: also evaluate at the end of training.
        seed: base seed of the sampling noise.
        inception_batch_size: images per Inception forward pass.
        jackknife_groups: K, the groups of the generated samples (the reference fixed) that
            the grouped jackknife leaves out in turn: FID's sampling error at this N is logged
            as ``fid_se`` (and with ``kid``, KID's as ``kid_se``); at most N; 0 = none.
        kid: also compute KID (``metrics.kid``), from the reference *features*, which the
            reference cache then keeps; ``kid_subsets`` subsets of ``kid_subset_size`` images
            (at most the number of samples and of reference images).
    """

    config_key = "callbacks.fid"  # names the settings in errors
    prefix = "val/"  # of the logged keys: val/fid, val/fid_seconds

    @property
    def sampler_key(self) -> str:
        return f"{self.config_key}.sampler"

    def __init__(self, every_n_steps: int = 10_000, num_samples: int = 10_000,
                 batch_size: int = 256, sampler: Mapping | None = None,
                 reference: Mapping | None = None, weights_path: str | None = None,
                 download: bool = False, on_train_end: bool = True, seed: int = 0,
                 inception_batch_size: int = 64, jackknife_groups: int = 0, kid: bool = False,
                 kid_subsets: int = 100, kid_subset_size: int = 1000):
        super().__init__(every_n_steps, on_train_end, key=f"{self.config_key}.every_n_steps",
                         sampler=sampler)
        for key, value, lo in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1),
                               ("inception_batch_size", inception_batch_size, 1),
                               ("kid_subsets", kid_subsets, 1),
                               ("kid_subset_size", kid_subset_size, 1),
                               ("jackknife_groups", jackknife_groups, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                kind = "non-negative" if lo == 0 else "positive"
                raise ValueError(f"{self.config_key}.{key}={value!r} must be a {kind} integer")
        if jackknife_groups == 1:
            raise ValueError(f"{self.config_key}.jackknife_groups=1: use 0 (none) or at least 2")
        if not isinstance(kid, bool):
            raise ValueError(f"{self.config_key}.kid={kid!r} must be true or false")
        if kid and kid_subset_size < 2:
            raise ValueError(f"{self.config_key}.kid_subset_size={kid_subset_size} must be >= 2")
        if num_samples < 2:
            raise ValueError(f"{self.config_key}.num_samples={num_samples} must be >= 2")
        self.reference = dict(reference or {})
        unknown = set(self.reference) - {"split", "max_images", "cache_dir", "path"}
        if unknown:
            raise ValueError(f"{self.config_key}.reference.{min(unknown)} is unknown; valid: "
                             "split, max_images, cache_dir, path")
        self.reference.setdefault("split", "train")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.weights_path = weights_path
        self.download = download
        self.seed = seed
        self.inception_batch_size = inception_batch_size
        self.jackknife_groups, self.kid = jackknife_groups, kid
        self.last_jackknife: dict = {}
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.last_fid: float | None = None
        self._ref: tuple | None = None  # (µ, Σ, features or None), on rank 0
        self._frechet: FrechetToReference | None = None
        self._ref_ready = False

    # ------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        """Fail before training on bad settings or missing weights/reference."""
        from ddpm_lightning.training.data import DiffusionDataModule

        if stage != "fit":
            return
        self.check_module(pl_module)
        resolve_weights(self.weights_path, self.download)
        path = self.reference.get("path")
        if path:
            if not Path(path).expanduser().is_file():
                raise FileNotFoundError(f"{self.config_key}.reference.path={path} not found")
            if self.kid and load_stats(path, features=True) is None:
                raise ValueError(f"{self.config_key}.kid=true needs the reference features, and "
                                 f"{self.config_key}.reference.path={path} holds only mu and "
                                 "sigma; drop reference.path (the cache keeps features) or set "
                                 "kid=false")
        elif not isinstance(trainer.datamodule, DiffusionDataModule):
            raise ValueError(f"{self.config_key} needs trainer.fit(..., datamodule="
                             "DiffusionDataModule) for its reference images, or "
                             "reference.path to a stats .npz")

    def run(self, trainer, pl_module) -> float:
        return self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------- work
    def evaluate(self, trainer, pl_module) -> float:
        """Run one evaluation on every rank; returns the FID (on every rank)."""
        start = time.perf_counter()
        # Whatever draws random numbers in here (data loaders, samplers), the training RNG
        # streams come out exactly as they went in.
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            reference = self._reference_stats(trainer, pl_module)
            features = self._sample_features(trainer, pl_module)
        step = trainer.global_step
        # rank-0 work: a failure there raises on every rank (no rank left in a collective)
        scores = on_rank_zero(f"the FID at step {step}", self.scores, features, reference)
        scores = trainer.strategy.broadcast(scores, src=0)
        fid = scores[f"{self.prefix}fid"]
        scores[f"{self.prefix}fid_seconds"] = time.perf_counter() - start

        def log() -> None:
            for logger in trainer.loggers:
                logger.log_metrics(scores, step=step)
            extra = "".join(f", {k.removeprefix(self.prefix)} {v:.4g}" for k, v in scores.items()
                            if k.endswith(("_se", "kid")))
            print(f"FID at step {step}: {fid:.3f}{extra} ({self.num_samples} samples, "
                  f"{scores[f'{self.prefix}fid_seconds']:.0f} s)", flush=True)

        on_rank_zero(f"logging the FID at step {step}", log)
        for key, value in scores.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        self.last_fid, self._last_step = fid, step
        return fid

    def scores(self, features: torch.Tensor, reference: tuple) -> dict:
        """FID, and as configured its jackknife standard error and KID, of the generated
        ``features`` [N, 2048] against ``reference`` (µ, Σ, features or None)."""
        if self._frechet is None:  # the reference's factor, once per run
            self._frechet = FrechetToReference(*reference[:2])
        p = self.prefix
        groups = min(self.jackknife_groups, len(features))
        leave_out = {}
        if groups:
            fid = self._frechet.jackknife(features, groups)
            out = {f"{p}fid": fid["fid"], f"{p}fid_se": fid["se"]}
            leave_out["fid"] = fid["values"]
        else:
            out = {f"{p}fid": self._frechet(features)}
        if self.kid:
            ref_features = reference[2]
            size = min(self.kid_subset_size, len(features), len(ref_features))
            kid = kid_from_features(features, ref_features, self.kid_subsets, size, self.seed)
            out.update({f"{p}kid": kid["kid"], f"{p}kid_std": kid["kid_std"]})
            if groups:
                kid = kid_jackknife(features, ref_features, groups)
                out[f"{p}kid_se"] = kid["se"]
                leave_out["kid"] = kid["values"]
        self.last_jackknife = leave_out  # rank 0: the leave-out values, for paired differences
        return out

    def _sample_features(self, trainer, pl_module) -> torch.Tensor | None:
        """The Inception features [N, 2048] of the samples, in sample order, on rank 0 (None
        elsewhere): sample.py's samples for the same seed, batch size and sampler, so the two
        FIDs agree. Each rank embeds its own share; the features travel, not the images."""
        indices, images = self.generate(pl_module, self.num_samples, self.batch_size, self.seed,
                                        trainer.global_rank, trainer.world_size)
        device = pl_module.device
        if images.shape[0]:
            features = inception_features(images, self.inception_batch_size, device,
                                          self.weights_path, self.download)
        else:
            features = torch.zeros(0, FEATURE_DIM, device=device)
        indices = torch.as_tensor(indices, dtype=torch.long, device=device)
        return _in_order(*gather_to_rank_zero(indices, features, device))

    def _reference_stats(self, trainer, pl_module):
        """(µ, Σ, features or None) of the reference on rank 0 (None elsewhere); the features
        only with ``kid``. A cache miss is computed by all ranks together, each on every
        world_size-th image, and cached by rank 0."""
        if self._ref_ready:
            return self._ref
        ref, kid = self.reference, self.kid

        def complete(stats):
            return None if stats is None else (*stats[:2], stats[2] if kid else None)

        if ref.get("path"):
            stats = on_rank_zero("reading the FID reference",
                                 lambda: complete(load_stats(ref["path"], features=kid)))
        else:
            dataset, indices, key, info = _reference_set(
                trainer.datamodule, ref["split"], ref.get("max_images"), None,
                fingerprint=trainer.is_global_zero)
            path = Path(ref.get("cache_dir") or cache_dir()).expanduser() / f"{key}.npz"
            stats = on_rank_zero(
                f"reading the FID reference {path}",
                lambda: complete(load_stats(path, info, features=kid)) if path.is_file() else None)
            if not trainer.strategy.broadcast(stats is not None, src=0):
                stats = self._compute_reference(trainer, pl_module, dataset, indices, path, info)
        self._ref, self._ref_ready = stats, True
        return stats

    def _compute_reference(self, trainer, pl_module, dataset, indices, path, info):
        """The reference's statistics (and features, with ``kid``) from its images, split over
        the ranks; rank 0 caches and returns them (None on the other ranks)."""
        rank, world, device = trainer.global_rank, trainer.world_size, pl_module.device
        share = indices[rank::world]
        args = (self.inception_batch_size, device, self.weights_path, self.download)
        if self.kid:  # the features themselves travel to rank 0
            features = (_dataset_features(dataset, share, *args) if share
                        else torch.zeros(0, FEATURE_DIM, device=device))
            order = torch.as_tensor(share, dtype=torch.long, device=device)
            features = _in_order(*gather_to_rank_zero(order, features, device))
            moments = None
        else:
            features, moments = None, _all_gather_moments(trainer, _dataset_moments(
                dataset, share, *args))

        def cache():
            if features is None:
                stats = (*moments.stats(), None)
                save_stats(path, *stats[:2], **info)
            else:
                stats = (*stats_of_features(features), features.numpy())
                save_stats(path, *stats, **info)
            print(f"FID reference statistics ({len(indices)} images) cached in {path}",
                  flush=True)
            return stats

        return on_rank_zero(f"caching the FID reference in {path}", cache)


def _in_order(indices: torch.Tensor | None, rows: torch.Tensor | None, dtype=torch.float32):
    """Gathered rows sorted by their indices, on the CPU (None off rank 0)."""
    if indices is None:
        return None
    return rows[torch.argsort(indices)].to("cpu", dtype)


def _all_gather_moments(trainer, moments: FeatureMoments) -> FeatureMoments:
    """Merge the moments of all ranks (same result on every rank)."""
    if trainer.world_size == 1:
        return moments
    strategy = trainer.strategy
    counts = strategy.all_gather(torch.tensor(float(moments.n), dtype=torch.float64,
                                              device=moments.mean.device))
    means = strategy.all_gather(moments.mean)
    m2s = strategy.all_gather(moments.m2)
    merged = FeatureMoments(moments.mean.shape[0], moments.mean.device)
    for n, mean, m2 in zip(counts.reshape(-1).tolist(), means, m2s):
        merged.merge(int(n), mean, m2)
    return merged


class EvalCallback(FIDCallback):
    """``callbacks=eval``: cheap evaluation that compares across the jobs of a sweep.

    Every ``every_n_steps`` optimizer steps (and at the end of training), on all ranks, with the
    EMA weights, it logs:

    * ``eval/fid`` (and ``eval/fid_seconds``): FID of ``num_samples`` samples, sample i from the
      same x_T in every job and at every evaluation (``FIDCallback``), with ``eval/fid_se``,
      its standard error at this N (the grouped jackknife);
    * ``eval/kid``, ``eval/kid_se`` and ``eval/kid_std``: KID, unbiased at small N, its
      standard error at this N (the same jackknife), and the spread of single subsets; the
      jackknife's leave-a-group-out FIDs and KIDs are kept in ``RUN/eval/jackknife_step_*.npz``,
      so that jobs pair their errors group by group;
    * ``eval/bpd`` (and ``eval/bpd_se``, ``eval/prior_bpd``, ``eval/vb_bpd``,
      ``eval/decoder_bpd``, ``eval/nll_seconds``): the stratified unbiased estimate of the
      bound (``likelihood.bits_per_dim_estimate``) on the first ``nll_images`` held-out
      images, with ``nll_timesteps`` strata, the t and ε of image i fixed by ``seed`` (common
      random numbers: evaluations differ by the model only); ``eval/bpd_se`` is its standard
      error over the images; each image's value is kept in ``RUN/eval/bpd_step_*.npz``, so that
      jobs compare image by image (paired);
    * ``eval/vb_band{k}``: stratum k's share of the bound, so that schedules compare where
      they differ in t;
    * ``eval/seconds``, the whole evaluation, and ``eval/train_seconds``, the wall-clock
      training time so far without the evaluations (kept across resumes).

    Under W&B it declares the ``eval/*`` keys against ``trainer/global_step``, keeps the best
    (lowest) ``eval/fid``, ``eval/kid`` and ``eval/bpd`` in the run summary, and ``eval/best_fid_step``."""

    config_key = "callbacks.eval"
    prefix = "eval/"

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 1000,
                 nll_images: int = 256, nll_timesteps: int = 32, nll_batch_size: int = 128,
                 jackknife_groups: int = 50, kid: bool = True, **fid_kwargs):
        super().__init__(every_n_steps=every_n_steps, num_samples=num_samples,
                         jackknife_groups=jackknife_groups, kid=kid, **fid_kwargs)
        for key, value in (("nll_images", nll_images), ("nll_timesteps", nll_timesteps),
                           ("nll_batch_size", nll_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.config_key}.{key}={value!r} must be a positive integer")
        self.nll_images, self.nll_timesteps = nll_images, nll_timesteps
        self.nll_batch_size = nll_batch_size
        self.best: tuple[float, int] | None = None  # (FID, step)
        self._trained, self._clock = 0.0, None  # training seconds before the clock

    def check_module(self, pl_module) -> None:
        from ddpm_lightning.core.likelihood import strata

        super().check_module(pl_module)
        try:
            strata(pl_module.diffusion.num_timesteps, self.nll_timesteps)
        except ValueError as err:
            raise ValueError(str(err).replace("nll.num_timesteps",
                                              f"{self.config_key}.nll_timesteps")) from None

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            for exp in _wandb_runs(trainer):
                exp.define_metric("trainer/global_step")
                exp.define_metric("eval/*", step_metric="trainer/global_step")
                exp.define_metric("eval/fid", summary="min")
                exp.define_metric("eval/bpd", summary="min")
                exp.define_metric("eval/kid", summary="min")

    # ----------------------------------------- training time, evaluations excluded
    def on_train_start(self, trainer, pl_module) -> None:
        self._clock = time.perf_counter()  # the training time so far is self._trained

    def train_seconds(self) -> float:
        """Wall-clock seconds of training so far in this run (resumes included), without the
        evaluations: the x axis of FID against training time."""
        running = 0.0 if self._clock is None else time.perf_counter() - self._clock
        return self._trained + running

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._trained = float(state_dict.get("train_seconds", 0.0))

    def run(self, trainer, pl_module) -> dict:
        trained = self.train_seconds()
        start = time.perf_counter()
        fid = self.evaluate(trainer, pl_module)
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            nll = self.evaluate_nll(trainer, pl_module)
        step = trainer.global_step
        metrics = {**nll, "eval/seconds": time.perf_counter() - start,
                   "eval/train_seconds": trained}
        self._trained, self._clock = trained, time.perf_counter()  # the evaluation is not counted
        if self.best is None or fid < self.best[0]:
            self.best = (fid, step)
        trainer.callback_metrics["eval/best_fid"] = torch.tensor(self.best[0])
        for key, value in metrics.items():  # e.g. optimized_metric=eval/bpd
            trainer.callback_metrics[key] = torch.tensor(value)

        def log() -> None:
            self.save_per_image(trainer, step)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            for exp in _wandb_runs(trainer):
                exp.summary["eval/best_fid"], exp.summary["eval/best_fid_step"] = self.best
            print(f"eval at step {step}: bits/dim {nll['eval/bpd']:.4f} ± "
                  f"{nll['eval/bpd_se']:.4f} ({nll['eval/nll_seconds']:.0f} s)", flush=True)

        on_rank_zero(f"logging the evaluation at step {step}", log)
        return {"eval/fid": fid, **metrics}

    def save_per_image(self, trainer, step: int) -> Path:
        """``RUN/eval/bpd_step_XXXXXXX.npz``: the bits/dim of each held-out image (``bpd``,
        held-out image i at row i) and what fixes its t and ε (``seed``, ``timesteps``), so
        that ``compare`` can pair two jobs image by image; with ``jackknife_groups``, also
        ``RUN/eval/jackknife_step_XXXXXXX.npz``: the leave-a-group-out FIDs (``fid``) and KIDs
        (``kid``), with the ``seed`` and ``num_samples`` that fixed the samples, so that two
        jobs pair their FID and KID errors group by group."""
        folder = Path(trainer.default_root_dir) / "eval"
        path = folder / f"bpd_step_{step:07d}.npz"
        with atomic_write(path) as f:
            np.savez(f, bpd=self.last_bpd_per_image.numpy(), seed=self.seed,
                     timesteps=self.nll_timesteps)
        if self.last_jackknife:
            with atomic_write(folder / f"jackknife_step_{step:07d}.npz") as f:
                np.savez(f, **self.last_jackknife, seed=self.seed, num_samples=self.num_samples)
        return path

    def evaluate_nll(self, trainer, pl_module) -> dict:
        """The bits/dim estimate over all ranks (batch k of the subset on rank k mod W)."""
        from ddpm_lightning.core.likelihood import bits_per_dim_estimate

        start = time.perf_counter()
        data = trainer.datamodule.val_set
        n = min(self.nll_images, len(data))
        device = pl_module.device
        sums = torch.zeros(4 + self.nll_timesteps, dtype=torch.float64)  # Σ total, Σ total², …
        count = torch.zeros((), dtype=torch.float64)
        per_image, image_ids = [], []
        plan = batch_plan(n, self.nll_batch_size, trainer.global_rank, trainer.world_size)
        with eval_mode(pl_module.eval_model) as net:
            for k, lo, size in plan:
                x0 = to_model_range(torch.stack([data[i] for i in range(lo, lo + size)]).to(device))
                g = torch.Generator().manual_seed((self.seed + 1) * SEED_STRIDE + k)
                out = bits_per_dim_estimate(pl_module.diffusion, net, x0, self.nll_timesteps, g)
                parts = torch.stack([out["total"], out["total"] ** 2, out["prior"],
                                     out["decoder"]], dim=1)
                sums += torch.cat([parts, out["bands"]], dim=1).double().sum(0).cpu()
                count += size
                per_image.append(out["total"].double())
                image_ids.append(torch.arange(lo, lo + size, device=device))
        ids = torch.cat(image_ids) if image_ids else torch.zeros(0, dtype=torch.long, device=device)
        totals = (torch.cat(per_image) if per_image
                  else torch.zeros(0, dtype=torch.float64, device=device))
        self.last_bpd_per_image = _in_order(*gather_to_rank_zero(ids, totals, device),
                                            dtype=torch.float64)
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums.to(device), reduce_op="sum").cpu()
            count = trainer.strategy.reduce(count.to(device), reduce_op="sum").cpu()
        n = float(count)
        mean = float(sums[0]) / n
        var = max(float(sums[1]) / n - mean**2, 0.0) * n / max(n - 1, 1)
        bands = sums[4:] / n
        out = {"eval/bpd": mean, "eval/bpd_se": (var / n) ** 0.5,
               "eval/prior_bpd": float(sums[2]) / n, "eval/vb_bpd": float(bands.sum()),
               "eval/decoder_bpd": float(sums[3]) / n,
               "eval/nll_seconds": time.perf_counter() - start}
        out.update({f"eval/vb_band{k}": float(v) for k, v in enumerate(bands)})
        return out


def _wandb_runs(trainer):
    """The W&B run objects of the trainer's WandbLoggers (rank zero)."""
    from lightning.pytorch.loggers import WandbLogger

    return [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]
