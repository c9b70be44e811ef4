"""The user's knowledge: GMT and edge-list readers, enrichment and reference scores on planted answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from pyrovae.evaluate.enrichment import (
    benjamini_hochberg,
    comembership_auroc,
    decoder_sensitivity,
    rank_enrichment,
)
from pyrovae.evaluate.grn import auroc
from pyrovae.evaluate.grn_reference import score_reference
from pyrovae.evaluate.knowledge import (
    match_gene_sets,
    match_interactions,
    read_gene_sets,
    read_interactions,
)
from pyrovae.models.zoo import build_model, model_config

# ------------------------------------------------------------------------------------------- readers


def _write(tmp_path, name, text, binary=False):
    p = tmp_path / name
    p.write_bytes(text) if binary else p.write_text(text)
    return p


def test_gmt_reads_sets_in_order_and_dedupes_genes(tmp_path):
    p = _write(tmp_path, "s.gmt", "A\tdesc\tg1\tg2\tg1\n\nB\t\tg3\n")
    assert read_gene_sets(p) == {"A": ["g1", "g2"], "B": ["g3"]}


@pytest.mark.parametrize(
    "text, words",
    [
        ("", ["holds no gene set"]),
        ("A\tdesc\n", ["line 1", "'A' has no genes"]),
        ("A,desc,g1,g2\n", ["line 1 has one column", "tab-separated"]),
        ("A\tdesc\tg1\nB\td\tg2\nA\td\tg3\n", ["line 3", "'A'", "line 1", "unique"]),
        ("\tdesc\tg1\n", ["line 1", "no name"]),
        ("A\tdesc\t\t\n", ["line 1", "'A' has no genes"]),
    ],
)
def test_gmt_errors_are_one_line_naming_the_problem(tmp_path, text, words):
    p = _write(tmp_path, "bad.gmt", text)
    with pytest.raises(ValueError) as err:
        read_gene_sets(p)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_gmt_missing_and_binary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gene_sets(tmp_path / "nope.gmt")
    p = _write(tmp_path, "z.gmt", b"\x1f\x8b\x08\x00\xff\xfe", binary=True)
    with pytest.raises(ValueError, match="not a text file"):
        read_gene_sets(p)


def test_matching_reports_counts_and_refuses_no_match():
    sets = {"A": ["g1", "g2", "x"], "B": ["g3"], "C": ["y", "z"]}
    kept, rep = match_gene_sets(sets, ["g1", "g2", "g3", "g4"], min_size=2)
    assert kept == {"A": ["g1", "g2"]}
    assert rep == {"n_sets": 3, "n_sets_kept": 1, "n_set_genes": 6, "n_matched_genes": 3, "n_universe": 4}
    with pytest.raises(ValueError, match="none of the 6 genes.*case"):
        match_gene_sets(sets, ["G1", "G2"])
    with pytest.raises(ValueError, match="none of the 6 genes.*Ensembl"):
        match_gene_sets(sets, ["ENSG01"])


def test_interactions_columns_signs_duplicates_and_self_loops(tmp_path):
    rows = ["a\tA\tb\t1", "a\tA\tb\t1", "b\tB\tc\t-1", "c\tA\td\t1", "c\tA\td\t-1", "e\tA\te\t1"]
    text = "TF\tconfidence\ttarget\tmor\n" + "\n".join(rows) + "\n"
    df = read_interactions(_write(tmp_path, "dorothea.tsv", text))  # DoRothEA's columns
    assert list(map(tuple, df[["source", "target"]].values)) == [("a", "b"), ("b", "c"), ("c", "d")]
    assert df["sign"].tolist() == [1.0, -1.0, 0.0]  # c -> d given both signs: ambiguous
    assert df.attrs["signed"] and df.attrs["n_conflicting"] == 1 and df.attrs["n_self_loops"] == 1
    plain = read_interactions(_write(tmp_path, "e.csv", "source,target\na,b\n"))
    assert not plain.attrs["signed"] and plain["sign"].tolist() == [0.0]
    words = read_interactions(_write(tmp_path, "w.csv", "from,to,effect\na,b,repression\nb,c,+\n"))
    assert words["sign"].tolist() == [-1.0, 1.0]


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("e.csv", "", ["is empty"]),
        ("e.csv", "gene_a,gene_b\nx,y\n", ["no source column", "accepted"]),
        ("e.csv", "source,node\nx,y\n", ["no target column"]),
        ("e.csv", "source,target,sign\nx,y,maybe\n", ["line 2", "'maybe' is not a sign"]),
        ("e.csv", "source,target\nx,\n", ["line 2", "empty target"]),
        ("e.csv", "source,target\nx\n", ["line 2 has 1 column"]),
        ("e.csv", "source,target\nx,x\n", ["no edge between two different genes"]),
    ],
)
def test_interaction_errors_are_one_line(tmp_path, name, text, words):
    with pytest.raises(ValueError) as err:
        read_interactions(_write(tmp_path, name, text))
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_match_interactions_signs_and_unmatched_lists(tmp_path):
    df = read_interactions(_write(tmp_path, "e.csv", "source,target,sign\na,b,1\nb,c,-1\nc,zz,1\nd,a,0\n"))
    adj, rep = match_interactions(df, ["a", "b", "c", "d"])
    assert adj[0, 1] == 1 and adj[1, 2] == -1 and adj[3, 0] != 0 and (adj != 0).sum() == 3
    assert rep["signed_mask"][0, 1] and not rep["signed_mask"][3, 0]
    assert rep["n_edges_matched"] == 3 and rep["n_genes_matched"] == 4 and rep["n_genes"] == 5
    und, _ = match_interactions(df, ["a", "b", "c", "d"], undirected=True)
    assert und[1, 0] == 1 and und[2, 1] == -1
    with pytest.raises(ValueError, match="none of the 5 genes"):
        match_interactions(df, ["p", "q"])
    with pytest.raises(ValueError, match="none of its 4 edges joins two of them"):
        match_interactions(df, ["a", "c"])


# ------------------------------------------------------------------------------------------ metrics


def test_rank_enrichment_closed_forms():
    scores = np.arange(10.0)  # gene i has score i
    auc, p = rank_enrichment(
        scores, [np.array([9, 8, 7]), np.array([0, 1, 2]), np.array([0, 9])], 999, seed=0
    )
    assert auc[0] == 1.0 and auc[1] == 0.0 and auc[2] == 0.5
    # the top set: no random 3-set of 10 beats it, so p = 1 / (1 + n) up to the 1 / C(10, 3) chance of a tie
    assert p[0] < 0.02 and p[1] == 1.0
    y = np.zeros(10, bool)
    y[[0, 9]] = True
    assert auc[2] == auroc(y, scores)


def test_permutation_null_is_calibrated_on_random_scores():
    rng = np.random.default_rng(1)
    ps = []
    for i in range(40):
        scores = rng.standard_normal(200)
        sets = [rng.choice(200, size=m, replace=False) for m in (5, 20, 50)]
        ps += list(rank_enrichment(scores, sets, 199, seed=i)[1])
    ps = np.asarray(ps)
    assert kstest(ps, "uniform").pvalue > 0.01
    assert (ps < 0.05).mean() < 0.12


def test_benjamini_hochberg_matches_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan])
    # sorted 0.01, 0.03, 0.04, 0.5 times 4 / rank: 0.04, 0.06, 0.0533, 0.5 -> cumulative min from the top
    np.testing.assert_allclose(benjamini_hochberg(p)[:4], [0.04, 0.0533333, 0.0533333, 0.5], rtol=1e-5)
    assert np.isnan(benjamini_hochberg(p)[4])


def test_comembership_finds_planted_groups_and_not_shuffled_ones():
    rng = np.random.default_rng(0)
    names = [f"g{i}" for i in range(12)]
    usage = np.zeros((12, 6))
    for i in range(12):
        usage[i, (i // 4) * 2 : (i // 4) * 2 + 2] = 1.0  # groups of 4 use 2 dims each
    usage += 0.05 * rng.random(usage.shape)
    planted = {f"S{k}": names[4 * k : 4 * k + 4] for k in range(3)}
    res = comembership_auroc(usage, names, planted, 200, seed=0)
    assert res["auroc"] == 1.0 and res["p_value"] < 0.02 and res["n_positive_pairs"] == 18
    shuffled = [names[i] for i in rng.permutation(12)]
    null = comembership_auroc(usage, names, {f"S{k}": shuffled[4 * k : 4 * k + 4] for k in range(3)}, 200)
    assert null["p_value"] > 0.05


def test_reference_scores_on_a_planted_grn():
    rng = np.random.default_rng(0)
    n, n_pert = 20, 15
    ref = (rng.random((n, n)) < 0.1).astype(float) * rng.choice([-1.0, 1.0], size=(n, n))
    np.fill_diagonal(ref, 0)
    signed = ref != 0
    perfect = np.abs(ref) + 0.01 * rng.random((n, n))
    methods = {"perfect": perfect, "random": rng.random((n, n))}
    nodes = [f"n{i}" for i in range(n)]
    t = score_reference(methods, nodes, ref, n_pert, signed, {"perfect": ref}, top_k=5, n_permutations=200)
    t = t.set_index(["method", "block"])
    best = t.loc[("perfect", "perturbed->perturbed")]
    assert best["auprc"] == 1.0 and best["auroc"] == 1.0 and best["precision_at_top"] == 1.0
    assert best["p_value"] == pytest.approx(1 / 201) and best["sign_accuracy"] == 1.0
    assert best["enrichment"] == pytest.approx(1.0 / best["random_auprc"])
    # random scores: AUPRC about the prevalence, averaged over many score draws
    pp = ~np.eye(n, dtype=bool)
    pp[n_pert:] = pp[:, n_pert:] = False
    prevalence = (ref[pp] != 0).mean()
    aps = [
        score_reference({"r": rng.random((n, n))}, nodes, ref, n_pert, n_permutations=0)
        .set_index("block")
        .loc["perturbed->perturbed", "auprc"]
        for _ in range(200)
    ]
    assert abs(np.mean(aps) - prevalence) < 0.03
    assert t.loc[("random", "perturbed->perturbed"), "random_auprc"] == pytest.approx(prevalence)


def test_reference_null_p_values_are_not_significant_for_random_scores():
    rng = np.random.default_rng(3)
    n = 16
    ref = (rng.random((n, n)) < 0.15).astype(float)
    np.fill_diagonal(ref, 0)
    ps = [
        score_reference(
            {"r": rng.random((n, n))}, [str(i) for i in range(n)], ref, n, n_permutations=99, seed=i
        )
        .set_index("block")
        .loc["perturbed->perturbed", "p_value"]
        for i in range(60)
    ]
    assert kstest(ps, "uniform").pvalue > 0.01 and np.mean(np.asarray(ps) < 0.05) < 0.15


# -------------------------------------------------------------------------------- decoder sensitivity


def test_decoder_sensitivity_is_the_mean_jacobian_of_the_log_mean():
    torch.manual_seed(0)
    cfg = model_config("sams_vae", n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8)
    model = build_model(cfg, 7, 2, seed=0)
    J = decoder_sensitivity(model, n_cells=16, seed=4)
    assert J.shape == (3, 7)
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(4))
    h = 1e-3
    with torch.no_grad():
        for k in range(3):
            e = torch.zeros(3)
            e[k] = h
            fd = (model.decoder.log_mean(z + e) - model.decoder.log_mean(z - e)) / (2 * h)
            np.testing.assert_allclose(J[k], fd.mean(0).numpy(), atol=2e-3)
