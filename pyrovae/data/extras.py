"""Per-cell model inputs in O(batch) memory: GPO-VAE's and CRADLE-VAE's prepared targets, built per minibatch.

A :class:`~pyrovae.data.perturbation_data.PerturbationData`'s ``extras`` hold per-cell arrays that
every minibatch carries (:class:`~pyrovae.data.loader.MinibatchLoader` indexes them with the batch's
rows). Two of them used to be dense ``(N, G)`` / ``(N, T)`` arrays although they carry far less information:

================= ======================= ========================================================
extra             stored as               memory
================= ======================= ========================================================
``cfx``           :class:`GroupRows`      the (K, G) counterfactual medians (CSR) + (N,) group code
``delta_x_group`` :class:`GroupRows`      the (K, T) group means + (N,) group code
``delta_x``       :class:`PairedDelta`    (N,) matched control + (N,) library size; rows computed
                                          from the counts (in memory, sparse or backed) on demand
================= ======================= ========================================================

(K: the number of (split, label[, QC status]) groups.) At 2 M cells x 8,000 genes the dense ``cfx`` alone
was 64 GB; now it is the medians of the groups (at most two per label and split) plus 16 MB of codes.

Both classes behave like read-only arrays where the library uses them: ``shape``, ``ndim``, ``dtype``,
``len``, indexing by an integer, a slice, integer positions or a boolean mask (optionally followed by a
column index: ``a[rows, cols]``), always returning a new dense float32 ``numpy`` array; and
``numpy.asarray(a)`` materialises the whole (N, C) array (for small data and tests only; library code
indexes rows, or streams with :func:`iter_row_blocks`). The numbers are those of the former dense arrays:
``tests/data/test_extras.py`` compares both paths on the same data and seeds.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from pyrovae.data.matrix import dense_rows, matrix_shape, to_dense

__all__ = [
    "GroupRows",
    "PairedDelta",
    "iter_row_blocks",
    "row_totals",
    "median_positive",
    "normalized_rows",
    "normalize_block",
]

#: rows per block when a whole extra or a whole matrix is streamed.
BLOCK_ROWS = 8192


class _RowArray(abc.ABC):
    """Array-like of shape (N, C) whose rows are made on demand by ``_rows(positions)`` (an abstract base:
    :class:`GroupRows`, :class:`PairedDelta`)."""

    shape: tuple[int, int]
    dtype = np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    @abc.abstractmethod
    def _rows(self, pos: np.ndarray) -> np.ndarray:  # (len(pos), C) float32
        """The rows at positions ``pos``."""

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        n = self.shape[0]
        scalar = isinstance(key, (int, np.integer))
        if scalar:
            pos = np.array([int(key) + n if int(key) < 0 else int(key)])
            if not 0 <= pos[0] < n:
                raise IndexError(f"row {key} out of range for {n} rows")
        elif isinstance(key, slice):
            pos = np.arange(n)[key]
        else:
            pos = np.asarray(key)
            if pos.dtype == bool:
                if pos.shape != (n,):
                    raise IndexError(f"boolean row mask must have length {n}, got shape {pos.shape}")
                pos = np.flatnonzero(pos)
            else:
                pos = pos.astype(np.int64).reshape(-1)
                pos = np.where(pos < 0, pos + n, pos)
                if pos.size and (pos.min() < 0 or pos.max() >= n):
                    raise IndexError(f"row positions out of range for {n} rows")
        out = self._rows(pos)
        if scalar:
            out = out[0]
        return out[(slice(None),) * (not scalar) + rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = (
            np.concatenate([b for _, b in iter_row_blocks(self)])
            if self.shape[0]
            else self._rows(np.arange(0))
        )
        return out if dtype is None else out.astype(dtype, copy=False)

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held (not the (N, C) array it stands for)."""


