"""Tests of pyrovae.data.pairing: OT control pairing, ΔX, QC flags, counterfactual expression."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyrovae.data.pairing import (
    counterfactual_expression,
    delta_x,
    log_normalize,
    ot_pair,
    pair_with_controls,
    qc_flags,
    qc_metrics,
)


def _quiet(fn, *args, **kwargs):
    """Call fn with POT's convergence warnings silenced (they do not affect the asserted outcomes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# log_normalize
# ------------------------------------------------------------------------------------------------


def test_log_normalize_matches_hand_computation_dense_and_sparse():
    counts = np.array([[1.0, 3.0, 0.0], [2.0, 6.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    # libraries 4, 8, 2, 0 -> median over non-empty cells = 4
    expected = np.log1p(np.array([[1.0, 3.0], [1.0, 3.0], [0.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(log_normalize(counts, np.array([0, 1])), expected)
    np.testing.assert_allclose(log_normalize(sp.csr_matrix(counts), np.array([0, 1])), expected)
    np.testing.assert_allclose(
        log_normalize(counts, np.array([2]), target_sum=10.0)[:, 0], np.log1p([0.0, 0.0, 10.0, 0.0])
    )
    assert log_normalize(counts).shape == (4, 3)


# ------------------------------------------------------------------------------------------------
# ot_pair
# ------------------------------------------------------------------------------------------------


def _planted(n: int = 60, f: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    ctrl = rng.normal(size=(n, f))
    perm = rng.permutation(n)
    pert = ctrl[perm] + 1e-3 * rng.normal(size=(n, f))
    return pert, ctrl, perm


@pytest.mark.parametrize(
    "method,reg", [("emd", 0.05), ("sinkhorn", 0.01), ("sinkhorn", 0.05), ("sinkhorn", 0.001), ("auto", 0.05)]
)
def test_ot_pair_recovers_planted_permutation(method, reg):
    pert, ctrl, perm = _planted()
    matched = _quiet(ot_pair, pert, ctrl, method=method, reg=reg)
    assert matched.dtype == np.int64 and matched.shape == (60,)
    np.testing.assert_array_equal(matched, perm)


def test_ot_pair_excludes_forbidden_self_pairs():
    _, ctrl, _ = _planted(n=40)
    ids = np.arange(40)
    for method in ("emd", "sinkhorn"):
        matched = _quiet(ot_pair, ctrl, ctrl, method=method, pert_ids=ids, ctrl_ids=ids)
        assert not np.any(matched == ids)
    # without ids the exact plan is the identity
    np.testing.assert_array_equal(ot_pair(ctrl, ctrl, method="emd"), ids)


def test_ot_pair_few_perturbed_cells_get_their_nearest_control():
    rng = np.random.default_rng(1)
    ctrl = rng.normal(size=(50, 4))
    pert = rng.normal(size=(3, 4))
    nearest = np.linalg.norm(pert[:, None] - ctrl[None], axis=2).argmin(1)
    np.testing.assert_array_equal(ot_pair(pert, ctrl, method="emd"), nearest)


def test_ot_pair_blocks_use_every_control_and_are_deterministic():
    rng = np.random.default_rng(2)
    pert = rng.normal(size=(300, 5))
    ctrl = rng.normal(size=(300, 5))
    a = ot_pair(pert, ctrl, method="emd", max_controls=100, seed=3)
    b = ot_pair(pert, ctrl, method="emd", max_controls=100, seed=3)
    np.testing.assert_array_equal(a, b)
    # 3 balanced 100 x 100 exact problems: a bijection, so every control is used exactly once
    assert np.array_equal(np.sort(a), np.arange(300))
    c = _quiet(ot_pair, pert, ctrl, method="sinkhorn", max_controls=100, batch_size=50, seed=3)
    d = _quiet(ot_pair, pert, ctrl, method="sinkhorn", max_controls=100, batch_size=50, seed=3)
    np.testing.assert_array_equal(c, d)
    assert c.min() >= 0 and c.max() < 300


def test_ot_pair_input_errors():
    with pytest.raises(ValueError, match="same f"):
        ot_pair(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least one control"):
        ot_pair(np.zeros((3, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="method"):
        ot_pair(np.zeros((3, 2)), np.zeros((3, 2)), method="hungarian")
    assert ot_pair(np.zeros((0, 2)), np.zeros((3, 2))).shape == (0,)


# ------------------------------------------------------------------------------------------------
# pair_with_controls
# ------------------------------------------------------------------------------------------------


def _planted_counts(n: int = 40, g: int = 20, seed: int = 0):
    """Controls with distinct random count rows; perturbed 'A' cells are exact copies of permuted controls,
    so their log-normalised features coincide with their planted control."""
    rng = np.random.default_rng(seed)
    ctrl = rng.poisson(rng.gamma(2.0, 10.0, size=(n, g))).astype(np.float32)
    perm = rng.permutation(n)
    counts = np.vstack([ctrl, ctrl[perm]])
    labels = np.array(["control"] * n + ["A"] * n)
    return counts, labels, perm


@pytest.mark.parametrize("method", ["emd", "sinkhorn"])
@pytest.mark.parametrize("sparse", [False, True])
def test_pair_with_controls_recovers_planted_pairs(method, sparse):
    counts, labels, perm = _planted_counts()
    x = sp.csr_matrix(counts) if sparse else counts
    matched = _quiet(pair_with_controls, x, labels, None, "control", np.arange(20), method=method, reg=0.01)
    assert matched.shape == (80,) and matched.dtype == np.int64
    np.testing.assert_array_equal(matched[40:], perm)
    # controls are paired with controls, never with themselves
    assert np.all(labels[matched[:40]] == "control")
    assert not np.any(matched[:40] == np.arange(40))


def test_pair_with_controls_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    counts = rng.poisson(5.0, size=(120, 15)).astype(np.float32)
    labels = np.array(["control", "A", "B"] * 40)
    a = _quiet(pair_with_controls, counts, labels, None, "control", np.arange(15), method="sinkhorn", seed=7)
    b = _quiet(pair_with_controls, counts, labels, None, "control", np.arange(15), method="sinkhorn", seed=7)
    np.testing.assert_array_equal(a, b)


def test_pair_with_controls_keeps_splits_apart_and_skips_unused_cells():
    rng = np.random.default_rng(3)
    n = 90
    counts = rng.poisson(6.0, size=(n, 12)).astype(np.float32)
    labels = np.array(["control", "A", "B"] * 30)
    splits = np.array((["train"] * 4 + ["test"] * 4 + [""]) * 10, dtype=object)
    splits[3] = None
    splits[7] = np.nan
    matched = pair_with_controls(counts, labels, splits, "control", np.arange(12), method="emd")
    unused = np.array([s is None or (isinstance(s, float) and np.isnan(s)) or s == "" for s in splits])
    assert np.all(matched[unused] == -1)
    used = ~unused
    assert np.all(matched[used] >= 0)
    assert np.all(labels[matched[used]] == "control")
    assert np.all(splits[matched[used]] == splits[used])


def test_pair_with_controls_split_without_controls_raises():
    counts = np.ones((6, 3), dtype=np.float32)
    labels = np.array(["control", "A", "control", "A", "A", "B"])
    splits = np.array(["train", "train", "train", "test", "test", "test"])
    with pytest.raises(ValueError, match="split 'test' has no control cells labelled 'control'"):
        pair_with_controls(counts, labels, splits, "control", np.arange(3))
    with pytest.raises(ValueError, match="no control cells labelled 'ctrl'"):
        pair_with_controls(counts, labels, None, "ctrl", np.arange(3))


def test_pair_with_controls_single_control_matches_itself():
    counts = np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    labels = np.array(["control", "A", "A"])
    np.testing.assert_array_equal(pair_with_controls(counts, labels, None, "control", [0, 1]), [0, 0, 0])


# ------------------------------------------------------------------------------------------------
# delta_x
# ------------------------------------------------------------------------------------------------


def test_delta_x_hand_built():
    counts = np.array([[1.0, 3.0], [2.0, 6.0], [0.0, 2.0]])
    # libraries 4, 8, 2 -> target 4 -> y = log1p([[1, 3], [1, 3], [0, 4]])
    matched = np.array([2, 0, -1])
    expected = np.array(
        [[np.log(2.0), np.log(5.0) - np.log(4.0)], [0.0, 0.0], [0.0, 0.0]],
        dtype=np.float32,
    )
    out = delta_x(counts, matched, np.array([0, 1]))
    assert out.dtype == np.float32 and out.shape == (3, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(delta_x(sp.csr_matrix(counts), matched, [1]), expected[:, [1]], rtol=1e-6)
    # explicit target: y = log1p(x * 8 / lib)
    out8 = delta_x(counts, matched, [1], target_sum=8.0)
    np.testing.assert_allclose(out8[0, 0], abs(np.log1p(6.0) - np.log1p(8.0)), rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        delta_x(counts, np.array([3, 0, 0]), [0])


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
