"""Rows and columns of a maybe-sparse count matrix, densified: one helper for dense, CSR and backed data.

A matrix here is a NumPy array, a SciPy sparse matrix, or an AnnData backed (on-disk, h5py) dataset, which
wants sorted, unique row indices. Callers choose the dtype: float32 for model input, float64 for
statistics. The last section reads the per-cell annotations (labels, splits) that go with such a matrix as
plain string arrays, and derives per-group seeds (pairing and counterfactuals, :mod:`pyrovae.data.pairing`,
:mod:`pyrovae.data.qc`).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp


def to_dense(block: Any, dtype: Any = np.float64, copy: bool = False) -> np.ndarray:
    """A dense ``dtype`` array of a dense or SciPy-sparse block (always a new array with ``copy``)."""
    if sp.issparse(block):
        block = block.toarray()
    return np.array(block, dtype=dtype) if copy else np.asarray(block, dtype=dtype)


def select_rows(m: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of ``m`` without densifying a sparse matrix (CSR stays CSR); backed data are read as
    :func:`dense_rows` (float32)."""
    idx = np.asarray(idx)
    if isinstance(m, np.ndarray) or sp.issparse(m):
        return m[idx]
    return dense_rows(m, idx)


def dense_rows(m: Any, idx: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Dense (len(idx), n_cols) ``dtype`` rows ``idx`` (any order, repeats allowed) of a dense, sparse or
    backed matrix."""
    idx = np.asarray(idx)
    if isinstance(m, np.ndarray) or sp.issparse(m):
        block = m[idx]
    else:  # backed datasets want sorted, unique indices
        order = np.argsort(idx, kind="stable")
        uniq, inv = np.unique(idx[order], return_inverse=True)
        part = to_dense(m[uniq], dtype)
        block = np.empty((len(idx), part.shape[1]), dtype=dtype)
        block[order] = part[inv]
    return to_dense(block, dtype)


def normalize_log(
    counts: Any,
    target_sum: float | None = None,
    cols: np.ndarray | None = None,
    base: str = "e",
    totals: np.ndarray | None = None,
) -> np.ndarray:
    """The per-cell normalise-and-log transform: log(1 + target_sum x / total), dense (N, len(cols)) float64.

    ``total`` is each cell's count over *all* genes, whichever ``cols`` (default: every column) are
    returned; cells with no counts stay 0. ``target_sum`` ``None``: the median total of the cells with any
    count (scanpy's ``normalize_total``). ``base``: ``"e"`` (``log1p``; the OT pairing features and ΔX,
    :func:`pyrovae.data.pairing.log_normalize`) or ``"2"`` (the perturbseq ATE transform,
    :func:`pyrovae.evaluate.empirical.perturbseq_transform`).
    """
    if base not in ("e", "2"):
        raise ValueError(f"base must be 'e' or '2', got {base!r}")
    counts = as_indexable(counts)
    lib = library_sizes(counts) if totals is None else np.asarray(totals, dtype=np.float64).reshape(-1)
    if target_sum is None:
        positive = lib[lib > 0]
        target_sum = float(np.median(positive)) if positive.size else 1.0
    x = dense_cols(counts, cols)
    x *= np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)[:, None]
    if base == "e":
        return np.log1p(x, out=x)
    return np.log2(np.add(x, 1.0, out=x), out=x)


def nonzero_counts(m: Any, axis: int) -> np.ndarray:
    """(n_cols,) for ``axis=0`` or (n_rows,) for ``axis=1``: the number of non-zero entries of each column or
    row of a dense or SciPy-sparse matrix (a sparse one is not densified)."""
    if sp.issparse(m):
        return np.asarray((m != 0).sum(axis)).reshape(-1)
    return (np.asarray(m) != 0).sum(axis)


def dense_cols(m: Any, cols: np.ndarray | None = None, dtype: Any = np.float64) -> np.ndarray:
    """Dense (n_rows, len(cols)) ``dtype`` copy of the columns ``cols`` (every column when None) of a dense
    or sparse matrix; always a new array, so callers may modify it in place."""
    return to_dense(m if cols is None else m[:, cols], dtype, copy=True)


def column_sums(m: Any, chunk: int = 8192) -> np.ndarray:
    """(n_cols,) float64 total of each column of a dense, sparse or backed matrix (backed: read in chunks of
    ``chunk`` rows, never whole)."""
    if isinstance(m, np.ndarray) or sp.issparse(m):
        return np.asarray(m.sum(axis=0), dtype=np.float64).ravel()
    total = np.zeros(m.shape[1], dtype=np.float64)
    for start in range(0, m.shape[0], chunk):
        total += to_dense(m[start : start + chunk]).sum(0)
    return total


def as_indexable(counts: Any) -> Any:
    """Sparse input in a row/column-indexable format (COO etc. -> CSR); dense input as an array."""
    if sp.issparse(counts):
        return counts if counts.format in ("csr", "csc") else counts.tocsr()
    return np.asarray(counts)


def matrix_shape(counts: Any) -> tuple[int, int]:
    """(n_cells, n_genes) of a 2-D matrix; an error for any other shape."""
    if len(counts.shape) != 2:  # also an on-disk (backed) matrix, which may lack ndim
        raise ValueError(f"counts must be a 2-D (cells, genes) matrix, got shape {counts.shape}")
    return int(counts.shape[0]), int(counts.shape[1])


def library_sizes(counts: Any) -> np.ndarray:
    """(n_cells,) float64 total counts per cell over all genes (no densification)."""
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def used_split_mask(splits: Any, n: int) -> np.ndarray:
    """(n,) True for cells with a real split value; ``""``, whitespace, None and NaN mean 'unused'."""
    arr = np.asarray(splits, dtype=object).ravel()
    if arr.shape != (n,):
        raise ValueError(f"splits must have one entry per cell ({n}), got shape {arr.shape}")
    missing = pd.isna(pd.Series(arr)).to_numpy()
    blank = np.array([isinstance(v, str) and v.strip() == "" for v in arr], dtype=bool)
    return ~(missing | blank)


def split_strings(splits: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(split names as str, used mask); all cells in one split ``"all"`` when ``splits`` is None."""
    if splits is None:
        return np.full(n, "all", dtype=object), np.ones(n, dtype=bool)
    used = used_split_mask(splits, n)
    arr = np.asarray(splits, dtype=object).ravel()
    names = np.array([str(v) if u else "" for v, u in zip(arr, used)], dtype=object)
    return names, used


def label_strings(labels: Any, n: int) -> np.ndarray:
    """(n,) object array of the labels as str; an error unless there is one label per cell."""
    arr = np.asarray(labels, dtype=object).ravel()
    if arr.shape != (n,):
        raise ValueError(f"labels must have one entry per cell ({n}), got shape {arr.shape}")
    return np.array([str(v) for v in arr], dtype=object)


def group_seed(seed: int, *keys: str | int) -> int:
    """A seed for one group that depends only on ``seed`` and the group's own keys (stable across runs
    and independent of which other groups exist)."""
    words = [int(seed) & 0xFFFFFFFF]
    for k in keys:
        words.append(zlib.crc32(str(k).encode("utf-8")))
    return int(np.random.SeedSequence(words).generate_state(1)[0])
