"""The user's prior knowledge, read from files: gene sets (GMT) and interaction lists (edge tables).

No database is reachable offline, so pyrovae reads what the user downloaded (MSigDB, GO, CollecTRI,
DoRothEA, STRING, ...; docs/knowledge.md says where). Each reader checks the file and fails with one line
naming the problem and the fix; :func:`match_gene_sets` / :func:`match_interactions` then restrict the
knowledge to the genes of the data and say how many matched (none matched is an error: the identifiers
differ, e.g. symbols against Ensembl IDs).

- GMT (the Broad's gene-matrix-transposed format): one set per line,
  ``NAME<TAB>DESCRIPTION<TAB>GENE<TAB>GENE...``; blank lines are skipped, a gene repeated inside a set counts
  once.
- Interaction lists: a CSV (``.csv``) or TSV (``.tsv``, ``.txt``, or tabs in the header) with a header row,
  a source column (``source``, ``regulator``, ``tf``, ``from``, ``gene1``, ``protein1``), a target column
  (``target``, ``to``, ``gene2``, ``protein2``) and optionally a sign column (``sign``, ``mor``,
  ``weight``, ``mode_of_regulation``, ``effect``): a number (its sign; 0 = unsigned) or a word
  (``+``/``-``, ``activation``/``repression``, ...). CollecTRI's ``weight`` and DoRothEA's ``mor`` are the
  sign. An edge listed twice with opposite signs keeps sign 0 (ambiguous); self-loops are dropped.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "read_gene_sets",
    "match_gene_sets",
    "read_interactions",
    "match_interactions",
    "SOURCE_COLUMNS",
    "TARGET_COLUMNS",
    "SIGN_COLUMNS",
]

#: accepted (case-insensitive) names of an interaction list's columns, in order of preference
SOURCE_COLUMNS = ("source", "regulator", "tf", "from", "gene1", "protein1")
TARGET_COLUMNS = ("target", "to", "gene2", "protein2")
SIGN_COLUMNS = ("sign", "mor", "weight", "mode_of_regulation", "effect")
_POSITIVE = {
    "+",
    "+1",
    "1",
    "activation",
    "activating",
    "activates",
    "activator",
    "positive",
    "up",
    "stimulation",
}
_NEGATIVE = {"-", "-1", "repression", "repressing", "represses", "repressor", "inhibition", "inhibiting",
             "negative", "down"}  # fmt: skip
_UNSIGNED = {"", "0", "unknown", "na", "nan", "none", "?", "."}


def _text_lines(path: Path, what: str) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give the file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ValueError(
            f"{what} {path} is not a text file (not UTF-8): give the uncompressed .gmt / .csv / .tsv"
        ) from None


def _gene_examples(genes: Sequence[str], n: int = 3) -> str:
    return ", ".join(repr(g) for g in list(genes)[:n])


# ------------------------------------------------------------------------------------------- gene sets


def read_gene_sets(path: str | Path) -> dict[str, list[str]]:
    """Gene sets of a GMT file, ``{set name: genes}`` in file order (genes deduplicated, order kept).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the problem: not text, no set, a line without the tab-separated
            ``NAME<TAB>DESCRIPTION<TAB>GENE...`` columns, a set without genes, an empty name, a set name
            given twice (with both line numbers).
    """
    path = Path(path)
    lines = _text_lines(path, "gene-set file")
    sets: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    fix = "a GMT line is NAME<TAB>DESCRIPTION<TAB>GENE1<TAB>GENE2..."
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.rstrip("\r\n").split("\t")]
        if len(fields) == 2:
            raise ValueError(f"{path}, line {no}: set {fields[0]!r} has no genes; {fix}")
        if len(fields) < 2:
            hint = (
                " (commas or spaces but no tab: GMT columns are tab-separated)"
                if "," in line or " " in line.strip()
                else ""
            )
            raise ValueError(f"{path}, line {no} has one column{hint}; {fix}")
        name, genes = fields[0], [g for g in fields[2:] if g]
        if not name:
            raise ValueError(f"{path}, line {no}: the set has no name (first column empty); {fix}")
        if not genes:
            raise ValueError(f"{path}, line {no}: set {name!r} has no genes (its gene columns are empty)")
        if name in sets:
            raise ValueError(
                f"{path}, line {no}: set name {name!r} was already used on line {first_line[name]}; "
                "set names must be unique (rename or merge the two sets)"
            )
        sets[name] = list(dict.fromkeys(genes))
        first_line[name] = no
    if not sets:
        raise ValueError(f"{path} holds no gene set (the file is empty); {fix}")
    return sets


def match_gene_sets(
    gene_sets: dict[str, list[str]],
    universe: Sequence[str],
    min_size: int = 1,
    source: str = "the gene sets",
    what: str = "the data's genes",
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Restrict gene sets to the genes of ``universe`` and keep those with >= ``min_size`` of them.

    Args:
        gene_sets: ``{name: genes}`` (:func:`read_gene_sets`).
        universe: the genes that can be tested (e.g. the run's genes, or its perturbations' targets).
        min_size: sets with fewer matched genes are dropped.
        source, what: names for the messages.

    Returns:
        ``(sets, report)``: the matched sets (genes in ``universe`` only) and ``{"n_sets", "n_sets_kept",
        "n_set_genes", "n_matched_genes", "n_universe"}`` (distinct genes over all sets, and how many of
        them are in ``universe``).

    Raises:
        ValueError: no gene of any set is in ``universe`` (naming examples of both, and a case-only
            mismatch when that is what happened).
    """
    uni = [str(g) for g in universe]
    uni_set = set(uni)
    all_genes = list(dict.fromkeys(g for genes in gene_sets.values() for g in genes))
    matched = [g for g in all_genes if g in uni_set]
    if not matched:
        upper = {g.upper() for g in uni}
        case = sum(g.upper() in upper for g in all_genes)
        hint = (
            f" ({case} match when case is ignored: the names differ in case only, e.g. human versus mouse "
            "symbols)"
            if case
            else " (are they the same kind of identifier, e.g. symbols versus Ensembl IDs?)"
        )
        raise ValueError(
            f"none of the {len(all_genes)} genes of {source} is one of {what} ({len(uni)} genes, e.g. "
            f"{_gene_examples(uni)}; the sets' genes are e.g. {_gene_examples(all_genes)}){hint}"
        )
    kept = {}
    for name, genes in gene_sets.items():
        g = [x for x in genes if x in uni_set]
        if len(g) >= max(int(min_size), 1):
            kept[name] = g
    report = {
        "n_sets": len(gene_sets),
        "n_sets_kept": len(kept),
        "n_set_genes": len(all_genes),
        "n_matched_genes": len(matched),
        "n_universe": len(uni),
    }
    return kept, report


