"""Recovery of a planted latent structure: treatment masks and latent effects (simulations).

Definitions follow the SAMS-VAE reference code's ``get_mask_stats`` and ``mean_corr_coef``: latent
coordinates are identifiable only up to a permutation, so estimated latents are first matched to the true
ones by the Hungarian algorithm. Pure numpy/scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

__all__ = ["match_latents", "mask_recovery", "effect_recovery", "planted_rows", "planted_structure"]


def _as_2d(a: Any, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (treatments, latents), got shape {a.shape}")
    return a


def _check_rows(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{na} has {a.shape[0]} treatment rows but {nb} has {b.shape[0]}")


def match_latents(
    mask_true: np.ndarray, mask_est: np.ndarray, agreement: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of estimated to true latent columns, maximising true-positive overlap.

    TP = mask_true.T @ mask_est is the (K_true, K_est) count of treatments where true column i and
    estimated column j are both on; ``scipy.optimize.linear_sum_assignment(-TP)``. ``agreement=True``
    maximises TP + TN (both on or both off; e.g. for probabilities in [0, 1], as the mask heatmap).

    Args:
        mask_true: (T, K_true) binary (bool or 0/1) true mask.
        mask_est: (T, K_est) binary estimated mask (or probabilities with ``agreement``).

    Returns:
        (row_ind, col_ind): int arrays of length min(K_true, K_est); true column ``row_ind[i]`` is
        matched to estimated column ``col_ind[i]``.
    """
    mt = _as_2d(mask_true, "mask_true").astype(np.float64)
    me = _as_2d(mask_est, "mask_est").astype(np.float64)
    _check_rows(mt, me, "mask_true", "mask_est")
    score = mt.T @ me + ((1 - mt).T @ (1 - me) if agreement else 0.0)
    row, col = linear_sum_assignment(-score)
    return row.astype(np.int64), col.astype(np.int64)


def _matched_tp(mt: np.ndarray, me: np.ndarray) -> float:
    row, col = match_latents(mt, me)
    return float((mt.T @ me)[row, col].sum())


def _prf(tp: float, n_est: float, n_true: float) -> tuple[float, float, float]:
    precision = tp / n_est if n_est > 0 else 0.0
    recall = tp / n_true if n_true > 0 else 0.0
    f1 = 2.0 * tp / (n_est + n_true) if (n_est + n_true) > 0 else 0.0
    return precision, recall, f1


