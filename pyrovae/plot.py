"""Figures (matplotlib, imported lazily with the Agg backend; install the ``plot`` extra).

Every function writes one figure atomically (temporary file + rename) and returns the path. The last
section draws tables of :func:`pyrovae.report.aggregate` (``<metric>_mean`` / ``<metric>_std`` columns):
metric lines against a setting (:func:`plot_lines`) and bars per row (:func:`plot_bars`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pyrovae.evaluate.structure import match_latents
from pyrovae.outputs import atomic_write


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("figures need matplotlib: pip install 'pyrovae[plot]'") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))
    _pyplot().close(fig)
    return path


def plot_training_curves(
    history: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path
) -> Path:
    """Training (dashed) and validation (solid) loss per epoch, one colour per model.

    Args:
        history: the rows of a run's ``metrics.csv`` (``epoch``, ``train_loss``, ``val_loss``), or a dict
            ``{model name: rows}``.
    """
    plt = _pyplot()
    runs = {"model": list(history)} if not isinstance(history, Mapping) else dict(history)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, rows) in enumerate(runs.items()):
        rows = list(rows)
        if not rows:
            continue
        color = f"C{i}"
        epochs = [r.get("epoch", j + 1) for j, r in enumerate(rows)]
        for key, style in (("train_loss", "--"), ("val_loss", "-")):
            vals = [r.get(key, np.nan) for r in rows]
            if not np.all(np.isnan(np.asarray(vals, dtype=float))):
                ax.plot(epochs, vals, style, color=color, label=f"{name} {key.split('_')[0]}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per cell (nats)")
    ax.set_title("training curves")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _top_k_mask(true, top_k: int) -> np.ndarray:
    a = np.abs(np.asarray(true, dtype=float))
    k = min(top_k, a.shape[1])
    mask = np.zeros_like(a, dtype=bool)
    idx = np.argsort(-a, axis=1)[:, :k]
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def plot_ate_scatter(
    ate_true, ate_pred: Mapping[str, Any], scores: pd.DataFrame, path: str | Path, top_k: int = 20
) -> Path:
    """Model versus empirical ATE, one panel per model; the top-k genes (by ``|empirical ATE|``) of every
    perturbation highlighted, the scores' Pearson r (all entries / top-k) in the title.

    Args:
        ate_true: DataFrame (perturbation x genes) of empirical ATEs.
        ate_pred: ``{name: DataFrame}`` of predicted ATEs (aligned to ``ate_true`` on common rows/genes).
        scores: the metrics of the same predictions (:func:`~pyrovae.evaluate.ate.ate_table` with the same
            ``top_k``, indexed by name; columns ``pearson`` and ``pearson_topk``): the figure shows them, it
            computes none.
    """
    plt = _pyplot()
    names = list(ate_pred)
    n = max(len(names), 1)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        pred = ate_pred[name]
        rows = [r for r in ate_true.index if r in pred.index]
        cols = [c for c in ate_true.columns if c in pred.columns]
        t = ate_true.loc[rows, cols].to_numpy(dtype=float)
        p = pred.loc[rows, cols].to_numpy(dtype=float)
        if t.size == 0:
            ax.set_title(f"{name}: no common perturbations")
            continue
        top = _top_k_mask(t, top_k)
        ax.scatter(t[~top], p[~top], s=4, alpha=0.3, color="0.6", label="other genes")
        ax.scatter(t[top], p[top], s=8, alpha=0.8, color="C3", label=f"top {top_k} DE genes")
        lo = float(np.nanmin([t.min(), p.min()]))
        hi = float(np.nanmax([t.max(), p.max()]))
        ax.plot([lo, hi], [lo, hi], "k:", lw=1)
        r_all, r_top = (
            float(scores.at[name, k]) if name in scores.index else np.nan for k in ("pearson", "pearson_topk")
        )
        ax.set_title(f"{name}\nr = {r_all:.2f} (all), {r_top:.2f} (top {top_k})", fontsize=9)
        ax.set_xlabel("empirical ATE")
        ax.set_ylabel("predicted ATE")
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def match_columns(est: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Column order of ``est`` (T, K) that best matches the columns of ``true`` (T, K')
    (:func:`~pyrovae.evaluate.structure.match_latents` on the agreement, on and off; latent axes are only
    identified up to permutation). Unmatched estimated columns are appended in their original order."""
    row, col = match_latents(true, est, agreement=True)
    order = [int(c) for _, c in sorted(zip(row, col))]
    return np.array(order + [k for k in range(np.shape(est)[1]) if k not in set(order)], dtype=int)


