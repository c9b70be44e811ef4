"""Perturbation-prediction metrics beyond the GEARS-style ATE table: the field's 2025 standards.

Pure numpy/scipy/pandas (no torch, no cell-eval). Every function compares a *true* quantity (measured on
held-out cells) with a *predicted* one, rows aligned by perturbation label. Notation: an ATE matrix is
(A, G), A perturbations by G genes, each row the mean transformed expression of a perturbation's cells
minus that of the control cells (:func:`pyrovae.evaluate.empirical.empirical_ate`).

- :func:`discrimination_score`: cell-eval's perturbation discrimination score (PDS, 1 = perfect);
- :func:`rank_metric`: PerturBench's rank of a prediction among the truths (0 = perfect, 0.5 = chance);
- :func:`centroid_accuracy`, :func:`pearson_delta_reference`: systema's metrics, which discount the
  response that all perturbations share;
- :func:`de_test`, :func:`de_qvalues`: a per-perturbation Wilcoxon rank-sum test against control with
  Benjamini-Hochberg FDR, the DE genes that GEARS and cell-eval score on;
- :func:`energy_distance`, :func:`pca_basis`: a distributional comparison of predicted and real cells;
- :func:`interaction_residuals`, :func:`interaction_metrics`: the genetic interaction of a combination,
  AB - (A + B), predicted versus observed;
- :func:`spearman_brown`, :func:`score_vs_baseline`: noise-ceiling and baseline normalisation helpers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "METRIC_BEST",
    "pearson",
    "pairwise_distances",
    "discrimination_score",
    "rank_metric",
    "centroid_accuracy",
    "pearson_delta_reference",
    "perturbed_reference",
    "de_test",
    "de_qvalues",
    "de_top_k",
    "pca_basis",
    "energy_distance",
    "interaction_residuals",
    "interaction_metrics",
    "spearman_brown",
    "score_vs_baseline",
]

#: the best attainable value of each metric of :func:`pyrovae.evaluate.ate.ate_table` (1: a score, higher is
#: better, at most 1; 0: an error or a rank, lower is better, at least 0); used by :func:`score_vs_baseline`
METRIC_BEST = {
    "pearson": 1.0,
    "r2": 1.0,
    "pearson_topk": 1.0,
    "r2_topk": 1.0,
    "pearson_per_pert_mean": 1.0,
    "pearson_per_pert_median": 1.0,
    "mse": 0.0,
    "mse_topk": 0.0,
    "mae": 0.0,
    "direction_acc_topk": 1.0,
    "jaccard_topk": 1.0,
    "pearson_de_topk": 1.0,
    "mse_de_topk": 0.0,
    "direction_acc_de_topk": 1.0,
    "pds": 1.0,
    "rank": 0.0,
    "pearson_delta_pert": 1.0,
    "centroid_accuracy": 1.0,
    "interaction_mse": 0.0,
    "interaction_pearson": 1.0,
    "energy_distance": 0.0,
}

#: the metrics that are correlations (Spearman-Brown corrected in a noise ceiling)
CORRELATION_METRICS = (
    "pearson",
    "pearson_topk",
    "pearson_per_pert_mean",
    "pearson_per_pert_median",
    "pearson_de_topk",
    "pearson_delta_pert",
    "interaction_pearson",
)

# ------------------------------------------------------------------------------------------ distances


def pairwise_distances(a: np.ndarray, b: np.ndarray, metric: str = "l2") -> np.ndarray:
    """(n, m) distances between the rows of ``a`` (n, G) and ``b`` (m, G).

    ``metric``: ``"l1"`` (sum of absolute differences), ``"l2"`` (Euclidean) or ``"cosine"`` (1 - cosine
    similarity; a zero row has similarity 0 with everything, so distance 1).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if metric == "l1":
        return np.abs(a[:, None, :] - b[None, :, :]).sum(-1)
    if metric == "l2":
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.sqrt(np.clip(sq, 0.0, None))
    if metric == "cosine":
        na = np.linalg.norm(a, axis=1)
        nb = np.linalg.norm(b, axis=1)
        denom = na[:, None] * nb[None, :]
        sim = np.divide(a @ b.T, denom, out=np.zeros(denom.shape), where=denom > 0)
        return 1.0 - np.clip(sim, -1.0, 1.0)
    raise ValueError(f"unknown distance {metric!r}; use 'l1', 'l2' or 'cosine'")


