"""Data preparation for GPO-VAE and CRADLE-VAE, and the held-out-perturbation protocol.

:func:`prepare_gpo_data` turns a validated :class:`~pyrovae.data.anndata.PerturbationData` into one that
the GPO/CRADLE penalties can train on (shared/reference/gpo_vae_cradle_vae.md §5.3-§5.8). It returns a
*new* object (``dataclasses.replace``) with

- ``treatments``: the **GRN node list**: the perturbed genes (the existing treatment columns, already
  sorted, each of which must be a measured gene) followed by the sorted *extended* genes (GRN nodes that are
  never perturbed; their dosage columns are all zero, so their rows of E and M get no ELBO signal, §4.1).
  ``dosage`` is extended with those zero columns; existing columns keep their order.
- ``extras`` (per-cell arrays carried by every minibatch, see :class:`~pyrovae.data.loader.MinibatchLoader`):

  ========== ======== ===========================================================================
  key        shape    meaning
  ========== ======== ===========================================================================
  qc         (N, 1)   1 = the cell fails QC (from ``obs[qc_key]``, else MAD flags on QC metrics)
  cfx        (N, G)   counterfactual expression: median of same-label, same-split cells with the
                      opposite QC status (``pairing.counterfactual_expression``; seeded)
  has_cf     (N,)     1 where such cells exist (the counterfactual KL uses only these cells)
  delta_x    (N, T)   |log-normalised expression - that of the OT-matched control| on the T GRN genes,
                      in treatment order (GPO only; ``grn=False`` skips it)
  delta_x_   (N, T)   |mean of those signed differences over the cell's label and split|
  group               (:func:`group_delta_x`; the target of ``grn_target="group"``)
  ========== ======== ===========================================================================

- ``uns["pyrovae_gpo"]``: ``{"nodes", "n_perturbed", "extended", "seed", "pairing_method", ...}``.

**Pairing cache.** The control matched to each cell (found by optimal transport *within each split*, on the
log-normalised GRN-gene features) is stored in ``obs["pyrovae_matched_control_<seed>"]`` as the obs *name*
of the matched control (``""`` for cells with no split). A later call with the same seed reuses it instead
of re-solving the transport problems, provided every stored match is still a control cell of the same split
(otherwise, e.g. after a different split, it is recomputed). :func:`write_pairing` copies the column into an
AnnData so that it can be saved in the ``.h5ad`` and read back by any later run; the column name only
carries the seed, so pass ``force=True`` after changing the pairing method, regulariser or GRN genes.
Names rather than row positions are stored, so subsetting or reordering the cells keeps the cache valid
(the reference stored positions, §10.8).

**Held-out perturbations** (:func:`holdout_perturbations`). Every cell whose label contains one of the
given perturbations (singles and the combinations containing them) moves to the ``test`` split, so neither
training nor validation ever sees them, and the training normalisation statistics are recomputed without
them. Unlike the reference's ``mask_test`` (§5.6, §10.13) their dosage columns are *kept*: the cells are
not turned into control-like cells, and at prediction time the dosage row really names the perturbation.
Call it *before* :func:`prepare_gpo_data`, so that the pairing and counterfactuals are built within the
final splits.

What a model can do with such a perturbation (N_t = 0 in training):

- SAMS-VAE / CPA-VAE / CRADLE-VAE: nothing. The row's q was never updated, so prediction falls back to the
  prior (:meth:`~pyrovae.models.skeleton.PerturbationVAE.sample_globals` with ``untrained``): a random
  effect, i.e. no information about this perturbation.
- GPO-VAE: its GRN row W_j (gene j's outgoing edges) is *not* entirely untrained. It receives gradient from
  the K-hop terms of the GRN loss through paths t -> j -> k of seen perturbations t (the W^2, W^3, ...
  terms of S), and from the sparsity penalty. Its effect block's ``predict_untrained`` hook
  (:func:`pyrovae.models.effects.grn_transfer`), which every :class:`~pyrovae.infer.predictive.Posterior`
  of a GPO-VAE run uses (``pyrovae ate`` / ``sample`` included), takes that row for the mask of the unseen
  perturbation and transfers effect sizes from the seen perturbations (see its docstring). This is a weak
  signal: the higher-order terms carry 1/T^(k-1) factors and the direct terms of the seen rows absorb most
  of the residual, so the prediction is only as good as the learned regulators-of-regulators structure.
  It is no substitute for observing the perturbation.
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

from pyrovae.data import pairing
from pyrovae.data.anndata import PerturbationData, log_norm_stats
from pyrovae.data.matrix import nonzero_counts

#: obs column holding the matched control of each cell, by seed.
MATCHED_COLUMN = "pyrovae_matched_control_{seed}"
#: uns key of the GPO preparation record.
UNS_KEY = "pyrovae_gpo"
#: var column of the simulator (and of prepared files) marking extended GRN genes.
GRN_GENE_COLUMN = "grn_gene"


def matched_column(seed: int) -> str:
    """Name of the obs column caching the control pairing made with ``seed``."""
    return MATCHED_COLUMN.format(seed=int(seed))


# ------------------------------------------------------------------------------------------ GRN nodes
def grn_nodes(
    data: PerturbationData, extra_genes: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """(perturbed, extended) GRN node names.

    ``perturbed`` are the data's treatment columns (a previous :func:`prepare_gpo_data` call is recognised
    through ``uns["pyrovae_gpo"]``); each must be a measured gene. ``extended`` are the sorted
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
            f"perturbation(s) are not in var_names: {missing[:10]}{' ...' if len(missing) > 10 else ''}. "
            "Rename the perturbation labels to the target gene symbols used in var_names, or drop those cells"
        )
    if extra_genes is None:
        extra_genes = default_extra_genes(data)
    extra = [str(g) for g in extra_genes]
    bad = [g for g in extra if g not in genes]
    if bad:
        raise ValueError(
            f"extra GRN gene(s) {bad[:10]} are not in var_names; GRN nodes must be measured genes"
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


def _pairing_names(data: PerturbationData, matched: np.ndarray) -> np.ndarray | None:
    index = data.obs.index.astype(str)
    if not pd.Index(index).is_unique:
        return None
    names = np.where(matched >= 0, np.asarray(index)[np.clip(matched, 0, None)], "")
    return names.astype(object)


def write_pairing(adata, data: PerturbationData, seed: int = 0) -> str:
    """Copy the cached pairing of a prepared ``data`` into ``adata.obs`` (aligned by obs name).

    Save ``adata`` afterwards (``adata.write_h5ad(...)``) and every later :func:`prepare_gpo_data` with the
    same seed reads the pairing back instead of recomputing it. Returns the column name.
    """
    col = matched_column(seed)
    if col not in data.obs.columns:
        raise ValueError(
            f"the data holds no pairing for seed {seed}; run prepare_gpo_data(data, seed={seed}) first"
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


# ------------------------------------------------------------------------------------------ QC
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
    metrics = pairing.qc_metrics(data.counts, list(data.genes))
    flags = pairing.qc_flags(metrics, qc_threshold)
    return np.asarray(flags["total_qc"], dtype=np.float32).reshape(-1, 1)


# ------------------------------------------------------------------------------------------ main entry
def prepare_gpo_data(
    data: PerturbationData,
    extra_genes: Sequence[str] | None = None,
    qc_key: str | None = None,
    qc_threshold: float = 3.0,
    pairing_method: str = "auto",
    pairing_reg: float = 0.05,
    seed: int = 0,
    n_cf: int = 50,
    force: bool = False,
    grn: bool = True,
    verbose: bool = False,
) -> PerturbationData:
    """A copy of ``data`` with GRN nodes as treatments and the GPO/CRADLE per-cell extras (module docstring).

    Args:
        data: validated data (one treatment column per perturbed gene; combinations are multi-hot rows).
        extra_genes: extended (never perturbed) GRN genes; default :func:`default_extra_genes`.
        qc_key: obs column with the QC-failure flag (1/True = fails); default: computed from the counts with
            ``pairing.qc_flags(pairing.qc_metrics(...), qc_threshold)``.
        qc_threshold: MAD multiple of the computed QC flags (the reference's 3).
        pairing_method, pairing_reg: passed to ``pairing.pair_with_controls`` (OT regulariser).
        seed: seeds the pairing and the counterfactual draws; names the pairing cache column.
        n_cf: at most this many opposite-status cells enter each counterfactual median.
        force: recompute everything, ignoring cached pairing and extras.
        grn: build the GRN nodes and ``delta_x`` (GPO-VAE). ``False``: only ``qc``, ``cfx``, ``has_cf``
            (CRADLE-VAE, whose perturbations need not be genes).
        verbose: print timings.

    Returns:
        A new :class:`PerturbationData` (the input is not modified).
    """
    extras: dict[str, np.ndarray] = dict(data.extras)
    obs = data.obs.copy()
    uns: dict[str, Any] = dict(data.uns)
    record: dict[str, Any] = {"seed": int(seed), "qc_key": qc_key or "", "qc_threshold": float(qc_threshold)}
    timings: dict[str, float] = {}

    if force or "qc" not in extras:
        extras["qc"] = qc_indicator(data, qc_key, qc_threshold)
    qc = np.asarray(extras["qc"], dtype=np.float32).reshape(data.n_cells, -1)
    if force or "cfx" not in extras or "has_cf" not in extras:
        t0 = time.perf_counter()
        cfx, has_cf = pairing.counterfactual_expression(
            data.counts, data.labels, data.split, qc.max(1) > 0, n_sample=n_cf, seed=seed
        )
        extras["cfx"] = np.asarray(cfx, dtype=np.float32)
        extras["has_cf"] = np.asarray(has_cf, dtype=np.float32).reshape(-1)
        timings["counterfactual_s"] = time.perf_counter() - t0

    dosage, treatments = data.dosage, list(data.treatments)
    if grn:
        perturbed, extended = grn_nodes(data, extra_genes)
        nodes = perturbed + extended
        new = [g for g in nodes if g not in treatments]
        if new:
            dosage = sp.hstack([dosage, sp.csr_matrix((data.n_cells, len(new)), dtype=dosage.dtype)], "csr")
            treatments = treatments + new
        if treatments != nodes:  # only possible with an inconsistent earlier record
            raise ValueError("internal error: treatment columns do not match the GRN nodes")
        gene_pos = {g: i for i, g in enumerate(data.genes)}
        node_idx = np.array([gene_pos[g] for g in nodes], dtype=np.int64)
        matched = None if force else read_pairing(data, seed)
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
            )
            matched = np.asarray(matched, dtype=np.int64)
            timings["pairing_s"] = time.perf_counter() - t0
            names = _pairing_names(data, matched)
            if names is not None:
                obs[matched_column(seed)] = names
        if force or "delta_x" not in extras or np.shape(extras["delta_x"])[1:] != (len(nodes),):
            dx = pairing.delta_x(data.counts, matched, node_idx)
            extras["delta_x"] = np.nan_to_num(np.asarray(dx, dtype=np.float32), nan=0.0)
        if force or "delta_x_group" not in extras or np.shape(extras["delta_x_group"])[1:] != (len(nodes),):
            extras["delta_x_group"] = group_delta_x(
                pairing.log_normalize(data.counts, node_idx), matched, data.labels, data.split
            )
        record.update(
            nodes=list(nodes),
            n_perturbed=len(perturbed),
            extended=list(extended),
            pairing_method=pairing_method,
            pairing_reg=float(pairing_reg),
        )
    record["timings"] = timings
    uns[UNS_KEY] = {**(uns.get(UNS_KEY) or {}), **record} if isinstance(uns.get(UNS_KEY), dict) else record
    if verbose:
        print("prepare_gpo_data:", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()) or "all cached")
    return dataclasses.replace(data, dosage=dosage, treatments=treatments, extras=extras, obs=obs, uns=uns)


