"""Protocol splits: held-out combinations never trained, nesting in f, fractions, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyrovae.data.protocols import (
    canonical_labels,
    cell_split,
    combinatorial_split,
    data_efficiency_split,
    heldout_combinations_split,
    split_combinations,
    split_summary,
)

FRACS = (0.0, 0.25, 0.5, 0.75, 1.0)


def make_labels(n_genes: int = 10, n_combos: int = 21, cells: int = 40, seed: int = 0) -> np.ndarray:
    """Controls, singles and two-gene combinations (written in both orders), ``cells`` cells each."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    pairs = set()
    while len(pairs) < n_combos:
        a, b = rng.choice(n_genes, 2, replace=False)
        pairs.add((min(a, b), max(a, b)))
    labels = ["control"] * cells
    for g in genes:
        labels += [g] * cells
    for a, b in sorted(pairs):
        # both spellings of the same combination: the protocol must treat them as one
        labels += [f"{genes[a]}+{genes[b]}"] * (cells // 2) + [f"{genes[b]}+{genes[a]}"] * (
            cells - cells // 2
        )
    return rng.permutation(np.array(labels, dtype=object))


LABELS = make_labels()
CANON, NPERT, _ = canonical_labels(LABELS)
COMBOS = sorted(set(CANON[NPERT > 1]))


def combos_in(split: np.ndarray, which: str) -> set[str]:
    return set(CANON[(split == which) & (NPERT > 1)])


