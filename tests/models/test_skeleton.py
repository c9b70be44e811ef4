"""Shapes, closed-form ELBO terms, minibatch scaling and the mask log-density of the shared skeleton."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyrovae.data.loader import MinibatchLoader
from pyrovae.models.distributions import StraightThroughBernoulli
from pyrovae.models.zoo import MODEL_ZOO, build_model, model_config
from pyrovae.train.trainer import make_elbo, split_counts

SMALL = dict(n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8)
#: every named model without the artifact block (CRADLE-VAE and GPO-VAE need QC data)
FAMILIES = [name for name, spec in MODEL_ZOO.items() if not spec.get("artifact")]


def _build(name, data, **kw):
    return build_model(
        model_config(name, **{**SMALL, **kw}), data.n_genes, data.n_treatments, data.norm_mean, data.norm_std
    )


def _data_for(name, tiny_data, tiny_data_unique):
    return tiny_data_unique if name == "svae_plus" else tiny_data


def _batch(data, n=7):
    return MinibatchLoader(data, "train", batch_size=n).batch(np.arange(n))


@pytest.mark.parametrize("name", FAMILIES)
def test_site_shapes_under_particles_and_plates(name, tiny_data, tiny_data_unique):
    data = _data_for(name, tiny_data, tiny_data_unique)
    model = _build(name, data)
    batch = _batch(data)
    P, B, T, K, G = 4, 7, data.n_treatments, 3, data.n_genes
    n = len(data.indices("train"))
    with pyro.plate("particles", P, dim=-2):
        gtr = poutine.trace(model.guide).get_trace(batch, n)
        mtr = poutine.trace(poutine.replay(model.model, trace=gtr)).get_trace(batch, n)
    assert gtr.nodes["z_basal"]["value"].shape == (P, B, K)
    assert mtr.nodes["x"]["fn"].batch_shape == (P, B)
    assert mtr.nodes["x"]["fn"].event_shape == (G,)
    for site in model.global_site_names():
        # one value per row and latent dimension; the learned sparsity level is one per row
        assert gtr.nodes[site]["value"].shape == ((P, T) if site == "mask_sparsity" else (P, T, K))
    # plates: the cells plate is subsampled to the batch and scaled by N / B
    assert mtr.nodes["cells"]["value"].shape == (B,)
    mtr.compute_log_prob()
    assert mtr.nodes["x"]["log_prob"].shape == (P, B)
    assert mtr.nodes["x"]["scale"] == pytest.approx(n / B)


def test_vectorised_elbo_runs_for_every_zoo_model(tiny_data, tiny_data_unique):
    for name in MODEL_ZOO:
        if MODEL_ZOO[name].get("artifact"):
            continue  # GPO-VAE, CRADLE-VAE: need QC/pairing extras; tested in tests/models/test_gpo_model.py
        data = _data_for(name, tiny_data, tiny_data_unique)
        model = _build(name, data)
        batch = _batch(data)
        n = len(data.indices("train"))
        w = model.global_weights(batch, split_counts(model, data, "train", "cpu"), n, "per_treatment")
        loss = make_elbo(5).loss(model.model, model.guide, batch, n, w, 1.0 / n)
        assert math.isfinite(loss)


def test_straight_through_mask_scores_hard_value_under_bernoulli():
    logits = torch.tensor([-2.0, 0.0, 1.5], requires_grad=True)
    q = StraightThroughBernoulli(torch.tensor(1.0), logits=logits)
    m = q.rsample((20000,))
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    # hard samples are exact Bernoulli(sigmoid(logits)) draws
    assert torch.allclose(m.mean(0), torch.sigmoid(logits).detach(), atol=0.02)
    value = torch.tensor([1.0, 0.0, 1.0])
    expected = dist.Bernoulli(logits=logits).log_prob(value)
    assert torch.allclose(q.log_prob(value), expected)
    # Pyro's parent class scores the relaxed value under the Concrete density: different numbers
    parent = dist.RelaxedBernoulliStraightThrough(torch.tensor(1.0), logits=logits)
    assert not torch.allclose(parent.log_prob(value.clamp(1e-3, 1 - 1e-3)), expected)
    # the straight-through gradient reaches the logits
    m[:, 0].sum().backward()
    assert logits.grad is not None and logits.grad[0] != 0
    assert torch.equal(q.mode, torch.tensor([0.0, 0.0, 1.0]))


def test_global_weights_per_treatment_by_hand(tiny_data):
    model = _build("sams_vae", tiny_data)
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    counts = {"perturbations": torch.tensor([4.0, 0.0])}
    w = model.global_weights({"d": d}, counts, n_cells=12, mode="per_treatment")["perturbations"]
    # w_t = (N / B) * n_t(batch) / N_t; N_t = 0 -> 0
    assert torch.allclose(w, torch.tensor([12 / 3 * 2 / 4, 0.0]))
    w = model.global_weights({"d": d}, counts, n_cells=12, mode="standard")["perturbations"]
    assert torch.allclose(w, torch.ones(2))


def _integrand(model, batch, n, weights, values):
    """Single-sample ELBO integrand log p - log q (with all scales) at fixed latent values."""
    cond = dict(values)
    cond["z_basal"] = values["z_basal"][batch["idx"]]
    gtr = poutine.trace(poutine.condition(model.guide, data=cond)).get_trace(batch, n, weights)
    mtr = poutine.trace(poutine.condition(model.model, data=cond)).get_trace(batch, n, weights)
    return float((mtr.log_prob_sum() - gtr.log_prob_sum()).detach())


@pytest.mark.parametrize("scaling", ["per_treatment", "standard"])
@pytest.mark.parametrize(
    "name", ["sams_vae", "sams_vae_beta_bernoulli", "sams_vae_learned_sparsity", "cpa_vae", "svae_plus"]
)
def test_minibatch_objective_is_unbiased(name, scaling, tiny_data, tiny_data_unique):
    """The average of the minibatch objective over all size-B subsets equals the full-data objective."""
    data = _data_for(name, tiny_data, tiny_data_unique)
    model = _build(name, data)
    rows = data.indices("train")[:6]
    # make sure the toy split uses several treatments
    loader = MinibatchLoader(data, indices=rows, batch_size=6)
    n, B = len(rows), 3
    counts = {"perturbations": torch.as_tensor((data.dosage_rows(rows) != 0).sum(0), dtype=torch.float32)}
    torch.manual_seed(0)
    values = {k: v.detach() for k, v in model.draw_globals().items()}
    values["z_basal"] = torch.randn(n, 3)
    full_batch = loader.batch(np.arange(n))
    full = _integrand(model, full_batch, n, model.global_weights(full_batch, counts, n, scaling), values)
    subsets = list(itertools.combinations(range(n), B))
    avg = np.mean(
        [
            _integrand(model, b, n, model.global_weights(b, counts, n, scaling), values)
            for b in (loader.batch(np.array(s)) for s in subsets)
        ]
    )
    assert avg == pytest.approx(full, rel=1e-5, abs=1e-3)


def _full_objective_by_hand(model, batch, counts, values) -> float:
    """log p - log q over *all* cells with unscaled traces: each cell's local terms once, each global row
    with N_t > 0 once, rows with N_t = 0 left out; written independently of ``global_weights``."""
    cond = dict(values)
    gtr = poutine.trace(poutine.condition(model.guide, data=cond)).get_trace(batch)
    mtr = poutine.trace(poutine.condition(model.model, data=cond)).get_trace(batch)
    trained = counts["perturbations"] > 0
    total = 0.0
    for tr, sign in ((mtr, 1.0), (gtr, -1.0)):
        tr.compute_log_prob()
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or name.startswith("_") or site_is_subsample(site):
                continue
            lp = site["log_prob"]
            plates = {f.name for f in site["cond_indep_stack"]}
            if "perturbations" in plates:
                lp = lp[trained]
            total += sign * float(lp.detach().sum())
    return total


def _randomise_variational(model) -> None:
    """Move every q parameter away from its prior-matching initialisation, so global terms are non-zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("q_") or "q_E_net" in name:
                p.add_(0.7 * torch.randn_like(p))