def group_delta_x(y: np.ndarray, matched: np.ndarray, labels: np.ndarray, split: np.ndarray) -> np.ndarray:
    """(N, T) float32: for each cell, |mean over the cells of its label and split of (y_i - y_m(i))|.

    The signed OT-paired difference is averaged over the perturbation's cells *before* the absolute value
    (a departure from the reference's per-cell |y_i - y_m(i)|, §5.7, whose per-cell absolute values keep
    the pairing noise: their median ranks genes by noise as much as by shift). Cells without a match
    (``matched == -1``) do not enter the means and get 0; splits are kept apart (no leakage between them).
    """
    y = np.asarray(y, dtype=np.float64)
    m = np.asarray(matched, dtype=np.int64).reshape(-1)
    out = np.zeros(y.shape, dtype=np.float32)
    has = m >= 0
    diff = np.zeros_like(y)
    diff[has] = y[has] - y[m[has]]
    key = pd.Series(
        np.char.add(np.asarray(split).astype(str), np.char.add("\x00", np.asarray(labels).astype(str)))
    )
    codes, _ = pd.factorize(key)
    for c in np.unique(codes[has]):
        rows = np.flatnonzero((codes == c) & has)
        out[rows] = np.abs(diff[rows].mean(0)).astype(np.float32)
    return out


