"""Model-free GRN baselines: edge scores from the data, to score with :func:`pyrovae.evaluate.grn.score_grn`.

- :func:`correlation_grn`: the absolute Pearson correlation between genes over cells;
- :func:`de_grn`: the differential expression of each perturbed gene's cells against the controls;
- :func:`deconvolved_grn` / :func:`deconvolved_de_grn`: a linear structural regression on the
  interventional means that removes indirect effects (direct edges only).

Convention: adjacency[i, j] != 0 means an edge i -> j (row = parent/regulator, column = child/target).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.data.matrix import to_dense

__all__ = [
    "cells_by_label",
    "check_grn_inputs",
    "correlation_grn",
    "de_grn",
    "deconvolved_grn",
    "deconvolved_de_grn",
]


def correlation_grn(x_lognorm: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Absolute Pearson correlation between genes, a symmetric (undirected) edge-score baseline.

    Args:
        x_lognorm: (cells, n) log-normalised expression (dense or sparse).

    Returns:
        (n, n) ``|corr|``, diagonal 0; constant genes have 0 correlation with everything.
    """
    x = to_dense(x_lognorm)
    if x.ndim != 2:
        raise ValueError(f"x_lognorm must be 2-D (cells, genes), got shape {x.shape}")
    x = x - x.mean(0)
    sd = np.sqrt((x**2).sum(0))
    z = np.divide(x, sd, out=np.zeros_like(x), where=sd > 0)
    c = np.clip(np.abs(z.T @ z), 0.0, 1.0)
    np.fill_diagonal(c, 0.0)
    return c


def cells_by_label(labels: np.ndarray) -> dict[str, np.ndarray]:
    """{label: (n,) indices of its cells} (each label's cells in their order)."""
    codes, uniq = pd.factorize(pd.Series(labels), sort=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniq) + 1))
    return {str(u): order[bounds[i] : bounds[i + 1]] for i, u in enumerate(uniq)}


def check_grn_inputs(
    x: Any, labels: Any, genes: Sequence[str], control_label: str
) -> tuple[np.ndarray, list[str]]:
    """(labels as strings, gene names) of a (cells, genes) matrix; one clear error for mismatched inputs."""
    if getattr(x, "ndim", 2) != 2:
        raise ValueError(f"x_lognorm must be 2-D (cells, genes), got shape {x.shape}")
    labels = np.asarray(labels).astype(str).reshape(-1)
    if len(labels) != x.shape[0]:
        raise ValueError(f"labels has {len(labels)} entries but x_lognorm has {x.shape[0]} rows")
    genes = [str(g) for g in genes]
    if len(genes) != x.shape[1]:
        raise ValueError(f"genes has {len(genes)} names but x_lognorm has {x.shape[1]} columns")
    if len(set(genes)) != len(genes):
        raise ValueError("genes holds duplicate names")
    if not (labels == str(control_label)).any():
        raise ValueError(
            f"no control cells labelled {control_label!r} in labels; pass control_label=<the label of the "
            "unperturbed cells>"
        )
    return labels, genes


def de_grn(
    x_lognorm: np.ndarray | sp.spmatrix,
    labels: Sequence[str] | np.ndarray,
    genes: Sequence[str],
    control_label: str,
    sep: str = "+",
    signed: bool = False,
) -> np.ndarray:
    """Differential-expression baseline: score(j -> k) = abs(mean(x_k, j perturbed) - mean(x_k, control)).

    ``signed=True``: the difference itself (the interventional mean shifts, for :func:`deconvolved_grn`).

    Only single perturbations count: the cells labelled exactly ``genes[j]`` (a combination label such as
    ``"A<sep>B"`` never matches a gene name). Rows of genes that no cell perturbs are 0. The diagonal
    (a gene's effect on its own expression) is kept; :func:`score_grn` drops it by default.

    Args:
        x_lognorm: (cells, n) log-normalised expression (dense or sparse).
        labels: (cells,) perturbation labels.
        genes: n gene names, the columns of ``x_lognorm`` (and the GRN nodes).
        control_label: label of the control cells.
        sep: combination separator (only documents which labels are combinations; they are ignored).

    Returns:
        (n, n) non-negative edge scores (row = perturbed gene, column = responding gene).
    """
    labels, genes = check_grn_inputs(x_lognorm, labels, genes, control_label)
    cells = cells_by_label(labels)
    x = x_lognorm.tocsr() if sp.issparse(x_lognorm) else np.asarray(x_lognorm, dtype=np.float64)

    def mean_of(idx: np.ndarray) -> np.ndarray:
        return np.asarray(x[idx].mean(0), dtype=np.float64).reshape(-1)

    ctrl = mean_of(cells[str(control_label)])
    out = np.zeros((len(genes), len(genes)), dtype=np.float64)
    for j, g in enumerate(genes):
        if g in cells and g != str(control_label):
            diff = mean_of(cells[g]) - ctrl
            out[j] = diff if signed else np.abs(diff)
    return out


