"""Features of each perturbation's target gene, for effects predicted from gene features.

The effect blocks' ``gene_features`` option (:class:`~pyrovae.models.effects.features.FeaturePrior`) puts
the prior mean of a perturbation's latent effect at a learned linear function of its target gene's
features. This module makes the (T, F) feature matrix, one row per treatment, from one of three sources
(:data:`GENE_FEATURE_SOURCES`):

- ``"data"``: the data itself. Each gene's principal-component scores in a PCA of the training pseudobulk
  (the mean log-normalised expression of every training label, control included; genes as observations,
  labels as features, each label centred over genes): the gene embedding of the linear baseline of
  Ahlmann-Eltze, Huber and Anders (2025, :mod:`pyrovae.baselines.linear`). Training cells only, so a
  held-out perturbation's own cells never enter; every target that is a measured gene has a row.
- ``"table"``: a user's gene-embedding table (CSV, TSV or Parquet; one row per gene, the gene name in the
  first column or the index, one numeric column per dimension: GO-derived, protein or foundation-model
  embeddings), :func:`read_gene_table`.
- ``"graph"``: a user's gene-gene graph (an edge list: ``source``, ``target`` and an optional numeric
  ``weight``; GO, STRING, a TF-target database), :func:`read_gene_graph`, propagated to each target by a
  random walk with restart: the features are the leading spectral coordinates of the diffusion kernel
  K = (1 - alpha)(I - alpha A_norm)^-1 of the symmetrically normalised adjacency, so that the features' inner
  products approximate K (:func:`graph_embedding`).

A treatment is matched to a gene by its name (exactly, else case-insensitively). Rows of treatments
without a match have no features (``has`` False): their prior mean is the learned intercept alone (the
mean effect of the seen perturbations). Features are standardised over the matched treatments and divided
by sqrt(F), so that a unit-variance weight prior gives prior means of the effect prior's scale.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.config import preview
from pyrovae.data.matrix import normalize_log, select_rows

__all__ = [
    "GENE_FEATURE_SOURCES",
    "GeneFeatureSource",
    "GeneFeatures",
    "describe_source",
    "graph_embedding",
    "pca_gene_embedding",
    "read_gene_graph",
    "read_gene_table",
    "treatment_gene_features",
]

#: where the features of :func:`treatment_gene_features` come from (the option ``gene_features``; unset: off)
GeneFeatureSource = Literal["data", "table", "graph"]
GENE_FEATURE_SOURCES = typing.get_args(GeneFeatureSource)
#: restart probability complement alpha of the graph's random walk with restart
GRAPH_ALPHA = 0.8


@dataclasses.dataclass
class GeneFeatures:
    """(T, F) standardised features of the treatments' target genes.

    Attributes:
        values: (T, F) float32, zero on rows without features.
        has: (T,) bool, the treatment's target gene has features.
        genes: (T,) the matched gene name per treatment (``""`` where none).
        source: one of :data:`GENE_FEATURE_SOURCES`.
    """

    values: np.ndarray
    has: np.ndarray
    genes: list[str]
    source: str

    @property
    def n_matched(self) -> int:
        return int(self.has.sum())


def describe_source(source: str | None, path: str | None = None) -> str:
    """One line naming where a run's gene features came from (``""`` for a run without them)."""
    if source is None:
        return ""
    what = {
        "data": "the target gene's loading in a PCA of the training pseudobulk",
        "table": f"the gene-embedding table {path}",
        "graph": f"the gene graph {path}, propagated to each target",
    }
    return f"{source}: {what.get(source, source)}"