#: data options (kept in a run's ``config.json``) that configure :func:`prepare_for_model`.
MODEL_DATA_OPTIONS = ("holdout_perturbations", "qc_key", "extra_genes", "pairing_method", "pairing_reg")


def prepare_for_model(
    data: PerturbationData, family: str, artifact: bool, options: dict[str, Any] | None = None
) -> PerturbationData:
    """What a model needs beyond the plain data, applied the same way for training and for evaluation.

    1. ``options["holdout_perturbations"]`` (names): :func:`holdout_perturbations` (any model);
    2. GPO-VAE (``family == "gpo"``): :func:`prepare_gpo_data` (GRN nodes, pairing, delta_x, QC, cfx);
       CRADLE-VAE (``artifact``): the same with ``grn=False`` (QC flags and counterfactuals only).

    Options used: ``qc_key``, ``extra_genes``, ``pairing_method``, ``pairing_reg`` and ``split_seed``
    (which seeds the pairing and the counterfactual draws). Other keys are ignored.
    """
    options = options or {}
    held = options.get("holdout_perturbations")
    if held:
        data = holdout_perturbations(data, held)
    if family == "gpo" or artifact:
        data = prepare_gpo_data(
            data,
            extra_genes=options.get("extra_genes"),
            qc_key=options.get("qc_key"),
            pairing_method=options.get("pairing_method") or "auto",
            pairing_reg=float(options.get("pairing_reg") or 0.05),
            seed=int(options.get("split_seed") or 0),
            grn=family == "gpo",
        )
    return data


