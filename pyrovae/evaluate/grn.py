"""Scoring of gene regulatory networks (GRNs): against a known adjacency, and CausalBench-style on data.

- :func:`score_grn`: edge scores vs a ground-truth adjacency (AUROC, AUPRC, thresholded and
  matched-count precision/recall), self-loops excluded by default.
- the GRN baselines to score with them (``|correlation|``, ``|DE|``, deconvolved DE) are in
  :mod:`pyrovae.baselines.grn`;
- :func:`score_blocks`: :func:`score_grn` per block (perturbed -> perturbed, perturbed -> extended) with
  signs where the method gives them;
- :func:`top_edges`, :func:`matched_count_evaluation`: the statistical evaluation of several methods at the
  same number of edges (mu-WD falls with the edge count, so only matched counts compare);
  :func:`path_expansion`: the new edges of the transitive closure by path length (the reference's
  ``max_path_length``);
- :func:`statistical_evaluation`: the statistical (CausalBench-style) evaluation of a predicted edge list
  on interventional data (the GPO-VAE code's CausalBench-style evaluation), without that code's bugs:
  self-loops are not counted, negative pairs really exclude the predicted edges, and the false omission
  rate divides by the number of pairs actually tested.

Convention: adjacency[i, j] != 0 means an edge i -> j (row = parent/regulator, column = child/target).
Pure numpy/scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.baselines.grn import cells_by_label, check_grn_inputs
from pyrovae.data.matrix import to_dense

__all__ = [
    "score_grn",
    "score_blocks",
    "statistical_evaluation",
    "top_edges",
    "matched_count_evaluation",
    "path_expansion",
    "auroc",
    "average_precision",
    "expected_tp_at",
]


# ----------------------------------------------------------------------------- ranking metrics


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative) (ties 1/2).

    Computed from average ranks (Mann-Whitney U / (n_pos n_neg)); equals ``sklearn.metrics.roc_auc_score``.
    NaN if only one class is present.
    """
    y = np.asarray(y_true).reshape(-1) != 0
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, descending.

    Step-wise (no interpolation), tied scores form one threshold; equals
    ``sklearn.metrics.average_precision_score``. NaN if there is no positive.
    """
    y = (np.asarray(y_true).reshape(-1) != 0).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last position of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def expected_tp_at(y: np.ndarray, s: np.ndarray, k: int) -> float:
    """Expected true positives among the k top-scored candidates, ties at the cut-off split uniformly.

    Args:
        y: (n,) 0/1 labels; s: (n,) scores (higher first); k: how many top candidates.
    """
    if k <= 0:
        return 0.0
    if k >= len(s):
        return float(y.sum())
    cut = np.sort(s)[::-1][k - 1]
    above = s > cut
    tied = s == cut
    n_above = int(above.sum())
    return float(y[above].sum() + (k - n_above) * y[tied].sum() / tied.sum())


def score_grn(
    adjacency_true: np.ndarray,
    probs: np.ndarray,
    exclude_self_loops: bool = True,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Score predicted edge probabilities (or any edge scores) against a true adjacency.

    Args:
        adjacency_true: (n, n) bool or weights; entry != 0 is a true edge row -> column.
        probs: (n, n) predicted edge scores (higher = more confident).
        exclude_self_loops: leave the diagonal out of every metric.
        threshold: scores strictly above it are predicted edges (0.5 = the reference's sigma(W) > 0.5).

    Returns:
        auroc, auprc (average precision), random_auprc (= edge density = the expected AUPRC of random
        scores), precision, recall, f1 at ``threshold`` (0 when a denominator is 0), n_pred_edges (at
        ``threshold``), threshold, precision_at_k and recall_at_k for the k = n_true_edges top-scored
        candidates (equal by construction unless k exceeds the candidates; score ties at the cut-off count
        their expected share, not an arbitrary order), k, n_true_edges, n_candidates. AUROC/AUPRC are NaN
        when only one class is present.

    Raises:
        ValueError: shapes differ or are not square; NaN scores.
    """
    truth = np.asarray(adjacency_true)
    s_full = np.asarray(probs, dtype=np.float64)
    if truth.ndim != 2 or truth.shape[0] != truth.shape[1]:
        raise ValueError(f"adjacency_true must be square (n, n), got shape {truth.shape}")
    if s_full.shape != truth.shape:
        raise ValueError(f"probs has shape {s_full.shape} but adjacency_true has {truth.shape}")
    keep = ~np.eye(truth.shape[0], dtype=bool) if exclude_self_loops else np.ones(truth.shape, dtype=bool)
    y = (truth[keep] != 0).astype(np.float64)
    s = s_full[keep]
    if np.isnan(s).any():
        raise ValueError("probs contains NaN")
    n_true, n_cand = int(y.sum()), int(y.size)
    pred = s > threshold
    n_pred = int(pred.sum())
    tp = float(y[pred].sum())
    tp_k = expected_tp_at(y, s, n_true)
    k_eff = min(n_true, n_cand)
    return {
        "auroc": auroc(y, s),
        "auprc": average_precision(y, s),
        "random_auprc": n_true / n_cand if n_cand else float("nan"),
        "precision": tp / n_pred if n_pred else 0.0,
        "recall": tp / n_true if n_true else 0.0,
        "f1": 2 * tp / (n_pred + n_true) if (n_pred + n_true) else 0.0,
        "n_pred_edges": float(n_pred),
        "threshold": float(threshold),
        "precision_at_k": tp_k / k_eff if k_eff else 0.0,
        "recall_at_k": tp_k / n_true if n_true else 0.0,
        "k": float(n_true),
        "n_true_edges": float(n_true),
        "n_candidates": float(n_cand),
    }


