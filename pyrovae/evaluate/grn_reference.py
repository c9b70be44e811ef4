"""A GRN against the user's interaction list (CollecTRI, DoRothEA, STRING, ...), with a permutation null.

:func:`score_reference` scores any (n, n) edge-score matrices (row = regulator, column = target) against a
reference adjacency, per block (``perturbed->perturbed``, ``perturbed->extended``, ``all``; self-loops
excluded), with the metrics of :func:`pyrovae.evaluate.grn.score_blocks` plus:

- ``enrichment`` = AUPRC / prevalence (1: no better than random scores; the prevalence is the block's
  fraction of candidate pairs that are reference edges, the expected AUPRC of random scores);
- ``precision_at_top`` / ``recall_at_top``: among the ``top_k`` best-scored candidates (ties at the cut-off
  count their expected share);
- ``p_value`` of the AUPRC under a node-label permutation null: the reference's genes are shuffled (within
  the perturbed genes and within the extended ones, so every block keeps its number of reference edges and
  the reference its degree structure) ``n_permutations`` times, seeded, and the AUPRC recomputed;
  ``(1 + #{null >= observed}) / (1 + n_permutations)``; ``null_auprc`` is the null's mean;
- with a signed reference and a signed method: ``sign_accuracy`` over the block's signed reference edges
  (estimated sign = reference sign; a zero estimate counts as wrong), next to ``sign_majority`` (the share
  of the commoner sign: what a constant guess scores) and ``n_signed``.

:func:`score_run_reference` does it for a GPO-VAE run's sigma(W) and every GRN baseline
(:func:`pyrovae.evaluate.grn_export.baseline_scores`: ``|correlation|``, ``|DE|``, deconvolved DE,
OT-paired DE) on the run's training cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pyrovae.evaluate.grn import expected_tp_at, score_blocks
from pyrovae.evaluate.grn_export import (
    SIGNED_BASELINES,
    baseline_scores,
    grn_probabilities,
    run_n_perturbed,
)
from pyrovae.evaluate.knowledge import match_interactions

__all__ = ["score_reference", "score_run_reference"]

_BLOCKS = ("perturbed->perturbed", "perturbed->extended", "all")


def _block_masks(n: int, n_perturbed: int) -> dict[str, np.ndarray]:
    row_p = np.arange(n)[:, None] < n_perturbed
    col_p = np.arange(n)[None, :] < n_perturbed
    off = ~np.eye(n, dtype=bool)
    return {_BLOCKS[0]: row_p & col_p & off, _BLOCKS[1]: row_p & ~col_p, _BLOCKS[2]: off}


def _ap_sorted(y_sorted: np.ndarray, last: np.ndarray) -> float:
    """Average precision of labels already in descending score order (``last``: end of each tie group);
    the same number as :func:`pyrovae.evaluate.grn.average_precision`."""
    n_pos = y_sorted.sum()
    if n_pos == 0:
        return float("nan")
    tp = np.cumsum(y_sorted)[last]
    return float(np.sum(np.diff(np.r_[0.0, tp / n_pos]) * tp / (last + 1)))


def score_reference(
    methods: dict[str, np.ndarray],
    nodes: Sequence[str],
    reference: np.ndarray,
    n_perturbed: int,
    signed_mask: np.ndarray | None = None,
    signs: dict[str, np.ndarray] | None = None,
    top_k: int = 100,
    n_permutations: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Edge scores of several methods against a reference adjacency (see the module docstring).

    Args:
        methods: ``{name: (n, n) edge scores}`` (higher = more confident; row = regulator).
        nodes: the n node names (the first ``n_perturbed`` are perturbed genes).
        reference: (n, n) reference adjacency, != 0 = edge
            (:func:`~pyrovae.evaluate.knowledge.match_interactions`).
        signed_mask: (n, n) bool, reference edges whose sign (that of ``reference``) is known.
        signs: ``{name: (n, n) signed estimates}`` for the methods that give edge signs.
        top_k: the k of ``precision_at_top``.
        n_permutations: node permutations of the null (0: none).
        seed: seed of the permutations.

    Returns:
        one row per (method, block) with the columns of :func:`~pyrovae.evaluate.grn.score_blocks` and
        ``enrichment``, ``precision_at_top``, ``recall_at_top``, ``top_k``, ``null_auprc``, ``p_value``,
        ``sign_accuracy``, ``sign_majority``, ``n_signed``.
    """
    ref = np.asarray(reference, dtype=np.float64)
    n = ref.shape[0]
    if ref.shape != (n, n) or len(nodes) != n:
        raise ValueError(f"reference {ref.shape} must be (n, n) for the {len(nodes)} nodes")
    blocks = _block_masks(n, n_perturbed)
    truth = ref != 0
    rng = np.random.default_rng(seed)
    perms = []
    for _ in range(int(n_permutations)):
        p = np.arange(n)
        p[:n_perturbed] = rng.permutation(p[:n_perturbed])
        p[n_perturbed:] = n_perturbed + rng.permutation(n - n_perturbed)
        perms.append(p)
    signed_mask = np.zeros((n, n), bool) if signed_mask is None else np.asarray(signed_mask, bool)
    rows = []
    for name, scores in methods.items():
        s = np.asarray(scores, dtype=np.float64)
        table = score_blocks(truth.astype(np.float64), s, n_perturbed).set_index("block")
        for block, sel in blocks.items():
            if block not in table.index:
                continue
            row: dict[str, Any] = {"method": name, "block": block, **table.loc[block].to_dict()}
            row.pop("sign_accuracy", None)
            y, sv = truth[sel].astype(np.float64), s[sel]
            k = int(min(top_k, len(sv)))
            tp = expected_tp_at(y, sv, k)
            prev = row["random_auprc"]
            row.update(
                enrichment=row["auprc"] / prev if prev and prev > 0 else np.nan,
                precision_at_top=tp / k if k else np.nan,
                recall_at_top=tp / y.sum() if y.sum() else np.nan,
                top_k=k,
            )
            null_mean, p_value = np.nan, np.nan
            if perms and y.sum():
                order = np.argsort(-sv, kind="stable")
                sorted_s = sv[order]
                last = np.r_[np.flatnonzero(np.diff(sorted_s) != 0), len(sorted_s) - 1]
                null = np.asarray([_ap_sorted(truth[np.ix_(p, p)][sel][order], last) for p in perms])
                null_mean = float(np.nanmean(null))
                p_value = float((1.0 + np.sum(null >= row["auprc"] - 1e-12)) / (1.0 + len(perms)))
            row.update(null_auprc=null_mean, p_value=p_value)
            est = None if signs is None else signs.get(name)
            has = sel & signed_mask
            row["n_signed"] = int(has.sum())
            if est is not None and has.any():
                t, e = np.sign(ref[has]), np.sign(np.asarray(est, dtype=np.float64)[has])
                row["sign_accuracy"] = float((e == t).mean())
                row["sign_majority"] = float(max((t > 0).mean(), (t < 0).mean()))
            else:
                row["sign_accuracy"] = row["sign_majority"] = np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def score_run_reference(
    run,
    edges: pd.DataFrame,
    data=None,
    undirected: bool = False,
    top_k: int = 100,
    n_permutations: int = 1000,
    seed: int = 0,
    split: str = "train",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A GPO-VAE run's GRN and the GRN baselines against an interaction list.

    Args:
        run: a trained GPO-VAE :class:`~pyrovae.runs.run.Run`.
        edges: :func:`~pyrovae.evaluate.knowledge.read_interactions`.
        data: the data read with the run's schema (for the baselines, on its ``split`` cells, and to tell
            perturbed from extended genes); ``None``: GPO-VAE alone.
        undirected: the list's edges count in both directions (STRING).
        top_k, n_permutations, seed: see :func:`score_reference`.

    Returns:
        ``(table, report)``: :func:`score_reference`'s table (methods ``gpo_vae`` and, with data,
        ``correlation``, ``de``, ``deconvolved_de``[, ``paired_de``]) and how the list matched the GRN genes
        (:func:`~pyrovae.evaluate.knowledge.match_interactions`, without its mask) with ``signed``.
    """
    nodes = [str(t) for t in run.treatments]
    ref, report = match_interactions(edges, nodes, undirected=undirected)
    signed_mask = report.pop("signed_mask")
    methods = {"gpo_vae": grn_probabilities(run).astype(np.float64)}
    signs: dict[str, np.ndarray] = {}
    if data is not None:
        for name, sc in baseline_scores(data, nodes, split, signed=True).items():
            methods[name] = np.abs(sc)
            if name in SIGNED_BASELINES:
                signs[name] = sc
    n_pert = run_n_perturbed(run, data)
    table = score_reference(
        methods, nodes, ref, n_pert, signed_mask, signs, top_k=top_k, n_permutations=n_permutations, seed=seed
    )
    report.update(
        signed=bool(edges.attrs.get("signed", False)),
        n_signed_matched=int(signed_mask.sum()),
        n_perturbed=n_pert,
        undirected=bool(undirected),
        n_permutations=int(n_permutations),
        seed=int(seed),
        top_k=int(top_k),
    )
    return table, report
