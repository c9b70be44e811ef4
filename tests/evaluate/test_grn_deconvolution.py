"""Deconvolved DE (linear structural regression), per-block scores, matched-count mu-WD, path expansion,
knock-down propagation and the unseen-perturbation baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pyrovae.baselines.grn import de_grn, deconvolved_de_grn, deconvolved_grn
from pyrovae.baselines.unseen import propagate_knockdown, unseen_perturbation_baselines
from pyrovae.evaluate.grn import (
    matched_count_evaluation,
    path_expansion,
    score_blocks,
    statistical_evaluation,
    top_edges,
)

GENES = ["a", "b", "c"]
CHAIN = np.array([[0.0, 0.8, 0.0], [0.0, 0.0, -0.7], [0.0, 0.0, 0.0]])  # a -> b -> c


def _sem_shifts(adj: np.ndarray, knock: float = -1.5) -> np.ndarray:
    """Exact interventional mean shifts of a linear SEM: row a = knock * e_a (I - A)^{-1}."""
    n = adj.shape[0]
    return knock * np.linalg.inv(np.eye(n) - adj)


def _cells(adj: np.ndarray, n_cells: int = 400, noise: float = 0.3, seed: int = 0):
    """Log-expression cells of a linear SEM: controls and one knock-down per gene."""
    rng = np.random.default_rng(seed)
    n = adj.shape[0]
    total = np.linalg.inv(np.eye(n) - adj)
    xs, labels = [], []
    for lab in ["control", *GENES[:n]]:
        eps = rng.normal(0, noise, (n_cells, n))
        if lab != "control":
            eps[:, GENES.index(lab)] += -1.5
        xs.append(eps @ total + 2.0)
        labels += [lab] * n_cells
    return np.concatenate(xs), np.asarray(labels)


@pytest.mark.parametrize(
    "adj",
    [
        CHAIN,
        np.array([[0.0, 0.9, -0.6], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),  # fork a -> b, a -> c
        np.array([[0.0, 0.0, 0.9], [0.0, 0.0, 0.7], [0.0, 0.0, 0.0]]),  # collider a -> c <- b
    ],
    ids=["chain", "fork", "collider"],
)
def test_deconvolution_recovers_direct_effects_exactly(adj):
    shifts = _sem_shifts(adj)
    b = deconvolved_grn(shifts, [0, 1, 2], ridge=0.0)
    np.testing.assert_allclose(b, adj, atol=1e-8)


def test_deconvolved_de_on_a_chain_drops_the_indirect_edge():
    x, labels = _cells(CHAIN)
    de = de_grn(x, labels, GENES, "control")
    dec = deconvolved_de_grn(x, labels, GENES, "control")
    # DE lights up the indirect a -> c (0.8 * 0.7 * 1.5 = 0.84), as large as a direct edge
    assert de[0, 2] > 0.6 and de[0, 1] > 0.9 and de[1, 2] > 0.8
    # the deconvolution keeps the direct edges and drops the indirect one
    assert dec[0, 1] == pytest.approx(0.8, abs=0.1) and dec[1, 2] == pytest.approx(0.7, abs=0.1)
    assert dec[0, 2] < 0.1 and dec[2, 0] < 0.1 and dec[2, 1] < 0.1
    truth = (CHAIN != 0).astype(int)
    top = top_edges(dec, GENES, 2)
    assert sorted(top) == [("a", "b"), ("b", "c")]
    assert ("a", "c") in top_edges(de, GENES, 3)  # |DE| ranks the indirect edge among its top 3
    assert score_blocks(truth, dec, 3).set_index("block").loc["all", "auprc"] == pytest.approx(1.0)


def test_deconvolved_grn_signs_regulators_and_errors():
    shifts = _sem_shifts(CHAIN)
    b = deconvolved_grn(shifts, [0, 1, 2], ridge=0.0)
    assert np.sign(b[1, 2]) == -1 and np.diag(b).tolist() == [0, 0, 0]
    only_a = deconvolved_grn(shifts, [0, 1, 2], ridge=0.0, regulators=np.array([True, False, False]))
    assert (only_a[1:] == 0).all()
    # ridge shrinks towards 0
    assert abs(deconvolved_grn(shifts, [0, 1, 2], ridge=10.0)[0, 1]) < 0.8
    with pytest.raises(ValueError, match="intervened"):
        deconvolved_grn(shifts, [0, 1], ridge=0.0)
    with pytest.raises(ValueError, match="ridge"):
        deconvolved_grn(shifts, [0, 1, 2], ridge=-1.0)


def test_score_blocks_per_block_and_signs():
    # 2 perturbed genes (p1, p2), 2 extended (e1, e2): p1 -> p2, p1 -> e1, p2 -> e2 (negative)
    truth = np.zeros((4, 4))
    truth[0, 1], truth[0, 2], truth[1, 3] = 1.0, 0.5, -0.5
    scores = np.abs(truth) + 0.01 * np.arange(16).reshape(4, 4) / 16
    signs = truth.copy()
    signs[1, 3] = 0.3  # wrong sign on one of the extended-block edges
    res = score_blocks(truth, scores, n_perturbed=2, signs=signs).set_index("block")
    assert list(res.index) == ["perturbed->perturbed", "perturbed->extended", "all"]
    pp, pe = res.loc["perturbed->perturbed"], res.loc["perturbed->extended"]
    assert pp["n_candidates"] == 2 and pp["k"] == 1 and pp["auroc"] == 1.0 and pp["precision_at_k"] == 1.0
    assert pe["n_candidates"] == 4 and pe["k"] == 2 and pe["auprc"] == pytest.approx(1.0)
    assert pe["sign_accuracy"] == 0.5 and pp["sign_accuracy"] == 1.0
    assert np.isnan(score_blocks(truth, scores, 2).loc[0, "sign_accuracy"])
    with pytest.raises(ValueError, match="n_perturbed"):
        score_blocks(truth, scores, 5)


def _matched_data(seed: int = 0):
    """Cells in which parent P perturbs children c1 (strongly) and c2 (weakly) only."""
    rng = np.random.default_rng(seed)
    genes = ["P", "Q", "c1", "c2", "c3"]
    n = 150
    ctrl = rng.normal(0, 1, (n, 5))
    p = rng.normal(0, 1, (n, 5))
    p[:, 0] -= 3.0
    p[:, 2] += 2.0
    p[:, 3] += 0.7
    q = rng.normal(0, 1, (n, 5))
    q[:, 1] -= 3.0
    x = np.concatenate([ctrl, p, q])
    labels = np.array(["control"] * n + ["P"] * n + ["Q"] * n)
    return x, labels, genes


def test_matched_count_mu_wd_compares_at_the_same_edge_count():
    x, labels, genes = _matched_data()
    good = np.zeros((5, 5))
    good[0, 2], good[0, 3] = 0.9, 0.8  # the real edges first
    good[1, 4] = 0.1
    dense = np.full((5, 5), 0.7)  # every pair above 0.5: unmatched, its mu-WD is diluted
    dense[0, 2] = 0.95
    res = matched_count_evaluation({"good": good, "dense": dense}, x, labels, genes, "control", k=2)
    assert res.loc["good", "k"] == res.loc["dense", "k"] == 2
    assert res.loc["good", "n_tested"] == res.loc["dense", "n_tested"] == 2
    # the same mu-WD as testing the top-2 edges directly
    direct = statistical_evaluation(x, labels, genes, [("P", "c1"), ("P", "c2")], "control")
    assert res.loc["good", "mean_wasserstein"] == pytest.approx(direct["mean_wasserstein"])
    assert res.loc["good", "mean_wasserstein"] > res.loc["dense", "mean_wasserstein"]
    # never-perturbed genes are not parents: 'c1' (no cells) has the highest score but is skipped
    tricky = good.copy()
    tricky[2, 4] = 5.0
    assert ("c1", "c3") not in top_edges(tricky, genes, 2, parents=np.array([1, 1, 0, 0, 0], bool))
    res2 = matched_count_evaluation({"t": tricky}, x, labels, genes, "control", k=2)
    assert res2.loc["t", "n_tested"] == 2
    # unmatched: the dense method's full edge set has a far lower mu-WD than its top 2
    all_dense = statistical_evaluation(
        x, labels, genes, [(a, b) for a in genes for b in genes if a != b], "control"
    )
    assert all_dense["mean_wasserstein"] < res.loc["dense", "mean_wasserstein"]


def test_top_edges_ties_and_errors():
    s = np.array([[0.0, 1.0, 1.0], [0.5, 0.0, 0.2], [0.1, 0.2, 0.0]])
    assert top_edges(s, GENES, 2) == [("a", "b"), ("a", "c")]
    assert top_edges(s, GENES, 10, children=np.array([True, False, False])) == [("b", "a"), ("c", "a")]
    with pytest.raises(ValueError, match="k must be"):
        top_edges(s, GENES, -1)


def test_path_expansion_on_a_chain():
    a = np.zeros((4, 4), dtype=bool)
    a[0, 1] = a[1, 2] = a[2, 3] = True
    a[3, 3] = True  # self-loop dropped
    out = path_expansion(a, max_path_length=3)
    assert out[1].sum() == 3 and not out[1][3, 3]
    assert [tuple(p) for p in np.argwhere(out[2])] == [(0, 2), (1, 3)]
    assert [tuple(p) for p in np.argwhere(out[3])] == [(0, 3)]
    # a shortcut makes 0 -> 2 first-order (not new at depth 2) and 0 -> 3 a path of length 2
    a[0, 2] = True
    assert [tuple(p) for p in np.argwhere(path_expansion(a, 2)[2])] == [(0, 3), (1, 3)]


def test_propagate_knockdown_exact_and_truncated():
    knock = np.array([-1.5, 0.0, 0.0])
    np.testing.assert_allclose(propagate_knockdown(CHAIN, knock), _sem_shifts(CHAIN)[0])
    cyc = np.array([[0.0, 2.0], [2.0, 0.0]])  # spectral radius 2: truncated series of 2 hops
    np.testing.assert_allclose(propagate_knockdown(cyc, np.array([1.0, 0.0]), hops=2), [5.0, 2.0])


def test_unseen_perturbation_baselines_on_simulated_holdout():
    from pyrovae.data.anndata import load_perturbation_data
    from pyrovae.data.prepare import holdout_perturbations
    from pyrovae.evaluate.empirical import empirical_ate
    from pyrovae.simulate import simulate_perturbseq

    data = holdout_perturbations(load_perturbation_data(simulate_perturbseq("tiny", seed=1)), ["PG02"])
    combos = sorted(lab for lab in set(data.groups("test")) if "PG02" in lab.split("+") and lab != "PG02")
    assert combos
    labels = ["PG02", *combos]
    res = unseen_perturbation_baselines(data, labels, ["PG02"])
    assert set(res) == {"zero_effect", "seen_mean", "grn_de", "grn_deconvolved"}
    tr = data.indices("train")
    seen = sorted(t for t in set(data.labels[tr]) - {"control"} if "+" not in t)
    ate = empirical_ate(data.rows(tr), data.labels[tr], "control", groups=seen, genes=data.genes)
    np.testing.assert_allclose(res["zero_effect"].loc["PG02"], 0.0)
    np.testing.assert_allclose(res["seen_mean"].loc["PG02"], ate.to_numpy().mean(0))
    de = res["grn_de"].loc["PG02"]
    self_shift = np.mean([ate.loc[t, t] for t in seen])
    assert de["PG02"] == pytest.approx(self_shift) and (de.drop("PG02") == 0).all()
    dec = res["grn_deconvolved"].loc["PG02"]
    assert dec["PG02"] == pytest.approx(self_shift) and (dec.drop("PG02") != 0).any()
    for lab in combos:  # a combination adds the seen component's training ATE
        other = [c for c in lab.split("+") if c != "PG02"][0]
        np.testing.assert_allclose(res["zero_effect"].loc[lab], ate.loc[other])
        np.testing.assert_allclose(res["grn_de"].loc[lab], ate.loc[other] + de, rtol=1e-10)
    assert isinstance(res["seen_mean"], pd.DataFrame) and res["seen_mean"].shape == (
        len(labels),
        data.n_genes,
    )
