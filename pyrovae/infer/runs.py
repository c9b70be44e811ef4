"""Runs are directories: ``config.json``, ``schema.json``, ``split.csv``, ``prep.json`` (what the model's
data preparation made, for models that need one), ``best.pt``, ``last.pt``, ``metrics.csv``, and the
outputs of evaluation commands.

Checkpoints hold tensors and plain numbers only and are read with ``torch.load(weights_only=True)``, so
loading a run never executes pickled code; ``last.pt`` also holds the metrics history, so ``metrics.csv`` is
rebuilt from it on resume. The split is stored by cell name (``split.csv``: obs_names -> train/val/test), so
evaluating or resuming a run uses exactly its cells, whatever the order or subset of the file it is given.
A process writing a run holds its lock (:func:`pyrovae.outputs.dir_lock`); every file is written
atomically; an existing run is replaced only with ``overwrite=True`` and only if it holds nothing but
pyrovae's own files; a run killed before its first checkpoint is replaced by the next training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import shutil
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pyrovae.data.anndata import (
    PerturbationData,
    PyrovaeWarning,
    unique_cell_names,
    untrained_treatments,
)
from pyrovae.data.extras import iter_row_blocks
from pyrovae.data.grn import UNS_KEY
from pyrovae.data.matrix import column_sums
from pyrovae.data.options import DataOptions
from pyrovae.data.prepare import preparation_record, prepare_data, record_options
from pyrovae.infer import distributed
from pyrovae.infer.device import resolve_device
from pyrovae.infer.train import TrainConfig, Trainer
from pyrovae.models.skeleton import PerturbationVAE
from pyrovae.models.zoo import ModelConfig, build_model, data_requirements
from pyrovae.outputs import (
    LOCK,
    MARKER,
    atomic_write,
    check_replaceable,
    dir_lock,
    is_temporary,
    mark_output_dir,
    output_kind,
    read_csv,
    read_json,
    remove_stale_temporaries,
    write_csv,
    write_json,
)
from pyrovae.setup import needs_counts, read_data

#: the file names of a run directory: model, training and data options
CONFIG = "config.json"
#: genes, treatments and normalisation statistics
SCHEMA = "schema.json"
#: the split, by cell name
SPLIT = "split.csv"
#: what the model-specific data preparation made (CRADLE-VAE, GPO-VAE)
PREP = "prep.json"
#: the training data's identity and the run's id (its own file, beside the schema)
FINGERPRINT = "fingerprint.json"
#: the best checkpoint on the validation loss
BEST = "best.pt"
#: the last checkpoint (with the metrics history and the optimiser state, for ``--resume``)
LAST = "last.pt"
#: the losses per epoch
METRICS = "metrics.csv"

__all__ = [
    "CONFIG",
    "SCHEMA",
    "SPLIT",
    "PREP",
    "FINGERPRINT",
    "BEST",
    "LAST",
    "METRICS",
    "Run",
    "load_run",
    "prepare_run_dir",
    "train_run",
]


def cell_names(data: PerturbationData) -> pd.Index:
    """The cells' names (obs_names); an error if they are not unique (a split is stored by name)."""
    return unique_cell_names(data.obs.index)


def save_split(run_dir: Path, data: PerturbationData) -> None:
    """Write ``split.csv``: every cell with a split, by name."""
    names = cell_names(data)
    used = data.split != ""
    frame = pd.DataFrame({"cell": names[used], "split": data.split[used]})
    atomic_write(run_dir / SPLIT, lambda tmp: frame.to_csv(tmp, index=False))


def load_split(run_dir: Path) -> pd.Series | None:
    """The stored split (cell name -> split), or ``None`` for a run written before splits were stored."""
    p = run_dir / SPLIT
    if not p.exists():
        return None
    try:
        frame = pd.read_csv(p, dtype=str, keep_default_na=False)
        return pd.Series(frame["split"].to_numpy(), index=pd.Index(frame["cell"], name="cell"))
    except (KeyError, ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"{p} (the run's stored split) is corrupt ({err}); restore it or retrain") from None


