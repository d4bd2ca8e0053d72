"""Training loaders whose batch order depends only on (seed, epoch) and that resume mid-epoch:
the shuffling sampler, the DataLoader that records its position, and the loader that takes
batches from a device-resident uint8 tensor (no workers)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from ddpm_lightning.training.checkpoint import CheckpointError


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed.

    torch already seeds each worker with ``base_seed + worker_id``, where
    ``base_seed`` comes from the DataLoader's seeded generator.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class EpochRandomSampler(DistributedSampler):
    """This rank's share of a shuffle whose order depends only on (seed, epoch), read from
    position ``start`` on, so that a run resumed at any step sees the batches of a run never
    stopped.

    The order is ``randperm(n)`` from a generator seeded with ``seed + epoch``, padded to a
    multiple of ``num_replicas`` and dealt out as ``order[rank::num_replicas]``, which is what
    Lightning's DistributedSampler does with the run seed (one process: the plain permutation).
    Being a DistributedSampler, Lightning keeps it under DDP instead of replacing it; Lightning
    calls ``set_epoch`` every epoch."""

    def __init__(self, data_source, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=False)
        self.data_source = data_source
        self.start = 0  # first position of this rank's share to yield

    def order(self) -> list[int]:
        """This rank's whole share for the current epoch."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.data_source), generator=g).tolist()
        perm += perm[: self.total_size - len(perm)]
        return perm[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        return iter(self.order()[self.start:])


class _EpochPosition:
    """The position of a training loader in its epoch, saved in checkpoints.

    Lightning saves ``state_dict()`` with every checkpoint and passes it back to
    ``load_state_dict`` on resume. The position is the number of batches that reached
    ``training_step`` this epoch (``consumed``, counted by the datamodule when a training batch
    arrives on the device), not the number the workers or Lightning's prefetcher have read
    ahead. On resume the sampler starts after those batches, in the epoch they belong to (the
    next epoch if they completed it: ``epoch_batches`` is the epoch's length as the Trainer
    runs it, e.g. under ``limit_train_batches``), so the same batches follow as in a run never
    stopped, with workers or without, under DDP too (every rank skips its own share).

    The epoch is set here, at load time, because Lightning creates the first iterator (and
    its workers prefetch) before it calls ``set_epoch`` for the resumed epoch.

    Users set ``sampler`` (an ``EpochRandomSampler``) and ``batch_size``, call
    ``_init_position()``, and call ``_start_epoch()`` when an iterator starts."""

    sampler: EpochRandomSampler
    batch_size: int

    def _init_position(self) -> None:
        self.consumed = 0
        self.epoch_batches = None  # set by the datamodule: the Trainer's batches per epoch
        self._start: int | None = None

    def state_dict(self) -> dict:
        length = self.epoch_batches() if callable(self.epoch_batches) else len(self)
        return {"epoch": int(self.sampler.epoch), "consumed": int(self.consumed),
                "epoch_batches": int(min(length, len(self))),
                "batch_size": int(self.batch_size), "num_replicas": self.sampler.num_replicas,
                "num_samples": len(self.sampler)}

    def load_state_dict(self, state: dict) -> None:
        mine = {"batch_size": self.batch_size, "num_replicas": self.sampler.num_replicas,
                "num_samples": len(self.sampler)}
        for key, value in mine.items():
            if state.get(key, value) != value:
                raise CheckpointError(
                    f"resume: the checkpoint's data loader had {key}={state[key]}, this run has "
                    f"{key}={value}; a mid-epoch resume needs the same data.batch_size, devices "
                    "and dataset"
                )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= int(state.get("epoch_batches", len(self))):
            epoch, consumed = epoch + 1, 0  # it stopped on the epoch's last batch
        self.sampler.set_epoch(epoch)
        self._start = consumed

    def _start_epoch(self) -> None:
        start, self._start = self._start or 0, None
        self.consumed = start
        self.sampler.start = start * self.batch_size


class ResumableDataLoader(_EpochPosition, DataLoader):
    """The training DataLoader, with its position in the epoch saved in checkpoints (see
    ``_EpochPosition``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_position()

    def __iter__(self):
        self._start_epoch()
        return super().__iter__()


class DeviceLoader(_EpochPosition):
    """The training set held on the device as one uint8 tensor, batches taken by index.

    The batches are those of ``ResumableDataLoader`` with the same sampler (the same
    per-epoch permutation from the seed, the same share per rank, the last incomplete batch
    dropped), and so is the saved position; there are no workers and no host-to-device copies.
    Lightning calls ``sampler.set_epoch`` each epoch, as for a DataLoader."""

    def __init__(self, images: Tensor, sampler: EpochRandomSampler, batch_size: int, device):
        self.images = images.to(device)
        self.sampler = sampler
        self.batch_size = batch_size
        self._init_position()

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        self._start_epoch()
        order = self.sampler.order()
        index = torch.tensor(order, dtype=torch.long).to(self.images.device)
        for k in range(self.consumed, len(self)):
            yield self.images.index_select(0, index[k * self.batch_size:(k + 1) * self.batch_size])