class GroupRows(_RowArray):
    """(N, C) rows that take few distinct values: row i is ``table[codes[i]]``, zeros where ``codes[i] < 0``.

    Args:
        table: (K, C) the distinct rows, dense or SciPy sparse (kept CSR).
        codes: (N,) int, the table row of each cell, -1 for an all-zero row.
    """

    def __init__(self, table: Any, codes: np.ndarray) -> None:
        self.table = (
            sp.csr_matrix(table, dtype=np.float32) if sp.issparse(table) else np.asarray(table, np.float32)
        )
        self.codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        if self.table.ndim != 2 or (self.codes.size and self.codes.max() >= self.table.shape[0]):
            raise ValueError("codes must index the rows of a 2-D table (or be -1)")
        self.shape = (self.codes.size, int(self.table.shape[1]))

    def _rows(self, pos: np.ndarray) -> np.ndarray:
        c = self.codes[pos]
        out = np.zeros((len(pos), self.shape[1]), dtype=np.float32)
        has = c >= 0
        if has.any():
            out[has] = to_dense(self.table[c[has]], np.float32)
        return out

    @property
    def nbytes(self) -> int:
        t = self.table
        held = t.data.nbytes + t.indices.nbytes + t.indptr.nbytes if sp.issparse(t) else t.nbytes
        return int(held + self.codes.nbytes)

    def __repr__(self) -> str:
        return f"GroupRows({self.shape[0]} x {self.shape[1]}, {self.table.shape[0]} distinct rows)"


