"""CRADLE-VAE's quality-control data: per-cell QC metrics and MAD flags, and counterfactual expression.

Pure numpy / pandas on plain arrays (a ``counts`` argument is a dense or :mod:`scipy.sparse`
``(n_cells, n_genes)`` matrix, never densified as a whole), plus :func:`qc_indicator`, the QC extra of a
:class:`~pyrovae.data.perturbation_data.PerturbationData`. The model-facing preparation (which model needs
what) is :mod:`pyrovae.data.prepare`.

How this departs from the reference code (CRADLE-VAE's and GPO-VAE's data modules):

* :func:`qc_metrics` / :func:`qc_flags` -- the reference's MAD rule with a guard for MAD = 0 (the reference
  then flags every cell off the median, e.g. every cell with a single haemoglobin read).
* :func:`counterfactual_expression` -- cfX as *intended*: the median of up to ``n_sample`` cells of the
  same label and split with the *opposite* QC status, sampled without replacement and seeded, indexed in
  the full matrix (the reference sampled with replacement from QC-failing cells only, unseeded, and used
  positions within a subset to index the full matrix).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.data.anndata import PerturbationData
from pyrovae.data.extras import BLOCK_ROWS, GroupRows
from pyrovae.data.loader import is_backed, read_rows
from pyrovae.data.matrix import (
    as_indexable,
    dense_rows,
    group_seed,
    label_strings,
    library_sizes,
    matrix_shape,
    split_strings,
)

__all__ = [
    "qc_metrics",
    "qc_flags",
    "counterfactual_table",
    "counterfactual_expression",
    "qc_indicator",
]


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
    """Per-cell QC metrics (those of the reference code).

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
    if is_backed(counts):  # on disk: row blocks (every metric is per cell), never the whole matrix
        n = int(counts.shape[0])
        kw = dict(
            mt_prefix=mt_prefix,
            ribo_prefixes=ribo_prefixes,
            case_sensitive=case_sensitive,
            hb_pattern=hb_pattern,
        )
        parts = [
            qc_metrics(
                read_rows(counts, np.arange(s, min(s + BLOCK_ROWS, n))),
                gene_names,
                **kw,
            )
            for s in range(0, n, BLOCK_ROWS)
        ]
        return pd.concat(parts, ignore_index=True)
    counts = as_indexable(counts)
    n, g = matrix_shape(counts)
    names = [str(s) for s in gene_names]
    if len(names) != g:
        raise ValueError(f"gene_names has {len(names)} entries but counts has {g} genes")

    def starts(prefixes: Sequence[str]) -> np.ndarray:
        pre = tuple(prefixes) if case_sensitive else tuple(p.upper() for p in prefixes)
        return np.array([(s if case_sensitive else s.upper()).startswith(pre) for s in names], dtype=bool)

    total = library_sizes(counts)
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
    """MAD outlier flags (the reference's rule) with a guard for MAD = 0.

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
        cells, as the reference's QC pass rate does).
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


def counterfactual_table(
    counts: Any,
    labels: Sequence[str] | np.ndarray,
    splits: Sequence[Any] | np.ndarray | None,
    qc_fail: np.ndarray | Sequence[bool],
    n_sample: int = 50,
    seed: int = 0,
) -> tuple[GroupRows, np.ndarray]:
    """cfX as intended by the reference code, stored compactly: one median per (label, split, QC status).

    The counterfactual of a cell is the element-wise median of the raw counts of up to ``n_sample`` cells
    with the same label, the same split and the OPPOSITE QC status. Every cell of a (label, split, status)
    group shares the same pool, so one median is computed per group -- from ``min(n_sample, pool size)``
    pool cells sampled once, without replacement, with a seed derived from ``seed`` and the group's names.
    Positions index the full matrix. The sampled rows are read in blocks of about 8,192 rows (in memory,
    sparse or on disk), never the whole matrix.

    Memory: the (K, G) medians (CSR: a median of sparse counts is mostly 0) and an (N,) group code, not the
    (N, G) dense array (64 GB at 2 M cells x 8,000 genes); :class:`~pyrovae.data.extras.GroupRows` gives a
    minibatch's rows. :func:`counterfactual_expression` is the same as a dense array.

    Args:
        counts: (n_cells, n_genes) raw counts, dense, sparse or backed.
        labels: (n_cells,) perturbation labels.
        splits: (n_cells,) split names, or None for one split; cells with split ``""``/None/NaN get no
            counterfactual.
        qc_fail: (n_cells,) bool, True for QC-failing cells.
        n_sample: most pool cells per median.
        seed: base seed.

    Returns:
        ``(cfx, has_cf)``: (n_cells, n_genes) :class:`~pyrovae.data.extras.GroupRows` and (n_cells,) bool;
        rows without an opposite-status cell of the same label and split (or without a split) are all
        zeros with ``has_cf`` False.
    """
    counts = counts if is_backed(counts) else as_indexable(counts)
    n, g = matrix_shape(counts)
    if n_sample < 1:
        raise ValueError(f"n_sample must be >= 1, got {n_sample}")
    lab = label_strings(labels, n)
    split_names, used = split_strings(splits, n)
    fail = np.asarray(qc_fail).ravel()
    if fail.shape != (n,):
        raise ValueError(f"qc_fail must have one entry per cell ({n}), got shape {fail.shape}")
    fail = fail.astype(bool)

    codes = np.full(n, -1, dtype=np.int64)
    keys = pd.DataFrame({"split": split_names[used], "label": lab[used], "fail": fail[used]})
    rows_used = np.flatnonzero(used)
    groups = {
        k: rows_used[np.asarray(v)] for k, v in keys.groupby(["split", "label", "fail"]).indices.items()
    }
    todo: list[tuple[np.ndarray, np.ndarray]] = []  # (target cells, sampled pool cells), one per median
    for (split, label, status), target in sorted(groups.items(), key=lambda kv: kv[0]):
        pool = groups.get((split, label, not status))
        if pool is None or pool.size == 0:
            continue
        rng = np.random.default_rng(group_seed(seed, "cfx", split, label, int(status)))
        take = min(int(n_sample), pool.size)
        todo.append((target, np.sort(rng.choice(pool, size=take, replace=False))))
    medians: list[sp.csr_matrix] = []
    start = 0
    while start < len(todo):  # groups in blocks of about BLOCK_ROWS sampled rows, one read per block
        stop, total = start, 0
        while stop < len(todo) and (stop == start or total + todo[stop][1].size <= BLOCK_ROWS):
            total += todo[stop][1].size
            stop += 1
        block = dense_rows(counts, np.concatenate([c for _, c in todo[start:stop]]), np.float64)
        offset = 0
        for k in range(start, stop):
            target, chosen = todo[k]
            med = np.median(block[offset : offset + chosen.size], axis=0).astype(np.float32)
            medians.append(sp.csr_matrix(med[None, :]))
            codes[target] = k
            offset += chosen.size
        start = stop
    table = sp.vstack(medians, format="csr") if medians else sp.csr_matrix((0, g), dtype=np.float32)
    return GroupRows(table, codes), codes >= 0


def counterfactual_expression(
    counts: Any,
    labels: Sequence[str] | np.ndarray,
    splits: Sequence[Any] | np.ndarray | None,
    qc_fail: np.ndarray | Sequence[bool],
    n_sample: int = 50,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`counterfactual_table` as a dense (n_cells, n_genes) float32 array (small data only: e.g. 100k
    cells x 8k genes = 3.2 GB; the models use the compact table). Returns ``(cfx, has_cf)``."""
    cfx, has_cf = counterfactual_table(counts, labels, splits, qc_fail, n_sample, seed)
    return np.asarray(cfx), has_cf


