"""Seeded splits of the papers' evaluation protocols (pure numpy).

Every function takes the per-cell perturbation labels (any spelling the data layer reads: ``"A"``,
``"A+B"``, ``"A+ctrl"`` for a single in GEARS-curated files, the control label) and returns an (N,) string
array with ``"train"``, ``"val"``, ``"test"`` or ``""`` (cell used by no split). Write it into
``adata.obs[...]`` and load the data with ``split_key=...`` (see ``experiments/``).

Protocols (of the SAMS-VAE and GPO-VAE papers' code; ``docs/findings.md`` runs them):

- :func:`combinatorial_split` -- SAMS-VAE Norman OOD ("combinatorial reasoning"): a seeded shuffle of the
  sorted combination labels; the first ``floor(f * C)`` are training combinations, the last
  ``ceil(frac_test * C)`` are held-out test combinations. Combination cells are split 80/20 (train+val /
  test) and the train+val part 80/20 (train / val); train and val cells are kept only for training
  combinations, test cells only for test combinations. Singles and controls are split 80/20 into
  train/val (no test cells). Training combinations grow as nested supersets with f; they are disjoint from
  the test combinations while ``f <= 1 - frac_test`` (with ``frac_test = 0.25``: ``f <= 0.75``). At
  ``f = 1`` the reference trains on every combination, the test ones included (on cells other than the
  test cells); ``pool="heldout_excluded"`` instead takes f as a fraction of the non-held-out combinations,
  so that f = 1 means "every non-held-out combination" and test combinations are never trained.
- :func:`data_efficiency_split` -- SAMS-VAE Norman "resource paucity": 20% of ALL combination cells go to
  test, 16% to val; training uses the first ``f`` fraction of the remaining 64% (nested as f grows).
  Singles and controls 80/20 train/val.
- :func:`make_split` -- the split ``load_perturbation_data`` makes when the data has none: cells
  80/10/10 per label, or held-out combinations (test only).
- :func:`heldout_combinations_split` -- the demo's: a quarter of the combinations held out, the rest 80/10/10.
- :func:`cell_split` -- random cell-level split (Replogle in SAMS-VAE, every dataset of GPO-VAE):
  80/20 then 80/20 again, i.e. 64/16/20 train/val/test; optionally stratified per label.

Cell-level fractions are rounded like ``sklearn.model_selection.train_test_split``: the test part of n
cells is ``ceil(test_frac * n)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from pyrovae.data.dosage import canonical_label, find_control_label, parse_label

TRAIN, VAL, TEST, UNUSED = "train", "val", "test", ""
POOLS = ("all", "heldout_excluded")


def _labels(labels: Sequence[str] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels, dtype=object).astype(str)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one label per cell (1-D), got shape {arr.shape}")
    return arr


def _check_frac(name: str, value: float, allow_one: bool = True) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0) or (not allow_one and value == 1.0):
        raise ValueError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {value}")
    return value


def canonical_labels(
    labels: Sequence[str] | np.ndarray, control_label: str | None = None, sep: str = "+"
) -> tuple[np.ndarray, np.ndarray, str]:
    """Canonical label of every cell and its number of perturbations.

    Returns:
        (canonical (N,) str, n_perturbations (N,) int, control_label). Canonical labels are the sorted
        tokens joined by ``sep`` (controls: the control label; control tokens inside a label, as in
        ``"A+ctrl"``, are dropped), so ``"B+A"`` and ``"A+B"`` are the same combination.
    """
    arr = _labels(labels)
    control_label = find_control_label(arr, control_label)
    uniq, inv = np.unique(arr, return_inverse=True)
    parsed = [parse_label(u, control_label, sep) for u in uniq]
    canon = np.array([canonical_label(p, control_label, sep) for p in parsed], dtype=object)
    n = np.array([len(p) for p in parsed], dtype=np.int64)
    return canon[inv].astype(str), n[inv], control_label


def combination_labels(labels: Sequence[str] | np.ndarray, control_label: str, sep: str = "+") -> list[str]:
    """The sorted distinct labels of ``labels`` that combine two or more perturbations."""
    uniq = np.unique(np.asarray(labels).astype(str))  # each distinct label parsed once, not each cell's
    return sorted(str(lab) for lab in uniq if len(parse_label(lab, control_label, sep)) > 1)


def pick_combinations(combos: Sequence[str], frac: float, rng: np.random.Generator) -> list[str]:
    """A seeded ``frac`` of ``combos`` (at least one): the first ``max(1, ceil(frac C))`` of a permutation
    drawn from ``rng`` (the held-out combinations of the data layer's and the demo's splits)."""
    n_held = max(1, int(np.ceil(frac * len(combos))))
    return [str(c) for c in rng.permutation(list(combos))[:n_held]]


def _cell_parts(idx: np.ndarray, rng: np.random.Generator, test_frac: float, val_frac: float):
    """Shuffle ``idx`` and cut it into (test, val, train) parts: test = ceil(test_frac n), val =
    ceil(val_frac * (n - n_test)) of the rest (sklearn's rounding of ``test_size``)."""
    idx = rng.permutation(np.asarray(idx, dtype=np.int64))
    n = len(idx)
    n_test = math.ceil(test_frac * n)
    n_val = math.ceil(val_frac * (n - n_test))
    return idx[:n_test], idx[n_test : n_test + n_val], idx[n_test + n_val :]


def split_combinations(
    combos: Sequence[str], frac_train: float, frac_test: float = 0.25, seed: int = 0, pool: str = "all"
) -> tuple[list[str], list[str]]:
    """(train combinations, test combinations) of the OOD protocol.

    The sorted combinations are shuffled with ``np.random.default_rng(seed)``. Test = the last
    ``ceil(frac_test * C)``. Train = the first ``floor(frac_train * C)`` (``pool="all"``, the reference), or
    the first ``floor(frac_train * (C - n_test))`` (``pool="heldout_excluded"``: never a test combination).
    """
    frac_train = _check_frac("frac_train", frac_train)
    frac_test = _check_frac("frac_test", frac_test, allow_one=False)
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; use one of {POOLS}")
    order = list(np.random.default_rng(seed).permutation(sorted(set(map(str, combos)))))
    c = len(order)
    n_test = math.ceil(frac_test * c)
    n_train = math.floor(frac_train * c) if pool == "all" else math.floor(frac_train * (c - n_test))
    test = order[c - n_test :] if n_test else []
    return [str(x) for x in order[:n_train]], [str(x) for x in test]


def combinatorial_split(
    labels: Sequence[str] | np.ndarray,
    frac_train: float,
    control_label: str | None = None,
    sep: str = "+",
    frac_test: float = 0.25,
    seed: int = 0,
    test_cell_frac: float = 0.2,
    val_cell_frac: float = 0.2,
    pool: str = "all",
) -> np.ndarray:
    """Held-out combinations, training on a growing fraction of the others (module docstring).

    Args:
        labels: (N,) perturbation labels.
        frac_train: f, fraction of the combinations used for training (see ``pool``).
        frac_test: fraction of the combinations held out for test.
        seed: split seed (combination shuffle and cell split).
        test_cell_frac, val_cell_frac: cell fractions of the two successive 80/20 cuts.
        pool: ``"all"`` (the reference) or ``"heldout_excluded"`` (see :func:`split_combinations`).

    Returns:
        (N,) ``"train"``/``"val"``/``"test"``/``""``.
    """
    canon, n_pert, _ = canonical_labels(labels, control_label, sep)
    test_cell_frac = _check_frac("test_cell_frac", test_cell_frac, allow_one=False)
    val_cell_frac = _check_frac("val_cell_frac", val_cell_frac, allow_one=False)
    is_combo = n_pert > 1
    combos = sorted(set(canon[is_combo]))
    if not combos:
        raise ValueError(
            "the combinatorial protocol needs combination labels (like 'A+B'); none found. Check the label "
            "column and the separator (--combo-sep)"
        )
    train_c, test_c = split_combinations(combos, frac_train, frac_test, seed, pool)
    rng = np.random.default_rng(seed)
    split = np.full(len(canon), UNUSED, dtype=object)
    test_cells, val_cells, train_cells = _cell_parts(
        np.flatnonzero(is_combo), rng, test_cell_frac, val_cell_frac
    )
    in_train = np.isin(canon, train_c)
    in_test = np.isin(canon, test_c)
    split[train_cells[in_train[train_cells]]] = TRAIN
    split[val_cells[in_train[val_cells]]] = VAL
    split[test_cells[in_test[test_cells]]] = TEST
    _, val_s, train_s = _cell_parts(np.flatnonzero(~is_combo), rng, 0.0, val_cell_frac)
    split[train_s] = TRAIN
    split[val_s] = VAL
    return split.astype(str)


def data_efficiency_split(
    labels: Sequence[str] | np.ndarray,
    frac_train: float,
    control_label: str | None = None,
    sep: str = "+",
    seed: int = 0,
    test_cell_frac: float = 0.2,
    val_cell_frac: float = 0.2,
) -> np.ndarray:
    """Resource paucity: every combination is tested, with 0..64% of its cells in training.

    Combination cells: ``test_cell_frac`` (20%) to test, ``val_cell_frac`` of the rest (16% of all) to val;
    training uses the first ``floor(frac_train * n)`` of the remaining (64%) part, in a seeded order that
    does not depend on ``frac_train`` (so training sets are nested as f grows). Singles and controls are
    split (1 - val_cell_frac) / val_cell_frac into train/val.
    """
    canon, n_pert, _ = canonical_labels(labels, control_label, sep)
    frac_train = _check_frac("frac_train", frac_train)
    test_cell_frac = _check_frac("test_cell_frac", test_cell_frac, allow_one=False)
    val_cell_frac = _check_frac("val_cell_frac", val_cell_frac, allow_one=False)
    is_combo = n_pert > 1
    if not is_combo.any():
        raise ValueError(
            "the data-efficiency protocol needs combination labels (like 'A+B'); none found. Check the "
            "label column and the separator (--combo-sep)"
        )
    rng = np.random.default_rng(seed)
    split = np.full(len(canon), UNUSED, dtype=object)
    test_cells, val_cells, train_part = _cell_parts(
        np.flatnonzero(is_combo), rng, test_cell_frac, val_cell_frac
    )
    split[test_cells] = TEST
    split[val_cells] = VAL
    split[train_part[: math.floor(frac_train * len(train_part))]] = TRAIN
    _, val_s, train_s = _cell_parts(np.flatnonzero(~is_combo), rng, 0.0, val_cell_frac)
    split[train_s] = TRAIN
    split[val_s] = VAL
    return split.astype(str)


def cell_split(
    labels: Sequence[str] | np.ndarray | int,
    seed: int = 0,
    test_frac: float = 0.2,
    val_frac: float = 0.2,
    stratify: bool = False,
) -> np.ndarray:
    """Random cell-level split: ``test_frac`` of the cells to test, ``val_frac`` of the rest to val.

    With the defaults 64/16/20 % train/val/test (the reference's two 80/20 cuts). ``labels`` may be the
    number of cells. ``stratify=True`` cuts every label's cells separately (then every label with enough
    cells appears in every split); the reference does not stratify.
    """
    test_frac = _check_frac("test_frac", test_frac, allow_one=False)
    val_frac = _check_frac("val_frac", val_frac, allow_one=False)
    if isinstance(labels, (int, np.integer)):
        if stratify:
            raise ValueError("stratify=True needs the labels, not just the number of cells")
        groups = [np.arange(int(labels))]
        n = int(labels)
    else:
        arr = _labels(labels)
        n = len(arr)
        if stratify:
            uniq, inv = np.unique(arr, return_inverse=True)
            groups = [np.flatnonzero(inv == i) for i in range(len(uniq))]
        else:
            groups = [np.arange(n)]
    rng = np.random.default_rng(seed)
    split = np.full(n, UNUSED, dtype=object)
    for g in groups:
        test, val, train = _cell_parts(g, rng, test_frac, val_frac)
        split[test], split[val], split[train] = TEST, VAL, TRAIN
    return split.astype(str)


def split_summary(
    split: np.ndarray, labels: Sequence[str] | np.ndarray, control_label: str | None = None, sep: str = "+"
) -> dict[str, dict[str, int]]:
    """Cells and distinct labels per split, by kind (control / single / combination).

    Returns ``{split: {"cells", "controls", "singles", "combinations", "combination_labels"}}`` for
    ``train``, ``val``, ``test`` and ``""`` (unused).
    """
    canon, n_pert, _ = canonical_labels(labels, control_label, sep)
    split = np.asarray(split).astype(str)
    out: dict[str, dict[str, int]] = {}
    for s in (TRAIN, VAL, TEST, UNUSED):
        sel = split == s
        out[s] = {
            "cells": int(sel.sum()),
            "controls": int((sel & (n_pert == 0)).sum()),
            "singles": int((sel & (n_pert == 1)).sum()),
            "combinations": int((sel & (n_pert > 1)).sum()),
            "combination_labels": len(set(canon[sel & (n_pert > 1)])),
        }
    return out


def make_split(
    labels: np.ndarray,
    control_label: str,
    sep: str = "+",
    mode: str = "cells",
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    heldout: Sequence[str] | float | None = None,
) -> np.ndarray:
    """A seeded split of cells into train/val/test.

    Args:
        labels: (N,) canonical labels.
        mode: ``"cells"``: every label's cells are split at random (stratified, so every perturbation with
            at least 3 cells appears in every split). ``"combinations"``: held-out combinations: the cells of
            the held-out combination labels all go to ``test`` (never to train/val); all other cells are
            split train/val.
        heldout: with ``mode="combinations"``: the labels to hold out, or the fraction of combination
            labels to hold out at random (default 0.25). Passing it with ``mode="cells"`` is an error.

    Returns:
        (N,) array of ``"train"``/``"val"``/``"test"``.
    """
    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    if mode not in ("cells", "combinations"):
        raise ValueError(f"unknown split mode {mode!r}; use 'cells' or 'combinations'")
    if mode == "cells" and heldout is not None:
        # a silently ignored hold-out would train on the combinations the user meant to keep unseen
        raise ValueError(
            f"heldout={heldout!r} only applies to split mode 'combinations' (the split mode is 'cells'); "
            "pass split_mode='combinations' (CLI: --split-mode combinations) or drop heldout"
        )
    held: set[str] = set()
    if mode == "combinations":
        combos = combination_labels(labels, control_label, sep)
        if not combos:
            raise ValueError("split mode 'combinations' needs combination labels (like 'A+B'); none found")
        if heldout is None or isinstance(heldout, numbers.Real):
            frac = 0.25 if heldout is None else float(heldout)
            if not 0.0 < frac <= 1.0:
                raise ValueError(
                    f"heldout={heldout!r}: a fraction of the combinations must be in (0, 1] (e.g. 0.25), "
                    "or pass a list of combination labels"
                )
            held = set(pick_combinations(combos, frac, rng))
        else:
            names = [heldout] if isinstance(heldout, str) else list(heldout)
            held = {canonical_label(parse_label(h, control_label, sep), control_label, sep) for h in names}
            missing = held - set(combos)
            if missing:
                raise ValueError(
                    f"held-out combination(s) {sorted(missing)} are not combination labels in the data"
                )
    for lab in np.unique(labels.astype(str)):
        idx = np.flatnonzero(labels == lab)
        if lab in held:
            split[idx] = "test"
            continue
        idx = rng.permutation(idx)
        tf = 0.0 if mode == "combinations" else test_frac
        n = len(idx)
        n_test = int(round(tf * n))
        n_val = int(round(val_frac * n))
        if n >= 3:  # stratified: every group is present in every split it can be
            n_test = max(n_test, 1) if tf > 0 else 0
            n_val = max(n_val, 1) if val_frac > 0 else 0
        split[idx[:n_test]] = "test"
        split[idx[n_test : n_test + n_val]] = "val"
    return split.astype(str)


def heldout_combinations_split(
    labels: Sequence[str] | np.ndarray,
    control_label: str,
    sep: str = "+",
    seed: int = 0,
    fraction: float = 0.25,
) -> tuple[np.ndarray, list[str]]:
    """The demo's split: a seeded ``fraction`` of the combination labels is held out (test only); every
    other label is split 80/10/10 (stratified) into train/val/test.

    Args:
        labels: (N,) canonical labels (at least one combination such as ``"A+B"``).

    Returns:
        (N,) split of ``"train"``/``"val"``/``"test"`` and the sorted held-out combination labels.
    """
    labels = _labels(labels)
    combos = combination_labels(labels, control_label, sep)
    if not combos:
        raise ValueError("this split needs combination labels (like 'A+B') to hold out")
    held = sorted(pick_combinations(combos, fraction, np.random.default_rng(seed)))
    split = make_split(labels, control_label, sep, mode="cells", seed=seed, val_frac=0.1, test_frac=0.1)
    split = split.astype(object)
    split[np.isin(labels, held)] = TEST
    return split.astype(str), held
