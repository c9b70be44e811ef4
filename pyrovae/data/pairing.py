"""Control pairing (OT), ΔX, QC flags and counterfactual expression for GPO-VAE / CRADLE-VAE.

Pure numpy / scipy / POT on plain arrays; no torch, no pyro. A counts matrix argument ``counts`` is an
``(n_cells, n_genes)`` dense :class:`numpy.ndarray` or a :mod:`scipy.sparse` matrix (CSR preferred). A
sparse matrix is never densified as a whole: only the rows or columns a computation needs are.

What is here, and how it departs from the reference code (reference §5.3, §5.7, §5.8, §10.7, 8, 10):

* :func:`log_normalize` -- ``normalize_total`` (target = median library size) then ``log1p``.
* :func:`ot_pair` / :func:`pair_with_controls` -- each perturbed cell gets one control of the same split,
  the argmax of an optimal-transport plan between the perturbation's cells and the split's controls
  (uniform marginals). Unlike the reference, the cost is the Euclidean distance *normalised by its mean*,
  so ``reg`` is relative to the typical cost (the reference's ``reg=1`` on ``cost/100`` made the plan
  almost uniform); matches are returned as integer row positions per cell, not written back in an
  assumed obs order; controls are paired with controls too, never with themselves (when >= 2 exist).
* :func:`delta_x` -- ``|y_i - y_m(i)|`` on log-normalised expression.
* :func:`qc_metrics` / :func:`qc_flags` -- the MAD rule of §5.3 with a guard for MAD = 0 (the reference
  then flags every cell off the median, e.g. every cell with a single haemoglobin read).
* :func:`counterfactual_expression` -- cfX as *intended*: the median of up to ``n_sample`` cells of the
  same label and split with the *opposite* QC status, sampled without replacement and seeded, indexed in
  the full matrix (the reference sampled with replacement from QC-failing cells only, unseeded, and used
  positions within a subset to index the full matrix).
"""

from __future__ import annotations

import math
import re
import warnings
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.data.matrix import dense_cols, dense_rows

