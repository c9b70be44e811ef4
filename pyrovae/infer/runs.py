"""Runs are directories: ``config.json``, ``schema.json``, ``best.pt``, ``last.pt``, ``metrics.csv``, figures.

Checkpoints hold tensors and plain numbers only and are read with ``torch.load(weights_only=True)``, so
loading a run never executes pickled code. Every file is written atomically (temporary file + rename), and
an existing run is never overwritten unless ``overwrite=True`` is passed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pyrovae.data.anndata import PerturbationData, load_perturbation_data
from pyrovae.data.gpo import UNS_KEY, prepare_for_model
from pyrovae.infer import distributed
from pyrovae.infer.train import TrainConfig, Trainer
from pyrovae.models.skeleton import PerturbationVAE
from pyrovae.models.zoo import ModelConfig, build_model

CONFIG, SCHEMA, BEST, LAST, METRICS = "config.json", "schema.json", "best.pt", "last.pt", "metrics.csv"


def atomic_write(path: str | Path, write) -> None:
    """Write via ``write(tmp_path)`` into a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)

    atomic_write(path, w)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def w(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(rows)

    atomic_write(path, w)


def read_csv(path: str | Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [
            {k: float(v) if v not in ("", None) else float("nan") for k, v in r.items()}
            for r in csv.DictReader(f)
        ]


def prepare_run_dir(run_dir: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create a run directory; refuse to touch an existing run unless ``overwrite`` or ``resume``."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if resume:
            if not (run_dir / LAST).exists():
                raise FileNotFoundError(f"cannot resume: {run_dir} has no checkpoint {LAST}")
            return run_dir
        if not overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a run; choose another --out, pass --resume to continue it, "
                "or --overwrite to replace it"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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

    @property
    def treatments(self) -> list[str]:
        return list(self.schema["treatments"])

    @property
    def untrained(self) -> torch.Tensor:
        """(T,) bool: treatments with no training cell (they fall back to the prior at prediction)."""
        return torch.as_tensor(self.schema["train_treatment_counts"]) == 0

    def metrics(self) -> list[dict[str, float]]:
        p = self.path / METRICS
        return read_csv(p) if p.exists() else []

    def load_data(self, data, **overrides) -> PerturbationData:
        """Read data the way this run's model expects (same genes, treatments, normalisation)."""
        opts = {
            k: v
            for k, v in self.data_options.items()
            if k in ("perturbation_key", "layer", "split_key", "split_mode", "split_seed", "heldout")
        }
        opts.update(overrides)
        if opts.get("split_key") is not None:
            opts.pop("heldout", None)  # a split column fixes the split; the run's hold-out only made one
        opts["require_counts"] = self.model_cfg.likelihood != "normal"
        loaded = load_perturbation_data(data, schema=self.schema, **opts)
        if self.schema.get("gpo"):
            # the GRN node list (perturbed genes, then extended genes) is the schema's treatment list
            loaded = dataclasses.replace(loaded, uns={**loaded.uns, UNS_KEY: dict(self.schema["gpo"])})
        prep = {**self.data_options, **overrides}  # prepare_for_model reads only its own keys
        return prepare_for_model(loaded, self.model_cfg.family, self.model_cfg.artifact, prep)


def save_run_config(
    run_dir: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: PerturbationData,
    data_options: dict[str, Any],
) -> None:
    write_json(
        run_dir / CONFIG, {"model": model_cfg.__dict__, "train": train_cfg.__dict__, "data": data_options}
    )
    schema = data.schema()
    schema["norm_log"] = data.is_count_data
    rec = data.uns.get(UNS_KEY)
    if isinstance(rec, dict) and "n_perturbed" in rec:
        schema["gpo"] = {"n_perturbed": int(rec["n_perturbed"]), "extended": list(rec.get("extended", []))}
    write_json(run_dir / SCHEMA, schema)


def checkpoint_writer(run_dir: Path):
    """A ``Trainer`` checkpoint callback saving ``best.pt`` / ``last.pt`` atomically."""

    def save(kind: str, state: dict[str, Any]) -> None:
        atomic_write(run_dir / (BEST if kind == "best" else LAST), lambda tmp: torch.save(state, tmp))

    return save


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> Run:
    """Rebuild a run's model from its directory (safe: tensors only, ``weights_only=True``)."""
    run_dir = Path(run_dir)
    for f in (CONFIG, SCHEMA):
        if not (run_dir / f).exists():
            raise FileNotFoundError(
                f"{run_dir} is not a pyrovae run (no {f}); train one with `pyrovae train`"
            )
    cfg = json.loads((run_dir / CONFIG).read_text())
    schema = json.loads((run_dir / SCHEMA).read_text())
    model_cfg = ModelConfig().replace(**cfg["model"])
    train_cfg = TrainConfig().replace(**cfg["train"])
    model = build_model(
        model_cfg,
        len(schema["genes"]),
        len(schema["treatments"]),
        schema["norm_mean"],
        schema["norm_std"],
        schema.get("norm_log", True),
    )
    ckpt = run_dir / (BEST if checkpoint == "best" else LAST)
    if not ckpt.exists():
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint {ckpt.name}; was training interrupted before an epoch?"
        )
    state = torch.load(ckpt, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    return Run(run_dir, model.to(device), model_cfg, train_cfg, schema, cfg.get("data", {}))


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
) -> Run:
    """Train a model into a run directory (or resume the run there) and return the best checkpoint's run.

    ``prepare`` is called on the freshly built model before training (and before a resumed state is
    loaded), e.g. ``lambda m: m.effect.fix_masks(masks)`` to train with known masks.
    """
    if model_cfg.likelihood in ("nb", "poisson") and not data.is_count_data:
        raise ValueError(
            "a count likelihood needs raw integer counts; use likelihood='normal' for normalised data "
            "(CLI and experiment scripts: --set likelihood=normal)"
        )
    ddp = distributed.context(train_cfg.device)  # under torchrun: rank 0 owns the directory
    if ddp is None or ddp.is_main:
        run_dir = prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    if ddp is not None:
        ddp.barrier()
    run_dir = Path(run_dir)
    model = build_model(
        model_cfg,
        data.n_genes,
        data.n_treatments,
        data.norm_mean,
        data.norm_std,
        data.is_count_data,
        seed=train_cfg.seed,
    )
    if prepare is not None:
        prepare(model)
    trainer = Trainer(model, data, train_cfg, checkpoint=checkpoint_writer(run_dir))
    if resume:
        state = torch.load(run_dir / LAST, map_location=train_cfg.device, weights_only=True)
        trainer.load_state(state, read_csv(run_dir / METRICS) if (run_dir / METRICS).exists() else None)
    if ddp is None or ddp.is_main:
        save_run_config(run_dir, model_cfg, train_cfg, data, data_options or {})
    trainer.fit(progress=progress, on_epoch=lambda hist: write_csv(run_dir / METRICS, hist))
    return load_run(run_dir, device=train_cfg.device)
