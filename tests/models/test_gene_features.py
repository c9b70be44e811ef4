"""Effects predicted from gene features (issue 28): the feature prior's shapes under particles and plates,
unbiased minibatch scaling, the feature readers' errors, the unseen path through the API and the CLI, and a
planted case where the features determine the effects."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceGraph_ELBO

import pyrovae
from pyrovae.cli import main
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.gene_features import (
    graph_embedding,
    read_gene_graph,
    read_gene_table,
    treatment_gene_features,
)
from pyrovae.data.prepare import holdout_perturbations
from pyrovae.evaluate.empirical import empirical_ate
from pyrovae.models.effects.features import FEATURE_PRIOR_SITE
from pyrovae.models.plates import PERTURBATION_PLATE
from pyrovae.models.zoo import build_model, model_config
from pyrovae.predict.posterior import Posterior
from pyrovae.runs.run import load_run, train_run
from pyrovae.simulate.perturbseq import ground_truth, simulate_perturbseq
from pyrovae.train.trainer import TrainConfig

SMALL = dict(n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8)
FEATURE_MODELS = ("sams_vae", "sams_vae_reference", "cpa_vae", "sams_vae_learned_sparsity", "gpo_vae")


def _model(name: str, T: int = 4, G: int = 6, F: int = 2, seed: int = 0):
    cfg = model_config(name, gene_features="data", gene_feature_dim=F, **SMALL)
    model = build_model(cfg, G, T, seed=seed)
    rng = np.random.default_rng(seed)
    has = np.array([True] * (T - 1) + [False])
    model.effect.feature_prior.set_features(rng.standard_normal((T, F)), has)
    with torch.no_grad():
        model.effect.feature_prior.weight.normal_()
        model.effect.feature_prior.bias.normal_()
    return model


def _batch(T: int = 4, G: int = 6, B: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = torch.zeros(B, T)
    d[torch.arange(B), torch.arange(B) % T] = 1.0
    batch = {
        "x": torch.poisson(torch.full((B, G), 3.0), generator=g),
        "d": d,
        "library_size": torch.full((B,), 18.0),
    }
    batch["qc"] = torch.zeros(B, 1)
    batch["cfx"], batch["has_cf"] = batch["x"].clone(), torch.zeros(B)
    batch["delta_x"] = torch.zeros(B, T)
    batch["delta_x_group"] = torch.zeros(B, T)
    return batch


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_feature_prior_is_the_prior_mean(name):
    """p(E) has mean b + x W (rows without features: b), in the model and in the spike of the spike-and-slab
    guide."""
    model = _model(name)
    fp = model.effect.feature_prior
    mu = fp.loc()
    assert torch.allclose(mu[-1], fp.bias)  # the target without features: the intercept
    with poutine.trace() as tr:
        model.effect.model_globals(None)
    assert torch.allclose(tr.trace.nodes["E"]["fn"].base_dist.loc, mu)
    if model.effect.guide_kind == "spike_slab":
        with poutine.trace() as tr:
            model.effect.guide_globals(None)
        assert torch.allclose(tr.trace.nodes["E"]["fn"].base_dist.prior_loc, mu)


def test_the_exact_weight_step_maximises_the_objective_in_the_weights():
    """FeaturePrior.fit: at its (W, b) the gradient of sum_tk w_tk log N(m_tk; mu_tk, s^2) + log N(W; 0,
    s_W^2) in (W, b) is zero, and any perturbation of (W, b) lowers it (a concave quadratic)."""
    model = _model("cpa_vae", T=6, F=3)
    fp = model.effect.feature_prior
    g = torch.Generator().manual_seed(1)
    means, w = torch.randn(6, 3, generator=g), torch.rand(6, 3, generator=g)
    w[2] = 0.0  # a treatment with no training cell: no weight
    fp.fit(means, w, 1.0)

    def objective():
        lp = (w * dist.Normal(fp.loc(), 1.0).log_prob(means)).sum()
        return lp + dist.Normal(0.0, fp.weight_prior_scale).log_prob(fp.weight).sum()

    best = objective()
    best.backward()
    assert fp.weight.grad.abs().max() < 1e-4 and fp.bias.grad.abs().max() < 1e-4
    with torch.no_grad():
        fp.weight.add_(0.01 * torch.randn(fp.weight.shape, generator=g))
        assert objective() < best


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_shapes_under_vectorised_particles_and_plates(name):
    """With validation on: TraceGraph_ELBO with vectorised particles runs; sample_globals is (n, T, K) and
    the unseen prediction puts the prior mean with every mask on."""
    model = _model(name)
    batch = _batch()
    w = {PERTURBATION_PLATE: torch.ones(4)}
    if model.artifact is not None:
        w["qc_rows"] = torch.ones(1)
    elbo = TraceGraph_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.loss_and_grads(model.model, model.guide, batch, 5, w, 0.2)
    assert np.isfinite(loss)
    fp = model.effect.feature_prior
    assert fp.weight.grad is not None and torch.isfinite(fp.weight.grad).all()
    unseen = torch.tensor([False, True, False, False])
    g = model.sample_globals(7, untrained=unseen)
    K = model.effect.shift_dim
    assert g["E"].shape == (7, 4, K)
    pred = model.effect.predict_untrained(g, unseen)
    assert torch.allclose(pred["E"][:, 1], fp.loc()[1].expand(7, K))
    assert torch.equal(pred["E"][:, 0], g["E"][:, 0])
    if "mask" in pred:
        assert bool((pred["mask"][:, 1] == 1).all())
    assert model.effect.untrained_method() == "gene_features"


def test_minibatch_objective_is_unbiased_and_the_weight_prior_counted_once():
    """Global terms at fixed values: the mean of the per-minibatch global log-densities over a partition of
    the cells into equal minibatches equals the full-data one (per-treatment weights), and the weight prior
    enters every minibatch once with the overall scale only (not N / B, not a row weight)."""
    model = _model("cpa_vae")
    T, N, B = 4, 8, 2
    d = torch.zeros(N, T)
    d[torch.arange(N), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])] = 1.0  # treatment 3: no cell
    counts = {PERTURBATION_PLATE: (d != 0).float().sum(0)}
    values = {"E": torch.randn(T, model.effect.shift_dim)}

    def global_logp(rows):
        batch = {"d": d[rows]}
        w = model.global_weights(batch, counts, N, "per_treatment")
        with poutine.trace() as tr, poutine.condition(data=values):
            with poutine.scale(scale=0.5):
                model.effect.model_globals(w[PERTURBATION_PLATE])
        tr.trace.compute_log_prob()
        site = tr.trace.nodes[FEATURE_PRIOR_SITE]
        assert site["scale"] == 0.5
        fp = model.effect.feature_prior
        lp_prior = dist.Normal(0.0, fp.weight_prior_scale).log_prob(fp.weight).sum()
        assert torch.allclose(site["log_prob_sum"], 0.5 * lp_prior)
        return tr.trace.nodes["E"]["log_prob_sum"] + site["log_prob_sum"]

    full = global_logp(torch.arange(N))
    parts = [global_logp(torch.arange(i, i + B)) for i in range(0, N, B)]
    assert torch.allclose(torch.stack(parts).mean(), full, rtol=1e-5)


def test_feature_readers_say_what_is_wrong(tmp_path):
    """One-line errors for malformed tables and graphs, and for targets with no feature (how many matched)."""
    data = load_perturbation_data(simulate_perturbseq("tiny", seed=0))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gene_table(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("gene,a,b\nPG01,1,x\nPG02,2,y\n")
    with pytest.raises(ValueError, match=r"column\(s\) \['b'\] are not numeric"):
        read_gene_table(bad)
    bad.write_text("gene,a\nPG01,1\nPG01,2\n")
    with pytest.raises(ValueError, match="names 1 gene"):
        read_gene_table(bad)
    bad.write_text("gene,a\nPG01,1\nPG02,\n")
    with pytest.raises(ValueError, match="1 row.*missing"):
        read_gene_table(bad)
    bad.write_text("gene\nPG01\n")
    with pytest.raises(ValueError, match="needs a gene column and at least one more"):
        read_gene_table(bad)
    bad.write_text("source,target,weight\nPG01,PG02,high\n")
    with pytest.raises(ValueError, match="weight .* not a number"):
        read_gene_graph(bad)
    none = tmp_path / "none.csv"
    none.write_text("gene,a\nXX,1\nYY,2\n")
    with pytest.raises(ValueError, match="0 of 6 perturbation targets"):
        treatment_gene_features(data, "table", none)
    some = tmp_path / "some.csv"
    some.write_text("gene,a,b\npg01,1,0\nPG02,2,1\nPG03,0,3\n")  # case-insensitive match of pg01
    feats = treatment_gene_features(data, "table", some)
    assert feats.n_matched == 3 and feats.values.shape == (6, 2)
    assert np.allclose(feats.values[~feats.has], 0.0)
    with pytest.warns(UserWarning, match="3 of 6 perturbation targets matched"):
        cfg = model_config("cpa_vae", gene_features="table", gene_features_file=str(some), **SMALL)
        train_run(data, cfg, TrainConfig(max_epochs=1, batch_size=128), tmp_path / "r", progress=False)


def test_graph_features_follow_the_graph():
    """Two disconnected cliques: nodes of one clique have closer features to each other than to the other."""
    edges = pd.DataFrame(
        {"source": ["a", "a", "b", "x", "x", "y"], "target": ["b", "c", "c", "y", "z", "z"], "weight": 1.0}
    )
    emb = graph_embedding(edges, 3)
    k = emb.to_numpy() @ emb.to_numpy().T
    nodes = list(emb.index)
    same, other = k[nodes.index("a"), nodes.index("b")], k[nodes.index("a"), nodes.index("x")]
    assert same > other + 0.05


def test_unseen_path_through_the_api_and_a_reloaded_run(tmp_path):
    """pyrovae.Model with gene_features: unseen perturbations are predicted from the features, labelled so,
    without the prior-draw warning; a saved and reloaded model predicts the same."""
    adata = simulate_perturbseq("tiny", seed=0, grn_shape="chain")
    pyrovae.Model.setup_anndata(adata, holdout_perturbations=["PG02"])
    m = pyrovae.Model(adata, model="cpa_vae", gene_features="data", gene_feature_dim=3, **SMALL)
    m.train(max_epochs=2, batch_size=128, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ate = m.get_ate(["PG01", "PG02"], n_samples=20)
    assert ate.attrs["prediction"] == {"PG01": "trained", "PG02": "gene_features"}
    m.save(tmp_path / "m")
    again = pyrovae.Model.load(tmp_path / "m", adata)
    pd.testing.assert_frame_equal(again.get_ate(["PG01", "PG02"], n_samples=20), ate)
    run = load_run(tmp_path / "m")
    assert run.model_cfg.features.source == "data" and run.model_cfg.features.dim == 3
    assert bool(run.model.effect.feature_prior.has_features.any())


def test_unseen_path_through_the_cli(tmp_path, capsys):
    adata = simulate_perturbseq("tiny", seed=0)
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    table = tmp_path / "emb.csv"
    pd.DataFrame(np.eye(6, 3), index=[f"PG0{i}" for i in range(1, 7)]).to_csv(table)
    net = ["n_latent=3", "decoder_hidden=8", "encoder_hidden=8", "max_epochs=1", "batch_size=128"]
    common = ["--data", str(path), "--holdout-perturbations", "PG02", "--quiet", "--set", *net]
    assert (
        main(
            [
                "train",
                "--model",
                "cpa_vae",
                "--out",
                str(tmp_path / "r"),
                "--gene-features",
                str(table),
                *common,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["ate", str(tmp_path / "r"), "--data", str(path), "--n-samples", "20"]) == 0
    assert "with gene_features (gene features from table: the gene-embedding table" in capsys.readouterr().out
    summary = (tmp_path / "r" / "ate_test" / "ate_metrics_unseen.csv").read_text()
    assert "linear" in summary and "grn_deconvolved" in summary and "seen_mean" in summary
    assert (
        main(
            [
                "train",
                "--model",
                "cpa_vae",
                "--out",
                str(tmp_path / "r2"),
                "--gene-features",
                "x.csv",
                "--gene-graph",
                "y.csv",
                *common,
            ]
        )
        == 2
    )
    assert "not both" in capsys.readouterr().err


@pytest.mark.slow
def test_planted_features_determine_the_unseen_effects(tmp_path):
    """Features that are the planted latent effects (in a random rotation; no GRN, no knock-down, so the
    latent effects are all there is): the unseen perturbations' predicted ATE follows their empirical ATE
    (Pearson r > 0.5 over the held-out singles' genes; the same model without features has no information)."""
    adata = simulate_perturbseq(
        "tiny",
        seed=3,
        n_perturbed=12,
        n_doubles=0,
        cells_per_single=60,
        mask_prob=0.6,
        knockdown=0.0,
        grn_weight=0.0,
        n_genes=60,
    )
    gt = ground_truth(adata)
    eff = np.asarray(gt["latent_effects"])
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((eff.shape[1], eff.shape[1])))
    table = tmp_path / "planted.csv"
    pd.DataFrame(eff @ q, index=gt["treatments"]).to_csv(table)
    held = ["PG02", "PG05", "PG09"]
    data = holdout_perturbations(load_perturbation_data(adata), held)
    cfg = model_config(
        "cpa_vae",
        gene_features="table",
        gene_features_file=str(table),
        n_latent=4,
        decoder_hidden=32,
        encoder_hidden=32,
    )
    tcfg = TrainConfig(max_epochs=60, batch_size=128, lr=3e-3, seed=0)
    run = train_run(data, cfg, tcfg, tmp_path / "r", progress=False)
    test = data.indices("test")
    labels = np.asarray(data.labels)[test].astype(str)
    truth = empirical_ate(data.rows(test), labels, data.control_label, groups=held, genes=list(data.genes))
    pred = Posterior.from_run(run).model_ate(held, n_samples=200, seed=0)
    r = np.corrcoef(pred.loc[held].to_numpy().ravel(), truth.loc[held].to_numpy().ravel())[0, 1]
    assert r > 0.5, r
