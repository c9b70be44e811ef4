"""The seeded Perturb-seq simulator: determinism, sizes, labels, ground truth, visible effects, h5ad."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from pyrovae.simulate.config import (
    CHAIN_LENGTH,
    COLLIDER_PARENTS,
    FORK_CHILDREN,
    GRN_SHAPES,
    MT_GENES,
    PRESETS,
    SimulationConfig,
)
from pyrovae.simulate.perturbseq import ground_truth, simulate_perturbseq


@pytest.fixture(scope="module")
def tiny() -> ad.AnnData:
    return simulate_perturbseq("tiny", seed=0)


def _labels(adata: ad.AnnData) -> np.ndarray:
    return adata.obs["perturbation"].astype(str).to_numpy()


def _assert_same_truth(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and va.shape == vb.shape, key
            np.testing.assert_array_equal(va, vb, err_msg=key)
        elif isinstance(va, dict):
            _assert_same_truth(va, vb)
        else:
            assert type(va) is type(vb) and va == vb, key


def _normalised(adata: ad.AnnData) -> np.ndarray:
    x = adata.X.toarray()
    return x / x.sum(axis=1, keepdims=True) * 1e4


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_is_bit_identical(tiny):
    again = simulate_perturbseq("tiny", seed=0)
    for attr in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(tiny.X, attr), getattr(again.X, attr))
    assert tiny.obs.equals(again.obs)
    assert tiny.var.equals(again.var)
    _assert_same_truth(ground_truth(tiny), ground_truth(again))
    assert tiny.uns["simulation_config"] == again.uns["simulation_config"]


def test_different_seed_differs(tiny):
    other = simulate_perturbseq("tiny", seed=1)
    assert other.shape == tiny.shape
    assert (other.X != tiny.X).nnz > 0
    assert not np.array_equal(ground_truth(other)["embeddings"], ground_truth(tiny)["embeddings"])
    assert not other.obs["perturbation"].equals(tiny.obs["perturbation"])


def test_no_global_rng_use(tiny):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    simulate_perturbseq("tiny", seed=0)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


# ------------------------------------------------------------------------------------------ sizes
def test_tiny_shapes_and_layout(tiny):
    cfg = PRESETS["tiny"]
    assert tiny.shape == (cfg.n_cells, cfg.n_genes)
    assert 300 <= tiny.n_obs <= 500
    assert isinstance(tiny.X, sp.csr_matrix) and tiny.X.dtype == np.float32
    names = list(tiny.var_names)
    assert names[: cfg.n_perturbed] == [f"PG{i:02d}" for i in range(1, cfg.n_perturbed + 1)]
    assert names[cfg.n_perturbed : cfg.n_perturbed + cfg.n_extra_grn_genes] == ["EG01", "EG02"]
    assert names[cfg.n_perturbed + cfg.n_extra_grn_genes] == "G0001"
    assert names[-len(MT_GENES) :] == list(MT_GENES)
    assert tiny.var["perturbed"].dtype == bool and tiny.var["grn_gene"].dtype == bool
    assert tiny.var["perturbed"].sum() == cfg.n_perturbed
    assert tiny.var["grn_gene"].sum() == cfg.n_perturbed + cfg.n_extra_grn_genes
    assert list(tiny.var_names[tiny.var["grn_gene"].to_numpy()]) == ground_truth(tiny)["grn_genes"]
    assert tiny.obs_names[0] == "cell00000" and tiny.obs_names.is_unique
    assert tiny.obs["low_quality"].dtype == bool


def test_preset_configs():
    assert set(PRESETS) == {"tiny", "default", "targeted_panel", "large"}
    d = PRESETS["default"]
    assert (d.n_genes, d.n_latent, d.n_perturbed, d.n_doubles, d.n_extra_grn_genes) == (200, 10, 24, 12, 16)
    assert (d.n_control_cells, d.cells_per_single, d.cells_per_double) == (1500, 150, 150)
    assert d.n_cells == 6900
    big = PRESETS["large"]
    assert (big.n_genes, big.n_latent, big.n_perturbed, big.n_doubles) == (2000, 32, 200, 100)
    assert (big.n_control_cells, big.cells_per_single, big.cells_per_double) == (10000, 300, 300)
    t = PRESETS["tiny"]
    assert (t.n_genes, t.n_latent, t.n_perturbed, t.n_doubles, t.n_extra_grn_genes) == (40, 4, 6, 3, 2)
    for cfg in PRESETS.values():
        cfg.validate()


def test_default_preset_shape():
    adata = simulate_perturbseq("default", seed=0)
    assert adata.shape == (6900, 200)
    assert len(ground_truth(adata)["doubles"]) == 12


# ------------------------------------------------------------------------------------------ labels
def test_labels_parse(tiny):
    cfg = PRESETS["tiny"]
    truth = ground_truth(tiny)
    labels = _labels(tiny)
    values, counts = np.unique(labels, return_counts=True)
    count = dict(zip(values.tolist(), counts.tolist()))
    assert count.pop("control") == cfg.n_control_cells
    singles = {k: v for k, v in count.items() if "+" not in k}
    doubles = {k: v for k, v in count.items() if "+" in k}
    assert sorted(singles) == truth["treatments"] and set(singles.values()) == {cfg.cells_per_single}
    assert sorted(doubles) == sorted(truth["doubles"]) and set(doubles.values()) == {cfg.cells_per_double}
    pairs = set()
    for label in doubles:
        a, b = label.split("+")
        assert a < b and a in truth["treatments"] and b in truth["treatments"]
        pairs.add((a, b))
    assert len(pairs) == cfg.n_doubles
    # cells are shuffled, not grouped
    assert len(set(labels[: cfg.n_control_cells])) > 1


# ------------------------------------------------------------------------------------------ ground truth
def test_ground_truth_consistency(tiny):
    cfg = PRESETS["tiny"]
    truth = ground_truth(tiny)
    T, K = cfg.n_perturbed, cfg.n_latent
    n = cfg.n_perturbed + cfg.n_extra_grn_genes
    assert truth["treatments"] == list(tiny.var_names[:T])
    assert truth["masks"].shape == (T, K) and truth["masks"].dtype == np.int8
    assert set(np.unique(truth["masks"]).tolist()) <= {0, 1}
    assert (truth["masks"].sum(axis=1) >= 1).all()
    assert truth["embeddings"].shape == (T, K) and truth["embeddings"].dtype == np.float32
    np.testing.assert_array_equal(truth["latent_effects"], truth["masks"] * truth["embeddings"])
    adj = truth["grn_adjacency"]
    assert adj.shape == (n, n) and adj.dtype == np.float32
    assert (np.diag(adj) == 0).all()
    # acyclic: the adjacency is nilpotent
    power = (adj != 0).astype(np.int64)
    reach = power.copy()
    for _ in range(n):
        reach = (reach @ power > 0).astype(np.int64)
    assert not reach.any()
    np.testing.assert_allclose(
        truth["grn_total_effect"], np.linalg.inv(np.eye(n) - adj.astype(np.float64)) - np.eye(n), atol=1e-5
    )
    weights = np.abs(adj[adj != 0])
    assert weights.min() >= 0.5 * cfg.grn_weight - 1e-6 and weights.max() <= cfg.grn_weight + 1e-6
    # every extra GRN gene has a perturbed parent
    assert (adj[:T, T:] != 0).any(axis=0).all()
    # at most one perturbed gene (the last of the topological order) has no child
    assert ((adj[:T] != 0).sum(axis=1) == 0).sum() <= 1
    for double in truth["doubles"]:
        assert all(part in truth["treatments"] for part in double.split("+"))
    assert truth["dispersion"].shape == (cfg.n_genes,) and (truth["dispersion"] > 0).all()
    lo, hi = cfg.dispersion_range
    assert truth["dispersion"].min() >= lo * (1 - 1e-6) and truth["dispersion"].max() <= hi * (1 + 1e-6)
    assert truth["decoder"]["W1"].shape == (K, cfg.decoder_hidden)
    assert truth["decoder"]["W2"].shape == (cfg.decoder_hidden, cfg.n_genes)
    assert truth["seed"] == 0 and truth["preset"] == "tiny"
    for key in ("treatments", "masks", "latent_effects", "grn_adjacency", "grn_total_effect", "doubles"):
        assert key in truth["description"]
    assert tiny.uns["simulation_config"] == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()
    }


def test_ground_truth_missing_raises():
    plain = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"no simulated ground truth in uns\['ground_truth'\]"):
        ground_truth(plain)


# ------------------------------------------------------------------------------------------ visible effects
def test_knockdown_visible(tiny):
    # default strength: on average, clearly lower in the target's cells
    norm, labels = _normalised(tiny), _labels(tiny)
    ctrl = labels == "control"
    log_ratios = []
    for j, target in enumerate(ground_truth(tiny)["treatments"]):
        log_ratios.append(np.log(norm[labels == target, j].mean() / norm[ctrl, j].mean()))
    assert np.mean(log_ratios) < -0.5
    # strong CRISPRi: every target lower, on several seeds
    for seed in range(3):
        adata = simulate_perturbseq("tiny", seed=seed, knockdown=-3.0)
        norm, labels = _normalised(adata), _labels(adata)
        ctrl = labels == "control"
        for j, target in enumerate(ground_truth(adata)["treatments"]):
            assert norm[labels == target, j].mean() < 0.5 * norm[ctrl, j].mean(), (seed, target)


def _expected_fractions(truth: dict, labels: list[str], n_mc: int = 4000) -> dict[str, np.ndarray]:
    """Monte-Carlo E[softmax(log-means)] (G,) of good-quality cells per label, from the ground truth only."""
    rng = np.random.default_rng(12345)
    z_basal = rng.standard_normal((n_mc, truth["masks"].shape[1]))
    grn_genes = truth["grn_genes"]
    propagate = np.eye(len(grn_genes)) + truth["grn_total_effect"]
    dec = truth["decoder"]
    out = {}
    for label in labels:
        parts = [] if label == "control" else label.split("+")
        z = z_basal + sum(truth["latent_effects"][truth["treatments"].index(p)] for p in parts)
        eta = np.tanh(z @ dec["W1"] + dec["b1"]) @ dec["W2"] + truth["baseline"]
        delta = np.zeros(len(grn_genes))
        for p in parts:
            delta[grn_genes.index(p)] = truth["knockdown"]
        eta[:, : len(grn_genes)] += delta @ propagate
        prob = np.exp(eta - eta.max(axis=1, keepdims=True))
        out[label] = (prob / prob.sum(axis=1, keepdims=True)).mean(axis=0)
    return out


def test_ground_truth_reproduces_group_means(tiny):
    """The stored parameters are the generative truth: expected vs observed expression and fold changes."""
    truth = ground_truth(tiny)
    labels = _labels(tiny)
    good = ~tiny.obs["low_quality"].to_numpy()
    x = tiny.X.toarray()
    frac = x / x.sum(axis=1, keepdims=True)
    groups = ["control"] + truth["treatments"] + truth["doubles"]
    expected = _expected_fractions(truth, groups)
    observed = {g: frac[(labels == g) & good].mean(axis=0) for g in groups}
    assert np.corrcoef(np.log(observed["control"]), np.log(expected["control"]))[0, 1] > 0.97
    lfc_obs = np.array([np.log(observed[g] / observed["control"]) for g in groups[1:]])
    lfc_exp = np.array([np.log(expected[g] / expected["control"]) for g in groups[1:]])
    assert np.corrcoef(lfc_obs.ravel(), lfc_exp.ravel())[0, 1] > 0.85
    # each double moves both of its targets in the expected direction where the expected change is clear
    genes = list(tiny.var_names)
    for double in truth["doubles"]:
        for part in double.split("+"):
            j = genes.index(part)
            if abs(lfc_exp[groups.index(double) - 1, j]) > 0.5:
                assert np.sign(lfc_obs[groups.index(double) - 1, j]) == np.sign(
                    lfc_exp[groups.index(double) - 1, j]
                )


def test_low_quality_cells_detectable(tiny):
    cfg = PRESETS["tiny"]
    lq = tiny.obs["low_quality"].to_numpy()
    assert lq.sum() == round(cfg.frac_low_quality * tiny.n_obs)
    x = tiny.X.toarray()
    total = x.sum(axis=1)
    mt = tiny.var_names.str.startswith("MT-")
    assert mt.sum() == 3 and not tiny.var["grn_gene"].to_numpy()[mt].any()
    frac_mt = x[:, mt].sum(axis=1) / total
    assert frac_mt[lq].mean() > 3 * frac_mt[~lq].mean()
    assert total[lq].mean() < 0.6 * total[~lq].mean()


def test_counts_are_nonnegative_integers(tiny):
    data = tiny.X.data
    assert (data >= 0).all()
    np.testing.assert_array_equal(data, np.round(data))
    assert tiny.X.nnz > 0 and (tiny.X.sum(axis=1) > 0).all()


# ------------------------------------------------------------------------------------------ h5ad
def test_h5ad_round_trip(tiny, tmp_path):
    path = tmp_path / "sim.h5ad"
    tiny.write_h5ad(path)
    back = ad.read_h5ad(path)
    _assert_same_truth(ground_truth(tiny), ground_truth(back))
    assert (back.X != tiny.X).nnz == 0
    assert list(back.obs["perturbation"].astype(str)) == list(_labels(tiny))
    np.testing.assert_array_equal(back.obs["low_quality"].to_numpy(), tiny.obs["low_quality"].to_numpy())
    assert list(back.uns["simulation_config"]["dispersion_range"]) == list(PRESETS["tiny"].dispersion_range)


def test_h5ad_round_trip_without_doubles(tmp_path):
    adata = simulate_perturbseq("tiny", seed=0, n_doubles=0)
    assert ground_truth(adata)["doubles"] == []
    adata.write_h5ad(tmp_path / "sim.h5ad")
    assert ground_truth(ad.read_h5ad(tmp_path / "sim.h5ad"))["doubles"] == []


# ------------------------------------------------------------------------------------------ configuration
def test_overrides_and_custom_config():
    adata = simulate_perturbseq("tiny", seed=0, n_doubles=1, knockdown=-2.0, dispersion_range=[5, 10])
    assert len(ground_truth(adata)["doubles"]) == 1
    assert adata.uns["simulation_config"]["knockdown"] == -2.0
    cfg = dataclasses.replace(PRESETS["tiny"], n_perturbed=3, n_doubles=0)
    custom = simulate_perturbseq(cfg, seed=2)
    assert ground_truth(custom)["preset"] == "custom"
    assert custom.var["perturbed"].sum() == 3 and custom.n_obs == cfg.n_cells


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match=r"unknown simulation preset 'huge'.*default.*large.*tiny"):
        simulate_perturbseq("huge")


def test_unknown_override_raises():
    with pytest.raises(TypeError, match="n_gens"):
        simulate_perturbseq("tiny", n_gens=10)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"n_doubles": 100}, "n_doubles"),
        ({"n_genes": 8}, "n_genes"),
        ({"mask_prob": 1.5}, "mask_prob"),
        ({"dispersion_range": (0.0, 1.0)}, "dispersion_range"),
        ({"frac_low_quality": 1.0}, "frac_low_quality"),
        ({"grn_shape": "star"}, "grn_shape"),
    ],
)
def test_invalid_config_raises(override, field):
    with pytest.raises(ValueError, match=field):
        simulate_perturbseq("tiny", **override)


def test_invalid_seed_raises():
    with pytest.raises(ValueError, match="seed"):
        simulate_perturbseq("tiny", seed=-1)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].n_genes = 3  # type: ignore[misc]
    assert isinstance(PRESETS["tiny"], SimulationConfig)


# ------------------------------------------------------------------------------------------ GRN shapes
def _shape_truth(shape: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    adata = simulate_perturbseq(
        "default", seed=seed, grn_shape=shape, n_control_cells=5, cells_per_single=1, cells_per_double=1
    )
    truth = ground_truth(adata)
    return truth["grn_adjacency"], truth["grn_total_effect"], int(adata.var["perturbed"].sum())


def _is_dag(adj: np.ndarray) -> bool:
    a = (adj != 0).astype(np.float64)
    return bool(np.allclose(np.linalg.matrix_power(a, a.shape[0]), 0.0))


@pytest.mark.parametrize("shape", [s for s in GRN_SHAPES if s != "random"])
def test_grn_shape_is_a_dag_with_planted_total_effects(shape):
    adj, total, T = _shape_truth(shape)
    n = adj.shape[0]
    assert _is_dag(adj) and np.all(np.diag(adj) == 0)
    np.testing.assert_allclose(
        total, np.linalg.inv(np.eye(n) - adj.astype(np.float64)) - np.eye(n), atol=1e-5
    )
    w = np.abs(adj[adj != 0])
    cfg = PRESETS["default"]
    assert w.min() >= 0.5 * cfg.grn_weight - 1e-6 and w.max() <= cfg.grn_weight + 1e-6
    # every extra GRN gene is a leaf with a perturbed parent (it is reachable from an intervention)
    assert (adj[T:] == 0).all() and ((adj[:T, T:] != 0).sum(0) >= 1).all()
    # indirect effects exist (a gene reached only through a path), so direct != total
    indirect = (total != 0) & (adj == 0) & ~np.eye(n, dtype=bool)
    assert indirect[:T].sum() > 0


def test_grn_shape_motifs():
    T = PRESETS["default"].n_perturbed
    adj, _, _ = _shape_truth("chain")
    a = adj[:T, :T] != 0
    assert a.sum(0).max() == 1 and a.sum(1).max() == 1  # chains: one parent, one child among perturbed
    assert a.sum() == T - int(np.ceil(T / CHAIN_LENGTH))  # CHAIN_LENGTH - 1 edges per chain
    assert ((adj[:T, T:] != 0).sum(0) == 1).all()
    adj, _, _ = _shape_truth("fork")
    a = adj[:T, :T] != 0
    assert a.sum() == T - 1 and (a.sum(0) <= 1).all() and a.sum(1).max() == FORK_CHILDREN  # a tree
    adj, total, _ = _shape_truth("collider")
    a = adj[:T, :T] != 0
    lower = a.sum(0) > 0
    assert lower.sum() == T // 2 and (a.sum(0)[lower] == COLLIDER_PARENTS).all()
    assert not a[lower].any()  # lower genes regulate only extra genes
    e = adj[:T, T:] != 0
    assert (e.sum(0) == COLLIDER_PARENTS).all() and not e[~lower].any()
    # upper genes reach the extra genes only through the lower level: all indirect
    assert (total[:T, T:][~lower] != 0).any()


def test_grn_shape_random_is_the_default_and_shapes_are_seeded():
    assert all(c.grn_shape == "random" for c in PRESETS.values())
    a1, _, _ = _shape_truth("fork", seed=1)
    a2, _, _ = _shape_truth("fork", seed=1)
    a3, _, _ = _shape_truth("fork", seed=2)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, a3)
