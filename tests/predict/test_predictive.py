"""Posterior sampling API: shapes, labels, untrained treatments, model ATE (common random numbers), ArviZ."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.models.zoo import build_model, model_config
from pyrovae.predict.posterior import Posterior
from pyrovae.train.trainer import TrainConfig, Trainer

SMALL = dict(n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)


def _model(name, data, **kw):
    return build_model(
        model_config(name, **{**SMALL, **kw}), data.n_genes, data.n_treatments, data.norm_mean, data.norm_std
    )


@pytest.fixture(scope="module")
def trained():
    """CPA-VAE fitted briefly on the tiny data (A raises genes 0-4, B lowers genes 5-9)."""
    from tests.helpers import make_adata

    pyro.enable_validation(True)
    data = load_perturbation_data(make_adata(n=480))
    model = _model("cpa_vae", data)
    Trainer(model, data, TrainConfig(max_epochs=40, batch_size=64, lr=1e-2, patience=100, seed=0)).fit(
        progress=False
    )
    return Posterior(model, data.schema()), data


@pytest.mark.parametrize("name", ["sams_vae", "cpa_vae", "svae_plus", "conditional_vae"])
def test_shapes_of_globals_latents_and_predictions(name, tiny_data, tiny_data_unique):
    data = tiny_data_unique if name == "svae_plus" else tiny_data
    post = Posterior(_model(name, data), data.schema())
    T, K, G = data.n_treatments, 3, data.n_genes
    gs = post.global_samples(6, seed=0)
    for site in post.model.global_site_names():
        assert gs[site].shape == (6, T, K)
    if name == "conditional_vae":
        assert gs == {}
    else:
        assert gs["effect"].shape == (6, T, K)
    z = post.latent(data, "test", n_samples=4, seed=0, batch_size=5)
    assert z.shape == (4, len(data.indices("test")), K)
    labels = ["control", "A", "B"] if name == "svae_plus" else ["control", "B+A", "B"]
    pred = post.predict(labels, n_cells=5, seed=0)
    assert pred.shape == (15, G)
    assert list(pred.var_names) == data.genes
    canon = ["control", "A", "B"] if name == "svae_plus" else ["control", "A+B", "B"]
    assert list(pred.obs["perturbation"]) == [lab for lab in canon for _ in range(5)]
    assert list(pred.obs["sample"]) == list(range(5)) * 3
    assert (pred.X >= 0).all() and np.allclose(pred.X, np.round(pred.X))
    assert (pred.obs["library_size"] == 1e4).all()


def test_same_seed_same_numbers(tiny_data):
    post = Posterior(_model("sams_vae", tiny_data), tiny_data.schema())
    torch.manual_seed(123)
    before = torch.rand(1)
    a = post.predict(["A", "A+B"], n_cells=4, seed=7).X
    b = post.predict(["A", "A+B"], n_cells=4, seed=7).X
    c = post.predict(["A", "A+B"], n_cells=4, seed=8).X
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    g1, g2 = post.global_samples(3, seed=1), post.global_samples(3, seed=1)
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)
    z1, z2 = post.latent(tiny_data, "val", 3, seed=2), post.latent(tiny_data, "val", 3, seed=2)
    assert np.array_equal(z1, z2)
    # the caller's RNG stream is left untouched
    torch.manual_seed(123)
    assert torch.equal(before, torch.rand(1))


def test_library_sizes_drawn_from_the_data(tiny_data):
    post = Posterior(_model("sams_vae", tiny_data), tiny_data.schema())
    pred = post.predict(["A", "A+B"], n_cells=20, library_size="data", data=tiny_data, seed=0)
    for lab in ("A", "A+B"):
        pool = set(tiny_data.library_size[tiny_data.labels == lab].tolist())
        assert set(pred.obs.loc[pred.obs["perturbation"] == lab, "library_size"]) <= pool
    with pytest.raises(ValueError, match="needs the data"):
        post.predict(["A"], n_cells=2, library_size="data")


def test_unknown_perturbation_is_a_clear_error(tiny_data):
    post = Posterior(_model("sams_vae", tiny_data), tiny_data.schema())
    with pytest.raises(ValueError, match=r"unknown perturbation\(s\) Z .*not among the 2 treatments"):
        post.predict(["A", "A+Z"], n_cells=2)
    with pytest.raises(ValueError, match="unknown perturbation"):
        post.model_ate(["Z"], n_samples=4)


def test_untrained_treatment_is_drawn_from_the_prior(tiny_data):
    schema = tiny_data.schema()
    schema["train_treatment_counts"] = [0.0] + schema["train_treatment_counts"][1:]  # "A" never trained
    model = _model("sams_vae_mf_reference", tiny_data)  # q(m) starts at 0.5
    with torch.no_grad():
        model.effect.q_E_loc.fill_(5.0)  # q far from the prior N(0, 1)
    post = Posterior(model, schema)
    assert post.untrained.tolist() == [True, False]
    gs = post.global_samples(4000, seed=0)
    # trained row: q (mask prob 0.5 at init, E ~ N(5, 1)); untrained row: prior (Bernoulli(0.01), N(0, 1))
    assert gs["mask"][:, 0].mean() == pytest.approx(0.01, abs=0.01)
    assert gs["mask"][:, 1].mean() == pytest.approx(0.5, abs=0.03)
    assert gs["E"][:, 0].mean() == pytest.approx(0.0, abs=0.05)
    assert gs["E"][:, 1].mean() == pytest.approx(5.0, abs=0.05)


@pytest.mark.parametrize("name", ["sams_vae", "svae_plus", "conditional_vae"])
def test_model_ate_is_exactly_zero_for_control_versus_control(name, tiny_data, tiny_data_unique):
    data = tiny_data_unique if name == "svae_plus" else tiny_data
    post = Posterior(_model(name, data), data.schema())
    ate = post.model_ate(["control", "A", "ctrl"], n_samples=50, chunk=20, seed=0)
    assert list(ate.index) == ["control", "A", "control"]
    assert list(ate.columns) == data.genes
    assert (ate.loc["control"].to_numpy() == 0).all()
    assert np.abs(ate.loc["A"].to_numpy()).max() > 0
    ate_mean = post.model_ate(["A"], n_samples=50, chunk=20, seed=0, mean=True)
    assert np.isfinite(ate_mean.to_numpy()).all()
    a1, a2 = post.model_ate(["A"], n_samples=50, seed=3), post.model_ate(["A"], n_samples=50, seed=3)
    assert a1.equals(a2)


def test_model_ate_recovers_the_sign_of_planted_effects(trained):
    post, data = trained
    for mean in (False, True):
        ate = post.model_ate(["A", "B", "A+B"], n_samples=400, chunk=200, mean=mean, seed=0)
        assert ate.loc["A"].iloc[:5].mean() > 0.5  # A raises genes 0-4 four-fold
        assert ate.loc["B"].iloc[5:10].mean() < -0.5  # B lowers genes 5-9 four-fold
        assert ate.loc["A+B"].iloc[:5].mean() > 0.5 and ate.loc["A+B"].iloc[5:10].mean() < -0.5
    lib = post.model_ate(["A"], n_samples=200, library_size="data", data=data, seed=0)
    assert lib.loc["A"].iloc[:5].mean() > 0.5


def test_to_arviz_groups_and_dims(tiny_data):
    post = Posterior(_model("sams_vae", tiny_data), tiny_data.schema())
    idata = post.to_arviz(n_draws=7, perturbations=["control", "A+B"], seed=0)
    # InferenceData (ArviZ 0.x) lists its groups with a method, xarray's DataTree (ArviZ 1.x) as paths
    groups = idata.groups() if callable(idata.groups) else [g.strip("/") for g in idata.groups]
    assert set(groups) >= {"posterior", "posterior_predictive"}
    E = idata.posterior["E"]
    assert E.dims == ("chain", "draw", "treatment", "effect_latent")
    assert E.shape == (1, 7, 2, 3)
    assert list(E.coords["treatment"].values) == ["A", "B"]
    assert "effect" in idata.posterior and "mask" in idata.posterior
    counts = idata.posterior_predictive["counts"]
    assert counts.dims == ("chain", "draw", "cell", "gene")
    assert counts.shape == (1, 7, 2, tiny_data.n_genes)
    assert list(counts.coords["gene"].values) == tiny_data.genes
    assert list(counts.coords["cell"].values) == ["control", "A+B"]


def test_model_ate_draws_the_globals_chunk_by_chunk(tiny_data, monkeypatch):
    """Memory O(chunk): no call draws over ``chunk`` global samples; same seed and chunk, same numbers."""
    post = Posterior(_model("sams_vae", tiny_data), tiny_data.schema())
    sizes: list[int] = []
    real = Posterior._draw_globals

    def spy(self, n):
        sizes.append(n)
        return real(self, n)

    monkeypatch.setattr(Posterior, "_draw_globals", spy)
    a1 = post.model_ate(["A", "B"], n_samples=50, chunk=16, seed=4)
    assert sizes == [1, 16, 16, 16, 2]  # one probe draw (Posterior.chunk_size), then the chunks
    assert a1.equals(post.model_ate(["A", "B"], n_samples=50, chunk=16, seed=4))
