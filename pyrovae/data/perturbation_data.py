"""The container of validated perturbation data: :class:`PerturbationData` (N cells, G genes, T treatments).

:func:`pyrovae.data.anndata.load_perturbation_data` (or :func:`pyrovae.read_data`) makes one from an AnnData;
inside the package it is trusted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.data.matrix import dense_rows, nonzero_counts

__all__ = ["SPLITS", "UNUSED_SPLIT", "PerturbationData", "untrained_treatments"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: the split of a cell no split uses
UNUSED_SPLIT = ""


def untrained_treatments(train_counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """(T,) bool: the treatments with no training cell, N_t = 0 (written once for every caller).

    The model has no data for them: they are predicted from the prior (or the effect block's
    ``predict_untrained``, GPO-VAE's GRN transfer), in training's validation loss, IWELBO and prediction
    alike.
    ``train_counts``: (T,) N_t over the training split, :meth:`PerturbationData.treatment_counts` or a run
    schema's ``"train_treatment_counts"``.
    """
    return np.asarray(train_counts) == 0


@dataclasses.dataclass
class PerturbationData:
    """Validated perturbation data (N cells, G genes, T treatments).

    Attributes:
        counts: (N, G) counts, ``np.ndarray`` or ``scipy.sparse.csr_matrix`` (float32).
        genes: G gene names.
        labels: (N,) canonical perturbation labels (sorted tokens joined by ``sep``; controls =
            ``control_label``).
        dosage: (N, T) float32 dosage matrix D, a ``scipy.sparse.csr_matrix`` (a dense array given here is
            converted): memory O(nnz + N), not O(N T); :meth:`dosage_rows` densifies a minibatch's rows.
        treatments: T treatment names (columns of D).
        split: (N,) ``"train"``, ``"val"``, ``"test"`` or ``""`` (cell used by no split).
        library_size: (N,) total counts over the modelled genes, or the size factors of ``size_factor_key``.
        control_label, sep, encode_combos_as_unique: how labels were read.
        norm_mean, norm_std: (G,) mean and std of log1p(counts) over training cells (of the values
            themselves when ``is_count_data`` is False; std of constant genes set to 1, so
            standardisation never divides by zero).
        obs: the AnnData's obs (row-aligned), for extra columns (QC flags, ...).
        uns: the AnnData's uns (ground truth of simulated data, stored pairings).
        is_count_data: whether the matrix holds non-negative integers.
        extras: further per-cell arrays (first axis N) that minibatches carry, e.g. ``qc`` (N, 1),
            ``delta_x`` (N, T), ``cfx`` (N, G) for GPO/CRADLE-VAE, and ``covariates`` (N, C): the one-hot
            batch and covariates (:func:`covariate_onehot`), C = the total number of levels.
        covariate_levels: {obs column: its levels in order}, batch first (empty without covariates).
        size_factor_key: the obs column ``library_size`` was read from (``None``: the sum over the genes).
    """

    counts: Any  # np.ndarray, scipy.sparse.csr_matrix, or a backed on-disk matrix
    genes: list[str]
    labels: np.ndarray
    dosage: sp.csr_matrix
    treatments: list[str]
    split: np.ndarray
    library_size: np.ndarray
    control_label: str
    sep: str
    encode_combos_as_unique: bool
    norm_mean: np.ndarray
    norm_std: np.ndarray
    obs: pd.DataFrame
    uns: dict[str, Any]
    is_count_data: bool = True
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    covariate_levels: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    size_factor_key: str | None = None

    def __post_init__(self) -> None:
        d = self.dosage
        if not (sp.isspmatrix_csr(d) and d.dtype == np.float32):
            self.dosage = sp.csr_matrix(d if sp.issparse(d) else np.asarray(d), dtype=np.float32)

    @property
    def n_cells(self) -> int:
        return int(self.dosage.shape[0])

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_treatments(self) -> int:
        return len(self.treatments)

    def indices(self, split: str | None) -> np.ndarray:
        """Row positions of a split (``None``: all cells with any split)."""
        if split is None:
            return np.flatnonzero(self.split != UNUSED_SPLIT)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        return np.flatnonzero(self.split == split)

    def treatment_counts(self, split: str | None = "train") -> np.ndarray:
        """(T,) N_t: number of cells of ``split`` whose dosage column t is non-zero."""
        idx = self.indices(split)
        return nonzero_counts(self.dosage[idx], 0).astype(np.float32)

    def untrained(self) -> np.ndarray:
        """(T,) bool: the treatments with no training cell (:func:`untrained_treatments` of the training
        N_t)."""
        return untrained_treatments(self.treatment_counts("train"))

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Dense float32 counts of the given rows only, shape (len(idx), G)."""
        return dense_rows(self.counts, idx)

    def dosage_rows(self, idx: np.ndarray) -> np.ndarray:
        """Dense float32 dosage rows of the given cells only, shape (len(idx), T)."""
        return dense_rows(self.dosage, idx)

    def groups(self, split: str | None = None) -> list[str]:
        """Sorted distinct non-control labels present in ``split``."""
        labs = self.labels[self.indices(split)]
        return sorted({str(v) for v in labs} - {self.control_label})

    def __repr__(self) -> str:  # the dataclass default prints every array (~35,000 characters)
        kind = (
            "dense"
            if isinstance(self.counts, np.ndarray)
            else "sparse"
            if sp.issparse(self.counts)
            else "backed"
        )
        splits = ", ".join(f"{s} {int((self.split == s).sum())}" for s in SPLITS)
        shown = ", ".join(self.treatments[:5]) + (", ..." if self.n_treatments > 5 else "")
        extras = f", extras {sorted(self.extras)}" if self.extras else ""
        return (
            f"PerturbationData({self.n_cells} cells x {self.n_genes} genes ({kind}"
            f"{'' if self.is_count_data else ', not counts'}), {self.n_treatments} treatments [{shown}], "
            f"control {self.control_label!r}, split {splits}{extras})"
        )

    def schema(self) -> dict[str, Any]:
        """What a model trained on this data must remember to read new data the same way."""
        return {
            "genes": list(self.genes),
            "treatments": list(self.treatments),
            "control_label": self.control_label,
            "sep": self.sep,
            "encode_combos_as_unique": self.encode_combos_as_unique,
            "norm_mean": self.norm_mean.tolist(),
            "norm_std": self.norm_std.tolist(),
            "train_treatment_counts": self.treatment_counts("train").tolist(),
            "covariates": {k: list(v) for k, v in self.covariate_levels.items()},
            "covariate_combos": self.covariate_combos("train"),
            "size_factor_key": self.size_factor_key,
        }

    def kept_share(self, split: str | None = "train") -> float:
        """Median over the cells of ``split`` of (counts over the modelled genes) / library size: 1 without
        size factors, the modelled genes' share of each cell's depth with them."""
        idx = self.indices(split)
        kept = np.concatenate(
            [dense_rows(self.counts, idx[i : i + 8192]).sum(1) for i in range(0, len(idx), 8192)] or [[]]
        )
        return float(np.median(kept / np.maximum(self.library_size[idx], 1e-12)))

    def covariate_combos(self, split: str | None = "train") -> dict[str, list]:
        """The combinations of covariate levels among the cells of ``split`` and how many cells hold each:
        ``{"levels": [[level of each key], ...], "counts": [...]}`` (empty lists without covariates).
        Predictions that choose no level average over these in proportion."""
        if not self.covariate_levels:
            return {"levels": [], "counts": []}
        idx = self.indices(split)
        codes = np.stack([self.covariate_codes(k)[idx] for k in self.covariate_levels], axis=1)
        combos, counts = np.unique(codes, axis=0, return_counts=True)
        names = [list(v) for v in self.covariate_levels.values()]
        return {
            "levels": [[names[j][c] for j, c in enumerate(row)] for row in combos.tolist()],
            "counts": counts.astype(int).tolist(),
        }

    @property
    def n_covariates(self) -> int:
        """C: the width of the one-hot batch and covariates (0 without them)."""
        return sum(len(v) for v in self.covariate_levels.values())

    def covariate_codes(self, key: str) -> np.ndarray:
        """(N,) level index of each cell in covariate ``key`` (decoded from the one-hot block)."""
        if key not in self.covariate_levels:
            raise ValueError(
                f"{key!r} is not a covariate of this data; covariates: {list(self.covariate_levels)}"
            )
        start = 0
        for k, levels in self.covariate_levels.items():
            if k == key:
                block = np.asarray(self.extras["covariates"])[:, start : start + len(levels)]
                return block.argmax(1)
            start += len(levels)
        raise AssertionError(key)

    def covariate_values(self, key: str) -> np.ndarray:
        """(N,) level name of each cell in covariate ``key``."""
        levels = np.asarray(self.covariate_levels[key] if key in self.covariate_levels else [], dtype=object)
        return levels[self.covariate_codes(key)].astype(str)
