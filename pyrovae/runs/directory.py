"""The run directory: one object for the files a run is made of, their format and their safety rules.

A run is a directory: ``config.json``, ``schema.json``, ``split.csv``, ``prep.json`` (what the model's data
preparation made, for models that need one), ``fingerprint.json``, ``best.pt``, ``last.pt``,
``metrics.csv``, and the outputs of evaluation commands.

Checkpoints hold tensors and plain numbers only and are read with ``torch.load(weights_only=True)``, so
loading a run never executes pickled code; ``last.pt`` also holds the metrics history, so ``metrics.csv`` is
rebuilt from it on resume. The split is stored by cell name (``split.csv``: obs_names -> train/val/test), so
evaluating or resuming a run uses exactly its cells, whatever the order or subset of the file it is given.
A process writing a run holds its lock (:func:`pyrovae.outputs.dir_lock`); every file is written
atomically; an existing run is replaced only with ``overwrite=True`` and only if it holds nothing but
pyrovae's own files; a run killed before its first checkpoint is replaced by the next training.
"""

from __future__ import annotations

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

from pyrovae.config import PyrovaeWarning
from pyrovae.data.anndata import unique_cell_names
from pyrovae.data.matrix import column_sums
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.data.prepare import preparation_record
from pyrovae.models.zoo import ModelConfig, data_requirements
from pyrovae.outputs import (
    LOCK,
    MARKER,
    atomic_write,
    check_replaceable,
    is_temporary,
    mark_output_dir,
    output_kind,
    read_csv,
    read_json,
    remove_stale_temporaries,
    write_json,
)

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
    "RunDirectory",
    "cell_names",
    "data_fingerprint",
    "fingerprint_mismatch",
    "read_checkpoint",
]


def cell_names(data: PerturbationData) -> pd.Index:
    """The cells' names (obs_names); an error if they are not unique (a split is stored by name)."""
    return unique_cell_names(data.obs.index)


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


