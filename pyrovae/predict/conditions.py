"""What a posterior-predictive sample is conditioned on beyond its perturbation: the library size (count
likelihoods) and the covariates (batch and others, one-hot), for
:class:`~pyrovae.predict.posterior.Posterior`.

A fixed depth (``library_size`` a number, default :data:`~pyrovae.nn.likelihoods.DEFAULT_LIBRARY_SIZE`) or
``"matched"`` (:data:`MATCHED`): each sample takes the depth and covariates of an evaluated cell of its own
label, so the model is compared with data at the data's depth. Covariates not fixed by the caller are drawn
from the training cells' level combinations in proportion. Shapes: n samples, A labels, C one-hot columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.nn.likelihoods import DEFAULT_LIBRARY_SIZE

__all__ = ["MATCHED", "Conditions", "fixed_library"]

#: ``library_size`` of :meth:`~pyrovae.predict.posterior.Posterior.model_ate` that draws each sample's depth
#: (and covariates) from the evaluated cells of the same label: the default wherever the model is compared
#: with data
MATCHED = "matched"


def fixed_library(library_size: float | None) -> float:
    """A fixed library size: ``None`` is the default depth; anything but a finite number > 0 is refused."""
    if library_size is None:
        return DEFAULT_LIBRARY_SIZE
    value = float(library_size)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"library size must be a finite number > 0, got {library_size}")
    return value


class Conditions:
    """The library sizes and covariates of a run's posterior-predictive samples.

    Args:
        schema: the run's data schema (``covariates``: {key: levels}, batch first; ``covariate_combos``:
            the training cells' level combinations and their counts).
        n_covariates: C, the model's one-hot covariate width (0: none).
        needs_library: the likelihood is a count likelihood (library sizes are drawn).
        device: where the returned tensors live.
    """

    def __init__(
        self, schema: dict[str, Any], n_covariates: int, needs_library: bool, device: torch.device
    ) -> None:
        self.schema, self.n_covariates = schema, int(n_covariates)
        self.needs_library, self.device = bool(needs_library), device
        #: {covariate key: levels} of the run (batch first); empty without covariates
        self.levels: dict[str, list[str]] = {
            str(k): [str(v) for v in lev] for k, lev in (schema.get("covariates") or {}).items()
        }

    def row(self, levels: Sequence[str]) -> np.ndarray:
        """(C,) one-hot of one level per covariate key (in the schema's key order)."""
        out = []
        for key, lev in self.levels.items():
            row = np.zeros(len(lev), dtype=np.float32)
            row[list(lev).index(levels[list(self.levels).index(key)])] = 1.0
            out.append(row)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def check(self, covariates: dict[str, str] | None) -> dict[str, str]:
        """A level choice ``{key: level}`` checked against the run's covariates (one clear error)."""
        covariates = dict(covariates or {})
        for key, level in covariates.items():
            if key not in self.levels:
                raise ValueError(
                    f"{key!r} is not a covariate of this model; its covariates: {list(self.levels) or 'none'}"
                )
            if str(level) not in self.levels[key]:
                raise ValueError(
                    f"{key}={level!r} is not a level the model was trained on; levels: {self.levels[key]}"
                )
        return {k: str(v) for k, v in covariates.items()}

    def training_combos(self, covariates: dict[str, str]) -> tuple[list[list[str]], np.ndarray]:
        """The training cells' level combinations agreeing with the choice ``covariates``, and their
        probabilities (a chosen level with no training cell in any combination: that level with the other
        keys' training proportions)."""
        stored = self.schema.get("covariate_combos") or {"levels": [], "counts": []}
        keys = list(self.levels)
        rows, counts = [list(r) for r in stored["levels"]], np.asarray(stored["counts"], dtype=np.float64)
        keep = [all(r[keys.index(k)] == v for k, v in covariates.items()) for r in rows]
        if any(keep):
            rows = [r for r, k in zip(rows, keep) if k]
            counts = counts[np.asarray(keep)]
        else:  # force the chosen levels on every training combination
            rows = [[covariates.get(k, r[j]) for j, k in enumerate(keys)] for r in rows]
        return rows, counts / counts.sum()

    def draw(
        self,
        labels: list[str],
        n: int,
        library_size: str | float | None,
        data: PerturbationData | None,
        rows: np.ndarray | None,
        covariates: dict[str, str] | None,
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        """(n, A) library sizes, (n, A, C) covariates (``None`` where the model has none) and a line saying
        how they were chosen.

        ``library_size="matched"`` (alias ``"data"``): sample s of label a takes the library size (and the
        covariates) of a cell of label a among ``rows`` of ``data`` (the control cells there for a label
        without cells), the cell at the same quantile u_s of each label's library sizes, so labels share
        their random numbers (u_s) and each sees its own cells' depth distribution. A number: every sample
        at that depth, the covariates drawn from the training cells' level combinations in proportion.
        ``covariates`` ({key: level}) fixes levels in both cases.
        """
        covariates = self.check(covariates)
        n_cov = self.n_covariates
        lib = cov = None
        if isinstance(library_size, str):
            if library_size not in (MATCHED, "data"):
                raise ValueError(
                    f"library_size must be a number, None or 'matched' (depth of the evaluated cells), got "
                    f"{library_size!r}"
                )
            if data is None:
                raise ValueError(
                    "library_size='matched' needs the data (data=...) to draw library sizes from"
                )
            rows = data.indices(None) if rows is None else np.asarray(rows)
            at_level = np.ones(len(rows), dtype=bool)
            for key, level in covariates.items():
                at_level &= data.covariate_values(key)[rows] == level
            if covariates and at_level.any():
                rows = rows[at_level]
            labs = data.labels[rows]
            ctrl = rows[labs == data.control_label]
            if len(ctrl) == 0:
                ctrl = np.flatnonzero((data.labels == data.control_label) & (data.split != ""))
            if len(ctrl) == 0:
                raise ValueError("library_size='matched' needs control cells in the data")
            u = rng.random(n)
            picks = []
            for lab in labels:
                pool = rows[labs == lab] if lab != data.control_label else ctrl
                if len(pool) == 0:
                    pool = ctrl
                pool = pool[np.argsort(data.library_size[pool], kind="stable")]
                picks.append(pool[np.minimum((u * len(pool)).astype(np.int64), len(pool) - 1)])
            cells = np.stack(picks, axis=1)  # (n, A) row positions
            if self.needs_library:
                lib = data.library_size[cells]
            if n_cov:
                cov = np.asarray(data.extras["covariates"])[cells]
                if covariates:  # the chosen levels, whatever cells the pool held
                    forced = self.row([covariates.get(k, "") or self.levels[k][0] for k in self.levels])
                    mask = self.key_mask(covariates)
                    cov = np.where(mask, forced, cov)
            how = "library sizes and covariates of the evaluated cells of each label (depth-matched)"
        else:
            if self.needs_library:
                lib = np.full((n, len(labels)), fixed_library(library_size))
            if n_cov:
                rows_ = self.training_rows(n, rng, covariates)
                cov = np.broadcast_to(rows_[:, None, :], (n, len(labels), n_cov))
            how = f"library size {fixed_library(library_size):g}"
            if n_cov:
                how += ", covariates drawn from the training cells' levels in proportion"
        if covariates:
            how += ", at " + ", ".join(f"{k}={v}" for k, v in covariates.items())

        def tensor(a):
            return (
                None
                if a is None
                else torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=self.device)
            )

        return tensor(lib), tensor(cov), how

    def training_rows(
        self, n: int, rng: np.random.Generator, covariates: dict[str, str] | None = None
    ) -> np.ndarray:
        """(n, C) one-hot covariate rows drawn from the training cells' level combinations in proportion
        (``covariates`` {key: level} fixes levels); (n, 0) for a model without covariates."""
        if not self.n_covariates:
            return np.zeros((n, 0), dtype=np.float32)
        combos, p = self.training_combos(self.check(covariates))
        picks = rng.choice(len(combos), size=n, p=p)
        return np.stack([self.row(c) for c in combos])[picks]

    def key_mask(self, covariates: dict[str, str]) -> np.ndarray:
        """(C,) bool: the one-hot columns of the chosen keys."""
        return np.concatenate([np.full(len(lev), k in covariates) for k, lev in self.levels.items()])
