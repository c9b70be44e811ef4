"""Perturbation labels -> dosage matrix D.

A label names the perturbations a cell received: ``"control"`` (no perturbation), ``"A"`` (a single
perturbation) or ``"A+B"`` (a combination; the separator is configurable). Control tokens inside a
combination (``"A+ctrl"``, as some curated files write singles) are dropped.

D has one row per cell and one column per treatment: 0/1, multi-hot for combinations, all-zero for
controls. With ``encode_combos_as_unique=True`` every distinct combination is its own one-hot treatment
(needed by SVAE+, and the "[U]" ablation of the SAMS-VAE paper).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from pyrovae.config import PyrovaeWarning

#: Control labels recognised when the user does not name one (compared case-insensitively).
COMMON_CONTROL_LABELS: tuple[str, ...] = (
    "control",
    "ctrl",
    "non-targeting",
    "non_targeting",
    "nontargeting",
    "non-targeting control",
    "negative_control",
)


def _is_control_token(token: str, control_label: str) -> bool:
    low = token.strip().lower()
    return low == control_label.strip().lower() or low in COMMON_CONTROL_LABELS


def parse_label(label: str, control_label: str, sep: str = "+") -> tuple[str, ...]:
    """Split one label into its sorted perturbation tokens; ``()`` for a control cell.

    Raises ``ValueError`` for empty labels or empty tokens (``"A+"``), which usually mean a broken
    annotation rather than a control.
    """
    if not isinstance(label, str) or label.strip() == "":
        raise ValueError(
            f"empty perturbation label {label!r}: every cell needs a label; label unperturbed cells "
            f"with the control label {control_label!r}"
        )
    if label.strip() == control_label.strip():
        return ()
    tokens = [t.strip() for t in label.split(sep)] if sep else [label.strip()]
    if any(t == "" for t in tokens):
        raise ValueError(
            f"perturbation label {label!r} has an empty part around the separator {sep!r}; "
            "fix the label or pass the right separator (combo_sep=...)"
        )
    tokens = [t for t in tokens if not _is_control_token(t, control_label)]
    return tuple(sorted(set(tokens)))


def _has_repeat(label: str, sep: str) -> bool:
    tokens = [t.strip() for t in label.split(sep)]
    return len(tokens) > 1 and len(set(tokens)) < len(tokens)


def canonical_label(tokens: Sequence[str], control_label: str, sep: str = "+") -> str:
    """The canonical string of a token tuple: sorted tokens joined by ``sep``, or the control label."""
    return sep.join(sorted(tokens)) if tokens else control_label


def treatment_vocabulary(
    parsed: Iterable[tuple[str, ...]], encode_combos_as_unique: bool, sep: str
) -> list[str]:
    """Sorted treatment names (columns of D) for a collection of parsed labels."""
    names: set[str] = set()
    for tokens in parsed:
        if not tokens:
            continue
        if encode_combos_as_unique:
            names.add(sep.join(tokens))
        else:
            names.update(tokens)
    return sorted(names)


def build_dosage(
    labels: Sequence[str] | np.ndarray,
    control_label: str,
    sep: str = "+",
    encode_combos_as_unique: bool = False,
    treatments: Sequence[str] | None = None,
    sparse: bool = False,
) -> tuple[np.ndarray | sp.csr_matrix, list[str], np.ndarray]:
    """Build the dosage matrix.

    Args:
        labels: (N,) perturbation label per cell.
        control_label: the label of unperturbed cells.
        sep: combination separator.
        encode_combos_as_unique: one column per distinct combination instead of multi-hot.
        treatments: a fixed treatment vocabulary (e.g. a trained model's); labels using a treatment
            outside it raise ``ValueError`` naming them.
        sparse: return D as a ``scipy.sparse.csr_matrix`` (never dense: memory O(nnz + N)).

    Returns:
        D: (N, T) float32 0/1 matrix (CSR with ``sparse``); treatments: the T column names; canonical: (N,)
        canonical labels (sorted tokens joined by ``sep``, controls mapped to ``control_label``).
    """
    labels = np.asarray(labels, dtype=object)
    unique, inverse = np.unique(labels.astype(str), return_inverse=True)
    parsed = [parse_label(str(u), control_label, sep) for u in unique]
    repeated = [str(u) for u in unique if sep and _has_repeat(str(u), sep)]
    if repeated:
        warnings.warn(
            f"label(s) {repeated[:5]} name the same perturbation more than once; they are read as that "
            "perturbation alone (dose 1). Fix the labels if they mean something else",
            PyrovaeWarning,
            stacklevel=2,
        )
    if treatments is None:
        treatments = treatment_vocabulary(parsed, encode_combos_as_unique, sep)
    treatments = list(treatments)
    col = {t: j for j, t in enumerate(treatments)}
    rows = np.zeros((len(unique), len(treatments)), dtype=np.float32)
    unknown: list[str] = []
    for r, tokens in enumerate(parsed):
        if not tokens:
            continue
        keys = [sep.join(tokens)] if encode_combos_as_unique else list(tokens)
        for k in keys:
            if k in col:
                rows[r, col[k]] = 1.0
            else:
                unknown.append(k)
    if unknown:
        shown = ", ".join(sorted(set(unknown))[:10])
        raise ValueError(
            f"unknown perturbation(s) {shown} (of {len(set(unknown))}): they are not among the "
            f"{len(treatments)} treatments this model knows ({', '.join(treatments[:10])}"
            f"{', ...' if len(treatments) > 10 else ''}); predict them only with a model trained on them"
        )
    canon = np.array([canonical_label(p, control_label, sep) for p in parsed], dtype=object)
    d = sp.csr_matrix(rows)[inverse] if sparse else rows[inverse]
    return d, treatments, canon[inverse]


def dosage_for(
    perturbations: Sequence[str],
    treatments: Sequence[str],
    control_label: str,
    sep: str = "+",
    encode_combos_as_unique: bool = False,
) -> np.ndarray:
    """(len(perturbations), T) dosage rows for labels such as ``["A", "A+B", "control"]``."""
    d, _, _ = build_dosage(perturbations, control_label, sep, encode_combos_as_unique, treatments)
    return d


def find_control_label(labels: Iterable[str], control_label: str | None) -> str:
    """Resolve the control label: the given one (checked to occur), else a common one that occurs."""
    present = {str(v) for v in labels}
    if control_label is not None:
        if control_label not in present:
            near = [p for p in present if p.lower() == control_label.lower()]
            near = near or difflib.get_close_matches(control_label, sorted(present), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(
                f"no control cells: no cell has the label {control_label!r}; {hint}Labels include "
                f"{sorted(present)[:8]}; pass control_label=... with the label of unperturbed cells"
            )
        return control_label
    lower = {p.lower(): p for p in present}
    for cand in COMMON_CONTROL_LABELS:
        if cand in lower:
            return lower[cand]
    raise ValueError(
        "no control cells: none of the common control labels "
        f"{list(COMMON_CONTROL_LABELS)} occurs; labels include {sorted(present)[:8]}. "
        "Pass control_label=... (CLI: --control-label) naming the unperturbed cells"
    )