class RunDirectory:
    """A run's directory on disk: where each file is, how it is written and read, and when the directory may
    be made, replaced or resumed.

    Args:
        path: the directory (it need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------------------------ state
    def has(self, name: str) -> bool:
        """Whether the run's file ``name`` (e.g. :data:`LAST`) exists."""
        return (self.path / name).exists()

    def is_incomplete(self) -> bool:
        """A run pyrovae marked that stopped before its first epoch was recorded: its marker, and no
        ``last.pt`` and no metrics (a folder without the marker, or a run whose ``last.pt`` was deleted by
        hand, is not one: it is refused without ``--overwrite``)."""
        # best.pt alone (no last.pt, no metrics.csv) is a kill between the first epoch's two checkpoint
        # writes; a run whose last.pt was deleted by hand after an epoch still has its metrics.csv
        return (
            (self.path / MARKER).is_file()
            and output_kind(self.path) == "run"
            and not any(self.has(f) for f in (LAST, METRICS))
        )

    def incomplete_message(self, missing: str) -> str:
        """The error of a run killed before its first checkpoint (``missing``: the file looked for)."""
        return (
            f"{self.path} holds an incomplete run: it stopped before its first checkpoint (no {missing}); "
            "train it again without --resume (that replaces it)"
        )

    def lost_last_message(self, what: str) -> str:
        """The error of a run whose ``last.pt`` was removed by hand after its first epoch."""
        return (
            f"{self.path} holds a run whose {LAST} is missing (deleted or moved by hand: the run got past "
            f"its first epoch) ({what}); restore {LAST}, or pass --overwrite to replace the run"
        )

    # ---------------------------------------------------------------------- making and replacing
    def empty(self) -> None:
        """Delete everything in the directory but the lock file (held by this process)."""
        for p in self.path.iterdir():
            if p.name == LOCK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def refuse_foreign(self, overwrite: bool, protect: tuple = (), resume: bool = False) -> None:
        """Refuse a directory that is not a pyrovae run (checked before its lock is taken too, so that a
        refusal leaves not even a lock file in a user's folder)."""
        run_dir = self.path
        if resume:
            if output_kind(run_dir) != "run":
                raise FileNotFoundError(
                    f"cannot resume: {run_dir} is not a pyrovae run (no {CONFIG}/{SCHEMA})"
                )
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

    def prepare(self, overwrite: bool = False, resume: bool = False, protect: tuple = ()) -> None:
        """Make the directory ready for training (the caller holds its lock).

        An existing run is continued (``resume``), replaced (``overwrite``: only if every file in it is one
        pyrovae writes, and no ``protect``-ed path, e.g. the input data, lies inside), or refused. A run
        killed before its first checkpoint is incomplete and is replaced without ``overwrite``.
        """
        run_dir = self.path
        remove_stale_temporaries(run_dir)  # what a killed writer left (we hold the lock: no live writer)
        entries = [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []
        if resume:
            self.refuse_foreign(overwrite, protect, resume=True)
            if not self.has(LAST):
                if self.is_incomplete():
                    raise ValueError(self.incomplete_message(LAST))
                raise FileNotFoundError(self.lost_last_message("--resume needs it"))
            return
        if entries:
            self.refuse_foreign(overwrite, protect)
            if self.is_incomplete():
                check_replaceable(run_dir, "run", protect)
                warnings.warn(
                    f"replacing the incomplete run in {run_dir} (it stopped before its first checkpoint)",
                    PyrovaeWarning,
                    stacklevel=2,
                )
            elif not overwrite:
                if output_kind(run_dir) == "run" and not self.has(LAST):
                    raise FileExistsError(self.lost_last_message("nothing was deleted"))
                raise FileExistsError(
                    f"{run_dir} already holds {'a run' if output_kind(run_dir) == 'run' else 'files'}; "
                    "choose another --out, pass --resume to continue a run, or --overwrite to replace it"
                )
            else:
                check_replaceable(run_dir, "run", protect)
            self.empty()
        mark_output_dir(run_dir, "run")

    # ------------------------------------------------------------------------ configuration files
    def write_config(
        self,
        model_cfg: ModelConfig,
        train_cfg: Any,
        data: PerturbationData,
        data_options: dict[str, Any],
        model_name: str | None = None,
        schema: bool = True,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        """Write ``config.json`` (and, for a new run, ``schema.json``, ``split.csv``, ``prep.json`` and
        ``fingerprint.json``: ``fingerprint``, or the data's with a new run id)."""
        cfg = {"model": model_cfg.to_dict(), "train": train_cfg.__dict__, "data": data_options}
        if model_name is not None:
            cfg["model_name"] = model_name
        write_json(self.path / CONFIG, cfg)
        if not schema:
            return
        sch = data.schema()
        sch["norm_log"] = data.is_count_data
        write_json(self.path / SCHEMA, sch)
        self.save_split(data)
        write_json(self.path / FINGERPRINT, fingerprint or data_fingerprint(data))
        record = preparation_record(data, data_requirements(model_cfg))
        if record is not None:
            write_json(self.path / PREP, record)

    def read_config(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config.json, schema.json), with clear errors for a directory that is not a (whole) run."""
        run_dir = self.path
        if not run_dir.is_dir():
            what = "is not a directory" if run_dir.exists() else "does not exist"
            raise FileNotFoundError(
                f"run directory {run_dir} {what}; give the --out of a `pyrovae train` run"
            )
        for f in (CONFIG, SCHEMA):
            if not self.has(f):
                leftovers = [p for p in run_dir.iterdir() if p.name != LOCK]
                if output_kind(run_dir) == "run" or (
                    leftovers and all(is_temporary(p.name) for p in leftovers)
                ):
                    raise FileNotFoundError(self.incomplete_message(f))
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
                f"{run_dir}: {problems[0]} (edited by hand?); the run cannot be read: restore the file or "
                "retrain"
            )
        return cfg, schema

    def preparation(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The record of the run's data preparation (``prep.json``; ``{}`` for a model that needs none).

        Runs written before ``prep.json`` existed kept the GRN part in ``schema.json["gpo"]``."""
        if self.has(PREP):
            rec = read_json(self.path / PREP, "the run's data preparation record")
            return {k: v for k, v in rec.items() if k != "requirements"}
        return dict(schema.get("gpo") or {})

    # ------------------------------------------------------------------------- split, fingerprint
    def save_split(self, data: PerturbationData) -> None:
        """Write ``split.csv``: every cell with a split, by name."""
        names = cell_names(data)
        used = data.split != ""
        frame = pd.DataFrame({"cell": names[used], "split": data.split[used]})
        atomic_write(self.path / SPLIT, lambda tmp: frame.to_csv(tmp, index=False))

    def load_split(self) -> pd.Series | None:
        """The stored split (cell name -> split), or ``None`` for a run written before splits were stored."""
        p = self.path / SPLIT
        if not p.exists():
            return None
        try:
            frame = pd.read_csv(p, dtype=str, keep_default_na=False)
            return pd.Series(frame["split"].to_numpy(), index=pd.Index(frame["cell"], name="cell"))
        except (KeyError, ValueError, pd.errors.ParserError) as err:
            raise ValueError(
                f"{p} (the run's stored split) is corrupt ({err}); restore it or retrain"
            ) from None

    def fingerprint(self) -> dict[str, Any] | None:
        """The run's ``fingerprint.json`` (``None`` for a run of an older pyrovae, which has none)."""
        p = self.path / FINGERPRINT
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

    # -------------------------------------------------------------------------------- checkpoints
    def checkpoint_writer(self, run_id: str | None = None) -> Callable[[str, dict[str, Any]], None]:
        """A ``Trainer`` checkpoint callback saving ``best.pt`` / ``last.pt`` atomically (with the run's
        id)."""

        def save(kind: str, state: dict[str, Any]) -> None:
            if run_id is not None:
                state = {**state, "run_id": run_id}
            path = self.path / (BEST if kind == "best" else LAST)

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

    def read_checkpoint(self, name: str, device: str = "cpu") -> dict[str, Any]:
        """The state of the run's own checkpoint ``name`` (:data:`BEST` or :data:`LAST`): read safely
        (:func:`read_checkpoint`) and refused when it carries another run's id (:meth:`check_run_id`)."""
        path = self.path / name
        state = read_checkpoint(path, device)
        self.check_run_id(state, path)
        return state

    def check_run_id(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint that is not this run's own (another run's file copied or linked in): its
        ``run_id`` must be the one in ``fingerprint.json`` (runs of older versions carry neither)."""
        if not self.has(FINGERPRINT):
            return
        want = self.fingerprint()["run_id"]
        got = state.get("run_id")
        if got != want:
            link = f", a link to {path.resolve()}" if path.is_symlink() else ""
            raise ValueError(
                f"checkpoint {path}{link} belongs to another run (its run id is {got or 'missing'}, this "
                f"run's is {want}); restore this run's own {path.name} or retrain"
            )

    def metrics(self) -> list[dict[str, float]]:
        """The losses per epoch (``metrics.csv``; empty before the first epoch)."""
        p = self.path / METRICS
        return read_csv(p) if p.exists() else []
