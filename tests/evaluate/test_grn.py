"""GRN scoring (AUROC/AUPRC, thresholded, matched count), baselines and the statistical evaluation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from pyrovae.baselines.grn import correlation_grn, de_grn
from pyrovae.evaluate.grn import (
    auroc,
    average_precision,
    score_grn,
    statistical_evaluation,
)

# true edges 0 -> 1 and 1 -> 2
TRUTH = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])
PROBS = np.array(
    [
        [0.99, 0.9, 0.6],
        [0.2, 0.99, 0.4],
        [0.7, 0.1, 0.99],
    ]
)


def test_score_grn_3x3_hand_values():
    m = score_grn(TRUTH, PROBS)
    # off-diagonal candidates: positives scored 0.9, 0.4; negatives 0.6, 0.2, 0.7, 0.1
    # AUROC: 0.9 beats 4 negatives, 0.4 beats 2 -> 6 / 8
    assert m["auroc"] == pytest.approx(0.75)
    # ranked 0.9 (P) 0.7 0.6 0.4 (P) ...: precision 1 at recall 1/2, precision 2/4 at recall 1
    assert m["auprc"] == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert m["random_auprc"] == pytest.approx(2 / 6)
    # threshold 0.5: predicted 0.9, 0.7, 0.6 -> 1 TP of 3 predicted, 2 true
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * 1 / (3 + 2))
    assert m["n_pred_edges"] == 3 and m["n_true_edges"] == 2 and m["n_candidates"] == 6
    # matched count k = 2: top 2 are 0.9 (P) and 0.7 (N)
    assert m["k"] == 2
    assert m["precision_at_k"] == pytest.approx(0.5) and m["recall_at_k"] == pytest.approx(0.5)


def test_score_grn_with_self_loops():
    # the diagonal now counts: three more negatives, all scored 0.99 (above every positive)
    m = score_grn(TRUTH, PROBS, exclude_self_loops=False)
    assert m["auroc"] == pytest.approx(6 / 14)
    assert m["n_candidates"] == 9 and m["n_pred_edges"] == 6


def test_score_grn_weights_ties_and_no_edges():
    weighted = TRUTH * -0.3  # any non-zero weight is an edge
    assert score_grn(weighted, PROBS) == score_grn(TRUTH, PROBS)
    # all scores tied: the k = 2 top edges hold the expected 2 * 2/6 true ones -> precision = density
    flat = score_grn(TRUTH, np.full((3, 3), 0.5))
    assert flat["precision_at_k"] == pytest.approx(2 / 6)
    assert flat["auroc"] == pytest.approx(0.5)
    assert flat["n_pred_edges"] == 0 and flat["precision"] == 0.0 and flat["f1"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none = score_grn(np.zeros((3, 3)), PROBS)
    assert np.isnan(none["auroc"]) and np.isnan(none["auprc"])
    assert none["recall"] == 0.0 and none["random_auprc"] == 0.0


def test_ranking_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, size=40)
        s = rng.integers(0, 6, size=40) / 5  # many ties
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))


def test_score_grn_errors():
    with pytest.raises(ValueError, match="adjacency_true must be square"):
        score_grn(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"probs has shape \(2, 2\) but adjacency_true has \(3, 3\)"):
        score_grn(TRUTH, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="probs contains NaN"):
        score_grn(TRUTH, np.full((3, 3), np.nan))


# ------------------------------------------------------------------------------------ baselines


def test_correlation_grn_hand_values():
    # g1 = 2 g0 (r = 1); g2 = [1,3,2]: r(g0, g2) = 1 / 2 = r(g1, g2); g3 constant -> 0
    x = np.array([[1.0, 2.0, 1.0, 5.0], [2.0, 4.0, 3.0, 5.0], [3.0, 6.0, 2.0, 5.0]])
    expected = np.array(
        [
            [0.0, 1.0, 0.5, 0.0],
            [1.0, 0.0, 0.5, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(correlation_grn(x), expected, atol=1e-12)
        np.testing.assert_allclose(correlation_grn(sp.csr_matrix(x)), expected, atol=1e-12)


X_DE = np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [3.0, 1.0, 0.0], [9.0, 9.0, 9.0], [5.0, 5.0, 5.0]])
LAB_DE = ["ctrl", "ctrl", "a", "b+c", "c+b"]


def test_de_grn_hand_values():
    # control mean [1,1,1]; a: |[3,1,0] - 1| = [2, 0, 1]; b and c only in combinations -> rows 0
    out = de_grn(X_DE, LAB_DE, ["a", "b", "c"], "ctrl")
    np.testing.assert_allclose(out, [[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(de_grn(sp.csr_matrix(X_DE), LAB_DE, ["a", "b", "c"], "ctrl", "+"), out)


def test_de_grn_errors():
    with pytest.raises(
        ValueError, match=r"no control cells labelled 'control' in labels; pass control_label="
    ):
        de_grn(X_DE, LAB_DE, ["a", "b", "c"], "control")
    with pytest.raises(ValueError, match="genes has 2 names but x_lognorm has 3 columns"):
        de_grn(X_DE, LAB_DE, ["a", "b"], "ctrl")
    with pytest.raises(ValueError, match="labels has 2 entries but x_lognorm has 5 rows"):
        de_grn(X_DE, LAB_DE[:2], ["a", "b", "c"], "ctrl")
    with pytest.raises(ValueError, match="duplicate names"):
        de_grn(X_DE, LAB_DE, ["a", "a", "c"], "ctrl")


# ------------------------------------------------------------------------ statistical evaluation

GENES = ["g0", "g1", "g2", "g3", "g4"]


def _shift_data() -> tuple[np.ndarray, np.ndarray]:
    """50 control cells, 50 cells perturbed at g0 (g1 shifted by +5, others identical), 1 cell at g4."""
    base = np.arange(50) / 50.0
    ctrl = np.tile(base[:, None], (1, 5))
    pert = np.tile(base[::-1, None], (1, 5))  # same values (reversed order) -> no shift
    pert[:, 1] += 5.0
    one = np.zeros((1, 5))
    x = np.vstack([ctrl, pert, one])
    labels = np.array(["ctrl"] * 50 + ["g0"] * 50 + ["g4"])
    return x, labels


EDGES = [("g0", "g1"), ("g0", "g2"), ("g0", "g0"), ("g3", "g1"), ("g4", "g1"), ("g0", "g1")]


def test_statistical_evaluation_hand_case():
    x, labels = _shift_data()
    out = statistical_evaluation(x, labels, GENES, EDGES, "ctrl", return_tables=True)
    # g0 -> g1: a +5 shift of the same 50 values -> significant, Wasserstein 5
    # g0 -> g2: identical values -> not significant, Wasserstein 0
    assert out["true_positives"] == 1 and out["false_positives"] == 1 and out["n_tested"] == 2
    assert out["precision"] == pytest.approx(0.5)
    assert out["mean_wasserstein"] == pytest.approx((5.0 + 0.0) / 2)
    edges = out["edge_results"].set_index(["parent", "child"])
    assert edges.loc[("g0", "g1"), "wasserstein"] == pytest.approx(5.0)
    assert bool(edges.loc[("g0", "g1"), "significant"]) and not bool(edges.loc[("g0", "g2"), "significant"])
    # 5 distinct edges: one self-loop, g3 never perturbed and g4 with 1 cell skipped
    assert out["n_edges"] == 5 and out["n_self_loops"] == 1
    assert out["n_skipped"] == 2 and out["n_unperturbed_parent"] == 1
    # negatives: parent g0 only; children other than g0 and the predicted g1, g2 -> {g3, g4}
    assert out["n_negative_candidates"] == 2 and out["n_negative_tested"] == 2
    negs = set(map(tuple, out["negative_results"][["parent", "child"]].to_numpy()))
    assert negs == {("g0", "g3"), ("g0", "g4")}
    assert out["false_omission_rate"] == 0.0 and out["negative_mean_wasserstein"] == pytest.approx(0.0)
    # sparse input gives the same numbers
    out_sp = statistical_evaluation(sp.csr_matrix(x), labels, GENES, EDGES, "ctrl")
    assert {k: v for k, v in out.items() if not k.endswith("_results")} == pytest.approx(out_sp, nan_ok=True)


def _planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, str]]]:
    """20 genes, parents p0..p4 (120 cells each) each shifting two children by +3; 200 controls."""
    rng = np.random.default_rng(seed)
    genes = [f"p{i}" for i in range(5)] + [f"c{i}" for i in range(15)]
    truth = [(f"p{i}", f"c{2 * i}") for i in range(5)] + [(f"p{i}", f"c{2 * i + 1}") for i in range(5)]
    blocks, labels = [rng.normal(size=(200, 20))], ["ctrl"] * 200
    for i in range(5):
        xb = rng.normal(size=(120, 20))
        for a, b in truth:
            if a == f"p{i}":
                xb[:, genes.index(b)] += 3.0
        blocks.append(xb)
        labels += [f"p{i}"] * 120
    return np.vstack(blocks), np.array(labels), genes, truth


def test_statistical_evaluation_planted_edges_and_false_omission():
    x, labels, genes, truth = _planted()
    good = statistical_evaluation(x, labels, genes, truth, "ctrl", n_negative=60, seed=0)
    assert good["true_positives"] == 10 and good["false_positives"] == 0
    assert good["mean_wasserstein"] > 2.5
    # every negative is a planted null pair: FOR near alpha, far below the miss-everything case
    assert good["n_negative_tested"] == 60 and good["false_omission_rate"] <= 0.15
    assert good["negative_mean_wasserstein"] < 0.5
    assert good["n_negative_candidates"] == 5 * 19 - 10
    # predicting nothing leaves the true edges among the candidates: tested exhaustively, FOR = 10 / 95
    none = statistical_evaluation(x, labels, genes, [], "ctrl", n_negative=1000)
    assert none["n_negative_tested"] == 95 and none["n_tested"] == 0 and np.isnan(none["precision"])
    assert none["n_negative_significant"] >= 10
    assert none["false_omission_rate"] == pytest.approx(none["n_negative_significant"] / 95)
    # seeded
    again = statistical_evaluation(x, labels, genes, truth, "ctrl", n_negative=60, seed=0)
    assert again == pytest.approx(good)


def test_statistical_evaluation_excluded_edges_are_neither_tested_nor_negatives():
    x, labels = _shift_data()
    out = statistical_evaluation(
        x, labels, GENES, EDGES, "ctrl", return_tables=True, exclude_edges=[("g0", "g3")]
    )
    assert out["n_tested"] == 2  # the excluded edge is not tested
    negs = set(map(tuple, out["negative_results"][["parent", "child"]].to_numpy()))
    assert negs == {("g0", "g4")} and out["n_negative_candidates"] == 1


def test_statistical_evaluation_errors():
    x, labels = _shift_data()
    with pytest.raises(ValueError, match=r"edges name 2 gene\(s\) not in genes: \['gX', 'gY'\]"):
        statistical_evaluation(x, labels, GENES, [("gX", "g1"), ("g0", "gY")], "ctrl")
    with pytest.raises(ValueError, match="no control cells labelled 'control' in labels"):
        statistical_evaluation(x, labels, GENES, EDGES, "control")
    with pytest.raises(ValueError, match=r"only 1 control cell\(s\) labelled 'g4'; need >= 2"):
        statistical_evaluation(x, labels, GENES, EDGES, "g4")
    with pytest.raises(ValueError, match="min_cells must be >= 1"):
        statistical_evaluation(x, labels, GENES, EDGES, "ctrl", min_cells=0)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        statistical_evaluation(x, labels[:3], GENES, EDGES, "ctrl")