@pytest.mark.parametrize(
    "name",
    [n for n in FAMILIES if n != "conditional_vae"],
)
def test_minibatch_objective_matches_independent_full_data_elbo(name, tiny_data, tiny_data_unique):
    """Average of the per_treatment-scaled minibatch integrand over every size-B subset == the full-data
    integrand computed by hand (cells once, trained global rows once), with non-trivial globals."""
    data = _data_for(name, tiny_data, tiny_data_unique)
    model = _build(name, data)
    torch.manual_seed(1)
    _randomise_variational(model)
    # 7 cells: controls, A, B (and A+B); N_t counts only these cells
    rows = data.indices("train")[:7]
    loader = MinibatchLoader(data, indices=rows, batch_size=7)
    n, B = len(rows), 3
    counts = {"perturbations": torch.as_tensor((data.dosage_rows(rows) != 0).sum(0), dtype=torch.float32)}
    values = {k: v.detach() for k, v in model.draw_globals().items()}
    values["z_basal"] = torch.randn(n, 3)
    full_batch = loader.batch(np.arange(n))
    full = _full_objective_by_hand(model, full_batch, counts, values)
    glob = _full_objective_by_hand(model, full_batch, counts, values) - _full_objective_by_hand(
        model, full_batch, {"perturbations": torch.zeros_like(counts["perturbations"])}, values
    )
    assert abs(glob) > 0.05  # the global terms really enter the comparison (>> the tolerance)
    subsets = list(itertools.combinations(range(n), B))
    avg = np.mean(
        [
            _integrand(model, b, n, model.global_weights(b, counts, n, "per_treatment"), values)
            for b in (loader.batch(np.array(s)) for s in subsets)
        ]
    )
    assert avg == pytest.approx(full, rel=1e-5, abs=1e-3)


def _normal_logpdf_expect(x, mean, var_u, w, sigma):
    """E log N(x; W u + b, sigma^2) for u ~ N(mean_u, diag(var_u)): closed form."""
    resid = x - mean
    spread = (w**2 * var_u.unsqueeze(-2)).sum(-1)
    return (-0.5 * torch.log(2 * math.pi * sigma**2) - (resid**2 + spread) / (2 * sigma**2)).sum(-1)


