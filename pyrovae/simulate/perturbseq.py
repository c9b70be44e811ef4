"""Seeded simulator of Perturb-seq-like count data with known ground truth.

:func:`simulate_perturbseq` writes an :class:`anndata.AnnData` of UMI counts from single and double
CRISPR(i) perturbations whose generative parameters are stored in ``uns["ground_truth"]`` (read them back
with :func:`ground_truth`). It is the default dataset of the library (demo and tests): the ``"tiny"``
preset simulates in well under a second, ``"default"`` in about a second; the same ``seed`` gives
bit-identical output (only ``np.random.default_rng`` streams are used, never the global RNG).

Generative process
------------------
Notation: ``G`` genes, ``K`` latent dimensions, ``T`` perturbed genes (= single perturbations), ``E`` extra
GRN genes, ``n = T + E`` GRN genes, ``H`` decoder hidden units.

1. **Genes.** ``var_names`` are the perturbed genes ``PG01 .. PGT`` (zero padded), then the extra GRN genes
   ``EG01 ..``, then the other genes ``G0001 ..`` and finally three mitochondrial-like genes ``MT-CO1``,
   ``MT-CO2``, ``MT-ND1`` (no GRN role; used by the low-quality artifact). ``var`` has boolean columns
   ``perturbed``, ``grn_gene`` (perturbed + extra GRN genes) and ``mt``.
2. **Sparse latent mechanisms.** For each single perturbation ``t`` (target gene ``PGt``): a mask
   ``m_t in {0,1}^K`` with ``m_tk ~ Bernoulli(mask_prob)`` (one random dimension is switched on if all are
   off, so every perturbation acts on >= 1 dimension) and an embedding ``e_t`` with
   ``|e_tk| = |N(effect_mean, effect_sd)|`` and a random sign. The latent effect is ``m_t * e_t``.
3. **Latent state.** Each cell has a basal state ``z_b ~ N(0, I_K)`` and
   ``z = z_b + sum_{t in cell} m_t * e_t`` (effects of a combination add in latent space; controls have no
   shift).
4. **Decoder.** A fixed random network ``f(z) = tanh(z W1 + b1) W2`` with ``W1 (K, H) ~ N(0, 1/K)``,
   ``b1 (H,) ~ N(0, 0.5^2)``, ``W2 (H, G) ~ N(0, 1.5^2 / H)`` maps ``z`` to per-gene log-rate logits. The
   log-means are ``eta = baseline + f(z)``; ``baseline (G,) ~ N(0, 1)`` for ordinary genes (some highly,
   some lowly expressed), ``N(1, 0.5^2)`` for GRN genes (perturbation targets of a screen are expressed
   genes, so that knock-downs are measurable), and ``log(0.01 * sum_{non-MT} exp(baseline)) + N(0, 0.3^2)``
   for each MT gene (about 3% MT counts in good cells, whatever ``G``).
5. **Gene regulatory network.** A random DAG on the ``n`` GRN genes: a random topological order whose first
   node is a perturbed gene; each forward pair is an edge with probability ``grn_edge_prob``, with weight
   ``+-grn_weight * U(0.5, 1)``. Then every extra GRN gene without a perturbed parent gets an edge from a
   random earlier perturbed gene, and every perturbed gene without a child (except the last node of the
   order, which cannot have one) gets an edge to a random later gene. ``A (n, n)`` is the weighted
   adjacency (row = parent, column = child, zero diagonal). Perturbing gene ``j`` sets a log-fold shift
   ``delta_j = knockdown`` on ``j`` itself that propagates along the DAG: the total log-fold shift on the
   GRN genes is the row vector ``delta (I - A)^{-1}`` (``delta`` sums the targets of a combination before
   propagation); it is added to ``eta`` of the GRN genes.
   ``grn_shape`` chooses other networks (``grn_edge_prob`` is then unused; same weights, every extra GRN
   gene still has a perturbed parent), each made of one kind of motif, so that direct and indirect effects
   differ in a known way: ``"chain"`` (the perturbed genes, in a random order, cut into chains
   a -> b -> c -> d of :data:`CHAIN_LENGTH` genes: indirect effects along each chain), ``"fork"`` (the
   perturbed genes as a random tree in which each gene regulates up to :data:`FORK_CHILDREN` others: forks
   cascaded over a few levels) and ``"collider"`` (the perturbed genes in a random order split into an
   upper and a lower half; each lower gene has :data:`COLLIDER_PARENTS` upper parents and each extra GRN
   gene as many lower parents: colliders on two levels, upper -> extra effects all indirect). In these
   shapes each extra GRN gene is a leaf: ``"chain"`` and ``"fork"`` hang it from one random perturbed gene.
6. **Counts.** Library size ``l ~ LogNormal(library_log_mean, library_log_sd)``, mean
   ``mu = l * softmax(eta)`` and ``x_g ~ Poisson(Gamma(theta_g, mu_g / theta_g))`` = NB with mean ``mu_g``
   and concentration ``theta_g ~ LogUniform(dispersion_range)``.
7. **Low-quality cells.** ``round(frac_low_quality * N)`` random cells (any perturbation) get their library
   size multiplied by 0.3 and ``eta`` of the MT genes raised by 2.5 (about x12 before normalisation), so
   standard QC (total counts, percent MT counts) finds them. ``obs["low_quality"]`` is the truth.
8. **Cells.** ``n_control_cells`` controls, ``cells_per_single`` cells per single perturbation and
   ``cells_per_double`` cells for each of ``n_doubles`` distinct random pairs of perturbed genes, in a
   random order. ``obs["perturbation"]`` is ``"control"``, ``"PG03"`` or ``"PG03+PG07"`` (names sorted
   inside a double; categorical), ``obs_names`` are ``cell00000 ..``. ``X`` is a
   ``scipy.sparse.csr_matrix`` of float32 integer counts.

9. **Batches.** With ``n_batches > 1`` each cell is assigned to a batch uniformly at random (with
   probability ``batch_confounding`` to its label's own batch instead) and its
   log-means get the batch's per-gene shift ``beta_b ~ N(0, batch_effect^2)`` (G,), whatever its
   perturbation: a replicate effect that is not a perturbation effect. Ground truth ``batch_shift``
   (n_batches, G); ``obs["batch"]``.

Independent random streams (``default_rng([seed, k])``) draw the masks/embeddings, decoder, baselines, GRN,
dispersions, doubles and cells, so e.g. changing the number of cells or doubles leaves the other parameters
unchanged.

Ground truth layout (``uns["ground_truth"]``; all values h5ad-safe)
-----------------------------------------------------------------------
See :data:`GROUND_TRUTH_DESCRIPTION` (also stored under the key ``"description"``).
``uns["simulation_config"]`` holds ``dataclasses.asdict(config)`` (tuples as lists).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.simulate.config import (
    BASELINE_SD,
    CHAIN_LENGTH,
    CHUNK_CELLS,
    COLLIDER_PARENTS,
    CONTROL_LABEL,
    DECODER_BIAS_SD,
    DECODER_OUT_SCALE,
    EXPRESSED_BASELINE_MEAN,
    EXPRESSED_BASELINE_SD,
    FORK_CHILDREN,
    GROUND_TRUTH_DESCRIPTION,
    LOW_QUALITY_LIBRARY_FACTOR,
    LOW_QUALITY_MT_LOG_BOOST,
    MT_BASELINE_SD,
    MT_GENES,
    MT_SHARE,
    S_BASELINE,
    S_BATCH,
    S_CELLS,
    S_DECODER,
    S_DISPERSION,
    S_DOUBLES,
    S_GRN,
    S_MECH,
    SimulationConfig,
    check_seed,
    numbered_names,
    resolve_config,
    seed_stream,
)

__all__ = [
    "simulate_perturbseq",
    "simulated_ate",
    "write_perturbseq_h5ad",
    "ground_truth",
    "planted_mechanisms",
]


def planted_mechanisms(
    n_treatments: int,
    n_latent: int,
    mask_prob: float,
    effect_mean: float,
    effect_sd: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(T, K) int8 masks ``m_tk ~ Bernoulli(mask_prob)`` with >= 1 active entry per row, and (T, K)
    float64 embeddings ``|N(effect_mean, effect_sd)|`` with a random sign (shared by the simulators)."""
    T, K = n_treatments, n_latent
    masks = (rng.random((T, K)) < mask_prob).astype(np.int8)
    fallback = rng.integers(K, size=T)
    empty = masks.sum(axis=1) == 0
    masks[np.flatnonzero(empty), fallback[empty]] = 1
    magnitude = np.abs(rng.normal(effect_mean, effect_sd, size=(T, K)))
    sign = np.where(rng.random((T, K)) < 0.5, -1.0, 1.0)
    return masks, magnitude * sign


