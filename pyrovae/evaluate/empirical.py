"""Empirical average treatment effects (ATE) and the per-cell transform they are computed on.

Pure numpy/scipy/pandas (no torch). Definitions follow the SAMS-VAE and GPO-VAE reference code
(documentation: ``docs/evaluation.md``):

- transform g ("perturbseq"): g(x) = log2(target_sum * x / sum_j x_j + 1) per cell; ("mean"): g(x) = x;
- empirical ATE of label a: mean_{cells labelled a} g(x) - mean_{control cells} g(x).

Which cells enter the empirical ATE is the caller's choice: pass only held-out cells to get a held-out
reference (the original code used every cell, training cells included, so its reference was not held out).
Counts are read ``batch_size`` rows at a time (:func:`label_sums`), so at most (batch_size, G) is dense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.data.matrix import normalize_log, to_dense
from pyrovae.data.perturbation_data import PerturbationData

__all__ = [
    "TRANSFORMS",
    "check_labels",
    "check_transform",
    "data_totals",
    "empirical_ate",
    "gene_columns",
    "label_means",
    "label_sums",
    "no_control_error",
    "perturbseq_transform",
]

TRANSFORMS = ("perturbseq", "mean")


def data_totals(data: PerturbationData, rows: np.ndarray) -> np.ndarray | None:
    """(len(rows),) the per-cell totals of the perturbseq transform for ``data``'s cells ``rows``: its size
    factors when it was read with one (``size_factor_key``), else ``None`` (the row sums)."""
    return None if data.size_factor_key is None else np.asarray(data.library_size)[rows]


def check_transform(transform: str) -> str:
    """``transform`` when it is one of :data:`TRANSFORMS`, else one clear ``ValueError``."""
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; use one of {TRANSFORMS}")
    return transform


def perturbseq_transform(
    x: np.ndarray | sp.spmatrix, target_sum: float = 1e4, totals: np.ndarray | None = None
) -> np.ndarray:
    """Per-cell normalise-and-log transform g(x) = log2(target_sum * x / l + 1), l = sum_j x_j.

    Args:
        x: (N, G) counts, dense array or scipy sparse matrix.
        target_sum: the per-cell total counts are rescaled to this value before the log.
        totals: (N,) per-cell l to use instead of the row sums (size factors).

    Returns:
        (N, G) float64 dense array. Rows whose total is 0 map to zeros (never NaN).
    """
    x = sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (cells, genes), got shape {x.shape}")
    return normalize_log(x, target_sum, base="2", totals=totals)


def _apply(block: Any, transform: str, target_sum: float, totals: np.ndarray | None = None) -> np.ndarray:
    if transform == "perturbseq":
        return perturbseq_transform(block, target_sum, totals)
    return to_dense(block)


def label_sums(
    get_rows: Callable[[int, int], Any],
    n_cells: int,
    n_genes: int,
    label_codes: np.ndarray,
    n_labels: int,
    transform: str,
    target_sum: float,
    batch_size: int,
    totals: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of g(x) per label code and cell count per code, processing ``batch_size`` rows at a time.

    ``label_codes``: (N,) int in [-1, n_labels); rows with code -1 are skipped. ``totals``: (N,) per-cell
    totals of the perturbseq transform (size factors; default the row sums).
    Returns ((n_labels, G) float64 sums, (n_labels,) int64 counts).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sums = np.zeros((n_labels, n_genes), dtype=np.float64)
    counts = np.bincount(label_codes[label_codes >= 0], minlength=n_labels).astype(np.int64)
    for start in range(0, n_cells, batch_size):
        stop = min(start + batch_size, n_cells)
        codes = label_codes[start:stop]
        keep = codes >= 0
        if not keep.any():
            continue
        g = _apply(
            get_rows(start, stop), transform, target_sum, None if totals is None else totals[start:stop]
        )
        if g.shape != (stop - start, n_genes):
            raise ValueError(f"row block has shape {g.shape}, expected {(stop - start, n_genes)}")
        onehot = sp.csr_matrix(
            (np.ones(int(keep.sum())), (codes[keep], np.flatnonzero(keep))), shape=(n_labels, stop - start)
        )
        sums += onehot @ g
    return sums, counts


def check_labels(labels: Any, n_cells: int) -> np.ndarray:
    """(N,) str labels, refusing a length other than the matrix's ``n_cells`` rows."""
    labels = np.asarray(labels).astype(str).reshape(-1)
    if len(labels) != n_cells:
        raise ValueError(f"labels has {len(labels)} entries but x has {n_cells} rows")
    return labels


def no_control_error(control_label: str, labels: np.ndarray, where: str = "labels") -> ValueError:
    """The error for ``labels`` without a control cell: it names the labels seen and the fix."""
    seen = sorted(set(labels.tolist()))
    shown = ", ".join(repr(s) for s in seen[:8]) + (", ..." if len(seen) > 8 else "")
    return ValueError(
        f"no control cells labelled {control_label!r} in {where} (labels seen: {shown}); "
        f"pass control_label=<the label of the unperturbed cells>"
    )


