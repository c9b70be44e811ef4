"""GRN export of GPO-VAE models, scoring against a planted GRN, unseen-perturbation rows, `pyrovae grn`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pyrovae.evaluate.grn_export import (
    edge_counts,
    gpo_unseen_globals,
    grn_edges,
    grn_probabilities,
    score_matrix,
)
from pyrovae.models.zoo import build_model, model_config

NODES = ["P1", "P2", "P3", "X1"]  # 3 perturbed genes, 1 extended gene


def _model(T: int = 4):
    cfg = model_config("gpo_vae", n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8)
    model = build_model(cfg, 6, T, seed=0)
    w = torch.arange(T * T, dtype=torch.float32).reshape(T, T) / 4.0 - 2.0
    with torch.no_grad():
        model.effect.q_mask_logits.copy_(w)
    return model, w


def test_probabilities_are_sigmoid_of_w():
    model, w = _model()
    np.testing.assert_allclose(grn_probabilities(model), torch.sigmoid(w).numpy(), rtol=1e-6)


def test_edges_names_blocks_and_self_loops():
    model, w = _model()
    probs = torch.sigmoid(w).numpy()
    edges = grn_edges(model, NODES, n_perturbed=3)
    assert list(edges.columns) == ["source", "target", "probability", "block", "regulator_perturbed"]
    assert (edges["regulator_perturbed"] == edges["source"].isin(NODES[:3])).all()
    assert len(edges) == 16 - 4 and not (edges["source"] == edges["target"]).any()
    pos = {n: i for i, n in enumerate(NODES)}
    for r in edges.itertuples():
        assert r.probability == pytest.approx(probs[pos[r.source], pos[r.target]], rel=1e-6)
        both = r.source in NODES[:3] and r.target in NODES[:3]
        assert r.block == ("perturbed" if both else "extended")
    assert (edges["block"] == "perturbed").sum() == 3 * 2
    # blocks are kept apart: all perturbed-block rows first, each block sorted by probability
    blocks = edges["block"].astype(str).tolist()
    assert blocks == sorted(blocks, key=["perturbed", "extended"].index)
    for _, part in edges.groupby("block", observed=True):
        assert part["probability"].is_monotonic_decreasing
    with_loops = grn_edges(model, NODES, n_perturbed=3, include_self_loops=True)
    assert len(with_loops) == 16 and (with_loops["source"] == with_loops["target"]).sum() == 4
    strong = grn_edges(model, NODES, n_perturbed=3, min_prob=0.5)
    assert (strong["probability"] >= 0.5).all() and len(strong) == int(
        ((probs >= 0.5) & ~np.eye(4, dtype=bool)).sum()
    )
    counts = edge_counts(edges, 0.5)
    off = ~np.eye(4, dtype=bool)
    blk = np.zeros((4, 4), dtype=bool)
    blk[:3, :3] = True
    assert counts["perturbed"] == int(((probs > 0.5) & off & blk).sum())
    assert counts["extended"] == int(((probs > 0.5) & off & ~blk).sum())


def test_export_refuses_non_gpo_models_and_bad_names():
    sams = build_model(model_config("sams_vae", n_latent=3), 6, 4, seed=0)
    with pytest.raises(ValueError, match="not a GPO-VAE"):
        grn_probabilities(sams)
    model, _ = _model()
    with pytest.raises(ValueError, match="node names"):
        grn_edges(model, NODES[:3], n_perturbed=3)


def test_score_matrix_on_planted_grn():
    truth = {
        "grn_genes": ["P1", "P2", "P3", "X1"],
        "grn_adjacency": np.array([[0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32),
    }
    perfect = truth["grn_adjacency"] * 0.9 + 0.05
    # node order of the model differs from the truth's: scoring aligns by name
    order = [2, 0, 3, 1]
    nodes = [truth["grn_genes"][i] for i in order]
    probs = perfect[np.ix_(order, order)]
    res = score_matrix(probs, nodes, truth, n_perturbed=3)
    assert res["grn_genes"]["auroc"] == pytest.approx(1.0) and res["grn_genes"]["auprc"] == pytest.approx(1.0)
    assert res["grn_genes"]["n_true_edges"] == 3
    # the perturbed block is the first 3 nodes of the model's order: P3, P1, X1 ... X1 is at position 2 < 3
    assert res["perturbed"]["n_candidates"] == 6


def test_unseen_rows_are_predicted_from_the_grn():
    model, _ = _model()
    T = 4
    w = torch.full((T, T), -20.0)
    w[0, 1] = w[0, 2] = 20.0  # seen P1 reaches P2 and P3
    w[1, 2] = 20.0  # seen P2 reaches P3
    w[2, 3] = 20.0  # unseen P3 -> X1 (learned only through K-hop paths)
    with torch.no_grad():
        model.effect.q_mask_logits.copy_(w)
    unseen = np.array([False, False, True, False])
    seen = np.array([True, True, False, False])
    torch.manual_seed(0)
    g = gpo_unseen_globals(model, unseen, n=5, seen=seen)
    m, e = g["mask"], g["E"]
    assert m.shape == e.shape == (5, T, T)
    # mask row of P3: its GRN row (P3 -> X1) plus the self effect
    torch.testing.assert_close(m[:, 2], torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(5, T))
    # effect on P3's own coordinate: mean over seen rows reaching P3 (P1 and P2) of E[:, t, P3]
    torch.testing.assert_close(e[:, 2, 2], (e[:, 0, 2] + e[:, 1, 2]) / 2)
    # coordinate X1: no seen row acts on X1 -> 0
    torch.testing.assert_close(e[:, 2, 3], torch.zeros(5))
    # seen rows are the guide's draws (unchanged masks)
    torch.testing.assert_close(m[:, 0], torch.tensor([0.0, 1.0, 1.0, 0.0]).expand(5, T))


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from pyrovae.data.anndata import load_perturbation_data
    from pyrovae.data.prepare import prepare_gpo_data
    from pyrovae.runs import train_run
    from pyrovae.simulate import simulate_perturbseq
    from pyrovae.train.trainer import TrainConfig

    root = tmp_path_factory.mktemp("grn")
    adata = simulate_perturbseq("tiny", seed=0)
    h5ad = root / "tiny.h5ad"
    adata.write_h5ad(h5ad)
    data = prepare_gpo_data(load_perturbation_data(adata), qc_key="low_quality")
    cfg = model_config(
        "gpo_vae", n_latent=4, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16
    )
    run = train_run(
        data, cfg, TrainConfig(max_epochs=1, batch_size=256, n_particles=1), root / "run", progress=False
    )
    return run, h5ad, adata


def _main(argv):
    try:
        from pyrovae.cli import main
    except ImportError:  # another subcommand module not written yet: drive ours through argparse
        import argparse

        from pyrovae.commands import grn

        parser = argparse.ArgumentParser(prog="pyrovae")
        grn.register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(argv)
        return args.func(args)
    return main(argv)


def test_cli_grn_exports_and_scores(tiny_run, tmp_path, capsys):
    run, h5ad, adata = tiny_run
    out = tmp_path / "grn.csv"
    rc = _main(
        [
            "grn",
            str(run.path),
            "--out",
            str(out),
            "--data",
            str(h5ad),
            "--truth",
            "--statistical",
            "--scores-out",
            str(tmp_path / "scores.csv"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "perturbed-block" in text and "correlation" in text and "false_omission_rate" in text
    edges = pd.read_csv(out)
    T = len(run.treatments)
    assert len(edges) == T * (T - 1)
    assert set(edges["block"]) == {"perturbed", "extended"}
    pert = set(adata.var_names[adata.var["perturbed"]])
    assert set(edges.loc[edges["block"] == "perturbed", "source"]) <= pert
    assert (edges["regulator_perturbed"] == edges["source"].isin(pert)).all()
    blind = int(((edges["probability"] > 0.5) & ~edges["regulator_perturbed"]).sum())
    assert (f"note: {blind} of the edges" in text) == (blind > 0)
    np.testing.assert_allclose(
        np.sort(edges["probability"].to_numpy()),
        np.sort(grn_probabilities(run)[~np.eye(T, dtype=bool)]),
        rtol=1e-5,
    )
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert {"gpo_vae", "correlation", "de", "deconvolved_de", "paired_de", "random"} <= set(scores["method"])
    assert {"perturbed", "perturbed->extended", "grn_genes"} <= set(scores["block"])
    assert scores.loc[scores["method"] == "de", "sign_accuracy"].notna().all()
    assert "at a matched edge count" in text and "path_expansion" in text
    # refuses to overwrite; --overwrite and --self-loops work
    assert _main(["grn", str(run.path), "--out", str(out)]) == 2
    assert _main(["grn", str(run.path), "--out", str(out), "--overwrite", "--self-loops"]) == 0
    assert len(pd.read_csv(out)) == T * T


def test_cli_grn_reference_scores_gpo_and_baselines(tiny_run, tmp_path, capsys):
    """pyrovae grn RUN --reference EDGES.csv --data: every method against the planted GRN's edge list, signed,
    with its p-value; bad lists end in one line."""
    from pyrovae.simulate import ground_truth

    run, h5ad, adata = tiny_run
    truth = ground_truth(adata)
    genes, adj = np.asarray(truth["grn_genes"]).astype(str), np.asarray(truth["grn_adjacency"])
    src, tgt = np.nonzero(adj)
    ref = tmp_path / "edges.tsv"
    pd.DataFrame({"source": genes[src], "target": genes[tgt], "sign": np.sign(adj[src, tgt])}).to_csv(
        ref, sep="\t", index=False
    )
    out = tmp_path / "ref_scores.csv"
    argv = ["grn", str(run.path), "--reference", str(ref), "--data", str(h5ad), "--reference-out", str(out)]
    assert _main([*argv, "--permutations", "50", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    table = pd.read_csv(out)
    assert {"gpo_vae", "correlation", "de", "deconvolved_de"} <= set(table["method"])
    assert {"auprc", "random_auprc", "enrichment", "p_value", "precision_at_top", "sign_accuracy"} <= set(
        table.columns
    )
    de = table[(table["method"] == "de") & (table["block"] == "perturbed->perturbed")].iloc[0]
    assert de["sign_accuracy"] >= 0 and 0 < de["p_value"] <= 1 and de["top_k"] == 5
    assert f"{len(src)} of the {len(src)} edges" in text and "against the reference" in text
    summary = pd.read_json(out.with_name("ref_scores_summary.json"), typ="series")
    assert summary["n_edges_matched"] == len(src) and summary["signed"]
    # the default output goes into the run directory, next to the run
    assert _main(["grn", str(run.path), "--reference", str(ref), "--permutations", "10"]) == 0
    assert (run.path / "grn_reference_edges.csv").exists()
    assert "pass --data for the baselines" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    for text_, words in (("a,b\nx,y\n", "no source column"), ("source,target\nTP53,MYC\n", "none of the 2")):
        bad.write_text(text_)
        assert (
            _main(["grn", str(run.path), "--reference", str(bad), "--reference-out", str(out), "--overwrite"])
            == 2
        )
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert _main(["grn", str(run.path)]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_cli_ate_and_sample_predict_held_out_perturbations_by_grn_transfer(tmp_path, capsys):
    import json

    import anndata as ad

    from pyrovae.simulate import simulate_perturbseq

    h5ad = tmp_path / "tiny.h5ad"
    simulate_perturbseq("tiny", seed=0).write_h5ad(h5ad)
    run_dir = tmp_path / "gpo"
    opts = "max_epochs=2 n_latent=4 decoder_hidden=16 encoder_hidden=16 embedding_encoder_hidden=16"
    argv = ["train", "--data", str(h5ad), "--model", "gpo_vae", "--out", str(run_dir), "--quiet"]
    argv += ["--holdout-perturbations", "PG02", "--qc-key", "low_quality", "--set", *opts.split()]
    assert _main(argv) == 0
    capsys.readouterr()
    assert _main(["ate", str(run_dir), "--data", str(h5ad), "--n-samples", "50"]) == 0
    text = capsys.readouterr().out
    assert "predicted by gpo with grn_transfer" in text
    out = run_dir / "ate_test"
    summary = json.loads((out / "ate_summary.json").read_text())
    unseen = summary["unseen_prediction"]
    assert unseen["method"] == "grn_transfer" and "PG02" in unseen["perturbations"]
    assert set(unseen["perturbations"].values()) == {"grn_transfer"}
    table = pd.read_csv(out / "ate_metrics_unseen.csv", index_col=[0, 1]).loc["all unseen"]
    assert {"gpo", "gpo_prior_draw", "zero_effect", "seen_mean", "grn_de", "grn_deconvolved"} <= set(
        table.index
    )
    assert (table["n_perturbations"] == len(unseen["perturbations"])).all()
    assert "unseen singles:" in text
    per = pd.read_csv(out / "ate_per_perturbation.csv")
    model_rows = per[per["method"] == "gpo"].set_index("perturbation")["prediction"]
    assert model_rows["PG02"] == "grn_transfer" and model_rows["PG01"] == "trained"
    s = tmp_path / "s.h5ad"
    assert (
        _main(["sample", str(run_dir), "--perturbation", "PG02", "PG01", "--n-cells", "4", "--out", str(s)])
        == 0
    )
    assert "PG02; predicted with grn_transfer" in capsys.readouterr().out
    cells = ad.read_h5ad(s)
    assert cells.obs["prediction"].tolist() == ["grn_transfer"] * 4 + ["trained"] * 4
