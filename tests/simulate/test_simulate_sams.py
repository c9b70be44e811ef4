"""The reference-regime SAMS-VAE simulator: layout, ground truth, noise level, reproducibility, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.simulate import ground_truth
from pyrovae.simulate.sams_reference import _orthogonal, simulate_sams_reference

SMALL = dict(n_genes=30, n_latent=4, n_treatments=5, cells_per_treatment=400, n_control_cells=400)


@pytest.fixture(scope="module")
def sim():
    return simulate_sams_reference(seed=0, **SMALL)


def test_layout_and_ground_truth(sim, tmp_path):
    assert sim.shape == (6 * 400, 30) and sim.X.dtype == np.float32
    counts = sim.obs["perturbation"].value_counts()
    assert set(counts.index) == {"control", "T01", "T02", "T03", "T04", "T05"} and (counts == 400).all()
    path = tmp_path / "s.h5ad"
    sim.write_h5ad(path)
    import anndata as ad

    truth = ground_truth(ad.read_h5ad(path))  # survives an h5ad round trip
    assert truth["treatments"] == ["T01", "T02", "T03", "T04", "T05"]
    m, e = truth["masks"], truth["embeddings"]
    assert m.shape == (5, 4) and (m.sum(1) >= 1).all()
    np.testing.assert_allclose(truth["latent_effects"], m * e)
    assert np.all(np.abs(np.abs(e) - 5.0) < 5 * 0.5)  # |e| ~ N(5, 0.5)


def test_each_gene_is_standardised_signal_plus_a_fifth_noise(sim):
    x = np.asarray(sim.X, dtype=np.float64)
    # var(x_g) = 1 (standardised mean) + 0.25 (noise): noise is 0.25 / 1.25 = 20% of the variance
    np.testing.assert_allclose(x.var(0).mean(), 1.25, rtol=0.05)


def test_only_perturbed_cells_shift_and_along_their_masks():
    # a linear decoder (no hidden layers) lets the latent shift be read back from group means
    a = simulate_sams_reference(seed=3, **{**SMALL, "n_hidden_layers": 0, "noise_frac": 0.01})
    truth = ground_truth(a)
    x = np.asarray(a.X, dtype=np.float64)
    lab = a.obs["perturbation"].astype(str).to_numpy()
    ctrl = x[lab == "control"].mean(0)
    shifts = np.stack([x[lab == t].mean(0) - ctrl for t in truth["treatments"]])  # (T, G) = effects @ W
    w, *_ = np.linalg.lstsq(truth["latent_effects"], shifts, rcond=None)
    resid = shifts - truth["latent_effects"] @ w
    assert np.abs(resid).max() < 0.15 * np.abs(shifts).max()


def test_orthogonal_weights():
    rng = np.random.default_rng(0)
    for a, b in [(4, 7), (7, 4), (5, 5)]:
        w = _orthogonal(a, b, rng)
        assert w.shape == (a, b)
        gram = w @ w.T if a <= b else w.T @ w
        np.testing.assert_allclose(gram, np.eye(min(a, b)), atol=1e-10)


def test_same_seed_same_data_and_loads_as_continuous(sim):
    again = simulate_sams_reference(seed=0, **SMALL)
    np.testing.assert_array_equal(again.X, sim.X)
    assert not np.array_equal(simulate_sams_reference(seed=1, **SMALL).X, sim.X)
    data = load_perturbation_data(sim, require_counts=False)
    assert not data.is_count_data and data.control_label == "control"
    with pytest.raises(ValueError, match="raw integer UMI counts"):
        load_perturbation_data(sim)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"n_latent": 0}, "n_latent must be >= 1"),
        ({"noise_frac": 1.0}, "noise_frac must be in"),
        ({"mask_prob": 1.5}, "mask_prob must be in"),
        ({"knockdown": 0}, "unknown simulation setting"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        simulate_sams_reference(seed=0, **bad)
