"""The data options of a run: one typed object, one place that lists their keys.

:class:`DataOptions` holds every choice about how an AnnData is read (labels, control, layer, split,
combinations, batch, covariates, size factor) and prepared for a model (held-out perturbations, QC column,
GPO-VAE's extra genes and OT pairing). The CLI (:func:`pyrovae.commands.common.data_options`),
:class:`pyrovae.Model` (``setup_anndata``), the run directory (``config.json["data"]``) and the experiment
scripts all build one and hand it to :func:`pyrovae.setup.read_data`, the one function that reads and
prepares data. Per-model defaults (SVAE+ needs one treatment per combination) are declared by the zoo
(:data:`pyrovae.models.zoo.DATA_DEFAULTS`) and applied by :meth:`DataOptions.with_defaults` where the user
left the option unset.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

__all__ = ["DataOptions", "LOAD_KEYS", "PREP_KEYS"]

SplitMode = Literal["cells", "combinations"]
PairingMethod = Literal["auto", "emd", "sinkhorn"]

#: keys read by :func:`pyrovae.data.anndata.load_perturbation_data`
LOAD_KEYS = (
    "perturbation_key",
    "control_label",
    "layer",
    "split_key",
    "combo_sep",
    "encode_combos_as_unique",
    "split_mode",
    "split_seed",
    "heldout",
    "batch_key",
    "covariate_keys",
    "size_factor_key",
)
#: keys read by :func:`pyrovae.data.prepare.prepare_data` (besides ``split_seed``)
PREP_KEYS = ("holdout_perturbations", "qc_key", "extra_genes", "pairing_method", "pairing_reg")


def _names(value: Any, what: str) -> tuple[str, ...] | None:
    """A tuple of names from None, a comma-separated string or a sequence (an h5ad-read array included)."""
    if value is None:
        return None
    if isinstance(value, str):
        out = tuple(v.strip() for v in value.split(",") if v.strip())
    elif isinstance(value, Sequence | np.ndarray):
        out = tuple(str(v) for v in list(value))
    else:
        raise ValueError(f"{what} must be a list of names, got {value!r}")
    return out


def _heldout(value: Any) -> tuple[str, ...] | float | None:
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise ValueError(f"heldout must be a fraction in (0, 1] or a list of labels, got {value!r}")
        return None
    if isinstance(value, numbers.Real):
        frac = float(value)
        if not (math.isfinite(frac) and 0.0 < frac <= 1.0):
            raise ValueError(
                f"heldout={value!r}: a fraction of the combinations must be in (0, 1] (e.g. 0.25), or pass a "
                "list of combination labels"
            )
        return frac
    if isinstance(value, str):
        try:
            return _heldout(float(value))
        except ValueError as err:
            if "fraction" in str(err):
                raise
    return _names(value, "heldout")


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """How to read an AnnData and prepare it for a model (a run's ``config.json["data"]``).

    The first group of options is read by :func:`~pyrovae.data.anndata.load_perturbation_data`, the last
    five (from ``holdout_perturbations``) by the model-specific preparation
    (:func:`~pyrovae.data.prepare.prepare_data`).

    Attributes:
        perturbation_key: obs column of labels (``control``, ``A``, ``A+B``).
        control_label: label of unperturbed cells (``None``: ``control`` / ``ctrl`` / ``non-targeting``).
        layer: layer of raw counts (``None``: ``X``).
        split_key: obs column of ``train`` / ``val`` / ``test`` (``None``: a seeded split).
        combo_sep: separator of combinations in labels.
        encode_combos_as_unique: one treatment per distinct combination (SVAE+; ``None``: the model's
            default, :data:`pyrovae.models.zoo.DATA_DEFAULTS`, else ``False``).
        split_mode: the seeded split: ``"cells"`` (by cell, stratified) or ``"combinations"``.
        split_seed: the seed of the split (and of the model-specific preparation).
        heldout: with ``split_mode="combinations"``: labels, or the fraction of combinations, held out.
        batch_key: obs column of the batch (replicate, lane, donor); a categorical covariate that comes
            first.
        covariate_keys: further categorical obs columns (cell line, ...). Batch and covariates enter the
            basal encoder and the decoder one-hot (scVI's design); their levels are stored in the run.
        size_factor_key: obs column of a per-cell library size (e.g. the whole-transcriptome total when
            only highly variable genes are modelled) used by the likelihood, the ATE transform and
            sampling instead of the sum over the modelled genes.
        holdout_perturbations: single perturbations whose cells all go to ``test`` (unseen perturbations).
        qc_key: CRADLE-VAE / GPO-VAE: obs column of QC failures (``None``: MAD flags).
        extra_genes: GPO-VAE: extended GRN genes.
        pairing_method: GPO-VAE: OT pairing of perturbed cells with controls (``auto``, ``emd``,
            ``sinkhorn``).
        pairing_reg: GPO-VAE: the Sinkhorn regulariser.
    """

    perturbation_key: str = "perturbation"
    control_label: str | None = None
    layer: str | None = None
    split_key: str | None = None
    combo_sep: str = "+"
    encode_combos_as_unique: bool | None = None
    split_mode: SplitMode = "cells"
    split_seed: int = 0
    heldout: tuple[str, ...] | float | None = None
    batch_key: str | None = None
    covariate_keys: tuple[str, ...] = ()
    size_factor_key: str | None = None
    holdout_perturbations: tuple[str, ...] | None = None
    qc_key: str | None = None
    extra_genes: tuple[str, ...] | None = None
    pairing_method: PairingMethod = "auto"
    pairing_reg: float = 0.05

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise the given values once, here
        for key in (
            "perturbation_key",
            "control_label",
            "layer",
            "split_key",
            "batch_key",
            "size_factor_key",
            "qc_key",
        ):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"{key} must be a non-empty obs column name / label, got {v!r}")
        if not isinstance(self.combo_sep, str) or self.combo_sep == "":
            raise ValueError(
                f"combo_sep must be a non-empty separator such as '+', got {self.combo_sep!r} "
                "(CLI: --combo-sep +)"
            )
        if self.split_mode not in ("cells", "combinations"):
            raise ValueError(f"split_mode must be 'cells' or 'combinations', got {self.split_mode!r}")
        if self.pairing_method not in ("auto", "emd", "sinkhorn"):
            raise ValueError(
                f"pairing_method must be 'auto', 'emd' or 'sinkhorn', got {self.pairing_method!r}"
            )
        reg = float(self.pairing_reg)
        if not (math.isfinite(reg) and reg > 0):
            raise ValueError(f"pairing_reg must be a finite number > 0, got {self.pairing_reg!r}")
        put(self, "pairing_reg", reg)
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, numbers.Integral):
            raise ValueError(f"split_seed must be an integer, got {self.split_seed!r}")
        if not 0 <= int(self.split_seed) < 2**32:
            raise ValueError(f"split_seed must be in [0, 2**32), got {self.split_seed!r}")
        put(self, "split_seed", int(self.split_seed))
        put(self, "heldout", _heldout(self.heldout))
        covs = _names(self.covariate_keys, "covariate_keys") or ()
        if len(set(covs)) != len(covs) or (self.batch_key is not None and self.batch_key in covs):
            raise ValueError(
                f"covariate keys must be distinct and differ from batch_key: batch_key={self.batch_key!r}, "
                f"covariate_keys={list(covs)}"
            )
        put(self, "covariate_keys", covs)
        put(self, "holdout_perturbations", _names(self.holdout_perturbations, "holdout_perturbations"))
        put(self, "extra_genes", _names(self.extra_genes, "extra_genes"))
        if self.encode_combos_as_unique is not None:
            put(self, "encode_combos_as_unique", bool(self.encode_combos_as_unique))

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | DataOptions | None) -> DataOptions:
        """From a mapping (``config.json["data"]``, ``adata.uns`` setup, keyword arguments); unknown keys
        are an error naming the valid ones."""
        if isinstance(options, DataOptions):
            return options
        given = dict(options or {})
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - valid)
        if unknown:
            raise ValueError(f"unknown data option(s) {unknown}; valid: {sorted(valid)}")
        return cls(**given)

    def replace(self, **changes: Any) -> DataOptions:
        """A copy with some options changed (checked as a new one)."""
        return self.from_dict({**self.to_dict(), **changes})

    def with_defaults(self, defaults: Mapping[str, Any]) -> DataOptions:
        """These options with a model's data defaults (:data:`pyrovae.models.zoo.DATA_DEFAULTS`) filled in
        where unset (``None``); ``encode_combos_as_unique`` still unset becomes ``False``."""
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        out = self.replace(**fill) if fill else self
        if out.encode_combos_as_unique is None:
            out = out.replace(encode_combos_as_unique=False)
        return out

    # ------------------------------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every option (tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~pyrovae.data.anndata.load_perturbation_data`."""
        out = {k: getattr(self, k) for k in LOAD_KEYS}
        out["encode_combos_as_unique"] = bool(out["encode_combos_as_unique"])
        out["covariate_keys"] = self.covariate_keys
        if isinstance(out["heldout"], tuple):
            out["heldout"] = list(out["heldout"])
        return out

    def prep_options(self) -> dict[str, Any]:
        """The options :func:`~pyrovae.data.prepare.prepare_data` reads."""
        out = {k: getattr(self, k) for k in PREP_KEYS}
        out["split_seed"] = self.split_seed
        return out

    @property
    def categorical_keys(self) -> tuple[str, ...]:
        """Batch first, then the covariates: the obs columns that enter the model one-hot."""
        return ((self.batch_key,) if self.batch_key else ()) + self.covariate_keys
