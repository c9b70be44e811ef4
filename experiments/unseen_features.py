"""Unseen perturbations predicted from gene features (issue 28): the feature prior against every baseline.

Split: for each dataset (simulated GRN shapes, or ``--data``), ``--n-sets`` held-out sets of
``--n-heldout`` single perturbations whose targets are measured genes (drawn with ``--set-seed``); every cell
of a held-out perturbation moves to the test split (:func:`pyrovae.data.prepare.holdout_perturbations`), the
rest is the data layer's seeded 80/10/10 cell split. Models (``--models``; ``+data``: ``gene_features=data``,
the target gene's loading in a PCA of the training pseudobulk; ``+table``: a planted gene-embedding table,
simulations only, see below): each trained with every training seed, all scored together by the library's
:func:`~pyrovae.evaluate.score.score_run` on the test cells (so every model sees the same empirical ATE and
baselines: zero effect, seen mean, the PCA + ridge linear model, own knock-down through the |DE| and the
deconvolved GRNs; the same model without features is the control).

Summary (``summary.md``, mean ± sd over held-out sets x seeds):

- unseen singles: ATE Pearson r and MSE (all genes pooled) of every model and baseline;
- seen perturbations (their held-out test cells): ATE r and test IWELBO per model, and the paired
  difference of each ``+data`` model to its model without features.

``+table`` (simulated data only): a gene x dimension table whose row of gene t is the simulation's planted
latent effect of perturbing t (``uns["ground_truth"]["latent_effects"]``) in a random rotation plus noise
(sd ``--table-noise`` relative to the effects' sd): the case where the features determine the effects (an
oracle-like embedding, which no baseline reads; it shows what the prior does with informative features).

Usage::

    python -m experiments.unseen_features --out runs/exp/unseen --shapes chain fork --seeds 0 1 2
    python -m experiments.unseen_features --out runs/exp/unseen_papalexi --data papalexi2021 \
        --models cpa_vae cpa_vae+data sams_vae sams_vae+data
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import pyrovae.datasets
from experiments.common import atomic_text, prepare_out_dir, write_frame
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.prepare import holdout_perturbations, ordered, prepare_data
from pyrovae.evaluate.ate import ate_table
from pyrovae.evaluate.score import score_run
from pyrovae.models.zoo import data_requirements, model_config
from pyrovae.predict.iwelbo import predictive_iwelbo
from pyrovae.report import markdown_table
from pyrovae.runs.run import load_run, train_run
from pyrovae.simulate.perturbseq import ground_truth, simulate_perturbseq
from pyrovae.train.trainer import TrainConfig

MODELS = ("cpa_vae", "cpa_vae+data", "cpa_vae+table", "sams_vae", "sams_vae+data", "gpo_vae", "gpo_vae+data")
#: the simulation (smaller than the default preset: singles only)
SIM = {"n_genes": 120, "n_doubles": 0, "n_control_cells": 600, "cells_per_single": 80}
MODEL_SETTINGS = {"n_latent": 10, "decoder_hidden": 64, "encoder_hidden": 64, "embedding_encoder_hidden": 64}
TRAIN_SETTINGS = {"lr": 0.005, "batch_size": 256, "max_epochs": 80, "patience": 80, "n_particles": 2}


def planted_table(adata, noise: float, seed: int) -> pd.DataFrame:
    """The planted latent effects of the simulation's perturbed genes, rotated, plus noise (see above)."""
    gt = ground_truth(adata)
    eff = np.asarray(gt["latent_effects"], dtype=np.float64)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((eff.shape[1], eff.shape[1])))
    x = eff @ q + noise * eff.std() * rng.standard_normal(eff.shape)
    return pd.DataFrame(x, index=[str(t) for t in gt["treatments"]])


def heldout_sets(data, n_sets: int, n_heldout: int, seed: int) -> list[list[str]]:
    """``n_sets`` disjoint sets of single perturbations whose target is a measured gene."""
    genes = {str(g) for g in data.genes}
    cand = sorted(t for t in map(str, data.treatments) if t in genes)
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(cand))
    if len(order) < n_sets * n_heldout:
        raise ValueError(f"{len(cand)} targets are measured genes: too few for {n_sets} sets of {n_heldout}")
    return [sorted(order[i * n_heldout : (i + 1) * n_heldout]) for i in range(n_sets)]


def model_cfg(spec: str, table: Path | None, overrides: dict):
    name, _, feat = spec.partition("+")
    extra = {}
    if feat == "data":
        extra = {"gene_features": "data"}
    elif feat == "table":
        extra = {"gene_features": "table", "gene_features_file": str(table)}
    elif feat:
        raise ValueError(f"unknown feature variant {feat!r} in {spec!r}")
    return model_config(name, **{**MODEL_SETTINGS, **overrides, **extra})


