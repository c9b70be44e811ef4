"""What the experiment scripts share: options, settings, the data, and the protocol x model x seed loop.

Every script builds its parser with :func:`build_parser`, opens an :class:`Experiment` (settings from
``configs/<name>.yaml``, output directory, data), loops over its protocol's splits and models calling
:meth:`Experiment.fit_and_score` (the library's :func:`~pyrovae.runs.run.train_run` then
:func:`~pyrovae.evaluate.score.score_run`), and finishes with :meth:`Experiment.write_table` and the
library's tables (:mod:`pyrovae.report`) and figures (:mod:`pyrovae.plot`). A script is its split, its model
list and its summary.

Output directory layout::

    OUT/experiment.json     options, settings, data source, versions, wall time
    OUT/results.csv         one row per (model, setting, seed): every metric (rewritten after each run)
    OUT/summary.csv, .md    mean ± std over seeds (script-specific tables; some scripts write more)
    OUT/*.png               figures
    OUT/runs/<...>/         the pyrovae run directories (config, checkpoints, metrics.csv)

Nothing in an existing non-empty OUT is touched unless ``--overwrite`` is given. Files are written
atomically (temporary file + rename), so an interrupted experiment never leaves half-written tables.

Metrics of one run (:meth:`Experiment.fit_and_score`, from :func:`~pyrovae.evaluate.score.score_run`):

- ``val_iwelbo``, ``test_iwelbo``: held-out predictive IWELBO (nats per cell, the SAMS-VAE
  paper's metric), untrained treatments drawn from the prior;
- ``ate_r``, ``ate_r_top20`` (and ``ate_r2*``): Pearson r (R²) between model ATE and empirical ATE of the
  evaluated perturbations, over all genes and over each perturbation's top-k genes by |empirical ATE|.
  The empirical ATE is the reference's: computed on **all cells** of the data (every split, including cells
  with no split), with the perturbseq transform log2(1e4 x / sum x + 1) (the papers');
- ``ate_r_heldout``, ``ate_r_top20_heldout``: the same against the empirical ATE of the **test cells
  only** (controls: the test controls, or every control cell with a split when the test split has none).
  On cell-level splits this is the honest held-out check (the reference's version includes training
  cells); for held-out combinations at f <= 0.75 both use only never-trained cells of those combinations.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import torch
import yaml

import pyrovae
from pyrovae.baselines.ate import baseline_ates
from pyrovae.config import parse_overrides, route_options
from pyrovae.data.dosage import build_dosage, find_control_label, parse_label
from pyrovae.data.options import DataOptions
from pyrovae.data.protocols import cell_split, heldout_combinations_split
from pyrovae.evaluate.ate import ate_table
from pyrovae.evaluate.empirical import empirical_ate
from pyrovae.evaluate.score import score_run
from pyrovae.evaluate.structure import planted_structure
from pyrovae.models.zoo import ModelConfig, model_config
from pyrovae.outputs import atomic_write, write_json
from pyrovae.plot import plot_bars, plot_lines
from pyrovae.report import add_relative, markdown_table
from pyrovae.runs import train_run
from pyrovae.setup import read_data
from pyrovae.simulate import ground_truth, simulate_perturbseq, simulate_sams_reference
from pyrovae.train.trainer import TrainConfig

__all__ = [  # plot_bars, plot_lines and add_relative are the library's, used by the scripts through here
    "BASELINE_NAMES",
    "EVAL_DEFAULTS",
    "SPLIT_COLUMN",
    "Experiment",
    "Scored",
    "add_relative",
    "add_split_seed_option",
    "ate_scores",
    "ate_transform",
    "build_parser",
    "empirical_ates",
    "find_run",
    "load_settings",
    "plot_bars",
    "plot_lines",
    "split_seed",
    "structure_metrics",
    "write_frame",
]

EXPERIMENTS_DIR = Path(__file__).resolve().parent
CONFIG_DIR = EXPERIMENTS_DIR / "configs"
SPLIT_COLUMN = "_experiment_split"
PRESETS = ("tiny", "default", "large")
SIMULATORS = ("perturbseq", "sams_reference")

# ------------------------------------------------------------------------------------------- options


def add_data_options(p: argparse.ArgumentParser) -> None:
    """The data layer's column options (as ``pyrovae train``'s), minus the split options: the protocol
    makes the split."""
    g = p.add_argument_group("data (default: the simulated dataset)")
    g.add_argument(
        "--data", default=None, help="input .h5ad with raw counts (default: simulate, see --preset)"
    )
    g.add_argument(
        "--simulator",
        default="perturbseq",
        choices=SIMULATORS,
        help="simulator when no --data: 'perturbseq' (counts, pyrovae.simulate.perturbseq, see --preset) or "
        "'sams_reference' (the SAMS-VAE reference simulation's regime, continuous: --set likelihood=normal)",
    )
    g.add_argument(
        "--preset",
        default="default",
        choices=PRESETS,
        help="simulated preset of the perturbseq simulator (default: default)",
    )
    g.add_argument("--sim-seed", type=int, default=0, help="seed of the simulated dataset (default 0)")
    g.add_argument(
        "--sim-set",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="override fields of the simulation (pyrovae.simulate.SimulationConfig, or "
        "pyrovae.simulate.sams_reference.SamsReferenceConfig), e.g. knockdown=0 effect_mean=3",
    )
    g.add_argument(
        "--perturbation-key", default="perturbation", help="obs column with labels (default: perturbation)"
    )
    g.add_argument(
        "--control-label", default=None, help="label of control cells (default: control/ctrl/non-targeting)"
    )
    g.add_argument("--layer", default=None, help="layer with raw counts (default: X; Norman: counts)")
    g.add_argument("--combo-sep", default="+", help="separator of combinations in labels (default: +)")
    g.add_argument("--batch-key", default=None, help="obs column of the batch (as pyrovae train's)")
    g.add_argument(
        "--covariate-keys", default=None, help="comma-separated categorical obs columns (as pyrovae train's)"
    )
    g.add_argument(
        "--size-factor-key", default=None, help="obs column of per-cell library sizes (as pyrovae train's)"
    )
    g.add_argument(
        "--gene-key",
        default=None,
        help="boolean var column restricting the modelled genes (e.g. highly_variable, as the SAMS-VAE "
        "Norman "
        "runs); default: all genes",
    )


def build_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    """The options every experiment script shares (scripts add their own)."""
    p = argparse.ArgumentParser(
        prog=f"python experiments/{name}.py",
        description=(description or "").strip().splitlines()[0] if description else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Settings: experiments/configs/{name}.yaml (section 'small', or 'full' with --full).",
    )
    add_data_options(p)
    g = p.add_argument_group("experiment")
    g.add_argument("--out", default=None, help=f"output directory (default: runs/experiments/{name})")
    g.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    g.add_argument(
        "--full", action="store_true", help="the papers' budgets (slow; see the YAML 'full' section)"
    )
    g.add_argument("--config", default=None, help=f"YAML settings (default: experiments/configs/{name}.yaml)")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the config's)")
    g.add_argument("--models", nargs="+", default=None, help="subset of the config's models")
    g.add_argument(
        "--set",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="override model/training/evaluation settings for every run, e.g. max_epochs=5 n_latent=8 "
        "iwelbo_particles=10",
    )
    g.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    return p


# ------------------------------------------------------------------------------------------ settings

#: Evaluation settings (keys of a config's ``eval`` section) and their defaults (the reference's).
EVAL_DEFAULTS: dict[str, Any] = {
    "iwelbo_particles": 100,
    "iwelbo_batch_size": 128,
    "ate_samples": 2500,
    "ate_chunk": 256,
    "top_k": 20,
    "eval_seed": 0,
    "library_size": "matched",
}


def add_split_seed_option(group) -> None:
    """``--split-seed`` of the scripts with one fixed cell split (resolved by :func:`split_seed`)."""
    group.add_argument(
        "--split-seed", type=int, default=None, help="seed of the cell split (default: the config's, 0)"
    )


def split_seed(args: argparse.Namespace, exp: Experiment) -> int:
    """The cell-split seed: ``--split-seed``, else the config's, else 0; recorded in ``exp.settings``."""
    seed = int(args.split_seed if args.split_seed is not None else exp.settings.get("split_seed", 0))
    exp.settings["split_seed"] = seed
    return seed


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(name: str, full: bool = False, path: str | Path | None = None) -> dict[str, Any]:
    """A config's settings: its top level (shared) merged with the ``small`` or ``full`` section."""
    path = Path(path) if path else CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no config {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    budget = "full" if full else "small"
    if budget not in raw:
        raise ValueError(f"{path} has no '{budget}' section")
    shared = {k: v for k, v in raw.items() if k not in ("small", "full")}
    out = _merge(shared, raw[budget])
    out["budget"] = budget
    out["config_path"] = str(path)
    out.setdefault("model", {})
    out.setdefault("train", {})
    out["eval"] = {**EVAL_DEFAULTS, **(out.get("eval") or {})}
    return out


def parse_set(items: Sequence[str] | None) -> dict[str, Any]:
    """``["n_latent=8", "lr=1e-3"]`` -> ``{"n_latent": 8, "lr": 0.001}`` (values read as YAML)."""
    return parse_overrides(list(items or []))


def route_overrides(overrides: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Split ``--set`` overrides into (model, train, eval) settings by name."""
    groups = {"model": ModelConfig, "training": TrainConfig, "evaluation": EVAL_DEFAULTS}
    m, t, e = route_options(overrides, groups)
    return m, t, e


def eval_library(value: Any) -> str | float:
    """The eval setting ``library_size``: ``"matched"`` (the compared cells' depths, the default) or a
    number (``1e4``: the reference's fixed depth)."""
    return value if isinstance(value, str) else float(value)


def prepare_out_dir(path: str | Path, overwrite: bool) -> Path:
    """Create ``path``; refuse an existing non-empty directory unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose another --out")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{path} is not empty; choose another --out, or pass --overwrite to write into it (existing run "
            "directories with the same names are replaced)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------ writing


def atomic_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_frame(path: str | Path, df: pd.DataFrame, index: bool = False) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=index))


# ------------------------------------------------------------------------------------------ ATE


def ate_transform(data) -> str:
    return "perturbseq" if data.is_count_data else "mean"


def empirical_ates(data, perturbations: Sequence[str], rows: np.ndarray | None = None) -> pd.DataFrame:
    """Empirical ATE (perturbations x genes) from the cells ``rows`` (default: every cell of the data, those
    with no split included, as the reference).

    Controls come from ``rows``; when ``rows`` holds none (a test split of combinations only), from every
    control cell with a split. Perturbations with no cell in ``rows`` are dropped from the result. Sparse
    counts are processed in row batches (never densified as a whole).
    """
    labels = np.asarray(data.labels).astype(str)
    ctrl = data.control_label
    rows = np.arange(data.n_cells) if rows is None else np.asarray(rows)
    wanted = set(map(str, perturbations))
    keep = rows[np.isin(labels[rows], list(wanted))]
    ctrl_rows = rows[labels[rows] == ctrl]
    if len(ctrl_rows) == 0:
        ctrl_rows = np.flatnonzero((labels == ctrl) & (np.asarray(data.split) != ""))
    if len(ctrl_rows) == 0:
        raise ValueError("no control cells to compute the empirical ATE against")
    sel = np.sort(np.concatenate([keep, ctrl_rows]))
    present = set(labels[keep])
    groups = [str(p) for p in perturbations if str(p) in present]
    counts = data.counts if len(sel) == data.n_cells else data.counts[sel]
    return empirical_ate(
        counts, labels[sel], ctrl, groups=groups, genes=list(data.genes), transform=ate_transform(data)
    )


def ate_scores(
    ate_true: pd.DataFrame, pred: pd.DataFrame, top_k: int = 20, suffix: str = ""
) -> dict[str, float]:
    """Pearson r and R² of a predicted ATE against an empirical one, over all (perturbation, gene) entries
    and over each perturbation's top-k genes by |empirical ATE|: ``ate_r``, ``ate_r_top<k>``, ``ate_r2``,
    ``ate_r2_top<k>``, ``ate_n`` (perturbations scored; rows with a NaN prediction are dropped), + suffix."""
    rows = [r for r in ate_true.index if r in pred.index]
    if not rows:
        return {}
    return table_scores(ate_table(ate_true.loc[rows], {"pred": pred}, top_k=top_k).loc["pred"], top_k, suffix)


def table_scores(m: pd.Series, top_k: int = 20, suffix: str = "") -> dict[str, float]:
    """The results-row names of one method's row of :func:`~pyrovae.evaluate.ate.ate_table`."""
    out = {
        "ate_r": m["pearson"],
        f"ate_r_top{top_k}": m["pearson_topk"],
        "ate_r2": m["r2"],
        f"ate_r2_top{top_k}": m["r2_topk"],
        "ate_n": m["n_perturbations"],
    }
    return {f"{k}{suffix}": float(v) for k, v in out.items()}


def ate_cell_sets(data, perturbations: Sequence[str]) -> dict[str, np.ndarray]:
    """The cell sets of the experiments' ATE check (:func:`~pyrovae.evaluate.score.score_run`'s
    ``ate_sets``): ``all``, the cells of ``perturbations`` and every control cell, those with no split
    included (the reference's empirical ATE), and ``heldout``, the same among the test cells (when some
    test cell has one of ``perturbations``)."""
    labels = np.asarray(data.labels).astype(str)
    wanted = np.isin(labels, list(map(str, perturbations)))
    chosen = wanted | (labels == data.control_label)
    sets = {"all": np.flatnonzero(chosen)}
    test = data.indices("test")
    if wanted[test].any():
        sets["heldout"] = test[chosen[test]]
    return sets


#: Display names of :func:`pyrovae.baselines.ate.baseline_ates` predictors.
BASELINE_NAMES = {
    "train_mean": "baseline: per-perturbation train mean",
    "additive": "baseline: additive (sum of singles' train means)",
    "global_mean": "baseline: global train mean",
}


# ------------------------------------------------------------------------------------------ experiment


def model_spec(settings: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What a config's settings say of one model: ``base`` (its named model: ``model_base[model]``, else
    the model's own name), ``model`` (the shared ``model`` section, then ``model_overrides[model]``) and
    ``train`` (the shared ``train`` section, then ``train_overrides[model]``)."""
    return {
        "base": (settings.get("model_base") or {}).get(model, model),
        "model": {**settings["model"], **(settings.get("model_overrides") or {}).get(model, {})},
        "train": {**settings["train"], **(settings.get("train_overrides") or {}).get(model, {})},
    }


def find_run(roots: Iterable[str | Path], seed: int, model: str) -> Path | None:
    """The first ``<root>/runs/seed<seed>/<model>`` among ``roots`` holding a trained run (best.pt)."""
    name = Path("runs") / f"seed{seed}" / model
    return next((Path(r) / name for r in roots if (Path(r) / name / "best.pt").exists()), None)


def structure_metrics(
    run, truth: dict, rows: np.ndarray, seed: int, n_samples: int = 200
) -> dict[str, float]:
    """:func:`~pyrovae.evaluate.structure.planted_structure` of a trained run: its mean latent effects
    (``n_samples`` posterior draws, seeded) and mask probabilities at the planted treatments' ``rows``."""
    model = run.model
    torch.manual_seed(seed)
    g = model.sample_globals(n_samples, untrained=run.untrained)
    effects = model.effect.effect_rows(g).mean(0).cpu().numpy()[rows]
    probs = model.effect.mask_probs()
    probs = None if probs is None else probs.cpu().numpy()[rows]
    return planted_structure(truth, effects, probs, seed=seed)


@dataclasses.dataclass
class Scored:
    """What :meth:`Experiment.fit_and_score` returns: the metrics row and the trained run."""

    metrics: dict[str, Any]
    run: Any


class Experiment:
    """One experiment: settings, output directory, data, and the results collected so far.

    Args:
        name: the script's name (config ``configs/<name>.yaml``, default output ``runs/experiments/<name>``).
        args: the parsed options of :func:`build_parser`.
    """

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.t0 = time.perf_counter()
        self.settings = load_settings(name, args.full, args.config)
        m_over, t_over, e_over = route_overrides(parse_set(args.set))
        self.settings["model"] = {**self.settings["model"], **m_over}
        self.settings["train"] = {**self.settings["train"], **t_over}
        self.settings["eval"] = {**self.settings["eval"], **e_over}
        self.seeds = [
            int(s) for s in (args.seeds if args.seeds is not None else self.settings.get("seeds", [0]))
        ]
        models = list(self.settings.get("models", []))
        if args.models:
            unknown = [m for m in args.models if m not in models]
            if unknown:
                raise ValueError(f"unknown model(s) {unknown} for {name}; the config has {models}")
            models = [m for m in models if m in args.models]
        self.models = models
        self.out = prepare_out_dir(args.out or Path("runs") / "experiments" / name, args.overwrite)
        self.results: list[dict[str, Any]] = []
        self.adata, self.source = self._read_data()
        self.options = DataOptions(
            perturbation_key=args.perturbation_key,
            control_label=args.control_label,
            layer=args.layer,
            combo_sep=args.combo_sep,
            batch_key=args.batch_key,
            covariate_keys=args.covariate_keys or (),
            size_factor_key=args.size_factor_key,
            split_key=SPLIT_COLUMN,
        )
        self._empirical_all: pd.DataFrame | None = None
        self.log(
            f"{name}: {self.source['description']}; budget {self.settings['budget']}; seeds {self.seeds}; "
            f"models {self.models}; output {self.out}"
        )

    # ---------------------------------------------------------------------------------------- data
    def _read_data(self):
        args = self.args
        if args.data:
            path = Path(args.data)
            if not path.exists():
                raise FileNotFoundError(f"no such file: {path}")
            adata = ad.read_h5ad(path)
            source = {"kind": "file", "path": str(path.resolve()), "description": f"data {path}"}
        else:
            sim_over = parse_set(args.sim_set)
            shown = "".join(f", {k}={v}" for k, v in sim_over.items())
            simulator = args.simulator
            if simulator == "sams_reference":
                adata = simulate_sams_reference(seed=args.sim_seed, **sim_over)
                what = "SAMS-VAE reference-regime simulation"
            else:
                adata = simulate_perturbseq(args.preset, seed=args.sim_seed, **sim_over)
                what = f"simulated preset {args.preset!r}"
            source = {
                "kind": "simulated",
                "simulator": simulator,
                "preset": args.preset if simulator == "perturbseq" else simulator,
                "seed": args.sim_seed,
                "overrides": sim_over,
                "description": f"{what} (seed {args.sim_seed}{shown})",
            }
        if args.gene_key:
            if args.gene_key not in adata.var.columns:
                raise ValueError(
                    f"var has no column {args.gene_key!r}; var columns are {list(adata.var.columns)}"
                )
            keep = np.asarray(adata.var[args.gene_key], dtype=bool)
            adata = adata[:, keep].copy()
            source["gene_key"] = args.gene_key
        if args.perturbation_key not in adata.obs.columns:
            raise ValueError(
                f"obs has no column {args.perturbation_key!r} with perturbation labels; obs columns are "
                f"{list(adata.obs.columns)}. Pass --perturbation-key"
            )
        adata.obs_names_make_unique()
        source.update(n_cells=int(adata.n_obs), n_genes=int(adata.n_vars))
        source["description"] += f": {adata.n_obs} cells x {adata.n_vars} genes"
        return adata, source

    def labels(self) -> tuple[np.ndarray, str]:
        """(raw per-cell labels, resolved control label)."""
        raw = self.adata.obs[self.args.perturbation_key]
        if raw.isna().any():
            raise ValueError(
                f"{int(raw.isna().sum())} cells have no label in obs[{self.args.perturbation_key!r}]"
            )
        labels = raw.astype(str).to_numpy()
        return labels, find_control_label(labels, self.args.control_label)

    def planted_truth(self) -> dict:
        """The simulation's ground truth (masks, latent effects); a clear error for data without one."""
        if "ground_truth" not in self.adata.uns:
            raise ValueError(
                "this experiment needs planted masks: the data has no uns['ground_truth']. Use the "
                "simulated dataset (no --data) or an .h5ad written by `pyrovae simulate`"
            )
        return ground_truth(self.adata)

    def combination_split(self) -> tuple[np.ndarray, list[str], np.ndarray, str]:
        """(split, held-out combination labels, raw labels, control label): the demo's split
        (:func:`~pyrovae.data.protocols.heldout_combinations_split`) when the data has combinations, else a
        stratified 80/10/10 cell split; seeded by the settings' ``split_seed``."""
        labels, ctrl = self.labels()
        _, _, canon = build_dosage(labels, ctrl, self.args.combo_sep)
        canon = np.asarray(canon).astype(str)
        seed = int(self.settings["split_seed"])
        if any(len(parse_label(x, ctrl, self.args.combo_sep)) > 1 for x in set(canon)):
            split, held = heldout_combinations_split(canon, ctrl, self.args.combo_sep, seed)
            return split, held, labels, ctrl
        split = cell_split(labels, seed=seed, test_frac=0.1, val_frac=1 / 9, stratify=True)
        return split, [], labels, ctrl

    def load(self, split: np.ndarray, encode_combos_as_unique: bool = False):
        """The data with ``split`` (an (N,) array of train/val/test/"") as its split."""
        self.adata.obs[SPLIT_COLUMN] = np.asarray(split).astype(str)
        # no model yet: continuous data loads; training refuses it with a count likelihood (train_run)
        opts = self.options.replace(encode_combos_as_unique=encode_combos_as_unique)
        return read_data(self.adata, opts, None)[0]

    # ---------------------------------------------------------------------------------------- configs
    def configs(self, model: str, seed: int, **overrides: Any):
        """(ModelConfig, TrainConfig) of a model (:func:`model_spec`, then ``overrides`` on the model
        options); training settings with ``seed``."""
        spec = model_spec(self.settings, model)
        t = {**spec["train"], "seed": int(seed)}
        cfg = model_config(spec["base"], variant=True, **{**spec["model"], **overrides})
        return cfg, TrainConfig().replace(**t)

    # ---------------------------------------------------------------------------------------- one run
    def empirical_all(self, data, perturbations: Sequence[str]) -> pd.DataFrame:
        """The reference's empirical ATE (all cells), cached across runs (it depends on the data only)."""
        have = set() if self._empirical_all is None else set(self._empirical_all.index)
        missing = [p for p in perturbations if p not in have]
        if missing:
            new = empirical_ates(data, missing)
            self._empirical_all = (
                new if self._empirical_all is None else pd.concat([self._empirical_all, new])
            )
        return self._empirical_all.loc[[p for p in perturbations if p in self._empirical_all.index]]

    def fit_and_score(
        self,
        data,
        model: str,
        model_cfg,
        train_cfg,
        run_name: str,
        ate_perturbations: Sequence[str] | None,
        tags: Mapping[str, Any],
        extra: Callable[[Any], Mapping[str, Any]] | None = None,
        prepare: Callable[[Any], None] | None = None,
    ) -> Scored:
        """Train one model on ``data`` (its split), then score it with the library's
        :func:`~pyrovae.evaluate.score.score_run`: val and test IWELBO, and the model ATE of
        ``ate_perturbations`` against the empirical ATE of all cells (``ate_r``, ...) and of the test
        cells (``ate_r_heldout``, ...); the settings of the config's ``eval`` section.

        Args:
            ate_perturbations: the perturbations whose ATE is checked (``None``: skip the ATE).
            tags: columns identifying the run in the results (model, fraction, seed, ...).
            extra: ``run -> {metric: value}``, further metrics of the run (e.g. GRN recovery).
            prepare: ``model -> None``, called on the built model before training (e.g. fixing masks).

        Returns:
            :class:`Scored` with the metrics row (tags + metrics + timings) also appended to the results.
        """
        ev = self.settings["eval"]
        k = int(ev["top_k"])
        t0 = time.perf_counter()
        run = train_run(
            data,
            model_cfg,
            train_cfg,
            self.out / "runs" / run_name,
            data_options=self.options.to_dict(),
            overwrite=True,
            progress=self.args.progress,
            prepare=prepare,
        )
        t_train = time.perf_counter() - t0
        hist = run.metrics()
        row: dict[str, Any] = {**tags, "model": tags.get("model", model)}
        row.update(
            n_train=len(data.indices("train")),
            n_val=len(data.indices("val")),
            n_test=len(data.indices("test")),
            epochs=int(hist[-1]["epoch"]) if hist else 0,
            steps=int(hist[-1]["step"]) if hist and "step" in hist[-1] else 0,
            best_val_loss=float(min((h.get("val_loss", np.inf) for h in hist), default=np.nan)),
        )
        sets = ate_cell_sets(data, ate_perturbations) if ate_perturbations else {}
        marks: dict[str, float] = {}
        res = score_run(
            run,
            data,
            ate_sets=sets,
            iwelbo_sets={s: s for s in ("val", "test") if len(data.indices(s))},
            name="model",
            top_k=k,
            n_samples=int(ev["ate_samples"]),
            library_size=eval_library(ev["library_size"]),
            seed=int(ev["eval_seed"]),
            chunk=int(ev["ate_chunk"]),
            iwelbo_seeds=(int(ev["eval_seed"]),),
            n_particles=int(ev["iwelbo_particles"]),
            batch_size=int(ev["iwelbo_batch_size"]),
            baselines=False,  # only the model's row is read here; scripts score their baselines apart
            log=lambda msg: marks.setdefault(
                "ate" if msg.startswith("ATE") else "iwelbo", time.perf_counter()
            ),
        )
        t_end = time.perf_counter()
        for split, r in res.iwelbo["model"].items():
            row[f"{split}_iwelbo"] = r["mean"]
        for set_name, rep in res.ate.items():
            row.update(table_scores(rep.table.loc["model"], k, "" if set_name == "all" else "_heldout"))
        t_ate = marks.get("ate", t_end)
        row.update(
            train_s=round(t_train, 2),
            iwelbo_s=round(t_ate - marks.get("iwelbo", t_ate), 2),
            ate_s=round(t_end - t_ate, 2),
        )
        if extra is not None:
            row.update(extra(run))
        self.record(row)
        shown = ", ".join(
            f"{k} {row[k]:.3f}"
            for k in ("test_iwelbo", "ate_r", "ate_r_top20")
            if k in row and row[k] == row[k]
        )
        self.log(f"  {run_name}: {shown} ({row['epochs']} epochs, {time.perf_counter() - t0:.1f}s)")
        return Scored(row, run)

    def score_baselines(
        self, data, perturbations: Sequence[str], tags: Mapping[str, Any], which: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Score the trivial ATE baselines (training cells only, no model) like a model; one results row each
        (``model`` = the baseline's display name, ATE metrics only)."""
        k = int(self.settings["eval"]["top_k"])
        preds = baseline_ates(data, list(perturbations), transform=ate_transform(data))
        truth_all = self.empirical_all(data, perturbations)
        test_rows = data.indices("test")
        truth_test = empirical_ates(data, perturbations, test_rows) if len(test_rows) else None
        out = []
        for name, pred in preds.items():
            if which is not None and name not in which:
                continue
            row = {**tags, "model": BASELINE_NAMES.get(name, name)}
            row.update(ate_scores(truth_all, pred, k))
            if truth_test is not None:
                row.update(ate_scores(truth_test, pred, k, suffix="_heldout"))
            self.record(row)
            out.append(row)
        return out

    # ---------------------------------------------------------------------------------------- results
    def record(self, row: Mapping[str, Any]) -> None:
        """Append a results row and rewrite ``results.csv`` (so partial results survive an interruption)."""
        self.results.append(dict(row))
        write_frame(self.out / "results.csv", pd.DataFrame(self.results))

    def results_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.results)

    def write_table(
        self,
        stem: str,
        table: pd.DataFrame,
        title: str,
        notes: Iterable[str] = (),
        raw: pd.DataFrame | None = None,
    ) -> str:
        """Write ``<stem>.csv`` (``raw`` if given, else ``table``) and ``<stem>.md`` (title, table, notes)."""
        write_frame(self.out / f"{stem}.csv", raw if raw is not None else table)
        md = f"## {title}\n\n{markdown_table(table, index=False)}\n"
        notes = list(notes)
        if notes:
            md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        atomic_text(self.out / f"{stem}.md", md)
        return md

    def finish(self, extra: Mapping[str, Any] | None = None) -> float:
        """Write ``experiment.json`` (options, settings, data source, versions, wall time)."""
        wall = time.perf_counter() - self.t0
        info = {
            "experiment": self.name,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "options": vars(self.args),
            "settings": self.settings,
            "models": self.models,
            "seeds": self.seeds,
            "data": self.source,
            "n_runs": len(self.results),
            "wall_seconds": round(wall, 1),
            "versions": {
                "pyrovae": pyrovae.__version__,
                "torch": torch.__version__,
                "pyro": pyro.__version__,
                "python": platform.python_version(),
            },
            **(extra or {}),
        }
        write_json(self.out / "experiment.json", info)
        self.log(f"{self.name}: done in {wall:.0f}s; tables and figures in {self.out}")
        return wall

    @staticmethod
    def log(msg: str) -> None:
        print(msg, flush=True)
