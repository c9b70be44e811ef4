"""Noise ceilings: how well the held-out cells agree with themselves, per metric of the ATE table.

A Pearson delta of 0.2 can be at the ceiling (few, noisy cells per perturbation) or far below it. The
ceiling is measured on the data alone: the held-out cells of every perturbation and of control are split
into two random halves, half A's empirical ATE is taken as the truth and half B's as the prediction,
and every metric of :func:`pyrovae.evaluate.ate.ate_table` is computed. Each half has half the cells, so
the raw split-half score is corrected to the full depth where the correction is known:

- a correlation r becomes 2r / (1 + r) (Spearman-Brown; NaN for r <= 0);
- a squared error is halved (the noise variance of a mean of n cells is half that of n / 2 cells);
- the mean absolute error is divided by sqrt(2) (the same for its standard deviation scale);
- the energy distance (the unbiased estimate) does not depend on the numbers of cells: about 0 when the
  halves follow one distribution, as a model's cells would if they followed the real cells';
- the other metrics (R^2, ranks, discrimination, accuracies, overlaps) are reported at half depth,
  uncorrected: a conservative (lower) ceiling.

These corrected numbers (``kind="replicate"``, the row ``noise_ceiling``) are what a second, independent
experiment of the same size would score against the first: the field's noise ceiling (cell-eval's). A model
that knew the population effect exactly scores better, since its prediction carries no noise of its own;
``kind="perfect"`` (the row ``perfect_predictor``) is that score, under the same model of the noise
(independent noise of variance v per entry at full depth, 2v in a half): a correlation sqrt(2r / (1 + r)),
a squared error a quarter, the mean absolute error half of the split-half value. A model above the
``noise_ceiling`` row is more reproducible than the experiment itself (e.g. it averages many training
cells); the ``perfect_predictor`` row bounds what any prediction can reach in expectation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pyrovae.data.matrix import select_rows
from pyrovae.evaluate.ate import METRIC_KEYS, ate_table
from pyrovae.evaluate.cells import energy_by_perturbation, transform_cells
from pyrovae.evaluate.empirical import empirical_ate
from pyrovae.evaluate.metrics import (
    CORRELATION_METRICS,
    de_qvalues,
    pca_basis,
    perturbed_reference,
    spearman_brown,
)

__all__ = ["noise_ceiling", "noise_ceilings", "CEILING_INDEX", "PERFECT_INDEX"]

#: the index label of the ceiling row (a same-size replicate experiment)
CEILING_INDEX = "noise_ceiling"
#: the index label of the noiseless-predictor row
PERFECT_INDEX = "perfect_predictor"
_SQUARED = ("mse", "mse_topk", "mse_de_topk", "interaction_mse")
_COUNTS = ("top_k", "n_perturbations", "n_dropped", "n_interactions")


def _halves(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``labels``) of two disjoint random halves of floor(n / 2) cells of every label with
    at least 2 cells (an odd cell out is left out)."""
    a, b = [], []
    for lab in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == lab))
        h = len(pos) // 2
        if h >= 1:
            a.append(pos[:h])
            b.append(pos[h : 2 * h])
    if not a:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def _correct(row: dict[str, float], kind: str) -> dict[str, float]:
    """Split-half metrics at full depth: a same-size replicate (``"replicate"``) or a noiseless predictor
    (``"perfect"``); see the module docstring."""
    perfect = kind == "perfect"
    out = dict(row)
    for key in CORRELATION_METRICS:
        if key in out:
            r = float(spearman_brown(out[key]))
            out[key] = float(np.sqrt(r)) if perfect and np.isfinite(r) else r
    for key in _SQUARED:
        if key in out:
            out[key] = out[key] / (4.0 if perfect else 2.0)
    if "mae" in out:
        out["mae"] = out["mae"] / (2.0 if perfect else np.sqrt(2.0))
    return out


def noise_ceiling(
    counts: Any,
    labels: Sequence[str] | np.ndarray,
    control_label: str,
    rows: np.ndarray,
    *,
    transform: str,
    library_size: np.ndarray | None = None,
    n_splits: int = 5,
    seed: int = 0,
    top_k: int = 20,
    **options: Any,
) -> pd.DataFrame:
    """The split-half noise ceiling: the one row ``noise_ceiling`` of :func:`noise_ceilings` (a same-size
    replicate experiment; same arguments, ``options`` = its keyword arguments)."""
    return noise_ceilings(
        counts,
        labels,
        control_label,
        rows,
        transform=transform,
        library_size=library_size,
        n_splits=n_splits,
        seed=seed,
        top_k=top_k,
        **options,
    ).loc[[CEILING_INDEX]]