def _kl_normal(loc, scale, prior_scale=1.0):
    return (torch.log(prior_scale / scale) + (scale**2 + loc**2) / (2 * prior_scale**2) - 0.5).sum(-1)


def test_elbo_matches_closed_form_linear_gaussian(tiny_data):
    """CPA-VAE with a linear decoder and Normal likelihood: the MC ELBO equals its closed form."""
    torch.manual_seed(1)
    data = tiny_data
    model = build_model(
        model_config(
            "cpa_vae", n_latent=2, likelihood="normal", decoder_layers=0, conditioning="x", encoder_hidden=4
        ),
        data.n_genes,
        data.n_treatments,
        data.norm_mean,
        data.norm_std,
        norm_log=True,
    )
    with torch.no_grad():
        model.effect.q_E_loc.copy_(torch.randn(data.n_treatments, 2))
        model.effect.q_E_log_scale.fill_(-0.5)
        model.decoder.log_scale.fill_(math.log(3.0))
    rows = data.indices("train")[:10]
    batch = MinibatchLoader(data, indices=rows, batch_size=10).batch(np.arange(10))
    n = 10
    counts = {"perturbations": torch.as_tensor((data.dosage_rows(rows) != 0).sum(0), dtype=torch.float32)}
    w = model.global_weights(batch, counts, n, "per_treatment")
    elbo = make_elbo(20000)
    with torch.no_grad():
        mc = -elbo.loss(model.model, model.guide, batch, n, w, 1.0)
        # closed form
        loc, scale = model.encoder_dist(batch["x"], batch, {})
        e_loc = model.effect.q_E_loc
        e_scale = model.effect.q_E_log_scale.exp() + 1e-4
        d = batch["d"]
        mean_u = loc + d @ e_loc
        var_u = scale**2 + (d**2) @ (e_scale**2)
        W, b = model.decoder.head.weight, model.decoder.head.bias
        sigma = model.decoder.log_scale.exp()
        rec = _normal_logpdf_expect(batch["x"], mean_u @ W.T + b, var_u, W, sigma).sum()
        kl_z = _kl_normal(loc, scale).sum()
        used = counts["perturbations"] > 0
        kl_e = _kl_normal(e_loc, e_scale)[used].sum()
        exact = float(rec - kl_z - kl_e)
    assert mc == pytest.approx(exact, rel=2e-3)


def test_untrained_treatments_fall_back_to_prior(tiny_data):
    model = _build("sams_vae_mf", tiny_data)
    with torch.no_grad():
        model.effect.q_mask_logits.fill_(8.0)  # q says "all masks on"
        model.effect.q_E_loc.fill_(5.0)
    untrained = torch.tensor([False, True])
    g = model.sample_globals(2000, untrained=untrained)
    assert g["mask"].shape == (2000, 2, 3)
    assert g["mask"][:, 0].mean() > 0.99  # trained row: from q
    assert g["mask"][:, 1].mean() < 0.05  # untrained row: prior probability 0.01
    assert abs(float(g["E"][:, 1].mean())) < 0.1 and float(g["E"][:, 0].mean()) > 4.5


def test_svae_plus_untrained_treatment_gets_no_shift_not_its_init(tiny_data_unique):
    model = _build("svae_plus", tiny_data_unique)
    T = tiny_data_unique.n_treatments
    with torch.no_grad():
        model.effect.q_mask_prob_logits.fill_(20.0)  # q says "all masks on" (pi clamped at 1 - 1e-6)
    torch.manual_seed(0)
    assert bool((model.effect.action_mean != 0).all())  # the random initialisation
    untrained = torch.zeros(T, dtype=torch.bool)
    untrained[0] = True
    g = model.sample_globals(50, untrained=untrained)
    rows = model.effect.effect_rows(g)
    # mu_t has no prior: the untrained row shifts nothing (the control's prior), trained rows use q
    assert torch.equal(rows[:, 0], torch.zeros_like(rows[:, 0]))
    assert torch.allclose(rows[:, 1:], model.effect.action_mean[1:].detach().expand(50, T - 1, 3))
    d = torch.eye(T)[:1]
    assert torch.equal(model.effect.prior_loc(d, g), torch.zeros(50, 1, 3))


def test_svae_plus_rejects_combinations(tiny_data):
    model = _build("svae_plus", tiny_data)
    d = torch.as_tensor(tiny_data.dosage.toarray())
    assert d.sum(-1).max() == 2  # the fixture has "A+B" cells
    with pytest.raises(ValueError, match="encode_combos_as_unique=True"):
        model.effect.check_dosage(d)


def test_unknown_model_and_option_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        model_config("nope")
    with pytest.raises(ValueError, match="unknown model option"):
        model_config("sams_vae", n_latnet=3)
    with pytest.raises(ValueError, match="option likelihood must be one of"):
        build_model(model_config("sams_vae", likelihood="zinb"), 5, 2)
