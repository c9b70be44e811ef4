"""Model-free baselines (pyrovae.baselines): the linear PCA + ridge model, no change, matching mean."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pyrovae.baselines import (
    all_baseline_ates,
    linear_baseline_ates,
    linear_effects,
    matching_mean_ates,
    no_change_ates,
    two_sided_ridge,
)
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.evaluate.empirical import empirical_ate, label_means


def test_two_sided_ridge_solves_its_normal_equations():
    rng = np.random.default_rng(0)
    y, a, b = rng.normal(size=(12, 5)), rng.normal(size=(12, 3)), rng.normal(size=(5, 3))
    lam = 0.7
    w = two_sided_ridge(y, a, b, lam)
    # (A^T A + l I) W (B^T B + l I) = A^T Y B, vectorised column-major: (M2^T kron M1) vec(W) = vec(A^T Y B)
    m1, m2 = a.T @ a + lam * np.eye(3), b.T @ b + lam * np.eye(3)
    vec_w = np.linalg.solve(np.kron(m2.T, m1), (a.T @ y @ b).reshape(-1, order="F"))
    assert np.allclose(w, vec_w.reshape(3, 3, order="F"))
    # no penalty and full-rank embeddings: an exactly linear Y = A W0 B^T is recovered
    w0 = rng.normal(size=(3, 3))
    assert np.allclose(two_sided_ridge(a @ w0 @ b.T, a, b, 0.0), w0)
    with pytest.raises(ValueError, match="ridge"):
        two_sided_ridge(y, a, b, -1.0)


def test_linear_effects_is_the_closed_form_and_predicts_unseen_genes():
    rng = np.random.default_rng(1)
    genes = [f"g{j}" for j in range(8)]
    # pseudobulk of 6 conditions; embedding = its PCA scores (rank 5 after centring the conditions)
    pb = pd.DataFrame(rng.normal(size=(6, 8)), columns=genes)
    m = pb.to_numpy().T
    m = m - m.mean(0)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    emb = u[:, :3] * s[:3]
    w0, b0 = rng.normal(size=(3, 3)), rng.normal(size=8)
    true = {g: emb @ w0 @ emb[j] + b0 for j, g in enumerate(genes)}
    seen = ["g0", "g1", "g2", "g3", "g4"]
    eff = pd.DataFrame([true[g] for g in seen], index=seen, columns=genes)
    pred = linear_effects(eff, pb, ["g6", "g1", "notagene"], n_components=3, ridge=1e-10)
    # the fit centres Y by its row means, so the intercept is b0 + the mean of the seen linear parts
    shift = np.mean([emb @ w0 @ emb[j] for j in range(5)], axis=0)
    lin = emb @ two_sided_ridge(
        eff.to_numpy().T - eff.to_numpy().T.mean(1, keepdims=True), emb, emb[:5], 1e-10
    )
    assert np.allclose(pred.loc["g6"], lin @ emb[6] + b0 + shift)
    # the fitted seen effects are close (not exact: the centred Y has no exactly linear form in E_P)
    assert np.corrcoef(pred.loc["g1"], true["g1"])[0, 1] > 0.99
    assert pred.loc["notagene"].isna().all()


def _gene_data(seed=0):
    """Cells perturbed by measured genes: g0, g1, g2 (and g0+g1) in train; g3 only in test."""
    rng = np.random.default_rng(seed)
    genes = [f"g{j}" for j in range(10)]
    groups = ["control", "g0", "g1", "g2", "g0+g1", "g3"]
    n_per = 30
    labels = np.repeat(groups, n_per)
    rate = np.full((len(labels), 10), 5.0)
    for i, g in enumerate(["g0", "g1", "g2", "g3"]):
        hit = np.array([g in lab.split("+") for lab in labels])
        rate[hit, i] *= 0.2
        rate[hit, (i + 4) % 10] *= 2.0
    x = rng.poisson(rate).astype(np.float32)
    a = ad.AnnData(x)
    a.obs_names = [f"c{i}" for i in range(len(labels))]
    a.var_names = genes
    a.obs["perturbation"] = labels
    a.obs["split"] = np.where(
        labels == "g3", "test", np.where(np.arange(len(labels)) % 5 == 0, "test", "train")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_perturbation_data(a, control_label="control", split_key="split")


def test_linear_baseline_ates_on_data():
    data = _gene_data()
    idx = data.indices("train")
    x, labels = data.counts[idx], np.asarray(data.labels)[idx]
    out = linear_baseline_ates(data, ["g3", "g0", "g0+g1"], n_components=3, ridge=0.1)
    eff = empirical_ate(x, labels, "control", groups=["g0", "g1", "g2"], genes=data.genes)
    pb = label_means(x, labels, sorted(set(labels)), genes=data.genes)
    single = linear_effects(eff, pb, ["g0", "g1", "g3"], n_components=3, ridge=0.1)
    assert np.allclose(out.loc["g3"], single.loc["g3"])  # an unseen single gets a prediction
    assert np.allclose(out.loc["g0+g1"], single.loc["g0"] + single.loc["g1"])  # combinations add up


def test_no_change_and_matching_mean():
    z = no_change_ates(["A", "B"], ["x", "y"])
    assert z.shape == (2, 2) and (z.to_numpy() == 0).all() and list(z.index) == ["A", "B"]
    tr = pd.DataFrame([[1.0, 2.0], [3.0, 0.0]], index=["A", "B"], columns=["x", "y"])
    pm = np.array([9.0, 9.0])
    mm = matching_mean_ates(tr, pm, ["A+B", "A", "A+C", "C", "C+D"])
    assert mm.loc["A+B"].tolist() == [2.0, 1.0]  # the mean of the members, not their sum
    assert mm.loc["A"].tolist() == [1.0, 2.0] and mm.loc["A+C"].tolist() == [1.0, 2.0]
    assert mm.loc["C"].tolist() == [9.0, 9.0] and mm.loc["C+D"].tolist() == [9.0, 9.0]


def test_all_baseline_ates():
    data = _gene_data()
    groups = ["g0", "g0+g1", "g3"]
    out = all_baseline_ates(data, groups, n_components=3)
    assert set(out) == {"no_change", "train_mean", "additive", "global_mean", "matching_mean", "linear"}
    for df in out.values():
        assert list(df.index) == groups and list(df.columns) == list(data.genes)
    assert out["train_mean"].loc["g3"].isna().all() and np.isfinite(out["linear"].loc["g3"]).all()
    tm = out["train_mean"]
    half = (out["additive"].loc["g0+g1"]) / 2  # additive = A + B, matching mean = (A + B) / 2
    assert np.allclose(out["matching_mean"].loc["g0+g1"], half)
    assert np.allclose(out["matching_mean"].loc["g0"], tm.loc["g0"])