class PairedDelta(_RowArray):
    """(N, C) ``|y_i - y_m(i)|``: log-normalised expression of a cell minus that of its matched control.

    ``y = log1p(target_sum * counts[:, cols] / totals)`` (0 for cells with no counts), as
    :func:`pyrovae.data.pairing.log_normalize`; rows with ``matched == -1`` are 0; float32 of the float64
    difference, NaN as 0. Each requested row reads its own counts and its control's (one read of the
    sorted union: in memory, sparse or on disk), so memory is O(rows x G), never O(N x C).

    Args:
        counts: (N, G) counts: dense, CSR, or a backed (on-disk) matrix.
        matched: (N,) row position of each cell's matched control, -1 for none.
        cols: (C,) gene positions of the columns.
        totals: (N,) each cell's total count over ALL genes (:func:`row_totals`).
        target_sum: the common total (:func:`pyrovae.data.pairing.log_normalize`'s default: the median of
            the positive totals).
    """

    def __init__(
        self, counts: Any, matched: np.ndarray, cols: np.ndarray, totals: np.ndarray, target_sum: float
    ) -> None:
        self.counts = counts
        self.matched = np.asarray(matched, dtype=np.int64).reshape(-1)
        self.cols = np.asarray(cols, dtype=np.int64).reshape(-1)
        self.totals = np.asarray(totals, dtype=np.float64).reshape(-1)
        self.target_sum = float(target_sum)
        self.shape = (self.matched.size, self.cols.size)

    def signed(self, pos: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        """(len(pos), C) float64 ``y_i - y_m(i)`` (0 for unmatched rows); ``x``: the (len(pos), G) counts
        of the rows ``pos`` if already read (a minibatch's), so only the matched controls are read."""
        pos = np.asarray(pos, dtype=np.int64)
        m = self.matched[pos]
        has = m >= 0
        out = np.zeros((len(pos), self.shape[1]), dtype=np.float64)
        if not has.any():
            return out
        if x is None:
            need = np.concatenate([pos[has], m[has]])
            uniq, inv = np.unique(need, return_inverse=True)
            y = normalized_rows(self.counts, uniq, self.cols, self.totals, self.target_sum)
            k = int(has.sum())
            out[has] = y[inv[:k]] - y[inv[k:]]
            return out
        own = normalize_block(np.asarray(x)[has][:, self.cols], self.totals[pos[has]], self.target_sum)
        uniq, inv = np.unique(m[has], return_inverse=True)
        ctrl = normalized_rows(self.counts, uniq, self.cols, self.totals, self.target_sum)
        out[has] = own - ctrl[inv]
        return out

    def _rows(self, pos: np.ndarray) -> np.ndarray:
        return np.nan_to_num(np.abs(self.signed(pos)).astype(np.float32), nan=0.0)

    def batch_rows(self, pos: np.ndarray, x: np.ndarray) -> np.ndarray:
        """:meth:`__getitem__` of rows ``pos`` whose (len(pos), G) counts ``x`` were read already
        (:class:`~pyrovae.data.loader.MinibatchLoader` passes the batch's): the same numbers, one read
        of the matched controls only."""
        return np.nan_to_num(np.abs(self.signed(pos, x)).astype(np.float32), nan=0.0)

    @property
    def nbytes(self) -> int:
        return int(self.matched.nbytes + self.cols.nbytes + self.totals.nbytes)

    def __repr__(self) -> str:
        return f"PairedDelta({self.shape[0]} x {self.shape[1]}, computed per row from the counts)"


def iter_row_blocks(
    a: Any, rows: np.ndarray | None = None, block: int = BLOCK_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(positions, a[positions])`` for consecutive blocks of ``rows`` (default: every row) of an array or
    a :class:`GroupRows` / :class:`PairedDelta`: stream an extra without materialising it."""
    rows = np.arange(len(a)) if rows is None else np.asarray(rows)
    for s in range(0, len(rows), block):
        pos = rows[s : s + block]
        yield pos, (a._rows(pos) if isinstance(a, _RowArray) else np.asarray(a[pos]))


def row_totals(counts: Any, block: int = BLOCK_ROWS) -> np.ndarray:
    """(N,) float64 total count of each row over all columns: in memory as
    :func:`pyrovae.data.matrix.library_sizes`, on disk in blocks of ``block`` rows."""
    if isinstance(counts, np.ndarray) or sp.issparse(counts):
        return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    n = counts.shape[0]
    out = np.empty(n, dtype=np.float64)
    for s in range(0, n, block):
        e = min(s + block, n)
        out[s:e] = np.asarray(counts[s:e].sum(axis=1), dtype=np.float64).ravel()
    return out


def median_positive(totals: np.ndarray) -> float:
    """The default normalisation target: the median of the positive totals (1 when none is positive)."""
    positive = totals[totals > 0]
    return float(np.median(positive)) if positive.size else 1.0


#: rows read at a time by :func:`normalized_rows` from a matrix on disk (half :data:`BLOCK_ROWS`: each row is
#: densified over every gene, twice, before its columns are kept)
NORMALIZE_BLOCK = BLOCK_ROWS // 2


def normalized_rows(
    counts: Any, rows: np.ndarray, cols: np.ndarray | None, totals: np.ndarray, target_sum: float
) -> np.ndarray:
    """(len(rows), len(cols)) float64 ``log1p(target_sum * counts[rows, cols] / totals[rows])`` (0 for empty
    rows): :func:`pyrovae.data.matrix.normalize_log` (base e) of some rows only, the same numbers."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(counts, np.ndarray) or sp.issparse(counts):
        part = counts[rows]
        x = part if cols is None else part[:, cols]
        return normalize_block(x, totals[rows], target_sum)
    # on disk: read, densify and keep the columns block by block, so that the dense all-gene rows are never
    # held for more than NORMALIZE_BLOCK rows (a split's controls at 1 M cells: 80,000 x 2,000 float64
    # twice over, 2.6 GB, before the columns were kept)
    n_genes = matrix_shape(counts)[1]
    cols = None if cols is None else np.arange(n_genes)[cols]  # positions, from positions or a mask
    out = np.empty((len(rows), n_genes if cols is None else len(cols)), dtype=np.float64)
    for start in range(0, len(rows), NORMALIZE_BLOCK):
        part = rows[start : start + NORMALIZE_BLOCK]
        x = dense_rows(counts, part, np.float64)
        out[start : start + len(part)] = normalize_block(
            x if cols is None else x[:, cols], totals[part], target_sum
        )
    return out


def normalize_block(x: Any, lib: np.ndarray, target_sum: float) -> np.ndarray:
    """(n, c) float64 ``log1p(target_sum * x / lib)`` of a block of counts ``x`` (dense or sparse) with the
    rows' totals ``lib`` (n,) (rows with ``lib == 0``: 0); a new array."""
    x = to_dense(x, np.float64, copy=True)
    lib = np.asarray(lib, dtype=np.float64)
    x *= np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)[:, None]
    return np.log1p(x, out=x)