def _check_pair(ate_true: pd.DataFrame, ate_pred: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    if list(ate_true.index) != list(ate_pred.index) or list(ate_true.columns) != list(ate_pred.columns):
        raise ValueError("ate_true and ate_pred must have the same rows and columns in the same order")
    return ate_true.to_numpy(dtype=np.float64), ate_pred.to_numpy(dtype=np.float64)


def _rank_among(d: np.ndarray) -> np.ndarray:
    """(A,) mid-rank of d[p, p] within row p of the (A, A) distances d, among the other A - 1 entries:
    #{q != p: d[p, q] < d[p, p]} + 0.5 #{q != p: d[p, q] == d[p, p]}."""
    own = np.diag(d)[:, None]
    off = ~np.eye(len(d), dtype=bool)
    return ((d < own) & off).sum(1) + 0.5 * ((d == own) & off).sum(1)


# ------------------------------------------------------------------------------- discrimination


def discrimination_score(
    ate_true: pd.DataFrame,
    ate_pred: pd.DataFrame,
    metric: str = "l1",
    exclude_targets: bool = True,
    sep: str = "+",
) -> pd.Series:
    """Perturbation discrimination score (PDS) of each perturbation, as cell-eval defines it.

    For perturbation p, the distances from its predicted effect to the true effects of all A perturbations
    are sorted; r_p is the number of true effects closer than p's own (ties with p's own count one half),
    and PDS_p = 1 - r_p / A. A perfect prediction has PDS 1; a prediction that is the same vector for every
    perturbation has mean PDS (A + 1) / (2A) (its ranks are a permutation of 0..A-1), the chance value.

    Args:
        ate_true, ate_pred: (A, G) ATEs with the same rows and columns.
        metric: distance, ``"l1"`` (cell-eval's default), ``"l2"`` or ``"cosine"``.
        exclude_targets: leave out of p's distances the columns of the genes that p perturbs (p's label,
            or each member of a combination, where it names a measured gene): its knock-down is trivial to
            predict. For single perturbations this is cell-eval's rule.
        sep: the combination separator of the labels.

    Returns:
        Series (A,) indexed by perturbation.
    """
    t, p = _check_pair(ate_true, ate_pred)
    n = len(t)
    cols = {str(c): j for j, c in enumerate(ate_true.columns)}
    out = np.full(n, np.nan)
    for i, lab in enumerate(ate_true.index):
        keep = np.ones(t.shape[1], dtype=bool)
        if exclude_targets:
            for comp in str(lab).split(sep) if sep else [str(lab)]:
                if comp in cols:
                    keep[cols[comp]] = False
        d = pairwise_distances(p[i : i + 1, keep], t[:, keep], metric)[0]
        others = np.arange(n) != i
        r = (d[others] < d[i]).sum() + 0.5 * (d[others] == d[i]).sum()
        out[i] = 1.0 - r / n
    return pd.Series(out, index=ate_true.index, name="pds")


def rank_metric(ate_true: pd.DataFrame, ate_pred: pd.DataFrame, metric: str = "cosine") -> pd.Series:
    """PerturBench-style rank of each perturbation's prediction among the truths (0 perfect, 0.5 chance).

    rank_p = (#{q != p: d(pred_p, true_q) < d(pred_p, true_p)} + 0.5 #{ties}) / (A - 1): the fraction of
    the other perturbations whose true effect lies closer to p's prediction than p's own true effect. A
    perfect prediction (of distinct truths) ranks 0; a prediction that is the same for every perturbation
    averages exactly 0.5 (each ordered pair is counted once). PerturBench's distance is the cosine of the
    log-fold changes (here: the ATEs). NaN when A < 2.

    Args:
        ate_true, ate_pred: (A, G) ATEs with the same rows and columns.
        metric: ``"cosine"`` (default), ``"l1"`` or ``"l2"``.

    Returns:
        Series (A,) indexed by perturbation.
    """
    t, p = _check_pair(ate_true, ate_pred)
    n = len(t)
    if n < 2:
        return pd.Series(np.full(n, np.nan), index=ate_true.index, name="rank")
    d = pairwise_distances(p, t, metric)
    return pd.Series(_rank_among(d) / (n - 1), index=ate_true.index, name="rank")


# ------------------------------------------------------------------------------------------ systema


def centroid_accuracy(ate_true: pd.DataFrame, ate_pred: pd.DataFrame) -> pd.Series:
    """systema's centroid accuracy: is p's prediction nearest (Euclidean) to p's own true effect?

    1 when d(pred_p, true_p) < d(pred_p, true_q) for every q != p; with k other truths at exactly the same
    distance, 1 / (k + 1); else 0. The mean over perturbations is 1 for a perfect predictor and 1 / A for
    a constant one (whose nearest truth is one fixed perturbation). Distances between effects do not
    depend on the reference (control or perturbed mean) they are taken from.

    Returns:
        Series (A,) indexed by perturbation.
    """
    t, p = _check_pair(ate_true, ate_pred)
    d = pairwise_distances(p, t, "l2")
    own = np.diag(d)[:, None]
    off = ~np.eye(len(d), dtype=bool)
    closer = ((d < own) & off).sum(1)
    ties = ((d == own) & off).sum(1)
    acc = np.where(closer == 0, 1.0 / (ties + 1.0), 0.0)
    return pd.Series(acc, index=ate_true.index, name="centroid_accuracy")


def pearson_delta_reference(
    ate_true: pd.DataFrame, ate_pred: pd.DataFrame, reference: np.ndarray | None = None
) -> pd.Series:
    """systema's Pearson delta: correlation of the effects measured from the perturbed mean, not control.

    Every perturbation shares part of its response (stress, selection): a control-referenced Pearson delta
    rewards predicting that shared shift. Here both sides are referenced to r, the effect of the average
    perturbed cell: corr(pred_p - r, true_p - r) per perturbation p, over genes.

    Args:
        ate_true, ate_pred: (A, G) ATEs (versus control) with the same rows and columns.
        reference: (G,) r as an ATE versus control, e.g. mean g(x) of all held-out perturbed cells minus
            the control mean. Default: the unweighted mean of the rows of ``ate_true``.

    Returns:
        Series (A,) indexed by perturbation (NaN where a side is constant over genes).
    """
    t, p = _check_pair(ate_true, ate_pred)
    r = t.mean(0) if reference is None else np.asarray(reference, dtype=np.float64).reshape(-1)
    if r.shape != (t.shape[1],):
        raise ValueError(f"reference has shape {r.shape}, expected ({t.shape[1]},)")
    out = np.array([pearson(a - r, b - r) for a, b in zip(t, p)]) if len(t) else np.array([])
    return pd.Series(out, index=ate_true.index, name="pearson_delta_pert")


def perturbed_reference(ate: pd.DataFrame, n_cells: Sequence[float] | np.ndarray) -> np.ndarray:
    """(G,) the effect of the average perturbed cell: the rows of ``ate`` (A, G) weighted by their numbers
    of cells ``n_cells`` (A,), i.e. mean g(x) over all perturbed cells minus the control mean."""
    w = np.asarray(n_cells, dtype=np.float64).reshape(-1)
    if w.shape != (len(ate),):
        raise ValueError(f"n_cells has {w.size} entries for {len(ate)} ATE rows")
    return (w[:, None] * ate.to_numpy(dtype=np.float64)).sum(0) / max(float(w.sum()), 1e-300)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two 1-D vectors; NaN (no warning) if shorter than 2 or either is constant."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt(da @ da), np.sqrt(db @ db)
    if na == 0 or nb == 0 or not np.isfinite(na * nb):
        return float("nan")
    return float(np.clip((da @ db) / (na * nb), -1.0, 1.0))


# ----------------------------------------------------------------------------------------- DE tests


def de_test(x_group: np.ndarray, x_control: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene two-sided Wilcoxon rank-sum (Mann-Whitney U) test of one group of cells against control.

    The normal approximation with tie correction and continuity correction (scanpy's and cell-eval's
    choice for DE genes); a gene constant over both groups gets p = 1. The p-values are adjusted with the
    Benjamini-Hochberg false discovery rate over the G genes.

    Args:
        x_group: (n, G) transformed expression of the group's cells (n >= 1).
        x_control: (m, G) of the control cells (m >= 1).

    Returns:
        ((G,) p-values, (G,) BH-adjusted q-values).
    """
    x_group = np.asarray(x_group, dtype=np.float64)
    x_control = np.asarray(x_control, dtype=np.float64)
    if x_group.ndim != 2 or x_control.ndim != 2 or x_group.shape[1] != x_control.shape[1]:
        raise ValueError(f"x_group {x_group.shape} and x_control {x_control.shape} must be (n, G) and (m, G)")
    if len(x_group) == 0 or len(x_control) == 0:
        raise ValueError("de_test needs at least one cell on each side")
    with np.errstate(invalid="ignore", divide="ignore"):
        pvals = stats.mannwhitneyu(
            x_group, x_control, axis=0, alternative="two-sided", method="asymptotic", use_continuity=True
        ).pvalue
    pvals = np.where(np.isfinite(pvals), pvals, 1.0)
    qvals = stats.false_discovery_control(pvals, method="bh") if pvals.size else pvals
    return pvals, np.asarray(qvals, dtype=np.float64)


def de_qvalues(
    x: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    control_label: str,
    groups: Sequence[str],
    genes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """BH q-values of :func:`de_test` for every group versus the control cells.

    Args:
        x: (N, G) transformed expression (e.g. log-normalised counts) of the cells, dense.
        labels: (N,) label of each cell.
        control_label: label of the control cells.
        groups: the labels to test (rows of the output); each needs a cell in ``labels``.
        genes: G column names (default 0..G-1).

    Returns:
        DataFrame (len(groups), G) of q-values, index = groups (name ``"perturbation"``).
    """
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    ctrl = x[labels == str(control_label)]
    if len(ctrl) == 0:
        raise ValueError(f"no control cells labelled {control_label!r}; the DE test needs them")
    rows = []
    for g in groups:
        cells = x[labels == str(g)]
        if len(cells) == 0:
            raise ValueError(f"group {g!r} has no cells for the DE test")
        rows.append(de_test(cells, ctrl)[1])
    cols = pd.RangeIndex(x.shape[1]) if genes is None else pd.Index([str(g) for g in genes])
    q = np.array(rows).reshape(len(rows), x.shape[1])
    return pd.DataFrame(q, index=pd.Index([str(g) for g in groups], name="perturbation"), columns=cols)


def de_top_k(qvalues: np.ndarray, ate_true: np.ndarray, k: int) -> np.ndarray:
    """(A, k) column indices of the k genes with the smallest DE q-value per row (GEARS' "top DE genes").

    Ties in q (e.g. several genes at the smallest attainable q) are broken by the larger ``|true ATE|``, then
    by the lower column. ``qvalues`` and ``ate_true``: (A, G).
    """
    q = np.asarray(qvalues, dtype=np.float64)
    a = np.abs(np.asarray(ate_true, dtype=np.float64))
    order = np.lexsort((np.broadcast_to(np.arange(q.shape[1]), q.shape), -a, q), axis=1)
    return order[:, :k]


# ----------------------------------------------------------------------------------- distributions


def pca_basis(x: np.ndarray, n_components: int = 50, max_cells: int = 5000, seed: int = 0):
    """Mean and principal axes of the cells ``x`` (N, G), to project cells with (x - mean) @ axes.T.

    At most ``max_cells`` cells (a seeded random subset) enter the fit; the SVD itself is exact. The sign
    of each axis is fixed (largest loading positive) so that the basis is reproducible.

    Returns:
        ((G,) mean, (K, G) axes), K = min(n_components, N, G).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"pca_basis needs a non-empty (N, G) matrix, got shape {x.shape}")
    if len(x) > max_cells:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), max_cells, replace=False))]
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = min(int(n_components), vt.shape[0])
    axes = vt[:k]
    flip = np.sign(axes[np.arange(k), np.abs(axes).argmax(1)])
    return mean, axes * np.where(flip == 0, 1.0, flip)[:, None]


