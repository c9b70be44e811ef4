"""Gene-set enrichment of a trained model's latent dimensions, with permutation nulls.

For each latent dimension k of a run and each gene set S (the user's GMT, :mod:`pyrovae.evaluate.knowledge`):

- **genes** (every family): the genes dimension k drives. The decoder sensitivity
  ``J[k, g] = E_z[d log mu_g(z) / d z_k]`` is the average, over ``n_cells`` control cells drawn from the
  model (z ~ N(0, I), the basal prior of an unperturbed cell; covariates drawn from the training cells'
  levels in proportion), of the exact Jacobian (forward-mode autodiff) of the log mean expression (log of
  the decoder's expected fraction of the library; the mean itself for a ``normal`` likelihood) along
  latent coordinate k: the expected log-fold change of gene g per unit shift along k, which is what a
  perturbation's latent effect does. Genes are scored by ``|J[k, g]|``.
- **perturbations** (models whose masks live on the latent dimensions: SAMS-VAE, SVAE+; CPA-VAE through
  its effect sizes): the perturbations that use dimension k, scored by q(m_tk = 1) (the mask probability;
  CPA-VAE: ``|E_q[e_tk]|``), a perturbation standing for its target gene (treatment name = gene name);
  treatments without a training cell are left out.

Statistic: the AUROC of set membership against the score (``P(score of a member > score of a
non-member)``, ties 1/2): 0.5 when the set's members are ranked like any genes, 1 when they are all
ranked first. One-sided permutation p-value: ``(1 + #{null >= observed}) / (1 + n_permutations)`` with
the null drawn by random sets of the same size from the same universe (seeded), then Benjamini-Hochberg
FDR over every (dimension, set) test of a level.

**Co-membership** (models with per-perturbation usage rows): do perturbations whose target genes share a
gene set share latent dimensions? Over the pairs of annotated perturbations (target in >= 1 set), the AUROC
of "share a set" against the cosine similarity of their usage rows; the permutation null shuffles which
usage row belongs to which perturbation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from pyrovae.evaluate.knowledge import match_gene_sets
from pyrovae.predict.posterior import Posterior, rng_scope

__all__ = [
    "rank_enrichment",
    "benjamini_hochberg",
    "decoder_sensitivity",
    "latent_usage",
    "comembership_auroc",
    "latent_enrichment",
]


#: orderings of the universe drawn at once by :func:`rank_enrichment` (memory: chunk x N ranks)
PERMUTATION_CHUNK = 1000


def benjamini_hochberg(p: np.ndarray | Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR), same shape as ``p``; NaN entries stay NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    v = p[ok]
    order = np.argsort(v)
    adj = v[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.clip(adj, 0.0, 1.0)
    out[ok] = res
    return out


def rank_enrichment(
    scores: np.ndarray,
    members: Sequence[np.ndarray],
    n_permutations: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC of each member set against ``scores`` and its one-sided permutation p-value.

    Args:
        scores: (N,) scores of the universe (higher = more strongly driven / used).
        members: S index arrays into the universe (the members of each set; distinct indices).
        n_permutations: random sets per p-value (0: no p-values, NaN).
        seed: seed of the random sets.

    Returns:
        ``(auroc, p_value)``, each (S,): AUROC = (rank sum of members - m (m + 1) / 2) / (m (N - m)) with
        average ranks (NaN for m = 0 or m = N); the p-value's null draws random m-subsets of the universe
        (the same n_permutations orderings of the universe for every set, their first m entries).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n = len(s)
    ranks = rankdata(s)
    sizes = np.asarray([len(m) for m in members], dtype=np.int64)
    sums = np.asarray([ranks[np.asarray(m, dtype=np.int64)].sum() for m in members], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (sums - sizes * (sizes + 1) / 2) / (sizes * (n - sizes))
    auc[(sizes == 0) | (sizes == n)] = np.nan
    p = np.full(len(members), np.nan)
    if n_permutations > 0 and len(members):
        rng = np.random.default_rng(seed)
        testable = (sizes > 0) & (sizes < n)
        exceed = np.zeros(len(members))
        left = int(n_permutations)
        while left > 0:  # chunks of orderings bound the memory at (chunk, N)
            chunk = min(left, PERMUTATION_CHUNK)
            left -= chunk
            perms = np.argsort(rng.random((chunk, n)), axis=1)
            cum = np.cumsum(ranks[perms], axis=1)  # (chunk, N): rank sum of the first m of each ordering
            null = cum[:, np.clip(sizes - 1, 0, n - 1)]  # (chunk, S)
            exceed += np.sum(null >= sums - 1e-9, axis=0)
        p[testable] = ((1.0 + exceed) / (1.0 + n_permutations))[testable]
    return auc, p


@torch.no_grad()
def _control_batch(model, n: int, covariates: np.ndarray | None) -> dict[str, torch.Tensor]:
    dev = next(iter(model.parameters())).device
    batch = {"d": torch.zeros(n, model.n_treatments, device=dev)}
    if model.artifact is not None:
        batch["qc"] = torch.zeros(n, model.artifact.n_qc, device=dev)
    if model.n_covariates:
        batch["covariates"] = torch.as_tensor(covariates, dtype=torch.float32, device=dev)
    return batch


def decoder_sensitivity(
    model,
    n_cells: int = 256,
    seed: int = 0,
    covariates: np.ndarray | None = None,
) -> np.ndarray:
    """(K, G) mean Jacobian ``J[k, g] = mean_i d log mu_g(z_i) / d z_ik`` of the decoder's log mean.

    Args:
        model: a :class:`~pyrovae.models.skeleton.PerturbationVAE`.
        n_cells: control cells z_i ~ N(0, I_K) (d = 0, good quality) averaged over.
        seed: seed of the draws of z (and of the global draw the decoder input reads for d = 0).
        covariates: (n_cells, C) one-hot covariate rows (needed when the model has covariates; see
            :meth:`~pyrovae.predict.posterior.Posterior.training_covariates`).

    The Jacobian is exact (``torch.func.jvp``, one forward-mode pass per latent dimension); the latent
    coordinates are the first K columns of :meth:`~pyrovae.models.skeleton.PerturbationVAE.decoder_features`
    (for SAMS/CPA-VAE the shifted latent z_basal + z_p, for GPO-VAE the basal part).
    """
    model = model.eval()
    K = model.n_latent
    if model.n_covariates and (covariates is None or np.shape(covariates) != (n_cells, model.n_covariates)):
        raise ValueError(
            f"the model has {model.n_covariates} covariate columns: pass covariates of shape "
            f"({n_cells}, {model.n_covariates})"
        )
    gen = torch.Generator().manual_seed(int(seed))
    dev = next(iter(model.parameters())).device
    z = torch.randn(n_cells, K, generator=gen).to(dev)
    batch = _control_batch(model, n_cells, covariates)
    with rng_scope(int(seed)):  # one draw; d = 0 makes the shift zero
        g = {k: v[0] for k, v in model.sample_globals(1).items()}

    def log_mean(zz: torch.Tensor) -> torch.Tensor:
        return model.decoder.log_mean(model.decoder_features(zz, batch, g))

    out = []
    for k in range(K):
        tangent = torch.zeros_like(z)
        tangent[:, k] = 1.0
        _, jvp = torch.func.jvp(log_mean, (z,), (tangent,))
        out.append(jvp.mean(0))
    return torch.stack(out).detach().cpu().numpy().astype(np.float64)


def latent_usage(run) -> tuple[np.ndarray | None, str]:
    """(T, K) how much each treatment uses each latent dimension, and what the number is.

    ``"mask_probability"``: q(m_tk = 1) (SAMS-VAE, SVAE+); ``"abs_effect"``: ``|E_q[e_tk]|`` over 200
    posterior draws (seed 0; CPA-VAE); ``(None, reason)`` for models whose perturbations act elsewhere
    (GPO-VAE's masks are a gene x gene GRN: score it with ``pyrovae grn --reference``; the conditional VAE
    has no per-perturbation latent). Rows of treatments without a training cell are NaN.
    """
    model = run.model
    K = model.n_latent
    untrained = run.untrained.cpu().numpy()
    if getattr(model.effect, "is_grn", False):
        return None, "GPO-VAE's masks are its gene x gene GRN (score it with pyrovae grn --reference)"
    probs = model.effect.mask_probs()
    if probs is not None and tuple(probs.shape) == (model.n_treatments, K):
        out, kind = probs.detach().cpu().numpy().astype(np.float64), "mask_probability"
    else:
        eff = Posterior.from_run(run).global_samples(200, 0).get("effect")
        if eff is None or eff.shape[-1] != K:
            return None, "this model has no per-perturbation effect on the latent dimensions"
        out, kind = np.abs(eff.mean(0)).astype(np.float64), "abs_effect"
    out[untrained] = np.nan
    return out, kind


def comembership_auroc(
    usage: np.ndarray,
    names: Sequence[str],
    gene_sets: dict[str, list[str]],
    n_permutations: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Do perturbations whose targets share a gene set share latent dimensions?

    Args:
        usage: (T, K) usage rows (:func:`latent_usage`; NaN rows are left out).
        names: T target gene names.
        gene_sets: ``{name: genes}``; perturbations whose target is in no set are left out.

    Returns:
        ``auroc`` (pairs sharing a set against the cosine similarity of their usage rows), ``p_value``
        (null: usage rows shuffled among the annotated perturbations), ``n_perturbations``, ``n_pairs``,
        ``n_positive_pairs``. NaN when there are fewer than 2 annotated perturbations or one class of pairs.
    """
    names = [str(n) for n in names]
    membership = {n: set() for n in names}
    for i, genes in enumerate(gene_sets.values()):
        for g in genes:
            if g in membership:
                membership[g].add(i)
    keep = [i for i, n in enumerate(names) if membership[n] and np.isfinite(usage[i]).all()]
    nan = {"auroc": np.nan, "p_value": np.nan}
    base = {"n_perturbations": len(keep), "n_pairs": 0, "n_positive_pairs": 0}
    if len(keep) < 2:
        return {**nan, **base}
    u = np.asarray(usage, dtype=np.float64)[keep]
    norm = np.linalg.norm(u, axis=1, keepdims=True)
    u = np.divide(u, norm, out=np.zeros_like(u), where=norm > 0)
    iu = np.triu_indices(len(keep), 1)
    shared = np.asarray([[bool(membership[names[a]] & membership[names[b]]) for b in keep] for a in keep])
    y = shared[iu]
    base.update(n_pairs=int(len(y)), n_positive_pairs=int(y.sum()))
    if y.all() or not y.any():
        return {**nan, **base}

    def auc_of(rows: np.ndarray) -> float:
        s = (rows @ rows.T)[iu]
        r = rankdata(s)
        n_pos, n_neg = y.sum(), (~y).sum()
        return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))

    obs = auc_of(u)
    p = np.nan
    if n_permutations > 0:
        rng = np.random.default_rng(seed)
        null = np.asarray([auc_of(u[rng.permutation(len(u))]) for _ in range(int(n_permutations))])
        p = float((1.0 + np.sum(null >= obs - 1e-12)) / (1.0 + n_permutations))
    return {"auroc": obs, "p_value": p, **base}