def mask_recovery(
    mask_true: np.ndarray,
    mask_est_probs: np.ndarray,
    threshold: float = 0.5,
    n_chance: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Precision, recall and F1 of an estimated treatment mask after latent matching, with a chance level.

    The estimated mask is 1[probability > threshold]. After :func:`match_latents`, with matched TP the
    sum of the overlaps of matched column pairs (as the SAMS-VAE code does):

    - precision = matched TP / #estimated positives (all estimated columns, matched or not);
    - recall = matched TP / #true positives;
    - F1 = 2 matched TP / (#estimated + #true positives).

    Any zero denominator gives 0 (no division by zero).

    Chance baseline (Monte Carlo, not analytic: the Hungarian step makes the analytic expectation
    intractable): ``n_chance`` random masks of shape (T, K_est) with the same number of positives as the
    estimated mask (uniformly random positions: a seeded permutation of the flattened estimated mask),
    each matched and scored the same way; ``chance_*`` are the averages and ``chance_f1_std`` the spread.
    A recovered mask is "better than chance" when ``f1`` clearly exceeds ``chance_f1``.

    Args:
        mask_true: (T, K_true) binary true mask.
        mask_est_probs: (T, K_est) estimated mask probabilities q(m = 1) (or a 0/1 mask).
        threshold: probabilities strictly above it count as positives.
        n_chance: number of random masks for the chance level (0 skips it: NaN).
        seed: seed of the random masks.

    Returns:
        dict with precision, recall, f1, matched_tp, n_true, n_est, chance_precision, chance_recall,
        chance_f1, chance_f1_std.
    """
    mt = (_as_2d(mask_true, "mask_true") != 0).astype(np.float64)
    probs = _as_2d(mask_est_probs, "mask_est_probs").astype(np.float64)
    _check_rows(mt, probs, "mask_true", "mask_est_probs")
    if np.isnan(probs).any():
        raise ValueError("mask_est_probs contains NaN")
    me = (probs > threshold).astype(np.float64)
    n_true, n_est = float(mt.sum()), float(me.sum())
    tp = _matched_tp(mt, me) if mt.shape[1] and me.shape[1] else 0.0
    precision, recall, f1 = _prf(tp, n_est, n_true)
    out = {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "matched_tp": tp,
        "n_true": n_true,
        "n_est": n_est,
    }
    if n_chance <= 0 or me.size == 0 or mt.shape[1] == 0:
        out.update(chance_precision=np.nan, chance_recall=np.nan, chance_f1=np.nan, chance_f1_std=np.nan)
        return out
    rng = np.random.default_rng(seed)
    flat = me.reshape(-1)
    scores = np.empty((n_chance, 3))
    for i in range(n_chance):
        rand = rng.permutation(flat).reshape(me.shape)
        scores[i] = _prf(_matched_tp(mt, rand), n_est, n_true)
    out.update(
        chance_precision=float(scores[:, 0].mean()),
        chance_recall=float(scores[:, 1].mean()),
        chance_f1=float(scores[:, 2].mean()),
        chance_f1_std=float(scores[:, 2].std()),
    )
    return out


def _standardise(a: np.ndarray) -> np.ndarray:
    """Column-wise z-scores; constant columns become 0 (so their correlation with anything is 0)."""
    a = a - a.mean(0)
    sd = np.sqrt((a**2).mean(0))
    return np.divide(a, sd, out=np.zeros_like(a), where=sd > 0)


def effect_recovery(
    effect_true: np.ndarray,
    effect_est: np.ndarray,
    method: str = "pearson",
    matching: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Mean correlation coefficient (MCC) between true and estimated latent effects after matching.

    C[i, j] = ``|corr(effect_true[:, i], effect_est[:, j])|`` over the T treatments (Pearson, or Spearman =
    Pearson of ranks). Unless ``matching`` is given, columns are matched by the Hungarian algorithm to
    maximise sum C (as in the sVAE/SAMS-VAE ``mean_corr_coef``); the MCC is the mean of C over the
    min(K, K_est) matched pairs. A constant column has correlation 0 with everything (not NaN).

    Args:
        effect_true: (T, K) true latent effects (e.g. mask * embedding).
        effect_est: (T, K_est) estimated effects (e.g. posterior mean of M * E).
        method: ``"pearson"`` or ``"spearman"``.
        matching: optional (row_ind, col_ind) to use instead, e.g. from :func:`match_latents` on the masks.

    Returns:
        dict with ``mcc`` (float), ``row_ind``, ``col_ind`` (matched columns) and ``abs_corr`` (``|corr|`` of
        each matched pair).
    """
    et = _as_2d(effect_true, "effect_true").astype(np.float64)
    ee = _as_2d(effect_est, "effect_est").astype(np.float64)
    _check_rows(et, ee, "effect_true", "effect_est")
    if method == "spearman":
        et = rankdata(et, axis=0)
        ee = rankdata(ee, axis=0)
    elif method != "pearson":
        raise ValueError(f"unknown method {method!r}; use 'pearson' or 'spearman'")
    if not (np.isfinite(et).all() and np.isfinite(ee).all()):
        raise ValueError("effects contain non-finite values")
    corr = np.abs(_standardise(et).T @ _standardise(ee)) / max(et.shape[0], 1)
    corr = np.clip(corr, 0.0, 1.0)
    if matching is None:
        row, col = linear_sum_assignment(-corr)
    else:
        row, col = (np.asarray(m, dtype=np.int64) for m in matching)
        if row.shape != col.shape:
            raise ValueError("matching must be two index arrays of the same length")
    vals = corr[row, col]
    return {
        "mcc": float(vals.mean()) if vals.size else float("nan"),
        "row_ind": np.asarray(row, dtype=np.int64),
        "col_ind": np.asarray(col, dtype=np.int64),
        "abs_corr": vals,
    }


def planted_rows(treatments: Sequence[str], planted: Sequence[str]) -> np.ndarray:
    """(T_planted,) the index in ``treatments`` (a model's treatment order) of each planted treatment.

    A clear error when the two sets differ (e.g. combinations encoded as their own treatments).
    """
    names = [str(t) for t in planted]
    have = [str(t) for t in treatments]
    missing, extra = sorted(set(names) - set(have)), sorted(set(have) - set(names))
    if missing or extra:
        raise ValueError(
            f"the data's treatments do not match the planted ones (missing {missing[:5]}, extra "
            f"{extra[:5]}); structure recovery needs the additive encoding of the simulated singles (no "
            "--encode-combos-as-unique)"
        )
    return np.asarray([have.index(t) for t in names])


def planted_structure(
    truth: dict[str, Any], effects: np.ndarray, mask_probs: np.ndarray | None = None, seed: int = 0
) -> dict[str, float]:
    """Recovery of a simulation's planted latent structure by a model, in the planted treatment order.

    Args:
        truth: the simulation's ground truth with ``latent_effects`` (T, K_true) and ``masks`` (T, K_true).
        effects: (T, K) the model's mean latent effect per planted treatment.
        mask_probs: (T, K) the model's q(m = 1) per planted treatment, or None for a model without masks.
        seed: seed of the chance level of :func:`mask_recovery`.

    Returns:
        ``effect_mcc`` (:func:`effect_recovery`), plus for a model with masks ``mask_precision``,
        ``mask_recall``, ``mask_f1``, ``mask_chance_f1``, ``mask_chance_f1_std``, ``mask_positives``,
        ``mask_true_positives`` (:func:`mask_recovery`).
    """
    out = {"effect_mcc": float(effect_recovery(np.asarray(truth["latent_effects"]), effects)["mcc"])}
    if mask_probs is not None:
        r = mask_recovery(np.asarray(truth["masks"]), mask_probs, seed=seed)
        out.update(
            mask_precision=r["precision"],
            mask_recall=r["recall"],
            mask_f1=r["f1"],
            mask_chance_f1=r["chance_f1"],
            mask_chance_f1_std=r["chance_f1_std"],
            mask_positives=float(r["n_est"]),
            mask_true_positives=float(r["n_true"]),
        )
    return out
