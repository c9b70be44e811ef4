"""cell-eval (Arc Institute's scorer of the Virtual Cell Challenge) on a pyrovae run: optional extra.

``pip install 'pyrovae[eval]'`` installs cell-eval. :func:`cell_eval_inputs` builds the two AnnData
objects cell-eval reads: the model's predicted cells (control included) and the run's held-out real cells,
both log-normalised on ONE scale, ln(1 + target_sum * x / cell total) (cell-eval would otherwise scale each
side to its own median depth). :func:`run_cell_eval` runs cell-eval's metric profile on them, then the
same profile on cell-eval's mean baseline built from the run's *training* cells, and cell-eval's
baseline-normalised score; every table is written by cell-eval into one folder. Nothing of cell-eval is
re-implemented here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pyrovae.data.matrix import select_rows
from pyrovae.evaluate.cells import sample_totals
from pyrovae.evaluate.empirical import data_totals, perturbseq_transform

__all__ = [
    "PERT_COL",
    "cell_eval_available",
    "lognorm",
    "cell_eval_adata",
    "cell_eval_inputs",
    "run_cell_eval",
]

#: the obs column of the perturbation label in the AnnData objects handed to cell-eval
PERT_COL = "target"


def cell_eval_available() -> bool:
    """Whether the optional cell-eval package is importable."""
    try:
        import cell_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _import_cell_eval():
    try:
        import cell_eval
    except ImportError as err:
        raise ImportError(
            "cell-eval is not installed: pip install 'pyrovae[eval]' (or pip install cell-eval)"
        ) from err
    return cell_eval


def lognorm(x: Any, target_sum: float = 1e4, totals: np.ndarray | None = None) -> np.ndarray:
    """(N, G) float32 ln(1 + target_sum * x / l) of counts ``x`` (dense or sparse; zero rows stay zero),
    l = the cell's total count or its ``totals`` entry (size factors): scanpy's normalize_total + log1p at
    a fixed scale, the same for predicted and real cells."""
    return (perturbseq_transform(x, target_sum, totals) * np.log(2.0)).astype(np.float32)


def cell_eval_adata(x: np.ndarray, labels: np.ndarray, genes: list[str], prefix: str) -> ad.AnnData:
    """AnnData (N, G) as cell-eval reads it: X = ``x`` (already log-normalised), obs ``target`` = the
    (N,) ``labels``, obs names ``<prefix><i>``, var names ``genes``."""
    obs = pd.DataFrame({PERT_COL: pd.Categorical(labels.astype(str))})
    obs.index = pd.Index([f"{prefix}{i}" for i in range(len(labels))])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))


def cell_eval_inputs(
    posterior,
    data,
    rows: np.ndarray,
    *,
    n_cells: int = 500,
    library_size: str | float = "data",
    seed: int = 0,
    chunk: int = 256,
    target_sum: float = 1e4,
) -> tuple[ad.AnnData, ad.AnnData, ad.AnnData]:
    """The predicted, held-out real and training real cells, log-normalised on one scale, for cell-eval.

    Args:
        posterior: :class:`~pyrovae.predict.posterior.Posterior` of the run.
        data: the run's :class:`~pyrovae.data.perturbation_data.PerturbationData`.
        rows: the held-out cells (e.g. ``data.indices("test")``); when they hold no control cell, every
            control cell of a split is added (as the ATE report does).
        n_cells: predicted cells per label (each perturbation of ``rows`` and the control).
        library_size: of the predicted cells (default ``"data"``, i.e. matched: drawn from the observed
            library sizes of the same label, so that the predicted cells are as deep as the real ones); a
            number fixes it.
        seed, chunk: of :meth:`~pyrovae.predict.posterior.Posterior.predict`.
        target_sum: the normalisation scale of both sides.

    Returns:
        (pred, real, train) AnnData, X = ln(1 + target_sum x / total) float32, obs ``target`` = label, var
        names = the run's genes; ``train`` = the training cells (for cell-eval's mean baseline).
    """
    rows = np.asarray(rows)
    ctrl = data.control_label
    labels = np.asarray(data.labels).astype(str)
    if not (labels[rows] == ctrl).any():
        rows = np.concatenate([rows, np.flatnonzero((labels == ctrl) & (np.asarray(data.split) != ""))])
    perts = sorted(set(labels[rows].tolist()) - {ctrl})
    if not perts:
        raise ValueError("the selected cells hold no perturbed cell; nothing for cell-eval to score")
    genes = [str(g) for g in data.genes]
    sample = posterior.predict(
        [*perts, ctrl], n_cells=n_cells, library_size=library_size, data=data, seed=seed, chunk=chunk
    )
    sf = data.size_factor_key is not None
    x_pred = lognorm(sample.X, target_sum, sample_totals(sample, sf))
    pred = cell_eval_adata(x_pred, np.asarray(sample.obs["perturbation"]), genes, "pred_")
    x_real = lognorm(select_rows(data.counts, rows), target_sum, data_totals(data, rows))
    real = cell_eval_adata(x_real, labels[rows], genes, "real_")
    train = np.asarray(data.indices("train"))
    x_train = lognorm(select_rows(data.counts, train), target_sum, data_totals(data, train))
    tr = cell_eval_adata(x_train, labels[train], genes, "train_")
    return pred, real, tr


def run_cell_eval(
    pred: ad.AnnData,
    real: ad.AnnData,
    control_label: str,
    out_dir: str | Path,
    *,
    train: ad.AnnData | None = None,
    profile: str = "full",
    num_threads: int = 1,
) -> dict[str, Any]:
    """Run cell-eval's metrics of ``pred`` against ``real`` (and its baseline-normalised score).

    cell-eval writes into ``out_dir``: ``real_de.csv`` and ``pred_de.csv`` (its DE tests), ``results.csv``
    (per perturbation) and ``agg_results.csv`` (aggregated). With ``train``: cell-eval's mean baseline
    (``build_base_mean_adata``: every perturbed training cell's mean, as many cells per perturbation as in
    ``real``, plus the training control cells) is scored the same way into ``baseline/``, and
    ``score.csv`` holds cell-eval's ``score_agg_metrics`` of the model against it (0 = the baseline,
    1 = perfect, per metric and ``avg_score``).

    Args:
        pred, real, train: from :func:`cell_eval_inputs` (already log-normalised; cell-eval leaves them).
        control_label: the control cells' label.
        profile: cell-eval's metric profile (``"full"``, ``"vcc"``, ``"minimal"``, ``"de"``, ``"anndata"``).
        num_threads: threads of cell-eval's DE tests.

    Returns:
        dict with ``results`` and ``agg_results`` (pandas), and with ``train``: ``baseline_agg_results`` and
        ``score`` (pandas); ``out_dir``.
    """
    ce = _import_cell_eval()
    out = Path(out_dir)  # cell-eval makes the folders
    kw = dict(control_pert=str(control_label), pert_col=PERT_COL, num_threads=int(num_threads))
    evaluator = ce.MetricsEvaluator(adata_pred=pred, adata_real=real, outdir=str(out), **kw)
    results, agg = evaluator.compute(profile=profile)
    res: dict[str, Any] = {"results": results.to_pandas(), "agg_results": agg.to_pandas(), "out_dir": out}
    if train is not None:
        counts = real.obs[PERT_COL].astype(str).value_counts()
        counts = counts[counts.index != str(control_label)]
        counts_df = pd.DataFrame({PERT_COL: counts.index.to_numpy(), "n_cells": counts.to_numpy()})
        base = ce.build_base_mean_adata(
            train,
            counts_df=_polars(counts_df),
            pert_col=PERT_COL,
            control_pert=str(control_label),
            counts_col="n_cells",
        )
        base_eval = ce.MetricsEvaluator(adata_pred=base, adata_real=real, outdir=str(out / "baseline"), **kw)
        _, base_agg = base_eval.compute(profile=profile)
        score = ce.score_agg_metrics(agg, base_agg, output=str(out / "score.csv"))
        res.update(baseline_agg_results=base_agg.to_pandas(), score=score.to_pandas())
    return res


def _polars(df: pd.DataFrame):
    import polars as pl  # installed with cell-eval

    return pl.from_pandas(df)