def _read_frame(path: Path, what: str) -> pd.DataFrame:
    """A CSV / TSV / Parquet file as a DataFrame of strings and numbers; one-line errors."""
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; give the path of a CSV, TSV or Parquet file")
    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith(".parquet") or suffix.endswith(".pq"):
            frame = pd.read_parquet(path)
            if not isinstance(frame.index, pd.RangeIndex):
                frame = frame.reset_index()
        else:
            sep = "\t" if any(suffix.endswith(s) for s in (".tsv", ".tsv.gz", ".txt")) else ","
            frame = pd.read_csv(path, sep=sep)
    except (ValueError, OSError, ImportError, pd.errors.ParserError, UnicodeDecodeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(f"{what} {path} cannot be read ({first}); give a CSV, TSV or Parquet file") from None
    if frame.empty or frame.shape[1] < 2:
        raise ValueError(
            f"{what} {path} has {frame.shape[0]} rows and {frame.shape[1]} columns; it needs a gene column "
            "and at least one more"
        )
    return frame


def read_gene_table(path: str | Path) -> pd.DataFrame:
    """A gene-embedding table: (genes, F) float64 indexed by gene name (the first column of the file).

    Raises ``ValueError`` (one line) for a file that cannot be read, non-numeric or missing values, or a
    gene named twice."""
    path = Path(path)
    frame = _read_frame(path, "gene-features table")
    genes = frame.iloc[:, 0].astype(str).str.strip()
    values = frame.iloc[:, 1:]
    bad = [str(c) for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
    if bad:
        raise ValueError(
            f"gene-features table {path}: column(s) {preview(bad, 5)} are not numeric; the first column is "
            "the gene name and every other column one numeric dimension"
        )
    arr = values.to_numpy(dtype=np.float64)
    rows = ~np.isfinite(arr).all(1)
    if rows.any():
        raise ValueError(
            f"gene-features table {path}: {int(rows.sum())} row(s) hold missing or infinite values "
            f"(e.g. gene {genes[rows].iloc[0]!r}); fill or drop them"
        )
    dup = genes[genes.duplicated()].tolist()
    if dup:
        raise ValueError(f"gene-features table {path} names {len(dup)} gene(s) twice (e.g. {dup[0]!r})")
    return pd.DataFrame(
        arr, index=pd.Index(genes.to_numpy(), name="gene"), columns=[str(c) for c in values.columns]
    )


def read_gene_graph(path: str | Path) -> pd.DataFrame:
    """A gene-gene edge list: DataFrame with ``source``, ``target`` (str) and ``weight`` (float, 1 if the
    file has no third column). Columns named ``source`` / ``target`` / ``weight`` are used if present, else
    the first two (three). Raises ``ValueError`` (one line) for an unreadable file or non-numeric weights."""
    path = Path(path)
    frame = _read_frame(path, "gene graph")
    cols = {str(c).lower(): c for c in frame.columns}
    src = cols.get("source", frame.columns[0])
    tgt = cols.get("target", frame.columns[1])
    wcol = cols.get("weight", frame.columns[2] if frame.shape[1] > 2 else None)
    if wcol is None:
        weight = np.ones(len(frame))
    else:
        w = pd.to_numeric(frame[wcol], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(w).all():
            bad = int((~np.isfinite(w)).sum())
            raise ValueError(
                f"gene graph {path}: {bad} edge(s) have a weight in column {str(wcol)!r} that is not a "
                "number; give numeric weights (or only source and target columns)"
            )
        weight = np.abs(w)
    out = pd.DataFrame(
        {
            "source": frame[src].astype(str).str.strip().to_numpy(),
            "target": frame[tgt].astype(str).str.strip().to_numpy(),
            "weight": weight,
        }
    )
    out = out[(out["source"] != out["target"]) & (out["weight"] > 0)]
    if out.empty:
        raise ValueError(f"gene graph {path} has no edge between two different genes with a non-zero weight")
    return out


def pca_gene_embedding(pseudobulk: np.ndarray, n_components: int) -> np.ndarray:
    """(G, K) principal-component scores of the genes in a PCA of ``pseudobulk`` (L, G) (genes as
    observations, conditions as features, each condition centred over genes), K = min(n_components, L, G):
    the gene embedding of Ahlmann-Eltze, Huber and Anders (2025)."""
    m = np.asarray(pseudobulk, dtype=np.float64).T  # (G, L)
    m = m - m.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    k = max(1, min(int(n_components), len(s)))
    return u[:, :k] * s[:k]


def graph_embedding(edges: pd.DataFrame, n_components: int, alpha: float = GRAPH_ALPHA) -> pd.DataFrame:
    """(nodes, K) spectral coordinates of the random-walk-with-restart kernel of an undirected graph.

    A = the symmetrised weighted adjacency (absolute weights), A_norm = D^-1/2 A D^-1/2 (eigenvalues lambda in
    [-1, 1]), K = (1 - alpha)(I - alpha A_norm)^-1 with eigenvalues (1 - alpha) / (1 - alpha lambda). The
    embedding is U_K diag(sqrt of those) over the K largest, so that its inner products are the best rank-K
    approximation of K: the diffusion of each node's indicator over the graph."""
    nodes = pd.Index(sorted(set(edges["source"]) | set(edges["target"])))
    pos = {g: i for i, g in enumerate(nodes)}
    i = np.array([pos[g] for g in edges["source"]])
    j = np.array([pos[g] for g in edges["target"]])
    n = len(nodes)
    a = sp.coo_matrix((edges["weight"].to_numpy(), (i, j)), shape=(n, n)).tocsr()
    a = a + a.T
    deg = np.asarray(a.sum(1)).reshape(-1)
    inv = sp.diags(1.0 / np.sqrt(np.maximum(deg, 1e-12)))
    norm = inv @ a @ inv
    k = max(1, min(int(n_components), n - 1))
    if n <= 2000:
        lam, vec = np.linalg.eigh(norm.toarray())
        lam, vec = lam[::-1][:k], vec[:, ::-1][:, :k]
    else:
        from scipy.sparse.linalg import eigsh  # noqa: PLC0415 (only for large graphs)

        lam, vec = eigsh(norm, k=k, which="LA")
        order = np.argsort(-lam)
        lam, vec = lam[order], vec[:, order]
    scale = np.sqrt((1.0 - alpha) / (1.0 - alpha * np.clip(lam, -1.0, 1.0)))
    return pd.DataFrame(vec * scale, index=nodes)


def _training_pseudobulk(data: Any) -> np.ndarray:
    """(L, G) mean log-normalised (log1p of counts per 10^4) expression of each training label."""
    idx = np.asarray(data.indices("train"))
    labels = np.asarray(data.labels)[idx].astype(str)
    rows = []
    for lab in sorted(set(labels.tolist())):
        cells = idx[labels == lab]
        x = select_rows(data.counts, cells)
        if data.is_count_data:
            v = normalize_log(x, target_sum=1e4)
        else:
            v = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
        rows.append(v.mean(0))
    return np.asarray(rows)


def _match(treatments: list[str], genes: pd.Index) -> list[str]:
    """The gene of ``genes`` each treatment names (exactly, else case-insensitively), ``""`` if none."""
    exact = set(map(str, genes))
    lower: dict[str, str] = {}
    for g in map(str, genes):
        lower.setdefault(g.lower(), g)
    return [t if t in exact else lower.get(t.lower(), "") for t in treatments]


def treatment_gene_features(
    data: Any, source: str, path: str | Path | None = None, n_components: int = 10
) -> GeneFeatures:
    """The (T, F) features of every treatment's target gene (see the module docstring).

    Args:
        data: :class:`~pyrovae.data.anndata.PerturbationData` (its split decides the training cells).
        source: ``"data"``, ``"table"`` or ``"graph"``.
        path: the table or edge-list file (``"table"``, ``"graph"``).
        n_components: F for ``"data"`` and ``"graph"`` (a table keeps its own width).

    Raises:
        ValueError: a malformed file, or no treatment whose target has features (the message says how many
            of how many matched).
    """
    treatments = [str(t) for t in data.treatments]
    if source == "data":
        emb = pca_gene_embedding(_training_pseudobulk(data), n_components)
        table = pd.DataFrame(emb, index=pd.Index([str(g) for g in data.genes]))
        where = "the measured genes"
    elif source in ("table", "graph"):
        if path is None:
            raise ValueError(f"gene_features={source!r} needs a file (gene_features_file)")
        if source == "table":
            table = read_gene_table(path)
        else:
            table = graph_embedding(read_gene_graph(path), n_components)
        where = f"{path} ({len(table)} genes, e.g. {preview(list(table.index), 3)})"
    else:
        raise ValueError(f"unknown gene_features source {source!r}; use one of {GENE_FEATURE_SOURCES}")
    matched = _match(treatments, table.index)
    has = np.array([m != "" for m in matched])
    if not has.any():
        raise ValueError(
            f"gene features: 0 of {len(treatments)} perturbation targets (e.g. {preview(treatments, 3)}) are "
            f"genes of {where}; name the genes as the perturbations are named"
        )
    raw = np.zeros((len(treatments), table.shape[1]))
    raw[has] = table.loc[[m for m in matched if m]].to_numpy(dtype=np.float64)
    mu, sd = raw[has].mean(0), raw[has].std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    values = np.where(has[:, None], (raw - mu) / sd / np.sqrt(raw.shape[1]), 0.0)
    return GeneFeatures(values.astype(np.float32), has, matched, source)
