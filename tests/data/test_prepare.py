"""GPO/CRADLE data preparation on a hand-built AnnData, the pairing cache and the held-out protocol."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.grn import matched_column, write_pairing
from pyrovae.data.prepare import holdout_perturbations, prepare_cradle_data, prepare_gpo_data

GENES = ["A", "B", "C", "D", "E"]
GROUPS = ["control", "A", "B", "A+B"]


def _hand_adata(seed: int = 0) -> ad.AnnData:
    """40 cells: train 16 / val 8 / test 16, each split with the 4 groups equally; in every group of 4 (2)
    cells the first fails QC (obs 'bad')."""
    rng = np.random.default_rng(seed)
    sizes = {"train": 4, "val": 2, "test": 4}
    labels, split, bad = [], [], []
    for s, k in sizes.items():
        for g in GROUPS:
            labels += [g] * k
            split += [s] * k
            bad += [True] + [False] * (k - 1)
    n = len(labels)
    x = rng.poisson(6.0, size=(n, len(GENES))).astype(np.float32) + 1.0
    a = ad.AnnData(x)
    a.obs_names = [f"c{i:02d}" for i in range(n)]
    a.var_names = GENES
    a.obs["perturbation"] = labels
    a.obs["split"] = split
    a.obs["bad"] = bad
    return a


def _lognorm(x: np.ndarray) -> np.ndarray:
    lib = x.sum(1)
    return np.log1p(x * (np.median(lib) / lib)[:, None])


def _first_control_pairing(a: ad.AnnData) -> np.ndarray:
    """Every cell paired with the first control of its split (controls: with the second one)."""
    lab, spl = a.obs["perturbation"].to_numpy(), a.obs["split"].to_numpy()
    m = np.empty(a.n_obs, dtype=np.int64)
    for s in np.unique(spl):
        ctrl = np.flatnonzero((spl == s) & (lab == "control"))
        rows = np.flatnonzero(spl == s)
        m[rows] = ctrl[0]
        m[ctrl[0]] = ctrl[1]
    return m


def test_prepare_extras_by_hand():
    a = _hand_adata()
    planted = _first_control_pairing(a)
    a.obs[matched_column(0)] = np.asarray(a.obs_names)[planted]
    data = load_perturbation_data(a, split_key="split")
    out = prepare_gpo_data(data, extra_genes=["D", "C"], qc_key="bad", seed=0)
    assert out is not data and data.treatments == ["A", "B"] and "delta_x" not in data.extras
    # GRN nodes: perturbed genes (existing order) + sorted extra genes with all-zero dosage columns
    assert out.treatments == ["A", "B", "C", "D"]
    assert out.uns["pyrovae_gpo"]["n_perturbed"] == 2
    np.testing.assert_array_equal(out.dosage[:, :2].toarray(), data.dosage.toarray())
    assert out.dosage[:, 2:].nnz == 0
    x = np.asarray(a.X)
    # qc from the obs column
    np.testing.assert_array_equal(out.extras["qc"][:, 0], a.obs["bad"].to_numpy().astype(np.float32))
    assert out.extras["qc"].shape == (a.n_obs, 1)
    # cfx: median of the opposite-status cells of the same label and split
    lab, spl, bad = data.labels, data.split, a.obs["bad"].to_numpy()
    for i in range(a.n_obs):
        pool = np.flatnonzero((lab == lab[i]) & (spl == spl[i]) & (bad != bad[i]))
        np.testing.assert_allclose(out.extras["cfx"][i], np.median(x[pool], axis=0))
        assert out.extras["has_cf"][i] == 1.0
    # delta_x from the planted (cached) pairing, on the GRN genes in treatment order
    assert "pairing_s" not in out.uns["pyrovae_gpo"]["timings"]
    y = _lognorm(x)[:, [0, 1, 2, 3]]
    np.testing.assert_allclose(out.extras["delta_x"], np.abs(y - y[planted]), rtol=1e-5, atol=1e-6)
    assert out.extras["delta_x"].shape == (a.n_obs, 4)


def test_pairing_cache_roundtrip_and_stale_cache():
    a = _hand_adata(1)
    data = load_perturbation_data(a, split_key="split")
    out = prepare_gpo_data(data, qc_key="bad", seed=3, pairing_method="emd")
    assert "pairing_s" in out.uns["pyrovae_gpo"]["timings"]
    names = out.obs[matched_column(3)].to_numpy()
    pos = pd.Index(a.obs_names).get_indexer(names)
    assert (data.labels[pos] == "control").all() and (data.split[pos] == data.split).all()
    # controls are never their own match
    ctrl = np.flatnonzero(data.labels == "control")
    assert (pos[ctrl] != ctrl).all()
    # stored in the AnnData, read back without re-solving
    col = write_pairing(a, out, seed=3)
    again = prepare_gpo_data(load_perturbation_data(a, split_key="split"), qc_key="bad", seed=3)
    assert "pairing_s" not in again.uns["pyrovae_gpo"]["timings"]
    np.testing.assert_array_equal(again.extras["delta_x"], out.extras["delta_x"])
    # a stored match that is not a control of the same split is detected and recomputed
    a.obs[col] = a.obs_names[0]  # first cell: a train control, wrong for val/test cells
    with pytest.warns(UserWarning, match="recomputing"):
        redo = prepare_gpo_data(load_perturbation_data(a, split_key="split"), qc_key="bad", seed=3)
    assert "pairing_s" in redo.uns["pyrovae_gpo"]["timings"]


def test_prepare_is_idempotent_and_cradle_skips_grn():
    a = _hand_adata()
    data = load_perturbation_data(a, split_key="split")
    once = prepare_gpo_data(data, extra_genes=["E"], qc_key="bad")
    twice = prepare_gpo_data(once, qc_key="bad")
    assert twice.treatments == once.treatments == ["A", "B", "E"]
    np.testing.assert_array_equal(twice.extras["delta_x"], once.extras["delta_x"])
    cr = prepare_cradle_data(data, qc_key="bad")
    assert cr.treatments == data.treatments and "delta_x" not in cr.extras
    assert set(cr.extras) == {"qc", "cfx", "has_cf"}


def test_computed_qc_flags_shape():
    a = _hand_adata()
    out = prepare_cradle_data(load_perturbation_data(a, split_key="split"))
    assert out.extras["qc"].shape == (a.n_obs, 1)
    assert set(np.unique(out.extras["qc"])) <= {0.0, 1.0}


def test_perturbation_must_be_a_measured_gene():
    a = _hand_adata()
    a.obs["perturbation"] = a.obs["perturbation"].replace({"B": "KO7", "A+B": "A+KO7"})
    data = load_perturbation_data(a, split_key="split")
    with pytest.raises(ValueError, match="not in var_names.*KO7"):
        prepare_gpo_data(data, qc_key="bad")
    with pytest.raises(ValueError, match="extra GRN gene"):
        prepare_gpo_data(load_perturbation_data(_hand_adata(), split_key="split"), extra_genes=["ZZ"])
    with pytest.raises(ValueError, match="qc column|QC column"):
        prepare_gpo_data(load_perturbation_data(_hand_adata(), split_key="split"), qc_key="nope")


def test_holdout_never_leaks_and_keeps_dosage():
    a = _hand_adata()
    data = load_perturbation_data(a, split_key="split")
    held = holdout_perturbations(data, ["A"])
    has_a = data.dosage[:, data.treatments.index("A")].toarray().ravel() != 0
    assert (held.split[has_a] == "test").all()  # A and A+B cells, from train and val
    trainval = np.isin(held.split, ["train", "val"])
    assert held.dosage[trainval][:, 0].nnz == 0
    np.testing.assert_array_equal(held.dosage.toarray(), data.dosage.toarray())  # D is kept, not zeroed
    assert held.treatment_counts("train")[0] == 0 and held.treatment_counts("train")[1] > 0
    unchanged = ~has_a
    np.testing.assert_array_equal(held.split[unchanged], data.split[unchanged])
    # normalisation statistics come from the remaining training cells only
    tr = held.indices("train")
    np.testing.assert_allclose(held.norm_mean, np.log1p(np.asarray(a.X)[tr]).mean(0), rtol=1e-5)
    assert held.uns["pyrovae_heldout_perturbations"] == ["A"]
    # the GPO preparation of held-out data: pairing within the final splits, the held-out row untrained
    prep = prepare_gpo_data(held, qc_key="bad")
    assert prep.treatment_counts("train")[0] == 0
    with pytest.raises(ValueError, match="not treatment columns"):
        holdout_perturbations(data, ["A+B"])
    with pytest.raises(ValueError, match="no perturbed training cell"):
        holdout_perturbations(data, ["A", "B"])


def test_group_delta_x_averages_signed_differences_before_the_absolute_value():
    from pyrovae.data.grn import group_delta_x

    y = np.array([[0.0, 0.0], [1.0, 2.0], [-1.0, 2.0], [3.0, 0.0], [0.5, 0.5], [9.0, 9.0]])
    matched = np.array([-1, 0, 0, 0, 0, -1])  # cell 0 is the control; cell 5 has no match
    labels = np.array(["control", "A", "A", "A", "A", "A"])
    split = np.array(["train", "train", "train", "test", "test", "train"])
    out = group_delta_x(y, matched, labels, split)
    # train A cells 1, 2: differences (1, 2) and (-1, 2): |mean| = (0, 2), not the per-cell |.| mean (1, 2)
    np.testing.assert_allclose(out[[1, 2]], [[0.0, 2.0], [0.0, 2.0]])
    # test A cells 3, 4 are averaged on their own (no leakage between splits)
    np.testing.assert_allclose(out[[3, 4]], [[1.75, 0.25], [1.75, 0.25]])
    np.testing.assert_allclose(out[[0, 5]], 0.0)
