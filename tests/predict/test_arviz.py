"""ArviZ export on both APIs: the installed ArviZ (0.x on Python 3.11) and ArviZ 1.x's ``from_dict``
(``arviz_base.from_dict``, which ArviZ 1.x re-exports; ``arviz_base`` 0.8 installs on Python 3.11 and has
the same ``from_dict`` as ArviZ 1.3's)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from pyrovae.models.zoo import build_model, model_config
from pyrovae.predict.arviz import convert, posterior_groups, takes_nested_dict, to_arviz
from pyrovae.predict.posterior import Posterior


def _posterior(data, name="sams_vae"):
    torch.manual_seed(0)
    cfg = model_config(name, n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8)
    model = build_model(cfg, data.n_genes, data.n_treatments, data.norm_mean, data.norm_std)
    return Posterior(model, data.schema())


def _check(out, data, n_draws=5):
    E = out["posterior"]["E"]
    assert E.dims == ("chain", "draw", "treatment", "effect_latent")
    assert E.shape == (1, n_draws, 2, 3)
    assert list(E.coords["treatment"].values) == ["A", "B"]
    counts = out["posterior_predictive"]["counts"]
    assert counts.dims == ("chain", "draw", "cell", "gene")
    assert counts.shape == (1, n_draws, 2, data.n_genes)
    assert list(counts.coords["cell"].values) == ["control", "A+B"]
    assert list(counts.coords["gene"].values) == data.genes


def test_installed_arviz(tiny_data):
    pytest.importorskip("arviz")
    post = _posterior(tiny_data)
    _check(post.to_arviz(n_draws=5, perturbations=["control", "A+B"], seed=0), tiny_data)


def test_arviz_1x_from_dict_returns_datatree(tiny_data):
    arviz_base = pytest.importorskip("arviz_base")
    xr = pytest.importorskip("xarray")
    assert takes_nested_dict(arviz_base.from_dict)
    post = _posterior(tiny_data)
    out = to_arviz(post, n_draws=5, perturbations=["control", "A+B"], seed=0, from_dict=arviz_base.from_dict)
    assert isinstance(out, xr.DataTree)
    _check(out, tiny_data)


def test_both_apis_hold_the_same_numbers(tiny_data):
    """The installed ArviZ and ArviZ 1.x's from_dict get the same arrays (same seed, same numbers)."""
    arviz_base = pytest.importorskip("arviz_base")
    az = pytest.importorskip("arviz")
    # the installed arviz takes the keyword groups exactly when it is a 0.x release
    assert takes_nested_dict(az.from_dict) == (int(az.__version__.split(".")[0]) >= 1)
    post = _posterior(tiny_data)
    installed = post.to_arviz(n_draws=4, seed=3)
    new = to_arviz(post, n_draws=4, seed=3, from_dict=arviz_base.from_dict)
    for group, var in (("posterior", "E"), ("posterior", "mask"), ("posterior_predictive", "counts")):
        np.testing.assert_array_equal(installed[group][var].values, new[group][var].values)


def test_predictive_counts_match_predict(tiny_data):
    """The counts group is predict()'s samples, cell j of every label at draw j."""
    post = _posterior(tiny_data)
    groups, coords, _ = posterior_groups(post, n_draws=6, perturbations=["A", "control"], seed=2)
    pred = post.predict(["A", "control"], n_cells=6, seed=2)
    x = groups["posterior_predictive"]["counts"][0]  # (draw, cell, gene)
    np.testing.assert_array_equal(x[:, 0], pred.X[:6])
    np.testing.assert_array_equal(x[:, 1], pred.X[6:])
    assert coords["cell"] == ["A", "control"]


def test_conditional_vae_has_no_posterior_group(tiny_data):
    groups, _, _ = posterior_groups(_posterior(tiny_data, "conditional_vae"), n_draws=3)
    assert set(groups) == {"posterior_predictive"}


def test_api_detection_by_signature():
    def old_api(posterior=None, *, posterior_predictive=None, coords=None, dims=None):
        return ("old", posterior, posterior_predictive)

    def new_api(data, *, coords=None, dims=None):
        return ("new", data)

    assert not takes_nested_dict(old_api) and takes_nested_dict(new_api)
    groups = {"posterior": {"a": np.zeros((1, 2))}, "posterior_predictive": {"b": np.ones((1, 2))}}
    assert convert(groups, {}, {}, from_dict=old_api)[0] == "old"
    kind, data = convert(groups, {}, {}, from_dict=new_api)
    assert kind == "new" and set(data) == set(groups)
    assert list(inspect.signature(new_api).parameters)[0] == "data"
