"""Minibatches of a split: coverage, shapes, seeded shuffling, drop_last, extras, per-batch densification."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pyrovae.data import loader as loader_mod
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.loader import MinibatchLoader
from pyrovae.data.perturbation_data import PerturbationData

N, G = 50, 7


def make_data(sparse: bool = True, split: np.ndarray | None = None, seed: int = 0):
    labels = np.array(["control", "A", "B", "A+B", "C"] * (N // 5))
    x = np.random.default_rng(seed).poisson(2.0, size=(N, G)).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(x) if sparse else x)
    a.obs_names = [f"c{i}" for i in range(N)]
    a.var_names = [f"g{j}" for j in range(G)]
    a.obs["perturbation"] = labels
    if split is not None:
        a.obs["split"] = split
        return load_perturbation_data(a, split_key="split"), x
    return load_perturbation_data(a, val_frac=0.2, test_frac=0.2), x


def collect(loader):
    return [b for b in loader]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_batches_cover_split_exactly_once(sparse, split):
    data, x = make_data(sparse)
    loader = MinibatchLoader(data, split, batch_size=8, shuffle=True, seed=3)
    want = data.indices(split)
    assert loader.n_cells == len(want) > 0
    for _ in range(2):  # every epoch
        batches = collect(loader)
        assert len(batches) == len(loader) == int(np.ceil(len(want) / 8))
        rows = torch.cat([b["rows"] for b in batches]).numpy()
        idx = torch.cat([b["idx"] for b in batches]).numpy()
        np.testing.assert_array_equal(np.sort(rows), want)
        np.testing.assert_array_equal(np.sort(idx), np.arange(len(want)))
        np.testing.assert_array_equal(want[idx], rows)  # idx are positions within the split


def test_batch_shapes_and_contents():
    data, x = make_data()
    loader = MinibatchLoader(data, "train", batch_size=8)
    n = loader.n_cells
    batches = collect(loader)
    sizes = [b["x"].shape[0] for b in batches]
    assert sizes == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    for b in batches:
        bsz = b["x"].shape[0]
        assert b["x"].shape == (bsz, G) and b["x"].dtype == torch.float32
        assert b["d"].shape == (bsz, data.n_treatments) and b["d"].dtype == torch.float32
        assert b["library_size"].shape == (bsz,) and b["library_size"].dtype == torch.float32
        assert b["idx"].shape == (bsz,) and b["idx"].dtype == torch.int64
        assert b["rows"].shape == (bsz,) and b["rows"].dtype == torch.int64
        rows = b["rows"].numpy()
        np.testing.assert_array_equal(b["x"].numpy(), x[rows])
        np.testing.assert_array_equal(b["d"].numpy(), data.dosage_rows(rows))
        np.testing.assert_allclose(b["library_size"].numpy(), x[rows].sum(1))
        assert b["x"].device == torch.device("cpu")
    assert set(batches[0]) == {"x", "d", "library_size", "idx", "rows"}


def test_no_shuffle_is_in_order():
    data, _ = make_data()
    loader = MinibatchLoader(data, "train", batch_size=6, shuffle=False)
    for _ in range(2):
        idx = torch.cat([b["idx"] for b in loader]).numpy()
        np.testing.assert_array_equal(idx, np.arange(loader.n_cells))
    assert loader.epoch == 0


def _order(loader):
    return torch.cat([b["idx"] for b in loader]).numpy()


def test_shuffle_seeded_and_differs_between_epochs():
    data, _ = make_data()
    a = MinibatchLoader(data, "train", batch_size=5, shuffle=True, seed=11)
    b = MinibatchLoader(data, "train", batch_size=5, shuffle=True, seed=11)
    c = MinibatchLoader(data, "train", batch_size=5, shuffle=True, seed=12)
    a1, a2, a3 = _order(a), _order(a), _order(a)
    b1, b2 = _order(b), _order(b)
    np.testing.assert_array_equal(a1, b1)  # same seed: same order
    np.testing.assert_array_equal(a2, b2)  # ... every epoch
    assert not np.array_equal(a1, a2) and not np.array_equal(a2, a3)  # reshuffled every epoch
    assert not np.array_equal(a1, np.arange(a.n_cells))  # actually shuffled
    assert not np.array_equal(a1, _order(c))  # another seed: another order
    assert a.epoch == 3


def test_drop_last():
    data, _ = make_data()
    loader = MinibatchLoader(data, "train", batch_size=7, drop_last=True)
    n = loader.n_cells
    assert n % 7 != 0  # the case under test
    batches = collect(loader)
    assert len(batches) == len(loader) == n // 7
    assert all(b["x"].shape[0] == 7 for b in batches)
    kept = MinibatchLoader(data, "train", batch_size=7, drop_last=False)
    assert len(kept) == len(collect(kept)) == n // 7 + 1


def test_drop_last_with_exact_multiple_and_large_batch():
    split = np.array(["train"] * 40 + ["val"] * 10)
    data, _ = make_data(split=split)
    assert len(MinibatchLoader(data, "train", batch_size=8, drop_last=True)) == 5
    assert len(MinibatchLoader(data, "train", batch_size=8, drop_last=False)) == 5
    big = MinibatchLoader(data, "train", batch_size=100, drop_last=True)
    assert len(big) == 0 and collect(big) == []
    whole = collect(MinibatchLoader(data, "train", batch_size=100))
    assert len(whole) == 1 and whole[0]["x"].shape == (40, G)


def test_extras_are_carried():
    data, _ = make_data()
    rng = np.random.default_rng(0)
    data.extras["qc"] = rng.random((N, 1))
    data.extras["delta_x"] = rng.random((N, data.n_treatments))
    data.extras["flag"] = np.arange(N)
    for b in MinibatchLoader(data, "val", batch_size=4, shuffle=True):
        rows = b["rows"].numpy()
        assert b["qc"].shape == (len(rows), 1) and b["qc"].dtype == torch.float32
        assert b["delta_x"].shape == (len(rows), data.n_treatments)
        np.testing.assert_allclose(b["qc"].numpy(), data.extras["qc"][rows].astype(np.float32))
        np.testing.assert_allclose(b["delta_x"].numpy(), data.extras["delta_x"][rows].astype(np.float32))
        np.testing.assert_array_equal(b["flag"].numpy(), rows.astype(np.float32))


def test_sparse_densified_only_per_batch(monkeypatch):
    data, x = make_data(sparse=True)
    calls: list[np.ndarray] = []
    real_rows = data.rows

    def spy(idx):
        calls.append(np.array(idx))
        return real_rows(idx)

    monkeypatch.setattr(data, "rows", spy)
    loader = MinibatchLoader(data, "train", batch_size=6, shuffle=True, seed=1)
    batches = collect(loader)
    assert len(calls) == len(batches) == len(loader)
    assert all(len(c) <= 6 for c in calls)  # never the whole matrix
    assert sum(len(c) for c in calls) == loader.n_cells
    for c, b in zip(calls, batches):
        np.testing.assert_array_equal(c, b["rows"].numpy())
        np.testing.assert_array_equal(b["x"].numpy(), x[c])
    assert sp.issparse(data.counts)  # the source matrix is never replaced by a dense one


def test_sparse_batch_never_calls_toarray_on_whole_matrix(monkeypatch):
    data, _ = make_data(sparse=True)
    shapes: list[tuple[int, int]] = []
    real_toarray = sp.csr_matrix.toarray

    def spy(self, *args, **kwargs):
        shapes.append(self.shape)
        return real_toarray(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", spy)
    collect(MinibatchLoader(data, "train", batch_size=4))
    assert shapes and all(s[0] <= 4 for s in shapes)
    # the dosage matrix too: it stays CSR and only a minibatch's rows are densified
    assert sp.isspmatrix_csr(data.dosage) and (4, data.n_treatments) in shapes


def test_split_none_and_explicit_indices():
    split = np.array(["train"] * 20 + ["val"] * 10 + ["test"] * 10 + [""] * 10)
    data, x = make_data(split=split)
    loader = MinibatchLoader(data, None, batch_size=16)
    assert loader.n_cells == 40  # all cells with a split, not the unused ones
    rows = torch.cat([b["rows"] for b in loader]).numpy()
    np.testing.assert_array_equal(rows, np.arange(40))
    explicit = np.array([45, 3, 17])
    loader = MinibatchLoader(data, "train", batch_size=2, indices=explicit)  # indices override split
    batches = collect(loader)
    np.testing.assert_array_equal(torch.cat([b["rows"] for b in batches]).numpy(), explicit)
    np.testing.assert_array_equal(torch.cat([b["idx"] for b in batches]).numpy(), [0, 1, 2])
    np.testing.assert_array_equal(batches[0]["x"].numpy(), x[[45, 3]])


def test_batch_method_positions():
    data, x = make_data()
    loader = MinibatchLoader(data, "train")
    pos = np.array([4, 0, 2])
    b = loader.batch(pos)
    np.testing.assert_array_equal(b["idx"].numpy(), pos)
    np.testing.assert_array_equal(b["rows"].numpy(), data.indices("train")[pos])
    np.testing.assert_array_equal(b["x"].numpy(), x[data.indices("train")[pos]])


def test_backed_data(tmp_path):
    labels = np.array(["control", "A", "B", "A+B", "C"] * (N // 5))
    x = np.random.default_rng(5).poisson(2.0, size=(N, G)).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(x))
    a.obs_names = [f"c{i}" for i in range(N)]
    a.var_names = [f"g{j}" for j in range(G)]
    a.obs["perturbation"] = labels
    path = tmp_path / "d.h5ad"
    a.write_h5ad(path)
    data = load_perturbation_data(path, backed=True)
    for b in MinibatchLoader(data, "train", batch_size=8, shuffle=True, seed=0):
        np.testing.assert_array_equal(b["x"].numpy(), x[b["rows"].numpy()])


def test_empty_split_raises():
    split = np.array(["train"] * 40 + ["val"] * 10)
    data, _ = make_data(split=split)
    with pytest.raises(
        ValueError, match=r"the 'test' split has no cells; check the split column or fractions"
    ):
        MinibatchLoader(data, "test")
    with pytest.raises(ValueError, match="has no cells"):
        MinibatchLoader(data, "train", indices=np.array([], dtype=int))


def test_unknown_split_raises():
    data, _ = make_data()
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        MinibatchLoader(data, "dev")


# ------------------------------------------------------------------------------------- block sampling
def _backed(tmp_path, n=203, g=6, dense=False):
    x = np.random.default_rng(7).poisson(1.5, size=(n, g)).astype(np.float32)
    a = ad.AnnData(x if dense else sp.csr_matrix(x))
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = [f"g{j}" for j in range(g)]
    a.obs["perturbation"] = np.array(["control", "A", "B", "A+B"] * n)[:n]
    path = tmp_path / "b.h5ad"
    a.write_h5ad(path)
    return load_perturbation_data(path, backed=True), x


@pytest.mark.parametrize("dense", [False, True])
def test_backed_training_reads_blocks_and_covers_every_cell_once(tmp_path, monkeypatch, dense):
    data, x = _backed(tmp_path, dense=dense)
    loader = MinibatchLoader(
        data, "train", batch_size=16, shuffle=True, seed=4, block_size=20, buffer_blocks=3
    )
    reads = []
    orig = loader_mod.read_rows
    monkeypatch.setattr(loader_mod, "read_rows", lambda m, rows: reads.append(len(rows)) or orig(m, rows))
    monkeypatch.setattr(PerturbationData, "rows", lambda self, idx: pytest.fail("scattered per-cell read"))
    want = data.indices("train")
    epochs = []
    for _ in range(2):
        batches = collect(loader)
        rows = torch.cat([b["rows"] for b in batches]).numpy()
        idx = torch.cat([b["idx"] for b in batches]).numpy()
        np.testing.assert_array_equal(np.sort(idx), np.arange(len(want)))  # every cell once
        np.testing.assert_array_equal(want[idx], rows)
        for b in batches:
            np.testing.assert_array_equal(b["x"].numpy(), x[b["rows"].numpy()])
            np.testing.assert_array_equal(b["d"].numpy(), data.dosage_rows(b["rows"].numpy()))
        assert [len(b["idx"]) for b in batches[:-1]] == [16] * (len(batches) - 1)  # full batches
        epochs.append(idx)
    assert len(reads) == 2 * int(np.ceil(len(want) / 20))  # one read per block of 20 cells
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    again = MinibatchLoader(
        data, "train", batch_size=16, shuffle=True, seed=4, block_size=20, buffer_blocks=3
    )
    np.testing.assert_array_equal(torch.cat([b["idx"] for b in again]).numpy(), epochs[0])  # reproducible


def test_block_sampling_auto_only_for_backed_data(tmp_path):
    data, _ = _backed(tmp_path)
    assert MinibatchLoader(data, "train", shuffle=True).block_size == 1024
    assert MinibatchLoader(data, "train", shuffle=False).block_size is None
    assert MinibatchLoader(data, "train", shuffle=True, block_size=None).block_size is None
    mem, _ = make_data()
    assert MinibatchLoader(mem, "train", shuffle=True).block_size is None
    with pytest.raises(ValueError, match="block_size"):
        MinibatchLoader(mem, "train", block_size=0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_block_sampling_in_memory_drop_last(drop_last):
    data, x = make_data()
    want = data.indices("train")
    loader = MinibatchLoader(
        data, "train", 4, shuffle=True, seed=1, block_size=3, buffer_blocks=2, drop_last=drop_last
    )
    batches = collect(loader)
    sizes = [len(b["idx"]) for b in batches]
    if drop_last:
        assert sizes == [4] * (len(want) // 4)
    else:
        assert sum(sizes) == len(want) and all(s == 4 for s in sizes[:-1])
    for b in batches:
        np.testing.assert_array_equal(b["x"].numpy(), x[b["rows"].numpy()])


@pytest.mark.parametrize("block_size", [None, 6])
def test_shards_partition_every_global_batch(block_size):
    data, x = make_data()
    want = data.indices("train")
    kw = dict(batch_size=4, shuffle=True, seed=2, block_size=block_size, buffer_blocks=2)
    full = collect(MinibatchLoader(data, "train", **{**kw, "batch_size": 8}))
    shards = [collect(MinibatchLoader(data, "train", shard=(r, 2), **kw)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(MinibatchLoader(data, "train", shard=(1, 2), **kw))
    for g, b0, b1 in zip(full, *shards):  # the ranks' minibatches are the halves of the global one
        np.testing.assert_array_equal(np.concatenate([b0["idx"], b1["idx"]]), g["idx"].numpy())
        for b in (b0, b1):
            np.testing.assert_array_equal(b["x"].numpy(), x[b["rows"].numpy()])
    idx = np.concatenate([b["idx"].numpy() for s in shards for b in s])
    lost = len(want) - len(idx)  # only a last global batch with fewer cells than ranks is dropped
    assert len(np.unique(idx)) == len(idx) and 0 <= lost < 2
    with pytest.raises(ValueError, match="shard"):
        MinibatchLoader(data, "train", shard=(2, 2))
