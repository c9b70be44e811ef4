"""Cell-level evaluation: predicted cells against held-out cells (energy distance) and DE q-values.

The ATE table compares means; these functions compare sets of cells, so that a model that predicts the
right mean with the wrong spread (or a mean baseline, which predicts no cells at all) is told apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pyrovae.data.matrix import select_rows, to_dense
from pyrovae.evaluate.empirical import perturbseq_transform
from pyrovae.evaluate.metrics import energy_distance

__all__ = ["transform_cells", "sample_totals", "energy_by_perturbation", "subsample_by_label"]


def transform_cells(
    x: Any, transform: str = "perturbseq", target_sum: float = 1e4, totals: np.ndarray | None = None
) -> np.ndarray:
    """(N, G) dense float64 g(x) of counts ``x`` (dense or sparse): log2(target_sum x / l + 1) for
    ``"perturbseq"`` (l = ``totals``, (N,) per-cell size factors, or the row totals by default), the values
    themselves for ``"mean"`` (the normal likelihood's data)."""
    if transform == "perturbseq":
        return perturbseq_transform(x, target_sum, totals)
    if transform == "mean":
        return to_dense(x)
    raise ValueError(f"unknown transform {transform!r}; use 'perturbseq' or 'mean'")


def sample_totals(sample: Any, size_factors: bool) -> np.ndarray | None:
    """(N,) the totals of the perturbseq transform of predicted cells (an AnnData of
    :meth:`~pyrovae.predict.posterior.Posterior.predict`): their sampled library sizes when the data has size
    factors (as the model ATE uses them), else ``None`` (the cells' own totals)."""
    return np.asarray(sample.obs["library_size"], dtype=np.float64) if size_factors else None


def subsample_by_label(
    labels: np.ndarray, wanted: Sequence[str], max_per_label: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """{label: sorted positions of at most ``max_per_label`` cells of that label} (a seeded random subset
    when there are more; every cell otherwise). Labels without cells map to an empty array."""
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    out = {}
    for lab in wanted:
        pos = np.flatnonzero(labels == str(lab))
        if len(pos) > max_per_label:
            pos = np.sort(rng.choice(pos, max_per_label, replace=False))
        out[str(lab)] = pos
    return out


def energy_by_perturbation(
    real: np.ndarray,
    real_labels: Sequence[str] | np.ndarray,
    pred: Any,
    pred_labels: Sequence[str] | np.ndarray,
    perturbations: Sequence[str],
    basis: tuple[np.ndarray, np.ndarray],
    *,
    max_cells: int = 300,
    seed: int = 0,
    unbiased: bool = True,
) -> pd.Series:
    """Energy distance between the predicted and the real cells of each perturbation, in a PCA.

    The unbiased (U-statistic) estimate by default (:func:`pyrovae.evaluate.metrics.energy_distance`):
    about 0 when the predicted cells follow the real cells' distribution, whatever the numbers of cells, so
    that models, cell baselines and the noise ceiling (split halves) can be compared.

    Args:
        real: (N, G) transformed held-out cells; real_labels: (N,).
        pred: (M, G) transformed predicted cells (or any cells standing in for a prediction, e.g. control
            cells for "no change"); pred_labels: (M,).
        perturbations: the labels to score.
        basis: ((G,) mean, (K, G) axes) of :func:`pyrovae.evaluate.metrics.pca_basis`; cells are projected
            to (x - mean) @ axes.T before the distances.
        max_cells: at most this many cells per label and side (seeded subsets) enter each distance.
        unbiased: the U-statistic (default) or the V-statistic (0 for a set against itself).

    Returns:
        Series (len(perturbations),) indexed by label; NaN where a side has no cell (or, unbiased, one).
    """
    mean, axes = basis
    real_pos = subsample_by_label(np.asarray(real_labels), perturbations, max_cells, seed)
    pred_pos = subsample_by_label(np.asarray(pred_labels), perturbations, max_cells, seed + 1)
    out = {}
    for lab in perturbations:
        a, b = real_pos[str(lab)], pred_pos[str(lab)]
        if len(a) == 0 or len(b) == 0:
            out[str(lab)] = float("nan")
            continue
        za = (np.asarray(real[a], dtype=np.float64) - mean) @ axes.T
        zb = (to_dense(select_rows(pred, b)) - mean) @ axes.T
        out[str(lab)] = energy_distance(zb, za, unbiased)
    return pd.Series(out, name="energy_distance", dtype=np.float64)
