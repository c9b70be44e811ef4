"""Training: every model trains, losses decrease without NaN, seeding, resuming, safe checkpoints."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pyro
import pytest
import torch

from pyrovae.models.effects import FIXED_MASK_LOGIT
from pyrovae.models.zoo import MODEL_ZOO, build_model, model_config
from pyrovae.runs import load_run, train_run
from pyrovae.train.trainer import TrainConfig, Trainer
from tests.helpers import assert_trains

SMALL = dict(n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)
FAST = dict(max_epochs=12, batch_size=64, lr=5e-3, patience=100)


def _fit(name, data, seed=0, **train):
    model = build_model(
        model_config(name, **SMALL), data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=seed
    )
    hist = Trainer(model, data, TrainConfig(seed=seed, **{**FAST, **train})).fit(progress=False)
    return model, hist


@pytest.mark.parametrize("name", [name for name, spec in MODEL_ZOO.items() if not spec.get("artifact")])
def test_every_model_trains_with_decreasing_loss(name, tiny_data, tiny_data_unique):
    data = tiny_data_unique if name == "svae_plus" else tiny_data
    _, hist = _fit(name, data)
    assert_trains(hist, ("train_loss", "val_loss"))


def test_same_seed_same_numbers(tiny_data):
    _, h1 = _fit("sams_vae", tiny_data, seed=3, max_epochs=3)
    _, h2 = _fit("sams_vae", tiny_data, seed=3, max_epochs=3)
    _, h3 = _fit("sams_vae", tiny_data, seed=4, max_epochs=3)
    assert [h["train_loss"] for h in h1] == [h["train_loss"] for h in h2]
    assert [h["train_loss"] for h in h1] != [h["train_loss"] for h in h3]


def test_mask_lr_moves_only_the_mask_logits_faster(tiny_data):
    def one_step(mask_lr):  # the reference's settings: the mask logits at the network's lr unless set
        model = build_model(
            model_config("sams_vae_reference", **SMALL), tiny_data.n_genes, tiny_data.n_treatments, seed=0
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = Trainer(model, tiny_data, TrainConfig(seed=0, mask_lr=mask_lr, **{**FAST, "max_epochs": 1}))
        lrs = sorted(g["lr"] for g in trainer.optimizer.param_groups)
        trainer.fit(progress=False)
        moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
        return lrs, moved

    lrs_default, moved_default = one_step(None)
    lrs_fast, moved_fast = one_step(0.5)
    assert lrs_default == [FAST["lr"]] * 2 and lrs_fast == [FAST["lr"]] * 2 + [0.5]
    # Adam steps are ~lr in size: the logits move much further, every other parameter as far as before
    assert moved_fast["effect.q_mask_logits"] > 10 * moved_default["effect.q_mask_logits"]
    others = [n for n in moved_default if n != "effect.q_mask_logits"]
    assert max(moved_fast[n] for n in others) < 2 * max(moved_default[n] for n in others)


def test_fix_masks_trains_with_known_masks_only(tiny_data, tmp_path):
    T, K = tiny_data.n_treatments, SMALL["n_latent"]
    masks = (torch.arange(T * K).reshape(T, K) % 3 == 0).float()
    run = train_run(
        tiny_data,
        model_config("sams_vae", **SMALL),
        TrainConfig(**{**FAST, "max_epochs": 2, "mask_lr": 0.5}),
        tmp_path / "fixed",
        progress=False,
        prepare=lambda m: m.effect.fix_masks(masks),
    )
    hist = run.metrics()
    assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)
    # the trained checkpoint keeps the fixed logits (no optimiser step touched them) ...
    expected = torch.where(masks > 0, FIXED_MASK_LOGIT, -FIXED_MASK_LOGIT)
    assert torch.equal(run.model.effect.q_mask_logits.detach(), expected)
    # ... and q(M) draws are the given masks
    assert torch.equal(run.model.sample_globals(20)["mask"], masks.expand(20, T, K))
    model = build_model(model_config("sams_vae", **SMALL), tiny_data.n_genes, T, seed=0)
    with pytest.raises(ValueError, match="shape"):
        model.effect.fix_masks(masks[:, :-1])
    with pytest.raises(ValueError, match="0/1"):
        model.effect.fix_masks(masks * 2)
    cpa = build_model(model_config("cpa_vae", **SMALL), tiny_data.n_genes, T, seed=0)
    with pytest.raises(ValueError, match="no masks"):
        cpa.effect.fix_masks(masks)


def test_early_stopping_stops(tiny_data):
    _, hist = _fit("cpa_vae", tiny_data, max_epochs=200, patience=2, lr=0.05)
    assert len(hist) < 200


def test_run_directory_resume_and_no_overwrite(tiny_data, tmp_path):
    # sams_vae's freeze is a fraction of the run's planned steps, which a resume with more epochs changes:
    # the reference's settings have no such schedule
    cfg = model_config("sams_vae_reference", **SMALL)
    straight = train_run(
        tiny_data, cfg, TrainConfig(**{**FAST, "max_epochs": 4}), tmp_path / "a", progress=False
    )
    train_run(tiny_data, cfg, TrainConfig(**{**FAST, "max_epochs": 2}), tmp_path / "b", progress=False)
    resumed = train_run(
        tiny_data, cfg, TrainConfig(**{**FAST, "max_epochs": 4}), tmp_path / "b", resume=True, progress=False
    )
    a = [h["train_loss"] for h in straight.metrics()]
    b = [h["train_loss"] for h in resumed.metrics()]
    assert len(b) == 4
    assert np.allclose(a, b, rtol=1e-5)  # resuming restores optimiser, epoch and RNG state
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_run(tiny_data, cfg, TrainConfig(**FAST), tmp_path / "a", progress=False)
    assert load_run(tmp_path / "a").model.n_genes == tiny_data.n_genes


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loading_a_checkpoint_never_unpickles_code(tiny_data, tmp_path):
    cfg = model_config("cpa_vae", **SMALL)
    run = train_run(tiny_data, cfg, TrainConfig(**{**FAST, "max_epochs": 1}), tmp_path / "r", progress=False)
    state = torch.load(run.path / "best.pt", weights_only=True)
    state["payload"] = _Evil()
    torch.save(state, run.path / "best.pt")
    with pytest.raises(ValueError, match="refuses to unpickle") as err:
        load_run(run.path)
    assert isinstance(err.value.__context__, pickle.UnpicklingError)  # torch refused it; nothing ran


def test_run_trained_with_a_holdout_reloads_data_with_a_split_column(tmp_path):
    """The run's recorded hold-out made its split; a split column given later replaces it without error."""
    from pyrovae.data.anndata import load_perturbation_data
    from tests.helpers import make_adata

    opts = {"split_mode": "combinations", "heldout": ["A+B"]}
    data = load_perturbation_data(make_adata(), **opts)
    cfg = model_config("cpa_vae", **SMALL)
    run = train_run(
        data, cfg, TrainConfig(**{**FAST, "max_epochs": 1}), tmp_path / "r", data_options=opts, progress=False
    )
    a = make_adata()
    a.obs["split"] = np.where(np.arange(a.n_obs) % 2 == 0, "train", "test")
    again = run.load_data(a, split_key="split")
    np.testing.assert_array_equal(again.split, a.obs["split"].to_numpy())
    assert set(run.load_data(make_adata()).split[data.labels == "A+B"]) == {"test"}