def noise_ceilings(
    counts: Any,
    labels: Sequence[str] | np.ndarray,
    control_label: str,
    rows: np.ndarray,
    *,
    transform: str,
    library_size: np.ndarray | None = None,
    n_splits: int = 5,
    seed: int = 0,
    top_k: int = 20,
    target_sum: float = 1e4,
    genes: Sequence[str] | None = None,
    sep: str = "+",
    energy: bool = True,
    n_components: int = 50,
    max_cells: int = 300,
    singles: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The split-half noise ceiling of every metric of :func:`pyrovae.evaluate.ate.ate_table`.

    For each of ``n_splits`` random halvings (seeded by ``seed`` and the split number) of the cells
    ``rows`` (each perturbation's and the control's cells halved separately; labels with fewer than 2
    cells left out), half A is the truth and half B the prediction: empirical ATEs of both halves, the DE
    q-values of half A (Wilcoxon + BH, for the DE top-k metrics), the perturbed-mean reference of half A,
    the interaction residuals of the combinations (against ``singles``), and (``energy``) the unbiased
    energy distance between the halves' cells in a PCA of all the cells ``rows`` (``n_components`` axes,
    at most ``max_cells`` cells per label and half). Each split's metrics are corrected to full depth (see
    the module docstring), then averaged.

    Args:
        counts: (N, G) counts (dense, sparse or backed), all cells of the data.
        labels: (N,) perturbation label of every cell.
        control_label: the control cells' label (at least 2 control cells among ``rows``).
        rows: positions of the held-out cells (the cells the ATE table's truth is measured on).
        transform: ``"perturbseq"`` or ``"mean"``, as the ATE table's.
        library_size: (N,) per-cell totals l of the perturbseq transform log2(target_sum x / l + 1) for
            every cell of ``counts`` (size factors: ``data_totals(data, np.arange(data.n_cells))`` of
            :mod:`pyrovae.evaluate.empirical`), or ``None``: each cell's total count (the table's default).
        n_splits: random halvings; seed: their seed; top_k: as in the table; target_sum: the scale.
        genes: G gene names (default 0..G-1); sep: combination separator.
        energy, n_components, max_cells: the energy distance between the halves' cells (unbiased
            estimate, about 0 at the ceiling) in a PCA of the cells ``rows``.
        singles: (S, G) reference ATEs of the combinations' members for the interaction residuals, the
            same for both halves: pass the ones the ATE table's observed residuals use (the members'
            training ATEs); default: each half's own ATEs of the members, where they are among ``rows``.

    Returns:
        DataFrame with two rows (index name ``"method"``): ``noise_ceiling`` (a same-size replicate) and
        ``perfect_predictor`` (a noiseless predictor), each with the ATE table's metric columns (mean over
        splits), ``<metric>_sd`` (their standard deviation over splits) and ``n_splits``.

    Raises:
        ValueError: fewer than 2 control or perturbed cells to halve, ``n_splits`` < 1.
    """
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    rows = np.asarray(rows)
    if library_size is not None and np.ndim(library_size) != 1:
        raise ValueError("library_size must be None or (N,) per-cell totals (size factors) of every cell")
    lab = np.asarray(labels).astype(str)[rows]
    control_label = str(control_label)
    if (lab == control_label).sum() < 2:
        raise ValueError(f"the noise ceiling needs at least 2 control cells ({control_label!r}) among rows")
    x_rows = select_rows(counts, rows)
    totals = None if library_size is None else np.asarray(library_size, dtype=np.float64)[rows]
    g = transform_cells(x_rows, transform, target_sum, totals)
    genes = [str(c) for c in genes] if genes is not None else list(range(g.shape[1]))
    basis = pca_basis(g, n_components=n_components, seed=seed) if energy else None
    per_split = []
    for s in range(n_splits):
        a, b = _halves(lab, np.random.default_rng([seed, s]))
        la, lb = lab[a], lab[b]
        perts = sorted(set(la.tolist()) - {control_label})
        if not perts:
            raise ValueError("the noise ceiling needs a perturbation with at least 2 cells among rows")
        ate_a = empirical_ate(g[a], la, control_label, perts, transform="mean", genes=genes)
        ate_b = empirical_ate(g[b], lb, control_label, perts, transform="mean", genes=genes)
        q = de_qvalues(g[a], la, control_label, perts, genes=genes)
        table = ate_table(
            ate_a,
            {"split": ate_b},
            top_k,
            de_qvalues=q,
            reference=perturbed_reference(ate_a, [(la == p).sum() for p in perts]),
            singles_true=ate_a if singles is None else singles,
            singles_preds={"split": ate_b if singles is None else singles},
            sep=sep,
        )
        raw = table.loc["split"].astype(float).to_dict()
        if energy:
            e = energy_by_perturbation(g[a], la, g[b], lb, perts, basis, max_cells=max_cells, seed=seed + s)
            raw["energy_distance"] = float(e.mean())
        per_split.append(raw)
    frames = []
    for kind, name in (("replicate", CEILING_INDEX), ("perfect", PERFECT_INDEX)):
        df = pd.DataFrame([_correct(r, kind) for r in per_split])
        metric_cols = [c for c in df.columns if c not in _COUNTS]
        out = {c: float(df[c].mean()) for c in df.columns}
        out.update(
            {f"{c}_sd": float(df[c].std(ddof=1)) if len(df) > 1 else float("nan") for c in metric_cols}
        )
        out["n_splits"] = float(n_splits)
        frames.append(pd.DataFrame([out], index=pd.Index([name], name="method")))
    res = pd.concat(frames)
    order = [c for c in [*METRIC_KEYS, "n_dropped", "energy_distance"] if c in res.columns]
    res = res[order + [c for c in res.columns if c not in order]]
    for c in (*_COUNTS, "n_splits"):
        res[c] = res[c].round().astype(int)
    return res
