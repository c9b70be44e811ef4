"""Data-parallel training on ``torch.distributed``, launched by ``torchrun``.

Launch (the same arguments as ``pyrovae train``; one process per rank)::

    # one machine, 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node 2 -m pyrovae.cli train --data sim.h5ad --model sams_vae \
        --out runs/ddp
    # 4 nodes x 8 GPUs (nccl): run this on every node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id JOB \\
        -m pyrovae.cli train --data /shared/screen.h5ad --model sams_vae --out /shared/runs/ddp \\
        --set device=cuda

How it works. ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; the first call
of :func:`context` then joins the default process group (gloo on CPU, nccl when ``device`` is CUDA, each rank
on GPU ``LOCAL_RANK``). Every rank holds the whole model and opens the same data. Each epoch's permutation
of the training cells (seeded, identical on every rank) is cut into global minibatches of
``world_size * batch_size`` cells and rank r takes the r-th slice
(:class:`~pyrovae.data.loader.MinibatchLoader` ``shard``), passing its cells' positions as the explicit
subsample indices of the ``cells`` plate, with N (the split's size) and N_t (the split's per-treatment
counts) global. Each rank's loss is then the per-cell negative ELBO estimate from its own cells: local terms
scaled by N / B_r, global rows by w_t^r = (N / B_r) n_t^r / N_t. Both are linear in the rank's cells, so
the average of the ranks' gradients (one ``all_reduce`` per step, :meth:`DataParallel.reduce_step`) is
exactly the gradient of one process on the union of their minibatches with the same draws
(tests/train/test_distributed.py). Each rank draws its own particles (torch/Pyro seed + rank), so the
averaged step uses world_size x P draws of the global sites. The training and validation losses are averaged
over ranks, so every rank takes the same early-stopping decision; checkpoints and ``metrics.csv`` are
written by rank 0 only; ``--resume`` reads ``last.pt`` on every rank (ranks other than 0 reseed from
(seed, rank, epoch), so a resumed run is deterministic but not the uninterrupted run's continuation).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


class DataParallel:
    """The process group of a data-parallel run (rank, world size) and its collective operations."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = int(rank), int(world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` for :class:`~pyrovae.data.loader.MinibatchLoader`."""
        return self.rank, self.world_size

    def reduce_step(self, params: Iterable[torch.nn.Parameter], loss: float) -> float:
        """Average the gradients of ``params`` and the step's loss over ranks in one ``all_reduce``;
        returns the averaged loss. Parameters without a gradient count as zero gradients."""
        params = [p for p in params if p.requires_grad]
        ref = params[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor([float(loss)], device=ref.device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        start = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[start : start + n].view_as(p).clone()
            start += n
        return float(flat[-1])

    def mean(self, value: float, device: str | torch.device = "cpu") -> float:
        """The average of a number over ranks."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t[0]) / self.world_size

    def broadcast_tensor(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` in place with rank 0's value."""
        dist.broadcast(t, src=0)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        dist.barrier()


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_main_process() -> bool:
    """Whether this process writes files: a single process, or rank 0 of a data-parallel run."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _leave_process_group() -> None:
    """Destroy the process group :func:`context` joined, at interpreter exit: a process that exits with a
    live gloo group can abort while its communication threads are torn down ("terminate called without an
    active exception", exit code -6), failing a run that finished."""
    if dist.is_initialized():
        dist.destroy_process_group()


def context(device: str | torch.device = "cpu") -> DataParallel | None:
    """The data-parallel context of this process: ``None`` in a single process; under ``torchrun`` (more
    than one rank) joins the default process group on first use (gloo on CPU, nccl for CUDA devices)."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not _launched_by_torchrun():
            return None
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_leave_process_group)
    if dist.get_world_size() < 2:
        return None
    return DataParallel(dist.get_rank(), dist.get_world_size())
