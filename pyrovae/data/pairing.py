"""Control pairing (OT) and ΔX for GPO-VAE (QC flags and counterfactuals: :mod:`pyrovae.data.qc`).

Pure numpy / scipy / POT on plain arrays; no torch, no pyro. A counts matrix argument ``counts`` is an
``(n_cells, n_genes)`` dense :class:`numpy.ndarray` or a :mod:`scipy.sparse` matrix (CSR preferred). A
sparse matrix is never densified as a whole: only the rows or columns a computation needs are.

What is here, and how it departs from the reference code (its QC, control pairing and counterfactual steps):

* :func:`log_normalize` -- ``normalize_total`` (target = median library size) then ``log1p``.
* :func:`ot_pair` / :func:`pair_with_controls` -- each perturbed cell gets one control of the same split,
  the argmax of an optimal-transport plan between the perturbation's cells and the split's controls
  (uniform marginals). Unlike the reference, the cost is the Euclidean distance *normalised by its mean*,
  so ``reg`` is relative to the typical cost (the reference's ``reg=1`` on ``cost/100`` made the plan
  almost uniform); matches are returned as integer row positions per cell, not written back in an
  assumed obs order; controls are paired with controls too, never with themselves (when >= 2 exist).
* :func:`delta_x` -- ``|y_i - y_m(i)|`` on log-normalised expression.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from pyrovae.data.extras import median_positive, normalized_rows, row_totals
from pyrovae.data.loader import is_backed
from pyrovae.data.matrix import (
    as_indexable,
    group_seed,
    label_strings,
    matrix_shape,
    normalize_log,
    split_strings,
)

__all__ = [
    "log_normalize",
    "ot_pair",
    "pair_with_controls",
    "delta_x",
]

#: Cost given to forbidden (self) pairs; costs are normalised to mean 1, so this is never optimal.
_FORBIDDEN_COST = 1.0e4
#: Largest (shifted) cost / reg for which the scaling-domain Sinkhorn is used by ``sinkhorn_method="auto"``.
_SCALING_SAFE_RATIO = 200.0
#: Relative tolerance under which two plan entries of a row count as tied (ties -> the cheaper control).
_TIE_RTOL = 1e-9


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _as_index(idx: Any, n: int, what: str) -> np.ndarray:
    """Integer positions from integer positions or a boolean mask of length ``n``."""
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"boolean {what} must have length {n}, got shape {arr.shape}")
        return np.flatnonzero(arr)
    arr = arr.astype(np.int64, copy=False).ravel()
    if arr.size and (arr.min() < -n or arr.max() >= n):
        raise ValueError(f"{what} out of range for {n} entries")
    return np.where(arr < 0, arr + n, arr)


# ----------------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------------


def log_normalize(
    counts: Any,
    genes_idx: np.ndarray | Sequence[int] | None = None,
    target_sum: float | None = None,
) -> np.ndarray:
    """``log1p(normalize_total(counts))`` restricted to some genes.

    Every cell is scaled to ``target_sum`` total counts, where a cell's total is taken over ALL genes, then
    the natural ``log1p`` is applied. Cells with no counts stay at 0.

    Args:
        counts: (n_cells, n_genes) counts, dense or scipy.sparse.
        genes_idx: integer positions (or a boolean mask over genes) of the columns to return; None returns
            all genes (then the output is dense (n_cells, n_genes), also for sparse input).
        target_sum: the common total; default the median library size of the cells with a non-zero total
            (as scanpy's ``normalize_total``).

    Returns:
        (n_cells, len(genes_idx)) float64 dense array.
    """
    counts = as_indexable(counts)
    n, g = matrix_shape(counts)
    if target_sum is not None and (not np.isfinite(target_sum) or target_sum <= 0):
        raise ValueError(f"target_sum must be a positive number, got {target_sum!r}")
    cols = None if genes_idx is None else _as_index(genes_idx, g, "genes_idx")
    return normalize_log(counts, target_sum, cols, base="e")


# ----------------------------------------------------------------------------------------------------
# optimal-transport pairing
# ----------------------------------------------------------------------------------------------------


def _pot() -> Any:
    """The POT module, imported on first use: ``import ot`` takes about a second (it probes its array
    backends) and only the OT solve needs it, so ``import pyrovae`` (which imports this module through
    :mod:`pyrovae.data.grn`) does not pay for it."""
    import ot

    return ot


def _sinkhorn_plan(
    a: np.ndarray,
    b: np.ndarray,
    cost: np.ndarray,
    reg: float,
    forbid: np.ndarray | None,
    sinkhorn_method: str,
    num_iter_max: int,
    stop_thr: float,
) -> np.ndarray:
    """Entropic plan, (n_p, n_c). Shifts the cost by row and column minima first: this changes only the
    scaling vectors, not the plan, and makes every row and column of the Gibbs kernel hold a 1, which
    keeps the (fast, matrix-vector) scaling-domain iterations finite."""
    shifted = cost - cost.min(axis=1, keepdims=True)
    shifted -= shifted.min(axis=0, keepdims=True)
    if sinkhorn_method == "auto":
        allowed = shifted if forbid is None else np.where(forbid, 0.0, shifted)
        ratio = float(allowed.max()) / reg if allowed.size else 0.0
        sinkhorn_method = "sinkhorn" if ratio <= _SCALING_SAFE_RATIO else "sinkhorn_log"
    ot = _pot()

    def run(m: str) -> tuple[np.ndarray, list[warnings.WarningMessage]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = ot.sinkhorn(a, b, shifted, reg, method=m, numItermax=num_iter_max, stopThr=stop_thr)
        return np.asarray(plan, dtype=np.float64), list(caught)

    plan, caught = run(sinkhorn_method)
    numerical = any("numerical errors" in str(w.message).lower() for w in caught)
    if sinkhorn_method == "sinkhorn" and (numerical or not np.all(np.isfinite(plan))):
        plan, caught = run("sinkhorn_log")  # stable fallback for tiny reg / extreme costs
    for w in caught:
        warnings.warn(f"ot_pair (Sinkhorn, reg={reg}): {w.message}", RuntimeWarning, stacklevel=4)
    if not np.all(np.isfinite(plan)):
        raise FloatingPointError(f"Sinkhorn produced a non-finite plan (reg={reg}); increase reg")
    return plan


def _match_from_plan(plan: np.ndarray, cost: np.ndarray, forbid: np.ndarray | None) -> np.ndarray:
    """m(i) = argmax_j plan_ij; ties (within a relative 1e-9) go to the cheapest control, forbidden
    entries are never chosen while another control exists."""
    if forbid is not None:
        plan = np.where(forbid, -np.inf, plan)
    row_max = plan.max(axis=1, keepdims=True)
    tol = np.where(np.isfinite(row_max), np.abs(row_max) * _TIE_RTOL, 0.0)
    candidate = plan >= row_max - tol
    return np.where(candidate, cost, np.inf).argmin(axis=1)


def _solve_block(
    xp: np.ndarray,
    xc: np.ndarray,
    method: str,
    reg: float,
    pid: np.ndarray | None,
    cid: np.ndarray | None,
    sinkhorn_method: str,
    num_iter_max: int,
    stop_thr: float,
) -> np.ndarray:
    """Balanced OT between the rows of xp and xc (uniform marginals); returns (len(xp),) indices into xc."""
    ot = _pot()
    n_p, n_c = xp.shape[0], xc.shape[0]
    cost = np.asarray(ot.dist(xp, xc, metric="euclidean"), dtype=np.float64)
    scale = float(cost.mean())
    cost /= scale if np.isfinite(scale) and scale > 0 else 1.0
    forbid = None
    if pid is not None and cid is not None:
        forbid = pid[:, None] == cid[None, :]
        if forbid.any():
            cost[forbid] = _FORBIDDEN_COST
        else:
            forbid = None
    if n_c == 1:
        return np.zeros(n_p, dtype=np.int64)
    a = np.full(n_p, 1.0 / n_p)
    b = np.full(n_c, 1.0 / n_c)
    if method == "emd":
        plan = ot.emd(a, b, cost, numItermax=max(1_000_000, 20 * n_p * n_c))
    else:
        plan = _sinkhorn_plan(a, b, cost, reg, forbid, sinkhorn_method, num_iter_max, stop_thr)
    return _match_from_plan(np.asarray(plan, dtype=np.float64), cost, forbid)


def ot_pair(
    features_pert: np.ndarray,
    features_ctrl: np.ndarray,
    method: Literal["sinkhorn", "emd", "auto"] = "auto",
    reg: float = 0.05,
    max_controls: int = 2000,
    seed: int = 0,
    exact_max: int = 500,
    *,
    batch_size: int | None = None,
    pert_ids: np.ndarray | None = None,
    ctrl_ids: np.ndarray | None = None,
    sinkhorn_method: Literal["auto", "sinkhorn", "sinkhorn_log"] = "auto",
    num_iter_max: int = 1000,
    stop_thr: float = 1e-9,
) -> np.ndarray:
    """Match every perturbed cell to one control by optimal transport.

    The problem: uniform marginals over the perturbed cells and over the controls; cost
    ``C_ij = ||x_i - c_j||_2 / mean(C)`` (Euclidean distance, not squared, divided by the mean distance of
    the problem solved, so ``reg`` is relative to the typical cost and does not depend on the scale of the
    features); ``m(i) = argmax_j Gamma_ij``. Row ties (for example the equal pieces an exact plan gives a
    cell when there are fewer perturbed cells than controls) go to the cheapest tied control.

    Methods: ``"emd"`` is the exact plan (``ot.emd``, network simplex); ``"sinkhorn"`` the entropic plan
    ``ot.sinkhorn(reg=reg)``; ``"auto"`` uses emd when ``max(n_p, n_c) <= exact_max``, else Sinkhorn.
    Sinkhorn runs on the cost shifted by its row and column minima (same plan, better conditioned).
    ``sinkhorn_method="auto"`` then uses POT's scaling-domain ``"sinkhorn"`` (matrix-vector products) when
    ``max(shifted cost) / reg <= 200`` -- where it cannot overflow -- and the log-domain ``"sinkhorn_log"``
    otherwise; a scaling run that still reports numerical errors is redone in the log domain. (On a
    2000 x 2000 problem both give the same plan, but the log domain takes ~40x longer: ~85 s vs ~2 s.)

    Scaling to large groups: one dense (n_p, n_c) problem costs O(n_p * n_c) memory and time per
    iteration. When ``n_c > max_controls`` the controls are split (seeded random permutation) into
    ``k = ceil(n_c / max_controls)`` near-equal blocks, and the perturbed cells (seeded permutation) into
    ``B`` near-equal batches, ``B`` the smallest multiple of ``k`` with batches of at most ``batch_size``
    (default ``max_controls``) cells; batch ``b`` is solved against control block ``b mod k`` with uniform
    marginals on both sides. Every control block thus serves the same share of perturbed cells (the
    sub-marginals add up to the uniform global marginal), every control can be used (a partition, not a
    subsample), and the cost is ``B`` problems of at most ``batch_size x max_controls`` -- O(n_p *
    max_controls) in total instead of O(n_p * n_c). The price: a cell is compared only with the controls
    of its block (about ``max_controls`` of them), so its match is the best within a random subset.

    Deterministic for a given ``seed`` (the only randomness is the two permutations).

    Args:
        features_pert: (n_p, f) features of the cells to pair.
        features_ctrl: (n_c, f) features of the candidate controls.
        method: ``"auto"``, ``"emd"`` or ``"sinkhorn"``.
        reg: entropic regularisation, relative to the mean cost (Sinkhorn only).
        max_controls: most controls in one OT problem.
        seed: seed of the block / batch permutations.
        exact_max: size up to which ``"auto"`` uses the exact plan.
        batch_size: most perturbed cells in one OT problem (default ``max_controls``).
        pert_ids, ctrl_ids: optional (n_p,) and (n_c,) identifiers; a cell is never matched to a control
            with the same identifier while another control is available (used to pair controls with
            controls without self-matches).
        sinkhorn_method: ``"auto"``, ``"sinkhorn"`` (scaling domain) or ``"sinkhorn_log"``.
        num_iter_max, stop_thr: Sinkhorn iteration limit and marginal-error tolerance.

    Returns:
        (n_p,) int64 indices into ``features_ctrl``.
    """
    xp = np.asarray(features_pert, dtype=np.float64)
    xc = np.asarray(features_ctrl, dtype=np.float64)
    if xp.ndim != 2 or xc.ndim != 2 or xp.shape[1] != xc.shape[1]:
        raise ValueError(
            f"features must be (n_p, f) and (n_c, f) with the same f, got {xp.shape} and {xc.shape}"
        )
    n_p, n_c = xp.shape[0], xc.shape[0]
    if n_c == 0:
        raise ValueError("ot_pair needs at least one control cell")
    if n_p == 0:
        return np.zeros(0, dtype=np.int64)
    if not (np.all(np.isfinite(xp)) and np.all(np.isfinite(xc))):
        raise ValueError("features contain NaN or inf")
    if method not in ("auto", "emd", "sinkhorn"):
        raise ValueError(f"method must be 'auto', 'emd' or 'sinkhorn', got {method!r}")
    if sinkhorn_method not in ("auto", "sinkhorn", "sinkhorn_log"):
        raise ValueError(
            f"sinkhorn_method must be 'auto', 'sinkhorn' or 'sinkhorn_log', got {sinkhorn_method!r}"
        )
    if method != "emd" and not reg > 0:
        raise ValueError(f"reg must be > 0, got {reg!r}")
    if max_controls < 1:
        raise ValueError(f"max_controls must be >= 1, got {max_controls}")
    batch_size = max_controls if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (pert_ids is None) != (ctrl_ids is None):
        raise ValueError("give both pert_ids and ctrl_ids, or neither")
    if pert_ids is not None:
        pert_ids = np.asarray(pert_ids).ravel()
        ctrl_ids = np.asarray(ctrl_ids).ravel()
        if pert_ids.shape != (n_p,) or ctrl_ids.shape != (n_c,):
            raise ValueError("pert_ids / ctrl_ids must have one entry per perturbed cell / control")
    if method == "auto":
        method = "emd" if max(n_p, n_c) <= exact_max else "sinkhorn"

    rng = np.random.default_rng(seed)
    k = math.ceil(n_c / max_controls)
    ctrl_order = rng.permutation(n_c) if k > 1 else np.arange(n_c)
    ctrl_blocks = np.array_split(ctrl_order, k)
    n_batches = k * math.ceil(math.ceil(n_p / batch_size) / k)
    pert_order = rng.permutation(n_p) if n_batches > 1 else np.arange(n_p)
    batches = np.array_split(pert_order, n_batches)

    matched = np.empty(n_p, dtype=np.int64)
    for bi, rows in enumerate(batches):
        if rows.size == 0:
            continue
        block = ctrl_blocks[bi % k]
        local = _solve_block(
            xp[rows],
            xc[block],
            method,
            reg,
            None if pert_ids is None else pert_ids[rows],
            None if ctrl_ids is None else ctrl_ids[block],
            sinkhorn_method,
            num_iter_max,
            stop_thr,
        )
        matched[rows] = block[local]
    return matched


def pair_with_controls(
    counts: Any,
    labels: Sequence[str] | np.ndarray,
    splits: Sequence[Any] | np.ndarray | None,
    control_label: str,
    feature_genes_idx: np.ndarray | Sequence[int],
    method: Literal["sinkhorn", "emd", "auto"] = "auto",
    reg: float = 0.05,
    seed: int = 0,
    max_controls: int = 2000,
    *,
    exact_max: int = 500,
    batch_size: int | None = None,
    target_sum: float | None = None,
    features: np.ndarray | None = None,
    totals: np.ndarray | None = None,
) -> np.ndarray:
    """Pair every cell with a control of its own split (the reference's OT pairing, done right).

    Features are :func:`log_normalize` of ``counts`` on ``feature_genes_idx`` (the target sum is the
    median library size over all cells, as in :func:`delta_x`, unless ``target_sum`` is given). Then, for
    every split separately (the whole data when ``splits`` is None) and every label in that split, the
    label's cells are paired with the split's controls by :func:`ot_pair`. Controls are paired with the
    controls of their split too, excluding self-matches when the split has >= 2 controls (a control
    matched to itself would give ΔX = 0 by construction); a lone control is its own match. Each (split,
    label) group gets its own seed derived from ``seed`` and the group's names, so a group's pairing does
    not depend on which other labels exist.

    Args:
        counts: (n_cells, n_genes) counts, dense or sparse.
        labels: (n_cells,) perturbation labels; ``control_label`` marks controls.
        splits: (n_cells,) split names, or None. Cells whose split is ``""``, None or NaN are unused.
        control_label: the label of control cells.
        feature_genes_idx: gene positions (or boolean mask) of the pairing features.
        method, reg, max_controls, exact_max, batch_size: passed to :func:`ot_pair`.
        seed: base seed.
        target_sum: normalisation target (default: median library size).
        features: the features, if the caller has them already: ``log_normalize(counts,
            feature_genes_idx, target_sum)`` (n_cells, len(feature_genes_idx)); default: computed here,
            split by split and group by group (the split's controls once, then each label's cells), so
            memory is O((controls of a split + cells of a label) x features), never O(n_cells x features);
            ``counts`` may then be an on-disk (backed) matrix.
        totals: (n_cells,) each cell's total over all genes, if the caller has them
            (:func:`pyrovae.data.extras.row_totals`); default: computed here.

    Returns:
        (n_cells,) int64: the global row position of each cell's matched control; -1 for unused cells.

    Raises:
        ValueError: when a split has perturbed cells but no control cells.
    """
    counts = counts if is_backed(counts) else as_indexable(counts)
    n, g = matrix_shape(counts)
    lab = label_strings(labels, n)
    split_names, used = split_strings(splits, n)
    control_label = str(control_label)
    if features is None:
        if target_sum is not None and (not np.isfinite(target_sum) or target_sum <= 0):
            raise ValueError(f"target_sum must be a positive number, got {target_sum!r}")
        cols = _as_index(feature_genes_idx, g, "feature_genes_idx")
        tot = row_totals(counts) if totals is None else np.asarray(totals, dtype=np.float64).reshape(-1)
        ts = median_positive(tot) if target_sum is None else float(target_sum)

        def feats_of(rows: np.ndarray) -> np.ndarray:
            return normalized_rows(counts, rows, cols, tot, ts)
    else:

        def feats_of(rows: np.ndarray) -> np.ndarray:
            return features[rows]

    matched = np.full(n, -1, dtype=np.int64)
    for split in sorted(set(split_names[used].tolist())):
        in_split = used & (split_names == split)
        ctrl_rows = np.flatnonzero(in_split & (lab == control_label))
        groups = sorted(set(lab[in_split].tolist()))
        ctrl_feats = feats_of(ctrl_rows) if ctrl_rows.size else None
        if ctrl_rows.size == 0:
            shown = ", ".join(repr(g) for g in groups[:5]) + (", ..." if len(groups) > 5 else "")
            raise ValueError(
                f"split {split!r} has no control cells labelled {control_label!r}; every split with "
                f"perturbed cells needs controls of its own to pair with (labels in this split: {shown}). "
                "Check control_label, or assign some control cells to this split."
            )
        for g in groups:
            rows = np.flatnonzero(in_split & (lab == g))
            is_ctrl = g == control_label
            exclude_self = is_ctrl and ctrl_rows.size >= 2
            local = ot_pair(
                ctrl_feats if is_ctrl else feats_of(rows),
                ctrl_feats,
                method=method,
                reg=reg,
                max_controls=max_controls,
                seed=group_seed(seed, "pair", split, g),
                exact_max=exact_max,
                batch_size=batch_size,
                pert_ids=rows if exclude_self else None,
                ctrl_ids=ctrl_rows if exclude_self else None,
            )
            matched[rows] = ctrl_rows[local]
    return matched


def delta_x(
    counts: Any,
    matched: np.ndarray,
    genes_idx: np.ndarray | Sequence[int],
    target_sum: float | None = None,
) -> np.ndarray:
    """The reference's ΔX_i = ``|y_i - y_m(i)|`` with ``y = log_normalize(counts, genes_idx, target_sum)``.

    Args:
        counts: (n_cells, n_genes) counts, dense or sparse.
        matched: (n_cells,) row position of each cell's matched control, -1 for none.
        genes_idx: gene positions (or boolean mask) of the ΔX columns (the GRN genes).
        target_sum: normalisation target (default: median library size over all cells).

    Returns:
        (n_cells, len(genes_idx)) float32; rows with ``matched == -1`` are 0.
    """
    counts = as_indexable(counts)
    n, _ = matrix_shape(counts)
    m = np.asarray(matched).ravel()
    if m.shape != (n,):
        raise ValueError(f"matched must have one entry per cell ({n}), got shape {m.shape}")
    m = m.astype(np.int64)
    if m.size and (m.min() < -1 or m.max() >= n):
        raise ValueError("matched holds positions outside [-1, n_cells)")
    y = log_normalize(counts, genes_idx, target_sum=target_sum)
    return np.abs(paired_difference(y, m)).astype(np.float32)


def paired_difference(y: np.ndarray, matched: np.ndarray) -> np.ndarray:
    """(n_cells, G) y_i - y_m(i) for each cell and its matched control ``matched[i]``; 0 for -1 (no match)."""
    m = np.asarray(matched, dtype=np.int64).reshape(-1)
    out = np.zeros_like(y)
    has = m >= 0
    out[has] = y[has] - y[m[has]]
    return out
