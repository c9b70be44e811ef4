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
import pickle
import shutil
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
from pyrovae.data.grn import UNS_KEY
from pyrovae.data.options import DataOptions
from pyrovae.data.prepare import preparation_record, prepare_data, record_options
from pyrovae.infer import distributed
from pyrovae.infer.device import resolve_device
from pyrovae.infer.train import TrainConfig, Trainer
from pyrovae.models.skeleton import PerturbationVAE
from pyrovae.models.zoo import ModelConfig, build_model, data_requirements
from pyrovae.outputs import (
    LOCK,
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


def _incomplete(run_dir: Path, missing: str) -> str:
    return (
        f"{run_dir} holds an incomplete run: it stopped before its first checkpoint (no {missing}); "
        "train it again without --resume (that replaces it)"
    )


def _is_incomplete(run_dir: Path) -> bool:
    return output_kind(run_dir) == "run" and not (run_dir / LAST).exists()  # best.pt alone: killed in epoch 1


def _empty(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but the lock file (held by this process)."""
    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


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
        if output_kind(run_dir) != "run":
            raise FileNotFoundError(f"cannot resume: {run_dir} is not a pyrovae run (no {CONFIG}/{SCHEMA})")
        if not (run_dir / LAST).exists():
            raise ValueError(_incomplete(run_dir, LAST))
        return run_dir
    if entries:
        if _is_incomplete(run_dir):
            check_replaceable(run_dir, "run", protect)
            warnings.warn(
                f"replacing the incomplete run in {run_dir} (it stopped before its first checkpoint)",
                PyrovaeWarning,
                stacklevel=2,
            )
        elif not overwrite:
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

    def load_data(self, data, **overrides) -> PerturbationData:
        """Read data the way this run's model expects (same genes, treatments, normalisation, split).

        The split is the run's stored one, by cell name (``split.csv``), whatever the order or subset of
        cells in ``data``: cells the run never saw get no split, and a warning names the run's cells that
        ``data`` lacks. ``split_key=...`` replaces it with a split column of ``data``.
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
        return prepare_data(loaded, data_requirements(self.model_cfg), prep)

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
) -> None:
    """Write ``config.json`` (and, for a new run, ``schema.json``, ``split.csv`` and ``prep.json``)."""
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
    record = preparation_record(data, data_requirements(model_cfg))
    if record is not None:
        write_json(run_dir / PREP, record)


def checkpoint_writer(run_dir: Path):
    """A ``Trainer`` checkpoint callback saving ``best.pt`` / ``last.pt`` atomically."""

    def save(kind: str, state: dict[str, Any]) -> None:
        atomic_write(run_dir / (BEST if kind == "best" else LAST), lambda tmp: torch.save(state, tmp))

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
    missing = [k for k in ("model", "train") if k not in cfg] + [
        k for k in ("genes", "treatments", "norm_mean", "norm_std") if k not in schema
    ]
    if missing:
        raise ValueError(f"{run_dir}: its config/schema lack {missing}; it is damaged: retrain")
    return cfg, schema


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> Run:
    """Rebuild a run's model from its directory (safe: tensors only, ``weights_only=True``) on ``device``
    (``cpu``, ``cuda``, ``auto``, ...: :func:`~pyrovae.infer.device.resolve_device`)."""
    run_dir = Path(run_dir)
    device = resolve_device(device)
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    cfg, schema = read_run_config(run_dir)
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
    ckpt = run_dir / (BEST if checkpoint == "best" else LAST)
    if not ckpt.exists():
        raise FileNotFoundError(_incomplete(run_dir, ckpt.name))
    state = read_checkpoint(ckpt, device)
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
    if not np.allclose(np.asarray(schema["norm_mean"]), data.norm_mean, atol=1e-5):
        raise ValueError(
            f"cannot resume {run_dir}: the data's training cells have other expression statistics than "
            "the run's; resume with the data it was trained on"
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
                if not resume and _is_incomplete(run_dir):
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
    trainer = Trainer(model, data, train_cfg, checkpoint=checkpoint_writer(run_dir))
    if resume:
        # on the CPU: RNG states must stay there; parameters and optimiser state move when loaded
        state = read_checkpoint(run_dir / LAST, "cpu")
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
        save_run_config(run_dir, model_cfg, train_cfg, data, data_options or {}, model_name)
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