def one_split(
    args, adata, dataset: str, held: list[str], set_id: int, seed: int, out: Path, table: Path | None
):
    """Train every model on one split and seed; the rows of the unseen and seen tables."""
    data = holdout_perturbations(load_perturbation_data(adata, split_seed=seed), held)
    specs = [s for s in args.models if table is not None or not s.endswith("+table")]
    cfgs = {s: model_cfg(s, table, args.model_set) for s in specs}
    # every model's data needs at once (GPO-VAE's pairing, QC flags), so that all are scored on one data
    reqs = ordered([r for c in cfgs.values() for r in data_requirements(c)])
    data = prepare_data(data, reqs, {"split_seed": seed})
    runs, times = {}, {}
    for spec, cfg in cfgs.items():
        tcfg = TrainConfig().replace(**{**TRAIN_SETTINGS, **args.train_set, "seed": seed})
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs[spec] = train_run(
                data,
                cfg,
                tcfg,
                out / "runs" / f"{dataset}_s{set_id}_seed{seed}_{spec}",
                overwrite=True,
                progress=False,
            )
        times[spec] = time.perf_counter() - t0
        hist = runs[spec].metrics()
        print(
            f"  {dataset} set {set_id} seed {seed} {spec}: {len(hist)} epochs, val loss "
            f"{hist[-1]['val_loss']:.3f} (first {hist[0]['val_loss']:.3f}), {times[spec]:.0f}s",
            flush=True,
        )
    first, *rest = list(runs)
    test = data.indices("test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = score_run(
            runs[first],
            data,
            ate_sets={"test": test},
            iwelbo_sets={"test": "test", "seen": seen_rows_of(data, held)},
            name=first,
            others={k: runs[k] for k in rest},
            n_samples=args.ate_samples,
            n_particles=args.iwelbo_particles,
            iwelbo_seeds=(0,),
            seed=0,
        )
    rep = res.ate["test"]
    tags = {"dataset": dataset, "set": set_id, "seed": seed, "heldout": ",".join(held)}
    unseen_rows = []
    for method, row in rep.unseen_table.loc["unseen singles"].iterrows():
        unseen_rows.append(
            {
                **tags,
                "method": method,
                "pearson": row["pearson"],
                "mse": row["mse"],
                "n": row["n_perturbations"],
            }
        )
    seen = [p for p in rep.ate_true.index if p not in set(rep.unseen) and p != data.control_label]
    seen_tab = ate_table(rep.ate_true.loc[seen], {k: rep.preds[k].loc[seen] for k in runs})
    seen_rows = []
    for spec in runs:
        seen_rows.append(
            {
                **tags,
                "model": spec,
                "ate_r": seen_tab.loc[spec, "pearson"],
                "ate_mse": seen_tab.loc[spec, "mse"],
                "test_iwelbo": res.iwelbo[spec]["test"]["mean"],
                "seen_test_iwelbo": res.iwelbo[spec]["seen"]["mean"],
                "train_s": times[spec],
                "epochs": len(runs[spec].metrics()),
            }
        )
    return unseen_rows, seen_rows


def seen_rows_of(data, held: list[str]) -> np.ndarray:
    """The test cells whose label has no held-out (unseen) member: the seen perturbations' held-out cells
    and the test controls (the IWELBO of seen perturbations, without the unseen cells' prior draws)."""
    test = data.indices("test")
    labels = np.asarray(data.labels)[test].astype(str)
    unseen = set(held)
    keep = [not (set(lab.split(data.sep)) & unseen) for lab in labels]
    return test[np.asarray(keep, dtype=bool)]