def gene_columns(genes: Sequence[str] | None, n_genes: int) -> pd.Index:
    """The column index of an ATE table: the gene names (checked against ``n_genes``), or 0..G-1."""
    if genes is None:
        return pd.RangeIndex(n_genes)
    genes = [str(g) for g in genes]
    if len(genes) != n_genes:
        raise ValueError(f"genes has {len(genes)} names but x has {n_genes} columns")
    return pd.Index(genes)


def _group_means(
    x: Any,
    labels: np.ndarray,
    wanted: Sequence[str],
    transform: str,
    target_sum: float,
    batch_size: int,
    totals: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """((len(wanted), G) sums of g(x), (len(wanted),) counts) for the labels in ``wanted``."""
    code_of = {lab: i for i, lab in enumerate(wanted)}
    codes = np.fromiter((code_of.get(lab, -1) for lab in labels), dtype=np.int64, count=len(labels))
    if sp.issparse(x) and not isinstance(x, sp.csr_matrix | sp.csr_array):
        x = sp.csr_matrix(x)
    return label_sums(
        lambda a, b: x[a:b],
        int(x.shape[0]),
        int(x.shape[1]),
        codes,
        len(wanted),
        transform,
        target_sum,
        batch_size,
        totals,
    )


# -------------------------------------------------------------------------------------- empirical


def empirical_ate(
    x: np.ndarray | sp.spmatrix,
    labels: Sequence[str] | np.ndarray,
    control_label: str,
    groups: Sequence[str] | None = None,
    transform: str = "perturbseq",
    batch_size: int = 4096,
    *,
    genes: Sequence[str] | None = None,
    target_sum: float = 1e4,
    totals: np.ndarray | None = None,
) -> pd.DataFrame:
    """Empirical ATE of every perturbation label versus the control cells.

    ATE[a, :] = mean over cells labelled a of g(x) - mean over control cells of g(x).

    Args:
        x: (N, G) counts (dense or scipy sparse). Sparse input is processed ``batch_size`` rows at a time,
            so at most (batch_size, G) is ever dense.
        labels: (N,) perturbation label of each cell.
        control_label: label of the control (unperturbed) cells.
        groups: labels to report, in this order. Default: every non-control label, sorted.
        transform: ``"perturbseq"`` (g = log2(target_sum * x / row total + 1)) or ``"mean"`` (g = x).
        batch_size: rows per batch.
        genes: optional G gene names for the columns (default: positions 0..G-1).
        target_sum: the perturbseq scale (1e4 in the reference).
        totals: (N,) per-cell totals of the perturbseq transform (size factors; default the row sums).

    Returns:
        DataFrame (len(groups), G), index = labels (name ``"perturbation"``), columns = genes.

    Raises:
        ValueError: no control cells; a requested group has no cells; shape mismatches.
    """
    transform = check_transform(transform)
    if getattr(x, "ndim", 2) != 2:
        raise ValueError(f"x must be 2-D (cells, genes), got shape {x.shape}")
    n_cells, n_genes = int(x.shape[0]), int(x.shape[1])
    labels = check_labels(labels, n_cells)
    cols = gene_columns(genes, n_genes)
    control_label = str(control_label)
    present = set(labels.tolist())
    if control_label not in present:
        raise no_control_error(control_label, labels)
    if groups is None:
        groups = sorted(present - {control_label})
    else:
        groups = [str(g) for g in groups]
        missing = [g for g in groups if g not in present]
        if missing:
            raise ValueError(f"requested group(s) {missing} have no cells in labels")
    wanted = list(dict.fromkeys([control_label, *groups]))
    if totals is not None:
        totals = np.asarray(totals, dtype=np.float64).reshape(-1)
        if len(totals) != n_cells:
            raise ValueError(f"totals has {len(totals)} entries but x has {n_cells} rows")
    sums, counts = _group_means(x, labels, wanted, transform, target_sum, batch_size, totals)
    means = sums / counts[:, None]
    pos = {lab: i for i, lab in enumerate(wanted)}
    ate = means[[pos[g] for g in groups]] - means[pos[control_label]]
    return pd.DataFrame(ate, index=pd.Index(groups, name="perturbation"), columns=cols)


def label_means(
    x: np.ndarray | sp.spmatrix,
    labels: Sequence[str] | np.ndarray,
    groups: Sequence[str],
    transform: str = "perturbseq",
    batch_size: int = 4096,
    *,
    genes: Sequence[str] | None = None,
    target_sum: float = 1e4,
) -> pd.DataFrame:
    """Mean transformed expression g(x) of the cells of each label in ``groups`` (the pseudobulk).

    ``x``: (N, G) counts (dense or sparse, processed ``batch_size`` rows at a time); ``labels``: (N,);
    ``transform``, ``genes``, ``target_sum``: as in :func:`empirical_ate`. Returns DataFrame
    (len(groups), G) indexed by label; a label without cells raises ``ValueError``.
    """
    transform = check_transform(transform)
    labels = check_labels(labels, int(x.shape[0]))
    groups = [str(g) for g in groups]
    sums, counts = _group_means(x, labels, groups, transform, target_sum, batch_size)
    if (counts == 0).any():
        raise ValueError(f"label(s) {[g for g, c in zip(groups, counts) if c == 0][:10]} have no cells")
    return pd.DataFrame(
        sums / counts[:, None],
        index=pd.Index(groups, name="perturbation"),
        columns=gene_columns(genes, int(x.shape[1])),
    )
