"""Tables: GitHub Markdown, aggregation over seeds, ``mean ± sd`` formatting.

Used by the commands (``pyrovae ate``, ``pyrovae demo``) and the experiment scripts; no extra dependency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd


def markdown_table(df: pd.DataFrame, floatfmt: str = "{:.3f}", index: bool = True) -> str:
    """A GitHub-flavoured Markdown table of a DataFrame (no extra dependency)."""

    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "–" if not math.isfinite(float(v)) else floatfmt.format(float(v))
        if v is None:
            return "–"
        return str(v).replace("|", "\\|")

    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for idx, *row in df.itertuples(name=None):  # itertuples keeps each column's dtype (ints stay ints)
        vals = ([cell(idx)] if index else []) + [cell(v) for v in row]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def aggregate(
    results: pd.DataFrame,
    by: Sequence[str],
    metrics: Sequence[str],
    order: Mapping[str, Sequence] | None = None,
) -> pd.DataFrame:
    """Mean, std (ddof=1; NaN for a single value) and count of each metric per group.

    Returns a DataFrame with the ``by`` columns, ``n`` (runs in the group) and ``<metric>_mean``,
    ``<metric>_std`` for every metric present. NaN values are ignored (a metric missing from one run).
    ``order`` sorts groups by the given value order (e.g. the model order of the config).
    """
    metrics = [m for m in metrics if m in results.columns]
    rows = []
    for key, grp in results.groupby(list(by), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(by, key))
        row["n"] = int(len(grp))
        for m in metrics:
            vals = pd.to_numeric(grp[m], errors="coerce").to_numpy(dtype=float)
            vals = vals[np.isfinite(vals)]
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    if order and len(out):
        keys = []
        for col in by:
            if col in order:
                rank = {v: i for i, v in enumerate(order[col])}
                keys.append(out[col].map(lambda v, rank=rank: rank.get(v, len(rank))))
            else:
                keys.append(out[col])
        sort_df = pd.DataFrame({f"_k{i}": k for i, k in enumerate(keys)})
        out = out.iloc[np.lexsort([sort_df[c].to_numpy() for c in reversed(sort_df.columns)])]
    return out.reset_index(drop=True)


def mean_std(mean: float | None, std: float | None = None, fmt: str = "{:.3f}") -> str:
    """``"m ± s"``; just ``"m"`` without a finite ``std``; ``"–"`` for a missing or NaN mean."""
    if mean is None or not math.isfinite(float(mean)):
        return "–"
    if std is None or not math.isfinite(float(std)):
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def format_summary(
    agg: pd.DataFrame, by: Sequence[str], metrics: Mapping[str, str], fmts: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """A display table: the ``by`` columns, ``n``, then one ``mean ± std`` column per metric.

    Args:
        agg: the output of :func:`aggregate`.
        metrics: {metric: column title}, in display order; metrics absent from ``agg`` are skipped.
        fmts: {metric: format} (default ``{:.3f}``; IWELBOs look better with ``{:.2f}``).
    """
    fmts = dict(fmts or {})
    out = agg[list(by) + ["n"]].copy()
    for col in by:  # numeric keys (fractions, seeds) as compact strings
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = [f"{v:.2f}" if math.isfinite(v) else "–" for v in out[col]]
    for m, title in metrics.items():
        if f"{m}_mean" not in agg.columns:
            continue
        f = fmts.get(m, "{:.3f}")
        out[title] = [mean_std(a, b, f) for a, b in zip(agg[f"{m}_mean"], agg[f"{m}_std"])]
    return out


def add_relative(
    results: pd.DataFrame,
    metric: str,
    reference: Mapping[str, Any],
    match: Sequence[str] = ("seed",),
    name: str | None = None,
) -> pd.DataFrame:
    """Add ``<metric>_rel`` = metric minus the metric of the reference row with the same ``match`` values.

    ``reference`` selects the reference rows by column values, e.g. ``{"model": "sams_vae", "frac": 0.0}``.
    Rows whose reference is missing get NaN.
    """
    name = name or f"{metric}_rel"
    out = results.copy()
    if metric not in out.columns or not len(out):
        out[name] = np.nan
        return out
    sel = np.ones(len(out), dtype=bool)
    for k, v in reference.items():
        col = out[k]
        sel &= np.isclose(col.astype(float), float(v)) if isinstance(v, float) else (col == v).to_numpy()
    ref = out[sel].drop_duplicates(list(match), keep="last").set_index(list(match))[metric]
    keys = out[list(match)].apply(tuple, axis=1) if len(match) > 1 else out[match[0]]
    out[name] = out[metric].to_numpy(dtype=float) - np.asarray(
        [ref.get(k, np.nan) for k in keys], dtype=float
    )
    return out
