"""AnnData in, validated arrays out: the one door through which data enters pyrovae.

:func:`load_perturbation_data` reads an ``.h5ad`` path or an in-memory :class:`anndata.AnnData`, checks it
(with messages that name the problem and the fix) and returns a :class:`PerturbationData`: raw counts
(dense or CSR, never densified as a whole), the dosage matrix D, treatment names, the split of every cell,
library sizes and the training-split normalisation statistics. Inside the package these are trusted.
"""

from __future__ import annotations

import importlib.metadata
import re
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovae.config import PyrovaeWarning, preview
from pyrovae.data.covariates import covariate_levels, covariate_onehot, size_factors
from pyrovae.data.dosage import build_dosage, find_control_label
from pyrovae.data.matrix import dense_rows, nonzero_counts
from pyrovae.data.perturbation_data import SPLITS, UNUSED_SPLIT, PerturbationData, untrained_treatments
from pyrovae.data.protocols import make_split

#: fewer training cells than this get a warning (estimates from a handful of cells are noise)
FEW_CELLS = 50


_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def read_anndata(data: str | Path | ad.AnnData, backed: bool = False) -> ad.AnnData:
    """An AnnData from a path (checked: exists, .h5ad, readable) or as given."""
    if isinstance(data, ad.AnnData):
        return data
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}; pass the path of an .h5ad file")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the path of an .h5ad file")
    if path.suffix != ".h5ad":
        raise ValueError(f"{path} is not an .h5ad file; convert it with anndata (adata.write_h5ad)")
    try:
        path.open("rb").close()  # HDF5 would report a file we may not read as a corrupt one
    except PermissionError:
        raise PermissionError(
            f"cannot read {path}: permission denied; make it readable (chmod u+r) or copy it somewhere "
            "you can read"
        ) from None
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:160]
        raise ValueError(
            f"cannot read {path}: it is truncated, corrupt or not an AnnData .h5ad ({first}); "
            "write it again with adata.write_h5ad"
        ) from None
    except Exception as err:
        # anndata's IORegistryError (not public): an element encoded by a newer anndata than this one
        if type(err).__name__ != "IORegistryError":
            raise
        spec = re.search(r"IOSpec\([^)]*\)", str(err))
        raise ValueError(
            f"cannot read {path}: it holds an element this anndata "
            f"({importlib.metadata.version('anndata')}) cannot decode "
            f"({spec.group(0) if spec else 'an unknown encoding'}), probably written by a newer anndata; "
            "upgrade anndata (pip install -U anndata), or write the file again with this version"
        ) from None


def _get_matrix(adata: ad.AnnData, layer: str | None):
    if layer is None:
        if adata.X is None:
            raise ValueError("the AnnData has no X; name the layer holding raw counts with layer=...")
        return adata.X
    if layer not in adata.layers:
        names = [k for k in adata.layers.keys() if k is not None]  # anndata 0.13 lists X as layer None
        raise ValueError(
            f"the AnnData has no layer {layer!r}; its layers are {names}. "
            "Pass layer=None to use X, or the name of the layer holding raw counts"
        )
    return adata.layers[layer]


def _as_matrix(m, backed: bool):
    if sp.issparse(m):
        return sp.csr_matrix(m, dtype=np.float32)
    if backed:  # h5py dataset / anndata backed sparse dataset: read by row blocks only
        return m
    if hasattr(m, "to_memory"):
        return sp.csr_matrix(m.to_memory(), dtype=np.float32)
    return np.asarray(m, dtype=np.float32)


def _row_chunks(m, chunk: int):
    for i in range(0, m.shape[0], chunk):
        yield i, dense_rows(m, np.arange(i, min(i + chunk, m.shape[0])))