# ---------------------------------------------------------------------------------- interaction lists


def _pick(columns: list[str], accepted: Sequence[str]) -> str | None:
    lower = {c.strip().lower(): c for c in columns}
    return next((lower[a] for a in accepted if a in lower), None)


def _sign_of(value: str) -> float | None:
    v = value.strip().lower()
    if v in _UNSIGNED:
        return 0.0
    if v in _POSITIVE:
        return 1.0
    if v in _NEGATIVE:
        return -1.0
    try:
        x = float(v)
    except ValueError:
        return None
    return float(np.sign(x)) if np.isfinite(x) else None


def read_interactions(path: str | Path) -> pd.DataFrame:
    """An interaction list (source -> target edges, optional sign) as a table.

    Returns:
        DataFrame with columns ``source``, ``target`` (str) and ``sign`` (+1, -1, or 0 = unsigned or
        ambiguous), one row per distinct directed edge, self-loops dropped; ``df.attrs`` records
        ``signed`` (the file had a sign column), ``n_rows`` (data rows read), ``n_duplicates`` and
        ``n_conflicting`` (edges listed with both signs) and ``n_self_loops``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the problem: no header with a source and a target column (the columns
            found, and the names accepted), an empty file, a row without a gene name (its line number), a
            sign that is neither a number nor an accepted word.
    """
    path = Path(path)
    lines = _text_lines(path, "interaction list")
    body = [ln for ln in lines if ln.strip()]
    if not body:
        raise ValueError(f"interaction list {path} is empty; give a header (source,target[,sign]) and edges")
    delim = "\t" if path.suffix.lower() in (".tsv", ".txt", ".tab") or "\t" in body[0] else ","
    rows = list(csv.reader(body, delimiter=delim))
    header = [c.strip() for c in rows[0]]
    src, tgt = _pick(header, SOURCE_COLUMNS), _pick(header, TARGET_COLUMNS)
    if src is None or tgt is None:
        raise ValueError(
            f"interaction list {path}: the header {header[:6]} has no "
            f"{'source' if src is None else 'target'} column; name the columns source and target "
            f"(accepted: {', '.join(SOURCE_COLUMNS)} / {', '.join(TARGET_COLUMNS)}), optionally sign"
        )
    sign_col = _pick(header, SIGN_COLUMNS)
    i_s, i_t = header.index(src), header.index(tgt)
    i_g = header.index(sign_col) if sign_col is not None else None
    edges: dict[tuple[str, str], float] = {}
    n_dup = n_conflict = n_self = 0
    conflicted: set[tuple[str, str]] = set()
    for no, row in enumerate(rows[1:], start=2):
        if len(row) <= max(i_s, i_t, i_g or 0):
            raise ValueError(
                f"interaction list {path}, line {no} has {len(row)} column(s) but the header has "
                f"{len(header)} (is it {'tab' if delim == ',' else 'comma'}-separated?)"
            )
        a, b = row[i_s].strip(), row[i_t].strip()
        if not a or not b:
            raise ValueError(f"interaction list {path}, line {no}: empty {src if not a else tgt}")
        sign = 0.0
        if i_g is not None:
            parsed = _sign_of(row[i_g])
            if parsed is None:
                raise ValueError(
                    f"interaction list {path}, line {no}: {sign_col} {row[i_g]!r} is not a sign; use a "
                    "number (its sign counts, 0 = unsigned) or +/-, activation/repression"
                )
            sign = parsed
        if a == b:
            n_self += 1
            continue
        key = (a, b)
        if key in edges:
            n_dup += 1
            if key not in conflicted and sign != edges[key] and sign != 0 and edges[key] != 0:
                conflicted.add(key)
                n_conflict += 1
                edges[key] = 0.0
            elif key not in conflicted and edges[key] == 0:
                edges[key] = sign
            continue
        edges[key] = sign
    if not edges:
        raise ValueError(
            f"interaction list {path} has a header but no edge between two different genes; add rows "
            "source,target[,sign]"
        )
    df = pd.DataFrame(
        [(a, b, s) for (a, b), s in edges.items()], columns=["source", "target", "sign"]
    ).astype({"sign": np.float64})
    df.attrs.update(
        signed=sign_col is not None,
        n_rows=len(rows) - 1,
        n_duplicates=n_dup,
        n_conflicting=n_conflict,
        n_self_loops=n_self,
        path=str(path),
    )
    return df


