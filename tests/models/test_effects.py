"""Effect-block hooks: mask probabilities and optimiser parameter groups (network / variational / masks)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from pyrovae.models.zoo import MODEL_ZOO, build_model, model_config
from pyrovae.train.optim import model_param_groups
from pyrovae.train.trainer import TrainConfig, Trainer
from tests.helpers import assert_trains

SMALL = dict(n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8)
ZOO = tuple(MODEL_ZOO)


def _groups_by_name(model, cfg):
    """The optimiser groups as pyrovae made them before the hooks: parameters sorted by their names (the
    leaf ``q_mask_logits`` gets the training's mask_lr, else the model's; leaves starting ``q_`` or
    ``action_mean`` get no weight decay)."""
    mask_lr = cfg.mask_lr if cfg.mask_lr is not None else model.effect.mask_lr
    decay, no_decay, masks = [], [], []
    for name, p in model.named_parameters():
        leaf = name.split(".")[-1]
        if leaf in ("q_mask_logits", "q_sparsity_logits") and mask_lr is not None:
            masks.append(p)
        else:
            (no_decay if leaf.startswith(("q_", "action_mean")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if masks:
        groups.append({"params": masks, "weight_decay": 0.0, "lr": mask_lr})
    return groups


def _same_groups(a, b):
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        assert {k: v for k, v in ga.items() if k != "params"} == {
            k: v for k, v in gb.items() if k != "params"
        }
        assert [id(p) for p in ga["params"]] == [id(p) for p in gb["params"]]  # same tensors, same order


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("mask_lr", [None, 0.05])
def test_param_groups_are_the_name_sorted_groups(name, mask_lr):
    model = build_model(model_config(name, **SMALL), 6, 4, seed=0)
    cfg = TrainConfig(weight_decay=1e-3, mask_lr=mask_lr)
    _same_groups(model_param_groups(model, cfg), _groups_by_name(model, cfg))


@pytest.mark.parametrize(
    ("name", "train_mask_lr", "expected"),
    [
        ("sams_vae", None, 0.02),  # the model's own (ModelConfig.masks.lr)
        ("sams_vae", 0.1, 0.1),  # the training setting overrides it
        ("sams_vae_reference", None, None),  # the reference: the network's step, no own group
        ("sams_vae_reference", 0.1, 0.1),
    ],
)
def test_the_mask_step_size_is_the_trainings_else_the_models(name, train_mask_lr, expected):
    model = build_model(model_config(name, **SMALL), 6, 4, seed=0)
    groups = model_param_groups(model, TrainConfig(lr=1e-3, mask_lr=train_mask_lr))
    masks = [g for g in groups if "lr" in g]
    assert [g["lr"] for g in masks] == ([] if expected is None else [expected])
    if expected is not None:
        assert [id(p) for p in masks[0]["params"]] == [id(model.effect.q_mask_logits)]


def test_trainer_optimises_the_model_groups(tiny_data):
    model = build_model(model_config("gpo_vae", **SMALL), tiny_data.n_genes, tiny_data.n_treatments, seed=0)
    cfg = TrainConfig(weight_decay=1e-3, mask_lr=0.05, lr=1e-3)
    opt = Trainer(model, tiny_data, cfg).optimizer
    expected = _groups_by_name(model, cfg)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in expected
    ]
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (1e-3, 1e-3),
        (1e-3, 0.0),
        (0.05, 0.0),
    ]


def test_param_groups_with_fixed_masks_leave_the_fixed_logits_out():
    model = build_model(model_config("sams_vae", **SMALL), 6, 4, seed=0)
    model.effect.fix_masks((torch.arange(12).reshape(4, 3) % 2 == 0).float())
    cfg = TrainConfig(mask_lr=0.5)
    groups = model_param_groups(model, cfg)
    _same_groups(groups, _groups_by_name(model, cfg))
    assert len(groups) == 2 and model.effect.param_roles()["mask_logits"] == []


def test_block_roles_cover_each_parameter_once():
    for name in ZOO:
        model = build_model(model_config(name, **SMALL), 6, 4, seed=0)
        for block in (model.effect, model.artifact):
            if block is None:
                continue
            roles = block.param_roles()
            ids = [id(p) for ps in roles.values() for p in ps]
            assert sorted(ids) == sorted(id(p) for p in block.parameters()), name


@pytest.mark.parametrize("name", ZOO)
def test_mask_probs_are_the_guides_mask_probabilities(name):
    model = build_model(model_config(name, **SMALL), 6, 4, seed=0)
    probs = model.effect.mask_probs()
    site = poutine.trace(model.draw_globals).get_trace().nodes.get("mask")
    if site is None:
        assert probs is None
        return
    fn = site["fn"]
    expected = (fn.base_dist if hasattr(fn, "base_dist") else fn).probs
    assert probs.shape == expected.shape and not probs.requires_grad
    torch.testing.assert_close(probs, expected.detach(), atol=1e-6, rtol=0)


def _e_sites(model, P, seed=1):
    pyro.set_rng_seed(seed)
    with pyro.plate("particles", P, dim=-2):
        return poutine.trace(model.draw_globals).get_trace().nodes


@pytest.mark.parametrize("guide", ["spike_slab"])
def test_free_slab_guide_trains(guide, tiny_data):
    cfg = model_config("sams_vae", guide=guide, **SMALL)
    model = build_model(cfg, tiny_data.n_genes, tiny_data.n_treatments, seed=0)
    hist = Trainer(
        model, tiny_data, TrainConfig(seed=0, max_epochs=10, batch_size=64, lr=5e-3, n_particles=3)
    ).fit(progress=False)
    assert_trains(hist)
    assert float(model.effect.q_E_loc.detach().abs().max()) > 1e-3  # the slab's mean moved


def test_unknown_guide_is_one_clear_error():
    with pytest.raises(ValueError, match="guide"):
        model_config("sams_vae", guide="amortised")


def test_spike_slab_guide_is_the_stated_mixture_under_particles(tiny_data):
    """guide=spike_slab: q(e_tk | m_tk) = Normal(a, exp(b) + 1e-4) where m = 1, the prior N(0, s_p^2) where
    m = 0; shapes (P, T, K) under the particles and perturbations plates; a, b variational; no network.
    While training, the value at m = 0 is the slab draw, and log p(e) - log q(e | m) is exactly 0 there
    (so the value does not enter the ELBO); at prediction it is an exact draw from the prior."""
    P, T, K = 6, tiny_data.n_treatments, SMALL["n_latent"]
    cfg = model_config("sams_vae", guide="spike_slab", embedding_prior_scale=2.0, **SMALL)
    model = build_model(cfg, tiny_data.n_genes, T, seed=0)
    eff = model.effect
    assert not hasattr(eff, "q_E_net")
    roles = eff.param_roles()
    assert {id(p) for p in roles["variational"]} == {id(eff.q_E_loc), id(eff.q_E_log_scale)}
    with torch.no_grad():
        eff.q_E_loc.fill_(10.0)
        eff.q_E_log_scale.fill_(math.log(0.01))
    nodes = _e_sites(model, P)
    m, e, fn = nodes["mask"]["value"], nodes["E"]["value"], nodes["E"]["fn"]
    assert m.shape == e.shape == (P, T, K) and fn.batch_shape == (P, T) and fn.event_shape == (K,)
    assert bool((m == 0).any()) and bool((m == 1).any())
    slab = torch.distributions.Normal(eff.q_E_loc, eff.q_E_log_scale.exp() + 1e-4).log_prob(e)
    prior = torch.distributions.Normal(0.0, 2.0).log_prob(e)
    torch.testing.assert_close(fn.log_prob(e), (m * slab + (1 - m) * prior).sum(-1))
    assert float((e.detach() - 10.0).abs().max()) < 0.1  # training value: the slab draw everywhere
    with pyro.plate("particles", P, dim=-2):
        p_e = poutine.trace(model.effect.model_globals).get_trace(None).nodes["E"]["fn"]
    ratio = (p_e.base_dist.log_prob(e) - (m * slab + (1 - m) * prior)).detach()
    assert float(ratio[m == 0].abs().max()) == 0.0
    with torch.no_grad():
        pred = _e_sites(model, 4000)
    m, e = pred["mask"]["value"], pred["E"]["value"]
    assert float((e[m == 1] - 10.0).abs().max()) < 0.1
    off = e[m == 0]
    assert off.numel() > 1000 and abs(float(off.mean())) < 0.15 and abs(float(off.std()) - 2.0) < 0.1
