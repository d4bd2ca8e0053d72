"""Failures under DDP are collective: work that one rank does alone (writing a checkpoint, a
sample grid, the FID) and checks that one rank can fail alone (a non-finite loss on its own
batch) end every rank at once, instead of leaving the others waiting in a collective until the
process-group timeout (30 minutes with NCCL). Plain ``torch.distributed``; Lightning only in
the two adapters to its strategies (``collective_checkpoint_saves``, ``ddp``)."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """Work on one rank failed; raised on every rank, with the failing rank's message."""


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank_zero(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only; its result there (None elsewhere).

    Every rank learns whether it failed (one broadcast of rank 0's message), and if it did, every
    rank raises ``RankFailure("<what> failed on rank 0: <error>")``. In a single process
    ``fn``'s own exception propagates unchanged."""
    rank, world = rank_and_world()
    if world == 1:
        return fn(*args, **kwargs)
    result, err = None, None
    if rank == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
            err = e
    message = [None if err is None else
               f"{what} failed on rank 0: {type(err).__name__}: {' '.join(str(err).split())}"]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise RankFailure(message[0]) from err
    return result


def over_ranks(value: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """``value`` reduced element-wise with ``op`` (MIN, SUM, …) over all ranks (``value``
    itself alone)."""
    if rank_and_world()[1] > 1:
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM job (``ARRAY_TASK`` for an array's
    task), or None outside SLURM. A requeued job keeps it."""
    import os

    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def collective_checkpoint_saves(strategy) -> None:
    """Make ``strategy.save_checkpoint`` (rank 0 writes; Lightning's ``Trainer.save_checkpoint``
    then waits in a barrier) fail on every rank when rank 0's write fails (a full disk, a bad
    path). Strategies that save collectively themselves (FSDP, DeepSpeed) are left alone."""
    from lightning.pytorch.strategies import Strategy

    if type(strategy).save_checkpoint is not Strategy.save_checkpoint:
        return
    save = strategy.save_checkpoint

    def collective_save(checkpoint, filepath, storage_options=None):
        on_rank_zero(f"saving {filepath}", save, checkpoint, filepath, storage_options)

    strategy.save_checkpoint = collective_save


def ddp(timeout_minutes: float = 10.0, **kwargs):
    """Lightning's ``DDPStrategy`` with a process-group timeout of ``timeout_minutes``: the
    longest any rank may wait in a collective for the others. Failures of rank-0 work are
    collective (above), so the timeout only ends runs in which a rank died or hung; it must
    exceed the longest work one rank does while the others wait (a checkpoint write)."""
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(timeout_minutes, bool) or not isinstance(timeout_minutes, (int, float)) \
            or not timeout_minutes > 0:
        raise ValueError(f"trainer.strategy.timeout_minutes={timeout_minutes!r} is invalid; "
                         "it must be a number > 0")
    return DDPStrategy(timeout=timedelta(minutes=timeout_minutes), **kwargs)


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)


def gather_to_rank_zero(indices: torch.Tensor, images: torch.Tensor, device,
                        chunk: int = 256):
    """Every rank's (indices, images) on rank 0, rank by rank; (None, None) on the other
    ranks. Rank r sends its share in chunks of
    ``chunk`` images through ``device`` (NCCL sends from the GPU), so rank 0's memory holds the
    N images once and no other rank's holds more than its own share: an all-gather would put all
    N on every rank (50,000 images at 256² are 9.8 GB)."""
    rank, world = rank_and_world()
    if world == 1:
        return indices, images
    counts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor(indices.numel(), device=device))
    counts = [int(c) for c in counts]
    shape = images.shape[1:]
    if rank != 0:
        for lo in range(0, counts[rank], chunk):
            dist.send(indices[lo:lo + chunk].to(device), dst=0)
            dist.send(images[lo:lo + chunk].to(device), dst=0)
        return None, None
    all_idx, all_img = [indices], [images]
    for src in range(1, world):
        for lo in range(0, counts[src], chunk):
            n = min(chunk, counts[src] - lo)
            idx = torch.empty(n, dtype=indices.dtype, device=device)
            img = torch.empty((n, *shape), dtype=images.dtype, device=device)
            dist.recv(idx, src=src)
            dist.recv(img, src=src)
            all_idx.append(idx.cpu())
            all_img.append(img.cpu())
    return torch.cat(all_idx), torch.cat(all_img)
