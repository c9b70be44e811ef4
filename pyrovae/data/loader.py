"""Minibatches of a :class:`~pyrovae.data.perturbation_data.PerturbationData` split as torch tensors.

Sparse (or on-disk) count matrices are densified one minibatch at a time, never as a whole.

Block sampling (``block_size``; the default for a backed, on-disk matrix): instead of one scattered read
per cell, an epoch reads the split in contiguous blocks of ``block_size`` cells (one slice of the file
each) in a seeded random order, pools ``buffer_blocks`` of them, shuffles the cells of the pool and cuts it
into minibatches; the cells left over (fewer than a batch) join the next pool. Every cell still appears
exactly once per epoch, and by the symmetry of the block order every cell is equally likely to land in
any minibatch, so the minibatch ELBO stays an unbiased estimate; cells of one block share a batch more
often than under a full shuffle (files sorted by perturbation give less varied batches: raise
``buffer_blocks``). Memory: O(block_size * buffer_blocks) rows beyond the matrix handle.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from pyrovae.data.matrix import to_dense
from pyrovae.data.perturbation_data import PerturbationData

Batch = dict[str, torch.Tensor]


class MinibatchLoader:
    """Iterate over the cells of one split in minibatches.

    Each batch is a dict of tensors:
        ``x`` (B, G) counts, ``d`` (B, T) dosage, ``library_size`` (B,), ``idx`` (B,) positions of the
        cells *within the split* (the subsample indices of the ``cells`` plate), ``rows`` (B,) positions in
        the full data, and every entry of ``data.extras`` (B, ...).

    Args:
        data: the validated data.
        split: ``"train"``, ``"val"``, ``"test"``, or ``None`` for all cells with a split.
        batch_size: cells per batch.
        shuffle: reshuffle every epoch with a generator seeded by ``seed`` (epoch e uses ``seed + e``).
        drop_last: drop a last incomplete batch.
        device: torch device of the tensors (each batch is copied there once; from pinned memory on CUDA).
        indices: explicit row positions (overrides ``split``).
        block_size: shuffle by blocks of this many consecutive cells (see module docstring); ``"auto"``
            (default): 1024 when the matrix is on disk (backed) and ``shuffle`` is on, else off;
            ``None``: off (a full permutation, one scattered read per cell for backed data).
        buffer_blocks: blocks pooled and shuffled together.
        shard: ``(rank, world_size)`` of a data-parallel run (:mod:`pyrovae.train.distributed`): every epoch
            is cut into global minibatches of ``world_size * batch_size`` cells (the same on every rank) and
            this rank gets the ``rank``-th of their ``world_size`` near-equal slices. ``n_cells`` and ``idx``
            stay those of the whole split. A last global batch with fewer cells than ranks is dropped.
    """

    def __init__(
        self,
        data: PerturbationData,
        split: str | None = "train",
        batch_size: int = 512,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        indices: np.ndarray | None = None,
        block_size: int | str | None = "auto",
        buffer_blocks: int = 16,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.data = data
        self.rows = np.asarray(indices) if indices is not None else data.indices(split)
        if len(self.rows) == 0:
            raise ValueError(f"the {split!r} split has no cells; check the split column or fractions")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if block_size == "auto":
            block_size = 1024 if shuffle and is_backed(data.counts) else None
        if block_size is not None and (isinstance(block_size, str) or int(block_size) < 1):
            raise ValueError(f"block_size must be a positive integer, 'auto' or None, got {block_size!r}")
        if int(buffer_blocks) < 1:
            raise ValueError(f"buffer_blocks must be >= 1, got {buffer_blocks}")
        if shard is not None and not (0 <= int(shard[0]) < int(shard[1])):
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
        self.shard = None if shard is None else (int(shard[0]), int(shard[1]))
        self.block_size = None if block_size is None else int(block_size)
        self.buffer_blocks = int(buffer_blocks)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.epoch = 0

    @property
    def n_cells(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        world = 1 if self.shard is None else self.shard[1]
        size = self.batch_size * world
        n, rest = divmod(self.n_cells, size)
        return n if self.drop_last or rest < world else n + 1

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.ascontiguousarray(a))
        if self.device.type == "cuda":  # one asynchronous copy from page-locked memory per batch
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def batch(self, pos: np.ndarray, x: np.ndarray | None = None) -> Batch:
        """The batch of split positions ``pos`` (int array); ``x``: its counts if already read."""
        rows = self.rows[pos]
        d = self.data
        x = d.rows(rows) if x is None else x
        out = {
            "x": self._tensor(x),
            "d": self._tensor(d.dosage_rows(rows)),  # D stays sparse; densified per minibatch
            "library_size": self._tensor(d.library_size[rows]),
            "idx": self._tensor(pos.astype(np.int64)),
            "rows": self._tensor(rows.astype(np.int64)),
        }
        for k, v in d.extras.items():  # an extra made from the counts reuses the batch's (data.extras)
            part = v.batch_rows(rows, x) if hasattr(v, "batch_rows") else v[rows]
            out[k] = self._tensor(np.asarray(part, dtype=np.float32))
        return out

    def __iter__(self) -> Iterator[Batch]:
        rank, world = (0, 1) if self.shard is None else self.shard
        size = self.batch_size * world
        blocks = self.shuffle and self.block_size is not None
        for pos, x in self._iter_blocks(size) if blocks else self._iter_permutation(size):
            if world > 1:
                if len(pos) < world:
                    break
                sel = np.array_split(np.arange(len(pos)), world)[rank]
                pos, x = pos[sel], None if x is None else x[sel]
            yield self.batch(pos, None if x is None else to_dense(x, np.float32))

    def _iter_permutation(self, size: int) -> Iterator[tuple[np.ndarray, None]]:
        order = np.arange(self.n_cells)
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(self.n_cells)
            self.epoch += 1
        for start in range(0, self.n_cells, size):
            pos = order[start : start + size]
            if self.drop_last and len(pos) < size:
                break
            yield pos, None

    def _iter_blocks(self, size: int) -> Iterator[tuple[np.ndarray, object]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        self.epoch += 1
        starts = rng.permutation(np.arange(0, self.n_cells, self.block_size))
        pos_left, x_left = np.empty(0, dtype=np.int64), None
        for b in range(0, len(starts), self.buffer_blocks):
            pos = [
                np.arange(s, min(s + self.block_size, self.n_cells))
                for s in starts[b : b + self.buffer_blocks]
            ]
            xs = [read_rows(self.data.counts, self.rows[p]) for p in pos]
            pos_pool = np.concatenate([pos_left, *pos])
            x_pool = _stack(([] if x_left is None else [x_left]) + xs)
            perm = rng.permutation(len(pos_pool))
            last = b + self.buffer_blocks >= len(starts)
            n_full = len(perm) if last else len(perm) - len(perm) % size
            for s in range(0, n_full, size):
                sel = perm[s : s + size]
                if self.drop_last and len(sel) < size:
                    break
                yield pos_pool[sel], x_pool[sel]
            pos_left, x_left = pos_pool[perm[n_full:]], x_pool[perm[n_full:]]


def is_backed(m) -> bool:
    """Whether a count matrix is an on-disk (backed) dataset rather than an in-memory array."""
    return not (isinstance(m, np.ndarray) or sp.issparse(m))


def read_rows(m, rows: np.ndarray):
    """Rows ``rows`` (increasing) of a matrix, kept sparse if it is (CSR) or as an array. An on-disk matrix
    is read as ONE contiguous slice from the first to the last row, then subset in memory."""
    rows = np.asarray(rows)
    if not is_backed(m):
        return m[rows]
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    part = m[lo:hi]
    return part[rows - lo] if sp.issparse(part) else np.asarray(part)[rows - lo]


def _stack(parts: list):
    return sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)