def energy_distance(x: np.ndarray, y: np.ndarray, unbiased: bool = False) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sets of points (Euclidean).

    ``unbiased=False`` (the V-statistic, as cell-eval and scipy compute it): the expectations are averages
    over all pairs, a point paired with itself included, so the energy distance of a set to itself is
    exactly 0 and it grows with any difference of the two distributions (location, spread, shape); but two
    samples of ONE distribution score about E|X - X'| (1/n + 1/m) > 0, more for fewer points.

    ``unbiased=True`` (the U-statistic): E|X - X'| and E|Y - Y'| average over distinct pairs only, which
    makes the estimate unbiased for the population energy distance: about 0 (either sign) for two samples
    of one distribution, whatever n and m. Use it to compare sets of different sizes (predicted cells,
    held-out cells, split halves of a noise ceiling); it needs n, m >= 2.

    Args:
        x: (n, D) points (e.g. predicted cells in a PCA); y: (m, D).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, m = len(x), len(y)
    if n == 0 or m == 0 or (unbiased and (n < 2 or m < 2)):
        return float("nan")
    dxy = pairwise_distances(x, y, "l2").mean()
    sxx = pairwise_distances(x, x, "l2").sum()
    syy = pairwise_distances(y, y, "l2").sum()
    if unbiased:
        return float(2.0 * dxy - sxx / (n * (n - 1)) - syy / (m * (m - 1)))
    return float(max(2.0 * dxy - sxx / n**2 - syy / m**2, 0.0))


