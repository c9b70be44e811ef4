"""ATE metrics: a model's (or a baseline's) predicted ATE matrix against the empirical one.

Pure numpy/scipy/pandas (no torch). Definitions follow the SAMS-VAE and GPO-VAE reference code
(documentation: ``docs/evaluation.md``), with additions that code lacks (per-perturbation correlations, MSE,
direction accuracy, the field's metrics). Rows are aligned by label. The empirical ATE itself is
:func:`pyrovae.evaluate.empirical.empirical_ate`; the trivial baselines are
:func:`pyrovae.baselines.ate.baseline_ates`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pyrovae.evaluate.metrics import (
    centroid_accuracy,
    de_top_k,
    discrimination_score,
    interaction_metrics,
    interaction_residuals,
    pearson,
    pearson_delta_reference,
    rank_metric,
)

__all__ = ["ate_metrics", "ate_table", "per_perturbation_metrics", "pearson", "METRIC_KEYS"]

# ---------------------------------------------------------------------------------------- metrics


def _r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn-style R^2 = 1 - SS_res / SS_tot with y_true = data; NaN if y_true is constant or empty.

    (sklearn's ``r2_score`` would return 0.0 or 1.0 for a constant y_true; NaN is reported instead.)
    """
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y_true.size < 2:
        return float("nan")
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    if ss_tot == 0:
        return float("nan")
    return 1.0 - float(((y_true - y_pred) ** 2).sum()) / ss_tot


def _nan_stat(values: np.ndarray, fn: Callable[[np.ndarray], Any]) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(fn(v)) if v.size else float("nan")


def _top_k_idx(a: np.ndarray, k: int) -> np.ndarray:
    """(A, k) column indices of the k largest ``|a|`` per row; ties in stable order (lower index first)."""
    return np.argsort(-np.abs(a), axis=1, kind="stable")[:, :k]


