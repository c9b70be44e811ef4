"""TrainConfig.validate_args: validation off after a Trainer's first step, the same numbers, restored.

The loss is bit-identical; a few gradient entries (SAMS-VAE's q(M) logits) differ in the last bit (~1e-8)
when torch's distribution argument checks are off (Pyro's own checks change no bit): float rounding of
the same computation, not a different estimator.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer.util import is_validation_enabled

from pyrovae.data.loader import MinibatchLoader
from pyrovae.models.zoo import build_model, model_config
from pyrovae.train.trainer import TrainConfig, Trainer, seed_everything, split_counts

SMALL = dict(n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16, likelihood="nb")


def _trainer(data, name="sams_vae", **train):
    model = build_model(
        model_config(name, **SMALL), data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=0
    )
    cfg = TrainConfig(seed=0, batch_size=64, n_particles=3, lr=5e-3, **train)
    return Trainer(model, data, cfg)


def _steps(data, validate_args, n_steps=4, name="sams_vae"):
    """Losses and gradients of ``n_steps`` steps run as ``fit`` runs them, from one seed."""
    trainer = _trainer(data, name, validate_args=validate_args)
    counts = split_counts(trainer.model, data, "train", "cpu")
    loader = MinibatchLoader(data, "train", 32, shuffle=True, seed=0)
    seed_everything(0)
    out, flags = [], []
    for _, batch in zip(range(n_steps), loader):
        with trainer.step_validation():
            flags.append((is_validation_enabled(), torch.distributions.Distribution._validate_args))
            loss, extras = trainer.train_step(batch, loader.n_cells, counts)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        out.append((loss, {k: float(v) for k, v in extras.items()}, grads))
    return out, flags


@pytest.mark.parametrize("name", ["sams_vae", "cpa_vae", "conditional_vae"])
def test_same_loss_and_gradients_with_and_without_validation(name, tiny_data):
    on, flags_on = _steps(tiny_data, True, name=name)
    off, flags_off = _steps(tiny_data, False, name=name)
    assert flags_on == [(True, True)] * 4
    assert flags_off == [(True, True)] + [(False, False)] * 3  # the first step is still checked
    for (l1, e1, g1), (l2, e2, g2) in zip(on, off):
        assert l1 == l2 and e1 == e2
        assert g1.keys() == g2.keys() and len(g1) > 0
        for k in g1:
            torch.testing.assert_close(g1[k], g2[k], rtol=1e-6, atol=1e-7, msg=k)
    # restored after the steps
    assert is_validation_enabled() and torch.distributions.Distribution._validate_args


def test_fit_same_history_and_parameters(tiny_data):
    runs = []
    for validate_args in (True, False):
        trainer = _trainer(tiny_data, validate_args=validate_args, max_epochs=2, patience=100)
        hist = trainer.fit(progress=False)
        hist = [{k: v for k, v in h.items() if k != "seconds"} for h in hist]
        runs.append((hist, trainer.model.state_dict()))
    (h1, s1), (h2, s2) = runs
    assert [h.keys() for h in h1] == [h.keys() for h in h2] and len(h1) == 2
    for r1, r2 in zip(h1, h2):
        assert r1 == pytest.approx(r2, rel=1e-6)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-6, msg=k)
    assert is_validation_enabled() and torch.distributions.Distribution._validate_args


def test_first_step_still_checks_and_validation_is_restored_on_error(tiny_data):
    trainer = _trainer(tiny_data)
    counts = split_counts(trainer.model, tiny_data, "train", "cpu")
    loader = MinibatchLoader(tiny_data, "train", 64)
    batch = next(iter(loader))
    bad = {**batch, "x": batch["x"] - 0.5}  # not counts: the negative binomial's support check fails
    with pytest.raises(ValueError, match="support"), trainer.step_validation():
        trainer.train_step(bad, loader.n_cells, counts)
    assert is_validation_enabled()
    trainer.step = 1  # a later step of the run (the failed one above did not count)
    with pytest.raises(RuntimeError, match="boom"), trainer.step_validation():  # a later step: checks off
        assert not is_validation_enabled()
        raise RuntimeError("boom")
    assert is_validation_enabled() and torch.distributions.Distribution._validate_args


def test_option_parses_from_text():
    assert TrainConfig(validate_args="true").validate_args is True
    assert TrainConfig().validate_args is False
    assert TrainConfig().replace(validate_args=True).validate_args is True
    pyro.enable_validation(True)