# ------------------------------------------------------------------------------------------ QC extra
def qc_indicator(data: PerturbationData, qc_key: str | None, qc_threshold: float) -> np.ndarray:
    """(N, 1) float32 QC-failure indicator: ``obs[qc_key]`` or ``total_qc`` of MAD-thresholded QC metrics."""
    if qc_key is not None:
        if qc_key not in data.obs.columns:
            raise ValueError(
                f"obs has no QC column {qc_key!r}; obs columns are {list(data.obs.columns)}. Omit qc_key to "
                "compute QC flags from the counts (MAD thresholds on UMI count, genes, mt/ribo/hb fractions)"
            )
        col = data.obs[qc_key]
        if col.isna().any():
            raise ValueError(f"obs[{qc_key!r}] has missing values; it must be 0/1 or boolean for every cell")
        vals = np.asarray(col.astype(float) if col.dtype != bool else col.astype(int), dtype=np.float64)
        if not np.isin(vals, (0.0, 1.0)).all():
            raise ValueError(f"obs[{qc_key!r}] must hold 0/1 or True/False (1 = the cell fails QC)")
        return vals.astype(np.float32).reshape(-1, 1)
    metrics = qc_metrics(data.counts, list(data.genes))
    flags = qc_flags(metrics, qc_threshold)
    return np.asarray(flags["total_qc"], dtype=np.float32).reshape(-1, 1)
