"""A trained run: build, train (or resume) and load a model in a run directory.

:func:`train_run` is the one way to train that the CLI (``pyrovae train``), :class:`pyrovae.Model` and the
experiment scripts share; :func:`load_run` rebuilds a trained model from its directory; :class:`Run` is the
result of both. The files of a run directory and their rules are
:class:`~pyrovae.runs.directory.RunDirectory`'s.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pyrovae.config import PyrovaeWarning, preview
from pyrovae.data.extras import iter_row_blocks
from pyrovae.data.gene_features import treatment_gene_features
from pyrovae.data.grn import UNS_KEY
from pyrovae.data.options import DataOptions
from pyrovae.data.perturbation_data import PerturbationData, untrained_treatments
from pyrovae.data.prepare import prepare_data, record_options
from pyrovae.models.skeleton import PerturbationVAE
from pyrovae.models.zoo import ModelConfig, build_model, data_requirements
from pyrovae.outputs import LOCK, dir_lock, read_json, write_csv
from pyrovae.runs.directory import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    SPLIT,
    RunDirectory,
    cell_names,
    data_fingerprint,
    fingerprint_mismatch,
    read_checkpoint,
)
from pyrovae.setup import needs_counts, read_data
from pyrovae.train import distributed
from pyrovae.train.device import resolve_device
from pyrovae.train.trainer import TrainConfig, Trainer

__all__ = ["Run", "load_run", "train_run"]


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
        self.directory = RunDirectory(path)  #: the run's files
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
        """The losses per epoch (``metrics.csv``)."""
        return self.directory.metrics()

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
            stored = self.directory.load_split()
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
        fingerprint = self.directory.fingerprint() if verify else None
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
        stored = self.directory.load_split()
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
        """The record of the run's data preparation (``prep.json``; ``{}`` for a model that needs none)."""
        return self.directory.preparation(self.schema)


def _load_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:160]
        raise ValueError(
            f"checkpoint {path} does not fit the run's model ({first}); it was altered or belongs to "
            "another run: restore it or retrain"
        ) from None


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> Run:
    """Rebuild a run's model from its directory (safe: tensors only, ``weights_only=True``) on ``device``
    (``cpu``, ``cuda``, ``auto``, ...: :func:`~pyrovae.train.device.resolve_device`)."""
    run_dir = Path(run_dir)
    directory = RunDirectory(run_dir)
    device = resolve_device(device)
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    cfg, schema = directory.read_config()
    try:
        model_cfg = ModelConfig.from_stored(cfg["model"])
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
        if directory.is_incomplete() or not any(directory.has(f) for f in (BEST, LAST)):
            raise FileNotFoundError(directory.incomplete_message(ckpt.name))
        raise FileNotFoundError(
            f"{run_dir} has no {ckpt.name} (deleted or moved by hand: the run got past its first epoch); "
            "restore it, or retrain (train --overwrite replaces the run)"
        )
    state = directory.read_checkpoint(ckpt.name, device)
    _load_state(model, state, ckpt)
    model.eval()
    run = Run(run_dir, model.to(device), model_cfg, train_cfg, schema, cfg.get("data", {}))
    run.model_name = cfg.get("model_name")
    return run


