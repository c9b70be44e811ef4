"""Mask and latent-effect recovery after Hungarian matching, on hand-computed cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pyrovae.evaluate.structure import (
    effect_recovery,
    mask_recovery,
    match_latents,
    planted_rows,
    planted_structure,
)

MASK = np.array(
    [
        [1, 0, 0],
        [1, 1, 0],
        [0, 1, 0],
        [0, 0, 1],
        [1, 0, 1],
    ]
)


def test_match_latents_recovers_a_permutation():
    perm = [2, 0, 1]  # estimated column j = true column perm[j]
    row, col = match_latents(MASK, MASK[:, perm])
    np.testing.assert_array_equal(row, [0, 1, 2])
    # true column 0 is estimated column 1, true 1 -> est 2, true 2 -> est 0
    np.testing.assert_array_equal(col, [1, 2, 0])


def test_match_latents_rectangular_and_errors():
    row, col = match_latents(MASK, MASK[:, [1]])  # one estimated column: matched to true column 1
    np.testing.assert_array_equal(row, [1])
    np.testing.assert_array_equal(col, [0])
    with pytest.raises(ValueError, match="mask_true has 5 treatment rows but mask_est has 4"):
        match_latents(MASK, MASK[:4])
    with pytest.raises(ValueError, match="mask_est must be 2-D"):
        match_latents(MASK, MASK[:, 0])


def test_mask_recovery_permuted_copy_is_perfect():
    probs = np.where(MASK[:, [2, 0, 1]] == 1, 0.9, 0.1)
    out = mask_recovery(MASK, probs)
    assert out["precision"] == out["recall"] == out["f1"] == 1.0
    assert out["matched_tp"] == out["n_true"] == out["n_est"] == 7
    assert out["chance_f1"] < 1.0  # a random mask with 7 positives does worse


def test_mask_recovery_partial_hand_values():
    true = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    probs = np.array([[0.9, 0.1], [0.2, 0.6], [0.1, 0.8], [0.7, 0.6]])
    # estimated mask [[1,0],[0,1],[0,1],[1,1]]: 5 positives; true has 4
    # TP = [[1, 1], [1, 2]] -> best matching (0,0) + (1,1) = 3
    out = mask_recovery(true, probs)
    assert out["matched_tp"] == 3 and out["n_est"] == 5 and out["n_true"] == 4
    assert out["precision"] == pytest.approx(3 / 5)
    assert out["recall"] == pytest.approx(3 / 4)
    assert out["f1"] == pytest.approx(2 * 3 / 9)


def test_mask_recovery_threshold_is_strict():
    true = np.array([[1], [0]])
    out = mask_recovery(true, np.array([[0.5], [0.5]]))
    assert out["n_est"] == 0
    assert mask_recovery(true, np.array([[0.5], [0.5]]), threshold=0.4)["n_est"] == 2


def test_mask_recovery_zero_positives_give_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = mask_recovery(MASK, np.zeros(MASK.shape))
        both = mask_recovery(np.zeros((3, 2)), np.zeros((3, 2)))
    assert (empty["precision"], empty["recall"], empty["f1"]) == (0.0, 0.0, 0.0)
    assert (both["precision"], both["recall"], both["f1"]) == (0.0, 0.0, 0.0)
    assert empty["chance_f1"] == 0.0


def test_mask_recovery_chance_level():
    # an all-ones estimate: every random mask with the same positives is all-ones too -> chance == actual
    ones = mask_recovery(MASK, np.ones(MASK.shape))
    assert ones["chance_f1"] == pytest.approx(ones["f1"]) and ones["chance_f1_std"] == 0.0
    assert ones["precision"] == pytest.approx(7 / 15)  # every true positive matched, 15 estimated
    # seeded, reproducible; a perfect estimate of a sparse mask is far above chance
    rng = np.random.default_rng(1)
    true = (rng.random((60, 8)) < 0.15).astype(int)
    a = mask_recovery(true, true.astype(float), seed=3)
    b = mask_recovery(true, true.astype(float), seed=3)
    assert a == b
    assert a["f1"] == 1.0 and a["chance_f1"] < 0.5
    assert np.isnan(mask_recovery(true, true.astype(float), n_chance=0)["chance_f1"])


def test_mask_recovery_errors():
    with pytest.raises(ValueError, match="mask_true has 5 treatment rows but mask_est_probs has 2"):
        mask_recovery(MASK, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="mask_est_probs contains NaN"):
        mask_recovery(MASK, np.full(MASK.shape, np.nan))


# ---------------------------------------------------------------------------------------- effects

T0 = np.array([1.0, 2.0, 3.0, 4.0])
T1 = np.array([1.0, -1.0, 1.0, -1.0])
E_TRUE = np.stack([T0, T1], axis=1)
# est 0 = 3 * T1 (|r| = 1 with T1); est 1 = [1,2,4,3]: r(T0, est1) = 4 / 5 = 0.8 (deviations
# [-1.5,-.5,.5,1.5] . [-1.5,-.5,1.5,.5] = 4, both squared norms 5); r(T0, est0) = -2/(sqrt(5)*2);
# r(T1, est1) = 0
E_EST = np.stack([3 * T1, np.array([1.0, 2.0, 4.0, 3.0])], axis=1)


def test_effect_recovery_hand_values():
    out = effect_recovery(E_TRUE, E_EST)
    np.testing.assert_array_equal(out["col_ind"], [1, 0])
    np.testing.assert_allclose(out["abs_corr"], [0.8, 1.0])
    assert out["mcc"] == pytest.approx(0.9)
    # a given matching (e.g. from the masks) is used as is
    forced = effect_recovery(E_TRUE, E_EST, matching=(np.array([0, 1]), np.array([0, 1])))
    assert forced["mcc"] == pytest.approx((1 / np.sqrt(5) + 0.0) / 2)


def test_effect_recovery_invariances():
    # sign flips, scaling, offsets and permutations of the estimated columns leave the MCC at 1
    rng = np.random.default_rng(0)
    e = rng.normal(size=(30, 4))
    est = -2.0 * e[:, [3, 1, 0, 2]] + 5.0
    assert effect_recovery(e, est)["mcc"] == pytest.approx(1.0)
    # Spearman: a monotone non-linear map is also perfect
    assert effect_recovery(e, np.exp(e), method="spearman")["mcc"] == pytest.approx(1.0)


def test_effect_recovery_constant_column_and_errors():
    est = np.stack([np.ones(4), T0], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = effect_recovery(E_TRUE, est)
    np.testing.assert_allclose(sorted(out["abs_corr"]), [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown method 'kendall'"):
        effect_recovery(E_TRUE, E_EST, method="kendall")
    with pytest.raises(ValueError, match="effect_true has 4 treatment rows but effect_est has 3"):
        effect_recovery(E_TRUE, E_EST[:3])
    with pytest.raises(ValueError, match="non-finite"):
        effect_recovery(E_TRUE, np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="two index arrays of the same length"):
        effect_recovery(E_TRUE, E_EST, matching=([0, 1], [0]))


def test_planted_rows_maps_the_planted_order_onto_the_model_order():
    rows = planted_rows(["B", "C", "A"], ["A", "B", "C"])
    assert rows.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="missing \\['C'\\], extra \\['A\\+B'\\]"):
        planted_rows(["A", "B", "A+B"], ["A", "B", "C"])


def test_planted_structure_is_perfect_on_the_truth_and_at_chance_when_shuffled():
    rng = np.random.default_rng(0)
    masks = (rng.random((12, 4)) < 0.4).astype(float)
    masks[masks.sum(1) == 0, 0] = 1.0
    effects = masks * rng.normal(2.0, 0.5, size=masks.shape) * rng.choice([-1, 1], size=masks.shape)
    truth = {"latent_effects": effects, "masks": masks}
    # the truth itself, its latent columns permuted (axes are identified up to permutation)
    perm = [2, 0, 3, 1]
    exact = planted_structure(truth, effects[:, perm], masks[:, perm], seed=0)
    assert exact["mask_f1"] == 1.0 and exact["mask_precision"] == 1.0 and exact["mask_recall"] == 1.0
    assert exact["effect_mcc"] == pytest.approx(1.0)
    assert exact["mask_positives"] == exact["mask_true_positives"] == masks.sum()
    # no masks (CPA-VAE): effect recovery only
    assert set(planted_structure(truth, effects)) == {"effect_mcc"}
    # rows shuffled between treatments: masks no better than their own chance level
    shuffled = planted_structure(truth, effects[rng.permutation(12)], masks[rng.permutation(12)], seed=0)
    assert shuffled["mask_f1"] < exact["mask_f1"]
    assert shuffled["mask_f1"] <= shuffled["mask_chance_f1"] + 3 * shuffled["mask_chance_f1_std"]