def _shaped_grn(cfg: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """(n, n) 0/1 edges of a ``chain``, ``fork`` or ``collider`` GRN (module docstring, step 5)."""
    T, n = cfg.n_perturbed, cfg.n_perturbed + cfg.n_extra_grn_genes
    order = rng.permutation(T)
    edges = np.zeros((n, n), dtype=bool)
    extra = np.arange(T, n)
    if cfg.grn_shape == "chain":
        for start in range(0, T, CHAIN_LENGTH):
            chain = order[start : start + CHAIN_LENGTH]
            edges[chain[:-1], chain[1:]] = True
        edges[rng.integers(T, size=len(extra)), extra] = True
    elif cfg.grn_shape == "fork":
        for i in range(1, T):  # node i of the order hangs from node (i - 1) // FORK_CHILDREN
            edges[order[(i - 1) // FORK_CHILDREN], order[i]] = True
        edges[rng.integers(T, size=len(extra)), extra] = True
    else:  # collider
        upper, lower = order[: (T + 1) // 2], order[(T + 1) // 2 :]
        for child in lower:
            edges[rng.choice(upper, size=min(COLLIDER_PARENTS, len(upper)), replace=False), child] = True
        parents = lower if len(lower) else upper
        for child in extra:
            edges[rng.choice(parents, size=min(COLLIDER_PARENTS, len(parents)), replace=False), child] = True
    return edges


def _grn(cfg: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """(n, n) weighted DAG adjacency on the GRN genes (perturbed first), row = parent, col = child."""
    T, n = cfg.n_perturbed, cfg.n_perturbed + cfg.n_extra_grn_genes
    if cfg.grn_shape != "random":
        edges = _shaped_grn(cfg, rng)
        weights = (
            np.where(rng.random((n, n)) < 0.5, -1.0, 1.0) * cfg.grn_weight * rng.uniform(0.5, 1.0, (n, n))
        )
        return np.where(edges, weights, 0.0)
    first = int(rng.integers(T))
    order = np.concatenate([[first], rng.permutation(np.delete(np.arange(n), first))])
    # edges in rank coordinates: rank a -> rank b for a < b
    edges = np.triu(rng.random((n, n)) < cfg.grn_edge_prob, k=1)
    weights = np.where(rng.random((n, n)) < 0.5, -1.0, 1.0) * cfg.grn_weight * rng.uniform(0.5, 1.0, (n, n))
    is_perturbed = order < T
    for b in range(1, n):  # every extra GRN gene gets a perturbed parent
        if not is_perturbed[b] and not (edges[:b, b] & is_perturbed[:b]).any():
            candidates = np.flatnonzero(is_perturbed[:b])
            edges[rng.choice(candidates), b] = True
    for a in range(n - 1):  # every perturbed gene but the last of the order gets a child
        if is_perturbed[a] and not edges[a, a + 1 :].any():
            edges[a, rng.integers(a + 1, n)] = True
    adjacency = np.zeros((n, n))
    adjacency[np.ix_(order, order)] = np.where(edges, weights, 0.0)
    return adjacency


def _csr(
    data: list[np.ndarray], indices: list[np.ndarray], row_nnz: list[np.ndarray], shape
) -> sp.csr_matrix:
    """Assemble a float32 CSR matrix from per-chunk row-major nonzeros."""
    nnz = int(sum(d.size for d in data))
    index_dtype = np.int32 if max(nnz, shape[1]) < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(shape[0] + 1, dtype=index_dtype)
    np.cumsum(np.concatenate(row_nnz), out=indptr[1:])
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices).astype(index_dtype, copy=False), indptr), shape=shape
    )


def _sample_counts(
    z: np.ndarray,
    grn_shift: np.ndarray,
    low_quality: np.ndarray,
    library: np.ndarray,
    decoder: tuple[np.ndarray, np.ndarray, np.ndarray],
    baseline: np.ndarray,
    theta: np.ndarray,
    rng: np.random.Generator,
    batch_shift: np.ndarray | None = None,
) -> np.ndarray:
    """(n, G) NB counts of n cells (steps 4-7, 9): latent z (n, K), GRN log-fold shift (n, n_grn),
    low-quality flags (n,), library sizes (n,) (the low-quality factor already applied), batch shifts
    (n, G) or ``None``."""
    W1, b1, W2 = decoder
    eta = np.tanh(z @ W1 + b1) @ W2 + baseline
    eta[:, : grn_shift.shape[1]] += grn_shift
    if batch_shift is not None:
        eta += batch_shift
    eta[np.ix_(low_quality, np.arange(len(baseline) - len(MT_GENES), len(baseline)))] += (
        LOW_QUALITY_MT_LOG_BOOST
    )
    eta -= eta.max(axis=1, keepdims=True)
    mu = np.exp(eta, out=eta)  # softmax(eta) * library, in place
    mu *= (library / mu.sum(axis=1))[:, None]
    return rng.poisson(rng.gamma(theta, mu / theta))


def _str_array(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=str) if values else np.array([], dtype="<U1")


# ------------------------------------------------------------------------------------------ simulator
def simulate_perturbseq(
    preset: str | SimulationConfig = "default", seed: int = 0, **overrides: Any
) -> ad.AnnData:
    """Simulate a Perturb-seq-like dataset with known ground truth (see the module docstring).

    Args:
        preset: ``"tiny"`` (~390 cells x 40 genes), ``"default"`` (6,900 x 200), ``"targeted_panel"``
            (10,400 x 72, strong on-target knock-downs), ``"large"`` (100,000 x 2,000), or a
            :class:`SimulationConfig`.
        seed: non-negative integer seed; the same seed (and configuration) gives bit-identical output.
        **overrides: :class:`SimulationConfig` fields replacing those of the preset, e.g. ``knockdown=-3``.

    Returns:
        AnnData ``(N cells, G genes)``: ``X`` a float32 ``csr_matrix`` of integer counts; ``obs`` columns
        ``perturbation`` (categorical str: ``"control"``, ``"PG03"``, ``"PG03+PG07"``) and ``low_quality``
        (bool); ``var`` columns ``perturbed``, ``grn_gene``, ``mt`` (bool); ``uns["ground_truth"]``
        (:data:`GROUND_TRUTH_DESCRIPTION`) and ``uns["simulation_config"]``.

    Raises:
        ValueError: unknown preset name, or an inconsistent configuration.
        TypeError: an override that is not a :class:`SimulationConfig` field.
    """
    config, preset_name = resolve_config(preset, overrides)
    seed = check_seed(seed)
    cfg = config
    T, E, K, H, G = cfg.n_perturbed, cfg.n_extra_grn_genes, cfg.n_latent, cfg.decoder_hidden, cfg.n_genes
    n_grn = T + E
    n_other = G - n_grn - len(MT_GENES)

    # 1. genes
    perturbed = numbered_names("PG", T, 2)
    extra = numbered_names("EG", E, 2)
    genes = perturbed + extra + numbered_names("G", n_other, 4) + list(MT_GENES)
    mt_idx = np.arange(G - len(MT_GENES), G)

    # 2. latent mechanisms
    masks, embeddings = planted_mechanisms(
        cfg.n_perturbed,
        cfg.n_latent,
        cfg.mask_prob,
        cfg.effect_mean,
        cfg.effect_sd,
        seed_stream(seed, S_MECH),
    )
    latent_effects = masks * embeddings

    # 4. decoder and baselines
    rng = seed_stream(seed, S_DECODER)
    W1 = rng.normal(0.0, 1.0 / np.sqrt(K), size=(K, H))
    b1 = rng.normal(0.0, DECODER_BIAS_SD, size=H)
    W2 = rng.normal(0.0, DECODER_OUT_SCALE / np.sqrt(H), size=(H, G))
    rng = seed_stream(seed, S_BASELINE)
    baseline = rng.normal(0.0, BASELINE_SD, size=G)
    baseline[:n_grn] = rng.normal(EXPRESSED_BASELINE_MEAN, EXPRESSED_BASELINE_SD, size=n_grn)
    other_mass = np.exp(baseline[: G - len(MT_GENES)]).sum()
    baseline[mt_idx] = np.log(MT_SHARE * other_mass) + rng.normal(0.0, MT_BASELINE_SD, size=len(MT_GENES))

    # 5. GRN
    adjacency = _grn(cfg, seed_stream(seed, S_GRN))
    propagate = np.linalg.inv(np.eye(n_grn) - adjacency)  # exact: A is nilpotent

    # 6. dispersions
    lo, hi = (float(v) for v in cfg.dispersion_range)
    theta = np.exp(seed_stream(seed, S_DISPERSION).uniform(np.log(lo), np.log(hi), size=G))

    # 8. groups: control, singles, doubles
    rng = seed_stream(seed, S_DOUBLES)
    iu, ju = np.triu_indices(T, k=1)
    picks = np.sort(rng.choice(iu.size, size=cfg.n_doubles, replace=False)) if cfg.n_doubles else []
    double_pairs = [(int(iu[p]), int(ju[p])) for p in picks]
    doubles = ["+".join(sorted((perturbed[i], perturbed[j]))) for i, j in double_pairs]
    groups = [CONTROL_LABEL] + perturbed + doubles
    dosage = np.zeros((len(groups), T))
    dosage[1 + np.arange(T), np.arange(T)] = 1.0
    for r, (i, j) in enumerate(double_pairs):
        dosage[1 + T + r, [i, j]] = 1.0
    group_latent = dosage @ latent_effects  # (groups, K)
    group_grn = (cfg.knockdown * dosage) @ propagate[:T]  # (groups, n_grn): delta (I - A)^{-1}
    sizes = [cfg.n_control_cells] + [cfg.cells_per_single] * T + [cfg.cells_per_double] * cfg.n_doubles

    # 3, 6, 7: cells
    rng = seed_stream(seed, S_CELLS)
    N = int(sum(sizes))
    group_of = rng.permutation(np.repeat(np.arange(len(groups)), sizes))
    z = rng.standard_normal((N, K)) + group_latent[group_of]
    library = rng.lognormal(cfg.library_log_mean, cfg.library_log_sd, size=N)
    low_quality = np.zeros(N, dtype=bool)
    low_quality[rng.choice(N, size=int(round(cfg.frac_low_quality * N)), replace=False)] = True
    library[low_quality] *= LOW_QUALITY_LIBRARY_FACTOR
    batch_of, shifts = None, None
    if cfg.n_batches > 1:  # its own stream: the other parameters and cells do not change
        brng = seed_stream(seed, S_BATCH)
        shifts = brng.normal(0.0, cfg.batch_effect, size=(cfg.n_batches, G))
        batch_of = brng.integers(0, cfg.n_batches, size=N)
        home = brng.random(N) < cfg.batch_confounding
        batch_of[home] = group_of[home] % cfg.n_batches

    data, indices, row_nnz = [], [], []
    for start in range(0, N, CHUNK_CELLS):
        sl = slice(start, min(start + CHUNK_CELLS, N))
        counts = _sample_counts(
            z[sl],
            group_grn[group_of[sl]],
            low_quality[sl],
            library[sl],
            (W1, b1, W2),
            baseline,
            theta,
            rng,
            None if batch_of is None else shifts[batch_of[sl]],
        )
        nonzero = counts != 0
        data.append(counts[nonzero].astype(np.float32))  # row-major: CSR order
        indices.append(np.nonzero(nonzero)[1].astype(np.int32))
        row_nnz.append(np.count_nonzero(nonzero, axis=1))
    X = _csr(data, indices, row_nnz, (N, G))

    width = max(5, len(str(N - 1)))
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical.from_codes(group_of, categories=groups),
            "low_quality": low_quality,
        },
        index=pd.Index([f"cell{i:0{width}d}" for i in range(N)]),
    )
    if batch_of is not None:
        names = [f"B{b + 1}" for b in range(cfg.n_batches)]
        obs["batch"] = pd.Categorical.from_codes(batch_of, categories=names)
    is_mt = np.zeros(G, dtype=bool)
    is_mt[mt_idx] = True
    var = pd.DataFrame(
        {
            "perturbed": np.arange(G) < T,
            "grn_gene": np.arange(G) < n_grn,
            "mt": is_mt,
        },
        index=pd.Index(genes),
    )
    truth: dict[str, Any] = {
        "treatments": _str_array(perturbed),
        "masks": masks.astype(np.int8),
        "embeddings": embeddings.astype(np.float32),
        "latent_effects": latent_effects.astype(np.float32),
        "grn_genes": _str_array(perturbed + extra),
        "grn_adjacency": adjacency.astype(np.float32),
        "grn_total_effect": (propagate - np.eye(n_grn)).astype(np.float32),
        "knockdown": float(cfg.knockdown),
        "doubles": _str_array(doubles),
        "dispersion": theta.astype(np.float32),
        "baseline": baseline.astype(np.float32),
        "decoder": {
            "W1": W1.astype(np.float32),
            "b1": b1.astype(np.float32),
            "W2": W2.astype(np.float32),
        },
        "mt_genes": _str_array(list(MT_GENES)),
        "low_quality_library_factor": float(LOW_QUALITY_LIBRARY_FACTOR),
        "low_quality_mt_log_boost": float(LOW_QUALITY_MT_LOG_BOOST),
        "seed": seed,
        "preset": preset_name,
        "description": GROUND_TRUTH_DESCRIPTION,
    }
    if shifts is not None:
        truth["batch_shift"] = shifts.astype(np.float32)
    config_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    return ad.AnnData(X=X, obs=obs, var=var, uns={"ground_truth": truth, "simulation_config": config_dict})


