"""Held-out predictive IWELBO: closed-form check on a linear-Gaussian model, seeding, chunk invariance."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pyro
import pytest
import torch
from scipy.stats import multivariate_normal

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.models.zoo import build_model, model_config
from pyrovae.predict.iwelbo import iwelbo_over_seeds, predictive_iwelbo

G, K, SIGMA = 5, 2, 0.5


@pytest.fixture(scope="module")
def linear_gaussian():
    """Conditional VAE, normal likelihood, linear decoder and encoder, parameters set by hand.

    Control cells: z ~ N(0, I), x = W z + b + sigma * eps, so p(x) = N(b, W W^T + sigma^2 I). The encoder
    is the exact posterior mean with an over-dispersed diagonal scale, so the ELBO (K = 1) is strictly
    below log p(x) and the importance-weighted bound closes the gap as K grows.
    """
    pyro.enable_validation(True)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(G, K))
    b = rng.normal(size=G) + 10.0  # positive data (the loader also computes log1p statistics)
    n_ctrl, n_pert = 60, 20
    z = rng.normal(size=(n_ctrl + n_pert, K))
    x = z @ W.T + b + SIGMA * rng.normal(size=(n_ctrl + n_pert, G))
    x[n_ctrl:] += 1.0  # perturbed cells (their dosage column has its own decoder weights)
    a = ad.AnnData(x.astype(np.float32))
    a.obs_names = [f"c{i}" for i in range(len(x))]
    a.var_names = [f"g{j}" for j in range(G)]
    a.obs["perturbation"] = ["control"] * n_ctrl + ["A"] * n_pert
    a.obs["split"] = ["test"] * n_ctrl + ["train"] * n_pert
    data = load_perturbation_data(a, split_key="split", require_counts=False)

    cfg = model_config("conditional_vae", n_latent=K, likelihood="normal", decoder_layers=0, encoder_layers=0)
    model = build_model(cfg, G, data.n_treatments, np.zeros(G), np.ones(G), norm_log=False)
    cov_post = np.linalg.inv(np.eye(K) + W.T @ W / SIGMA**2)
    A_post = cov_post @ W.T / SIGMA**2
    with torch.no_grad():
        head = model.decoder.head
        head.weight.zero_()
        head.weight[:, :K] = torch.as_tensor(W, dtype=torch.float32)
        head.bias[:] = torch.as_tensor(b, dtype=torch.float32)
        model.decoder.log_scale.fill_(math.log(SIGMA))
        enc = model.encoder
        enc.loc.weight.zero_()
        enc.loc.weight[:, :G] = torch.as_tensor(A_post, dtype=torch.float32)
        enc.loc.bias[:] = torch.as_tensor(-A_post @ b, dtype=torch.float32)
        enc.log_var.weight.zero_()
        enc.log_var.bias[:] = torch.as_tensor(np.log(1.5**2 * np.diag(cov_post) - 1e-4), dtype=torch.float32)
    model.eval()
    log_px = multivariate_normal(b, W @ W.T + SIGMA**2 * np.eye(G)).logpdf(x[:n_ctrl])
    return model, data, log_px


def test_iwelbo_bounds_the_closed_form_marginal_and_approaches_it(linear_gaussian):
    model, data, log_px = linear_gaussian
    means, gaps = [], []
    for k in (1, 10, 1000):
        df = predictive_iwelbo(model, data, "test", n_particles=k, batch_size=32, particle_chunk=250, seed=0)
        assert list(df.columns) == ["iwelbo", "label"] and (df["label"] == "control").all()
        means.append(df["iwelbo"].mean())
        gaps.append(float(np.mean(log_px - df["iwelbo"].to_numpy())))
    assert means[0] < means[1] < means[2]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[0] > 0.05  # the ELBO is strictly below log p(x)
    assert -0.01 < gaps[2] < 0.01  # K = 1000: equal up to Monte Carlo error
    per_cell = log_px - predictive_iwelbo(model, data, "test", n_particles=1000, particle_chunk=500)["iwelbo"]
    assert (per_cell > -0.2).all() and abs(per_cell.mean()) < 0.02


def test_same_seed_same_numbers_and_seeds_differ(linear_gaussian):
    model, data, _ = linear_gaussian
    a = predictive_iwelbo(model, data, "test", n_particles=20, seed=3)
    b = predictive_iwelbo(model, data, "test", n_particles=20, seed=3)
    c = predictive_iwelbo(model, data, "test", n_particles=20, seed=4)
    assert np.array_equal(a["iwelbo"].to_numpy(), b["iwelbo"].to_numpy())
    assert not np.allclose(a["iwelbo"].to_numpy(), c["iwelbo"].to_numpy())
    assert list(a.index) == [f"c{i}" for i in range(60)]


def test_chunking_over_particles_and_batches_gives_the_same_value(tiny_data):
    model = build_model(
        model_config("sams_vae", n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8),
        tiny_data.n_genes,
        tiny_data.n_treatments,
        tiny_data.norm_mean,
        tiny_data.norm_std,
    )
    one = predictive_iwelbo(
        model, tiny_data, "val", n_particles=30, batch_size=1000, particle_chunk=30, seed=1
    )
    many = predictive_iwelbo(model, tiny_data, "val", n_particles=30, batch_size=5, particle_chunk=7, seed=1)
    np.testing.assert_allclose(one["iwelbo"].to_numpy(), many["iwelbo"].to_numpy(), rtol=1e-6, atol=1e-5)
    # the prior-predictive variant scores the globals too: finite, and not the same number
    scored = predictive_iwelbo(
        model,
        tiny_data,
        "val",
        n_particles=30,
        seed=1,
        score_globals=True,
        untrained=torch.zeros(tiny_data.n_treatments, dtype=torch.bool),
    )
    assert np.isfinite(scored["iwelbo"]).all()
    assert not np.allclose(scored["iwelbo"], one["iwelbo"])


def test_iwelbo_over_seeds_reports_the_monte_carlo_spread(linear_gaussian):
    model, data, _ = linear_gaussian
    res = iwelbo_over_seeds(model, data, "test", seeds=(0, 1, 2), n_particles=5)
    assert set(res["per_seed"]) == {0, 1, 2}
    assert res["mean"] == pytest.approx(np.mean(list(res["per_seed"].values())))
    assert res["std"] > 0
    assert res["n_cells"] == 60 and res["n_particles"] == 5
    assert {"iwelbo", "label", "iwelbo_seed0", "iwelbo_seed2"} <= set(res["cells"].columns)


def test_scored_globals_equal_unscored_when_q_equals_the_prior(tiny_data):
    """With q(E) set exactly to the prior N(0, 1), log p(g) - log q(g) = 0 for every draw, so the
    prior-predictive (globals scored) IWELBO must equal the posterior-predictive one, cell by cell."""
    model = build_model(
        model_config("cpa_vae", n_latent=3, decoder_hidden=16, encoder_hidden=16),
        tiny_data.n_genes,
        tiny_data.n_treatments,
        tiny_data.norm_mean,
        tiny_data.norm_std,
        seed=0,
    ).eval()
    with torch.no_grad():
        model.effect.q_E_loc.zero_()
        model.effect.q_E_log_scale.fill_(math.log(1.0 - 1e-4))  # scale = exp(s) + 1e-4 = 1
    kw = dict(n_particles=20, seed=2, untrained=torch.zeros(tiny_data.n_treatments, dtype=torch.bool))
    plain = predictive_iwelbo(model, tiny_data, "val", **kw)
    scored = predictive_iwelbo(model, tiny_data, "val", score_globals=True, **kw)
    np.testing.assert_allclose(scored["iwelbo"], plain["iwelbo"], rtol=0, atol=1e-3)
    with torch.no_grad():
        model.effect.q_E_loc.fill_(0.5)  # q no longer the prior: the scored bound must move
    assert not np.allclose(
        predictive_iwelbo(model, tiny_data, "val", score_globals=True, **kw)["iwelbo"],
        predictive_iwelbo(model, tiny_data, "val", **kw)["iwelbo"],
    )
