"""GPO-VAE's gene regulatory network: export, scoring against a planted GRN, unseen-perturbation prediction.

The GRN of a GPO-VAE model is its mask posterior q(M): edge j -> k ("perturbing gene j acts on gene k's
latent coordinate") has probability sigmoid(W_jk), W = ``model.effect.q_mask_logits`` (T, T); rows and
columns follow the treatment order, i.e. the GRN nodes: perturbed genes first, then extended genes
(:func:`pyrovae.data.prepare.prepare_data`). Unlike the GPO-VAE reference code's ``grn.csv``:

- edges are exported with probabilities (not only the 0.5 threshold), so AUROC/AUPRC can be computed;
- the *perturbed* block (both ends perturbed genes: the rows fitted to data) is kept apart from the
  *extended* block (any end an extended gene: rows with no ELBO signal, shaped only by the K-hop terms and
  the sparsity penalty); the two are never pooled in a metric;
- self-loops are dropped unless asked for (a knockdown trivially "regulates" its own target).

Unseen perturbations: the GPO block's ``predict_untrained`` hook (:func:`pyrovae.models.effects.grn_transfer`)
makes every :class:`~pyrovae.predict.posterior.Posterior` of a GPO-VAE run predict them from the GRN;
:func:`gpo_unseen_globals` exposes it with chosen row sets (see :mod:`pyrovae.data.prepare` for what the model
can and cannot do for a perturbation it never saw).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from pyrovae.baselines import grn as grn_baselines
from pyrovae.data.grn import UNS_KEY
from pyrovae.data.matrix import nonzero_counts, select_rows
from pyrovae.data.pairing import log_normalize
from pyrovae.data.perturbation_data import untrained_treatments
from pyrovae.evaluate.grn import (
    matched_count_evaluation,
    path_expansion,
    score_blocks,
    statistical_evaluation,
)
from pyrovae.models.effects.unseen import grn_transfer
from pyrovae.models.skeleton import PerturbationVAE

BLOCKS = ("perturbed", "extended")


def _model_of(model_or_run) -> PerturbationVAE:
    model = (
        model_or_run if isinstance(model_or_run, PerturbationVAE) else getattr(model_or_run, "model", None)
    )
    if not isinstance(model, PerturbationVAE):
        raise TypeError(f"expected a PerturbationVAE or a Run, got {type(model_or_run).__name__}")
    return model


def grn_logits(model_or_run) -> np.ndarray:
    """(T, T) mask logits W of a GPO-VAE model (rows: regulators, columns: targets)."""
    model = _model_of(model_or_run)
    w = model.effect.mask_logits()
    if w is None or w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(
            "this model has no square gene x gene mask (it is not a GPO-VAE model); a GRN exists only for "
            "model 'gpo_vae'"
        )
    return torch.nan_to_num(w.detach().float(), nan=0.0).cpu().numpy()


def grn_probabilities(model_or_run) -> np.ndarray:
    """(T, T) edge probabilities sigmoid(W) = q(M_jk = 1)."""
    w = grn_logits(model_or_run)
    return (1.0 / (1.0 + np.exp(-w.astype(np.float64)))).astype(np.float32)


def run_n_perturbed(run, data=None) -> int:
    """Number of perturbed genes at the front of a run's treatment list.

    With ``data`` (read with the run's schema): the treatments any cell of ``data`` received. Without: the
    treatments with training cells (held-out perturbations then count as extended; pass the data).
    The perturbed genes come first (sorted), so the count is the position after the last perturbed one.
    """
    treatments = list(run.treatments if hasattr(run, "treatments") else run.schema["treatments"])
    if data is not None:
        rec = data.uns.get(UNS_KEY)
        if isinstance(rec, dict) and "n_perturbed" in rec and list(data.treatments) == treatments:
            return int(rec["n_perturbed"])
        used = nonzero_counts(data.dosage, 0) > 0
    else:
        used = ~untrained_treatments(run.schema["train_treatment_counts"])
    idx = np.flatnonzero(used)
    return int(idx[-1] + 1) if len(idx) else 0


def grn_edges(
    model_or_run,
    treatments: Sequence[str] | None = None,
    n_perturbed: int | None = None,
    include_self_loops: bool = False,
    min_prob: float = 0.0,
) -> pd.DataFrame:
    """Every GRN edge with probability >= ``min_prob`` as a table.

    Args:
        model_or_run: a GPO-VAE model or a :class:`~pyrovae.runs.run.Run`.
        treatments: the T node names (default: the run's treatments).
        n_perturbed: the first ``n_perturbed`` nodes are perturbed genes (default: all for a model, the
            trained treatments for a run, see :func:`run_n_perturbed`).
        include_self_loops: keep j -> j edges.
        min_prob: drop edges below this probability.

    Returns:
        DataFrame with columns ``source``, ``target``, ``probability``, ``block`` (``"perturbed"`` when both
        ends are perturbed genes, else ``"extended"``) and ``regulator_perturbed`` (the source is one of the
        perturbed genes: its row was fitted to its knock-down; the rows of the other sources are shaped
        only by the K-hop terms and the sparsity penalty, and under ``gpo_vae``'s aligned defaults they
        saturate, so they are no evidence of regulation), sorted by block, then probability (descending).
    """
    probs = grn_probabilities(model_or_run)
    T = probs.shape[0]
    if treatments is None:
        if not hasattr(model_or_run, "treatments"):
            raise ValueError("pass the node names (treatments=...) when exporting from a bare model")
        treatments = model_or_run.treatments
    names = [str(t) for t in treatments]
    if len(names) != T:
        raise ValueError(f"{len(names)} node names for a {T} x {T} GRN")
    if n_perturbed is None:
        n_perturbed = run_n_perturbed(model_or_run) if hasattr(model_or_run, "schema") else T
    if not 0 <= n_perturbed <= T:
        raise ValueError(f"n_perturbed must be in [0, {T}], got {n_perturbed}")
    src, tgt = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    keep = probs >= min_prob
    if not include_self_loops:
        keep &= src != tgt
    s, t = src[keep], tgt[keep]
    block = np.where((s < n_perturbed) & (t < n_perturbed), BLOCKS[0], BLOCKS[1])
    df = pd.DataFrame(
        {
            "source": np.asarray(names, dtype=object)[s],
            "target": np.asarray(names, dtype=object)[t],
            "probability": probs[keep].astype(np.float64),
            "block": pd.Categorical(block, categories=list(BLOCKS)),
            "regulator_perturbed": s < n_perturbed,
        }
    )
    df = df.sort_values(["block", "probability", "source", "target"], ascending=[True, False, True, True])
    return df.reset_index(drop=True)


def edge_counts(edges: pd.DataFrame, threshold: float = 0.5) -> dict[str, int]:
    """{block: number of edges with probability > threshold}."""
    out = {b: 0 for b in BLOCKS}
    sel = edges[edges["probability"] > threshold]
    for b, n in sel.groupby("block", observed=False).size().items():
        out[str(b)] = int(n)
    return out


# ------------------------------------------------------------------------------------------ scoring
def _truth_on(nodes: Sequence[str], ground_truth: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(true weighted adjacency restricted/reordered to ``nodes`` ∩ GRN genes, positions of those nodes)."""
    genes = [str(g) for g in np.asarray(ground_truth["grn_genes"]).reshape(-1)]
    adj = np.asarray(ground_truth["grn_adjacency"], dtype=np.float64)
    pos = {g: i for i, g in enumerate(genes)}
    keep = [i for i, n in enumerate(nodes) if n in pos]
    sel = [pos[nodes[i]] for i in keep]
    return adj[np.ix_(sel, sel)], np.asarray(keep, dtype=np.int64)


#: block names of :func:`score_matrix` -> those of :func:`pyrovae.evaluate.grn.score_blocks`.
SCORE_BLOCKS = {
    "perturbed": "perturbed->perturbed",
    "perturbed->extended": "perturbed->extended",
    "grn_genes": "all",
}


def score_matrix(
    probs: np.ndarray,
    nodes: Sequence[str],
    ground_truth: dict[str, Any],
    n_perturbed: int,
    signs: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Score a (T, T) edge-score matrix against the planted GRN, per block.

    Nodes: those of ``nodes`` that are GRN genes of the truth (the first ``n_perturbed`` of ``nodes`` are
    perturbed genes). Blocks: ``"perturbed"`` (perturbed -> perturbed), ``"perturbed->extended"`` and
    ``"grn_genes"`` (every pair). Self-loops excluded. Returns ``{block: metrics}`` with the metrics of
    :func:`pyrovae.evaluate.grn.score_blocks` (AUROC, AUPRC, precision/recall at the true edge count and at
    0.5, ``sign_accuracy`` with ``signs``).
    """
    nodes = [str(n) for n in nodes]
    truth, keep = _truth_on(nodes, ground_truth)
    if len(keep) < 2:
        return {}
    sub = np.ix_(keep, keep)
    table = score_blocks(
        truth,
        np.asarray(probs, dtype=np.float64)[sub],
        int((keep < n_perturbed).sum()),
        signs=None if signs is None else np.asarray(signs, dtype=np.float64)[sub],
    ).set_index("block")
    return {
        name: {k: float(v) for k, v in table.loc[b].items()}
        for name, b in SCORE_BLOCKS.items()
        if b in table.index
    }


def score_run_grn(
    run,
    ground_truth: dict[str, Any],
    data=None,
    baselines: bool = True,
    split: str = "train",
) -> pd.DataFrame:
    """AUROC/AUPRC (and the other :func:`~pyrovae.evaluate.grn.score_grn` metrics) of a run's GRN.

    Args:
        run: a trained GPO-VAE :class:`~pyrovae.runs.run.Run`.
        ground_truth: ``{"grn_genes": names, "grn_adjacency": (n, n) 0/1, row = parent, col = child}``
            (:func:`pyrovae.simulate.ground_truth`).
        data: the data read with the run's schema; needed for the baselines and to tell perturbed from
            extended held-out genes.
        baselines: also score ``correlation_grn`` and ``de_grn`` computed on the ``split`` cells of
            ``data`` (same node sets), and a random baseline (the expected AUPRC of random scores = the
            edge density; AUROC 0.5).

    Returns:
        DataFrame with one row per (method, block) and the metric columns.
    """
    nodes = list(run.treatments)
    n_pert = run_n_perturbed(run, data)
    rows = []
    for block, m in score_matrix(grn_probabilities(run), nodes, ground_truth, n_pert).items():
        rows.append({"method": "gpo_vae", "block": block, **m})
    if baselines and data is not None:
        signed = baseline_scores(data, nodes, split, signed=True)
        for name, scores in signed.items():
            signs = scores if name in SIGNED_BASELINES else None
            for block, m in score_matrix(np.abs(scores), nodes, ground_truth, n_pert, signs).items():
                rows.append({"method": name, "block": block, **m})
    if baselines:
        density = {r["block"]: r["random_auprc"] for r in rows if r["method"] == "gpo_vae"}
        for block, d in density.items():
            rows.append({"method": "random", "block": block, "auroc": 0.5, "auprc": d, "random_auprc": d})
    return pd.DataFrame(rows)


#: baselines of :func:`baseline_scores` that give edge signs (``signed=True``).
SIGNED_BASELINES = ("de", "deconvolved_de")


def baseline_scores(
    data, nodes: Sequence[str], split: str | None = "train", signed: bool = False, ridge: float = 1e-2
) -> dict[str, np.ndarray]:
    """(T, T) edge scores of the non-model baselines on the ``split`` cells, in ``nodes`` order.

    ``correlation``: ``|Pearson correlation|`` of log-normalised expression (symmetric, undirected);
    ``de``: differential expression of each perturbed gene's cells versus controls (rows of genes that no
    cell perturbs are 0); ``deconvolved_de``: the direct effects of a linear structural regression on
    those interventional means (:func:`pyrovae.baselines.grn.deconvolved_grn`, indirect effects removed).
    All from :mod:`pyrovae.evaluate.grn`. ``signed``: DE (relative to the sign of the perturbed gene's own
    shift, so an activating edge is positive under a knock-down) and deconvolved DE keep their signs.
    ``paired_de`` (GPO-prepared data only): ``|mean OT-paired difference|`` of each perturbation's cells
    (``extras["delta_x_group"]``, :func:`pyrovae.data.grn.group_delta_x`), the statistic GPO-VAE's GRN
    alignment fits with ``grn_target="group"``, computed without any model: what the pairing alone gives.
    """
    idx = data.indices(split)
    gene_pos = {g: i for i, g in enumerate(data.genes)}
    node_idx = np.asarray([gene_pos[str(n)] for n in nodes], dtype=np.int64)
    y = log_normalize(select_rows(data.counts, idx), node_idx)
    labels = np.asarray(data.labels)[idx]
    out = {}
    out["correlation"] = np.asarray(grn_baselines.correlation_grn(y), dtype=np.float64)
    names = [str(n) for n in nodes]
    shifts = np.asarray(
        grn_baselines.de_grn(y, labels, names, data.control_label, signed=True), dtype=np.float64
    )
    present = set(np.asarray(labels).astype(str).tolist())
    iv = np.asarray(
        [j for j, n in enumerate(names) if n in present and n != data.control_label], dtype=np.int64
    )
    direct = grn_baselines.deconvolved_grn(shifts[iv], iv, ridge=ridge)
    # an edge's sign is that of the child's shift relative to the perturbed gene's own (knock-down) shift
    self_sign = np.sign(np.diag(shifts))
    out["de"] = shifts * np.where(self_sign == 0, 1.0, self_sign)[:, None] if signed else np.abs(shifts)
    out["deconvolved_de"] = direct if signed else np.abs(direct)
    tpos = {str(t): j for j, t in enumerate(data.treatments)}
    if "delta_x_group" in data.extras and all(n in tpos for n in names):
        # GPO-VAE's alignment target without the model: |mean OT-paired difference| of each perturbation
        dxg = np.asarray(data.extras["delta_x_group"][idx])[:, [tpos[n] for n in names]]
        paired = np.zeros((len(names), len(names)))
        for j, n in enumerate(names):
            sel = labels == n
            if sel.any() and n != data.control_label:
                paired[j] = dxg[sel].mean(0)
        out["paired_de"] = paired
    return out


# ------------------------------------------------------------------------------------------ unseen
@torch.no_grad()
def gpo_unseen_globals(
    model: PerturbationVAE,
    unseen: torch.Tensor | np.ndarray | Sequence[bool],
    n: int,
    seen: torch.Tensor | np.ndarray | Sequence[bool] | None = None,
    self_effect: bool = True,
) -> dict[str, torch.Tensor]:
    """n draws of the global sites in which the rows of ``unseen`` perturbations are predicted from the GRN.

    :func:`pyrovae.models.effects.grn_transfer` (see there) on ``model.sample_globals(n, untrained=...)``:
    rows that are neither ``seen`` nor ``unseen`` (default: none) come from the prior; ``unseen`` rows are
    transferred. :class:`~pyrovae.predict.posterior.Posterior` does the same for every untrained row of a
    GPO-VAE run through the block's public ``predict_untrained`` hook; this function lets a caller choose
    the row sets.

    Returns:
        dict of global samples like :meth:`~pyrovae.models.skeleton.PerturbationVAE.sample_globals`,
        ``mask`` and ``E`` of shape (n, T, T).
    """
    grn_logits(model)  # raises for non-GPO models
    w = model.effect.mask_logits()
    dev = w.device
    unseen = torch.as_tensor(np.asarray(unseen, dtype=bool), device=dev)
    seen_t = ~unseen if seen is None else torch.as_tensor(np.asarray(seen, dtype=bool), device=dev) & ~unseen
    g = model.sample_globals(n, untrained=~seen_t if bool((~seen_t).any()) else None)
    return grn_transfer(g, w, unseen, seen_t, self_effect=self_effect)


def statistical_scores(
    run,
    data,
    edges: pd.DataFrame,
    threshold: float,
    split: str,
    n_perturbed: int,
    seed: int = 0,
    max_path_length: int = 3,
) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """CausalBench-style evaluation of a run's perturbed-block edges above ``threshold`` on ``split`` cells.

    Returns ``(res, matched)``: ``res`` = :func:`pyrovae.evaluate.grn.statistical_evaluation` of those
    edges over the GRN genes (log-normalised expression; every predicted edge, the extended block too, is
    kept out of the negatives), with ``res["path_expansion"]`` = {depth: the test of the edges first
    reached by a path of that many predicted edges} for depths 2..``max_path_length``
    (:func:`~pyrovae.evaluate.grn.path_expansion`); ``matched`` =
    :func:`~pyrovae.evaluate.grn.matched_count_evaluation` of GPO-VAE's sigma(W) and the baselines
    (:func:`baseline_scores` on the training cells) at k = the number of GPO-VAE edges tested, over the
    perturbed block (``None`` when no edge was tested).
    """
    idx = data.indices(split)
    if len(idx) == 0:
        raise ValueError(f"the {split!r} split has no cells")
    nodes = list(run.treatments)
    gene_pos = {g: i for i, g in enumerate(data.genes)}
    y = log_normalize(select_rows(data.counts, idx), np.asarray([gene_pos[n] for n in nodes]))
    labels = np.asarray(data.labels)[idx]
    above = edges[edges["probability"] > threshold]
    sel, other = above[above["block"] == "perturbed"], above[above["block"] != "perturbed"]
    pairs = list(zip(sel["source"].astype(str), sel["target"].astype(str)))
    res = statistical_evaluation(
        y,
        labels,
        nodes,
        pairs,
        data.control_label,
        seed=seed,
        exclude_edges=list(zip(other["source"].astype(str), other["target"].astype(str))),
    )
    res = {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in res.items()}
    # path expansion (the reference's max_path_length = 3): the edges first reached by paths of 2 and 3
    pos = {n: i for i, n in enumerate(nodes)}
    adj = np.zeros((len(nodes), len(nodes)), dtype=bool)
    for a, b in pairs:
        adj[pos[a], pos[b]] = True
    depths = {}
    for depth, new in path_expansion(adj, max_path_length).items():
        if depth == 1:
            continue
        new_pairs = [(nodes[i], nodes[j]) for i, j in np.argwhere(new)]
        r = statistical_evaluation(y, labels, nodes, new_pairs, data.control_label, seed=seed, n_negative=0)
        depths[str(depth)] = {
            k: r[k] for k in ("n_edges", "n_tested", "true_positives", "precision", "mean_wasserstein")
        }
    res["path_expansion"] = depths
    matched = None
    if res["n_tested"]:
        methods = {"gpo_vae": grn_probabilities(run), **baseline_scores(data, nodes, "train")}
        children = np.arange(len(nodes)) < n_perturbed
        matched = matched_count_evaluation(
            methods, y, labels, nodes, data.control_label, int(res["n_tested"]), children=children, seed=seed
        )
    return res, matched
