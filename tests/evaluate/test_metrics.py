"""Closed-form checks of the field-standard metrics (pyrovae.evaluate.metrics) and their table columns."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pyrovae.evaluate.ate import ate_metrics, ate_table, per_perturbation_metrics
from pyrovae.evaluate.metrics import (
    centroid_accuracy,
    de_qvalues,
    de_test,
    de_top_k,
    discrimination_score,
    energy_distance,
    interaction_metrics,
    interaction_residuals,
    pca_basis,
    pearson,
    pearson_delta_reference,
    rank_metric,
    score_vs_baseline,
    spearman_brown,
)

GENES = [f"g{j}" for j in range(6)]


def _truth(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, len(GENES))), index=[f"P{i}" for i in range(n)], columns=GENES)


def test_perfect_predictor_scores_perfectly():
    t = _truth()
    assert (discrimination_score(t, t) == 1.0).all()
    assert (rank_metric(t, t) == 0.0).all()
    assert (centroid_accuracy(t, t) == 1.0).all()
    assert np.allclose(pearson_delta_reference(t, t), 1.0)
    m = ate_metrics(t, t, top_k=3)
    assert m["pds"] == 1.0 and m["rank"] == 0.0 and m["centroid_accuracy"] == 1.0 and m["mae"] == 0.0


@pytest.mark.parametrize("const", [0.0, 0.3])
def test_constant_predictor_scores_chance(const):
    t = _truth()
    n = len(t)
    p = pd.DataFrame(const, index=t.index, columns=t.columns)
    # the same vector for every row: its ranks among the truths are a permutation of 0..n-1
    assert discrimination_score(t, p).mean() == pytest.approx((n + 1) / (2 * n))
    assert rank_metric(t, p).mean() == pytest.approx(0.5)
    assert centroid_accuracy(t, p).mean() == pytest.approx(1 / n)


def test_rank_metric_hand_case():
    # two truths; P0's prediction lies nearer (cosine) to P1's truth: rank 1; P1's prediction is perfect
    t = pd.DataFrame([[1.0, 0.0], [0.0, 1.0]], index=["P0", "P1"], columns=["a", "b"])
    p = pd.DataFrame([[0.1, 1.0], [0.0, 2.0]], index=["P0", "P1"], columns=["a", "b"])
    assert list(rank_metric(t, p)) == [1.0, 0.0]
    # PDS: 1 - rank / A
    assert list(discrimination_score(t, p, exclude_targets=False)) == [0.5, 1.0]
    assert list(centroid_accuracy(t, p)) == [0.0, 1.0]


def test_pds_leaves_out_the_target_gene():
    # a's prediction misses only a's own knock-down, which makes b's truth look nearer
    t = pd.DataFrame([[-5.0, 0.0, 1.0], [0.0, -1.0, 1.0]], index=["a", "b"], columns=["a", "b", "c"])
    p = pd.DataFrame([[0.0, 0.0, 1.0], [0.0, -1.0, 1.0]], index=["a", "b"], columns=["a", "b", "c"])
    assert list(discrimination_score(t, p, exclude_targets=False)) == [0.5, 1.0]
    assert list(discrimination_score(t, p)) == [1.0, 1.0]
    # a combination leaves out each member's gene
    tc = pd.DataFrame([[-5.0, -5.0, 1.0], [0.0, 0.0, 3.0]], index=["a+b", "c"], columns=["a", "b", "c"])
    pc = pd.DataFrame([[0.0, 0.0, 1.0], [0.0, 0.0, 3.0]], index=["a+b", "c"], columns=["a", "b", "c"])
    assert discrimination_score(tc, pc)["a+b"] == 1.0
    assert discrimination_score(tc, pc, exclude_targets=False)["a+b"] == 0.5


def test_pearson_delta_reference_is_pearson_of_shifted_effects():
    t = _truth()
    rng = np.random.default_rng(1)
    p = t + rng.normal(scale=0.5, size=t.shape)
    r = rng.normal(size=len(GENES))
    got = pearson_delta_reference(t, p, r)
    want = [pearson(t.iloc[i] - r, p.iloc[i] - r) for i in range(len(t))]
    assert np.allclose(got, want)
    # default reference: the mean true effect; predicting it for every row gives a constant delta (NaN)
    mean_pred = pd.DataFrame(np.tile(t.mean(0).to_numpy(), (len(t), 1)), index=t.index, columns=GENES)
    assert pearson_delta_reference(t, mean_pred).isna().all()


def test_energy_distance_self_zero_grows_with_shift_and_matches_scipy_in_1d():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    assert energy_distance(x, x) == 0.0
    d = [energy_distance(x, x + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert d[0] == 0.0 and d[1] < d[2] < d[3]
    # scipy's 1-D energy distance is the square root of 2E|X-Y| - E|X-X'| - E|Y-Y'|
    a, b = rng.normal(size=40), rng.normal(1.0, 2.0, size=30)
    assert energy_distance(a[:, None], b[:, None]) == pytest.approx(stats.energy_distance(a, b) ** 2)


def test_unbiased_energy_distance_is_about_zero_for_one_distribution():
    rng = np.random.default_rng(1)
    v, u = [], []
    for _ in range(200):
        a, b = rng.normal(size=(8, 2)), rng.normal(size=(5, 2))
        v.append(energy_distance(a, b))
        u.append(energy_distance(a, b, unbiased=True))
    # V-statistic: biased up by about E|X - X'| (1/8 + 1/5), E|X - X'| = sqrt(pi) for 2-D standard normals
    assert np.mean(v) == pytest.approx(np.sqrt(np.pi) * (1 / 8 + 1 / 5), rel=0.15)
    assert abs(np.mean(u)) < 0.05 < np.mean(v)
    assert np.isnan(energy_distance(a[:1], b, unbiased=True))
    shifted = [energy_distance(rng.normal(size=(8, 2)), rng.normal(size=(5, 2)) + 2, True) for _ in range(20)]
    assert np.mean(shifted) > 1.0


def test_pca_basis_is_seeded_and_orthonormal():
    x = np.random.default_rng(0).normal(size=(200, 8))
    m1, ax1 = pca_basis(x, n_components=3, max_cells=100, seed=4)
    m2, ax2 = pca_basis(x, n_components=3, max_cells=100, seed=4)
    assert np.array_equal(m1, m2) and np.array_equal(ax1, ax2)
    assert ax1.shape == (3, 8) and np.allclose(ax1 @ ax1.T, np.eye(3))


def test_de_test_is_mann_whitney_with_bh():
    rng = np.random.default_rng(0)
    grp = rng.normal(size=(15, 4))
    grp[:, 0] += 3.0
    ctrl = rng.normal(size=(20, 4))
    ctrl[:, 3] = grp[:, 3].mean()  # gene 3 constant in control,
    grp[:, 3] = ctrl[0, 3]  # and the same constant in the group: no test, p = 1
    p, q = de_test(grp, ctrl)
    for j in range(3):
        want = stats.mannwhitneyu(grp[:, j], ctrl[:, j], method="asymptotic").pvalue
        assert p[j] == pytest.approx(want)
    assert p[3] == 1.0
    # Benjamini-Hochberg by hand: q_(i) = min_{j >= i} p_(j) G / j
    order = np.argsort(p)
    raw = p[order] * len(p) / np.arange(1, len(p) + 1)
    want_q = np.empty_like(p)
    want_q[order] = np.minimum.accumulate(raw[::-1])[::-1]
    assert np.allclose(q, np.minimum(want_q, 1.0))
    assert q[0] < 0.05


def test_de_qvalues_and_top_k_order():
    x = np.vstack([np.zeros((5, 3)), np.tile([[1.0, 0.0, 0.0]], (5, 1))])
    x[5:, 1] = np.arange(5) * 0.1 - 0.2  # mixed, not shifted
    q = de_qvalues(x, ["c"] * 5 + ["A"] * 5, "c", ["A"], genes=["a", "b", "z"])
    assert list(q.columns) == ["a", "b", "z"] and q.loc["A", "a"] < q.loc["A", "b"]
    # ties in q broken by |ATE|, then by position
    idx = de_top_k(np.array([[0.1, 0.01, 0.01, 0.5]]), np.array([[9.0, 1.0, 2.0, 3.0]]), 3)
    assert idx.tolist() == [[2, 1, 0]]
    with pytest.raises(ValueError, match="no control"):
        de_qvalues(x, ["A"] * 10, "c", ["A"])


def test_de_topk_metrics_in_the_table():
    t = _truth(4)
    p = t * 0.5
    p.iloc[:, 0] = -t.iloc[:, 0]  # gene g0 has the wrong sign
    # q-values that make g0, g1 the DE genes of every row
    q = pd.DataFrame(0.5, index=t.index, columns=GENES)
    q[["g0", "g1"]] = 1e-4
    m = ate_metrics(t, p, top_k=2, de_qvalues=q)
    tt, pt = t[["g0", "g1"]].to_numpy(), p[["g0", "g1"]].to_numpy()
    assert m["pearson_de_topk"] == pytest.approx(pearson(tt, pt))
    assert m["mse_de_topk"] == pytest.approx(((tt - pt) ** 2).mean())
    assert m["direction_acc_de_topk"] == pytest.approx(0.5)
    per = per_perturbation_metrics(t, {"m": p}, top_k=2, de_qvalues=q)
    assert np.allclose(per["mse_de_topk"], ((tt - pt) ** 2).mean(1))
    assert np.isnan(ate_metrics(t, p, top_k=2)["pearson_de_topk"])  # no DE test: NaN


def test_interaction_residual_of_additive_data_is_zero():
    rng = np.random.default_rng(0)
    singles = pd.DataFrame(rng.normal(size=(3, 4)), index=["A", "B", "C"], columns=list("wxyz"))
    ate = pd.DataFrame(
        [singles.loc["A"] + singles.loc["B"], singles.loc["B"] + singles.loc["C"], singles.loc["A"]],
        index=["A+B", "B+C", "A"],
    )
    res = interaction_residuals(ate, singles)
    assert list(res.index) == ["A+B", "B+C"] and np.array_equal(res.to_numpy(), np.zeros((2, 4)))
    # a non-additive combination: the residual is the added interaction; a member without a row gives NaN
    ate.loc["A+B"] += 1.5
    ate.loc["A+D"] = 0.0
    res = interaction_residuals(ate, singles)
    assert np.allclose(res.loc["A+B"], 1.5) and res.loc["A+D"].isna().all()
    pred = res * 2.0
    m = interaction_metrics(res.loc[["A+B", "B+C"]] + np.arange(4), pred.loc[["A+B", "B+C"]] + np.arange(4))
    assert m["n_interactions"] == 2 and m["interaction_mse"] == pytest.approx((1.5**2) / 2)


def test_interaction_metrics_in_the_table():
    rng = np.random.default_rng(0)
    singles = pd.DataFrame(rng.normal(size=(2, 4)), index=["A", "B"], columns=list("wxyz"))
    inter = rng.normal(size=4)
    truth = pd.DataFrame([singles.sum(0) + inter], index=["A+B"], columns=list("wxyz"))
    additive = pd.DataFrame([singles.sum(0)], index=["A+B"], columns=list("wxyz"))
    table = ate_table(
        truth,
        {"exact": truth, "additive": additive},
        top_k=2,
        singles_true=singles,
        singles_preds={"exact": singles, "additive": singles},
    )
    assert table.loc["exact", "interaction_mse"] == 0.0
    assert table.loc["exact", "interaction_pearson"] == pytest.approx(1.0)
    assert table.loc["additive", "interaction_mse"] == pytest.approx((inter**2).mean())
    assert np.isnan(table.loc["additive", "interaction_pearson"])  # predicts no interaction at all
    assert (table["n_interactions"] == 1).all()


def test_spearman_brown():
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    assert spearman_brown(1.0) == 1.0
    assert np.isnan(spearman_brown(-0.2))
    assert np.allclose(spearman_brown(np.array([0.0, 0.25])), [np.nan, 0.4], equal_nan=True)


def test_score_vs_baseline():
    table = pd.DataFrame(
        {"pearson": [0.9, 0.6, 0.5], "mse": [0.5, 2.0, 1.0], "top_k": [20, 20, 20]},
        index=["model", "base1", "base2"],
    )
    s = score_vs_baseline(table, ["base1", "base2"])
    assert list(s.columns) == ["pearson", "mse"]
    assert s.loc["model", "pearson"] == pytest.approx((0.9 - 0.6) / (1 - 0.6))  # best baseline: base1
    assert s.loc["model", "mse"] == pytest.approx(1 - 0.5 / 1.0)  # best baseline: base2
    assert s.loc["base1", "pearson"] == 0.0 and s.loc["base2", "mse"] == 0.0
    assert s.attrs["baseline"] == {"pearson": "base1", "mse": "base2"}
