"""Minibatches of a :class:`~pyrovae.data.anndata.PerturbationData` split as torch tensors.

Sparse (or on-disk) count matrices are densified one minibatch at a time, never as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pyrovae.data.anndata import PerturbationData

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
    ) -> None:
        self.data = data
        self.rows = np.asarray(indices) if indices is not None else data.indices(split)
        if len(self.rows) == 0:
            raise ValueError(f"the {split!r} split has no cells; check the split column or fractions")
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
        n = self.n_cells // self.batch_size
        return n if self.drop_last or self.n_cells % self.batch_size == 0 else n + 1

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.ascontiguousarray(a))
        if self.device.type == "cuda":  # one asynchronous copy from page-locked memory per batch
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def batch(self, pos: np.ndarray) -> Batch:
        """The batch of split positions ``pos`` (int array)."""
        rows = self.rows[pos]
        d = self.data
        out = {
            "x": self._tensor(d.rows(rows)),
            "d": self._tensor(d.dosage[rows]),
            "library_size": self._tensor(d.library_size[rows]),
            "idx": self._tensor(pos.astype(np.int64)),
            "rows": self._tensor(rows.astype(np.int64)),
        }
        for k, v in d.extras.items():
            out[k] = self._tensor(np.asarray(v[rows], dtype=np.float32))
        return out

    def __iter__(self) -> Iterator[Batch]:
        order = np.arange(self.n_cells)
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(self.n_cells)
            self.epoch += 1
        for start in range(0, self.n_cells, self.batch_size):
            pos = order[start : start + self.batch_size]
            if self.drop_last and len(pos) < self.batch_size:
                break
            yield self.batch(pos)