def _check_values(m, require_counts: bool, where: str, chunk: int = 8192) -> bool:
    """Check for NaN/inf always; for negative or non-integer values when counts are required.

    Returns whether the matrix holds non-negative integers (count data).
    """
    is_counts = True
    if sp.issparse(m):
        blocks = [m.data]
    else:
        blocks = (b for _, b in _row_chunks(m, chunk))
    for b in blocks:
        b = np.asarray(b)
        if not np.isfinite(b).all():
            raise ValueError(
                f"{where} contains NaN or infinite values; remove or impute those cells before training"
            )
        if is_counts and ((b < 0).any() or (b != np.round(b)).any()):
            is_counts = False
            if require_counts:
                bad = "negative" if (b < 0).any() else "non-integer"
                raise ValueError(
                    f"{where} has {bad} values, but a count likelihood (negative binomial / Poisson) needs "
                    "raw integer UMI counts. It looks normalised or log-transformed: pass the layer "
                    "holding raw counts (layer='counts' / --layer counts), or use likelihood='normal' "
                    "(CLI: --set likelihood=normal)"
                )
    return is_counts


def log_norm_stats(
    counts, idx: np.ndarray, chunk: int = 4096, log: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(G,) mean and unbiased std of log1p(counts) (of counts itself if not ``log``) over rows ``idx``;
    zero std replaced by 1."""
    g = counts.shape[1]
    mean = np.zeros(g, dtype=np.float64)
    m2 = np.zeros(g, dtype=np.float64)  # sum of squared deviations, merged per chunk (Chan et al.)
    n = 0
    for i in range(0, len(idx), chunk):
        lb = dense_rows(counts, idx[i : i + chunk]).astype(np.float64)
        lb = np.log1p(lb) if log else lb
        nb = lb.shape[0]
        mb = lb.mean(0)
        delta = mb - mean
        m2 += ((lb - mb) ** 2).sum(0) + delta**2 * (n * nb / (n + nb))
        mean += delta * (nb / (n + nb))
        n += nb
    var = m2 / max(n - 1, 1)
    std = np.sqrt(np.clip(var, 0.0, None))
    std[std < 1e-8] = 1.0  # constant genes: standardise to 0 instead of dividing by 0
    return mean.astype(np.float32), std.astype(np.float32)


def _normalise_split_column(values: pd.Series) -> np.ndarray:
    out = np.full(len(values), UNUSED_SPLIT, dtype=object)
    bad: set[str] = set()
    for i, v in enumerate(values.to_numpy()):
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
            continue
        key = _SPLIT_ALIASES.get(str(v).strip().lower())
        if key is None:
            bad.add(str(v))
        else:
            out[i] = key
    if bad:
        raise ValueError(
            f"unknown split value(s) {sorted(bad)}; the split column must hold 'train', 'val' or 'test' "
            "(empty / NaN for cells used by no split)"
        )
    return out.astype(str)


def unique_cell_names(obs_names: pd.Index) -> pd.Index:
    """The cells' names as strings; an error if they are not unique (a run's split is stored by name)."""
    names = pd.Index(obs_names.astype(str))
    dup = names[names.duplicated()].unique().tolist()
    if dup:
        raise ValueError(
            f"duplicated cell names {preview(dup, 5)} ({len(dup)} names): a run stores its split by cell "
            "name, so names must be unique; call adata.obs_names_make_unique() (as before training)"
        )
    return names


def _split_by_name(obs_names: pd.Index, stored: pd.Series) -> np.ndarray:
    """(N,) split of the cells named ``obs_names`` according to a stored split (name -> split)."""
    names = unique_cell_names(obs_names)
    split = stored.reindex(names)
    unseen = int(split.isna().sum())
    if unseen:
        warnings.warn(
            f"{unseen} of the data's {len(names)} cells are not in the run's split (the run never saw them); "
            "they are left out of every split",
            PyrovaeWarning,
            stacklevel=3,
        )
    present = set(names)
    for sp_name in SPLITS:
        want = stored.index[stored.to_numpy() == sp_name]
        lacking = [c for c in want if c not in present]
        if lacking:
            warnings.warn(
                f"the data lacks {len(lacking)} of the run's {len(want)} {sp_name} cells "
                f"(e.g. {lacking[:3]}); {sp_name} scores use the {len(want) - len(lacking)} present",
                PyrovaeWarning,
                stacklevel=3,
            )
    return split.fillna(UNUSED_SPLIT).to_numpy(dtype=str)


#: labels that are a missing value turned into text (``astype(str)`` of NaN / None / pd.NA)
MISSING_TEXT = ("nan", "none", "<na>", "null", "n/a")


def _warn_label_spellings(treatments: Sequence[str], raw_labels: np.ndarray) -> None:
    """Warnings for treatment names that are probably not what the user means: two spellings of one name
    (``PG01`` / ``pg01``; a name in Unicode NFC and NFD forms) and missing values turned into text."""
    groups: dict[str, list[str]] = {}
    for t in treatments:
        groups.setdefault(unicodedata.normalize("NFKC", str(t)).casefold(), []).append(str(t))
    near = [names for names in groups.values() if len(names) > 1]
    if near:
        shown = "; ".join(" / ".join(ascii(n) for n in names) for names in near[:5])
        warnings.warn(
            f"{len(near)} perturbation name(s) differ only in case or Unicode form ({shown}"
            f"{'; ...' if len(near) > 5 else ''}): they are trained as different perturbations; if they are "
            "one, write them the same way (e.g. unicodedata.normalize('NFC', ...) and one case)",
            PyrovaeWarning,
            stacklevel=4,
        )
    missing = [t for t in treatments if str(t).strip().lower() in MISSING_TEXT]
    if missing:
        n = int(
            np.isin(np.char.lower(np.asarray(raw_labels).astype(str)), [m.lower() for m in missing]).sum()
        )
        warnings.warn(
            f"{n} cells are labelled {', '.join(repr(m) for m in missing)}: a missing value turned into text "
            "(e.g. by astype(str))? they are trained as a perturbation of that name; give those cells their "
            "real label (or drop them)",
            PyrovaeWarning,
            stacklevel=4,
        )


def _warn_risky(
    labels: np.ndarray,
    split: np.ndarray,
    dosage: sp.csr_matrix,
    treatments: Sequence[str],
    control_label: str,
    raw_labels: np.ndarray,
    sep: str,
) -> None:
    """Warnings for data that trains, but not as the user probably means."""
    train = split == "train"
    n_train = int(train.sum())
    if 0 < n_train < FEW_CELLS:
        warnings.warn(
            f"only {n_train} training cells: estimates from so few cells are mostly noise",
            PyrovaeWarning,
            stacklevel=3,
        )
    untrained = [t for t, u in zip(treatments, untrained_treatments(nonzero_counts(dosage[train], 0))) if u]
    if untrained:
        warnings.warn(
            f"{len(untrained)} perturbation(s) have no training cell ({', '.join(untrained[:8])}"
            f"{', ...' if len(untrained) > 8 else ''}): the model cannot learn them and predicts them from "
            "its prior (GPO-VAE: through its GRN); the output of ate/sample says so",
            PyrovaeWarning,
            stacklevel=3,
        )
    _warn_label_spellings(treatments, raw_labels)
    if sep != "+" and any("+" in lab for lab in np.unique(raw_labels.astype(str))):
        warnings.warn(
            f"labels contain '+' but the combination separator is {sep!r}: labels like 'A+B' are read as "
            "single perturbations; pass combo_sep='+' (--combo-sep +) if they are combinations",
            PyrovaeWarning,
            stacklevel=3,
        )


def load_perturbation_data(
    data: str | Path | ad.AnnData,
    perturbation_key: str = "perturbation",
    control_label: str | None = None,
    layer: str | None = None,
    split_key: str | None = None,
    combo_sep: str = "+",
    encode_combos_as_unique: bool = False,
    split_mode: str = "cells",
    split_seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    heldout: Sequence[str] | float | None = None,
    require_counts: bool = True,
    schema: dict[str, Any] | None = None,
    backed: bool = False,
    stored_split: pd.Series | None = None,
    batch_key: str | None = None,
    covariate_keys: Sequence[str] = (),
    size_factor_key: str | None = None,
) -> PerturbationData:
    """Read and validate perturbation data.

    Args:
        data: an ``.h5ad`` path or an AnnData.
        perturbation_key: obs column with the perturbation label of each cell.
        control_label: label of unperturbed cells (default: the first common one found).
        layer: layer holding raw counts (default ``X``).
        split_key: obs column with ``train``/``val``/``test`` (empty for unused cells); if absent a seeded
            split is made (see :func:`make_split` for ``split_mode``, ``heldout``, fractions).
        combo_sep: separator of combinations in labels.
        encode_combos_as_unique: one treatment per distinct combination (SVAE+).
        require_counts: check that the matrix holds non-negative integers (count likelihoods).
        schema: a trained model's :meth:`PerturbationData.schema`: genes must match it and treatments,
            label reading and normalisation statistics are taken from it.
        backed: open the ``.h5ad`` in backed mode and load only the count matrix (not other layers).
        stored_split: a run's split by cell name (obs_name -> split). Cells are matched by name, whatever
            their order; cells it does not name get no split (a warning says how many), and a warning names
            the split's cells that the data lacks. Replaces ``split_key`` / the seeded split.
        batch_key, covariate_keys: categorical obs columns (batch first) encoded one-hot into
            ``extras["covariates"]`` (N, C); their levels are those of the cells with a split (with
            ``schema``: the run's stored levels, and a level it lacks is an error).
        size_factor_key: obs column of per-cell library sizes used instead of the sum over the genes.
    """
    if split_key is not None and heldout is not None:
        raise ValueError(
            f"heldout={heldout!r} cannot be used with the split column {split_key!r}: the column already "
            "fixes the split. Drop heldout, or omit split_key to let pyrovae make the split"
        )
    adata = read_anndata(data, backed)
    backed = backed or bool(adata.isbacked)  # an AnnData opened backed stays on disk
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"the data has {adata.n_obs} cells x {adata.n_vars} genes; it needs cells and genes to model"
        )
    if perturbation_key not in adata.obs.columns:
        raise ValueError(
            f"obs has no column {perturbation_key!r} with perturbation labels; obs columns are "
            f"{list(adata.obs.columns)}. Pass perturbation_key=... (CLI: --perturbation-key)"
        )
    genes = [str(g) for g in adata.var_names]
    dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if dup:
        raise ValueError(
            f"duplicated gene names {preview(dup, 5)}: gene names must be unique; "
            "call adata.var_names_make_unique() before loading"
        )
    if schema is not None:
        want = list(schema["genes"])
        if genes != want:
            missing = [g for g in want if g not in set(genes)]
            extra = [g for g in genes if g not in set(want)]
            if not missing and not extra:
                raise ValueError(
                    "the data has the model's genes in a different order; reorder with "
                    "adata = adata[:, model_genes]"
                )
            raise ValueError(
                f"gene mismatch between the model ({len(want)} genes) and the data ({len(genes)} genes): "
                f"{len(missing)} model genes missing from the data (e.g. {missing[:5]}), {len(extra)} data "
                f"genes unknown to the model (e.g. {extra[:5]}). Subset the data to the model's genes: "
                "adata = adata[:, model_genes]"
            )
        control_label = schema["control_label"]
        combo_sep = schema["sep"]
        encode_combos_as_unique = schema["encode_combos_as_unique"]
        stored_covs = dict(schema.get("covariates") or {})
        keys = ([batch_key] if batch_key else []) + list(covariate_keys or ())
        if keys and keys != list(stored_covs):
            raise ValueError(
                f"the covariates {keys} differ from the model's {list(stored_covs)}; a model reads the "
                "batch and covariates it was trained with"
            )
        batch_key, covariate_keys = None, list(stored_covs)
        if schema.get("size_factor_key", None) != size_factor_key and size_factor_key is not None:
            raise ValueError(
                f"size_factor_key={size_factor_key!r} differs from the model's "
                f"{schema.get('size_factor_key')!r}; a model reads the size factors it was trained with"
            )
        size_factor_key = schema.get("size_factor_key")

    raw_labels = adata.obs[perturbation_key]
    if raw_labels.isna().any():
        raise ValueError(
            f"{int(raw_labels.isna().sum())} cells have a missing (NaN) label in obs[{perturbation_key!r}]; "
            "label them (the control label for unperturbed cells) or drop them"
        )
    labels_raw = raw_labels.astype(str).to_numpy()
    control_label = find_control_label(labels_raw, control_label)
    dosage, treatments, labels = build_dosage(
        labels_raw,
        control_label,
        combo_sep,
        encode_combos_as_unique,
        treatments=None if schema is None else schema["treatments"],
        sparse=True,
    )
    labels = labels.astype(str)
    if schema is None and not treatments:
        raise ValueError("no perturbed cells: every cell is a control; the data needs perturbations to model")

    matrix = _as_matrix(_get_matrix(adata, layer), backed)
    where = f"layer {layer!r}" if layer else "X"
    is_counts = _check_values(matrix, require_counts, where)

    if stored_split is not None:
        split = _split_by_name(adata.obs_names, stored_split)
    elif split_key is not None:
        if split_key not in adata.obs.columns:
            raise ValueError(
                f"obs has no split column {split_key!r}; obs columns are {list(adata.obs.columns)}. "
                "Omit split_key to let pyrovae make a seeded split"
            )
        split = _normalise_split_column(adata.obs[split_key])
    else:
        split = make_split(
            labels, control_label, combo_sep, split_mode, split_seed, val_frac, test_frac, heldout
        )
    if size_factor_key is not None:
        library_size = size_factors(adata.obs, size_factor_key)
    elif isinstance(matrix, np.ndarray) or sp.issparse(matrix):
        library_size = np.asarray(matrix.sum(1), dtype=np.float32).reshape(-1)
    else:
        library_size = np.concatenate([b.sum(1) for _, b in _row_chunks(matrix, 8192)]).astype(np.float32)
    if is_counts and not (library_size > 0).any():
        raise ValueError(
            f"{where} is all zeros: no cell has any count; check the layer (--layer) or the file"
        )
    empty = (library_size <= 0) & (split != UNUSED_SPLIT)
    if require_counts and empty.any():
        # log(library size) of a cell without counts is -inf: a count likelihood cannot score it
        split = split.astype(object)
        split[empty] = UNUSED_SPLIT
        split = split.astype(str)
        warnings.warn(
            f"{int(empty.sum())} cells have no counts at all (library size 0); they are left out of every "
            "split. Filter them (e.g. scanpy.pp.filter_cells(adata, min_counts=1)) to silence this",
            PyrovaeWarning,
            stacklevel=2,
        )
    train_idx = np.flatnonzero(split == "train")
    if len(train_idx) == 0:
        raise ValueError("the training split is empty; check the split column or the split fractions")
    if not (labels[split != UNUSED_SPLIT] == control_label).any():
        raise ValueError(
            f"no control cells ({control_label!r}) in any split; controls are needed as reference"
        )
    if not (labels[train_idx] == control_label).any():
        warnings.warn(
            f"no control cells ({control_label!r}) in the training split: the basal state is learned from "
            "perturbed cells only; put some control cells in train",
            PyrovaeWarning,
            stacklevel=2,
        )

    if schema is None:
        _warn_risky(labels, split, dosage, treatments, control_label, labels_raw, combo_sep)
    keys = ([batch_key] if batch_key else []) + list(covariate_keys or ())
    if schema is not None:
        levels = {k: list(v) for k, v in (schema.get("covariates") or {}).items()}
    else:
        levels = covariate_levels(adata.obs, keys, np.flatnonzero(split != UNUSED_SPLIT))
    extras = {}
    if levels:
        extras["covariates"] = _covariates_of_used(adata.obs, levels, split)
    if schema is not None:
        mean = np.asarray(schema["norm_mean"], dtype=np.float32)
        std = np.asarray(schema["norm_std"], dtype=np.float32)
    else:
        mean, std = log_norm_stats(matrix, train_idx, log=is_counts)  # what the encoder standardises
    return PerturbationData(
        counts=matrix,
        genes=genes,
        labels=labels,
        dosage=dosage,
        treatments=list(treatments),
        split=split,
        library_size=library_size,
        control_label=control_label,
        sep=combo_sep,
        encode_combos_as_unique=encode_combos_as_unique,
        norm_mean=mean,
        norm_std=std,
        obs=adata.obs.copy(),
        uns=dict(adata.uns) if not backed else {k: adata.uns[k] for k in adata.uns.keys()},
        is_count_data=is_counts,
        extras=extras,
        covariate_levels=levels,
        size_factor_key=size_factor_key,
    )


def _covariates_of_used(obs: pd.DataFrame, levels: dict[str, list[str]], split: np.ndarray) -> np.ndarray:
    """(N, C) one-hot covariates; cells without a split (never scored) get a zero row instead of failing on
    a level the model does not know."""
    used = split != UNUSED_SPLIT
    out = np.zeros((len(split), sum(len(v) for v in levels.values())), dtype=np.float32)
    out[used] = covariate_onehot(obs.iloc[np.flatnonzero(used)], levels)
    return out
