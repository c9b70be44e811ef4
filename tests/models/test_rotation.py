"""The sparse rotation of the latent basis (pyrovae.models.rotation, ModelConfig.masks.rotation): the rotation
recovers a planted sparse basis, rotating a model is exact in its means and leaves the ELBO unchanged where
the scales are isotropic, and training rotates once, when the mask freeze ends."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch

from pyrovae.data.loader import MinibatchLoader
from pyrovae.models.rotation import rotate_latent, rotated_scales, sparsest_rotation
from pyrovae.models.zoo import build_model, model_config
from pyrovae.train.trainer import TrainConfig, Trainer, make_elbo, split_counts

K = 4
SMALL = dict(n_latent=K, decoder_hidden=12, encoder_hidden=12, embedding_encoder_hidden=8)
GUIDES = ("correlated", "spike_slab", "mean_field")


def _orthogonal(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _planted(T: int, k: int, seed: int) -> torch.Tensor:
    """(T, k) sparse effects: about a quarter of the entries on, at +-U(1, 2), every row and column used."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(T, k, generator=g) < 0.25
    on[torch.arange(T), torch.arange(T) % k] = True
    size = 1.0 + torch.rand(T, k, generator=g)
    sign = torch.where(torch.rand(T, k, generator=g) < 0.5, -1.0, 1.0)
    return (on * size * sign).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsest_rotation_recovers_a_rotated_sparse_basis(seed):
    """E Q R = E P for a signed permutation P: Q R has one entry of modulus ~1 in every row and column."""
    E = _planted(40, 5, seed)
    Q = _orthogonal(5, 10 + seed)
    R = sparsest_rotation(E @ Q, seed=seed)
    P = Q @ R
    torch.testing.assert_close(R.T @ R, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    assert float(P.abs().max(0).values.min()) > 0.98, P
    assert float((E @ P).abs().sum()) == pytest.approx(float(E.abs().sum()), rel=1e-2)


def test_sparsest_rotation_is_deterministic_and_never_worse_than_the_identity():
    E = _planted(20, 4, 3)
    a, b = sparsest_rotation(E, seed=5), sparsest_rotation(E, seed=5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float((E @ a).abs().sum()) <= float(E.abs().sum()) + 1e-9  # E is already sparse
    torch.testing.assert_close(sparsest_rotation(E, steps=0), torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(T, K\)"):
        sparsest_rotation(torch.zeros(3))


def test_rotated_scales_are_the_marginal_sds():
    s = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
    R = _orthogonal(3, 0)
    cov = R.T @ torch.diag(s[0] ** 2) @ R  # covariance of x @ R
    torch.testing.assert_close(rotated_scales(s, R)[0], cov.diagonal().sqrt())


def _model(tiny_data, guide="correlated", seed=0, **kw):
    cfg = model_config("sams_vae", guide=guide, **{**SMALL, **kw})
    m = build_model(
        cfg, tiny_data.n_genes, tiny_data.n_treatments, tiny_data.norm_mean, tiny_data.norm_std, seed=0
    )
    with torch.no_grad():  # away from the initialisation, so that every block matters
        g = torch.Generator().manual_seed(seed)
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def _means(m, batch):
    """Decoder mean, encoder (loc, scale) and effects at the guide's mean effects with every mask on."""
    with torch.no_grad():
        E = m.effect.mean_effects()
        g = {"E": E, "mask": torch.ones_like(E)}
        loc, sd = m.encoder_dist(batch["x"], batch, g)
        return m.decoder_dist(loc, batch, g).mean, loc, sd, E


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("layers", [1, 0])
def test_rotate_latent_is_exact_in_the_means(guide, layers, tiny_data):
    """z' = z R: q(z | x)'s mean and the mean effects rotate exactly (through the x_shift encoder input),
    and the decoder's mean at the rotated latents is unchanged; for 1-layer and linear networks."""
    m = _model(tiny_data, guide, encoder_layers=layers, decoder_layers=layers)
    m.eval()
    batch = MinibatchLoader(tiny_data, "train", 64).batch(tiny_data.indices("train")[:64])
    before = _means(m, batch)
    free_scale = guide in ("spike_slab", "mean_field")
    sd_E = m.effect.q_E_log_scale.detach().exp() + 1e-4 if free_scale else None
    R = _orthogonal(K, 1)
    changed = rotate_latent(m, R)
    after = _means(m, batch)
    Rf = R.float()
    if free_scale:  # q(E)'s free scales keep the rotated marginal sds
        got = m.effect.q_E_log_scale.detach().exp() + 1e-4
        torch.testing.assert_close(got, rotated_scales(sd_E, Rf), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(after[0], before[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after[1], before[1] @ Rf, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after[3], before[3] @ Rf, rtol=1e-4, atol=1e-5)
    assert {id(p) for p in changed} <= {id(p) for p in m.parameters()}
    assert id(m.encoder.loc.weight) in {id(p) for p in changed}


def test_rotate_latent_keeps_the_elbo_where_the_scales_are_isotropic(tiny_data):
    """With equal variances in every latent direction (q(z | x) and q(E)), the rotated guide is the same
    distribution in the new basis, so the ELBO's expectation is unchanged (spike-slab guide, masks on)."""
    m = _model(tiny_data, "spike_slab")
    m.effect.fix_masks(torch.ones(tiny_data.n_treatments, K))
    with torch.no_grad():
        m.encoder.log_var.weight.zero_()
        m.encoder.log_var.bias.fill_(-1.0)
        m.effect.q_E_log_scale.copy_(
            torch.linspace(-2, 0, tiny_data.n_treatments).unsqueeze(-1).expand(-1, K)
        )
    batch = MinibatchLoader(tiny_data, "train", 64).batch(tiny_data.indices("train")[:64])
    n = len(tiny_data.indices("train"))
    w = m.global_weights(batch, split_counts(m, tiny_data, "train", "cpu"), n, "per_treatment")
    elbo = make_elbo(50)

    def losses(seed0):
        out = []
        for r in range(40):
            pyro.set_rng_seed(seed0 + r)
            out.append(elbo.loss(m.model, m.guide, batch, n, w, 1.0 / n))
        return np.array(out)

    a = losses(0)
    rotate_latent(m, _orthogonal(K, 2))
    b = losses(1000)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se + 1e-6, (a.mean(), b.mean(), se)


def test_rotate_latent_rejects_what_it_cannot_rotate(tiny_data):
    m = _model(tiny_data)
    with pytest.raises(ValueError, match="orthogonal"):
        rotate_latent(m, 2 * torch.eye(K))
    with pytest.raises(ValueError, match=r"\(K, K\)"):
        rotate_latent(m, torch.eye(K + 1))
    gpo = build_model(model_config("gpo_vae", **SMALL), tiny_data.n_genes, tiny_data.n_treatments, seed=0)
    with pytest.raises(ValueError, match="additive"):
        rotate_latent(gpo, torch.eye(K))


def test_mask_rotation_needs_a_freeze_and_a_sams_family():
    with pytest.raises(ValueError, match="mask_freeze_steps > 0"):
        model_config("sams_vae_reference", mask_rotation=True)
    with pytest.raises(ValueError, match="SAMS-VAE family"):
        model_config("cpa_vae", mask_rotation=True, mask_freeze_steps=5)
    assert model_config("sams_vae_reference", mask_rotation=True, mask_freeze_steps=5).masks.rotation


def test_training_rotates_once_when_the_freeze_ends(tiny_data, monkeypatch):
    """The Trainer rotates after step mask_freeze_steps (not before, not again), restarts the Adam moments
    of the changed parameters, keeps the model's predictions (the means) and trains on."""
    freeze = 3
    cfg = model_config(
        "sams_vae_reference", mask_init_logits=3.0, mask_freeze_steps=freeze, mask_rotation=True, **SMALL
    )
    model = build_model(cfg, tiny_data.n_genes, tiny_data.n_treatments, seed=0)
    trainer = Trainer(
        model, tiny_data, TrainConfig(seed=0, max_epochs=6, batch_size=16, lr=5e-3, n_particles=2)
    )
    (hook,) = trainer.hooks  # the model's rotation step (pyrovae.models.rotation.SparseRotationStep)
    real, calls = (lambda: type(hook).rotate(hook, trainer)), []
    batch = MinibatchLoader(tiny_data, "train", 64).batch(tiny_data.indices("train")[:64])

    def spy():
        model.eval()
        before = _means(model, batch)
        R = real()
        after = _means(model, batch)
        model.train()
        calls.append(trainer.step)
        torch.testing.assert_close(after[0], before[0], rtol=1e-4, atol=1e-5)
        assert not trainer.optimizer.state[model.encoder.loc.weight]  # its moments restart
        assert trainer.optimizer.state[model.decoder.trunk.layers[0].bias]  # an unrotated one keeps them
        return R

    monkeypatch.setattr(hook, "rotate", lambda tr: spy())
    hist = trainer.fit(progress=False)
    assert calls == [freeze]
    assert trainer.step > freeze + 5 and all(math.isfinite(h["train_loss"]) for h in hist)


@pytest.mark.parametrize("name", ["sams_vae", "sams_vae_beta_bernoulli", "sams_vae_learned_sparsity"])
@pytest.mark.parametrize("guide", ["correlated", "spike_slab"])
def test_every_rotatable_family_trains_through_the_rotation(name, guide, tiny_data, monkeypatch):
    cfg = model_config(
        name,
        guide=guide,
        mask_init_logits=3.0,
        mask_freeze_fraction=0,
        mask_freeze_steps=2,
        mask_rotation=True,
        **SMALL,
    )
    model = build_model(cfg, tiny_data.n_genes, tiny_data.n_treatments, seed=0)
    trainer = Trainer(model, tiny_data, TrainConfig(seed=0, max_epochs=2, batch_size=32, n_particles=2))
    (hook,) = trainer.hooks
    real, calls = hook.rotate, []
    monkeypatch.setattr(hook, "rotate", lambda tr: calls.append(tr.step) or real(tr))
    hist = trainer.fit(progress=False)
    assert calls == [2] and all(math.isfinite(h["train_loss"]) for h in hist)


def test_the_freeze_fraction_is_a_fraction_of_the_runs_steps(tiny_data, monkeypatch):
    """sams_vae's freeze (mask_freeze_fraction 0.25) is resolved by the Trainer against max_epochs x batches
    per epoch (at most max_steps): the q(M) logits stay at their start until then, the rotation comes then."""
    model = build_model(model_config("sams_vae", **SMALL), tiny_data.n_genes, tiny_data.n_treatments, seed=0)
    trainer = Trainer(model, tiny_data, TrainConfig(seed=0, max_epochs=3, batch_size=16, n_particles=2))
    per_epoch = len(MinibatchLoader(tiny_data, "train", 16))
    start = model.effect.q_mask_logits.detach().clone()
    (hook,) = trainer.hooks
    real, calls = hook.rotate, []

    def spy(tr):
        torch.testing.assert_close(model.effect.q_mask_logits.detach(), start, rtol=0, atol=0)
        calls.append(tr.step)
        return real(tr)

    monkeypatch.setattr(hook, "rotate", spy)
    trainer.fit(progress=False)
    freeze = max(1, int(0.25 * 3 * per_epoch))
    assert model.effect.mask_freeze_steps == freeze and calls == [freeze]
    assert not torch.equal(model.effect.q_mask_logits.detach(), start)  # trained after the freeze
    model.effect.start_training(1000)  # resolved once: a resumed (longer) run keeps its freeze
    assert model.effect.mask_freeze_steps == freeze
    fresh = build_model(model_config("sams_vae", **SMALL), tiny_data.n_genes, tiny_data.n_treatments)
    capped = Trainer(fresh, tiny_data, TrainConfig(max_epochs=50, max_steps=8, batch_size=16))
    assert capped.planned_steps(per_epoch) == 8
    fresh.effect.start_training(capped.planned_steps(per_epoch))
    assert fresh.effect.mask_freeze_steps == 2


def test_freeze_steps_and_fraction_exclude_each_other():
    with pytest.raises(ValueError, match="not both"):
        model_config("sams_vae", mask_freeze_steps=5)
    assert model_config("sams_vae", mask_freeze_fraction=0, mask_freeze_steps=5).masks.freeze_steps == 5
    with pytest.raises(ValueError, match="mask_freeze_fraction"):
        model_config("sams_vae", mask_freeze_fraction=1.0)


def test_a_resumed_run_keeps_an_ended_freeze_and_follows_the_new_plan_before_its_end():
    eff = build_model(model_config("sams_vae", **SMALL), 6, 4, seed=0).effect
    eff.start_training(100)
    assert eff.mask_freeze_steps == 25
    eff.mask_step.fill_(10)  # resumed at step 10 with twice the epochs: the freeze has not ended
    eff.start_training(200)
    assert eff.mask_freeze_steps == 50
    eff.mask_step.fill_(60)  # resumed after the freeze (and its rotation): kept
    eff.start_training(400)
    assert eff.mask_freeze_steps == 50
    short = build_model(model_config("sams_vae", **SMALL), 6, 4, seed=0).effect
    short.start_training(100)
    short.mask_step.fill_(20)  # resumed with a shorter plan whose freeze would already be over
    short.start_training(40)
    assert short.mask_freeze_steps == 21  # it ends at the next step, so the rotation still happens


@pytest.mark.parametrize(
    "name, reference, guide",
    [
        ("sams_vae", "sams_vae_reference", "spike_slab"),
        ("sams_vae_mf", "sams_vae_mf_reference", "mean_field"),
        ("sams_vae_beta_bernoulli", "sams_vae_beta_bernoulli_reference", "spike_slab"),
        ("cradle_vae", "cradle_vae_reference", "spike_slab"),
    ],
)
def test_zoo_defaults_use_the_measured_inference_and_keep_the_reference(name, reference, guide):
    """The default of each SAMS-VAE variant masks on, frozen for a quarter of the steps, rotated, at mask lr
    0.02 (docs/models/sams_vae.md has the measurements); its ``*_reference`` is the reference's settings;
    nothing else differs (the same model)."""
    cfg, ref = model_config(name), model_config(reference)
    assert (cfg.guide, cfg.masks.init_logits, cfg.masks.freeze_fraction) == (guide, 3.0, 0.25)
    assert cfg.masks.rotation and cfg.masks.lr == 0.02
    assert (ref.masks.init_logits, ref.masks.freeze_fraction, ref.masks.rotation, ref.masks.lr) == (
        0,
        0,
        False,
        None,
    )
    assert ref.guide == ("mean_field" if name == "sams_vae_mf" else "correlated")
    inference = {"guide", "mask_init_logits", "mask_freeze_fraction", "mask_rotation", "mask_lr"}
    same = {k: v for k, v in cfg.to_dict().items() if k not in inference}
    assert same == {k: v for k, v in ref.to_dict().items() if k not in inference}