def rescore_seen_iwelbo(out: Path, adata, particles: int) -> None:
    """Add ``seen_test_iwelbo`` to ``out/seen.csv`` from the stored runs (results written before it)."""
    seen = pd.read_csv(out / "seen.csv")
    vals = []
    for row in seen.itertuples():
        run = load_run(out / "runs" / f"{row.dataset}_s{row.set}_seed{row.seed}_{row.model}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = run.load_data(adata)
            rows = seen_rows_of(data, str(row.heldout).split(","))
            frame = predictive_iwelbo(
                run.model, data, rows, seed=0, n_particles=particles, untrained=run.untrained
            )
        vals.append(float(frame["iwelbo"].mean()))
        print(
            f"  {row.dataset} set {row.set} seed {row.seed} {row.model}: seen IWELBO {vals[-1]:.3f}",
            flush=True,
        )
    seen["seen_test_iwelbo"] = vals
    write_frame(out / "seen.csv", seen)


def mean_sd(frame: pd.DataFrame, by: list[str], cols: list[str]) -> pd.DataFrame:
    g = frame.groupby(by, sort=False)[cols]
    m, s = g.mean(), g.std()
    out = pd.DataFrame(index=m.index)
    for c in cols:
        out[c] = [f"{a:.3f} ± {b:.3f}" for a, b in zip(m[c], s[c])]
    out["n"] = g.size()
    return out


def summarise(unseen: pd.DataFrame, seen: pd.DataFrame) -> str:
    parts = ["# Unseen perturbations from gene features\n"]
    parts.append("## Unseen singles (ATE of the held-out test cells; mean ± sd over held-out sets x seeds)\n")
    parts.append(
        markdown_table(mean_sd(unseen, ["dataset", "method"], ["pearson", "mse"]).reset_index(), index=False)
    )
    parts.append("\n## Seen perturbations (their held-out test cells) and test IWELBO\n")
    # test_iwelbo: every test cell (the unseen ones' rows drawn from the prior); seen_test_iwelbo: the test
    # cells whose label has no unseen member
    iw = [c for c in ("test_iwelbo", "seen_test_iwelbo") if c in seen.columns]
    parts.append(
        markdown_table(
            mean_sd(seen, ["dataset", "model"], ["ate_r", "ate_mse", *iw]).reset_index(),
            index=False,
        )
    )
    diffs = []
    for spec in seen["model"].unique():
        if "+" not in spec:
            continue
        base = spec.split("+")[0]
        a = seen[seen["model"] == spec].set_index(["dataset", "set", "seed"])
        b = seen[seen["model"] == base].set_index(["dataset", "set", "seed"])
        d = (a[["ate_r", *iw]] - b[["ate_r", *iw]]).dropna().reset_index()
        d["model"] = f"{spec} - {base}"
        diffs.append(d)
    if diffs:
        parts.append("\n## Seen: paired difference with features minus without\n")
        d = pd.concat(diffs)
        parts.append(
            markdown_table(mean_sd(d, ["dataset", "model"], ["ate_r", *iw]).reset_index(), index=False)
        )
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--data", default=None, help="a shipped dataset name (papalexi2021) or an .h5ad")
    p.add_argument("--shapes", nargs="+", default=["chain", "fork"], help="GRN shapes of the simulations")
    p.add_argument("--sim-seed", type=int, default=0)
    p.add_argument("--preset", default="default", help="simulated preset (SIM's sizes apply to 'default')")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-sets", type=int, default=2)
    p.add_argument("--n-heldout", type=int, default=4)
    p.add_argument("--set-seed", type=int, default=0)
    p.add_argument("--only-sets", type=int, nargs="+", default=None, help="run only these held-out sets")
    p.add_argument("--table-noise", type=float, default=0.5)
    p.add_argument("--ate-samples", type=int, default=500)
    p.add_argument("--iwelbo-particles", type=int, default=20)
    p.add_argument(
        "--rescore-seen-iwelbo",
        action="store_true",
        help="add the seen test cells' IWELBO to an existing --out of one dataset (its runs), then summarise",
    )
    p.add_argument("--model-set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--train-set", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    args.model_set = dict(kv.split("=", 1) for kv in args.model_set)
    args.train_set = dict(kv.split("=", 1) for kv in args.train_set)
    torch.set_num_threads(1)
    out = Path(args.out) if args.rescore_seen_iwelbo else prepare_out_dir(args.out, args.overwrite)
    datasets = []
    if args.data is None:
        for shape in args.shapes:
            cfg = dict(SIM if args.preset == "default" else {"n_doubles": 0}, grn_shape=shape)
            adata = simulate_perturbseq(args.preset, seed=args.sim_seed, **cfg)
            tab = out / f"planted_table_{shape}.csv"
            if not args.rescore_seen_iwelbo:
                planted_table(adata, args.table_noise, args.sim_seed).to_csv(tab)
            datasets.append((f"sim_{shape}", adata, tab))
    else:
        adata = getattr(pyrovae.datasets, args.data)() if hasattr(pyrovae.datasets, args.data) else args.data
        if isinstance(adata, str):
            import anndata as ad  # noqa: PLC0415

            adata = ad.read_h5ad(adata)
        datasets.append((Path(str(args.data)).stem, adata, None))
    t0 = time.perf_counter()
    if args.rescore_seen_iwelbo:
        if len(datasets) != 1:
            raise ValueError("--rescore-seen-iwelbo reads one dataset's --out (one --shapes or --data)")
        rescore_seen_iwelbo(out, datasets[0][1], args.iwelbo_particles)
        text = summarise(pd.read_csv(out / "unseen.csv"), pd.read_csv(out / "seen.csv"))
        atomic_text(out / "summary.md", text)
        print(text)
        return 0
    unseen, seen = [], []
    for name, adata, tab in datasets:
        sets = heldout_sets(load_perturbation_data(adata), args.n_sets, args.n_heldout, args.set_seed)
        for i, held in enumerate(sets):
            if args.only_sets is not None and i not in args.only_sets:
                continue
            for seed in args.seeds:
                u, s = one_split(args, adata, name, held, i, seed, out, tab)
                unseen += u
                seen += s
                write_frame(out / "unseen.csv", pd.DataFrame(unseen))
                write_frame(out / "seen.csv", pd.DataFrame(seen))
    text = summarise(pd.DataFrame(unseen), pd.DataFrame(seen))
    cmd = "python -m experiments.unseen_features " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_text(out / "summary.md", text + f"\nCommand: `{cmd}` ({time.perf_counter() - t0:.0f} s)\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