def check_resume(
    directory: RunDirectory, model_cfg: ModelConfig, data: PerturbationData, model_name: str | None
) -> None:
    """Refuse to resume the run in ``directory`` with another model or other data (before anything is
    touched)."""
    run_dir = directory.path
    cfg, schema = directory.read_config()
    stored_name = cfg.get("model_name")
    if model_name is not None and stored_name is not None and model_name != stored_name:
        raise ValueError(
            f"{run_dir} holds a {stored_name} run, not {model_name}; resume it without --model (or with "
            f"--model {stored_name}), or train {model_name} into another --out"
        )
    stored_cfg = ModelConfig.from_stored(cfg["model"])
    diff = [k for k in ModelConfig.keys() if stored_cfg.get(k) != model_cfg.get(k)]
    if diff:
        raise ValueError(
            f"cannot resume {run_dir} with other model options {diff} (stored: "
            f"{ {k: stored_cfg.get(k) for k in diff} }); model options are fixed once a run exists"
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
    stored = directory.load_split()
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
    fingerprint = directory.fingerprint()
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
    if cfg.artifact.enabled and "qc" in data.extras:
        n_qc = np.asarray(data.extras["qc"]).reshape(data.n_cells, -1).shape[1]
        if (asked := cfg.artifact.n_qc) != n_qc:
            raise ValueError(
                f"option n_qc={asked} does not match the data's {n_qc} QC column(s) (the QC indicator: "
                f"obs[qc_key], or the MAD QC flags); set n_qc={n_qc} (or leave it at its default)"
            )
    key = "delta_x" if cfg.grn.target == "cell" else "delta_x_group"
    if cfg.family == "gpo" and key in data.extras:
        blocks = iter_row_blocks(data.extras[key], data.indices("train"))  # streamed: O(block), not O(N T)
        top = max((float(np.nanmax(np.abs(b), initial=0.0)) for _, b in blocks), default=0.0)
        if cfg.grn.threshold >= top:
            warnings.warn(
                f"grn_threshold={cfg.grn.threshold:g} is at or above every GRN alignment target of the "
                f"training cells (largest {key} {top:.3g}): the alignment pulls every edge towards "
                "'no edge'; the reference uses 0.4-0.8",
                PyrovaeWarning,
                stacklevel=3,
            )


def _with_gene_features(
    data: PerturbationData, cfg: ModelConfig, prepare: Callable[[PerturbationVAE], None] | None
) -> tuple[ModelConfig, Callable[[PerturbationVAE], None] | None]:
    """For gene features set (``cfg.features``): the treatments' gene features
    (:func:`~pyrovae.data.gene_features.treatment_gene_features`, errors before anything is written), the
    config with F = their width, and a ``prepare`` that stores them in the model (its checkpoints carry
    them). A warning says how many targets have no features."""
    if not cfg.features.enabled:
        return cfg, prepare
    feats = treatment_gene_features(data, cfg.features.source, cfg.features.file, cfg.features.dim)
    missing = [t for t, h in zip(data.treatments, feats.has) if not h]
    if missing:
        warnings.warn(
            f"gene features ({cfg.features.source}): {feats.n_matched} of {len(feats.has)} perturbation "
            f"targets matched a gene; {len(missing)} have none ({preview(missing, 5)}) and are predicted "
            "from the learned intercept alone (the mean effect of the seen perturbations) when unseen",
            PyrovaeWarning,
            stacklevel=3,
        )
    cfg = cfg.replace(gene_feature_dim=feats.values.shape[1])

    def with_features(model: PerturbationVAE) -> None:
        model.effect.feature_prior.set_features(feats.values, feats.has)
        if prepare is not None:
            prepare(model)

    return cfg, with_features


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
    model_cfg, prepare = _with_gene_features(data, model_cfg, prepare)
    cell_names(data)  # a split stored by name needs unique names: refuse before making anything
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a run directory; choose another --out")
    directory = RunDirectory(run_dir)
    ddp = distributed.context(train_cfg.device)  # under torchrun: rank 0 owns (and locks) the directory
    if ddp is not None and not ddp.is_main:
        ddp.barrier()  # rank 0 has prepared the directory
        _train_locked(
            data, model_cfg, train_cfg, directory, data_options, resume, progress, prepare, model_name
        )
        return load_run(run_dir, device=train_cfg.device)
    if run_dir.is_dir():
        directory.refuse_foreign(overwrite, protect, resume)  # again under the lock, authoritatively
    created = not run_dir.exists()
    try:
        with dir_lock(run_dir):
            if resume:
                directory.prepare(resume=True)
                check_resume(directory, model_cfg, data, model_name)
            else:
                directory.prepare(overwrite=overwrite, protect=protect)
            if ddp is not None:
                ddp.barrier()
            try:
                _train_locked(
                    data, model_cfg, train_cfg, directory, data_options, resume, progress, prepare, model_name
                )
            except BaseException:
                if not resume and not directory.has(LAST):
                    # this process emptied (or made) the directory: everything in it is its own
                    directory.empty()  # nothing worth keeping: no checkpoint was written
                raise
    except BaseException:
        if created and run_dir.is_dir() and [p.name for p in run_dir.iterdir()] in ([], [LOCK]):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return load_run(run_dir, device=train_cfg.device)


def _train_locked(data, model_cfg, train_cfg, directory, data_options, resume, progress, prepare, model_name):
    """Build, (resume,) and fit into ``directory`` (a :class:`RunDirectory`); only the main process (rank 0
    under torchrun) writes files."""
    run_dir = directory.path
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
    fingerprint = directory.fingerprint() if resume else data_fingerprint(data)
    run_id = fingerprint["run_id"] if fingerprint is not None else None
    trainer = Trainer(model, data, train_cfg, checkpoint=directory.checkpoint_writer(run_id))
    if resume:
        # on the CPU: RNG states must stay there; parameters and optimiser state move when loaded
        state = directory.read_checkpoint(LAST, "cpu")
        history = state.get("history")
        if history is None and directory.has(METRICS):  # checkpoints of older versions
            history = directory.metrics()
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
            directory.write_config(model_cfg, train_cfg, data, stored.get("data", {}), name, schema=False)
    elif main:
        directory.write_config(
            model_cfg, train_cfg, data, data_options or {}, model_name, fingerprint=fingerprint
        )
    try:
        trainer.fit(progress=progress, on_epoch=lambda hist: write_csv(run_dir / METRICS, hist))
    except KeyboardInterrupt:
        # Ctrl-C between last.pt and metrics.csv would leave the table one epoch behind the checkpoint
        # (--resume repairs it); bring it level with last.pt's history so the stopped run is consistent
        if main and directory.has(LAST):
            history = read_checkpoint(run_dir / LAST, "cpu").get("history")
            if history is not None:
                write_csv(run_dir / METRICS, history)
        raise