def simulated_ate(
    truth: dict[str, Any],
    labels: list[str],
    depths: dict[str, np.ndarray],
    n_samples: int = 4000,
    seed: int = 0,
    batch: int | None = None,
    control_label: str = CONTROL_LABEL,
) -> np.ndarray:
    """The true ATE of ``labels`` under the simulator (:func:`ground_truth` ``truth``): a Monte Carlo of
    g(x) = log2(1e4 x / sum x + 1) over fresh cells (basal noise, NB counts; good-quality cells) of each
    label and of the control, at library sizes drawn from ``depths[label]`` ((n,) sizes, e.g. the data's
    cells of that label; ``depths[control_label]`` for the control), with batch ``batch``'s shift
    (``None``: no batch shift). Returns (len(labels), G): mean g of the label minus mean g of the control.
    Labels are singles or combinations ``A+B`` of the simulated treatments."""
    rng = np.random.default_rng([int(seed), 7919])
    W1, b1, W2 = (np.asarray(truth["decoder"][k], dtype=np.float64) for k in ("W1", "b1", "W2"))
    treatments = list(truth["treatments"])
    T = len(treatments)
    total = np.asarray(truth["grn_total_effect"], dtype=np.float64)
    propagate = total[:T] + np.eye(T, total.shape[1])
    shift = None if batch is None else np.asarray(truth["batch_shift"], dtype=np.float64)[batch]

    def mean_g(label: str) -> np.ndarray:
        d = np.zeros(T)
        if label != control_label:
            for part in label.split("+"):
                d[treatments.index(part)] = 1.0
        z = rng.standard_normal((n_samples, W1.shape[0])) + d @ truth["latent_effects"]
        eta = np.tanh(z @ W1 + b1) @ W2 + truth["baseline"]
        eta[:, : total.shape[1]] += (truth["knockdown"] * d) @ propagate
        if shift is not None:
            eta += shift
        p = np.exp(eta - eta.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        mu = rng.choice(np.asarray(depths[label], dtype=np.float64), size=n_samples)[:, None] * p
        theta = np.asarray(truth["dispersion"], dtype=np.float64)
        x = rng.poisson(rng.gamma(theta, mu / theta))
        return np.log2(1e4 * x / np.maximum(x.sum(1, keepdims=True), 1e-12) + 1.0).mean(0)

    control = mean_g(control_label)
    return np.stack([mean_g(lab) - control for lab in labels])


# ------------------------------------------------------------------------------------ chunked writer
def write_perturbseq_h5ad(
    path: str | Path,
    preset: str | SimulationConfig = "large",
    seed: int = 0,
    chunk_cells: int = 4096,
    **overrides: Any,
) -> Path:
    """Simulate a dataset of any size straight into an ``.h5ad`` file, one chunk of cells at a time.

    The same generative process and the same parameters (masks, embeddings, decoder, baselines, GRN,
    dispersions, doubles: the streams of :func:`simulate_perturbseq` with this seed and configuration)
    and the same ``uns``; the cells are drawn chunk by chunk (chunk c from ``default_rng([seed, 6, c + 1])``
    after the cell groups and low-quality flags), so the counts differ from :func:`simulate_perturbseq`'s
    but are again fixed by the seed (and ``chunk_cells``). Memory: O(chunk_cells * G) for one dense chunk
    plus O(N) for the labels; ``X`` is appended to the file as CSR chunk by chunk and never held whole.

    Returns:
        the path written (overwritten if it exists).
    """
    config, preset_name = resolve_config(preset, overrides)
    seed = check_seed(seed)
    if int(chunk_cells) < 1:
        raise ValueError(f"chunk_cells must be >= 1, got {chunk_cells}")
    cfg, path = config, Path(path)
    # the parameters: a one-cell simulation draws them from the same streams (they do not depend on N)
    head = simulate_perturbseq(
        dataclasses.replace(cfg, n_control_cells=1, cells_per_single=0, cells_per_double=0), seed
    )
    truth = ground_truth(head)
    T, K = cfg.n_perturbed, cfg.n_latent
    groups = [CONTROL_LABEL] + truth["treatments"] + truth["doubles"]
    dosage = np.zeros((len(groups), T))
    dosage[1 + np.arange(T), np.arange(T)] = 1.0
    col = {t: j for j, t in enumerate(truth["treatments"])}
    for r, pair in enumerate(truth["doubles"]):
        dosage[1 + T + r, [col[g] for g in pair.split("+")]] = 1.0
    group_latent = dosage @ truth["latent_effects"].astype(np.float64)
    propagate = truth["grn_total_effect"].astype(np.float64) + np.eye(len(truth["grn_genes"]))
    group_grn = (cfg.knockdown * dosage) @ propagate[:T]
    dec = truth["decoder"]
    decoder = (dec["W1"].astype(np.float64), dec["b1"].astype(np.float64), dec["W2"].astype(np.float64))
    baseline, theta = truth["baseline"].astype(np.float64), truth["dispersion"].astype(np.float64)

    sizes = [cfg.n_control_cells] + [cfg.cells_per_single] * T + [cfg.cells_per_double] * cfg.n_doubles
    N = int(sum(sizes))
    rng = seed_stream(seed, S_CELLS)
    group_of = rng.permutation(np.repeat(np.arange(len(groups), dtype=np.int32), sizes))
    low_quality = np.zeros(N, dtype=bool)
    low_quality[rng.choice(N, size=int(round(cfg.frac_low_quality * N)), replace=False)] = True
    width = max(5, len(str(N - 1)))
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical.from_codes(group_of, categories=groups), "low_quality": low_quality},
        index=pd.Index([f"cell{i:0{width}d}" for i in range(N)]),
    )
    uns = dict(head.uns)
    uns["ground_truth"] = {**head.uns["ground_truth"], "preset": preset_name}
    uns["simulation_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(obs=obs, var=head.var.copy(), uns=uns).write_h5ad(path)
    del obs
    with h5py.File(path, "a") as f:
        for c, start in enumerate(range(0, N, int(chunk_cells))):
            sl = slice(start, min(start + int(chunk_cells), N))
            crng = np.random.default_rng([seed, S_CELLS, c + 1])
            n = sl.stop - sl.start
            z = crng.standard_normal((n, K)) + group_latent[group_of[sl]]
            library = crng.lognormal(cfg.library_log_mean, cfg.library_log_sd, size=n)
            library[low_quality[sl]] *= LOW_QUALITY_LIBRARY_FACTOR
            counts = _sample_counts(
                z, group_grn[group_of[sl]], low_quality[sl], library, decoder, baseline, theta, crng
            )
            chunk = sp.csr_matrix(counts.astype(np.float32))
            if c == 0:  # a 64-bit indptr: more than 2^31 non-zeros at ~2 M cells x 2,000 genes
                chunk.indptr = chunk.indptr.astype(np.int64)
                ad.io.write_elem(f, "X", chunk)
            else:
                ad.io.sparse_dataset(f["X"]).append(chunk)
    return path


# ------------------------------------------------------------------------------------------ reading back
_STR_LIST_KEYS = ("treatments", "grn_genes", "doubles", "mt_genes")
_ARRAY_DTYPES = {
    "masks": np.int8,
    "embeddings": np.float32,
    "latent_effects": np.float32,
    "grn_adjacency": np.float32,
    "grn_total_effect": np.float32,
    "dispersion": np.float32,
    "baseline": np.float32,
    "batch_shift": np.float32,
}


def ground_truth(adata: ad.AnnData) -> dict[str, Any]:
    """The simulator's ground truth of ``adata`` (also after an h5ad round trip).

    Returns:
        dict with ``treatments``, ``grn_genes``, ``doubles``, ``mt_genes`` as lists of str; ``masks``
        ``(T, K)`` int8; ``embeddings``, ``latent_effects`` ``(T, K)`` float32; ``grn_adjacency``,
        ``grn_total_effect`` ``(n, n)`` float32; ``dispersion``, ``baseline`` ``(G,)`` float32;
        ``decoder`` dict of float32 arrays ``W1 (K, H)``, ``b1 (H,)``, ``W2 (H, G)``; ``knockdown``,
        ``low_quality_library_factor``, ``low_quality_mt_log_boost`` floats; ``seed`` int; ``preset``
        and ``description`` str. See :data:`GROUND_TRUTH_DESCRIPTION`.

    Raises:
        ValueError: ``adata`` has no simulated ground truth.
    """
    raw = adata.uns.get("ground_truth") if hasattr(adata, "uns") else None
    if not isinstance(raw, dict) or "masks" not in raw or "treatments" not in raw:
        raise ValueError(
            "this AnnData has no simulated ground truth in uns['ground_truth'] (it was not made by "
            "pyrovae.simulate.simulate_perturbseq, or uns was dropped, e.g. by subsetting with "
            "copy=False or by a conversion tool)"
        )
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _STR_LIST_KEYS:
            out[key] = [str(v) for v in np.asarray(value).reshape(-1)]
        elif key in _ARRAY_DTYPES:
            out[key] = np.asarray(value, dtype=_ARRAY_DTYPES[key])
        elif key == "decoder" and isinstance(value, dict):
            out[key] = {k: np.asarray(v, dtype=np.float32) for k, v in value.items()}
        elif key == "seed":
            out[key] = int(value)
        elif key in ("preset", "description"):
            out[key] = str(value)
        elif key in ("knockdown", "low_quality_library_factor", "low_quality_mt_log_boost"):
            out[key] = float(value)
        else:
            out[key] = value
    return out
