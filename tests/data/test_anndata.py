"""Reading and validating AnnData: matrices, library sizes, N_t, normalisation, splits, input errors."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyrovae.data.anndata import load_perturbation_data, log_norm_stats
from pyrovae.data.perturbation_data import PerturbationData, untrained_treatments
from pyrovae.data.protocols import make_split

LABELS = np.array(["control", "A", "B", "B+A"] * 30)  # 120 cells, "B+A" is read as "A+B"


def make_adata(
    labels=LABELS,
    g: int = 6,
    sparse: bool = False,
    seed: int = 0,
    x: np.ndarray | None = None,
) -> tuple[ad.AnnData, np.ndarray]:
    """A tiny AnnData with Poisson counts in X; returns it and the dense counts."""
    labels = np.asarray(labels, dtype=object)
    n = len(labels)
    if x is None:
        x = np.random.default_rng(seed).poisson(3.0, size=(n, g)).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(x) if sparse else x.copy())
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = [f"g{j}" for j in range(x.shape[1])]
    a.obs["perturbation"] = labels
    return a, x


def lognorm(x: np.ndarray) -> np.ndarray:
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)


def dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


# ------------------------------------------------------------------------------------- matrices and layers


@pytest.mark.parametrize("sparse", [False, True])
def test_reads_x(sparse):
    a, x = make_adata(sparse=sparse)
    data = load_perturbation_data(a)
    assert isinstance(data, PerturbationData)
    assert data.n_cells == 120 and data.n_genes == 6 and data.n_treatments == 2
    assert data.genes == [f"g{j}" for j in range(6)]
    np.testing.assert_array_equal(dense(data.counts), x)
    assert data.is_count_data


def test_sparse_stays_sparse():
    a, _ = make_adata(sparse=True)
    data = load_perturbation_data(a)
    assert isinstance(data.counts, sp.csr_matrix)
    assert data.counts.dtype == np.float32


def test_csc_is_converted_to_csr():
    a, x = make_adata()
    a.X = sp.csc_matrix(x)
    data = load_perturbation_data(a)
    assert isinstance(data.counts, sp.csr_matrix)
    np.testing.assert_array_equal(data.counts.toarray(), x)


def test_dense_stays_dense_float32():
    a, x = make_adata()
    a.X = x.astype(np.int64)
    data = load_perturbation_data(a)
    assert isinstance(data.counts, np.ndarray)
    assert data.counts.dtype == np.float32
    np.testing.assert_array_equal(data.counts, x)


@pytest.mark.parametrize("sparse", [False, True])
def test_reads_named_layer(sparse):
    a, x = make_adata()
    a.X = lognorm(x)  # X holds log-normalised values, the layer raw counts
    a.layers["counts"] = sp.csr_matrix(x) if sparse else x.copy()
    data = load_perturbation_data(a, layer="counts")
    np.testing.assert_array_equal(dense(data.counts), x)
    assert sp.issparse(data.counts) == sparse
    np.testing.assert_allclose(data.library_size, x.sum(1))
    # X is not count data: reading it fails and points at the layer
    with pytest.raises(ValueError, match=r"X has non-integer values.*layer='counts'"):
        load_perturbation_data(a)


@pytest.mark.parametrize("sparse", [False, True])
def test_library_size(sparse):
    a, x = make_adata(sparse=sparse)
    data = load_perturbation_data(a)
    assert data.library_size.shape == (120,)
    assert data.library_size.dtype == np.float32
    np.testing.assert_allclose(data.library_size, x.sum(1))


def test_labels_dosage_and_metadata():
    a, _ = make_adata()
    a.obs["batch"] = "b0"
    a.uns["truth"] = {"effect": [1, 2]}
    data = load_perturbation_data(a)
    assert data.control_label == "control"
    assert data.sep == "+"
    assert not data.encode_combos_as_unique
    assert data.treatments == ["A", "B"]
    assert set(data.labels) == {"control", "A", "B", "A+B"}  # "B+A" canonicalised
    expected = {"control": [0, 0], "A": [1, 0], "B": [0, 1], "A+B": [1, 1]}
    for lab, row in zip(data.labels, data.dosage.toarray()):
        np.testing.assert_array_equal(row, expected[lab])
    assert sp.isspmatrix_csr(data.dosage) and data.dosage.dtype == np.float32  # D is never dense
    assert list(data.obs["batch"].unique()) == ["b0"]
    assert data.uns["truth"] == {"effect": [1, 2]}
    assert data.groups() == ["A", "A+B", "B"]


def test_encode_combos_as_unique():
    a, _ = make_adata()
    data = load_perturbation_data(a, encode_combos_as_unique=True)
    assert data.treatments == ["A", "A+B", "B"]
    np.testing.assert_array_equal(data.dosage.toarray().sum(1), (data.labels != "control").astype(np.float32))


def test_custom_separator_and_control_spellings():
    labels = np.array(["Non-Targeting", "A", "B_A", "A_ctrl", "non-targeting"] * 6)
    a, _ = make_adata(labels)
    data = load_perturbation_data(a, combo_sep="_")
    assert data.control_label in ("Non-Targeting", "non-targeting")
    other = ({"Non-Targeting", "non-targeting"} - {data.control_label}).pop()
    assert data.treatments == ["A", "B"]
    # the other spelling of the control is a control too (a dropped control token)
    assert list(data.labels[:5]) == [data.control_label, "A", "A_B", "A", data.control_label]
    assert not data.dosage_rows(np.flatnonzero(np.isin(labels, [data.control_label, other]))).any()
    # "control" outranks "ctrl" when both occur
    b, _ = make_adata(np.array(["ctrl", "A", "control", "B"] * 3))
    assert load_perturbation_data(b).control_label == "control"


def test_named_control_label():
    labels = np.array(["NTC", "A", "B"] * 10)
    a, _ = make_adata(labels)
    data = load_perturbation_data(a, control_label="NTC")
    assert data.control_label == "NTC"
    assert not data.dosage_rows(np.flatnonzero(labels == "NTC")).any()


# --------------------------------------------------------------------------------------------- N_t counts


def _hand_counts(raw_labels, split, which, treatments):
    cells = [i for i in range(len(raw_labels)) if which is None and split[i] != "" or split[i] == which]
    return np.array(
        [sum(1 for i in cells if t in str(raw_labels[i]).split("+")) for t in treatments], dtype=np.float32
    )


def test_treatment_counts_per_split():
    labels = np.array(["control", "A", "B", "B+A", "C+A", "A"] * 10)
    a, _ = make_adata(labels)
    data = load_perturbation_data(a)
    assert data.treatments == ["A", "B", "C"]
    for which in ("train", "val", "test", None):
        got = data.treatment_counts(which)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, _hand_counts(labels, data.split, which, data.treatments))
    # default split is train, and splits add up to the whole
    np.testing.assert_array_equal(data.treatment_counts(), data.treatment_counts("train"))
    total = sum(data.treatment_counts(s) for s in ("train", "val", "test"))
    np.testing.assert_array_equal(total, [40, 20, 10])
    assert data.schema()["train_treatment_counts"] == data.treatment_counts("train").tolist()


def test_untrained_treatments_are_those_without_training_cells():
    labels = np.array(["control", "A", "B", "A+C", "D"] * 8)
    a, _ = make_adata(labels)
    # C only in val/test, D only in test: both untrained; A and B have training cells
    a.obs["split"] = np.where(np.isin(labels, ["A+C", "D"]), "test", "train")
    a.obs.loc[a.obs_names[3], "split"] = "val"
    with pytest.warns(Warning, match="no training cell"):
        data = load_perturbation_data(a, split_key="split")
    assert data.treatments == ["A", "B", "C", "D"]
    np.testing.assert_array_equal(data.untrained(), [False, False, True, True])
    np.testing.assert_array_equal(
        untrained_treatments(data.schema()["train_treatment_counts"]), data.untrained()
    )
    assert untrained_treatments([0.0, 2.0]).dtype == bool


def test_treatment_counts_user_split_by_hand():
    labels = np.array(["control", "A", "B+A", "B", "control", "A"])
    split = np.array(["train", "train", "train", "val", "test", ""])
    a, _ = make_adata(labels)
    a.obs["split"] = split
    data = load_perturbation_data(a, split_key="split")
    np.testing.assert_array_equal(data.treatment_counts("train"), [2, 1])
    np.testing.assert_array_equal(data.treatment_counts("val"), [0, 1])
    np.testing.assert_array_equal(data.treatment_counts("test"), [0, 0])
    np.testing.assert_array_equal(data.treatment_counts(None), [2, 2])  # the unused cell is not counted


def test_treatment_counts_unique_encoding():
    labels = np.array(["control", "A", "B+A", "B", "A+B"])
    a, _ = make_adata(labels)
    a.obs["split"] = "train"
    data = load_perturbation_data(a, split_key="split", encode_combos_as_unique=True)
    assert data.treatments == ["A", "A+B", "B"]
    np.testing.assert_array_equal(data.treatment_counts("train"), [1, 2, 1])


# -------------------------------------------------------------------------------------------- normalisation


def _norm_fixture(sparse: bool):
    labels = np.array(["control", "A", "B", "A+B"] * 5)
    rng = np.random.default_rng(3)
    x = rng.poisson(4.0, size=(20, 5)).astype(np.float32)
    x[:, 0] = 0.0  # all-zero gene
    x[:, 1] = 7.0  # constant non-zero gene
    split = np.array(["train"] * 12 + ["val"] * 4 + ["test"] * 3 + [""])
    x[12:, 2:] += 500.0  # non-train cells very different: statistics must ignore them
    a, _ = make_adata(labels, x=x, sparse=sparse)
    a.obs["split"] = split
    return a, x, split


@pytest.mark.parametrize("sparse", [False, True])
def test_normalisation_stats_on_train_only(sparse):
    a, x, split = _norm_fixture(sparse)
    data = load_perturbation_data(a, split_key="split")
    train = np.log1p(x[split == "train"].astype(np.float64))
    assert data.norm_mean.shape == (5,) and data.norm_std.shape == (5,)
    assert data.norm_mean.dtype == np.float32 and data.norm_std.dtype == np.float32
    np.testing.assert_allclose(data.norm_mean[2:], train.mean(0)[2:], rtol=1e-5)
    np.testing.assert_allclose(data.norm_std[2:], train.std(0, ddof=1)[2:], rtol=1e-5)  # unbiased
    assert not np.allclose(data.norm_std[2:], train.std(0, ddof=0)[2:], rtol=1e-3)
    all_cells = np.log1p(x.astype(np.float64))
    assert not np.allclose(data.norm_mean[2:], all_cells.mean(0)[2:], rtol=1e-2)
    assert np.isfinite(data.norm_mean).all() and np.isfinite(data.norm_std).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_zero_variance_genes_get_std_one(sparse):
    a, _, _ = _norm_fixture(sparse)
    data = load_perturbation_data(a, split_key="split")
    assert data.norm_mean[0] == 0.0 and data.norm_std[0] == 1.0
    np.testing.assert_allclose(data.norm_mean[1], np.log1p(7.0), rtol=1e-6)
    assert data.norm_std[1] == 1.0


@pytest.mark.parametrize("value", [1.0, 5.0, 37.0, 1000.0])
@pytest.mark.parametrize("chunk", [3, 4096])
def test_log_norm_stats_constant_gene_is_exactly_one(value, chunk):
    # sum-of-squares cancellation used to leave std ~1e-7 for constant non-zero genes
    x = np.full((1000, 2), value, dtype=np.float32)
    x[:, 1] = np.arange(1000) % 4
    mean, std = log_norm_stats(x, np.arange(1000), chunk=chunk)
    np.testing.assert_allclose(mean[0], np.log1p(value), rtol=1e-6)
    assert std[0] == 1.0
    lx = np.log1p(x[:, 1].astype(np.float64))
    np.testing.assert_allclose(std[1], lx.std(ddof=1), rtol=1e-6)


def test_log_norm_stats_chunking_matches_numpy():
    x = np.random.default_rng(0).poisson(2.0, size=(50, 4)).astype(np.float32)
    idx = np.array([40, 3, 17, 8, 22, 1, 30, 49, 11])
    lx = np.log1p(x[idx].astype(np.float64))
    for chunk in (1, 2, 4, 100):
        mean, std = log_norm_stats(sp.csr_matrix(x), idx, chunk=chunk)
        np.testing.assert_allclose(mean, lx.mean(0), rtol=1e-6)
        np.testing.assert_allclose(std, lx.std(0, ddof=1), rtol=1e-5)


def test_log_norm_stats_without_log():
    x = np.array([[-3.0, 2.0], [1.0, 2.0], [5.0, 2.0]], dtype=np.float32)
    mean, std = log_norm_stats(x, np.arange(3), log=False)
    np.testing.assert_allclose(mean, [1.0, 2.0])
    np.testing.assert_allclose(std, [4.0, 1.0])  # unbiased std of (-3, 1, 5) = 4; constant -> 1


def test_log_norm_stats_no_rows():
    mean, std = log_norm_stats(np.ones((3, 2), dtype=np.float32), np.array([], dtype=int))
    np.testing.assert_array_equal(mean, [0, 0])
    np.testing.assert_array_equal(std, [1, 1])


# ------------------------------------------------------------------------------------------------- splits


def test_split_reproducible_for_seed():
    a, _ = make_adata()
    s1 = load_perturbation_data(a, split_seed=0).split
    s2 = load_perturbation_data(a, split_seed=0).split
    s3 = load_perturbation_data(a, split_seed=1).split
    np.testing.assert_array_equal(s1, s2)
    assert (s1 != s3).any()
    assert set(s1) == {"train", "val", "test"}


def test_split_stratified():
    labels = np.array(["control"] * 30 + ["A"] * 20 + ["B"] * 3 + ["C"] * 2 + ["D"])
    a, _ = make_adata(labels)
    data = load_perturbation_data(a, split_seed=4)
    for lab in ("control", "A", "B"):  # >= 3 cells: present in every split
        for s in ("train", "val", "test"):
            assert ((data.labels == lab) & (data.split == s)).any(), (lab, s)
    for lab in ("C", "D"):  # too few cells to split: all train
        assert (data.split[data.labels == lab] == "train").all()
    assert (data.split[data.labels == "control"] == "val").sum() == 3
    assert (data.split[data.labels == "control"] == "test").sum() == 3


def test_make_split_fractions():
    labels = np.array(["control"] * 100 + ["A"] * 50)
    split = make_split(labels, "control", val_frac=0.2, test_frac=0.1, seed=0)
    assert split.dtype.kind == "U"
    for lab, n in (("control", 100), ("A", 50)):
        s = split[labels == lab]
        assert (s == "val").sum() == round(0.2 * n)
        assert (s == "test").sum() == round(0.1 * n)
    split = make_split(labels, "control", val_frac=0.0, test_frac=0.0)
    assert (split == "train").all()


def test_make_split_unknown_mode():
    with pytest.raises(ValueError, match="unknown split mode 'genes'; use 'cells' or 'combinations'"):
        make_split(np.array(["control", "A"]), "control", mode="genes")


COMBO_LABELS = np.array(["control", "A", "B", "C", "B+A", "A+C", "B+C"] * 12)


def _combo_checks(data, held):
    is_held = np.isin(data.labels, list(held))
    assert is_held.any()
    assert (data.split[is_held] == "test").all()
    assert not np.isin(data.labels[data.split != "test"], list(held)).any()
    # in this mode only held-out combinations are tested; everything else is split train/val
    assert (data.split[~is_held] != "test").all()
    assert (data.split[~is_held] == "val").any()
    for lab in set(data.labels) - set(held):
        assert ((data.labels == lab) & (data.split == "train")).any()


def test_split_combinations_given_heldout():
    a, _ = make_adata(COMBO_LABELS)
    data = load_perturbation_data(a, split_mode="combinations", heldout=["A+B"])
    _combo_checks(data, {"A+B"})


@pytest.mark.parametrize("heldout", [["B+A"], "B+A", "A+B", ("B+A", "C+B")])
def test_split_combinations_heldout_spellings_canonicalised(heldout):
    a, _ = make_adata(COMBO_LABELS)
    data = load_perturbation_data(a, split_mode="combinations", heldout=heldout)
    expected = {"A+B", "B+C"} if isinstance(heldout, tuple) else {"A+B"}
    assert set(data.labels[data.split == "test"]) == expected
    _combo_checks(data, expected)


@pytest.mark.parametrize(("frac", "n_held"), [(None, 1), (0.5, 2), (1.0, 3), (0.01, 1)])
def test_split_combinations_fraction(frac, n_held):
    a, _ = make_adata(COMBO_LABELS)
    data = load_perturbation_data(a, split_mode="combinations", heldout=frac, split_seed=2)
    held = set(data.labels[data.split == "test"])
    assert len(held) == n_held
    assert held <= {"A+B", "A+C", "B+C"}
    _combo_checks(data, held)


def test_split_combinations_errors():
    a, _ = make_adata(COMBO_LABELS)
    with pytest.raises(ValueError, match=r"held-out combination\(s\) \['A\+D'\] are not combination labels"):
        load_perturbation_data(a, split_mode="combinations", heldout=["A+D"])
    with pytest.raises(ValueError, match=r"held-out combination\(s\) \['A'\] are not combination labels"):
        load_perturbation_data(a, split_mode="combinations", heldout=["A"])
    b, _ = make_adata(np.array(["control", "A", "B"] * 5))
    with pytest.raises(ValueError, match="split mode 'combinations' needs combination labels"):
        load_perturbation_data(b, split_mode="combinations")


def test_user_split_column_with_aliases_and_unused_cells():
    labels = np.array(["control", "A", "B", "control", "A", "B", "control", "A"])
    split = pd.Series(["train", "Training", "TRAIN", "validation", "valid", "test", "", np.nan], dtype=object)
    a, _ = make_adata(labels)
    a.obs["my_split"] = split.to_numpy()
    data = load_perturbation_data(a, split_key="my_split")
    assert list(data.split) == ["train", "train", "train", "val", "val", "test", "", ""]
    np.testing.assert_array_equal(data.indices("train"), [0, 1, 2])
    np.testing.assert_array_equal(data.indices("val"), [3, 4])
    np.testing.assert_array_equal(data.indices("test"), [5])
    np.testing.assert_array_equal(data.indices(None), [0, 1, 2, 3, 4, 5])  # unused cells excluded


def test_user_split_column_categorical_from_h5ad(tmp_path):
    labels = np.array(["control", "A", "B", "control", "A", "B"])
    a, _ = make_adata(labels)
    a.obs["split"] = pd.Categorical(["train", "train", "train", "val", np.nan, "test"])
    path = tmp_path / "split.h5ad"
    a.write_h5ad(path)
    data = load_perturbation_data(path, split_key="split")
    assert list(data.split) == ["train", "train", "train", "val", "", "test"]


def test_indices_unknown_split():
    a, _ = make_adata()
    data = load_perturbation_data(a)
    with pytest.raises(ValueError, match=r"unknown split 'training'; use one of \('train', 'val', 'test'\)"):
        data.indices("training")


# ----------------------------------------------------------------------------------------------- schemas


def test_schema_round_trip():
    a, _ = make_adata(np.array(["ctrl", "A", "B", "C"] * 10))
    train = load_perturbation_data(a, control_label="ctrl")
    schema = train.schema()
    assert schema["genes"] == train.genes and schema["treatments"] == ["A", "B", "C"]
    # new data with only some perturbations, and other counts: read the model's way
    b, _ = make_adata(np.array(["ctrl", "B"] * 6), seed=9)
    new = load_perturbation_data(b, schema=schema)
    assert new.treatments == ["A", "B", "C"]
    assert new.control_label == "ctrl"
    np.testing.assert_array_equal(new.dosage_rows([1])[0], [0, 1, 0])
    np.testing.assert_array_equal(new.norm_mean, train.norm_mean)
    np.testing.assert_array_equal(new.norm_std, train.norm_std)


def test_schema_unknown_perturbation():
    a, _ = make_adata()
    schema = load_perturbation_data(a).schema()
    b, _ = make_adata(np.array(["control", "A", "Z+A"] * 4))
    with pytest.raises(ValueError, match=r"unknown perturbation\(s\) Z .*predict them only with a model"):
        load_perturbation_data(b, schema=schema)


def test_schema_gene_mismatch():
    a, _ = make_adata()
    schema = load_perturbation_data(a).schema()
    b, _ = make_adata(g=7)
    b.var_names = [f"g{j}" for j in range(5)] + ["x0", "x1"]
    msg = (
        r"gene mismatch between the model \(6 genes\) and the data \(7 genes\): 1 model genes missing "
        r"from the data \(e\.g\. \['g5'\]\), 2 data genes unknown to the model \(e\.g\. \['x0', 'x1'\]\)"
        r".*adata\[:, model_genes\]"
    )
    with pytest.raises(ValueError, match=msg):
        load_perturbation_data(b, schema=schema)


def test_schema_gene_order_mismatch():
    a, _ = make_adata()
    schema = load_perturbation_data(a).schema()
    b = a[:, a.var_names[::-1]].copy()
    with pytest.raises(ValueError, match=r"model's genes in a different order.*adata\[:, model_genes\]"):
        load_perturbation_data(b, schema=schema)


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_perturbation_column():
    a, _ = make_adata()
    a.obs["batch"] = "b0"
    msg = r"obs has no column 'guide' .*obs columns are \['perturbation', 'batch'\].*perturbation_key="
    with pytest.raises(ValueError, match=msg):
        load_perturbation_data(a, perturbation_key="guide")


def test_missing_split_column():
    a, _ = make_adata()
    with pytest.raises(
        ValueError, match=r"obs has no split column 'fold'; obs columns are \['perturbation'\]"
    ):
        load_perturbation_data(a, split_key="fold")


def test_missing_layer():
    a, x = make_adata()
    with pytest.raises(ValueError, match=r"no layer 'counts'; its layers are \[\]"):
        load_perturbation_data(a, layer="counts")
    a.layers["raw"] = x
    with pytest.raises(ValueError, match=r"no layer 'counts'; its layers are \['raw'\].*layer=None"):
        load_perturbation_data(a, layer="counts")


def test_no_control_cells():
    a, _ = make_adata(np.array(["A", "B", "A+B"] * 4))
    with pytest.raises(ValueError, match="no control cells: none of the common control labels"):
        load_perturbation_data(a)
    b, _ = make_adata()
    with pytest.raises(ValueError, match="no control cells: no cell has the label 'NTC'"):
        load_perturbation_data(b, control_label="NTC")


def test_no_control_cells_in_any_split():
    labels = np.array(["control", "A", "B", "A", "B", "control"])
    a, _ = make_adata(labels)
    a.obs["split"] = ["", "train", "train", "val", "test", ""]
    with pytest.raises(ValueError, match=r"no control cells \('control'\) in any split"):
        load_perturbation_data(a, split_key="split")


def test_only_controls():
    a, _ = make_adata(np.array(["control"] * 6))
    with pytest.raises(ValueError, match="no perturbed cells: every cell is a control"):
        load_perturbation_data(a)


@pytest.mark.parametrize("categorical", [False, True])
def test_nan_labels(categorical):
    a, _ = make_adata(np.array(["control", "A", "B"] * 4))
    labels = pd.Series(["control", None, "A", np.nan] + ["B"] * 8, index=a.obs_names, dtype=object)
    a.obs["perturbation"] = labels.astype("category") if categorical else labels
    with pytest.raises(ValueError, match=r"2 cells have a missing \(NaN\) label in obs\['perturbation'\]"):
        load_perturbation_data(a)


def test_empty_label():
    a, _ = make_adata(np.array(["control", "A", "", "B"] * 3))
    with pytest.raises(ValueError, match=r"empty perturbation label '': every cell needs a label"):
        load_perturbation_data(a)


def test_broken_combination_label():
    a, _ = make_adata(np.array(["control", "A", "A+", "B"] * 3))
    with pytest.raises(ValueError, match=r"perturbation label 'A\+' has an empty part"):
        load_perturbation_data(a)


def test_unknown_split_values():
    a, _ = make_adata(np.array(["control", "A", "B", "control"]))
    a.obs["split"] = ["train", "dev", "holdout", "train"]
    msg = (
        r"unknown split value\(s\) \['dev', 'holdout'\]; the split column must hold 'train', 'val' or 'test'"
    )
    with pytest.raises(ValueError, match=msg):
        load_perturbation_data(a, split_key="split")


def test_empty_training_split():
    a, _ = make_adata(np.array(["control", "A", "B", "control"]))
    a.obs["split"] = ["val", "test", "test", ""]
    with pytest.raises(ValueError, match="the training split is empty"):
        load_perturbation_data(a, split_key="split")


@pytest.mark.parametrize("sparse", [False, True])
def test_negative_counts(sparse):
    a, x = make_adata(sparse=sparse)
    x = x.copy()
    x[3, 2] = -1.0
    a.X = sp.csr_matrix(x) if sparse else x
    with pytest.raises(ValueError, match=r"X has negative values.*raw integer UMI counts.*layer='counts'"):
        load_perturbation_data(a)


@pytest.mark.parametrize("sparse", [False, True])
def test_non_integer_counts(sparse):
    a, x = make_adata()
    a.X = sp.csr_matrix(lognorm(x)) if sparse else lognorm(x)
    msg = r"X has non-integer values.*looks normalised or log-transformed.*layer='counts' / --layer counts"
    with pytest.raises(ValueError, match=msg):
        load_perturbation_data(a)


def test_non_integer_counts_in_layer_names_layer():
    a, x = make_adata()
    a.layers["norm"] = lognorm(x)
    with pytest.raises(ValueError, match=r"layer 'norm' has non-integer values"):
        load_perturbation_data(a, layer="norm")


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("require_counts", [True, False])
def test_nan_counts(sparse, bad, require_counts):
    a, x = make_adata()
    x = x.copy()
    x[5, 1] = bad
    a.X = sp.csr_matrix(x) if sparse else x
    with pytest.raises(ValueError, match="X contains NaN or infinite values; remove or impute"):
        load_perturbation_data(a, require_counts=require_counts)


def test_duplicated_gene_names():
    a, _ = make_adata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.var_names = ["g0", "g1", "g0", "g2", "g1", "g3"]
    msg = (
        r"duplicated gene names \['g0', 'g1'\]: gene names must be unique; .*adata\.var_names_make_unique\(\)"
    )
    with pytest.raises(ValueError, match=msg):
        load_perturbation_data(a)


def test_require_counts_false_accepts_lognormalised():
    a, x = make_adata()
    a.X = lognorm(x)
    data = load_perturbation_data(a, require_counts=False)
    assert not data.is_count_data
    np.testing.assert_allclose(data.counts, lognorm(x))
    np.testing.assert_allclose(data.library_size, lognorm(x).sum(1), rtol=1e-5)
    # the encoder standardises non-count data as it is (not log1p): statistics of the values themselves
    train = lognorm(x)[data.split == "train"].astype(np.float64)
    np.testing.assert_allclose(data.norm_mean, train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(data.norm_std, train.std(0, ddof=1), rtol=1e-5)


def test_require_counts_false_accepts_scaled_negative_data():
    a, x = make_adata()
    scaled = (lognorm(x) - lognorm(x).mean(0)) * 3.0  # values well below -1: log1p would give NaN
    assert scaled.min() < -1.0
    a.X = scaled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value in log1p"
        data = load_perturbation_data(a, require_counts=False)
    assert not data.is_count_data
    assert np.isfinite(data.norm_mean).all() and np.isfinite(data.norm_std).all()
    train = scaled[data.split == "train"].astype(np.float64)
    np.testing.assert_allclose(data.norm_mean, train.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(data.norm_std, train.std(0, ddof=1), rtol=1e-5)


def test_non_h5ad_path(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} is not an .h5ad file") + ".*write_h5ad"):
        load_perturbation_data(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.h5ad"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no such file: {path}")):
        load_perturbation_data(str(path))


# ---------------------------------------------------------------------------------- files, backed, rows


@pytest.mark.parametrize("sparse", [False, True])
def test_path_in_memory_matches_anndata(tmp_path, sparse):
    a, x = make_adata(sparse=sparse)
    a.uns["note"] = "hi"
    path = tmp_path / "d.h5ad"
    a.write_h5ad(path)
    mem = load_perturbation_data(a)
    disk = load_perturbation_data(str(path))
    assert isinstance(disk.counts, sp.csr_matrix if sparse else np.ndarray)
    np.testing.assert_array_equal(dense(disk.counts), x)
    np.testing.assert_array_equal(disk.split, mem.split)
    np.testing.assert_array_equal(disk.labels, mem.labels)
    np.testing.assert_array_equal(disk.dosage.toarray(), mem.dosage.toarray())
    np.testing.assert_array_equal(disk.norm_mean, mem.norm_mean)
    assert disk.uns["note"] == "hi"


@pytest.mark.parametrize("sparse", [False, True])
def test_backed_matches_in_memory(tmp_path, sparse):
    a, x = make_adata(sparse=sparse)
    path = tmp_path / "d.h5ad"
    a.write_h5ad(path)
    mem = load_perturbation_data(path)
    backed = load_perturbation_data(path, backed=True)
    # the matrix stays on disk
    assert not isinstance(backed.counts, np.ndarray) and not sp.issparse(backed.counts)
    np.testing.assert_array_equal(backed.library_size, mem.library_size)
    np.testing.assert_allclose(backed.library_size, x.sum(1))
    np.testing.assert_allclose(backed.norm_mean, mem.norm_mean, rtol=1e-6)
    np.testing.assert_allclose(backed.norm_std, mem.norm_std, rtol=1e-6)
    np.testing.assert_array_equal(backed.split, mem.split)
    np.testing.assert_array_equal(backed.dosage.toarray(), mem.dosage.toarray())
    assert backed.is_count_data
    np.testing.assert_array_equal(backed.rows(np.arange(x.shape[0])), x)


def test_backed_with_counts_layer(tmp_path):
    a, x = make_adata()
    a.X = lognorm(x)
    a.layers["counts"] = sp.csr_matrix(x)
    path = tmp_path / "d.h5ad"
    a.write_h5ad(path)
    data = load_perturbation_data(path, backed=True, layer="counts")
    np.testing.assert_allclose(data.library_size, x.sum(1))
    np.testing.assert_array_equal(data.rows(np.array([9, 0, 4])), x[[9, 0, 4]])
    with pytest.raises(ValueError, match=r"X has non-integer values.*layer='counts'"):
        load_perturbation_data(path, backed=True)


def test_backed_bad_values_detected(tmp_path):
    a, x = make_adata()
    a.X = lognorm(x)
    path = tmp_path / "d.h5ad"
    a.write_h5ad(path)
    with pytest.raises(ValueError, match="X has non-integer values"):
        load_perturbation_data(path, backed=True)
    assert not load_perturbation_data(path, backed=True, require_counts=False).is_count_data


@pytest.mark.parametrize("mode", ["dense", "sparse", "backed-dense", "backed-sparse"])
def test_rows_unsorted_indices(tmp_path, mode):
    a, x = make_adata(sparse=mode.endswith("sparse"))
    if mode.startswith("backed"):
        path = tmp_path / "d.h5ad"
        a.write_h5ad(path)
        data = load_perturbation_data(path, backed=True)
    else:
        data = load_perturbation_data(a)
    for idx in ([7, 2, 9, 2, 0], [119, 0], [5], list(range(119, -1, -3))):
        block = data.rows(np.array(idx))
        assert isinstance(block, np.ndarray) and block.dtype == np.float32
        assert block.shape == (len(idx), 6)
        np.testing.assert_array_equal(block, x[idx])
    if not mode.startswith("backed"):  # the source matrix is untouched
        assert sp.issparse(data.counts) == mode.endswith("sparse")


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2])
def test_heldout_fraction_out_of_range_is_refused(bad):
    from tests.helpers import make_adata

    with pytest.raises(ValueError, match=r"fraction of the combinations must be in \(0, 1\]"):
        load_perturbation_data(make_adata(), split_mode="combinations", heldout=bad)


def test_heldout_fraction_accepts_any_real_number():
    from tests.helpers import make_adata

    data = load_perturbation_data(make_adata(), split_mode="combinations", heldout=np.float32(1.0))
    assert set(data.split[data.labels == "A+B"]) == {"test"}
    assert load_perturbation_data(make_adata(), split_mode="combinations", heldout=1).n_cells > 0


def test_heldout_without_combination_split_is_refused():
    """A hold-out that would be ignored (cells split, or a split column) is an error, not a no-op."""
    from tests.helpers import make_adata

    with pytest.raises(ValueError, match="only applies to split mode 'combinations'"):
        load_perturbation_data(make_adata(), heldout=["A+B"])
    a = make_adata()
    a.obs["split"] = "train"
    with pytest.raises(ValueError, match="cannot be used with the split column 'split'"):
        load_perturbation_data(a, split_key="split", split_mode="combinations", heldout=0.5)