def plot_mask_heatmap(
    mask_probs, treatments: Sequence[str], path: str | Path, true_mask=None, title: str = "q(mask)"
) -> Path:
    """Heatmap of mask probabilities (T, K), with the ground-truth mask beside it when given.

    With a ground truth, the estimated latent columns are permuted to best match it (see
    :func:`match_columns`) since latent axes are identified only up to permutation.
    """
    plt = _pyplot()
    probs = np.asarray(mask_probs, dtype=float)
    panels = [(title, probs)]
    if true_mask is not None:
        truth = np.asarray(true_mask, dtype=float)
        probs = probs[:, match_columns(probs, truth)]
        panels = [(f"{title} (columns matched)", probs), ("ground truth", truth)]
    T = probs.shape[0]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(0.35 * sum(p[1].shape[1] for p in panels) + 3, 0.3 * T + 1.5), squeeze=False
    )
    im = None
    for ax, (name, mat) in zip(axes[0], panels):
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("latent dimension")
        ax.set_yticks(range(T))
        ax.set_yticklabels(list(treatments), fontsize=7)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="probability")
    return _save(fig, path)


# ------------------------------------------------------------------------------ aggregated results
def _plottable(agg: pd.DataFrame, metrics: Mapping[str, str]) -> dict[str, str]:
    """The metrics of ``metrics`` that have at least one value in ``agg`` (none if ``agg`` is empty)."""
    if not len(agg):
        return {}
    return {m: t for m, t in metrics.items() if f"{m}_mean" in agg.columns and agg[f"{m}_mean"].notna().any()}


def plot_lines(
    agg: pd.DataFrame,
    x: str,
    metrics: Mapping[str, str],
    path: str | Path,
    series: str = "model",
    xlabel: str | None = None,
    title: str | None = None,
) -> Path | None:
    """One panel per metric: mean ± std (error bars) against ``x``, one line per ``series`` value."""
    metrics = _plottable(agg, metrics)
    if not metrics:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, (m, label) in zip(axes[0], metrics.items()):
        for i, (name, grp) in enumerate(agg.groupby(series, sort=False)):
            grp = grp.sort_values(x)
            ax.errorbar(
                grp[x],
                grp[f"{m}_mean"],
                yerr=grp[f"{m}_std"].fillna(0.0),
                marker="o",
                ms=3,
                capsize=2,
                color=f"C{i % 10}",
                label=str(name),
            )
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_bars(
    agg: pd.DataFrame, label: str, metrics: Mapping[str, str], path: str | Path, title: str | None = None
) -> Path | None:
    """One horizontal bar panel per metric: mean ± std per row label."""
    metrics = _plottable(agg, metrics)
    if not metrics:
        return None
    plt = _pyplot()
    n = len(agg)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 0.35 * n + 1.5), squeeze=False)
    ypos = np.arange(n)
    for ax, (m, title_m) in zip(axes[0], metrics.items()):
        ax.barh(
            ypos,
            agg[f"{m}_mean"].to_numpy(dtype=float),
            xerr=agg[f"{m}_std"].fillna(0.0).to_numpy(float),
            color=[f"C{i % 10}" for i in range(n)],
            capsize=2,
        )
        ax.set_yticks(ypos)
        ax.set_yticklabels(agg[label].astype(str).tolist(), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(title_m)
        ax.grid(alpha=0.3, axis="x")
        vals = agg[f"{m}_mean"].to_numpy(dtype=float)
        finite = vals[np.isfinite(vals)]
        if len(finite) and finite.min() < 0 and m.endswith("iwelbo"):
            lo, hi = finite.min(), finite.max()
            pad = max(hi - lo, 1.0) * 0.3
            ax.set_xlim(lo - pad, hi + pad)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