def _tests(
    level: str,
    scores: np.ndarray,
    universe: list[str],
    sets: dict[str, list[str]],
    n_permutations: int,
    seed: int,
    signed: np.ndarray | None = None,
    n_leading: int = 5,
) -> list[dict[str, Any]]:
    """Rows of :func:`latent_enrichment` for one level: every (dimension, set) test."""
    pos = {g: i for i, g in enumerate(universe)}
    names = list(sets)
    members = [np.asarray([pos[g] for g in sets[s]], dtype=np.int64) for s in names]
    rows = []
    for k in range(scores.shape[0]):
        auc, p = rank_enrichment(scores[k], members, n_permutations, seed=seed + k)
        for j, s in enumerate(names):
            m = members[j]
            lead = m[np.argsort(-scores[k, m], kind="stable")[:n_leading]]
            row = {
                "level": level,
                "dimension": f"z{k}",
                "gene_set": s,
                "n_members": len(m),
                "n_universe": len(universe),
                "auroc": float(auc[j]),
                "p_value": float(p[j]),
                "leading": ";".join(universe[i] for i in lead),
            }
            if signed is not None:
                row["mean_sensitivity"] = float(signed[k, m].mean())
            rows.append(row)
    return rows


def latent_enrichment(
    run,
    gene_sets: dict[str, list[str]],
    n_cells: int = 256,
    n_permutations: int = 10000,
    min_size: int = 3,
    max_size: int | None = 500,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Gene-set enrichment of every latent dimension of a run (see the module docstring).

    Args:
        run: a trained :class:`~pyrovae.runs.run.Run`.
        gene_sets: ``{name: genes}`` (:func:`pyrovae.evaluate.knowledge.read_gene_sets`).
        n_cells: cells of :func:`decoder_sensitivity`.
        n_permutations: random sets per p-value.
        min_size, max_size: test a set at a level only when it has that many members in the level's
            universe (the run's genes; its trained treatments); ``max_size=None``: no upper bound.
        seed: seed of the cells and of the nulls.

    Returns:
        ``(table, summary)``. ``table``: one row per (level, dimension, set) with ``level``
        (``"genes"``/``"perturbations"``), ``dimension`` (``z0`` ..), ``gene_set``, ``n_members``,
        ``n_universe``, ``auroc``, ``p_value``, ``fdr`` (Benjamini-Hochberg within the level), ``leading``
        (the set's top members by score, ``;``-joined) and, for genes, ``mean_sensitivity`` (the members'
        mean signed J: up or down along the dimension), sorted by level then p-value. ``summary``: how the
        sets matched each universe, the usage kind, the co-membership test (:func:`comembership_auroc`)
        and the settings.

    Raises:
        ValueError: no gene of the sets is a gene of the run (how many matched), or no set is large
            enough at any level.
    """
    genes = [str(g) for g in run.schema["genes"]]
    post = Posterior.from_run(run)
    cov = post.training_covariates(n_cells, np.random.default_rng(seed)) if run.model.n_covariates else None
    upper = np.inf if max_size is None else int(max_size)
    sets_g, rep_g = match_gene_sets(gene_sets, genes, min_size=min_size, what="the run's genes")
    sets_g = {k: v for k, v in sets_g.items() if len(v) <= upper}
    summary: dict[str, Any] = {
        "genes": {**rep_g, "n_sets_tested": len(sets_g)},
        "n_cells": int(n_cells),
        "n_permutations": int(n_permutations),
        "min_size": int(min_size),
        "max_size": max_size,
        "seed": int(seed),
        "model": run.model_name or run.model_cfg.family,
    }
    rows: list[dict[str, Any]] = []
    if sets_g:
        J = decoder_sensitivity(run.model, n_cells, seed, cov)
        rows += _tests("genes", np.abs(J), genes, sets_g, n_permutations, seed, signed=J)
    usage, kind = latent_usage(run)
    summary["usage"] = kind
    if usage is not None:
        trained = [i for i in range(len(run.treatments)) if np.isfinite(usage[i]).all()]
        names = [run.treatments[i] for i in trained]
        all_genes = {g for v in gene_sets.values() for g in v}
        if any(n in all_genes for n in names):
            sets_p, rep_p = match_gene_sets(gene_sets, names, min_size=min_size, what="the perturbed genes")
            sets_p = {k: v for k, v in sets_p.items() if len(v) <= upper}
            summary["perturbations"] = {**rep_p, "n_sets_tested": len(sets_p)}
            if sets_p:
                rows += _tests(
                    "perturbations", usage[trained].T, names, sets_p, n_permutations, seed + 10_000
                )
            summary["comembership"] = comembership_auroc(
                usage, run.treatments, gene_sets, n_permutations, seed
            )
        else:
            summary["perturbations"] = {"n_matched_genes": 0, "n_universe": len(names), "n_sets_tested": 0}
    if not rows:
        raise ValueError(
            f"no gene set has >= {min_size} genes among the run's genes (matched {rep_g['n_matched_genes']} "
            f"of the sets' {rep_g['n_set_genes']} genes) or its perturbed genes; lower min_size (--min-size) "
            "or use sets of the data's genes"
        )
    table = pd.DataFrame(rows)
    table["fdr"] = np.nan
    for idx in table.groupby("level").groups.values():
        table.loc[idx, "fdr"] = benjamini_hochberg(table.loc[idx, "p_value"].to_numpy())
    cols = ["level", "dimension", "gene_set", "n_members", "n_universe", "auroc", "p_value", "fdr", "leading"]
    cols += [c for c in table.columns if c not in cols]
    table = table[cols].sort_values(["level", "p_value", "auroc"], ascending=[True, True, False])
    return table.reset_index(drop=True), summary
