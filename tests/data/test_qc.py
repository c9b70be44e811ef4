"""Tests of pyrovae.data.qc: QC metrics, MAD flags, counterfactual expression."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.data.qc import counterfactual_expression, qc_flags, qc_metrics

# ------------------------------------------------------------------------------------------------
# QC
# ------------------------------------------------------------------------------------------------


def _qc_counts(seed: int = 0):
    rng = np.random.default_rng(seed)
    genes = [f"MT-{i}" for i in range(5)] + ["RPS3", "RPL5", "RPS6", "RPL10"] + [f"G{i}" for i in range(91)]
    n = 300
    rate = np.full(len(genes), 3.0)
    rate[:5] = 3.0  # ~5% mitochondrial in normal cells
    lib = rng.lognormal(0.0, 0.15, size=(n, 1))
    counts = rng.poisson(rate * lib).astype(np.float64)
    low = np.arange(0, 5)  # planted low-count cells
    counts[low] = rng.poisson(rate * 0.05, size=(5, len(genes)))
    high_mt = np.arange(5, 10)  # planted high-MT cells
    counts[high_mt, :5] = rng.poisson(200.0, size=(5, 5))
    return counts, genes, low, high_mt


def test_qc_metrics_values():
    counts = np.array([[2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 1.0]])
    genes = ["MT-CO1", "RPS3", "RPL7", "ACTB"]
    m = qc_metrics(sp.csr_matrix(counts), genes)
    assert list(m.columns) == [
        "total_counts",
        "n_genes_by_counts",
        "pct_counts_mt",
        "pct_counts_ribo",
        "pct_counts_hb",
    ]
    np.testing.assert_allclose(m["total_counts"], [4, 0, 4])
    np.testing.assert_array_equal(m["n_genes_by_counts"], [3, 0, 2])
    np.testing.assert_allclose(m["pct_counts_mt"], [50.0, 0.0, 0.0])
    np.testing.assert_allclose(m["pct_counts_ribo"], [50.0, 0.0, 75.0])
    pd.testing.assert_frame_equal(m, qc_metrics(counts, genes))


def test_qc_flags_planted_low_quality_cells():
    counts, genes, low, high_mt = _qc_counts()
    flags = qc_flags(qc_metrics(counts, genes), threshold=3.0)
    assert {"qc_total_counts", "qc_n_genes_by_counts", "qc_pct_counts_mt", "total_qc"} <= set(flags.columns)
    assert flags["total_qc"].dtype == bool
    assert flags.loc[low, "qc_total_counts"].all()
    assert flags.loc[high_mt, "qc_pct_counts_mt"].all()
    normal = np.setdiff1d(np.arange(len(counts)), np.r_[low, high_mt])
    # the unscaled MAD of the reference: 3 MADs ~ 2 sigma per metric, so a few % of normal cells per metric
    assert flags.loc[normal, "total_qc"].mean() < 0.15
    assert flags["total_qc"].mean() < 0.5
    tail, thr = flags.attrs["thresholds"]["pct_counts_mt"]
    assert tail == "upper" and thr > 0


def test_qc_flags_mad_zero_does_not_flag_everyone():
    rng = np.random.default_rng(0)
    n = 400
    hb = np.zeros(n)
    hb[:40] = rng.uniform(0.01, 0.5, size=40)  # 90% of cells at 0 -> MAD = 0
    hb[0] = 30.0  # one blatant outlier
    metrics = pd.DataFrame(
        {
            "total_counts": rng.normal(5000, 300, size=n),
            "n_genes_by_counts": np.full(n, 1000),  # constant -> nothing to flag
            "pct_counts_hb": hb,
        }
    )
    flags = qc_flags(metrics)
    assert not flags["qc_n_genes_by_counts"].any()
    assert flags.loc[0, "qc_pct_counts_hb"]
    assert not flags.loc[40:, "qc_pct_counts_hb"].any()  # cells at the median never flagged
    assert flags["qc_pct_counts_hb"].sum() < 40  # not every cell with a hb read
    assert flags["total_qc"].mean() < 0.2


# ------------------------------------------------------------------------------------------------
# counterfactual expression
# ------------------------------------------------------------------------------------------------


def test_counterfactual_hand_built_medians_opposite_status_same_split():
    #   row  label split  fail  gene values
    counts = np.array(
        [
            [1.0, 10.0],  # 0 A train pass
            [3.0, 30.0],  # 1 A train pass
            [5.0, 50.0],  # 2 A train pass
            [100.0, 0.0],  # 3 A train fail
            [200.0, 2.0],  # 4 A train fail
            [7.0, 7.0],  # 5 A test  pass
            [9.0, 9.0],  # 6 A test  fail
            [4.0, 4.0],  # 7 B train pass (no failing B cell)
            [8.0, 8.0],  # 8 A ""    fail (unused split)
        ]
    )
    labels = np.array(["A"] * 7 + ["B", "A"])
    splits = np.array(["train"] * 5 + ["test", "test", "train", ""], dtype=object)
    fail = np.array([0, 0, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    for x in (counts, sp.csr_matrix(counts)):
        cfx, has_cf = counterfactual_expression(x, labels, splits, fail, n_sample=50, seed=0)
        assert cfx.dtype == np.float32 and cfx.shape == counts.shape and has_cf.dtype == bool
        # passing A/train cells <- median of the failing A/train cells (rows 3, 4)
        for i in (0, 1, 2):
            np.testing.assert_allclose(cfx[i], [150.0, 1.0])
        # failing A/train cells <- median of the passing A/train cells (rows 0, 1, 2)
        for i in (3, 4):
            np.testing.assert_allclose(cfx[i], [3.0, 30.0])
        # test split only sees test cells
        np.testing.assert_allclose(cfx[5], counts[6])
        np.testing.assert_allclose(cfx[6], counts[5])
        # no opposite-status cell / unused split -> zeros, has_cf False
        np.testing.assert_array_equal(cfx[7], 0.0)
        np.testing.assert_array_equal(cfx[8], 0.0)
        np.testing.assert_array_equal(has_cf, [True] * 7 + [False, False])


def test_counterfactual_sampling_is_seeded_and_without_replacement():
    rng = np.random.default_rng(0)
    n_pass, n_fail = 30, 5
    counts = np.vstack(
        [rng.poisson(5.0, size=(n_pass, 4)), np.array([[0.0], [10.0], [20.0], [30.0], [1000.0]]) * np.ones(4)]
    )
    labels = np.array(["A"] * (n_pass + n_fail))
    fail = np.r_[np.zeros(n_pass, bool), np.ones(n_fail, bool)]
    # n_sample == pool size: without replacement every pool cell is used once -> the exact median, any seed
    for seed in range(10):
        cfx, _ = counterfactual_expression(counts, labels, None, fail, n_sample=n_fail, seed=seed)
        np.testing.assert_allclose(cfx[:n_pass], 20.0)
    # subsampling (n_sample < pool) is reproducible for a seed, and varies with it
    a, _ = counterfactual_expression(counts, labels, None, fail, n_sample=3, seed=1)
    b, _ = counterfactual_expression(counts, labels, None, fail, n_sample=3, seed=1)
    np.testing.assert_array_equal(a, b)
    medians = {
        float(counterfactual_expression(counts, labels, None, fail, n_sample=3, seed=s)[0][0, 0])
        for s in range(20)
    }
    assert len(medians) > 1 and medians <= {10.0, 20.0, 30.0}  # a median of 3 distinct pool cells
    # every cell of a group shares one median
    assert np.all(a[:n_pass] == a[0])


def test_qc_metrics_haemoglobin_fraction_excludes_hbp():
    counts = np.array([[1.0, 1.0, 2.0, 4.0], [0.0, 0.0, 5.0, 5.0]])
    genes = ["HBB", "HBA1", "HBP1", "ACTB"]  # HBP1 is not a haemoglobin gene
    m = qc_metrics(counts, genes)
    np.testing.assert_allclose(m["pct_counts_hb"], [25.0, 0.0])
