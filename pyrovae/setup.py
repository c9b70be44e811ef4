"""The one front door for data: source + model + data options -> validated, prepared data.

``pyrovae train`` (and every command that reads data for a run), :class:`pyrovae.Model` and the experiment
scripts call :func:`read_data`; nothing else lists the data options
(:class:`~pyrovae.data.options.DataOptions`) or decides whether a model needs raw counts
(:func:`needs_counts`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.options import DataOptions
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.data.prepare import prepare_data
from pyrovae.models.zoo import DATA_DEFAULTS, ModelConfig, data_requirements
from pyrovae.nn.likelihoods import COUNT_LIKELIHOODS

__all__ = [
    "SETUP_KEY",
    "SETUP_OPTIONS",
    "check_setup",
    "needs_counts",
    "read_data",
    "record_setup",
    "recorded_setup",
    "resolve_options",
]

#: ``adata.uns`` key where :meth:`pyrovae.Model.setup_anndata` records how to read the AnnData
SETUP_KEY = "_pyrovae_setup"
#: the keywords of :meth:`pyrovae.Model.setup_anndata`: the fields of
#: :class:`~pyrovae.data.options.DataOptions`
SETUP_OPTIONS = tuple(f.name for f in dataclasses.fields(DataOptions))


def needs_counts(model_cfg: ModelConfig) -> bool:
    """Whether the model's likelihood needs raw integer counts (negative binomial, Poisson)."""
    return model_cfg.likelihood in COUNT_LIKELIHOODS


def resolve_options(
    options: DataOptions | Mapping[str, Any] | None, model_name: str | None = None
) -> DataOptions:
    """The typed options, with the named model's data defaults where the user left them unset."""
    return DataOptions.from_dict(options).with_defaults(DATA_DEFAULTS.get(model_name or "", {}))


def read_data(
    source: str | Path | ad.AnnData,
    options: DataOptions | Mapping[str, Any] | None,
    model_cfg: ModelConfig | None,
    *,
    model_name: str | None = None,
    schema: dict[str, Any] | None = None,
    stored_split: pd.Series | None = None,
    backed: bool = False,
    prepare: bool = True,
) -> tuple[PerturbationData, DataOptions]:
    """Read ``source`` (an ``.h5ad`` path or an AnnData) for a model and prepare what the model needs.

    Args:
        options: the data options (a mapping is checked: unknown keys are an error).
        model_cfg: the model's configuration (its likelihood decides whether raw counts are required; its
            data requirements, e.g. GPO-VAE's OT-paired differences, are prepared). ``None``: data for
            several models (no count check, no preparation; training checks and prepares per model).
        model_name: the zoo name, for its data defaults (:data:`~pyrovae.models.zoo.DATA_DEFAULTS`).
        schema, stored_split: a trained run's schema and split by cell name (evaluation, resume).
        backed: keep the counts on disk.
        prepare: run the model's data preparation (``False``: read and validate only).

    Returns:
        (the data, the resolved options as recorded in a run's ``config.json``).
    """
    opts = resolve_options(options, model_name)
    kwargs = opts.load_kwargs()
    if stored_split is not None:
        for k in ("split_key", "split_mode", "split_seed", "heldout"):
            kwargs.pop(k)
    elif schema is not None and kwargs["split_key"] is not None:
        kwargs.pop("heldout")  # a split column fixes the split; the run's recorded hold-out only made one
    data = load_perturbation_data(
        source,
        require_counts=model_cfg is not None and needs_counts(model_cfg),
        schema=schema,
        stored_split=stored_split,
        backed=backed,
        **kwargs,
    )
    if prepare and model_cfg is not None:
        data = prepare_data(data, data_requirements(model_cfg), opts.prep_options())
    return data, opts


def check_setup(adata: ad.AnnData, options: DataOptions) -> None:
    """Fail early, with the fix, on keys the AnnData lacks (the full checks run when the data is read)."""
    columns = {
        "perturbation_key": options.perturbation_key,
        "split_key": options.split_key,
        "qc_key": options.qc_key,
        "batch_key": options.batch_key,
        "size_factor_key": options.size_factor_key,
        **{f"covariate_keys[{i}]": k for i, k in enumerate(options.covariate_keys)},
    }
    for key, col in columns.items():
        if col is not None and col not in adata.obs.columns:
            raise ValueError(
                f"{key}={col!r}: obs has no such column; obs columns are {list(adata.obs.columns)}"
            )
    if options.heldout is not None and options.split_mode != "combinations":
        raise ValueError(
            f"heldout={options.heldout!r} only applies to split_mode='combinations'; pass it too, or drop "
            "heldout"
        )
    layer = options.layer
    if layer is not None and layer not in adata.layers:
        names = [k for k in adata.layers.keys() if k is not None]  # anndata 0.13 lists X as layer None
        raise ValueError(
            f"layer={layer!r}: the AnnData has no such layer; its layers are {names} (layer=None reads X)"
        )


def record_setup(adata: ad.AnnData, options: DataOptions) -> None:
    """Check ``options`` against ``adata`` (:func:`check_setup`) and record them in ``adata.uns``
    (:data:`SETUP_KEY`): only what differs from the defaults, as h5ad cannot store ``None``."""
    check_setup(adata, options)
    default = DataOptions().to_dict()
    keep = {"perturbation_key"}  # always named: which column holds the labels
    adata.uns[SETUP_KEY] = {
        k: v for k, v in options.to_dict().items() if v is not None and (k in keep or v != default[k])
    }


def recorded_setup(adata: ad.AnnData, model_name: str | None = None) -> DataOptions:
    """The AnnData's recorded setup (lists read back from h5ad as arrays included), with the named model's
    data defaults where unset."""
    setup = {
        k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in adata.uns.get(SETUP_KEY, {}).items()
    }
    return resolve_options(setup, model_name)
