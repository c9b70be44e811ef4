"""Figures (matplotlib, imported lazily with the Agg backend; install the ``plot`` extra).

Every function writes one figure atomically (temporary file + rename) and returns the path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from pyrovae.evaluate.ate import pearson
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


def plot_ate_scatter(ate_true, ate_pred: Mapping[str, Any], path: str | Path, top_k: int = 20) -> Path:
    """Model versus empirical ATE, one panel per model; the top-k genes (by |empirical ATE|) of every
    perturbation highlighted, Pearson r (all entries / top-k) in the title.

    Args:
        ate_true: DataFrame (perturbation x genes) of empirical ATEs.
        ate_pred: ``{name: DataFrame}`` of predicted ATEs (aligned to ``ate_true`` on common rows/genes).
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
        r_all, r_top = pearson(t.ravel(), p.ravel()), pearson(t[top], p[top])
        ax.set_title(f"{name}\nr = {r_all:.2f} (all), {r_top:.2f} (top {top_k})", fontsize=9)
        ax.set_xlabel("empirical ATE")
        ax.set_ylabel("predicted ATE")
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def match_columns(est: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Column order of ``est`` (T, K) that best matches the columns of ``true`` (T, K') (Hungarian
    matching on the agreement est_k . true_k'; latent axes are only identified up to permutation).
    Unmatched estimated columns are appended in their original order."""
    est, true = np.asarray(est, dtype=float), np.asarray(true, dtype=float)
    score = est.T @ true + (1 - est).T @ (1 - true)  # (K, K')
    r, c = linear_sum_assignment(-score)
    order = [int(i) for _, i in sorted(zip(c, r))]
    return np.array(order + [k for k in range(est.shape[1]) if k not in set(order)], dtype=int)


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
