"""GPO-VAE's and CRADLE-VAE's per-cell extras in O(batch) memory give the numbers of the former dense arrays.

The former path is kept here (or in the dense public helpers it used: ``log_normalize`` over all cells,
``delta_x``, ``group_delta_x``) and compared with the compact one on the same data and seeds: in memory
(dense and CSR) and on disk (backed ``.h5ad``), down to the minibatches and a few training steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyrovae.data import extras as extras_mod
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.extras import GroupRows, PairedDelta, iter_row_blocks, row_totals
from pyrovae.data.grn import MAX_GRN_NODES, check_grn_size, group_delta_x, streamed_group_delta_x
from pyrovae.data.loader import MinibatchLoader
from pyrovae.data.matrix import dense_rows, group_seed, label_strings, split_strings
from pyrovae.data.pairing import delta_x, log_normalize, pair_with_controls
from pyrovae.data.prepare import prepare_cradle_data, prepare_data, prepare_gpo_data
from pyrovae.data.qc import counterfactual_table
from pyrovae.models.zoo import data_requirements, model_config
from pyrovae.runs import train_run
from pyrovae.simulate import simulate_perturbseq
from pyrovae.train.trainer import TrainConfig

COMPACT = ("cfx", "delta_x", "delta_x_group")


def dense_counterfactuals(counts, labels, splits, qc_fail, n_sample=50, seed=0):
    """The former ``counterfactual_expression``: a dense (N, G) array filled group by group."""
    n, g = counts.shape
    lab = label_strings(labels, n)
    split_names, used = split_strings(splits, n)
    fail = np.asarray(qc_fail).astype(bool)
    cfx = np.zeros((n, g), dtype=np.float32)
    has_cf = np.zeros(n, dtype=bool)
    keys = pd.DataFrame({"split": split_names[used], "label": lab[used], "fail": fail[used]})
    rows_used = np.flatnonzero(used)
    groups = {
        k: rows_used[np.asarray(v)] for k, v in keys.groupby(["split", "label", "fail"]).indices.items()
    }
    for (split, label, status), target in sorted(groups.items(), key=lambda kv: kv[0]):
        pool = groups.get((split, label, not status))
        if pool is None or pool.size == 0:
            continue
        rng = np.random.default_rng(group_seed(seed, "cfx", split, label, int(status)))
        chosen = np.sort(rng.choice(pool, size=min(int(n_sample), pool.size), replace=False))
        cfx[target] = np.median(dense_rows(counts, chosen, np.float64), axis=0).astype(np.float32)
        has_cf[target] = True
    return cfx, has_cf


@pytest.fixture(scope="module")
def adata():
    return simulate_perturbseq("tiny", seed=3)


@pytest.fixture(scope="module")
def prepared(adata):
    return prepare_gpo_data(load_perturbation_data(adata), qc_key="low_quality", seed=5)


def test_row_arrays_index_like_arrays():
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    codes = np.array([2, -1, 0, 0, 1])
    dense = np.where(codes[:, None] >= 0, table[np.clip(codes, 0, None)], 0).astype(np.float32)
    for t in (table, sp.csr_matrix(table)):
        a = GroupRows(t, codes)
        assert a.shape == dense.shape and a.ndim == 2 and len(a) == 5 and a.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a), dense)
        np.testing.assert_array_equal(a[3], dense[3])
        np.testing.assert_array_equal(a[-1], dense[-1])
        np.testing.assert_array_equal(a[1:4], dense[1:4])
        np.testing.assert_array_equal(a[[4, 0, 4]], dense[[4, 0, 4]])
        np.testing.assert_array_equal(a[codes >= 0], dense[codes >= 0])
        np.testing.assert_array_equal(a[[0, 2], 1:3], dense[[0, 2], 1:3])
        np.testing.assert_array_equal(a[2, 3], dense[2, 3])
        assert np.shape(a) == (5, 4)
    with pytest.raises(IndexError):
        GroupRows(table, codes)[5]
    with pytest.raises(ValueError, match="codes must index"):
        GroupRows(table, np.array([3]))


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_counterfactual_table_equals_the_dense_counterfactuals(adata, kind):
    x = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float32)
    counts = x if kind == "dense" else sp.csr_matrix(x)
    labels = adata.obs["perturbation"].to_numpy()
    splits = np.array(["train", "val", "test", ""])[np.arange(len(x)) % 4]
    fail = adata.obs["low_quality"].to_numpy().astype(bool)
    for n_sample, seed in ((50, 0), (3, 11)):
        ref, ref_has = dense_counterfactuals(counts, labels, splits, fail, n_sample, seed)
        cfx, has = counterfactual_table(counts, labels, splits, fail, n_sample, seed)
        assert isinstance(cfx, GroupRows) and cfx.shape == ref.shape
        np.testing.assert_array_equal(np.asarray(cfx), ref)
        np.testing.assert_array_equal(has, ref_has)
        assert ref_has.any() and not ref_has.all()
        assert cfx.nbytes < ref.nbytes / 4  # the distinct medians, not one row per cell


def test_counterfactual_blocks_of_groups_do_not_change_the_medians(adata, monkeypatch):
    x = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float32)
    args = (x, adata.obs["perturbation"].to_numpy(), None, adata.obs["low_quality"].to_numpy())
    whole = np.asarray(counterfactual_table(*args, n_sample=7, seed=2)[0])
    monkeypatch.setattr("pyrovae.data.qc.BLOCK_ROWS", 5)  # one read per group (or a few groups)
    np.testing.assert_array_equal(np.asarray(counterfactual_table(*args, n_sample=7, seed=2)[0]), whole)


def test_pairing_features_per_group_equal_the_dense_features(adata):
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    labels = adata.obs["perturbation"].to_numpy()
    splits = np.array(["train", "val", "test"])[np.arange(x.shape[0]) % 3]
    cols = np.arange(0, x.shape[1], 3)
    feats = log_normalize(x, cols)  # the former path: (N, features) for every cell at once
    for method in ("emd", "sinkhorn"):
        old = pair_with_controls(x, labels, splits, "control", cols, method=method, seed=4, features=feats)
        new = pair_with_controls(x, labels, splits, "control", cols, method=method, seed=4)
        np.testing.assert_array_equal(new, old)
    with pytest.raises(ValueError, match="target_sum"):
        pair_with_controls(x, labels, splits, "control", cols, target_sum=0.0)


def test_grn_targets_equal_the_dense_targets(adata, prepared):
    data = prepared
    assert isinstance(data.extras["delta_x"], PairedDelta)
    assert isinstance(data.extras["delta_x_group"], GroupRows)
    matched = data.extras["delta_x"].matched
    genes = {g: i for i, g in enumerate(data.genes)}
    node_idx = np.array([genes[t] for t in data.treatments])
    # the former path: log-normalised GRN genes of every cell, then the paired differences
    ref = np.nan_to_num(delta_x(data.counts, matched, node_idx), nan=0.0)
    np.testing.assert_array_equal(np.asarray(data.extras["delta_x"]), ref)
    y = log_normalize(data.counts, node_idx)
    ref_group = group_delta_x(y, matched, data.labels, data.split)
    np.testing.assert_array_equal(np.asarray(data.extras["delta_x_group"]), ref_group)
    # every row computed on its own equals the row of the whole array
    rows = np.array([5, 0, 5, len(ref) - 1])
    np.testing.assert_array_equal(data.extras["delta_x"][rows], ref[rows])
    assert data.extras["delta_x"].nbytes < ref.nbytes


def test_group_means_in_blocks_agree_to_rounding(prepared, monkeypatch):
    data = prepared
    d = data.extras["delta_x"]
    whole = np.asarray(streamed_group_delta_x(d, data.labels, data.split))
    monkeypatch.setattr("pyrovae.data.grn.BLOCK_ROWS", 4)  # every group summed over several blocks
    blocked = np.asarray(streamed_group_delta_x(d, data.labels, data.split))
    np.testing.assert_allclose(blocked, whole, rtol=1e-6, atol=1e-7)


def test_backed_counts_give_the_same_extras(adata, prepared, tmp_path):
    path = tmp_path / "tiny.h5ad"
    adata.write_h5ad(path)
    backed = prepare_gpo_data(load_perturbation_data(path, backed=True), qc_key="low_quality", seed=5)
    assert not isinstance(backed.counts, np.ndarray) and not sp.issparse(backed.counts)
    np.testing.assert_array_equal(row_totals(backed.counts), row_totals(prepared.counts))
    for k in (*COMPACT, "has_cf", "qc"):
        np.testing.assert_array_equal(np.asarray(backed.extras[k]), np.asarray(prepared.extras[k]), err_msg=k)
    # minibatches read from the file in blocks carry the rows of the in-memory dense extras
    dense = _dense_copy(prepared)
    a = MinibatchLoader(backed, "train", batch_size=16, shuffle=True, seed=1, block_size=8, buffer_blocks=3)
    b = MinibatchLoader(dense, "train", batch_size=16, shuffle=True, seed=1, block_size=8, buffer_blocks=3)
    for ba, bb in zip(a, b, strict=True):
        for k in ("x", *COMPACT):
            np.testing.assert_array_equal(ba[k].numpy(), bb[k].numpy(), err_msg=k)
    # QC metrics computed from the file in blocks
    mem = prepare_cradle_data(load_perturbation_data(adata), seed=1)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr("pyrovae.data.qc.BLOCK_ROWS", 17)
    try:
        disk = prepare_cradle_data(load_perturbation_data(path, backed=True), seed=1)
    finally:
        monkeypatch.undo()
    for k in ("qc", "cfx", "has_cf"):
        np.testing.assert_array_equal(np.asarray(disk.extras[k]), np.asarray(mem.extras[k]), err_msg=k)


def test_normalized_rows_from_disk_in_blocks(adata, prepared, tmp_path, monkeypatch):
    """On disk the pairing's features are read a few rows at a time (memory O(block x genes), not O(rows x
    genes)): the same numbers as in memory, for any row order, repeats, and with or without a column subset;
    and the backed preparation's targets do not change."""
    path = tmp_path / "tiny.h5ad"
    adata.write_h5ad(path)
    disk = load_perturbation_data(path, backed=True)
    mem = load_perturbation_data(adata)
    totals = row_totals(mem.counts)
    monkeypatch.setattr(extras_mod, "NORMALIZE_BLOCK", 5)
    rows = np.random.default_rng(0).choice(mem.n_cells, 23)  # unsorted, with repeats, 5 blocks
    for cols in (None, np.array([4, 0, 2]), np.arange(mem.n_genes) % 3 == 0):
        got = extras_mod.normalized_rows(disk.counts, rows, cols, totals, 50.0)
        want = extras_mod.normalized_rows(mem.counts, rows, cols, totals, 50.0)
        np.testing.assert_array_equal(got, want)
    blocked = prepare_gpo_data(disk, qc_key="low_quality", seed=5)
    for k in COMPACT:
        np.testing.assert_array_equal(
            np.asarray(blocked.extras[k]), np.asarray(prepared.extras[k]), err_msg=k
        )


