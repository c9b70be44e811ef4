"""The field-standard additions to an ATE report: all baselines, DE genes, interactions, cells, ceiling.

:func:`field_table` is what :func:`pyrovae.evaluate.score.ate_report` calls once it has the empirical ATE
of the held-out cells and the models' predicted ATEs. It adds

- the model-free baselines of :func:`pyrovae.baselines.all_baseline_ates` (no change, train mean,
  additive, global mean, matching mean, linear);
- the DE q-values of the held-out cells (Wilcoxon rank-sum versus control, BH), for the DE top-k metrics;
- the perturbed-mean reference of systema's Pearson delta (weighted by held-out cells per perturbation);
- the interaction residuals AB - (A + B) of combinations: observed with the members' training ATEs, and
  predicted with each predictor's own prediction of the members;
- optionally (``cells``) the energy distance between predicted and held-out cells per perturbation, for the
  models (:meth:`~pyrovae.predict.posterior.Posterior.predict`) and for two cell baselines: the training
  control cells (no change) and the training cells of the same label (train mean);
- the split-half noise ceiling and the noiseless predictor's score
  (:func:`pyrovae.evaluate.ceiling.noise_ceilings`);
- optionally (``mc_seeds`` > 1) the Monte Carlo spread of each model's metrics over model-ATE seeds;
- every metric as a score against the best baseline (:func:`pyrovae.evaluate.metrics.score_vs_baseline`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pyrovae.baselines import all_baseline_ates
from pyrovae.baselines.ate import baseline_ates
from pyrovae.data.matrix import select_rows
from pyrovae.evaluate.ate import METRIC_KEYS, ate_table, per_perturbation_metrics
from pyrovae.evaluate.ceiling import noise_ceilings
from pyrovae.evaluate.cells import energy_by_perturbation, sample_totals, subsample_by_label, transform_cells
from pyrovae.evaluate.empirical import data_totals
from pyrovae.evaluate.metrics import de_qvalues, pca_basis, perturbed_reference, score_vs_baseline

__all__ = ["field_table", "combination_members", "CELL_BASELINES"]

#: the cell-level stand-ins of two baselines: training control cells and training cells of the same label
CELL_BASELINES = ("no_change", "train_mean")
_NON_METRIC = ("top_k", "n_perturbations", "n_dropped", "n_interactions")


def combination_members(perturbations: Sequence[str], sep: str) -> list[str]:
    """The members of the combinations among ``perturbations`` that are not themselves listed (sorted)."""
    listed = {str(p) for p in perturbations}
    return sorted({s for p in listed if sep and sep in p for s in p.split(sep) if s} - listed)


def field_table(
    data,
    rows: np.ndarray,
    ate_true: pd.DataFrame,
    preds: dict[str, pd.DataFrame],
    *,
    transform: str,
    top_k: int = 20,
    model_singles: Mapping[str, pd.DataFrame] | None = None,
    baselines: bool = True,
    de: bool = True,
    cells: Mapping[str, Any] | None = None,
    ceiling: bool = True,
    ceiling_splits: int = 5,
    mc_preds: Mapping[str, Sequence[pd.DataFrame]] | None = None,
    mc_cells: Mapping[str, Sequence[Any]] | None = None,
    seed: int = 0,
    max_cells: int = 300,
) -> dict[str, Any]:
    """The ATE table of ``preds`` (plus the baselines) with the field-standard metrics.

    Args:
        data: :class:`~pyrovae.data.perturbation_data.PerturbationData`.
        rows: the held-out cells the truth ``ate_true`` (A, G) was measured on (control cells included).
        preds: {name: (A, G) predicted ATE} (models and any extra predictions).
        transform: the ATE transform (``"perturbseq"`` or ``"mean"``).
        model_singles: {model name: (S, G) its predicted ATEs of the combinations' members}.
        baselines: add the model-free baselines.
        de: compute the DE q-values of the held-out cells (the ``*_de_topk`` metrics; NaN without).
        cells: {model name: AnnData of predicted counts (obs ``perturbation``)} for the energy distance
            (None: no cell-level metric).
        ceiling: compute the noise ceiling (``ceiling_splits`` halvings).
        mc_preds: {model name: further predicted ATEs at other seeds}: ``<metric>_mc_sd`` columns, the
            standard deviation of each metric over the model's seeds (its Monte Carlo spread).
        mc_cells: {model name: further predicted cells at other seeds}: ``energy_distance_mc_sd``.
        seed: seeds the PCA subset, cell subsets and ceiling halvings.
        max_cells: at most this many cells per label and side in an energy distance.

    Returns:
        dict with ``preds`` (``preds`` and the baselines, rows ``ate_true.index``), ``table``,
        ``per_perturbation``, ``ceiling`` (the two rows of :func:`~pyrovae.evaluate.ceiling.noise_ceilings`
        or None), ``vs_baseline`` (methods x metrics,
        or None without baselines), ``baseline_names``, ``de_qvalues`` (A x G or None), ``energy``
        (long table: method, perturbation, energy_distance; None without ``cells``).
    """
    rows = np.asarray(rows)
    perts = [str(p) for p in ate_true.index]
    ctrl = data.control_label
    labels_rows = np.asarray(data.labels)[rows].astype(str)
    members = combination_members(perts, data.sep)
    preds = dict(preds)
    singles_preds = {k: v for k, v in (model_singles or {}).items()}
    baseline_names: list[str] = []
    if baselines:
        base = all_baseline_ates(data, perts + members, transform=transform)
        baseline_names = list(base)
        for k, v in base.items():
            preds[k] = v.loc[perts]
            singles_preds[k] = v
    singles_true = None
    if data.sep and any(data.sep in p for p in perts):  # combinations: their members' training ATEs
        singles = [p for p in perts + members if data.sep not in p]
        train_mean = (
            base["train_mean"]
            if baselines
            else baseline_ates(data, singles, transform=transform)["train_mean"]
        )
        singles_true = train_mean.loc[singles].dropna()
    totals = data_totals(data, rows)
    g_rows = (
        transform_cells(select_rows(data.counts, rows), transform, totals=totals) if (de or cells) else None
    )
    q = de_qvalues(g_rows, labels_rows, ctrl, perts, genes=data.genes) if de else None
    reference = perturbed_reference(ate_true, [(labels_rows == p).sum() for p in perts])
    kw = dict(de_qvalues=q, reference=reference, singles_true=singles_true, sep=data.sep)
    table = ate_table(ate_true, preds, top_k, singles_preds=singles_preds, **kw)
    per_pert = per_perturbation_metrics(
        ate_true, preds, top_k, de_qvalues=q, reference=reference, sep=data.sep
    )
    energy = None
    if cells:
        energy, e_sd = _energy(data, g_rows, labels_rows, perts, cells, transform, seed, max_cells, mc_cells)
        means = energy.groupby("method", sort=False)["energy_distance"].mean()
        table["energy_distance"] = [means.get(m, np.nan) for m in table.index]
        if e_sd:
            table["energy_distance_mc_sd"] = [e_sd.get(m, np.nan) for m in table.index]
        per_pert = per_pert.merge(energy, on=["method", "perturbation"], how="left")
    for name, others in (mc_preds or {}).items():
        runs = [table.loc[name]] + [
            ate_table(ate_true, {name: p}, top_k, singles_preds=singles_preds, **kw).loc[name] for p in others
        ]
        sd = pd.DataFrame(runs)[[c for c in METRIC_KEYS if c not in _NON_METRIC]].std(ddof=1)
        for c, v in sd.items():
            table.loc[name, f"{c}_mc_sd"] = v
    ceil = None
    if ceiling:
        ceil = noise_ceilings(
            data.counts,
            data.labels,
            ctrl,
            rows,
            transform=transform,
            library_size=data_totals(data, np.arange(data.n_cells)),
            n_splits=ceiling_splits,
            seed=seed,
            top_k=top_k,
            genes=data.genes,
            sep=data.sep,
            energy=bool(cells),
            max_cells=max_cells,
            singles=singles_true,
        )
    vs = score_vs_baseline(table, baseline_names) if baseline_names else None
    return {
        "preds": preds,
        "table": table,
        "per_perturbation": per_pert,
        "ceiling": ceil,
        "vs_baseline": vs,
        "baseline_names": baseline_names,
        "de_qvalues": q,
        "energy": energy,
    }


def _cells_energy(
    data, adata, g_rows, labels_rows, perts, basis, transform: str, seed: int, max_cells: int
) -> pd.Series:
    """Energy distance (by perturbation) of the predicted cells ``adata`` against the held-out cells."""
    g = transform_cells(adata.X, transform, totals=sample_totals(adata, data.size_factor_key is not None))
    lab = np.asarray(adata.obs["perturbation"]).astype(str)
    return energy_by_perturbation(g_rows, labels_rows, g, lab, perts, basis, max_cells=max_cells, seed=seed)


def _energy(
    data,
    g_rows: np.ndarray,
    labels_rows: np.ndarray,
    perts: list[str],
    cells: Mapping[str, Any],
    transform: str,
    seed: int,
    max_cells: int,
    mc_cells: Mapping[str, Sequence[Any]] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Long table (method, perturbation, energy_distance) of the models' predicted cells and the two cell
    baselines against the held-out cells, in a PCA of the held-out cells; and {model: sd of its mean energy
    distance over its cells at all seeds} for the models in ``mc_cells`` (further predictions)."""
    basis = pca_basis(g_rows, seed=seed)
    frames = []

    def add(name: str, series: pd.Series) -> None:
        frames.append(
            pd.DataFrame({"method": name, "perturbation": series.index, "energy_distance": series.to_numpy()})
        )

    mc_sd = {}
    for name, adata in cells.items():
        first = _cells_energy(data, adata, g_rows, labels_rows, perts, basis, transform, seed, max_cells)
        add(name, first)
        if (mc_cells or {}).get(name):
            means = [first.mean()] + [
                _cells_energy(data, a, g_rows, labels_rows, perts, basis, transform, seed, max_cells).mean()
                for a in mc_cells[name]
            ]
            mc_sd[name] = float(np.std(means, ddof=1))
    train = np.asarray(data.indices("train"))
    train_labels = np.asarray(data.labels)[train].astype(str)
    picked = subsample_by_label(train_labels, [*perts, data.control_label], max_cells, seed + 2)
    ctrl_pos = train[picked[data.control_label]]
    g_ctrl = transform_cells(
        select_rows(data.counts, ctrl_pos), transform, totals=data_totals(data, ctrl_pos)
    )
    no_change = {
        p: energy_by_perturbation(
            g_rows, labels_rows, g_ctrl, np.full(len(g_ctrl), p), [p], basis, max_cells=max_cells, seed=seed
        )[p]
        for p in perts
    }
    add(CELL_BASELINES[0], pd.Series(no_change, dtype=np.float64))
    pos = np.concatenate([train[picked[p]] for p in perts]) if perts else np.zeros(0, dtype=np.int64)
    g_train = transform_cells(select_rows(data.counts, pos), transform, totals=data_totals(data, pos))
    lab_train = np.asarray(data.labels)[pos].astype(str)
    add(
        CELL_BASELINES[1],
        energy_by_perturbation(
            g_rows, labels_rows, g_train, lab_train, perts, basis, max_cells=max_cells, seed=seed
        ),
    )
    return pd.concat(frames, ignore_index=True), mc_sd