def test_training_on_non_counts_with_count_likelihood_is_refused(tiny_data, tmp_path):
    import dataclasses

    logged = dataclasses.replace(tiny_data, is_count_data=False)
    with pytest.raises(ValueError, match="raw integer counts"):
        train_run(
            logged, model_config("sams_vae", **SMALL), TrainConfig(**FAST), tmp_path / "r", progress=False
        )


@pytest.mark.parametrize("name", ["sams_vae", "sams_vae_mf", "cpa_vae"])
def test_validation_loss_draws_untrained_treatments_from_the_prior(name, tiny_data):
    """A treatment with no training cell is scored with its prior, whatever its (untouched) q holds."""
    from pyrovae.data.prepare import holdout_perturbations
    from pyrovae.train.trainer import evaluate_loss

    data = holdout_perturbations(tiny_data, ["B"])  # every B and A+B cell goes to test: N_B = 0
    assert data.treatment_counts("train")[data.treatments.index("B")] == 0
    model = build_model(
        model_config(name, **SMALL), data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=0
    )

    def loss():
        pyro.set_rng_seed(0)
        return evaluate_loss(model, data, "test", n_particles=2, batch_size=64)

    before = loss()
    b = data.treatments.index("B")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("q_E_loc", "q_mask_logits")):
                p[b] += 5.0  # q of B is moved far away; the prior fallback must ignore it
    assert math.isfinite(before) and loss() == pytest.approx(before, rel=1e-6)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("q_E_loc", "q_mask_logits")):
                p[data.treatments.index("A")] += 5.0  # A is trained: its q matters
    assert loss() != pytest.approx(before, rel=1e-6)


def test_penalised_elbo_equals_the_elbo_plus_a_second_backward_of_the_penalties():
    """PenalisedELBO (one backward) against the two-step version it replaces, same seed, GPO-VAE."""
    from pyrovae.data.anndata import load_perturbation_data
    from pyrovae.data.loader import MinibatchLoader
    from pyrovae.data.prepare import prepare_gpo_data
    from pyrovae.simulate import simulate_perturbseq
    from pyrovae.train.trainer import PenalisedELBO, make_elbo, make_training_elbo, split_counts

    data = load_perturbation_data(simulate_perturbseq("tiny", seed=0))
    data = prepare_gpo_data(data, qc_key="low_quality", seed=0)
    cfg = model_config("gpo_vae", **SMALL)
    for particles in (1, 3):
        out = []
        for two_step in (True, False):
            model = build_model(cfg, data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=0)
            pyro.clear_param_store()
            loader = MinibatchLoader(data, "train", 64, shuffle=True, seed=0)
            batch, n = next(iter(loader)), loader.n_cells
            w = model.global_weights(batch, split_counts(model, data, "train", "cpu"), n, "none")
            pyro.set_rng_seed(1)
            args = (model.model, model.guide, batch, n, w, 1.0 / n)
            if two_step:
                loss = make_elbo(particles).loss_and_grads(*args)
                extras = model.extra_losses(batch)
                sum(extras.values()).backward()
                extras = {k: v.detach() for k, v in extras.items()}
            else:
                elbo = make_training_elbo(model, particles)
                assert isinstance(elbo, PenalisedELBO)
                loss, extras = elbo.loss_terms_and_grads(*args)
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            out.append((loss, extras, grads))
        (loss0, extras0, grads0), (loss1, extras1, grads1) = out
        assert loss0 == loss1
        assert set(extras0) == set(extras1) == {"grn_alignment", "grn_sparsity", "counterfactual_kl"}
        assert all(torch.equal(extras0[k], extras1[k]) for k in extras0)
        assert grads0.keys() == grads1.keys() and len(grads0) == len(list(model.parameters()))
        assert all(torch.equal(grads0[k], grads1[k]) for k in grads0), particles
    # Pyro's interface gives the penalised loss: negative ELBO plus the penalties
    pyro.set_rng_seed(1)
    total = elbo.loss_and_grads(*args)
    assert total == loss1 + sum(float(v) for v in extras1.values())