# ------------------------------------------------------------------------------------- interactions


def interaction_residuals(ate: pd.DataFrame, singles: pd.DataFrame, sep: str = "+") -> pd.DataFrame:
    """Genetic interaction of each combination: its ATE minus the sum of its members' ATEs, AB - (A + B).

    Args:
        ate: (A, G) ATEs; only the rows whose label holds ``sep`` (combinations) are used.
        singles: (S, G) ATEs of single perturbations, indexed by label, same columns; the members' rows.
        sep: the combination separator.

    Returns:
        DataFrame (C, G), one row per combination of ``ate``; NaN where a member has no row (or a NaN row)
        in ``singles``. Additive data (AB = A + B) gives exactly 0.
    """
    combos = [lab for lab in ate.index if sep and sep in str(lab)]
    singles = singles.reindex(columns=ate.columns)
    out = np.full((len(combos), ate.shape[1]), np.nan)
    for i, lab in enumerate(combos):
        parts = [s for s in str(lab).split(sep) if s]
        if all(s in singles.index for s in parts):
            out[i] = ate.loc[lab].to_numpy(dtype=np.float64) - singles.loc[parts].to_numpy(np.float64).sum(0)
    return pd.DataFrame(out, index=pd.Index(combos, name="perturbation"), columns=ate.columns)