def match_interactions(
    edges: pd.DataFrame,
    nodes: Sequence[str],
    undirected: bool = False,
    source: str = "the interaction list",
) -> tuple[np.ndarray, dict[str, Any]]:
    """The reference as an (n, n) signed adjacency over ``nodes`` (row = source, column = target).

    Entry +1 / -1: a signed edge; a small positive number (1e-3, so that a truth test ``!= 0`` holds and
    its sign reads as unknown-positive) marks an unsigned one, see ``report["signed_mask"]``.
    ``undirected``: every edge also counts in the other direction (STRING, co-expression lists).

    Returns:
        ``(adjacency, report)``; report: ``n_edges`` (of the list), ``n_edges_matched`` (both ends in
        ``nodes``), ``n_genes`` (distinct genes of the list), ``n_genes_matched``, ``n_nodes``,
        ``signed_mask`` ((n, n) bool: matched edges with a sign).

    Raises:
        ValueError: no gene of the list is a node, or no edge has both ends among the nodes.
    """
    names = [str(n) for n in nodes]
    pos = {n: i for i, n in enumerate(names)}
    genes = list(dict.fromkeys([*edges["source"], *edges["target"]]))
    g_matched = [g for g in genes if g in pos]
    if not g_matched:
        match_gene_sets({"edges": genes}, names, source=source, what="the GRN's genes")  # raises, with hints
    adj = np.zeros((len(names), len(names)), dtype=np.float64)
    signed = np.zeros_like(adj, dtype=bool)
    pairs = list(zip(edges["source"], edges["target"], edges["sign"]))
    if undirected:
        pairs += [(b, a, s) for a, b, s in pairs]
    signs: dict[tuple[int, int], set[float]] = {}
    for a, b, s in pairs:
        if a in pos and b in pos:
            signs.setdefault((pos[a], pos[b]), set()).add(float(s))
    for (i, j), ss in signs.items():
        nonzero = ss - {0.0}
        if len(nonzero) == 1:  # one sign given (an unsigned listing of the same edge does not contradict it)
            adj[i, j], signed[i, j] = nonzero.pop(), True
        else:  # unsigned, or both signs (an undirected list's two directions): the edge without its sign
            adj[i, j] = 1e-3
    n_matched = len(signs)
    if n_matched == 0:
        raise ValueError(
            f"{len(g_matched)} of the {len(genes)} genes of {source} are GRN genes of the run, but none of "
            f"its {len(edges)} edges joins two of them; the run's GRN genes are e.g. {_gene_examples(names)}"
        )
    report = {
        "n_edges": len(edges),
        "n_edges_matched": int((adj != 0).sum()),
        "n_genes": len(genes),
        "n_genes_matched": len(g_matched),
        "n_nodes": len(names),
        "signed_mask": signed,
    }
    return adj, report
