"""Empirical ATEs, ATE metrics and baselines on tiny hand-computed examples."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyrovae.baselines.ate import baseline_ates, baseline_ates_from_counts
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.evaluate.ate import ate_metrics, ate_table, per_perturbation_metrics
from pyrovae.evaluate.empirical import empirical_ate, perturbseq_transform

# ------------------------------------------------------------------------------------ transform


@pytest.mark.parametrize("make", [np.asarray, sp.csr_matrix, sp.csc_matrix])
def test_perturbseq_transform_hand_values(make):
    # row [1, 3]: total 4 -> 1e4 * [1/4, 3/4] = [2500, 7500] -> log2(2501), log2(7501); row [0, 0] -> zeros
    out = perturbseq_transform(make(np.array([[1.0, 3.0], [0.0, 0.0]])))
    np.testing.assert_allclose(out, [[np.log2(2501), np.log2(7501)], [0.0, 0.0]])
    assert isinstance(out, np.ndarray) and not np.isnan(out).any()
    # target_sum 4: [1, 3] -> log2([2, 4]) = [1, 2]
    np.testing.assert_allclose(perturbseq_transform(make(np.array([[1.0, 3.0]])), target_sum=4), [[1.0, 2.0]])


def test_perturbseq_transform_rejects_1d():
    with pytest.raises(ValueError, match="must be 2-D"):
        perturbseq_transform(np.ones(3))


# ------------------------------------------------------------------------------------ empirical


X_MEAN = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [0.0, 0.0], [2.0, 7.0]])
LAB_MEAN = np.array(["ctrl", "ctrl", "A", "A", "B"])


def test_empirical_ate_mean_transform_hand_values():
    # ctrl mean [2, 1]; A mean [2.5, 2] -> [0.5, 1]; B [2, 7] -> [0, 6]
    ate = empirical_ate(X_MEAN, LAB_MEAN, "ctrl", transform="mean", genes=["g1", "g2"])
    assert list(ate.index) == ["A", "B"] and list(ate.columns) == ["g1", "g2"]
    assert ate.index.name == "perturbation"
    np.testing.assert_allclose(ate.to_numpy(), [[0.5, 1.0], [0.0, 6.0]])
    # groups select and order rows; ``method`` is an alias of ``transform``
    ate_b = empirical_ate(X_MEAN, LAB_MEAN, "ctrl", groups=["B"], transform="mean")
    assert list(ate_b.index) == ["B"] and list(ate_b.columns) == [0, 1]
    np.testing.assert_allclose(ate_b.to_numpy(), [[0.0, 6.0]])


def test_empirical_ate_perturbseq_hand_values():
    # target_sum 4: ctrl [1, 1] -> log2([3, 3]); A [1, 3] -> log2([2, 4]) = [1, 2]
    x = np.array([[1.0, 1.0], [1.0, 3.0]])
    ate = empirical_ate(x, ["ctrl", "A"], "ctrl", target_sum=4)
    np.testing.assert_allclose(ate.loc["A"].to_numpy(), [1 - np.log2(3), 2 - np.log2(3)])


def test_empirical_ate_sparse_batches_match_dense():
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, size=(37, 6)).astype(float)
    x[5] = 0.0  # an empty cell
    labels = rng.choice(["ctrl", "A", "B", "A+B"], size=37)
    labels[:2] = "ctrl"
    dense = empirical_ate(x, labels, "ctrl")
    for batch in (1, 5, 100):
        sparse = empirical_ate(sp.csr_matrix(x), labels, "ctrl", batch_size=batch)
        pd.testing.assert_frame_equal(dense, sparse, atol=1e-12, rtol=0)
    assert np.isfinite(dense.to_numpy()).all()


def test_empirical_ate_errors():
    with pytest.raises(
        ValueError, match=r"no control cells labelled 'control' in labels .*pass control_label="
    ):
        empirical_ate(X_MEAN, LAB_MEAN, "control")
    with pytest.raises(ValueError, match=r"requested group\(s\) \['C'\] have no cells"):
        empirical_ate(X_MEAN, LAB_MEAN, "ctrl", groups=["A", "C"])
    with pytest.raises(ValueError, match="labels has 2 entries but x has 5 rows"):
        empirical_ate(X_MEAN, ["ctrl", "A"], "ctrl")
    with pytest.raises(ValueError, match="genes has 1 names but x has 2 columns"):
        empirical_ate(X_MEAN, LAB_MEAN, "ctrl", genes=["g1"])
    with pytest.raises(ValueError, match="unknown transform 'log'"):
        empirical_ate(X_MEAN, LAB_MEAN, "ctrl", transform="log")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        empirical_ate(X_MEAN, LAB_MEAN, "ctrl", batch_size=0)


# -------------------------------------------------------------------------------------- metrics

TRUE = pd.DataFrame([[2.0, 0.0, -2.0], [1.0, -1.0, 0.0]], index=["A", "B"], columns=["g0", "g1", "g2"])
PRED = pd.DataFrame([[1.0, 0.0, -1.0], [1.0, 0.0, 1.0]], index=["A", "B"], columns=["g0", "g1", "g2"])


def test_ate_metrics_hand_values():
    m = ate_metrics(TRUE, PRED, top_k=2)
    # pooled: t = [2,0,-2,1,-1,0] (mean 0), p = [1,0,-1,1,0,1] (mean 1/3)
    # sum t*p = 5, sum t^2 = 10, sum (p-1/3)^2 = 4 - 6/9 = 10/3  ->  r = 5 / sqrt(100/3) = sqrt(3)/2
    assert m["pearson"] == pytest.approx(np.sqrt(3) / 2)
    # SS_res = 1 + 0 + 1 + 0 + 1 + 1 = 4, SS_tot = 10 -> R^2 = 0.6; MSE = 4/6
    assert m["r2"] == pytest.approx(0.6)
    assert m["mse"] == pytest.approx(4 / 6)
    # top-2 by |true|: row A |t| = [2,0,2] -> genes 0, 2 (tie kept in order); row B [1,1,0] -> genes 0, 1
    # t_top = [2,-2,1,-1], p_top = [1,-1,1,0] (mean 1/4): sum tp = 5, sum t^2 = 10, sum (p-1/4)^2 = 2.75
    assert m["pearson_topk"] == pytest.approx(5 / np.sqrt(27.5))
    assert m["r2_topk"] == pytest.approx(1 - 3 / 10)
    assert m["mse_topk"] == pytest.approx(3 / 4)
    # signs: (2,1) ok, (-2,-1) ok, (1,1) ok, (-1,0) wrong -> 3/4
    assert m["direction_acc_topk"] == pytest.approx(0.75)
    # Jaccard: A pred top-2 {0,2} = true {0,2} -> 1; B pred |p| = [1,0,1] -> {0,2} vs {0,1} -> 1/3
    assert m["jaccard_topk"] == pytest.approx((1 + 1 / 3) / 2)
    # per-perturbation r: A = 1 (p = t/2); B: t = [1,-1,0], p = [1,0,1] -> 1 / sqrt(2 * 2/3) = sqrt(3)/2
    assert m["pearson_per_pert_mean"] == pytest.approx((1 + np.sqrt(3) / 2) / 2)
    assert m["pearson_per_pert_median"] == pytest.approx((1 + np.sqrt(3) / 2) / 2)
    assert m["n_perturbations"] == 2 and m["top_k"] == 2


def test_ate_metrics_aligns_rows_and_columns():
    shuffled = PRED.loc[["B", "A"], ["g2", "g0", "g1"]].copy()
    shuffled.loc["C"] = 9.0  # extra rows and columns of the prediction are ignored
    shuffled["g9"] = 9.0
    assert ate_metrics(TRUE, shuffled, top_k=2) == pytest.approx(
        ate_metrics(TRUE, PRED, top_k=2), nan_ok=True
    )


def test_ate_metrics_top_k_ties_are_stable_and_k_is_clipped():
    t = pd.DataFrame([[1.0, -1.0, 1.0]])
    # stable order picks genes {0, 1} for the tie |1| = |1| = |1|
    assert ate_metrics(t, pd.DataFrame([[5.0, 4.0, 0.0]]), top_k=2)["jaccard_topk"] == pytest.approx(1.0)
    assert ate_metrics(t, pd.DataFrame([[5.0, 0.0, 4.0]]), top_k=2)["jaccard_topk"] == pytest.approx(1 / 3)
    m = ate_metrics(t, t, top_k=50)
    assert m["top_k"] == 3 and m["jaccard_topk"] == 1.0


def test_ate_metrics_direction_ignores_zero_truth():
    t = pd.DataFrame([[3.0, 0.0, 0.0]])
    p = pd.DataFrame([[1.0, 2.0, -2.0]])
    # top-3 = every gene; only gene 0 has a direction, and it is right
    assert ate_metrics(t, p, top_k=3)["direction_acc_topk"] == 1.0
    assert np.isnan(ate_metrics(pd.DataFrame([[0.0, 0.0]]), pd.DataFrame([[1.0, 1.0]]))["direction_acc_topk"])


def test_ate_metrics_constant_vectors_give_nan_without_warnings():
    const = pd.DataFrame(np.ones((2, 3)), index=TRUE.index, columns=TRUE.columns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = ate_metrics(TRUE, const)
        m2 = ate_metrics(const, TRUE)
    assert np.isnan(m["pearson"]) and np.isnan(m["pearson_per_pert_mean"])
    assert np.isfinite(m["r2"]) and np.isfinite(m["mse"])
    assert np.isnan(m2["pearson"]) and np.isnan(m2["r2"])  # constant data: R^2 undefined
    # a constant true row is left out of the per-perturbation mean
    t = pd.DataFrame([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    assert ate_metrics(t, t)["pearson_per_pert_mean"] == pytest.approx(1.0)


def test_ate_metrics_errors():
    with pytest.raises(ValueError, match=r"ate_pred lacks 1 perturbation label\(s\) of ate_true: \['B'\]"):
        ate_metrics(TRUE, PRED.loc[["A"]])
    with pytest.raises(ValueError, match=r"ate_pred lacks 1 gene column\(s\) of ate_true: \['g2'\]"):
        ate_metrics(TRUE, PRED[["g0", "g1"]])
    bad = PRED.copy()
    bad.iloc[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"ate_pred has non-finite values for perturbation\(s\) \['B'\]"):
        ate_metrics(TRUE, bad)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        ate_metrics(TRUE, PRED, top_k=0)
    with pytest.raises(ValueError, match="duplicate perturbation labels"):
        ate_metrics(pd.concat([TRUE, TRUE]), PRED)


def test_per_perturbation_metrics_hand_values():
    df = per_perturbation_metrics(TRUE, {"m": PRED}, top_k=2)
    assert list(df["method"]) == ["m", "m"] and list(df["perturbation"]) == ["A", "B"]
    b = df.set_index("perturbation").loc["B"]
    assert b["pearson"] == pytest.approx(np.sqrt(3) / 2)
    assert b["jaccard_topk"] == pytest.approx(1 / 3)
    assert b["mse"] == pytest.approx((0 + 1 + 1) / 3)
    assert b["mse_topk"] == pytest.approx((0 + 1) / 2)
    assert b["direction_acc_topk"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ baselines

X_TR = np.array([[0.0, 0.0], [2.0, 2.0], [3.0, 1.0], [1.0, 4.0], [7.0, 3.0]])
LAB_TR = np.array(["ctrl", "ctrl", "A", "B", "A+C"])
GROUPS = ["A", "B", "A+B", "A+C"]


def test_baseline_ates_hand_values():
    b = baseline_ates_from_counts(X_TR, LAB_TR, GROUPS, "ctrl", transform="mean", genes=["g0", "g1"])
    assert set(b) == {"train_mean", "additive", "global_mean"}
    # ctrl mean [1, 1]: A -> [2, 0], B -> [0, 3], A+C -> [6, 2]; A+B has no training cell -> NaN
    tm = b["train_mean"]
    assert list(tm.index) == GROUPS and list(tm.columns) == ["g0", "g1"]
    np.testing.assert_allclose(tm.loc[["A", "B", "A+C"]].to_numpy(), [[2, 0], [0, 3], [6, 2]])
    assert tm.loc["A+B"].isna().all()
    # additive: A+B = A + B = [2, 3]; A+C needs C, which has no single-perturbation training cells -> NaN
    add = b["additive"]
    np.testing.assert_allclose(add.loc[["A", "B", "A+B"]].to_numpy(), [[2, 0], [0, 3], [2, 3]])
    assert add.loc["A+C"].isna().all()
    # global: perturbed cells mean [11/3, 8/3] - [1, 1] = [8/3, 5/3] on every row
    np.testing.assert_allclose(b["global_mean"].to_numpy(), np.tile([8 / 3, 5 / 3], (4, 1)))


def test_baseline_ates_separator_and_sparse():
    labels = np.array([lab.replace("+", "|") for lab in LAB_TR])
    b = baseline_ates_from_counts(
        sp.csr_matrix(X_TR), labels, ["A|B"], "ctrl", sep="|", transform="mean", batch_size=2
    )
    np.testing.assert_allclose(b["additive"].to_numpy(), [[2, 3]])
    dense = baseline_ates_from_counts(X_TR, LAB_TR, GROUPS, "ctrl")  # perturbseq transform, dense vs sparse
    sparse = baseline_ates_from_counts(sp.csr_matrix(X_TR), LAB_TR, GROUPS, "ctrl", batch_size=1)
    for k in dense:
        pd.testing.assert_frame_equal(dense[k], sparse[k], atol=1e-12, rtol=0)


def _data():
    """A validated PerturbationData: the cells of X_TR in train plus one test cell."""
    adata = ad.AnnData(np.vstack([X_TR, [[100.0, 100.0]]]).astype(np.float32))
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    adata.var_names = ["g0", "g1"]
    adata.obs["perturbation"] = np.append(LAB_TR, "A")
    adata.obs["split"] = ["train"] * 5 + ["test"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a handful of cells, no validation split: deliberate here
        return load_perturbation_data(adata, control_label="ctrl", split_key="split")


def test_baseline_ates_accepts_data_object_and_uses_training_cells_only():
    b = baseline_ates(_data(), GROUPS, transform="mean")
    # the validated data leaves the cell without counts (X_TR's first) out of every split
    ref = baseline_ates_from_counts(
        X_TR[1:], LAB_TR[1:], GROUPS, "ctrl", transform="mean", genes=["g0", "g1"]
    )
    for k in ref:
        pd.testing.assert_frame_equal(b[k], ref[k])


def test_baseline_ates_errors():
    with pytest.raises(ValueError, match="no control cells labelled 'ctrl' in labels_train"):
        baseline_ates_from_counts(X_TR[2:], LAB_TR[2:], GROUPS, "ctrl")
    with pytest.raises(ValueError, match="needs x_train, labels_train, groups and control_label"):
        baseline_ates_from_counts(X_TR, LAB_TR, GROUPS)
    with pytest.raises(ValueError, match="needs the target groups"):
        baseline_ates_from_counts(X_TR, LAB_TR, None, "ctrl")


# ---------------------------------------------------------------------------------------- table


def test_ate_table_drops_nan_rows_per_predictor():
    true = empirical_ate(np.vstack([X_TR, [[4.0, 5.0]]]), np.append(LAB_TR, "A+B"), "ctrl", transform="mean")
    preds = baseline_ates_from_counts(X_TR, LAB_TR, list(true.index), "ctrl", transform="mean")
    preds["all_nan"] = preds["train_mean"] * np.nan
    table = ate_table(true, preds, top_k=1)
    assert table.index.name == "method"
    assert list(table.index) == ["train_mean", "additive", "global_mean", "all_nan"]
    # rows A, A+B, A+C, B: train_mean has no row for A+B (no training cell); additive none for A+C (no C)
    assert table.loc["train_mean", "n_perturbations"] == 3 and table.loc["train_mean", "n_dropped"] == 1
    assert table.loc["additive", "n_perturbations"] == 3 and table.loc["additive", "n_dropped"] == 1
    assert table.loc["global_mean", "n_perturbations"] == 4 and table.loc["global_mean", "n_dropped"] == 0
    assert table.loc["all_nan", "n_perturbations"] == 0 and np.isnan(table.loc["all_nan", "pearson"])
    # train_mean is exact on the rows it scores (the reference here is the training cells themselves)
    assert table.loc["train_mean", "mse"] == pytest.approx(0.0)
    # the scored rows equal ate_metrics on the finite subset
    scored = ["A", "A+B", "B"]
    m_add = ate_metrics(true.loc[scored], preds["additive"].loc[scored], top_k=1)
    assert table.loc["additive", "pearson"] == pytest.approx(m_add["pearson"])
    assert table.loc["additive", "mse"] == pytest.approx(m_add["mse"])