def _align(ate_true: pd.DataFrame, ate_pred: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reorder ``ate_pred`` to the rows and columns of ``ate_true`` (extra pred rows/columns dropped)."""
    missing = [r for r in ate_true.index if r not in ate_pred.index]
    if missing:
        shown = missing[:10] + (["..."] if len(missing) > 10 else [])
        raise ValueError(f"ate_pred lacks {len(missing)} perturbation label(s) of ate_true: {shown}")
    missing_g = [c for c in ate_true.columns if c not in ate_pred.columns]
    if missing_g:
        shown = missing_g[:10] + (["..."] if len(missing_g) > 10 else [])
        raise ValueError(f"ate_pred lacks {len(missing_g)} gene column(s) of ate_true: {shown}")
    if ate_true.index.has_duplicates or ate_pred.index.has_duplicates:
        raise ValueError("duplicate perturbation labels in the ATE index")
    return ate_true, ate_pred.loc[ate_true.index, ate_true.columns]


def _subset(t: np.ndarray, p: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The (A, k) entries ``idx`` of aligned (A, G) arrays, with their sign agreement and per-row direction
    accuracy (entries whose true value is exactly 0 have no direction and are left out)."""
    tt = np.take_along_axis(t, idx, axis=1)
    pt = np.take_along_axis(p, idx, axis=1)
    nonzero = tt != 0
    agree = (np.sign(tt) == np.sign(pt)) & nonzero
    n_nz = nonzero.sum(1)
    direction = np.divide(agree.sum(1), n_nz, out=np.full(len(t), np.nan), where=n_nz > 0)
    return {"tt": tt, "pt": pt, "agree": agree, "nonzero": nonzero, "direction": direction}


def _row_metrics(t: np.ndarray, p: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-perturbation metrics of aligned (A, G) arrays; each value is an (A,) array."""
    top_t = _top_k_idx(t, k)
    top_p = _top_k_idx(p, k)
    sub = _subset(t, p, top_t)
    tt, pt, agree, nonzero, direction = sub["tt"], sub["pt"], sub["agree"], sub["nonzero"], sub["direction"]
    inter = np.array([len(np.intersect1d(a, b)) for a, b in zip(top_t, top_p)], dtype=np.float64)
    jaccard = inter / (2 * k - inter) if k > 0 else np.full(len(t), np.nan)
    return {
        "pearson": np.array([pearson(a, b) for a, b in zip(t, p)]),
        "pearson_topk": np.array([pearson(a, b) for a, b in zip(tt, pt)]),
        "mse": ((t - p) ** 2).mean(1),
        "mae": np.abs(t - p).mean(1),
        "mse_topk": ((tt - pt) ** 2).mean(1),
        "direction_acc_topk": direction,
        "jaccard_topk": jaccard,
        "_tt": tt,
        "_pt": pt,
        "_agree": agree,
        "_nonzero": nonzero,
    }


METRIC_KEYS = (
    "pearson",
    "r2",
    "pearson_topk",
    "r2_topk",
    "pearson_per_pert_mean",
    "pearson_per_pert_median",
    "mse",
    "mse_topk",
    "direction_acc_topk",
    "jaccard_topk",
    "top_k",
    "n_perturbations",
    "mae",
    "pds",
    "rank",
    "pearson_delta_pert",
    "centroid_accuracy",
    "pearson_de_topk",
    "mse_de_topk",
    "direction_acc_de_topk",
    "interaction_mse",
    "interaction_pearson",
    "n_interactions",
)


def _field_rows(
    ate_true: pd.DataFrame,
    ate_pred: pd.DataFrame,
    k: int,
    de_qvalues: pd.DataFrame | None,
    reference: Any,
    sep: str,
) -> dict[str, np.ndarray]:
    """Per-perturbation metrics of the field's newer benchmarks, on aligned finite (A, G) frames:
    ``pds``, ``rank``, ``pearson_delta_pert``, ``centroid_accuracy`` ((A,) arrays) and, with DE q-values,
    the DE top-k entries (``_de``: :func:`_subset`'s dict)."""
    if reference is not None:
        reference = (
            reference.reindex(ate_true.columns).to_numpy(dtype=np.float64)
            if isinstance(reference, pd.Series)
            else np.asarray(reference, dtype=np.float64)
        )
    out: dict[str, Any] = {
        "pds": discrimination_score(ate_true, ate_pred, sep=sep).to_numpy(),
        "rank": rank_metric(ate_true, ate_pred).to_numpy(),
        "pearson_delta_pert": pearson_delta_reference(ate_true, ate_pred, reference).to_numpy(),
        "centroid_accuracy": centroid_accuracy(ate_true, ate_pred).to_numpy(),
    }
    if de_qvalues is not None:
        missing = [r for r in ate_true.index if r not in de_qvalues.index]
        if missing:
            raise ValueError(f"de_qvalues lacks perturbation(s) {missing[:10]} of ate_true")
        q = de_qvalues.loc[ate_true.index, ate_true.columns].to_numpy(dtype=np.float64)
        t = ate_true.to_numpy(dtype=np.float64)
        out["_de"] = _subset(t, ate_pred.to_numpy(dtype=np.float64), de_top_k(q, t, k))
    return out


def ate_metrics(
    ate_true: pd.DataFrame,
    ate_pred: pd.DataFrame,
    top_k: int = 20,
    *,
    de_qvalues: pd.DataFrame | None = None,
    reference: np.ndarray | pd.Series | None = None,
    singles_true: pd.DataFrame | None = None,
    singles_pred: pd.DataFrame | None = None,
    sep: str = "+",
) -> dict[str, float]:
    """Compare a predicted ATE matrix with the empirical one.

    Rows are aligned by perturbation label and columns by gene (``ate_pred`` may hold extra rows or
    columns; they are ignored). For each perturbation, its top-k genes are the k largest ``|true ATE|``
    (``np.argsort(-abs(x), kind="stable")``: ties keep the lower column first); k = min(top_k, G).

    Args:
        ate_true: (A, G) empirical ATE; ate_pred: (A', G') predicted ATE holding its rows and columns.
        top_k: k of the top-k metrics.
        de_qvalues: (A, G) DE q-values of the held-out cells
            (:func:`pyrovae.evaluate.metrics.de_qvalues`): the ``*_de_topk`` metrics score the k genes
            with the smallest q per perturbation (NaN without).
        reference: (G,) the effect of the average perturbed cell, for ``pearson_delta_pert`` (default: the
            mean of the rows of ``ate_true``).
        singles_true, singles_pred: (S, G) true and predicted ATEs of the members of the combinations in
            ``ate_true``, for the interaction metrics (NaN without ``singles_true``; ``singles_pred``
            defaults to ``ate_pred``'s own rows).
        sep: the combination separator of the labels.

    The returned dict holds floats (NaN where undefined, e.g. a constant vector's Pearson r):

    - ``pearson``, ``r2``: pooled over all (perturbation, gene) entries; r2 = 1 - SS_res/SS_tot with
      y_true = data (sklearn ``r2_score`` convention, but NaN for constant data).
    - ``pearson_topk``, ``r2_topk``: the same over the per-perturbation top-k entries only.
    - ``pearson_per_pert_mean``, ``pearson_per_pert_median``: Pearson r over all genes computed per
      perturbation, then averaged (NaN rows, i.e. constant rows, ignored).
    - ``mse``, ``mse_topk``: mean squared error over all entries / over the top-k entries; ``mae``: mean
      absolute error over all entries.
    - ``direction_acc_topk``: fraction of top-k entries where sign(pred) == sign(true); entries whose true
      ATE is exactly 0 have no direction and are left out.
    - ``jaccard_topk``: Jaccard index of the top-k ``|true|`` and top-k ``|pred|`` gene sets, averaged over
      perturbations.
    - ``pds``: mean perturbation discrimination score (cell-eval; 1 perfect, (A + 1) / 2A chance);
      ``rank``: mean PerturBench rank (0 perfect, 0.5 chance); ``centroid_accuracy``: systema's (1
      perfect, 1 / A chance); ``pearson_delta_pert``: systema's Pearson delta from the perturbed mean,
      averaged over perturbations (:mod:`pyrovae.evaluate.metrics` defines each).
    - ``pearson_de_topk``, ``mse_de_topk``, ``direction_acc_de_topk``: the top-k metrics on the k genes of
      smallest DE q-value instead of the k largest ``|true ATE|``.
    - ``interaction_mse``, ``interaction_pearson``, ``n_interactions``: predicted versus observed
      AB - (A + B) of the combinations (:func:`pyrovae.evaluate.metrics.interaction_metrics`).
    - ``top_k``: the k used; ``n_perturbations``: number of rows scored.

    Returns:
        dict[str, float], the metrics above.

    Raises:
        ValueError: ``ate_pred`` lacks labels/genes of ``ate_true``, non-finite values, top_k < 1.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    pred_all = ate_pred
    ate_true, ate_pred = _align(ate_true, ate_pred)
    t = ate_true.to_numpy(dtype=np.float64)
    p = ate_pred.to_numpy(dtype=np.float64)
    for name, arr, df in (("ate_true", t, ate_true), ("ate_pred", p, ate_pred)):
        bad = ~np.isfinite(arr).all(1)
        if bad.any():
            raise ValueError(
                f"{name} has non-finite values for perturbation(s) {list(df.index[bad])[:10]}; "
                "drop those rows first (ate_table does)"
            )
    n_pert, n_genes = t.shape
    k = min(int(top_k), n_genes)
    out = {key: float("nan") for key in METRIC_KEYS}
    out["top_k"] = float(k)
    out["n_perturbations"] = float(n_pert)
    out["n_interactions"] = 0.0
    if n_pert == 0 or n_genes == 0:
        return out
    rm = _row_metrics(t, p, k)
    out["pearson"] = pearson(t, p)
    out["r2"] = _r2(t, p)
    out["pearson_topk"] = pearson(rm["_tt"], rm["_pt"])
    out["r2_topk"] = _r2(rm["_tt"], rm["_pt"])
    out["pearson_per_pert_mean"] = _nan_stat(rm["pearson"], np.mean)
    out["pearson_per_pert_median"] = _nan_stat(rm["pearson"], np.median)
    out["mse"] = float(((t - p) ** 2).mean())
    out["mae"] = float(np.abs(t - p).mean())
    out["mse_topk"] = float(((rm["_tt"] - rm["_pt"]) ** 2).mean())
    n_nz = int(rm["_nonzero"].sum())
    out["direction_acc_topk"] = float(rm["_agree"].sum() / n_nz) if n_nz else float("nan")
    out["jaccard_topk"] = float(rm["jaccard_topk"].mean())
    fr = _field_rows(ate_true, ate_pred, k, de_qvalues, reference, sep)
    for key in ("pds", "rank", "pearson_delta_pert", "centroid_accuracy"):
        out[key] = _nan_stat(fr[key], np.mean)
    if "_de" in fr:
        de = fr["_de"]
        out["pearson_de_topk"] = pearson(de["tt"], de["pt"])
        out["mse_de_topk"] = float(((de["tt"] - de["pt"]) ** 2).mean())
        n_de = int(de["nonzero"].sum())
        out["direction_acc_de_topk"] = float(de["agree"].sum() / n_de) if n_de else float("nan")
    if singles_true is not None:
        singles_pred = pred_all if singles_pred is None else singles_pred
        out.update(
            interaction_metrics(
                interaction_residuals(ate_true, singles_true, sep),
                interaction_residuals(ate_pred, singles_pred.reindex(columns=ate_true.columns), sep),
            )
        )
    return out


def _finite_rows(ate_true: pd.DataFrame, pred: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Align, then drop the rows where the prediction (or the truth) is not finite; return n dropped."""
    ate_true, pred = _align(ate_true, pred)
    ok = np.isfinite(pred.to_numpy(dtype=np.float64)).all(1) & np.isfinite(
        ate_true.to_numpy(dtype=np.float64)
    ).all(1)
    return ate_true.loc[ok], pred.loc[ok], int((~ok).sum())


def ate_table(
    ate_true: pd.DataFrame,
    predictions: dict[str, pd.DataFrame],
    top_k: int = 20,
    *,
    de_qvalues: pd.DataFrame | None = None,
    reference: np.ndarray | pd.Series | None = None,
    singles_true: pd.DataFrame | None = None,
    singles_preds: dict[str, pd.DataFrame] | None = None,
    sep: str = "+",
) -> pd.DataFrame:
    """One row of :func:`ate_metrics` per predictor (model or baseline).

    For each predictor, the perturbations whose predicted (or true) row holds a NaN are dropped (e.g. a
    ``train_mean`` baseline for a combination with no training cells); ``n_perturbations`` is the number
    scored and ``n_dropped`` the number left out, so rows scored on different subsets can be told apart.

    Args:
        ate_true: (A, G) empirical ATE.
        predictions: ``{name: (A', G') ATE DataFrame}``; each must contain every label/gene of ``ate_true``.
        top_k, de_qvalues, reference, singles_true, sep: see :func:`ate_metrics`.
        singles_preds: ``{name: (S, G) ATEs of the combinations' members}`` as each predictor predicts
            them (default: the predictor's own rows).

    Returns:
        DataFrame indexed by predictor name (index name ``"method"``), columns = metric names +
        ``n_dropped``.
    """
    rows = {}
    for name, pred in predictions.items():
        t, p, dropped = _finite_rows(ate_true, pred)
        sp_pred = (singles_preds or {}).get(name, pred)
        metrics = ate_metrics(
            t,
            p,
            top_k,
            de_qvalues=de_qvalues,
            reference=reference,
            singles_true=singles_true,
            singles_pred=sp_pred,
            sep=sep,
        )
        rows[name] = {**metrics, "n_dropped": float(dropped)}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[*METRIC_KEYS, "n_dropped"])
    table.index.name = "method"
    for col in ("top_k", "n_perturbations", "n_dropped", "n_interactions"):
        table[col] = table[col].astype(int)
    return table


#: the columns of :func:`per_perturbation_metrics` after ``method`` and ``perturbation``
PER_PERTURBATION_KEYS = (
    "pearson",
    "pearson_topk",
    "mse",
    "mse_topk",
    "direction_acc_topk",
    "jaccard_topk",
    "mae",
    "pds",
    "rank",
    "pearson_delta_pert",
    "centroid_accuracy",
    "pearson_de_topk",
    "mse_de_topk",
    "direction_acc_de_topk",
)


def per_perturbation_metrics(
    ate_true: pd.DataFrame,
    predictions: dict[str, pd.DataFrame],
    top_k: int = 20,
    *,
    de_qvalues: pd.DataFrame | None = None,
    reference: np.ndarray | pd.Series | None = None,
    sep: str = "+",
) -> pd.DataFrame:
    """Long table of per-perturbation metrics for every predictor.

    Columns: ``method``, ``perturbation``, then :data:`PER_PERTURBATION_KEYS`: ``pearson`` (all genes),
    ``pearson_topk``, ``mse``, ``mse_topk``, ``direction_acc_topk``, ``jaccard_topk``, ``mae``, ``pds``,
    ``rank``, ``pearson_delta_pert``, ``centroid_accuracy`` and (NaN without ``de_qvalues``) the DE top-k
    ``pearson_de_topk``, ``mse_de_topk``, ``direction_acc_de_topk`` (definitions as in :func:`ate_metrics`,
    computed on one row; pds, rank and centroid accuracy compare the row with all scored rows). Rows whose
    prediction is not finite are left out.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    cols = list(PER_PERTURBATION_KEYS)
    frames = []
    for name, pred in predictions.items():
        t, p, _ = _finite_rows(ate_true, pred)
        if len(t) == 0 or t.shape[1] == 0:
            continue
        k = min(int(top_k), t.shape[1])
        tn, pn = t.to_numpy(dtype=np.float64), p.to_numpy(dtype=np.float64)
        rm = _row_metrics(tn, pn, k)
        fr = _field_rows(t, p, k, de_qvalues, reference, sep)
        row = {c: rm[c] for c in cols[:7]}
        row.update({c: fr[c] for c in ("pds", "rank", "pearson_delta_pert", "centroid_accuracy")})
        nan = np.full(len(t), np.nan)
        de = fr.get("_de")
        row["pearson_de_topk"] = (
            nan if de is None else np.array([pearson(a, b) for a, b in zip(de["tt"], de["pt"])])
        )
        row["mse_de_topk"] = nan if de is None else ((de["tt"] - de["pt"]) ** 2).mean(1)
        row["direction_acc_de_topk"] = nan if de is None else de["direction"]
        df = pd.DataFrame(row)
        df.insert(0, "perturbation", [str(i) for i in t.index])
        df.insert(0, "method", name)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["method", "perturbation", *cols])
    return pd.concat(frames, ignore_index=True)