# ------------------------------------------------------------------------- statistical evaluation


def _test_pairs(
    x: Any,
    ctrl_idx: np.ndarray,
    cells: dict[str, np.ndarray],
    pairs: list[tuple[int, int]],
    genes: list[str],
    alpha: float,
) -> pd.DataFrame:
    """Mann-Whitney U (two-sided) and 1-D Wasserstein distance, control vs parent-perturbed, per pair."""
    # scipy.stats takes ~0.5 s to import and only this test needs it; importing it at the top would put
    # it on every ``import pyrovae`` (pyrovae.model -> evaluate.grn_export -> this module)
    from scipy.stats import mannwhitneyu, wasserstein_distance

    cols = ["parent", "child", "p_value", "significant", "wasserstein"]
    if not pairs:
        return pd.DataFrame(columns=cols)
    needed = sorted({b for _, b in pairs})
    pos = {c: i for i, c in enumerate(needed)}
    ctrl = to_dense(x[ctrl_idx][:, needed])
    by_parent: dict[int, list[int]] = {}
    for a, b in pairs:
        by_parent.setdefault(a, []).append(b)
    res: dict[tuple[int, int], tuple[float, float]] = {}
    for a, children in by_parent.items():
        sub = sorted(set(children))
        pert = to_dense(x[cells[genes[a]]][:, sub])
        for j, b in enumerate(sub):
            c_vals, p_vals = ctrl[:, pos[b]], pert[:, j]
            p = float(mannwhitneyu(c_vals, p_vals, alternative="two-sided").pvalue)
            res[(a, b)] = (p if np.isfinite(p) else 1.0, float(wasserstein_distance(c_vals, p_vals)))
    rows = [(genes[a], genes[b], *res[(a, b)]) for a, b in pairs]
    df = pd.DataFrame(rows, columns=["parent", "child", "p_value", "wasserstein"])
    df["significant"] = df["p_value"] < alpha
    return df[cols]


