"""GPO-VAE's GRN data: the GRN node list, the OT pairing with controls (cached by seed), ΔX targets.

The GRN nodes of a :class:`~pyrovae.data.perturbation_data.PerturbationData` are its perturbed genes (the
existing treatment columns, already sorted, each of which must be a measured gene) followed by the sorted
*extended* genes (GRN nodes that are never perturbed; their dosage columns are all zero, so their rows of E
and M get no ELBO signal). :func:`grn_targets` builds them
and the per-cell targets of the GRN alignment:

================= ======== ===================================================================
key               shape    meaning
================= ======== ===================================================================
``delta_x``       (N, T)   ``|log-normalised expression - that of the OT-matched control|`` on the
                           T GRN genes, in treatment order
``delta_x_group`` (N, T)   ``|mean of those signed differences over the cell's label and split|``
                           (:func:`group_delta_x`; the target of ``grn_target="group"``)
================= ======== ===================================================================

**Pairing cache.** The control matched to each cell (found by optimal transport *within each split*, on the
log-normalised GRN-gene features, :func:`pyrovae.data.pairing.pair_with_controls`) is stored in
``obs["pyrovae_matched_control_<seed>"]`` as the obs *name* of the matched control (``""`` for cells with
no split). A later call with the same seed reuses it instead of re-solving the transport problems,
provided every stored match is still a control cell of the same split (otherwise, e.g. after a different
split, it is recomputed). :func:`write_pairing` copies the column into an AnnData so that it can be saved
in the ``.h5ad`` and read back by any later run; the column name only carries the seed, so pass
``force=True`` after changing the pairing method, regulariser or GRN genes. Names rather than row
positions are stored, so subsetting or reordering the cells keeps the cache valid (the reference stored
positions).

Which model needs this, and the preparation record in ``uns["pyrovae_gpo"]``: :mod:`pyrovae.data.prepare`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.config import preview
from pyrovae.data import pairing
from pyrovae.data.anndata import PerturbationData
from pyrovae.data.extras import BLOCK_ROWS, GroupRows, PairedDelta, median_positive, row_totals

#: obs column holding the matched control of each cell, by seed.
MATCHED_COLUMN = "pyrovae_matched_control_{seed}"
#: uns key of the preparation record (:func:`pyrovae.data.prepare.prepare_data`; the name is historical).
UNS_KEY = "pyrovae_gpo"
#: var column of the simulator (and of prepared files) marking extended GRN genes.
GRN_GENE_COLUMN = "grn_gene"
#: most GRN nodes GPO-VAE is prepared for unless the data option ``max_grn_nodes`` says otherwise: its
#: T x T parameters and K-hop products grow as T^2 and T^3 (docs/scaling.md, bench/wide.py).
MAX_GRN_NODES = 4000


def check_grn_size(n_nodes: int, limit: int = MAX_GRN_NODES) -> None:
    """One clear error when GPO-VAE's GRN is too large to train: it is restricted to a chosen gene set."""
    if n_nodes <= limit:
        return
    gb = 4 * n_nodes**2 / 1e9
    raise ValueError(
        f"GPO-VAE's GRN would have T = {n_nodes:,} nodes (perturbed plus extended genes), more than "
        f"max_grn_nodes = {limit:,}: its T x T parameters (W and the effects E: {n_nodes**2:.1e} entries, "
        f"{gb:.1f} GB per copy, about 8 copies with gradients and Adam) and K-hop products "
        f"(~{10 * n_nodes**3:.0e} FLOPs per step) do not scale to a genome-wide screen. Restrict the GRN to "
        "a chosen gene set: keep the cells of those perturbations and the controls (e.g. "
        "adata[adata.obs['perturbation'].isin(genes + ['control'])]) and fewer extra_genes; or raise the "
        "limit with the data option max_grn_nodes (data_options={'max_grn_nodes': N})"
    )


def matched_column(seed: int) -> str:
    """Name of the obs column caching the control pairing made with ``seed``."""
    return MATCHED_COLUMN.format(seed=int(seed))