def prepare_cradle_data(data: PerturbationData, **kw: Any) -> PerturbationData:
    """:func:`prepare_gpo_data` with ``grn=False``: only the CRADLE-VAE extras ``qc``, ``cfx``, ``has_cf``."""
    return prepare_gpo_data(data, grn=False, **kw)


def perturbed_block(data: PerturbationData) -> int:
    """Number of perturbed genes at the front of the treatment list (the rest are extended GRN genes)."""
    rec = data.uns.get(UNS_KEY)
    if isinstance(rec, dict) and "n_perturbed" in rec:
        return int(rec["n_perturbed"])
    return data.n_treatments


# ------------------------------------------------------------------------------------------ held out
def holdout_perturbations(data: PerturbationData, perturbations: Sequence[str]) -> PerturbationData:
    """Move every cell that received one of ``perturbations`` (alone or in a combination) to ``test``.

    Their dosage columns are kept (unlike the reference's ``mask_test``), cells with no split stay unused,
    and the training normalisation statistics are recomputed on the remaining training cells. The
    perturbations get N_t = 0 in training, so :attr:`~pyrovae.infer.runs.Run.untrained` marks them and
    prediction uses the prior for them (or, for GPO-VAE, the GRN transfer
    :func:`pyrovae.models.effects.grn_transfer`); every prediction states which.

    Raises ``ValueError`` for names that are not treatment columns, or if no training cell would remain.
    """
    if isinstance(perturbations, str):
        perturbations = [perturbations]
    names = [str(p) for p in perturbations]
    if not names:
        raise ValueError("no perturbations to hold out")
    col = {t: j for j, t in enumerate(data.treatments)}
    unknown = [p for p in names if p not in col]
    if unknown:
        raise ValueError(
            f"cannot hold out {unknown}: not treatment columns of the data ({data.treatments[:10]}"
            f"{' ...' if data.n_treatments > 10 else ''}). Name single perturbations; to hold out "
            "combinations only, load the data with split_mode='combinations'"
        )
    cols = [col[p] for p in names]
    hit = nonzero_counts(data.dosage[:, cols], 1) > 0
    split = data.split.copy()
    split[hit & (split != "")] = "test"
    train_idx = np.flatnonzero(split == "train")
    if len(train_idx) == 0:
        raise ValueError("holding these perturbations out leaves no training cell")
    if not nonzero_counts(data.dosage[train_idx], 1).any():
        raise ValueError("holding these perturbations out leaves no perturbed training cell")
    mean, std = log_norm_stats(data.counts, train_idx)
    uns = dict(data.uns)
    prev = [str(p) for p in np.asarray(uns.get("pyrovae_heldout_perturbations", [])).reshape(-1)]
    uns["pyrovae_heldout_perturbations"] = sorted(set(prev) | set(names))
    if "delta_x" in data.extras or "cfx" in data.extras:
        warnings.warn(
            "holding out perturbations after prepare_gpo_data: the pairing and counterfactuals were built "
            "within the old splits; call holdout_perturbations first, or prepare_gpo_data(..., force=True)",
            stacklevel=2,
        )
    return dataclasses.replace(data, split=split.astype(str), norm_mean=mean, norm_std=std, uns=uns)