def _sample_negatives(
    parents: list[int], n: int, excluded: set[int], n_negative: int, rng: np.random.Generator
) -> tuple[list[tuple[int, int]], int]:
    """Seeded sample (without replacement) of (parent, child) pairs, flat index parent_pos * n + child."""
    parent_arr = np.asarray(parents, dtype=np.int64)
    total = len(parents) * n
    bad = {f for f in excluded if 0 <= f < total}
    n_cand = total - len(bad)
    if n_cand <= 0 or n_negative <= 0:
        return [], max(n_cand, 0)
    if n_cand <= n_negative or total <= 2_000_000:
        flat = np.setdiff1d(
            np.arange(total, dtype=np.int64), np.fromiter(bad, dtype=np.int64, count=len(bad))
        )
        take = rng.choice(flat, size=min(n_negative, n_cand), replace=False)
    else:  # rejection sampling without enumerating a huge candidate set
        chosen: dict[int, None] = {}
        while len(chosen) < n_negative:
            for f in rng.integers(0, total, size=2 * n_negative).tolist():
                if f not in bad and f not in chosen:
                    chosen[f] = None
                    if len(chosen) == n_negative:
                        break
        take = np.fromiter(chosen, dtype=np.int64)
    return [(int(parent_arr[f // n]), int(f % n)) for f in take], n_cand


def statistical_evaluation(
    x_lognorm: np.ndarray | sp.spmatrix,
    labels: Sequence[str] | np.ndarray,
    genes: Sequence[str],
    edges: Sequence[tuple[str, str]],
    control_label: str,
    n_negative: int = 500,
    seed: int = 0,
    alpha: float = 0.05,
    min_cells: int = 2,
    return_tables: bool = False,
    exclude_edges: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """CausalBench-style statistical evaluation of predicted edges on interventional data.

    For each distinct predicted edge a -> b with a != b whose parent a is a perturbed gene with at least
    ``min_cells`` cells labelled exactly a: compare the expression of b in control cells with its
    expression in cells perturbed at a, by a two-sided Mann-Whitney U test (p < alpha: true positive,
    otherwise false positive; a NaN p-value counts as 1) and the 1-D Wasserstein distance.

    False omission rate: up to ``n_negative`` (a, b) pairs, a a testable perturbed gene (as above), b any
    gene, a != b, and (a, b) not a predicted edge, drawn uniformly without replacement with
    ``numpy.random.default_rng(seed)``, tested the same way. FOR = significant / number actually tested.

    Args:
        x_lognorm: (cells, n) log-normalised expression (dense or sparse), e.g. held-out cells.
        labels: (cells,) perturbation labels; a cell perturbed at gene a is labelled exactly a.
        genes: n gene names (columns of ``x_lognorm``).
        edges: predicted edges as (parent, child) gene names; duplicates are counted once.
        control_label: label of the control cells.
        n_negative: number of negative pairs to sample for the FOR.
        seed: seed of the negative sampling.
        alpha: significance level.
        min_cells: parents with fewer cells are skipped.
        return_tables: also return the per-pair DataFrames ``edge_results`` and ``negative_results``
            (columns parent, child, p_value, significant, wasserstein).
        exclude_edges: further predicted edges that are not tested (e.g. another block of the GRN) but
            must never be drawn as negatives either.

    Returns:
        dict: true_positives, false_positives, n_tested, precision (TP / n_tested), mean_wasserstein,
        n_edges (distinct input edges), n_self_loops, n_skipped (parent with < ``min_cells`` cells,
        never-perturbed parents included), n_unperturbed_parent (of which: no cell at all),
        false_omission_rate, n_negative_tested, n_negative_significant, negative_mean_wasserstein,
        n_negative_candidates, alpha. Ratios and means are NaN when nothing was tested.

    Raises:
        ValueError: unknown gene names in ``edges``, no or too few control cells, shape mismatches.
    """
    labels, genes = check_grn_inputs(x_lognorm, labels, genes, control_label)
    if min_cells < 1:
        raise ValueError(f"min_cells must be >= 1, got {min_cells}")
    x = x_lognorm.tocsr() if sp.issparse(x_lognorm) else np.asarray(x_lognorm, dtype=np.float64)
    cells = cells_by_label(labels)
    ctrl_idx = cells[str(control_label)]
    if len(ctrl_idx) < min_cells:
        raise ValueError(
            f"only {len(ctrl_idx)} control cell(s) labelled {control_label!r}; need >= {min_cells}"
        )
    gpos = {g: i for i, g in enumerate(genes)}
    edge_list = list(dict.fromkeys((str(a), str(b)) for a, b in edges))
    unknown = sorted({g for e in edge_list for g in e if g not in gpos})
    if unknown:
        shown = unknown[:10] + (["..."] if len(unknown) > 10 else [])
        raise ValueError(f"edges name {len(unknown)} gene(s) not in genes: {shown}")
    n_cells_of = {g: len(cells.get(g, ())) for g in genes}
    testable = [i for i, g in enumerate(genes) if n_cells_of[g] >= min_cells and g != str(control_label)]
    testable_set = set(testable)
    n_self = n_skip = n_unpert = 0
    tested: list[tuple[int, int]] = []
    for a, b in edge_list:
        ia, ib = gpos[a], gpos[b]
        if ia == ib:
            n_self += 1
        elif ia not in testable_set:
            n_skip += 1
            n_unpert += n_cells_of[a] == 0
        else:
            tested.append((ia, ib))
    edge_df = _test_pairs(x, ctrl_idx, cells, tested, genes, alpha)

    # negatives: flat index (position of a among `testable`) * n + b; exclude self-loops and predicted edges
    n = len(genes)
    ppos = {a: i for i, a in enumerate(testable)}
    excluded = {ppos[a] * n + a for a in testable}
    predicted = edge_list + [(str(a), str(b)) for a, b in exclude_edges if str(a) in gpos and str(b) in gpos]
    excluded |= {ppos[gpos[a]] * n + gpos[b] for a, b in predicted if gpos[a] in ppos}
    neg_pairs, n_cand = _sample_negatives(testable, n, excluded, n_negative, np.random.default_rng(seed))
    neg_df = _test_pairs(x, ctrl_idx, cells, neg_pairs, genes, alpha)

    tp = int(edge_df["significant"].sum())
    n_tested = len(edge_df)
    n_neg = len(neg_df)
    n_neg_sig = int(neg_df["significant"].sum())
    out: dict[str, Any] = {
        "true_positives": tp,
        "false_positives": n_tested - tp,
        "n_tested": n_tested,
        "precision": tp / n_tested if n_tested else float("nan"),
        "mean_wasserstein": float(edge_df["wasserstein"].mean()) if n_tested else float("nan"),
        "n_edges": len(edge_list),
        "n_self_loops": n_self,
        "n_skipped": n_skip,
        "n_unperturbed_parent": int(n_unpert),
        "false_omission_rate": n_neg_sig / n_neg if n_neg else float("nan"),
        "n_negative_tested": n_neg,
        "n_negative_significant": n_neg_sig,
        "negative_mean_wasserstein": float(neg_df["wasserstein"].mean()) if n_neg else float("nan"),
        "n_negative_candidates": int(n_cand),
        "alpha": float(alpha),
    }
    if return_tables:
        out["edge_results"] = edge_df.reset_index(drop=True)
        out["negative_results"] = neg_df.reset_index(drop=True)
    return out


# ------------------------------------------------------------------------------- per-block scores


def _flat_scores(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    n_true, n_cand = int(y.sum()), int(y.size)
    tp_k = expected_tp_at(y, s, n_true)
    k_eff = min(n_true, n_cand)
    pred = s > threshold
    n_pred, tp = int(pred.sum()), float(y[pred].sum())
    return {
        "auroc": auroc(y, s),
        "auprc": average_precision(y, s),
        "random_auprc": n_true / n_cand if n_cand else float("nan"),
        "precision_at_k": tp_k / k_eff if k_eff else float("nan"),
        "recall_at_k": tp_k / n_true if n_true else float("nan"),
        "k": float(n_true),
        "precision": tp / n_pred if n_pred else 0.0,
        "recall": tp / n_true if n_true else 0.0,
        "n_pred_edges": float(n_pred),
        "n_true_edges": float(n_true),
        "n_candidates": float(n_cand),
    }


def score_blocks(
    adjacency_true: np.ndarray,
    scores: np.ndarray,
    n_perturbed: int,
    signs: np.ndarray | None = None,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Edge scores against a true adjacency, per block of the GRN, self-loops excluded.

    Nodes ``[0, n_perturbed)`` are perturbed genes, the rest extended (never perturbed) genes. Blocks:
    ``perturbed->perturbed`` and ``perturbed->extended`` (rows with interventional data, the edges data can
    identify), and ``all`` (every off-diagonal pair). Per block: AUROC, AUPRC, random_auprc (= edge
    density), precision_at_k / recall_at_k at k = the block's number of true edges (ties split, see
    :func:`score_grn`), and with ``signs`` (a signed (n, n) estimate, e.g. DE shifts or deconvolved
    effects) ``sign_accuracy``: the fraction of the block's true edges whose estimated sign matches the
    truth's (NaN without signs or true edges; a zero estimate counts as wrong); and precision, recall and
    n_pred_edges of the scores above ``threshold`` (meaningful for probabilities, e.g. sigma(W) > 0.5).

    Args:
        adjacency_true: (n, n) weighted or 0/1 adjacency, row = parent.
        scores: (n, n) edge scores (higher = more confident).
        n_perturbed: number of perturbed genes at the front of the node order.
        signs: optional (n, n) signed estimates.

    Returns:
        DataFrame, one row per block.
    """
    truth = np.asarray(adjacency_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n = truth.shape[0]
    if truth.shape != (n, n) or s.shape != (n, n):
        raise ValueError(f"adjacency_true {truth.shape} and scores {s.shape} must both be (n, n)")
    if not 0 <= n_perturbed <= n:
        raise ValueError(f"n_perturbed must be in [0, {n}], got {n_perturbed}")
    if np.isnan(s).any():
        raise ValueError("scores contains NaN")
    row_p = np.arange(n)[:, None] < n_perturbed
    col_p = np.arange(n)[None, :] < n_perturbed
    off = ~np.eye(n, dtype=bool)
    blocks = {
        "perturbed->perturbed": row_p & col_p & off,
        "perturbed->extended": row_p & ~col_p,
        "all": off,
    }
    rows = []
    for name, sel in blocks.items():
        if not sel.any():
            continue
        y = (truth[sel] != 0).astype(np.float64)
        row: dict[str, Any] = {"block": name, **_flat_scores(y, s[sel], threshold)}
        if signs is not None and y.sum():
            t, e = truth[sel][y > 0], np.asarray(signs, dtype=np.float64)[sel][y > 0]
            row["sign_accuracy"] = float((np.sign(e) == np.sign(t)).mean())
        else:
            row["sign_accuracy"] = float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------- matched-count evaluation


def top_edges(
    scores: np.ndarray,
    genes: Sequence[str],
    k: int,
    parents: np.ndarray | None = None,
    children: np.ndarray | None = None,
) -> list[tuple[str, str]]:
    """The ``k`` highest-scored off-diagonal edges (parent, child) as gene names.

    ``parents`` / ``children``: (n,) bool masks of the allowed endpoints (default all). Ties are broken by
    position (row-major), so the list is deterministic. Fewer than ``k`` if there are fewer candidates.
    """
    s = np.asarray(scores, dtype=np.float64)
    n = s.shape[0]
    if s.shape != (n, n) or len(genes) != n:
        raise ValueError(f"scores must be (n, n) with n = len(genes) = {len(genes)}, got {s.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    ok = ~np.eye(n, dtype=bool)
    if parents is not None:
        ok &= np.asarray(parents, dtype=bool).reshape(-1, 1)
    if children is not None:
        ok &= np.asarray(children, dtype=bool).reshape(1, -1)
    flat = np.flatnonzero(ok.reshape(-1))
    order = flat[np.argsort(-s.reshape(-1)[flat], kind="stable")][:k]
    return [(str(genes[f // n]), str(genes[f % n])) for f in order]


def matched_count_evaluation(
    methods: dict[str, np.ndarray],
    x_lognorm: np.ndarray | sp.spmatrix,
    labels: Sequence[str] | np.ndarray,
    genes: Sequence[str],
    control_label: str,
    k: int,
    children: np.ndarray | None = None,
    min_cells: int = 2,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`statistical_evaluation` of each method's top ``k`` edges: every method at the same count.

    mu-WD (the mean Wasserstein distance of the predicted edges) falls as more, weaker edges are predicted,
    so two networks compare only at a matched edge count. Parents are restricted to the genes with at least
    ``min_cells`` cells labelled exactly them (the testable ones), so each method has exactly
    ``min(k, candidates)`` tested edges; ``children`` (n,) bool restricts the targets (e.g. the perturbed
    block). Extra keyword arguments go to :func:`statistical_evaluation` (``n_negative``, ``seed``...).

    Returns:
        DataFrame indexed by method: k, n_tested, true_positives, precision, mean_wasserstein,
        false_omission_rate, negative_mean_wasserstein.
    """
    labels_arr, genes = check_grn_inputs(x_lognorm, labels, genes, control_label)
    counts = pd.Series(labels_arr).value_counts()
    parents = np.asarray(
        [g != str(control_label) and int(counts.get(g, 0)) >= min_cells for g in genes], dtype=bool
    )
    rows = {}
    for name, sc in methods.items():
        edges = top_edges(sc, genes, k, parents=parents, children=children)
        res = statistical_evaluation(
            x_lognorm, labels_arr, genes, edges, control_label, min_cells=min_cells, **kwargs
        )
        rows[name] = {
            "k": len(edges),
            "n_tested": res["n_tested"],
            "true_positives": res["true_positives"],
            "precision": res["precision"],
            "mean_wasserstein": res["mean_wasserstein"],
            "false_omission_rate": res["false_omission_rate"],
            "negative_mean_wasserstein": res["negative_mean_wasserstein"],
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")


def path_expansion(adjacency: np.ndarray, max_path_length: int = 3) -> dict[int, np.ndarray]:
    """The edges first reached by a path of each length (the GPO-VAE code's path expansion).

    ``{1: the predicted edges (diagonal dropped), d: pairs (a, b), a != b, joined by a directed path of d
    predicted edges but by none shorter}`` for d = 2..max_path_length; each is an (n, n) bool matrix, to be
    tested with :func:`statistical_evaluation` like the first-order graph. Unlike the reference (an off-by-
    one ``<=`` on the children) every depth keeps the node set of the input.
    """
    a = np.asarray(adjacency) != 0
    n = a.shape[0]
    if a.shape != (n, n):
        raise ValueError(f"adjacency must be square, got {a.shape}")
    if max_path_length < 1:
        raise ValueError(f"max_path_length must be >= 1, got {max_path_length}")
    off = ~np.eye(n, dtype=bool)
    a = a & off
    out = {1: a.copy()}
    reached, frontier = a.copy(), a.copy()
    for d in range(2, max_path_length + 1):
        frontier = (frontier.astype(np.int64) @ a.astype(np.int64)) > 0
        new = frontier & ~reached & off
        out[d] = new
        reached |= new
    return out