def _dense_copy(data):
    return dataclasses.replace(data, extras={k: np.asarray(v) for k, v in data.extras.items()})


def test_minibatches_carry_the_dense_rows(prepared):
    dense = _dense_copy(prepared)
    for split in ("train", "test"):
        a = MinibatchLoader(prepared, split, batch_size=37, shuffle=True, seed=2)
        b = MinibatchLoader(dense, split, batch_size=37, shuffle=True, seed=2)
        for ba, bb in zip(a, b, strict=True):
            assert set(ba) == set(bb)
            for k in ba:
                assert ba[k].dtype == bb[k].dtype, k
                np.testing.assert_array_equal(ba[k].numpy(), bb[k].numpy(), err_msg=k)


@pytest.mark.parametrize("name", ["gpo_vae", "gpo_vae_reference", "cradle_vae", "cradle_vae_reference"])
def test_training_numbers_unchanged(prepared, name, tmp_path):
    """A few epochs on the compact extras and on their dense copies: the same losses, bit for bit."""
    small = dict(n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)
    fast = dict(max_epochs=2, batch_size=64, lr=5e-3, n_particles=2, val_particles=2, seed=1)
    opts = {"qc_key": "low_quality", "split_seed": 5}
    runs = []
    for tag, data in (("compact", prepared), ("dense", _dense_copy(prepared))):
        run = train_run(
            data, model_config(name, **small), TrainConfig(**fast), tmp_path / tag, opts, progress=False
        )
        runs.append(pd.DataFrame(run.metrics()))
    cols = [c for c in runs[0].columns if "loss" in c or "penalty" in c]
    assert cols
    pd.testing.assert_frame_equal(runs[0][cols], runs[1][cols])


def test_iter_row_blocks_streams_any_extra(prepared, monkeypatch):
    monkeypatch.setattr(extras_mod, "BLOCK_ROWS", 10)
    rows = prepared.indices("train")
    for k in ("qc", *COMPACT):
        full = np.asarray(prepared.extras[k])[rows]
        parts = list(iter_row_blocks(prepared.extras[k], rows, block=10))
        assert all(len(p) <= 10 for p, _ in parts)
        np.testing.assert_array_equal(np.concatenate([b for _, b in parts]), full)


def test_gpo_grn_larger_than_the_limit_is_one_clear_error(adata):
    data = load_perturbation_data(adata)
    with pytest.raises(
        ValueError, match=r"GPO-VAE's GRN would have T = .* max_grn_nodes = 5.*Restrict the GRN"
    ):
        prepare_data(
            data, data_requirements(model_config("gpo_vae")), {"qc_key": "low_quality", "max_grn_nodes": 5}
        )
    check_grn_size(MAX_GRN_NODES)  # at the limit: fine