def test_canonical_labels_reads_spellings_and_gears_singles():
    canon, n, ctrl = canonical_labels(["ctrl", "A+ctrl", "B+A", "A+B", "C"])
    assert ctrl == "ctrl"
    assert canon.tolist() == ["ctrl", "A", "A+B", "A+B", "C"]
    assert n.tolist() == [0, 1, 2, 2, 1]
    canon, n, _ = canonical_labels(["non-targeting", "A_B", "A"], sep="_")
    assert canon.tolist() == ["non-targeting", "A_B", "A"] and n.tolist() == [0, 2, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_combinations_counts_and_order(seed):
    c = len(COMBOS)
    for f in FRACS:
        train, test = split_combinations(COMBOS, f, 0.25, seed)
        assert len(train) == math.floor(f * c)
        assert len(test) == math.ceil(0.25 * c)
        if f <= 0.75:
            assert not set(train) & set(test)
    # the shuffle is the same whatever f: train combos are prefixes, test combos the suffix
    full, test = split_combinations(COMBOS, 1.0, 0.25, seed)
    assert full[-len(test) :] == test
    for f in FRACS:
        assert split_combinations(COMBOS, f, 0.25, seed)[0] == full[: math.floor(f * c)]


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("pool", ["all", "heldout_excluded"])
def test_combinatorial_heldout_never_in_train_or_val(seed, pool):
    for f in FRACS:
        split = combinatorial_split(LABELS, f, seed=seed, pool=pool)
        _, test_c = split_combinations(COMBOS, f, 0.25, seed, pool)
        assert combos_in(split, "test") == set(test_c)
        if pool == "heldout_excluded" or f <= 0.75:
            assert not combos_in(split, "train") & set(test_c)
            assert not combos_in(split, "val") & set(test_c)
        # singles and controls are never tested
        assert not ((split == "test") & (NPERT <= 1)).any()
        # test holds only combinations' cells
        assert (NPERT[split == "test"] > 1).all()


def test_combinatorial_pool_semantics():
    c = len(COMBOS)
    n_test = math.ceil(0.25 * c)
    # reference: at f = 1 the held-out combinations' non-test cells are trained on
    split = combinatorial_split(LABELS, 1.0, seed=0)
    _, test_c = split_combinations(COMBOS, 1.0, 0.25, 0)
    assert set(test_c) <= combos_in(split, "train")
    # but never the test cells themselves: test and train cells are disjoint
    assert not ((split == "test") & (split == "train")).any()
    # heldout_excluded: f = 1 means every non-held-out combination and nothing else
    split = combinatorial_split(LABELS, 1.0, seed=0, pool="heldout_excluded")
    assert combos_in(split, "train") == set(COMBOS) - set(test_c)
    assert len(combos_in(split, "train")) == c - n_test
    # reference f = 0.75 == all non-held-out combinations (floor(0.75 C) = C - ceil(0.25 C))
    split75 = combinatorial_split(LABELS, 0.75, seed=0)
    assert combos_in(split75, "train") == set(COMBOS) - set(test_c)


@pytest.mark.parametrize("pool", ["all", "heldout_excluded"])
def test_combinatorial_nested_supersets(pool):
    prev_train, prev_val, prev_test = None, None, None
    for f in FRACS:
        split = combinatorial_split(LABELS, f, seed=1, pool=pool)
        train = set(np.flatnonzero(split == "train"))
        val = set(np.flatnonzero(split == "val"))
        test = set(np.flatnonzero(split == "test"))
        if prev_train is not None:
            assert prev_train <= train and prev_val <= val
            assert test == prev_test  # the test set does not depend on f
        prev_train, prev_val, prev_test = train, val, test


def test_combinatorial_fractions_and_singles():
    split = combinatorial_split(LABELS, 0.0, seed=0)
    # f = 0: no combination in train/val
    assert not combos_in(split, "train") and not combos_in(split, "val")
    single = NPERT <= 1
    n = single.sum()
    assert (split[single] != "").all()
    assert (split[single] == "val").sum() == math.ceil(0.2 * n)
    # combination cells: test slice = 20% of all combination cells, restricted to test combos
    is_c = NPERT > 1
    _, test_c = split_combinations(COMBOS, 0.0, 0.25, 0)
    test_cells = (split == "test").sum()
    in_test_combos = np.isin(CANON, test_c).sum()
    assert 0 < test_cells < in_test_combos
    assert abs(test_cells / in_test_combos - 0.2) < 0.1
    # at f = 1 (reference) every combination trains: train/val are the 64/16 % parts of all combination
    # cells; of the 20 % test part only the cells of test combinations are kept
    split = combinatorial_split(LABELS, 1.0, seed=0)
    nc = int(is_c.sum())
    n_test = math.ceil(0.2 * nc)
    n_val = math.ceil(0.2 * (nc - n_test))
    assert (split[is_c] == "val").sum() == n_val
    assert (split[is_c] == "train").sum() == nc - n_test - n_val
    assert (split[is_c] == "test").sum() == test_cells  # the same test cells as at f = 0
    assert (split[is_c] == "").sum() == n_test - test_cells


def test_combinatorial_deterministic_and_seeded():
    a = combinatorial_split(LABELS, 0.5, seed=4)
    b = combinatorial_split(LABELS, 0.5, seed=4)
    c = combinatorial_split(LABELS, 0.5, seed=5)
    assert (a == b).all()
    assert (a != c).any()
    assert set(np.unique(a)) <= {"train", "val", "test", ""}


def test_combinatorial_errors():
    with pytest.raises(ValueError, match="combination labels"):
        combinatorial_split(["control", "A", "B"], 0.5)
    with pytest.raises(ValueError, match="frac_train"):
        combinatorial_split(LABELS, 1.5)
    with pytest.raises(ValueError, match="pool"):
        combinatorial_split(LABELS, 0.5, pool="other")


@pytest.mark.parametrize("seed", [0, 2])
def test_data_efficiency_proportions_and_nesting(seed):
    is_c = NPERT > 1
    nc = int(is_c.sum())
    n_test = math.ceil(0.2 * nc)
    n_val = math.ceil(0.2 * (nc - n_test))
    n_part = nc - n_test - n_val
    prev = None
    tests = []
    for f in FRACS:
        split = data_efficiency_split(LABELS, f, seed=seed)
        assert (split[is_c] == "test").sum() == n_test
        assert (split[is_c] == "val").sum() == n_val
        assert (split[is_c] == "train").sum() == math.floor(f * n_part)
        assert (split[is_c] == "").sum() == n_part - math.floor(f * n_part)
        # proportions of all combination cells: 20 / 16 / up to 64 %
        assert abs(n_test / nc - 0.2) < 0.01 and abs(n_val / nc - 0.16) < 0.01
        # singles and controls: 80 / 20 train / val, never test or unused
        s = split[~is_c]
        assert set(np.unique(s)) == {"train", "val"}
        assert (s == "val").sum() == math.ceil(0.2 * len(s))
        train = set(np.flatnonzero(split == "train"))
        if prev is not None:
            assert prev <= train
        prev = train
        tests.append(frozenset(np.flatnonzero(split == "test")))
    assert len(set(tests)) == 1  # the test cells do not depend on f
    # every combination is tested (with 40 cells each, 20% of the cells reach every one w.h.p.)
    split = data_efficiency_split(LABELS, 0.5, seed=seed)
    assert combos_in(split, "test") == set(COMBOS)
    # train and test cells never overlap
    assert not (set(np.flatnonzero(split == "train")) & set(np.flatnonzero(split == "test")))


def test_data_efficiency_errors():
    with pytest.raises(ValueError, match="combination labels"):
        data_efficiency_split(["control", "A"], 0.5)


def test_cell_split_fractions():
    n = 1000
    split = cell_split(n, seed=0)
    assert (split == "test").sum() == 200
    assert (split == "val").sum() == 160
    assert (split == "train").sum() == 640
    split2 = cell_split(np.array(["a"] * n), seed=0)
    assert (split == split2).all()
    assert (cell_split(n, seed=1) != split).any()


def test_cell_split_stratified():
    labels = np.array(["control"] * 50 + ["A"] * 10 + ["B"] * 5)
    split = cell_split(labels, seed=0, stratify=True)
    for lab in ("control", "A", "B"):
        s = split[labels == lab]
        assert set(np.unique(s)) == {"train", "val", "test"}
        assert (s == "test").sum() == math.ceil(0.2 * len(s))
    with pytest.raises(ValueError, match="labels"):
        cell_split(10, stratify=True)


def test_split_summary():
    split = combinatorial_split(LABELS, 0.5, seed=0)
    s = split_summary(split, LABELS)
    assert sum(v["cells"] for v in s.values()) == len(LABELS)
    assert s["test"]["singles"] == 0 and s["test"]["controls"] == 0
    assert s["test"]["combination_labels"] == math.ceil(0.25 * len(COMBOS))


def test_heldout_combinations_split_holds_out_a_seeded_quarter_of_the_combinations():
    singles = ["control"] * 40 + [g for g in "ABCDEFGH" for _ in range(20)]
    combos = [c for c in ("A+B", "C+D", "E+F", "G+H", "A+C", "B+D", "E+G", "F+H") for _ in range(10)]
    labels = np.array(singles + combos)
    split, held = heldout_combinations_split(labels, "control", "+", seed=3)
    assert len(held) == 2 and held == sorted(held) and set(held) <= set(combos)
    # every cell of a held-out combination is a test cell, and only they are among the combinations
    assert (split[np.isin(labels, held)] == "test").all()
    for lab in set(labels) - set(held):
        assert set(split[labels == lab]) == {"train", "val", "test"}, lab  # stratified 80/10/10
    again, held_again = heldout_combinations_split(labels, "control", "+", seed=3)
    assert held_again == held and (again == split).all()  # the seed fixes it
    with pytest.raises(ValueError, match="combination labels"):
        heldout_combinations_split(np.array(singles), "control", "+", seed=0)
