"""Rows and columns of a maybe-sparse count matrix, densified: one helper for dense, CSR and backed data.

A matrix here is a NumPy array, a SciPy sparse matrix, or an AnnData backed (on-disk, h5py) dataset, which
wants sorted, unique row indices. Callers choose the dtype: float32 for model input, float64 for
statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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
