"""The linear baseline of Ahlmann-Eltze, Huber and Anders (Nature Methods 2025).

Their finding: deep perturbation models did not beat the additive model nor this linear one. Genes are
embedded by a PCA of the training pseudobulk (each gene's mean expression across the training conditions);
a perturbation of gene j is represented by gene j's embedding; the training perturbation effects are
regressed on the embeddings of their target genes with a ridge penalty. Since every measured gene has an
embedding, the model also predicts single perturbations of genes it never saw perturbed.

With Y the (G, P) matrix of the P training single-perturbation effects (one column per perturbation,
centred by its row means b), E the (G, K) gene embedding (principal-component scores of the genes) and
E_P the (P, K) rows of E of the perturbed genes, the fitted (K, K) map is

    W = (E^T E + lambda I)^-1 E^T Y E_P (E_P^T E_P + lambda I)^-1,

and the predicted effect of perturbing gene j is E W e_j + b (e_j = row j of E). A combination is
predicted as the sum of its members' predictions (the effects are additive in the ATE scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pyrovae.data.matrix import select_rows
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.evaluate.empirical import empirical_ate, label_means

__all__ = ["two_sided_ridge", "linear_effects", "linear_baseline_ates"]


def two_sided_ridge(y: np.ndarray, e_genes: np.ndarray, e_perts: np.ndarray, ridge: float) -> np.ndarray:
    """The (K, L) map W = (A^T A + lambda I)^-1 A^T Y B (B^T B + lambda I)^-1 with A = ``e_genes``, B =
    ``e_perts``, lambda = ``ridge``: the solution of the normal equations
    (A^T A + lambda I) W (B^T B + lambda I) = A^T Y B.

    Args:
        y: (G, P) centred effects; e_genes: (G, K) gene embedding; e_perts: (P, L) embeddings of the
            perturbations (L = K here); ridge: lambda >= 0 (> 0 unless both Gram matrices are invertible).
    """
    y = np.asarray(y, dtype=np.float64)
    a = np.asarray(e_genes, dtype=np.float64)
    b = np.asarray(e_perts, dtype=np.float64)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if y.shape != (a.shape[0], b.shape[0]):
        raise ValueError(f"y has shape {y.shape}, expected ({a.shape[0]}, {b.shape[0]})")
    left = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y @ b)  # (K, L)
    # right-multiply by (B^T B + lambda I)^-1 (symmetric): solve from the right
    return np.linalg.solve(b.T @ b + ridge * np.eye(b.shape[1]), left.T).T


def linear_effects(
    train_effects: pd.DataFrame,
    pseudobulk: pd.DataFrame,
    targets: Sequence[str],
    n_components: int = 10,
    ridge: float = 0.1,
) -> pd.DataFrame:
    """Predicted effects of perturbing each gene in ``targets`` with the PCA + ridge linear model.

    Args:
        train_effects: (P, G) effects (ATEs) of the training single perturbations, indexed by the perturbed
            gene; rows whose label is not a column (a target that is not a measured gene) are not used.
        pseudobulk: (L, G) mean transformed expression of the training conditions (control included),
            same columns: the gene embedding is its PCA (genes as observations, conditions as features,
            each condition centred over genes), K = min(n_components, L, G) principal-component scores.
        targets: gene names to predict (a name that is not a column gets a NaN row).
        n_components: K (10 in the paper); ridge: lambda (0.1 in the paper).

    Returns:
        DataFrame (len(targets), G), index = targets.
    """
    genes = [str(c) for c in train_effects.columns]
    if [str(c) for c in pseudobulk.columns] != genes:
        raise ValueError("train_effects and pseudobulk must have the same gene columns")
    gpos = {g: j for j, g in enumerate(genes)}
    m = pseudobulk.to_numpy(dtype=np.float64).T  # (G, L)
    m = m - m.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    k = max(1, min(int(n_components), len(s)))
    emb = u[:, :k] * s[:k]  # (G, K) principal-component scores of the genes
    fit = [str(lab) for lab in train_effects.index if str(lab) in gpos]
    out = np.full((len(targets), len(genes)), np.nan)
    if not fit:
        return pd.DataFrame(
            out, index=pd.Index([str(t) for t in targets], name="perturbation"), columns=genes
        )
    y = train_effects.loc[fit].to_numpy(dtype=np.float64).T  # (G, P)
    b = y.mean(1)
    w = two_sided_ridge(y - b[:, None], emb, emb[[gpos[f] for f in fit]], ridge)
    for i, t in enumerate(targets):
        if str(t) in gpos:
            out[i] = emb @ w @ emb[gpos[str(t)]] + b
    return pd.DataFrame(out, index=pd.Index([str(t) for t in targets], name="perturbation"), columns=genes)


def linear_baseline_ates(
    data: PerturbationData,
    groups: Sequence[str],
    *,
    n_components: int = 10,
    ridge: float = 0.1,
    transform: str = "perturbseq",
    split: str = "train",
    target_sum: float = 1e4,
) -> pd.DataFrame:
    """The linear baseline's ATE of every label in ``groups``, fitted on the ``split`` (training) cells.

    The training single perturbations whose treatment is a measured gene are the regression's examples;
    the pseudobulk is every training label's mean (control and combinations included). A single label is
    predicted from its gene's embedding (seen or unseen alike); a combination as the sum of its members'
    predictions; a label with a member that is not a measured gene gets a NaN row.

    Returns:
        DataFrame (len(groups), G) indexed by label, columns = the data's genes.
    """
    idx = np.asarray(data.indices(split))
    labels = np.asarray(data.labels)[idx].astype(str)
    x = select_rows(data.counts, idx)
    present = sorted(set(labels.tolist()))
    singles = [lab for lab in present if lab != data.control_label and data.sep not in lab]
    genes = [str(g) for g in data.genes]
    effects = empirical_ate(
        x, labels, data.control_label, groups=singles, genes=genes, transform=transform, target_sum=target_sum
    )
    pseudobulk = label_means(x, labels, present, transform, genes=genes, target_sum=target_sum)
    members = {str(g): [s for s in str(g).split(data.sep) if s] for g in groups}
    targets = sorted({s for parts in members.values() for s in parts})
    single = linear_effects(effects, pseudobulk, targets, n_components, ridge)
    rows = [
        single.loc[parts].to_numpy(dtype=np.float64).sum(0) if parts else np.full(len(genes), np.nan)
        for parts in members.values()
    ]
    index = pd.Index(list(members), name="perturbation")
    return pd.DataFrame(np.array(rows).reshape(len(index), len(genes)), index=index, columns=genes)
