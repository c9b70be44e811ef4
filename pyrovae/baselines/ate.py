"""Trivial ATE predictions from the training cells: the per-perturbation training mean, the additive
combination of the singles' training means, and the global perturbed mean (:func:`baseline_ates`).

Every quality claim about a model's ATE stands next to these (``docs/evaluation.md``); they are computed on
the same transform g as the empirical ATE (:mod:`pyrovae.evaluate.empirical`), from training cells only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.evaluate.empirical import (
    check_labels,
    check_transform,
    data_totals,
    gene_columns,
    label_sums,
    no_control_error,
)

__all__ = ["baseline_ates", "baseline_ates_from_counts"]


def baseline_ates(
    data: PerturbationData,
    groups: Sequence[str],
    *,
    transform: str = "perturbseq",
    split: str = "train",
    batch_size: int = 4096,
    target_sum: float = 1e4,
) -> dict[str, pd.DataFrame]:
    """Trivial ATE predictions for target ``groups``, computed from the ``split`` (training) cells only.

    Returned predictors (each a DataFrame (len(groups), G) indexed by group):

    - ``"train_mean"``: the empirical ATE of the same group on the training cells; a NaN row for a group
      with no training cells (e.g. a held-out combination). This is the "memorise the training mean"
      baseline that saturates ATE-rho on cell-level splits (a third-party GPO-VAE reproduction found
      this).
    - ``"additive"``: for a combination ``"A<sep>B"``, the sum of the single perturbations' training ATEs
      (training ATE of A + training ATE of B), whether or not the combination itself has training cells;
      for a single perturbation, its training ATE (the same as ``train_mean``). NaN when any component
      has no training cells. Use it as the reference for held-out combinations.
    - ``"global_mean"``: mean g(x) of all training perturbed cells (every non-control label, combinations
      included) minus the training control mean: the same row for every group.

    Labels, control label, genes, the combination separator and (with size factors) the per-cell totals
    come from ``data``; ``transform``, ``batch_size``, ``target_sum``: as in :func:`empirical_ate`. For
    plain arrays: :func:`baseline_ates_from_counts`.

    Raises:
        ValueError: no training control cells; no target groups.
    """
    idx = np.asarray(data.indices(split))
    return _baselines(
        lambda a, b: data.rows(idx[a:b]),
        len(idx),
        data.n_genes,
        np.asarray(data.labels)[idx].astype(str),
        groups,
        data.control_label,
        list(data.genes),
        data.sep,
        transform,
        batch_size,
        target_sum,
        f"the {split!r} cells",
        data_totals(data, idx),
    )


def baseline_ates_from_counts(
    x_train: Any,
    labels_train: Sequence[str] | np.ndarray,
    groups: Sequence[str] | None,
    control_label: str | None = None,
    *,
    genes: Sequence[str] | None = None,
    sep: str = "+",
    transform: str = "perturbseq",
    batch_size: int = 4096,
    target_sum: float = 1e4,
) -> dict[str, pd.DataFrame]:
    """:func:`baseline_ates` from (N, G) training counts (dense or sparse) and their (N,) labels."""
    if labels_train is None or control_label is None:
        raise ValueError("baseline_ates needs x_train, labels_train, groups and control_label")
    x = x_train
    if sp.issparse(x) and not isinstance(x, sp.csr_matrix | sp.csr_array):
        x = sp.csr_matrix(x)
    n_cells = int(x.shape[0])
    labels_arr = check_labels(labels_train, n_cells)
    return _baselines(
        lambda a, b: x[a:b],
        n_cells,
        int(x.shape[1]),
        labels_arr,
        groups,
        control_label,
        genes,
        sep,
        transform,
        batch_size,
        target_sum,
        "labels_train",
    )


def _baselines(
    get_rows: Callable[[int, int], Any],
    n_cells: int,
    n_genes: int,
    labels_arr: np.ndarray,
    groups: Sequence[str] | None,
    control_label: str,
    genes: Sequence[str] | None,
    sep: str,
    transform: str,
    batch_size: int,
    target_sum: float,
    where: str,
    totals: np.ndarray | None = None,
) -> dict[str, pd.DataFrame]:
    transform = check_transform(transform)
    if groups is None:
        raise ValueError("baseline_ates needs the target groups")
    groups = [str(g) for g in groups]
    control_label = str(control_label)
    cols = gene_columns(genes, n_genes)
    present = sorted(set(labels_arr.tolist()))
    if control_label not in present:
        raise no_control_error(control_label, labels_arr, where)
    wanted = [control_label] + [lab for lab in present if lab != control_label]
    code_of = {lab: i for i, lab in enumerate(wanted)}
    codes = np.fromiter((code_of[lab] for lab in labels_arr), dtype=np.int64, count=len(labels_arr))
    sums, counts = label_sums(
        get_rows, n_cells, n_genes, codes, len(wanted), transform, target_sum, batch_size, totals
    )
    ctrl_mean = sums[0] / counts[0]
    train_ate = {lab: sums[i] / counts[i] - ctrl_mean for i, lab in enumerate(wanted) if i > 0}
    nan_row = np.full(n_genes, np.nan)

    def additive(g: str) -> np.ndarray:
        parts = [s for s in g.split(sep) if s] if sep else [g]
        if not parts or any(s not in train_ate for s in parts):
            return nan_row
        return np.sum([train_ate[s] for s in parts], axis=0)

    n_pert = counts[1:].sum()
    glob = (sums[1:].sum(0) / n_pert - ctrl_mean) if n_pert > 0 else nan_row
    index = pd.Index(groups, name="perturbation")
    out = {
        "train_mean": np.array([train_ate.get(g, nan_row) for g in groups]).reshape(len(groups), n_genes),
        "additive": np.array([additive(g) for g in groups]).reshape(len(groups), n_genes),
        "global_mean": np.tile(glob, (len(groups), 1)),
    }
    return {name: pd.DataFrame(v, index=index.copy(), columns=cols.copy()) for name, v in out.items()}
