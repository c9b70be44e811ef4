"""Noise ceilings (pyrovae.evaluate.ceiling) and the cell-level energy distances (pyrovae.evaluate.cells)."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyrovae.evaluate.ate import METRIC_KEYS
from pyrovae.evaluate.ceiling import noise_ceiling, noise_ceilings
from pyrovae.evaluate.cells import energy_by_perturbation, transform_cells
from pyrovae.evaluate.metrics import pca_basis, spearman_brown


def _duplicated(n_copies=4, seed=0):
    """Every label's cells are identical copies: no noise at all."""
    rng = np.random.default_rng(seed)
    groups = ["ctrl", "A", "B", "C", "A+B"]
    profiles = {g: rng.poisson(20.0, size=12).astype(float) + 1.0 for g in groups}
    labels = np.repeat(groups, n_copies)
    x = np.array([profiles[g] for g in labels])
    return x, labels


def test_ceiling_of_noiseless_duplicated_data_is_perfect():
    x, labels = _duplicated()
    both = noise_ceilings(
        sp.csr_matrix(x), labels, "ctrl", np.arange(len(x)), transform="perturbseq", n_splits=3, top_k=5
    )
    assert list(both.index) == ["noise_ceiling", "perfect_predictor"]
    assert np.allclose(both.iloc[0][["pearson", "mse"]], both.iloc[1][["pearson", "mse"]])
    c = both.loc[["noise_ceiling"]]
    assert c.index.name == "method"
    assert set(METRIC_KEYS) <= set(c.columns) and "pearson_sd" in c.columns and "energy_distance" in c.columns
    row = c.iloc[0]
    for key in ("pearson", "pearson_topk", "pearson_per_pert_mean", "pearson_de_topk", "pearson_delta_pert"):
        assert row[key] == pytest.approx(1.0), key
    for key in ("mse", "mse_topk", "mae", "mse_de_topk", "interaction_mse", "rank"):
        assert row[key] == pytest.approx(0.0, abs=1e-12), key
    assert row["energy_distance"] == pytest.approx(0.0, abs=1e-6)  # Euclidean distances to rounding
    assert row["pds"] == 1.0 and row["centroid_accuracy"] == 1.0
    assert row["interaction_pearson"] == pytest.approx(1.0)  # a correlation: 1 to rounding
    assert row["pearson_sd"] == pytest.approx(0.0) and row["n_splits"] == 3
    assert row["n_interactions"] == 1 and row["n_perturbations"] == 4


def test_ceiling_corrections_in_closed_form():
    # controls identical (zero), one perturbation with two cells: the halves are {x1} and {x2} either way
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=8), rng.normal(size=8)
    x = np.vstack([np.zeros(8), np.zeros(8), x1, x2])
    labels = np.array(["ctrl", "ctrl", "A", "A"])
    c = noise_ceiling(x, labels, "ctrl", np.arange(4), transform="mean", n_splits=2, top_k=3, energy=False)
    r = np.corrcoef(x1, x2)[0, 1]
    assert c.loc["noise_ceiling", "pearson"] == pytest.approx(
        spearman_brown(r) if r > 0 else np.nan, nan_ok=True
    )
    assert c.loc["noise_ceiling", "mse"] == pytest.approx(((x1 - x2) ** 2).mean() / 2)
    assert c.loc["noise_ceiling", "mae"] == pytest.approx(np.abs(x1 - x2).mean() / np.sqrt(2))
    assert c.loc["noise_ceiling", "mse_sd"] == pytest.approx(0.0)


def test_ceiling_grows_with_depth_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    groups = ["ctrl", "A", "B", "C"]
    means = {g: rng.gamma(2.0, 3.0, size=15) for g in groups}

    def cells(n):
        labels = np.repeat(groups, n)
        return rng.poisson(np.array([means[g] for g in labels])).astype(float), labels

    small = noise_ceiling(*cells(6), "ctrl", np.arange(24), transform="perturbseq", seed=1, energy=False)
    big = noise_ceiling(*cells(200), "ctrl", np.arange(800), transform="perturbseq", seed=1, energy=False)
    assert 0 < small.iloc[0]["pearson"] < big.iloc[0]["pearson"] <= 1
    assert big.iloc[0]["mse"] < small.iloc[0]["mse"]
    x, labels = cells(3)
    with pytest.raises(ValueError, match="control"):
        noise_ceiling(x, labels, "nope", np.arange(len(x)), transform="perturbseq")
    with pytest.raises(ValueError, match="n_splits"):
        noise_ceiling(x, labels, "ctrl", np.arange(len(x)), transform="perturbseq", n_splits=0)


def test_energy_by_perturbation():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 5))
    labels = np.repeat(["A", "B"], 20)
    basis = pca_basis(real, n_components=5)
    same = energy_by_perturbation(real, labels, real, labels, ["A", "B", "Z"], basis, unbiased=False)
    assert same["A"] == 0.0 and same["B"] == 0.0 and np.isnan(same["Z"])
    # the unbiased estimate of a set against itself is -2 sum|x - x'| / (n^2 (n - 1)), in the PCA
    u = energy_by_perturbation(real, labels, real, labels, ["A"], basis)["A"]
    z = (real[:20] - basis[0]) @ basis[1].T
    s = np.linalg.norm(z[:, None] - z[None], axis=-1).sum()
    assert u == pytest.approx(-2 * s / (20**2 * 19))
    shifted = energy_by_perturbation(real, labels, real + 1.0, labels, ["A", "B"], basis)
    assert (shifted > 0).all()
    assert np.allclose(transform_cells(np.array([[1.0, 3.0]]), "perturbseq"), np.log2([2501.0, 7501.0]))
    with pytest.raises(ValueError, match="transform"):
        transform_cells(np.ones((1, 2)), "log")
    assert isinstance(same, pd.Series)