__all__ = [
    "log_normalize",
    "ot_pair",
    "pair_with_controls",
    "delta_x",
    "qc_metrics",
    "qc_flags",
    "counterfactual_expression",
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


def _prepare(counts: Any) -> Any:
    """Sparse input in a row/column-indexable format (COO etc. -> CSR); dense input as an array."""
    if sp.issparse(counts):
        return counts if counts.format in ("csr", "csc") else counts.tocsr()
    return np.asarray(counts)


def _n_rows_cols(counts: Any) -> tuple[int, int]:
    if counts.ndim != 2:
        raise ValueError(f"counts must be a 2-D (cells, genes) matrix, got shape {counts.shape}")
    return int(counts.shape[0]), int(counts.shape[1])


def _library_sizes(counts: Any) -> np.ndarray:
    """(n_cells,) float64 total counts per cell over all genes (no densification)."""
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


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


def _used_split_mask(splits: Any, n: int) -> np.ndarray:
    """(n,) True for cells with a real split value; ``""``, whitespace, None and NaN mean 'unused'."""
    arr = np.asarray(splits, dtype=object).ravel()
    if arr.shape != (n,):
        raise ValueError(f"splits must have one entry per cell ({n}), got shape {arr.shape}")
    missing = pd.isna(pd.Series(arr)).to_numpy()
    blank = np.array([isinstance(v, str) and v.strip() == "" for v in arr], dtype=bool)
    return ~(missing | blank)


def _split_strings(splits: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(split names as str, used mask); all cells in one split ``"all"`` when ``splits`` is None."""
    if splits is None:
        return np.full(n, "all", dtype=object), np.ones(n, dtype=bool)
    used = _used_split_mask(splits, n)
    arr = np.asarray(splits, dtype=object).ravel()
    names = np.array([str(v) if u else "" for v, u in zip(arr, used)], dtype=object)
    return names, used


def _label_strings(labels: Any, n: int) -> np.ndarray:
    arr = np.asarray(labels, dtype=object).ravel()
    if arr.shape != (n,):
        raise ValueError(f"labels must have one entry per cell ({n}), got shape {arr.shape}")
    return np.array([str(v) for v in arr], dtype=object)


def _group_seed(seed: int, *keys: str | int) -> int:
    """A seed for one group that depends only on ``seed`` and the group's own keys (stable across runs
    and independent of which other groups exist)."""
    words = [int(seed) & 0xFFFFFFFF]
    for k in keys:
        words.append(zlib.crc32(str(k).encode("utf-8")))
    return int(np.random.SeedSequence(words).generate_state(1)[0])


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
    counts = _prepare(counts)
    n, g = _n_rows_cols(counts)
    lib = _library_sizes(counts)
    if target_sum is None:
        positive = lib[lib > 0]
        target_sum = float(np.median(positive)) if positive.size else 1.0
    elif not np.isfinite(target_sum) or target_sum <= 0:
        raise ValueError(f"target_sum must be a positive number, got {target_sum!r}")
    cols = None if genes_idx is None else _as_index(genes_idx, g, "genes_idx")
    x = dense_cols(counts, cols)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    x *= scale[:, None]
    return np.log1p(x, out=x)


# ----------------------------------------------------------------------------------------------------
# optimal-transport pairing
# ----------------------------------------------------------------------------------------------------


def _pot() -> Any:
    """The POT module, imported on first use: ``import ot`` takes about a second (it probes its array
    backends) and only the OT solve needs it, so ``import pyrovae`` (which imports this module through
    :mod:`pyrovae.data.gpo`) does not pay for it."""
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
) -> np.ndarray:
    """Pair every cell with a control of its own split (reference §5.7, done right).

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

    Returns:
        (n_cells,) int64: the global row position of each cell's matched control; -1 for unused cells.

    Raises:
        ValueError: when a split has perturbed cells but no control cells.
    """
    counts = _prepare(counts)
    n, _ = _n_rows_cols(counts)
    lab = _label_strings(labels, n)
    split_names, used = _split_strings(splits, n)
    control_label = str(control_label)
    feats = log_normalize(counts, feature_genes_idx, target_sum=target_sum)

    matched = np.full(n, -1, dtype=np.int64)
    for split in sorted(set(split_names[used].tolist())):
        in_split = used & (split_names == split)
        ctrl_rows = np.flatnonzero(in_split & (lab == control_label))
        groups = sorted(set(lab[in_split].tolist()))
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
                feats[rows],
                feats[ctrl_rows],
                method=method,
                reg=reg,
                max_controls=max_controls,
                seed=_group_seed(seed, "pair", split, g),
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
    """ΔX_i = |y_i - y_m(i)| with ``y = log_normalize(counts, genes_idx, target_sum)`` (reference §5.7).

    Args:
        counts: (n_cells, n_genes) counts, dense or sparse.
        matched: (n_cells,) row position of each cell's matched control, -1 for none.
        genes_idx: gene positions (or boolean mask) of the ΔX columns (the GRN genes).
        target_sum: normalisation target (default: median library size over all cells).

    Returns:
        (n_cells, len(genes_idx)) float32; rows with ``matched == -1`` are 0.
    """
    counts = _prepare(counts)
    n, _ = _n_rows_cols(counts)
    m = np.asarray(matched).ravel()
    if m.shape != (n,):
        raise ValueError(f"matched must have one entry per cell ({n}), got shape {m.shape}")
    m = m.astype(np.int64)
    if m.size and (m.min() < -1 or m.max() >= n):
        raise ValueError("matched holds positions outside [-1, n_cells)")
    y = log_normalize(counts, genes_idx, target_sum=target_sum)
    out = np.zeros(y.shape, dtype=np.float32)
    has = m >= 0
    out[has] = np.abs(y[has] - y[m[has]])
    return out


# ----------------------------------------------------------------------------------------------------
# QC
# ----------------------------------------------------------------------------------------------------


def qc_metrics(
    counts: Any,
    gene_names: Sequence[str],
    mt_prefix: str = "MT-",
    ribo_prefixes: Sequence[str] = ("RPS", "RPL"),
    case_sensitive: bool = False,
    hb_pattern: str = r"^HB[^P]",
) -> pd.DataFrame:
    """Per-cell QC metrics (reference §5.3).

    Args:
        counts: (n_cells, n_genes) counts, dense or sparse.
        gene_names: n_genes names.
        mt_prefix: prefix of mitochondrial genes.
        ribo_prefixes: prefixes of ribosomal genes.
        case_sensitive: match prefixes case-sensitively (default False, so ``"MT-"`` also finds mouse
            ``"mt-"`` genes and ``"RPS"`` finds ``"Rps"``).
        hb_pattern: regular expression of haemoglobin genes (scanpy's convention: HBA1, HBB, not HBP1).

    Returns:
        DataFrame (n_cells rows, RangeIndex) with ``total_counts`` (float), ``n_genes_by_counts`` (int,
        genes with a count > 0), ``pct_counts_mt``, ``pct_counts_ribo`` and ``pct_counts_hb`` (percent of
        the cell's total, 0-100; 0 for empty cells).
    """
    counts = _prepare(counts)
    n, g = _n_rows_cols(counts)
    names = [str(s) for s in gene_names]
    if len(names) != g:
        raise ValueError(f"gene_names has {len(names)} entries but counts has {g} genes")

    def starts(prefixes: Sequence[str]) -> np.ndarray:
        pre = tuple(prefixes) if case_sensitive else tuple(p.upper() for p in prefixes)
        return np.array([(s if case_sensitive else s.upper()).startswith(pre) for s in names], dtype=bool)

    total = _library_sizes(counts)
    n_genes = np.asarray((counts > 0).sum(axis=1)).ravel().astype(np.int64)

    def pct(mask: np.ndarray) -> np.ndarray:
        if not mask.any():
            return np.zeros(n)
        part = np.asarray(counts[:, np.flatnonzero(mask)].sum(axis=1), dtype=np.float64).ravel()
        return np.divide(100.0 * part, total, out=np.zeros(n), where=total > 0)

    return pd.DataFrame(
        {
            "total_counts": total,
            "n_genes_by_counts": n_genes,
            "pct_counts_mt": pct(starts((mt_prefix,))),
            "pct_counts_ribo": pct(starts(tuple(ribo_prefixes))),
            "pct_counts_hb": pct(
                np.array(
                    [
                        re.match(hb_pattern, s, 0 if case_sensitive else re.IGNORECASE) is not None
                        for s in names
                    ],
                    dtype=bool,
                )
            ),
        }
    )


#: metric -> which tail is bad. Other ``pct_counts_*`` columns are upper-tail metrics too.
_QC_TAILS = {"total_counts": "lower", "n_genes_by_counts": "lower", "UMI_count": "lower", "ngenes": "lower"}


def _mad_scale(x: np.ndarray, med: float) -> float:
    """The MAD (unscaled, as the reference); when it is 0, the mean absolute deviation from the median
    rescaled to MAD units (x 0.6745 x 1.2533 = x 0.8453: both are then 0.6745 sigma for normal data,
    the Iglewicz-Hoaglin fallback); 0 only when every value equals the median."""
    dev = np.abs(x - med)
    mad = float(np.median(dev))
    if mad > 0:
        return mad
    return float(np.mean(dev)) * 0.6745 * 1.253314


def qc_flags(metrics: pd.DataFrame, threshold: float = 3.0) -> pd.DataFrame:
    """MAD outlier flags (reference §5.3) with a guard for MAD = 0.

    Rules, with ``med`` and ``MAD`` over the cells with a finite value:

    * ``total_counts``, ``n_genes_by_counts`` (also ``UMI_count``, ``ngenes``): flagged when
      ``value < med - threshold * MAD``;
    * every ``pct_counts_*`` column (mt, ribo, hb, ...): flagged when ``value > med + threshold * MAD``;
    * a boolean ``predicted_doublet`` column, if present, is copied as a flag.

    Guard: when MAD = 0 (more than half of the cells share the median, e.g. a percentage that is 0 in most
    cells) the reference flags every cell off the median. Here the scale falls back to the mean absolute
    deviation from the median converted to MAD units (x 0.8453), so only cells far from the bulk are
    flagged; the >= 50 % of cells at the median are never flagged; when every value is equal nothing is
    flagged for that metric. NaN values are never flagged. Other columns are ignored.

    Args:
        metrics: (n_cells, ...) DataFrame, e.g. from :func:`qc_metrics`.
        threshold: the number of MADs (3 in the reference; CRADLE sweeps 3, 4, 5).

    Returns:
        DataFrame (same index) of bool columns ``qc_<metric>`` and ``total_qc`` (any flag). The
        thresholds used are in ``.attrs["thresholds"]`` as ``{metric: (tail, value)}`` (to score generated
        cells, reference §6.5).
    """
    flags: dict[str, np.ndarray] = {}
    thresholds: dict[str, tuple[str, float]] = {}
    for col in metrics.columns:
        name = str(col)
        if name == "predicted_doublet":
            flags["qc_predicted_doublet"] = metrics[col].fillna(False).to_numpy(dtype=bool)
            continue
        if name in _QC_TAILS:
            tail = _QC_TAILS[name]
        elif name.startswith("pct_counts_"):
            tail = "upper"
        else:
            continue
        x = metrics[col].to_numpy(dtype=np.float64)
        finite = np.isfinite(x)
        flag = np.zeros(x.shape, dtype=bool)
        if finite.any():
            med = float(np.median(x[finite]))
            scale = _mad_scale(x[finite], med)
            if tail == "lower":
                thr = med - threshold * scale
                flag[finite] = x[finite] < thr if scale > 0 else False
            else:
                thr = med + threshold * scale
                flag[finite] = x[finite] > thr if scale > 0 else False
            thresholds[name] = (tail, thr)
        flags[f"qc_{name}"] = flag
    out = pd.DataFrame(flags, index=metrics.index)
    out["total_qc"] = out.any(axis=1) if flags else False
    out.attrs["thresholds"] = thresholds
    return out


# ----------------------------------------------------------------------------------------------------
# counterfactual expression
# ----------------------------------------------------------------------------------------------------


def counterfactual_expression(
    counts: Any,
    labels: Sequence[str] | np.ndarray,
    splits: Sequence[Any] | np.ndarray | None,
    qc_fail: np.ndarray | Sequence[bool],
    n_sample: int = 50,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """cfX as intended by the reference (§5.8, §10.7).

    The counterfactual of a cell is the element-wise median of the raw counts of up to ``n_sample`` cells
    with the same label, the same split and the OPPOSITE QC status. Every cell of a (label, split, status)
    group shares the same pool, so one median is computed per group -- from ``min(n_sample, pool size)``
    pool cells sampled once, without replacement, with a seed derived from ``seed`` and the group's names
    -- and broadcast to all the group's cells. Only the sampled rows are densified. Positions index the
    full matrix.

    Memory: the output is dense (n_cells, n_genes) float32 (e.g. 100k cells x 8k genes = 3.2 GB), though
    it holds at most 2 distinct rows per (label, split).

    Args:
        counts: (n_cells, n_genes) raw counts, dense or sparse.
        labels: (n_cells,) perturbation labels.
        splits: (n_cells,) split names, or None for one split; cells with split ``""``/None/NaN get no
            counterfactual.
        qc_fail: (n_cells,) bool, True for QC-failing cells.
        n_sample: most pool cells per median.
        seed: base seed.

    Returns:
        ``(cfx, has_cf)``: (n_cells, n_genes) float32 and (n_cells,) bool; rows without an opposite-status
        cell of the same label and split (or without a split) are all zeros with ``has_cf`` False.
    """
    counts = _prepare(counts)
    n, g = _n_rows_cols(counts)
    if n_sample < 1:
        raise ValueError(f"n_sample must be >= 1, got {n_sample}")
    lab = _label_strings(labels, n)
    split_names, used = _split_strings(splits, n)
    fail = np.asarray(qc_fail).ravel()
    if fail.shape != (n,):
        raise ValueError(f"qc_fail must have one entry per cell ({n}), got shape {fail.shape}")
    fail = fail.astype(bool)

    cfx = np.zeros((n, g), dtype=np.float32)
    has_cf = np.zeros(n, dtype=bool)
    keys = pd.DataFrame({"split": split_names[used], "label": lab[used], "fail": fail[used]})
    rows_used = np.flatnonzero(used)
    groups = {
        k: rows_used[np.asarray(v)] for k, v in keys.groupby(["split", "label", "fail"]).indices.items()
    }
    for (split, label, status), target in sorted(groups.items(), key=lambda kv: kv[0]):
        pool = groups.get((split, label, not status))
        if pool is None or pool.size == 0:
            continue
        rng = np.random.default_rng(_group_seed(seed, "cfx", split, label, int(status)))
        take = min(int(n_sample), pool.size)
        chosen = np.sort(rng.choice(pool, size=take, replace=False))
        cfx[target] = np.median(dense_rows(counts, chosen, np.float64), axis=0).astype(np.float32)
        has_cf[target] = True
    return cfx, has_cf