def interaction_metrics(res_true: pd.DataFrame, res_pred: pd.DataFrame) -> dict[str, float]:
    """Error and correlation of predicted versus observed interaction residuals.

    Rows where either side is not finite are left out. ``interaction_mse``: mean squared difference over all
    (combination, gene) entries; ``interaction_pearson``: Pearson r pooled over those entries;
    ``n_interactions``: the combinations scored. NaN (0) when none.
    """
    res_pred = res_pred.reindex(index=res_true.index, columns=res_true.columns)
    t = res_true.to_numpy(dtype=np.float64)
    p = res_pred.to_numpy(dtype=np.float64)
    ok = np.isfinite(t).all(1) & np.isfinite(p).all(1) if len(t) else np.zeros(0, dtype=bool)
    if not ok.any():
        return {"interaction_mse": float("nan"), "interaction_pearson": float("nan"), "n_interactions": 0.0}
    t, p = t[ok], p[ok]
    return {
        "interaction_mse": float(((t - p) ** 2).mean()),
        "interaction_pearson": pearson(t, p),
        "n_interactions": float(ok.sum()),
    }


# ------------------------------------------------------------------------------ ceilings, baselines


def spearman_brown(r: float | np.ndarray) -> float | np.ndarray:
    """Spearman-Brown prophecy for doubling: a split-half correlation r becomes 2r / (1 + r).

    The correlation two full-size replicates would show, from that of two half-size ones. Only defined
    for r > -1; NaN for r <= 0 (halves that do not agree give no ceiling), as cell-eval does.
    """
    r_arr = np.asarray(r, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(r_arr > 0, 2.0 * r_arr / (1.0 + r_arr), np.nan)
    return float(out) if np.ndim(r) == 0 else out


def score_vs_baseline(
    table: pd.DataFrame, baselines: Sequence[str], best: Mapping[str, float] | None = None
) -> pd.DataFrame:
    """Every metric of every method as a score against the best baseline for that metric.

    For a metric whose best value is 1 (a correlation, an accuracy; higher is better) the score is
    (m - b) / (1 - b); for one whose best value is 0 (an error, a rank) it is 1 - m / b, where b is the
    best baseline's value. 0 = as good as the best baseline, 1 = perfect, < 0 = worse than the baseline
    (cell-eval's normalisation, without its clipping at 0). NaN where b is NaN or already perfect.

    Args:
        table: methods x metrics (e.g. :func:`pyrovae.evaluate.ate.ate_table`).
        baselines: the rows of ``table`` that are baselines (absent ones are ignored).
        best: {metric: best value} (default :data:`METRIC_BEST`); other columns are left out.

    Returns:
        DataFrame methods x scored metrics (the baselines' own rows included); the baseline chosen for each
        metric is in ``attrs["baseline"]`` ({metric: name or None}).
    """
    best = dict(METRIC_BEST if best is None else best)
    base = [b for b in baselines if b in table.index]
    cols = [c for c in table.columns if c in best]
    out = pd.DataFrame(index=table.index, columns=cols, dtype=np.float64)
    chosen: dict[str, str | None] = {}
    for c in cols:
        vals = table.loc[base, c].astype(np.float64).dropna() if base else pd.Series(dtype=np.float64)
        if vals.empty:
            chosen[c] = None
            continue
        name = vals.idxmax() if best[c] == 1.0 else vals.idxmin()
        b = float(vals[name])
        chosen[c] = str(name)
        m = table[c].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[c] = (m - b) / (1.0 - b) if best[c] == 1.0 else 1.0 - m / b
        if (best[c] == 1.0 and b == 1.0) or (best[c] == 0.0 and b == 0.0):
            out[c] = np.nan
    out.attrs["baseline"] = chosen
    return out
