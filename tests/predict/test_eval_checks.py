"""IWELBO and the model ATE run Pyro's and torch's checks on their first batch / chunk only: same numbers."""

from __future__ import annotations

import numpy as np
import pyro
import pytest

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.prepare import prepare_cradle_data
from pyrovae.models.zoo import build_model, model_config
from pyrovae.predict.iwelbo import predictive_iwelbo
from pyrovae.predict.posterior import Posterior
from pyrovae.simulate import simulate_perturbseq


@pytest.fixture(scope="module")
def model_and_data():
    data = prepare_cradle_data(
        load_perturbation_data(simulate_perturbseq("tiny", seed=1)), qc_key="low_quality"
    )
    cfg = model_config(
        "cradle_vae", n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16
    )
    model = build_model(cfg, data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=0)
    return model.eval(), data


def test_iwelbo_checks_on_the_first_batch_only_give_the_same_numbers(model_and_data):
    model, data = model_and_data
    kw = dict(n_particles=7, batch_size=8, particle_chunk=3, seed=4)
    every = predictive_iwelbo(model, data, "test", validate_args=True, **kw)
    first = predictive_iwelbo(model, data, "test", **kw)
    assert len(every) > 3 * 8  # several batches ran without the checks
    np.testing.assert_array_equal(first["iwelbo"].to_numpy(), every["iwelbo"].to_numpy())
    with pyro.validation_enabled(False):
        none = predictive_iwelbo(model, data, "test", **kw)
    np.testing.assert_array_equal(none["iwelbo"].to_numpy(), every["iwelbo"].to_numpy())


def test_model_ate_checks_on_the_first_chunk_only_give_the_same_numbers(model_and_data):
    model, data = model_and_data
    post = Posterior(model, data.schema())
    perts = list(data.treatments[:3])
    with pyro.validation_enabled(True):
        checked = post.model_ate(perts, n_samples=40, chunk=7, library_size=1e4, seed=2)
    with pyro.validation_enabled(False):
        unchecked = post.model_ate(perts, n_samples=40, chunk=7, library_size=1e4, seed=2)
    np.testing.assert_array_equal(checked.to_numpy(), unchecked.to_numpy())


def test_model_ate_chunk_shrinks_to_its_memory_bound(model_and_data):
    model, data = model_and_data
    post = Posterior(model, data.schema())
    perts = list(data.treatments[:3])
    assert post.chunk_size(256, 4) == 256  # small models: the chunk asked for
    small = post.chunk_size(256, 4, max_mb=0.05)
    assert 1 <= small < 256
    bounded = post.model_ate(perts, n_samples=30, chunk=256, library_size=1e4, seed=3, max_chunk_mb=0.05)
    explicit = post.model_ate(perts, n_samples=30, chunk=small, library_size=1e4, seed=3)
    np.testing.assert_array_equal(bounded.to_numpy(), explicit.to_numpy())


@pytest.mark.parametrize(
    "name", ["sams_vae_reference", "sams_vae", "sams_vae_mf", "conditional_vae", "cpa_vae"]
)
def test_iwelbo_reusing_the_global_parts_gives_the_same_numbers(model_and_data, name):
    _, data = model_and_data
    small = dict(n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)
    model = build_model(
        model_config(name, **small), data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=1
    )
    kw = dict(n_particles=6, batch_size=8, particle_chunk=4, seed=2)
    for score in (False, True):
        old = predictive_iwelbo(model.eval(), data, "test", reuse_globals=False, score_globals=score, **kw)
        new = predictive_iwelbo(model.eval(), data, "test", score_globals=score, **kw)
        np.testing.assert_array_equal(new["iwelbo"].to_numpy(), old["iwelbo"].to_numpy())


def test_iwelbo_reuse_for_cradle_vae(model_and_data):
    model, data = model_and_data
    kw = dict(n_particles=5, batch_size=8, particle_chunk=2, seed=0)
    old = predictive_iwelbo(model, data, "test", reuse_globals=False, **kw)
    np.testing.assert_array_equal(predictive_iwelbo(model, data, "test", **kw)["iwelbo"], old["iwelbo"])
