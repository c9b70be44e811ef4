"""Perturbation labels -> dosage matrix D: parsing, vocabularies, unique-combination encoding, controls."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from pyrovae.data.dosage import (
    COMMON_CONTROL_LABELS,
    build_dosage,
    canonical_label,
    dosage_for,
    find_control_label,
    parse_label,
    treatment_vocabulary,
)

# ---------------------------------------------------------------------------------------------- parse_label


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("control", ()),
        ("  control ", ()),
        ("A", ("A",)),
        (" A ", ("A",)),
        ("A+B", ("A", "B")),
        ("B+A", ("A", "B")),
        ("B + A", ("A", "B")),
        ("C+A+B", ("A", "B", "C")),
        ("A+A", ("A",)),
        ("A+ctrl", ("A",)),
        ("ctrl+A", ("A",)),
        ("A+control", ("A",)),
        ("A+Non-Targeting", ("A",)),
        ("ctrl", ()),
        ("ctrl+ctrl", ()),
    ],
)
def test_parse_label(label, expected):
    assert parse_label(label, "control") == expected


def test_parse_label_custom_separator():
    assert parse_label("B_A", "control", sep="_") == ("A", "B")
    assert parse_label("A_ctrl", "control", sep="_") == ("A",)
    # with "_" as separator, "+" is part of a name
    assert parse_label("A+B", "control", sep="_") == ("A+B",)
    # the default separator does not split on "_"
    assert parse_label("A_B", "control") == ("A_B",)


def test_parse_label_custom_control_label():
    assert parse_label("NTC", "NTC") == ()
    assert parse_label("A+NTC", "NTC") == ("A",)
    assert parse_label("A+ntc", "NTC") == ("A",)  # tokens compared case-insensitively


@pytest.mark.parametrize("label", ["", "   "])
def test_parse_label_empty_raises(label):
    with pytest.raises(ValueError, match=r"empty perturbation label .*control label 'control'"):
        parse_label(label, "control")


def test_parse_label_non_string_raises():
    with pytest.raises(ValueError, match="empty perturbation label"):
        parse_label(None, "control")  # type: ignore[arg-type]


@pytest.mark.parametrize("label", ["A+", "+A", "A++B", "A+ +B"])
def test_parse_label_empty_token_raises(label):
    with pytest.raises(ValueError, match=r"empty part around the separator '\+'.*combo_sep"):
        parse_label(label, "control")


def test_parse_label_empty_token_custom_sep_message():
    with pytest.raises(ValueError, match=r"around the separator '_'"):
        parse_label("A_", "control", sep="_")


def test_canonical_label():
    assert canonical_label(("B", "A"), "control") == "A+B"
    assert canonical_label((), "control") == "control"
    assert canonical_label(("A",), "ctrl", sep="_") == "A"
    assert canonical_label(("B", "A"), "ctrl", sep="_") == "A_B"


def test_treatment_vocabulary():
    parsed = [(), ("B",), ("A", "C"), ("A",)]
    assert treatment_vocabulary(parsed, False, "+") == ["A", "B", "C"]
    assert treatment_vocabulary(parsed, True, "+") == ["A", "A+C", "B"]
    assert treatment_vocabulary([(), ()], False, "+") == []


# --------------------------------------------------------------------------------------------- build_dosage


def test_build_dosage_multi_hot():
    labels = ["control", "B", "A", "A+B", "B+A", "C", "control", "A+ctrl"]
    d, treatments, canon = build_dosage(labels, "control")
    assert treatments == ["A", "B", "C"]  # sorted treatment names
    assert d.dtype == np.float32
    assert d.shape == (8, 3)
    expected = np.array(
        [
            [0, 0, 0],
            [0, 1, 0],
            [1, 0, 0],
            [1, 1, 0],
            [1, 1, 0],
            [0, 0, 1],
            [0, 0, 0],
            [1, 0, 0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(d, expected)
    assert list(canon) == ["control", "B", "A", "A+B", "A+B", "C", "control", "A"]


def test_build_dosage_controls_all_zero():
    labels = np.array(["ctrl", "X", "ctrl", "Y+X"])
    d, treatments, canon = build_dosage(labels, "ctrl")
    assert treatments == ["X", "Y"]
    assert not d[[0, 2]].any()
    assert set(np.unique(d)) <= {0.0, 1.0}
    assert list(canon) == ["ctrl", "X", "ctrl", "X+Y"]


def test_build_dosage_column_order_is_sorted_not_first_seen():
    d, treatments, _ = build_dosage(["zeta", "alpha", "Mid", "control"], "control")
    assert treatments == sorted(["zeta", "alpha", "Mid"]) == ["Mid", "alpha", "zeta"]
    np.testing.assert_array_equal(d[0], [0, 0, 1])
    np.testing.assert_array_equal(d[1], [0, 1, 0])
    np.testing.assert_array_equal(d[2], [1, 0, 0])


def test_build_dosage_custom_separator():
    d, treatments, canon = build_dosage(["control", "B_A", "A"], "control", sep="_")
    assert treatments == ["A", "B"]
    np.testing.assert_array_equal(d, [[0, 0], [1, 1], [1, 0]])
    assert list(canon) == ["control", "A_B", "A"]


def test_build_dosage_unique_combinations_one_hot():
    labels = ["control", "A", "B", "A+B", "B+A", "A+C"]
    d, treatments, canon = build_dosage(labels, "control", encode_combos_as_unique=True)
    assert treatments == ["A", "A+B", "A+C", "B"]
    # every perturbed cell has exactly one treatment, controls none
    np.testing.assert_array_equal(d.sum(1), [0, 1, 1, 1, 1, 1])
    col = {t: j for j, t in enumerate(treatments)}
    for row, lab in zip(d, canon):
        if lab != "control":
            assert row[col[lab]] == 1.0
    # "A+B" and "B+A" are the same combination
    np.testing.assert_array_equal(d[3], d[4])
    # a combination's column is not the sum of its singles' columns
    assert d[3, col["A"]] == 0 and d[3, col["B"]] == 0


def test_build_dosage_unique_combinations_custom_sep():
    d, treatments, _ = build_dosage(["control", "B_A", "A"], "control", sep="_", encode_combos_as_unique=True)
    assert treatments == ["A", "A_B"]
    np.testing.assert_array_equal(d, [[0, 0], [0, 1], [1, 0]])


def test_build_dosage_fixed_vocabulary():
    vocab = ["A", "B", "C", "D"]  # a trained model's treatments: keeps columns even if unused here
    d, treatments, _ = build_dosage(["control", "C", "B+A"], "control", treatments=vocab)
    assert treatments == vocab
    np.testing.assert_array_equal(d, [[0, 0, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]])


def test_build_dosage_fixed_vocabulary_order_is_kept():
    vocab = ["C", "A", "B"]  # not sorted: the model's order wins
    d, treatments, _ = build_dosage(["A", "C"], "control", treatments=vocab)
    assert treatments == vocab
    np.testing.assert_array_equal(d, [[0, 1, 0], [1, 0, 0]])


def test_build_dosage_unknown_treatment_raises_naming_it():
    with pytest.raises(ValueError, match=r"unknown perturbation\(s\) Z \(of 1\).*2 treatments.*A, B"):
        build_dosage(["control", "A", "A+Z"], "control", treatments=["A", "B"])


def test_build_dosage_unknown_treatments_listed_sorted():
    with pytest.raises(ValueError, match=r"unknown perturbation\(s\) Y, Z \(of 2\)"):
        build_dosage(["Z", "Y", "A"], "control", treatments=["A"])


def test_build_dosage_unknown_combination_with_unique_encoding():
    # the singles are known, but the combination was never trained as its own treatment
    with pytest.raises(ValueError, match=r"unknown perturbation\(s\) A\+B"):
        build_dosage(["A+B"], "control", encode_combos_as_unique=True, treatments=["A", "B"])


def test_build_dosage_empty_label_raises():
    with pytest.raises(ValueError, match="empty perturbation label '': every cell needs a label"):
        build_dosage(["control", "", "A"], "control")


def test_build_dosage_broken_label_raises():
    with pytest.raises(ValueError, match=r"'A\+' has an empty part"):
        build_dosage(["control", "A+"], "control")


def test_build_dosage_all_controls_gives_zero_columns():
    d, treatments, canon = build_dosage(["control", "control"], "control")
    assert treatments == []
    assert d.shape == (2, 0)
    assert list(canon) == ["control", "control"]


def test_dosage_for():
    treatments = ["A", "B", "C"]
    d = dosage_for(["A", "B+A", "control", "C+ctrl"], treatments, "control")
    np.testing.assert_array_equal(d, [[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]])
    d = dosage_for(["A+B", "C"], ["A", "A+B", "C"], "control", encode_combos_as_unique=True)
    np.testing.assert_array_equal(d, [[0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="unknown perturbation.*Q"):
        dosage_for(["Q"], treatments, "control")


# -------------------------------------------------------------------------------------- find_control_label


@pytest.mark.parametrize("ctrl", ["control", "Control", "CTRL", "ctrl", "non-targeting", "Non-Targeting"])
def test_find_control_label_recognises_common_labels(ctrl):
    assert find_control_label(["A", ctrl, "B+A"], None) == ctrl  # original spelling is returned


def test_find_control_label_all_common_labels_recognised():
    for ctrl in COMMON_CONTROL_LABELS:
        assert find_control_label(["A", ctrl.upper()], None) == ctrl.upper()


def test_find_control_label_given_label():
    assert find_control_label(["A", "NTC", "control"], "NTC") == "NTC"


def test_find_control_label_given_label_absent_raises():
    with pytest.raises(ValueError, match=r"no control cells: no cell has the label 'NTC'.*control_label="):
        find_control_label(["A", "B", "control"], "NTC")


def test_find_control_label_none_found_raises():
    with pytest.raises(
        ValueError, match=r"no control cells: none of the common control labels.*control_label="
    ):
        find_control_label(["A", "B", "A+B"], None)


def test_find_control_label_error_lists_labels():
    with pytest.raises(ValueError, match=r"labels include \['A', 'B'\]"):
        find_control_label(["B", "A"], None)


def test_short_gene_like_labels_are_not_controls():
    # "NT" can be a target name; only unambiguous control spellings are recognised
    assert find_control_label(["NT", "control", "A"], None) == "control"


def test_sparse_dosage_equals_the_dense_one_and_is_never_dense():
    labels = np.array(["ctrl", "A", "B+A", "C", "A"] * 3)
    dense, treatments, canon = build_dosage(labels, "ctrl")
    d, treatments2, canon2 = build_dosage(labels, "ctrl", sparse=True)
    assert sp.isspmatrix_csr(d) and d.dtype == np.float32 and d.nnz == int((dense != 0).sum())
    np.testing.assert_array_equal(d.toarray(), dense)
    assert treatments2 == treatments and list(canon2) == list(canon)
    # memory O(nnz + N): 20,000 cells x 2,000 treatments would be 160 MB dense
    rng = np.random.default_rng(0)
    names = np.array([f"P{t}" for t in range(2000)] + ["ctrl"])
    many = names[rng.integers(0, len(names), size=20_000)]
    tracemalloc.start()
    try:
        big, _, _ = build_dosage(many, "ctrl", sparse=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert big.shape == (20_000, 2000) and big.nnz == int((many != "ctrl").sum())
    assert peak < 40 * 2**20, peak / 2**20  # the unique labels' (U, T) rows (16 MB) and O(N) arrays
