"""Tests of pyrovae.data.pairing: OT control pairing, ΔX."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from pyrovae.data.pairing import (
    delta_x,
    log_normalize,
    ot_pair,
    pair_with_controls,
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
