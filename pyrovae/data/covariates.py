"""Batches, categorical covariates and size factors: read from obs, checked once, encoded for the model.

- :func:`covariate_levels` / :func:`covariate_onehot`: categorical obs columns (batch first, then the
  covariates) become one (N, C) one-hot block, C = the total number of levels, in the order of the levels
  a run stores (``schema.json["covariates"]``). A level the run never saw is an error naming it.
- :func:`size_factors`: a per-cell library size read from an obs column (positive and finite), used
  instead of the sum over the modelled genes (the right depth when only highly variable genes are kept).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from pyrovae.config import preview

__all__ = ["covariate_levels", "covariate_onehot", "size_factors"]


def _column(obs: pd.DataFrame, key: str, what: str) -> pd.Series:
    if key not in obs.columns:
        raise ValueError(
            f"obs has no {what} column {key!r}; obs columns are {preview(list(obs.columns), 12)}. "
            f"Pass the name of an obs column (or drop the {what} option)"
        )
    return obs[key]


def _as_levels(col: pd.Series, key: str) -> np.ndarray:
    """(N,) str values of a categorical column; missing values are an error."""
    missing = col.isna()
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} cells have a missing value in the covariate column obs[{key!r}]; fill it "
            "(e.g. adata.obs[key] = adata.obs[key].cat.add_categories('unknown').fillna('unknown')) or drop "
            "those cells"
        )
    values = col.astype(str).to_numpy()
    blank = [v for v in set(values.tolist()) if v.strip() in ("", "nan", "None")]
    if blank:
        raise ValueError(
            f"obs[{key!r}] holds the level(s) {sorted(blank)}, which look like missing values turned into "
            "text (astype(str) of NaN / None); fill them with a real level or drop those cells"
        )
    return values


def covariate_levels(
    obs: pd.DataFrame, keys: Sequence[str], rows: np.ndarray | None = None
) -> dict[str, list]:
    """{key: sorted levels} of the categorical obs columns ``keys`` (over ``rows``, default all cells).

    A column with a single level carries no information; it is accepted (its one-hot column is constant).
    """
    out: dict[str, list[str]] = {}
    for key in keys:
        values = _as_levels(_column(obs, key, "covariate"), key)
        if rows is not None:
            values = values[rows]
        out[key] = sorted(set(values.tolist()))
    return out


def covariate_onehot(obs: pd.DataFrame, levels: Mapping[str, Sequence[str]]) -> np.ndarray:
    """(N, C) float32 one-hot block of the columns of ``levels`` in its order (C = total levels).

    Raises ``ValueError`` naming cells whose level is not among the stored ones (a model cannot place a
    batch or cell line it was never trained on).
    """
    blocks = []
    for key, lev in levels.items():
        values = _as_levels(_column(obs, key, "covariate"), key)
        index = pd.Index([str(v) for v in lev])
        codes = index.get_indexer(values)
        if (codes < 0).any():
            unseen = sorted(set(values[codes < 0].tolist()))
            raise ValueError(
                f"obs[{key!r}] has level(s) {preview(unseen, 5)} that the model was not trained on "
                f"({int((codes < 0).sum())} cells); it knows {preview(list(index), 8)}. Drop those cells, "
                "or train with them"
            )
        block = np.zeros((len(values), len(index)), dtype=np.float32)
        block[np.arange(len(values)), codes] = 1.0
        blocks.append(block)
    if not blocks:
        return np.zeros((len(obs), 0), dtype=np.float32)
    return np.concatenate(blocks, axis=1)


def size_factors(obs: pd.DataFrame, key: str) -> np.ndarray:
    """(N,) float32 per-cell library sizes from ``obs[key]``: numeric, finite and positive, or one error."""
    col = _column(obs, key, "size-factor")
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        shown = preview([str(v) for v in col[bad].head(5).tolist()], 5)
        raise ValueError(
            f"obs[{key!r}] (the size factor) must hold positive finite numbers; {int(bad.sum())} cells don't "
            f"(e.g. {shown}). Use each cell's total count (e.g. obs['ncounts'] or obs['total_counts']), or "
            "drop those cells"
        )
    return values.astype(np.float32)