# ------------------------------------------------------------------------------------------ GRN nodes
def grn_nodes(
    data: PerturbationData, extra_genes: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """(perturbed, extended) GRN node names.

    ``perturbed`` are the data's treatment columns (a previous preparation is recognised through
    ``uns["pyrovae_gpo"]``); each must be a measured gene. ``extended`` are the sorted
    ``extra_genes`` (default: the genes recorded in ``uns`` by the simulator or a previous preparation)
    that are not perturbed.
    """
    rec = data.uns.get(UNS_KEY)
    if isinstance(rec, dict) and "n_perturbed" in rec:
        perturbed = list(data.treatments[: int(rec["n_perturbed"])])
        if extra_genes is None:
            extra_genes = list(data.treatments[int(rec["n_perturbed"]) :])
    else:
        perturbed = list(data.treatments)
    if data.encode_combos_as_unique:
        raise ValueError(
            "GPO-VAE needs one treatment column per perturbed gene (combinations as multi-hot rows); the "
            "data was loaded with encode_combos_as_unique=True: load it without that option"
        )
    genes = set(data.genes)
    missing = [t for t in perturbed if t not in genes]
    if missing:
        raise ValueError(
            f"GPO-VAE needs each perturbation to name a measured gene (its GRN node); {len(missing)} "
            f"perturbation(s) are not in var_names: {preview(missing)}. "
            "Rename the perturbation labels to the target gene symbols used in var_names, or drop those cells"
        )
    if extra_genes is None:
        extra_genes = default_extra_genes(data)
    extra = [str(g) for g in extra_genes]
    bad = [g for g in extra if g not in genes]
    if bad:
        raise ValueError(
            f"extra GRN gene(s) {preview(bad)} are not in var_names; GRN nodes must be measured genes"
        )
    extended = sorted(set(extra) - set(perturbed))
    return perturbed, extended


def default_extra_genes(data: PerturbationData) -> list[str]:
    """Extended GRN genes recorded with the data: ``uns["grn_genes"]`` or the simulator's ground truth.

    The simulator marks them in ``var["grn_gene"]`` and (since :class:`PerturbationData` keeps no ``var``)
    this looks in ``uns`` for a list of GRN genes. Returns ``[]`` when none is found (then the GRN has the
    perturbed genes only); pass ``extra_genes=`` explicitly otherwise, e.g.
    ``list(adata.var_names[adata.var["grn_gene"]])``.
    """
    for holder in (data.uns, data.uns.get("ground_truth", {}), data.uns.get("simulation", {})):
        if isinstance(holder, dict):
            for key in ("grn_genes", "grn_gene"):
                if key in holder:
                    return [str(g) for g in np.asarray(holder[key]).reshape(-1)]
    return []


def var_grn_genes(adata, column: str = GRN_GENE_COLUMN) -> list[str]:
    """Genes marked True in ``adata.var[column]`` (``[]`` if the column is absent)."""
    if column not in adata.var.columns:
        return []
    return [str(g) for g in adata.var_names[np.asarray(adata.var[column], dtype=bool)]]


# ------------------------------------------------------------------------------------------ pairing
def read_pairing(data: PerturbationData, seed: int) -> np.ndarray | None:
    """(N,) row positions of the cached matched controls (-1: none), or ``None`` if absent or stale.

    Stale = some stored match is not a control cell of the same split as the cell.
    """
    col = matched_column(seed)
    if col not in data.obs.columns:
        return None
    names = data.obs[col].astype(str).to_numpy()
    index = pd.Index(data.obs.index.astype(str))
    if not index.is_unique:
        return None
    pos = index.get_indexer(names)
    pos[(names == "") | (names == "nan")] = -1
    has = pos >= 0
    needs = data.split != ""
    ok = (
        (has == needs).all()
        and (data.labels[pos[has]] == data.control_label).all()
        and (data.split[pos[has]] == data.split[has]).all()
    )
    if not ok:
        warnings.warn(
            f"the stored control pairing obs[{col!r}] does not fit the current splits (a match is missing or "
            "is not a control of the same split); recomputing it",
            stacklevel=3,
        )
        return None
    return pos.astype(np.int64)


def pairing_names(data: PerturbationData, matched: np.ndarray) -> np.ndarray | None:
    """(N,) obs names of the matched controls (``""``: none), or ``None`` if obs names are not unique."""
    index = data.obs.index.astype(str)
    if not pd.Index(index).is_unique:
        return None
    names = np.where(matched >= 0, np.asarray(index)[np.clip(matched, 0, None)], "")
    return names.astype(object)


def write_pairing(adata, data: PerturbationData, seed: int = 0) -> str:
    """Copy the cached pairing of a prepared ``data`` into ``adata.obs`` (aligned by obs name).

    Save ``adata`` afterwards (``adata.write_h5ad(...)``) and every later preparation with the same seed
    reads the pairing back instead of recomputing it. Returns the column name.
    """
    col = matched_column(seed)
    if col not in data.obs.columns:
        raise ValueError(
            f"the data holds no pairing for seed {seed}; prepare it first "
            f"(pyrovae.data.prepare.prepare_gpo_data(data, seed={seed}))"
        )
    if not adata.obs_names.is_unique:
        raise ValueError("obs names must be unique to store a pairing; call adata.obs_names_make_unique()")
    src = data.obs[col].astype(str)
    src.index = src.index.astype(str)
    missing = adata.obs_names.difference(src.index)
    if len(missing):
        raise ValueError(
            f"{len(missing)} cells of the AnnData are not in the data (e.g. {list(missing[:3])})"
        )
    adata.obs[col] = src.reindex(adata.obs_names).to_numpy()
    return col


# ------------------------------------------------------------------------------------------ targets
def grn_targets(
    data: PerturbationData,
    extra_genes: Sequence[str] | None = None,
    pairing_method: str = "auto",
    pairing_reg: float = 0.05,
    seed: int = 0,
    force: bool = False,
    max_grn_nodes: int = MAX_GRN_NODES,
) -> tuple[PerturbationData, dict[str, Any]] | None:
    """``data`` with the GRN nodes as treatments and ``delta_x``, ``delta_x_group`` (module docstring).

    Returns ``(new data, record)`` (record: ``nodes``, ``n_perturbed``, ``extended``, ``pairing_method``,
    ``pairing_reg``, ``timings``), or ``None`` when ``data`` is already prepared (its treatments are the
    recorded GRN nodes and both targets are there) and ``force`` is not set. More than ``max_grn_nodes``
    nodes: ``ValueError`` (:func:`check_grn_size`).
    """
    rec = data.uns.get(UNS_KEY)
    shape = (data.n_cells, data.n_treatments)
    if (
        not force
        and isinstance(rec, dict)
        and list(rec.get("nodes", [])) == list(data.treatments)
        and all(np.shape(data.extras.get(k)) == shape for k in ("delta_x", "delta_x_group"))
    ):
        return None
    extras: dict[str, np.ndarray] = dict(data.extras)
    obs = data.obs  # copied only if the pairing's column is written
    timings: dict[str, float] = {}
    dosage, treatments = data.dosage, list(data.treatments)
    perturbed, extended = grn_nodes(data, extra_genes)
    nodes = perturbed + extended
    check_grn_size(len(nodes), max_grn_nodes)
    new = [g for g in nodes if g not in treatments]
    if new:
        dosage = sp.hstack([dosage, sp.csr_matrix((data.n_cells, len(new)), dtype=dosage.dtype)], "csr")
        treatments = treatments + new
    if treatments != nodes:  # only possible with an inconsistent earlier record
        raise ValueError("internal error: treatment columns do not match the GRN nodes")
    gene_pos = {g: i for i, g in enumerate(data.genes)}
    node_idx = np.array([gene_pos[g] for g in nodes], dtype=np.int64)
    matched = None if force else read_pairing(data, seed)
    stale = [k for k in ("delta_x", "delta_x_group") if force or np.shape(extras.get(k))[1:] != (len(nodes),)]
    # each cell's total over all genes, once: the pairing's features and both targets are normalised by it
    totals = row_totals(data.counts)
    target_sum = median_positive(totals)
    if matched is None:
        t0 = time.perf_counter()
        matched = pairing.pair_with_controls(
            data.counts,
            data.labels,
            data.split,
            data.control_label,
            node_idx,
            method=pairing_method,
            reg=pairing_reg,
            seed=seed,
            target_sum=target_sum,
            totals=totals,
        )
        matched = np.asarray(matched, dtype=np.int64)
        timings["pairing_s"] = time.perf_counter() - t0
        names = pairing_names(data, matched)
        if names is not None:
            obs = obs.copy()
            obs[matched_column(seed)] = names
    delta = PairedDelta(data.counts, matched, node_idx, totals, target_sum)
    if "delta_x" in stale:
        extras["delta_x"] = delta  # rows computed per minibatch from the counts: O(batch), not O(N T)
    if "delta_x_group" in stale:
        t0 = time.perf_counter()
        extras["delta_x_group"] = streamed_group_delta_x(delta, data.labels, data.split)
        timings["delta_x_group_s"] = time.perf_counter() - t0
    record = {
        "nodes": list(nodes),
        "n_perturbed": len(perturbed),
        "extended": list(extended),
        "pairing_method": pairing_method,
        "pairing_reg": float(pairing_reg),
        "timings": timings,
    }
    new_data = dataclasses.replace(data, dosage=dosage, treatments=treatments, extras=extras, obs=obs)
    return new_data, record


def group_delta_x(y: np.ndarray, matched: np.ndarray, labels: np.ndarray, split: np.ndarray) -> np.ndarray:
    """(N, T) float32: for each cell, ``|mean over the cells of its label and split of (y_i - y_m(i))|``.

    The signed OT-paired difference is averaged over the perturbation's cells *before* the absolute value
    (a departure from the reference's per-cell ``|y_i - y_m(i)|``, whose per-cell absolute values keep
    the pairing noise: their median ranks genes by noise as much as by shift). Cells without a match
    (``matched == -1``) do not enter the means and get 0; splits are kept apart (no leakage between them).
    """
    m = np.asarray(matched, dtype=np.int64).reshape(-1)
    return _group_mean_abs(pairing.paired_difference(np.asarray(y, dtype=np.float64), m), m, labels, split)


def _group_mean_abs(
    diff: np.ndarray, matched: np.ndarray, labels: np.ndarray, split: np.ndarray
) -> np.ndarray:
    """:func:`group_delta_x` from the signed paired difference ``diff`` (N, T) (float64)."""
    m = np.asarray(matched, dtype=np.int64).reshape(-1)
    out = np.zeros(diff.shape, dtype=np.float32)
    has = m >= 0
    key = pd.Series(
        np.char.add(np.asarray(split).astype(str), np.char.add("\x00", np.asarray(labels).astype(str)))
    )
    codes, _ = pd.factorize(key)
    for c in np.unique(codes[has]):
        rows = np.flatnonzero((codes == c) & has)
        out[rows] = np.abs(diff[rows].mean(0)).astype(np.float32)
    return out


def streamed_group_delta_x(delta: PairedDelta, labels: np.ndarray, split: np.ndarray) -> GroupRows:
    """:func:`group_delta_x` without the (N, T) matrices: one (T,) mean per (split, label) group.

    Each group's signed differences are computed from the counts (``delta.signed``) in blocks of at most
    ``BLOCK_ROWS`` cells and summed; a group that fits in one block gets exactly the numbers of
    :func:`group_delta_x` (the same float64 values and ``mean``), a larger one agrees to float64 rounding.
    Memory: O(groups x T + BLOCK_ROWS x T).

    Returns:
        (N, T) :class:`~pyrovae.data.extras.GroupRows` (cells without a match: 0).
    """
    m = delta.matched
    has = m >= 0
    key = pd.Series(
        np.char.add(np.asarray(split).astype(str), np.char.add("\x00", np.asarray(labels).astype(str)))
    )
    codes, _ = pd.factorize(key)
    codes = np.asarray(codes, dtype=np.int64)
    kept = np.unique(codes[has])
    table = np.zeros((len(kept), delta.shape[1]), dtype=np.float32)
    out_codes = np.full(len(m), -1, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = (
        np.searchsorted(codes[order], kept, side="left"),
        np.searchsorted(codes[order], kept, side="right"),
    )
    for k, (lo, hi) in enumerate(zip(*bounds)):
        rows = order[lo:hi]
        rows = np.sort(rows[has[rows]])
        if rows.size <= BLOCK_ROWS:
            mean = delta.signed(rows).mean(0)
        else:
            total = np.zeros(delta.shape[1], dtype=np.float64)
            for s in range(0, rows.size, BLOCK_ROWS):
                total += delta.signed(rows[s : s + BLOCK_ROWS]).sum(0)
            mean = total / rows.size
        table[k] = np.abs(mean).astype(np.float32)
        out_codes[rows] = k
    return GroupRows(table, out_codes)
