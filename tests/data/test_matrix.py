"""data/matrix: densified rows and columns of dense, CSR and backed matrices."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from pyrovae.data.matrix import dense_cols, dense_rows, nonzero_counts, select_rows, to_dense


def _matrices(tmp_path):
    x = np.random.default_rng(0).poisson(2.0, size=(12, 5)).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(x))
    a.write_h5ad(tmp_path / "m.h5ad")
    backed = ad.read_h5ad(tmp_path / "m.h5ad", backed="r")
    return x, {"dense": x, "csr": sp.csr_matrix(x), "backed": backed.X}


def test_dense_rows_any_order_with_repeats(tmp_path):
    x, ms = _matrices(tmp_path)
    idx = np.array([7, 2, 2, 11, 0])
    for name, m in ms.items():
        for dtype in (np.float32, np.float64):
            block = dense_rows(m, idx, dtype)
            assert block.dtype == dtype and isinstance(block, np.ndarray), name
            np.testing.assert_array_equal(block, x[idx].astype(dtype))


def test_select_rows_keeps_csr_sparse(tmp_path):
    x, ms = _matrices(tmp_path)
    idx = np.array([3, 1])
    assert sp.issparse(select_rows(ms["csr"], idx))
    for m in ms.values():
        np.testing.assert_array_equal(to_dense(select_rows(m, idx)), x[idx])


def test_dense_cols_is_a_copy_and_to_dense_converts():
    x = np.arange(12.0).reshape(3, 4)
    for m in (x, sp.csr_matrix(x)):
        c = dense_cols(m, np.array([2, 0]))
        np.testing.assert_array_equal(c, x[:, [2, 0]])
        full = dense_cols(m)
        full += 1  # a copy: the input is untouched
        np.testing.assert_array_equal(x, np.arange(12.0).reshape(3, 4))
    assert to_dense(x) is x  # no copy unless asked
    assert to_dense(x, copy=True) is not x and to_dense(sp.csr_matrix(x), np.float32).dtype == np.float32


def test_nonzero_counts_of_dense_and_sparse_matrices():
    x = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 4.0]], dtype=np.float32)
    for m in (x, sp.csr_matrix(x)):
        np.testing.assert_array_equal(nonzero_counts(m, 0), [1, 2, 1])
        np.testing.assert_array_equal(nonzero_counts(m, 1), [1, 1, 2])