def data_fingerprint(data: PerturbationData, run_id: str | None = None) -> dict[str, Any]:
    """The identity of a run's data: every cell's name, canonical label and library size (over the run's
    genes), the per-gene totals, and a SHA-256 checksum of them all (independent of the cells' order).

    Stored as ``fingerprint.json`` with the ``run_id`` that the run's checkpoints also carry."""
    names = cell_names(data)
    order = np.argsort(names.to_numpy(dtype=str), kind="stable")
    labels = np.asarray(data.labels).astype(str)[order]
    library = np.round(np.asarray(data.library_size, dtype=np.float64)[order], 4)
    genes = column_sums(data.counts)
    digest = hashlib.sha256()
    for part in (
        names.to_numpy(dtype=str)[order],
        labels,
        library.astype(str),
        np.round(genes, 2).astype(str),
    ):
        digest.update("\x1f".join(part).encode())
        digest.update(b"\x1e")
    return {
        "run_id": run_id or uuid.uuid4().hex,
        "checksum": digest.hexdigest(),
        "n_cells": len(names),
        "cells": names.to_numpy(dtype=str)[order].tolist(),
        "labels": labels.tolist(),
        "library_size": library.tolist(),
        "gene_totals": np.round(genes, 2).tolist(),
    }


def load_fingerprint(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``fingerprint.json`` (``None`` for a run of an older pyrovae, which has none)."""
    p = Path(run_dir) / FINGERPRINT
    if not p.exists():
        return None
    fp = read_json(p, "the run's data fingerprint")
    keys = ("run_id", "checksum", "cells", "labels", "library_size")
    if (
        not isinstance(fp, dict)
        or any(k not in fp for k in keys)
        or len({len(fp["cells"]), len(fp["labels"]), len(fp["library_size"])}) != 1
    ):
        raise ValueError(f"{p} (the run's data fingerprint) is damaged; restore it or retrain")
    return fp


def fingerprint_mismatch(stored: dict[str, Any], data: PerturbationData) -> str | None:
    """What differs between the run's training data (``stored`` fingerprint) and ``data`` on the cells they
    share (labels, library sizes; per-gene totals when they hold the same cells), or ``None``."""
    try:
        now = data_fingerprint(data, stored["run_id"])
    except ValueError:  # duplicated cell names: nothing to match by name (the split refuses them itself)
        return None
    if now["checksum"] == stored["checksum"]:
        return None
    old = pd.DataFrame({"label": stored["labels"], "lib": stored["library_size"]}, index=stored["cells"])
    new = pd.DataFrame({"label": now["labels"], "lib": now["library_size"]}, index=now["cells"])
    common = old.index.intersection(new.index)
    if len(common) == 0:
        return None  # no cell in common: other data, whose cells the run's split does not name anyway
    o, n = old.loc[common], new.loc[common]
    relabelled = int((o["label"] != n["label"]).sum())
    recounted = int((~np.isclose(o["lib"], n["lib"], rtol=1e-4, atol=1e-3)).sum())
    parts = []
    if relabelled:
        ex = common[(o["label"] != n["label"]).to_numpy()][0]
        parts.append(
            f"{relabelled} have another label (e.g. {ex}: {o.at[ex, 'label']!r} then, "
            f"{n.at[ex, 'label']!r} now)"
        )
    if recounted:
        ex = common[~np.isclose(o["lib"].to_numpy(), n["lib"].to_numpy(), rtol=1e-4, atol=1e-3)][0]
        parts.append(
            f"{recounted} have other counts (e.g. {ex}: library size {o.at[ex, 'lib']:g} then, "
            f"{n.at[ex, 'lib']:g} now)"
        )
    if (
        not parts
        and len(common) == len(old) == len(new)
        and "gene_totals" in stored
        and not np.allclose(stored["gene_totals"], now["gene_totals"], rtol=1e-4, atol=1e-2)
    ):
        parts.append("the same library sizes but counts moved between genes (other per-gene totals)")
    if not parts:
        return None
    return f"of the {len(common)} cells it shares with the run's training data, " + " and ".join(parts)


def _incomplete(run_dir: Path, missing: str) -> str:
    return (
        f"{run_dir} holds an incomplete run: it stopped before its first checkpoint (no {missing}); "
        "train it again without --resume (that replaces it)"
    )


def _lost_last(run_dir: Path, what: str) -> str:
    return (
        f"{run_dir} holds a run whose {LAST} is missing (deleted or moved by hand: the run got past its "
        f"first epoch) ({what}); restore {LAST}, or pass --overwrite to replace the run"
    )


def _is_incomplete(run_dir: Path) -> bool:
    """A run pyrovae marked that stopped before its first epoch was recorded: its marker, and no ``last.pt``
    and no metrics (a folder without the marker, or a run whose ``last.pt`` was deleted by hand, is not
    one: it is refused without ``--overwrite``)."""
    # best.pt alone (no last.pt, no metrics.csv) is a kill between the first epoch's two checkpoint writes;
    # a run whose last.pt was deleted by hand after an epoch still has its metrics.csv
    return (
        (run_dir / MARKER).is_file()
        and output_kind(run_dir) == "run"
        and not any((run_dir / f).exists() for f in (LAST, METRICS))
    )


def _empty(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but the lock file (held by this process)."""
    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _refuse_foreign(run_dir: Path, overwrite: bool, protect: tuple = (), resume: bool = False) -> None:
    """Refuse a directory that is not a pyrovae run (checked before its lock is taken too, so that a refusal
    leaves not even a lock file in a user's folder)."""
    if resume:
        if output_kind(run_dir) != "run":
            raise FileNotFoundError(f"cannot resume: {run_dir} is not a pyrovae run (no {CONFIG}/{SCHEMA})")
        return
    # a killed pyrovae writer's temporaries are not the user's files (removed under the lock)
    if output_kind(run_dir) is not None or not any(
        p.name != LOCK and not is_temporary(p.name) for p in run_dir.iterdir()
    ):
        return
    if not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds files; choose another --out, pass --resume to continue a run, or "
            "--overwrite to replace it"
        )
    check_replaceable(run_dir, "run", protect)  # not a directory pyrovae wrote: refused


