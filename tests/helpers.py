"""Helpers shared by the tests (imported as ``tests.helpers``): tiny hand-made perturbation data and a
training-history check."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp


def make_adata(n: int = 240, g: int = 20, seed: int = 0, combos: bool = True) -> ad.AnnData:
    """Counts where perturbation A raises genes 0-4 and B lowers genes 5-9."""
    rng = np.random.default_rng(seed)
    groups = ["control", "A", "B"] + (["A+B"] if combos else [])
    labels = np.array([groups[i % len(groups)] for i in range(n)])
    rate = np.full((n, g), 4.0)
    rate[np.char.find(labels.astype(str), "A") >= 0, :5] *= 4.0
    rate[np.char.find(labels.astype(str), "B") >= 0, 5:10] *= 0.25
    lib = rng.lognormal(0, 0.3, size=(n, 1))
    x = rng.poisson(rate * lib).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(x))
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = [f"g{j}" for j in range(g)]
    a.obs["perturbation"] = labels
    return a


def assert_trains(history: list[dict[str, float]], keys: tuple[str, ...] = ("train_loss",)) -> None:
    """Every loss of a training history is finite and the last three epochs beat the first three."""
    for key in keys:
        losses = [h[key] for h in history]
        assert all(np.isfinite(losses)), (key, losses)
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), (key, losses)