def deconvolved_grn(
    shifts: np.ndarray,
    intervened: Sequence[int] | np.ndarray,
    ridge: float = 1e-3,
    regulators: np.ndarray | None = None,
) -> np.ndarray:
    """Direct effects B from interventional mean shifts by a linear structural regression.

    Model: under an intervention on gene a, the mean shift of every other gene k obeys the linear
    structural equation  s_k = sum_{j != k} B_jk s_j  (a's own shift is set by the intervention). For each
    target k, regress s_k on the shifts of the regulators over the interventions that do not target k
    (ridge ``ridge * ||X||_F^2 / n_regulators``, dual form when there are fewer interventions than
    regulators). In a linear DAG the total effect is (I - B)^{-1} - I, which :func:`de_grn` measures; this
    inverts it, so an indirect effect a -> b -> c gives B_ac = 0 (network deconvolution for
    interventional data).

    Args:
        shifts: (I, n) mean shift of each gene (columns) under each intervention (rows), e.g. the
            perturbed genes' rows of ``de_grn(..., signed=True)``.
        intervened: (I,) column index of the gene each intervention targets.
        ridge: relative ridge penalty (0: least squares, minimum-norm where underdetermined).
        regulators: (n,) bool, genes allowed as regulators (default all); other rows of B are 0.

    Returns:
        (n, n) signed direct effects B (row = regulator, column = target), zero diagonal.
    """
    s = np.asarray(shifts, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"shifts must be (interventions, genes), got shape {s.shape}")
    iv = np.asarray(intervened, dtype=np.int64).reshape(-1)
    n_iv, n = s.shape
    if len(iv) != n_iv:
        raise ValueError(f"intervened has {len(iv)} entries for {n_iv} interventions")
    if n_iv and (iv.min() < 0 or iv.max() >= n):
        raise ValueError(f"intervened indices must be in [0, {n})")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    reg = np.ones(n, dtype=bool) if regulators is None else np.asarray(regulators, dtype=bool).reshape(-1)
    if len(reg) != n:
        raise ValueError(f"regulators has {len(reg)} entries for {n} genes")
    out = np.zeros((n, n), dtype=np.float64)
    for k in range(n):
        rows = iv != k
        cols = reg.copy()
        cols[k] = False
        if not rows.any() or not cols.any():
            continue
        x, y = s[np.ix_(rows, cols)], s[rows, k]
        lam = ridge * float((x**2).sum()) / cols.sum()
        if x.shape[0] >= x.shape[1]:
            b = np.linalg.lstsq(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y, rcond=None)[0]
        else:
            b = x.T @ np.linalg.lstsq(x @ x.T + lam * np.eye(x.shape[0]), y, rcond=None)[0]
        out[cols, k] = b
    return out


def deconvolved_de_grn(
    x_lognorm: np.ndarray | sp.spmatrix,
    labels: Sequence[str] | np.ndarray,
    genes: Sequence[str],
    control_label: str,
    ridge: float = 1e-3,
    regulators: np.ndarray | None = None,
) -> np.ndarray:
    """``|B|`` of :func:`deconvolved_grn` on the signed DE shifts of every perturbed gene (rows of
    ``de_grn(..., signed=True)`` of genes with cells): direct-edge scores with indirect effects removed.
    ``regulators`` default: every gene (perturbed or not; unperturbed ones are identified only through how
    their shifts co-vary across the interventions)."""
    labels_arr, genes = check_grn_inputs(x_lognorm, labels, genes, control_label)
    shifts = de_grn(x_lognorm, labels_arr, genes, control_label, signed=True)
    present = set(labels_arr.tolist())
    iv = np.asarray(
        [j for j, g in enumerate(genes) if g in present and g != str(control_label)], dtype=np.int64
    )
    return np.abs(deconvolved_grn(shifts[iv], iv, ridge=ridge, regulators=regulators))