def prepare_run_dir(
    run_dir: str | Path, overwrite: bool = False, resume: bool = False, protect: tuple = ()
) -> Path:
    """Make ``run_dir`` ready for training (the caller holds its lock).

    An existing run is continued (``resume``), replaced (``overwrite``: only if every file in it is one
    pyrovae writes, and no ``protect``-ed path, e.g. the input data, lies inside), or refused. A run killed
    before its first checkpoint is incomplete and is replaced without ``overwrite``.
    """
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir)  # what a killed writer left (we hold the lock: no live writer here)
    entries = [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []
    if resume:
        _refuse_foreign(run_dir, overwrite, protect, resume=True)
        if not (run_dir / LAST).exists():
            if _is_incomplete(run_dir):
                raise ValueError(_incomplete(run_dir, LAST))
            raise FileNotFoundError(_lost_last(run_dir, "--resume needs it"))
        return run_dir
    if entries:
        _refuse_foreign(run_dir, overwrite, protect)
        if _is_incomplete(run_dir):
            check_replaceable(run_dir, "run", protect)
            warnings.warn(
                f"replacing the incomplete run in {run_dir} (it stopped before its first checkpoint)",
                PyrovaeWarning,
                stacklevel=2,
            )
        elif not overwrite:
            if output_kind(run_dir) == "run" and not (run_dir / LAST).exists():
                raise FileExistsError(_lost_last(run_dir, "nothing was deleted"))
            raise FileExistsError(
                f"{run_dir} already holds {'a run' if output_kind(run_dir) == 'run' else 'files'}; choose "
                "another --out, pass --resume to continue a run, or --overwrite to replace it"
            )
        else:
            check_replaceable(run_dir, "run", protect)
        _empty(run_dir)
    mark_output_dir(run_dir, "run")
    return run_dir


class Run:
    """A trained (or training) model with its data schema and configs, stored in a directory."""

    def __init__(
        self,
        path: Path,
        model: PerturbationVAE,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        schema: dict[str, Any],
        data_options: dict[str, Any],
    ):
        self.path, self.model, self.model_cfg, self.train_cfg = path, model, model_cfg, train_cfg
        self.schema, self.data_options = schema, data_options
        self.model_name: str | None = None  #: the zoo name it was trained as (config.json), if recorded

    def __repr__(self) -> str:
        cfg = self.model_cfg
        return (
            f"Run({str(self.path)!r}, {cfg.family} (n_latent={cfg.n_latent}, {cfg.likelihood}), "
            f"{len(self.schema['genes'])} genes, {len(self.schema['treatments'])} treatments)"
        )

    @property
    def treatments(self) -> list[str]:
        return list(self.schema["treatments"])

    @property
    def untrained(self) -> torch.Tensor:
        """(T,) bool: treatments with no training cell (they fall back to the prior at prediction)."""
        return torch.as_tensor(untrained_treatments(self.schema["train_treatment_counts"]))

    def metrics(self) -> list[dict[str, float]]:
        p = self.path / METRICS
        return read_csv(p) if p.exists() else []

    def load_data(self, data, verify: bool = True, **overrides) -> PerturbationData:
        """Read data the way this run's model expects (same genes, treatments, normalisation, split).

        The split is the run's stored one, by cell name (``split.csv``), whatever the order or subset of
        cells in ``data``: cells the run never saw get no split, and a warning names the run's cells that
        ``data`` lacks. ``split_key=...`` replaces it with a split column of ``data``. ``verify``: warn when
        the cells the data shares with the run's training data have other labels or counts than then
        (``fingerprint.json``).
        """
        opts = self.options.replace(**overrides)
        stored = None
        if opts.split_key is None:
            stored = load_split(self.path)
            if stored is None:
                warnings.warn(
                    f"{self.path} has no stored split ({SPLIT}; written by an older pyrovae): the split is "
                    "recomputed from the data options, by cell position",
                    PyrovaeWarning,
                    stacklevel=2,
                )
        loaded, _ = read_data(
            data, opts, self.model_cfg, schema=self.schema, stored_split=stored, prepare=False
        )
        record = self.preparation()
        prep = opts.prep_options()
        if record:
            # the GRN node list (perturbed genes, then extended genes) is the schema's treatment list
            loaded = dataclasses.replace(loaded, uns={**loaded.uns, UNS_KEY: record})
            prep.update(record_options(record))
        prep.update(overrides)  # prepare_data reads only its own keys
        prepared = prepare_data(loaded, data_requirements(self.model_cfg), prep)
        fingerprint = load_fingerprint(self.path) if verify else None
        changed = fingerprint_mismatch(fingerprint, prepared) if fingerprint is not None else None
        if changed:
            warnings.warn(
                f"the data is not the run's training data: {changed}; what is computed on it compares the "
                "run with other data",
                PyrovaeWarning,
                stacklevel=2,
            )
        return prepared

    def seen_cells(self, data: PerturbationData, split: str) -> dict[str, int]:
        """How many of ``data``'s ``split`` cells the run trained (``train``) or validated (``val``) on,
        by its stored split (``{}`` for a run without one); non-zero when a ``split_key`` column marks
        them as held out."""
        stored = load_split(self.path)
        if stored is None or split == "train":
            return {}
        names = cell_names(data)[data.split == split]
        was = stored.reindex(names)
        return {sp: int((was == sp).sum()) for sp in ("train", "val") if (was == sp).any() and sp != split}

    def warn_seen(self, data: PerturbationData, split: str, key: str | None) -> None:
        """A warning when ``data``'s ``split`` cells (chosen by the split column ``key``) include cells the
        run trained or validated on: a score on them is not a held-out score."""
        seen = self.seen_cells(data, split)
        if seen:
            n = int((data.split == split).sum())
            what = " and ".join(
                f"{v} it {'trained' if k == 'train' else 'validated'} on" for k, v in seen.items()
            )
            warnings.warn(
                f"{sum(seen.values())} of the {n} {split} cells chosen by the split column {key!r} are cells "
                f"the run has seen ({what}): results on them are not held-out; use the run's own split "
                f"(no split key) or a column whose {split} cells the run never saw",
                PyrovaeWarning,
                stacklevel=2,
            )

    @property
    def options(self) -> DataOptions:
        """The run's data options (``config.json["data"]``; keys an older pyrovae wrote and this one does not
        know are ignored)."""
        known = {f.name for f in dataclasses.fields(DataOptions)}
        return DataOptions.from_dict({k: v for k, v in self.data_options.items() if k in known})

    def preparation(self) -> dict[str, Any]:
        """The record of the run's data preparation (``prep.json``; ``{}`` for a model that needs none).

        Runs written before ``prep.json`` existed kept the GRN part in ``schema.json["gpo"]``."""
        p = self.path / PREP
        if p.exists():
            rec = read_json(p, "the run's data preparation record")
            return {k: v for k, v in rec.items() if k != "requirements"}
        return dict(self.schema.get("gpo") or {})


def save_run_config(
    run_dir: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: PerturbationData,
    data_options: dict[str, Any],
    model_name: str | None = None,
    schema: bool = True,
    fingerprint: dict[str, Any] | None = None,
) -> None:
    """Write ``config.json`` (and, for a new run, ``schema.json``, ``split.csv``, ``prep.json`` and
    ``fingerprint.json``: ``fingerprint``, or the data's with a new run id)."""
    cfg = {"model": model_cfg.__dict__, "train": train_cfg.__dict__, "data": data_options}
    if model_name is not None:
        cfg["model_name"] = model_name
    write_json(run_dir / CONFIG, cfg)
    if not schema:
        return
    sch = data.schema()
    sch["norm_log"] = data.is_count_data
    write_json(run_dir / SCHEMA, sch)
    save_split(run_dir, data)
    write_json(run_dir / FINGERPRINT, fingerprint or data_fingerprint(data))
    record = preparation_record(data, data_requirements(model_cfg))
    if record is not None:
        write_json(run_dir / PREP, record)


def checkpoint_writer(run_dir: Path, run_id: str | None = None):
    """A ``Trainer`` checkpoint callback saving ``best.pt`` / ``last.pt`` atomically (with the run's id)."""

    def save(kind: str, state: dict[str, Any]) -> None:
        if run_id is not None:
            state = {**state, "run_id": run_id}
        path = run_dir / (BEST if kind == "best" else LAST)

        def write(tmp: str) -> None:
            try:
                torch.save(state, tmp)
            except RuntimeError as err:  # torch's writer reports a full disk as a RuntimeError
                first = (str(err).strip().splitlines() or ["write failed"])[0][:120]
                raise OSError(
                    f"cannot write checkpoint {path} ({first}): is the disk full or a file-size limit "
                    "reached? the checkpoints already written are intact; free space, then --resume"
                ) from None

        atomic_write(path, write)

    return save


def read_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A checkpoint's state (tensors and plain numbers only), or one clear error if it is unreadable."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" not in str(err).lower():  # garbage, not a pickled object
            raise ValueError(
                f"checkpoint {path} is corrupt, truncated or not a pyrovae checkpoint; use the other "
                "checkpoint (--checkpoint last/best) or retrain"
            ) from None
        raise ValueError(
            f"checkpoint {path} holds objects other than tensors and numbers; pyrovae refuses to unpickle "
            "it (that could run code): it was altered or is not a pyrovae checkpoint; retrain or restore it"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:160]
        raise ValueError(
            f"checkpoint {path} is corrupt, truncated or not a pyrovae checkpoint ({first}); use the other "
            "checkpoint (--checkpoint last/best) or retrain"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {path} is not a pyrovae checkpoint (no model state); retrain")
    return state


def check_run_id(run_dir: Path, state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint that is not this run's own (another run's file copied or linked in): its
    ``run_id`` must be the one in ``fingerprint.json`` (runs of older versions carry neither)."""
    if not (run_dir / FINGERPRINT).exists():
        return
    want = load_fingerprint(run_dir)["run_id"]
    got = state.get("run_id")
    if got != want:
        link = f", a link to {path.resolve()}" if path.is_symlink() else ""
        raise ValueError(
            f"checkpoint {path}{link} belongs to another run (its run id is {got or 'missing'}, this run's "
            f"is {want}); restore this run's own {path.name} or retrain"
        )


def _load_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:160]
        raise ValueError(
            f"checkpoint {path} does not fit the run's model ({first}); it was altered or belongs to "
            "another run: restore it or retrain"
        ) from None


def read_run_config(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, schema.json) of a run, with clear errors for a directory that is not a (whole) run."""
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise FileNotFoundError(f"run directory {run_dir} {what}; give the --out of a `pyrovae train` run")
    for f in (CONFIG, SCHEMA):
        if not (run_dir / f).exists():
            leftovers = [p for p in run_dir.iterdir() if p.name != LOCK]
            if output_kind(run_dir) == "run" or (leftovers and all(is_temporary(p.name) for p in leftovers)):
                raise FileNotFoundError(_incomplete(run_dir, f))
            raise FileNotFoundError(
                f"{run_dir} is not a pyrovae run (no {f}); train one with `pyrovae train`"
            )
    cfg = read_json(run_dir / CONFIG, "the run's configuration")
    schema = read_json(run_dir / SCHEMA, "the run's data schema")
    if not isinstance(cfg, dict) or not isinstance(schema, dict):
        raise ValueError(
            f"{run_dir}: its config.json / schema.json are not JSON objects; restore them or retrain"
        )
    missing = [k for k in ("model", "train") if k not in cfg] + [
        k for k in ("genes", "treatments", "norm_mean", "norm_std") if k not in schema
    ]
    if missing:
        raise ValueError(f"{run_dir}: its config/schema lack {missing}; it is damaged: retrain")
    problems = [
        f"config.json {k!r} is not a mapping"
        for k in ("model", "train", "data")
        if not isinstance(cfg.get(k, {}), dict)
    ]
    for k in ("genes", "treatments", "norm_mean", "norm_std", "train_treatment_counts"):
        if k in schema and not isinstance(schema[k], list):
            problems.append(f"schema.json {k!r} is not a list")
    if not problems:
        n_genes, n_treat = len(schema["genes"]), len(schema["treatments"])
        problems += [
            f"schema.json {k!r} has {len(schema[k])} entries for {n} {what}"
            for k, n, what in (
                ("norm_mean", n_genes, "genes"),
                ("norm_std", n_genes, "genes"),
                ("train_treatment_counts", n_treat, "treatments"),
            )
            if k in schema and len(schema[k]) != n
        ]
        if (
            len(set(map(str, schema["genes"]))) != n_genes
            or len(set(map(str, schema["treatments"]))) != n_treat
        ):
            problems.append("schema.json names a gene or treatment twice")
    if problems:
        raise ValueError(
            f"{run_dir}: {problems[0]} (edited by hand?); the run cannot be read: restore the file or retrain"
        )
    return cfg, schema


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> Run:
    """Rebuild a run's model from its directory (safe: tensors only, ``weights_only=True``) on ``device``
    (``cpu``, ``cuda``, ``auto``, ...: :func:`~pyrovae.infer.device.resolve_device`)."""
    run_dir = Path(run_dir)
    device = resolve_device(device)
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    cfg, schema = read_run_config(run_dir)
    try:
        model_cfg = ModelConfig().replace(**cfg["model"])
        train_cfg = TrainConfig().replace(**cfg["train"])
        model = build_model(
            model_cfg,
            len(schema["genes"]),
            len(schema["treatments"]),
            schema["norm_mean"],
            schema["norm_std"],
            schema.get("norm_log", True),
            n_covariates=sum(len(v) for v in (schema.get("covariates") or {}).values()),
            size_factors=schema.get("size_factor_key") is not None,
        )
    except (TypeError, IndexError, AttributeError, KeyError, RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:200]
        raise ValueError(
            f"{run_dir}: its config.json / schema.json do not describe a model pyrovae can build ({first}); "
            "they were edited by hand or damaged: restore them or retrain"
        ) from None
    ckpt = run_dir / (BEST if checkpoint == "best" else LAST)
    if not ckpt.exists():
        if _is_incomplete(run_dir) or not any((run_dir / f).exists() for f in (BEST, LAST)):
            raise FileNotFoundError(_incomplete(run_dir, ckpt.name))
        raise FileNotFoundError(
            f"{run_dir} has no {ckpt.name} (deleted or moved by hand: the run got past its first epoch); "
            "restore it, or retrain (train --overwrite replaces the run)"
        )
    state = read_checkpoint(ckpt, device)
    check_run_id(run_dir, state, ckpt)
    _load_state(model, state, ckpt)
    model.eval()
    run = Run(run_dir, model.to(device), model_cfg, train_cfg, schema, cfg.get("data", {}))
    run.model_name = cfg.get("model_name")
    return run


def check_resume(
    run_dir: Path, model_cfg: ModelConfig, data: PerturbationData, model_name: str | None
) -> None:
    """Refuse to resume ``run_dir`` with another model or other data (before anything is touched)."""
    cfg, schema = read_run_config(run_dir)
    stored_name = cfg.get("model_name")
    if model_name is not None and stored_name is not None and model_name != stored_name:
        raise ValueError(
            f"{run_dir} holds a {stored_name} run, not {model_name}; resume it without --model (or with "
            f"--model {stored_name}), or train {model_name} into another --out"
        )
    stored_cfg = ModelConfig().replace(**cfg["model"])
    diff = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if getattr(stored_cfg, f.name) != getattr(model_cfg, f.name)
    ]
    if diff:
        raise ValueError(
            f"cannot resume {run_dir} with other model options {diff} (stored: "
            f"{ {k: getattr(stored_cfg, k) for k in diff} }); model options are fixed once a run exists"
        )
    if list(data.genes) != list(schema["genes"]):
        same = set(data.genes) == set(schema["genes"])
        raise ValueError(
            f"cannot resume {run_dir}: the data's genes "
            + ("are in another order than the run's" if same else "differ from the run's")
            + f" ({len(data.genes)} vs {len(schema['genes'])}); pass the run's data (adata[:, run_genes])"
        )
    if list(data.treatments) != list(schema["treatments"]):
        raise ValueError(
            f"cannot resume {run_dir}: the data's perturbations differ from the run's "
            f"({len(data.treatments)} vs {len(schema['treatments'])} treatments); pass the run's data"
        )
    stored = load_split(run_dir)
    if stored is not None:
        names = cell_names(data)
        now = pd.Series(data.split, index=names)
        for sp in ("train", "val"):
            want = stored.index[stored.to_numpy() == sp]
            have = now.reindex(want)
            lost = int(have.isna().sum())
            moved = int((have.notna() & (have != sp)).sum())
            if lost or moved:
                raise ValueError(
                    f"cannot resume {run_dir}: {lost + moved} of its {len(want)} {sp} cells are "
                    f"{'missing from' if lost else 'in another split of'} the data (e.g. "
                    f"{list(want[have.isna() | (have != sp)][:3])}); resume with the data it was trained on"
                )
        extra = int(((now == "train") & ~now.index.isin(stored.index[stored.to_numpy() == "train"])).sum())
        if extra:
            raise ValueError(
                f"cannot resume {run_dir}: the data puts {extra} cells in train that the run did not train "
                "on; resume with the run's split (the CLI reads it from split.csv)"
            )
    fingerprint = load_fingerprint(run_dir)
    changed = fingerprint_mismatch(fingerprint, data) if fingerprint is not None else None
    if changed:
        raise ValueError(
            f"cannot resume {run_dir}: the data is not the data it was trained on: {changed}; resume with "
            "the run's own data, or train a new run on this data"
        )
    if not np.allclose(np.asarray(schema["norm_mean"]), data.norm_mean, atol=1e-5):
        raise ValueError(
            f"cannot resume {run_dir}: the data's training cells have other expression statistics than "
            "the run's; resume with the data it was trained on"
        )


def _check_model_fits_data(cfg: ModelConfig, data: PerturbationData) -> None:
    """Options that must agree with the prepared data, checked before anything is built or written."""
    if cfg.artifact and "qc" in data.extras:
        n_qc = np.asarray(data.extras["qc"]).reshape(data.n_cells, -1).shape[1]
        if cfg.n_qc != n_qc:
            raise ValueError(
                f"option n_qc={cfg.n_qc} does not match the data's {n_qc} QC column(s) (the QC indicator: "
                f"obs[qc_key], or the MAD QC flags); set n_qc={n_qc} (or leave it at its default)"
            )
    key = "delta_x" if cfg.grn_target == "cell" else "delta_x_group"
    if cfg.family == "gpo" and key in data.extras:
        blocks = iter_row_blocks(data.extras[key], data.indices("train"))  # streamed: O(block), not O(N T)
        top = max((float(np.nanmax(np.abs(b), initial=0.0)) for _, b in blocks), default=0.0)
        if cfg.grn_threshold >= top:
            warnings.warn(
                f"grn_threshold={cfg.grn_threshold:g} is at or above every GRN alignment target of the "
                f"training cells (largest {key} {top:.3g}): the alignment pulls every edge towards "
                "'no edge'; the reference uses 0.4-0.8",
                PyrovaeWarning,
                stacklevel=3,
            )


def train_run(
    data: PerturbationData,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    run_dir: str | Path,
    data_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    prepare: Callable[[PerturbationVAE], None] | None = None,
    model_name: str | None = None,
    protect: tuple = (),
) -> Run:
    """Train a model into a run directory (or resume the run there) and return the best checkpoint's run.

    The run directory is locked while training. ``resume`` checks that the data and model match the stored
    run before anything is written (load the data with ``load_run(dir, "last").load_data(...)`` to get the
    run's split). A run that fails or is interrupted before its first checkpoint leaves no files behind.
    ``protect``: paths (the input data) that ``overwrite`` must never delete. ``prepare`` is called on the
    freshly built model before training (and before a resumed state is loaded), e.g.
    ``lambda m: m.effect.fix_masks(masks)`` to train with known masks.

    ``data`` is first given what the model needs (:func:`~pyrovae.data.prepare.prepare_data` with the
    model's :func:`~pyrovae.models.zoo.data_requirements` and ``data_options``; data prepared before is
    kept as it is), so a requirement the data cannot meet fails here, before any file is made.
    """
    reqs = data_requirements(model_cfg)
    data = prepare_data(data, reqs, data_options)
    if needs_counts(model_cfg) and not data.is_count_data:
        raise ValueError(
            "a count likelihood needs raw integer counts; use likelihood='normal' for normalised data "
            "(CLI and experiment scripts: --set likelihood=normal)"
        )
    _check_model_fits_data(model_cfg, data)
    cell_names(data)  # a split stored by name needs unique names: refuse before making anything
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a run directory; choose another --out")
    ddp = distributed.context(train_cfg.device)  # under torchrun: rank 0 owns (and locks) the directory
    if ddp is not None and not ddp.is_main:
        ddp.barrier()  # rank 0 has prepared the directory
        _train_locked(
            data, model_cfg, train_cfg, run_dir, data_options, resume, progress, prepare, model_name
        )
        return load_run(run_dir, device=train_cfg.device)
    if run_dir.is_dir():
        _refuse_foreign(run_dir, overwrite, protect, resume)  # again under the lock, authoritatively
    created = not run_dir.exists()
    try:
        with dir_lock(run_dir):
            if resume:
                prepare_run_dir(run_dir, resume=True)
                check_resume(run_dir, model_cfg, data, model_name)
            else:
                prepare_run_dir(run_dir, overwrite=overwrite, protect=protect)
            if ddp is not None:
                ddp.barrier()
            try:
                _train_locked(
                    data, model_cfg, train_cfg, run_dir, data_options, resume, progress, prepare, model_name
                )
            except BaseException:
                if not resume and not (run_dir / LAST).exists():
                    # this process emptied (or made) the directory: everything in it is its own
                    _empty(run_dir)  # nothing worth keeping: no checkpoint was written
                raise
    except BaseException:
        if created and run_dir.is_dir() and [p.name for p in run_dir.iterdir()] in ([], [LOCK]):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return load_run(run_dir, device=train_cfg.device)


def _train_locked(data, model_cfg, train_cfg, run_dir, data_options, resume, progress, prepare, model_name):
    """Build, (resume,) and fit; only the main process (rank 0 under torchrun) writes files."""
    main = distributed.is_main_process()
    model = build_model(
        model_cfg,
        data.n_genes,
        data.n_treatments,
        data.norm_mean,
        data.norm_std,
        data.is_count_data,
        seed=train_cfg.seed,
        n_covariates=data.n_covariates,
        size_factors=data.size_factor_key is not None,
    )
    if data.size_factor_key is not None:  # start the outside-genes share at the data's (resume: overwritten)
        model.decoder.init_rest_share(data.kept_share("train"))
    if prepare is not None:
        prepare(model)
    fingerprint = load_fingerprint(run_dir) if resume else data_fingerprint(data)
    run_id = fingerprint["run_id"] if fingerprint is not None else None
    trainer = Trainer(model, data, train_cfg, checkpoint=checkpoint_writer(run_dir, run_id))
    if resume:
        # on the CPU: RNG states must stay there; parameters and optimiser state move when loaded
        state = read_checkpoint(run_dir / LAST, "cpu")
        check_run_id(run_dir, state, run_dir / LAST)
        history = state.get("history")
        if history is None and (run_dir / METRICS).exists():  # checkpoints of older versions
            history = read_csv(run_dir / METRICS)
        try:
            trainer.load_state(state, history)
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise ValueError(
                f"checkpoint {run_dir / LAST} does not fit this run ({str(err).splitlines()[0][:160]}); "
                "restore it or retrain"
            ) from None
        if main:
            write_csv(
                run_dir / METRICS, trainer.history
            )  # a kill between last.pt and metrics.csv: no row lost
            stored = read_json(run_dir / CONFIG, "the run's configuration")
            name = model_name or stored.get("model_name")
            save_run_config(run_dir, model_cfg, train_cfg, data, stored.get("data", {}), name, schema=False)
    elif main:
        save_run_config(
            run_dir, model_cfg, train_cfg, data, data_options or {}, model_name, fingerprint=fingerprint
        )
    try:
        trainer.fit(progress=progress, on_epoch=lambda hist: write_csv(run_dir / METRICS, hist))
    except KeyboardInterrupt:
        # Ctrl-C between last.pt and metrics.csv would leave the table one epoch behind the checkpoint
        # (--resume repairs it); bring it level with last.pt's history so the stopped run is consistent
        if main and (run_dir / LAST).exists():
            history = read_checkpoint(run_dir / LAST, "cpu").get("history")
            if history is not None:
                write_csv(run_dir / METRICS, history)
        raise
