"""``pyrovae demo --dataset NAME``: the main job on real cells of an embedded screen (no download).

1. Load the embedded dataset (:mod:`pyrovae.datasets`; e.g. ``papalexi2021``: 16,093 THP-1 cells, 25
   knock-outs, 3 replicates) with its data options (the replicate as batch, a size factor where the file
   has one) and write it into the output directory (``data.h5ad``, with the split column).
2. Split the cells 64/16/20 into train/val/test, stratified by perturbation and batch / covariate level
   (seeded): every perturbation is seen in training; the test cells are held out.
3. Train SAMS-VAE and CPA-VAE (the zoo's ``sams_vae`` and ``cpa_vae``, the demo's training settings) into
   ``sams_vae/`` and ``cpa_vae/``.
4. Evaluate on the held-out test cells: test IWELBO (Monte Carlo spread over evaluation seeds), ATE metrics
   of the model sampled at the test cells' own depths and batches against the trivial baselines fitted on
   the training cells (no change, training mean, mean of all perturbed cells, ...) and the noise ceiling of
   the test cells themselves.
5. Print one comparison table and write it (``comparison.csv``, ``comparison.md``), the detailed tables, a
   ``summary.json`` and the figures (training curves, ATE scatter).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pyrovae.commands.common import command_device
from pyrovae.data.protocols import cell_split
from pyrovae.datasets import DATASETS
from pyrovae.evaluate.score import score_run
from pyrovae.models.zoo import model_config
from pyrovae.outputs import atomic_write, fresh_output_dir, write_json
from pyrovae.plot import plot_ate_scatter, plot_training_curves
from pyrovae.predict.conditions import MATCHED
from pyrovae.report import markdown_table, mean_std
from pyrovae.runs import train_run
from pyrovae.setup import read_data
from pyrovae.train.trainer import TrainConfig

#: the training settings of the simulated demo (lr 2e-3 on batches of 256, 3 particles), for at least
#: REAL_MIN_STEPS steps; on papalexi2021 (10,300 training cells) REAL_EPOCHS epochs are 1,600 steps
REAL_TRAIN = dict(lr=2e-3, mask_lr=0.02, batch_size=256, n_particles=3, patience=10, val_particles=3)
REAL_EPOCHS, REAL_MIN_STEPS = 40, 1500
REAL_MODELS = (("SAMS-VAE", "sams_vae"), ("CPA-VAE", "cpa_vae"))
REAL_N_LATENT = 10
SPLIT_COLUMN = "demo_split"
IWELBO_PARTICLES, IWELBO_SEEDS = 50, (0, 1, 2)
ATE_SAMPLES, TOP_K = 2500, 20


def real_split(obs: pd.DataFrame, keys: list[str], seed: int) -> np.ndarray:
    """(N,) train / val / test, 64 / 16 / 20 within every group of the obs columns ``keys`` (seeded)."""
    groups = obs[keys].astype(str).agg("|".join, axis=1).to_numpy()
    return cell_split(groups, seed=seed, stratify=True)


def run_real(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    device = command_device(args)
    out = fresh_output_dir(args.out, "demo", args.overwrite)
    log = print if not args.quiet else (lambda *a, **k: None)
    dataset = DATASETS[args.dataset]

    # ------------------------------------------------------------------------ data: load, split, write
    adata = dataset.load()
    options: dict[str, Any] = {**dataset.data_options, "split_key": SPLIT_COLUMN}
    levels = [k for k in (options.get("batch_key"), *options.get("covariate_keys", [])) if k]
    adata.obs[SPLIT_COLUMN] = pd.Categorical(real_split(adata.obs, ["perturbation", *levels], args.seed))
    atomic_write(out / "data.h5ad", lambda tmp: adata.write_h5ad(tmp))

    # ------------------------------------------------------------------------------------ training
    runs, seconds, data = {}, {}, None
    for label, name in REAL_MODELS:
        cfg = model_config(name, n_latent=REAL_N_LATENT)
        data, opts = read_data(adata, options, cfg, model_name=name)
        steps_per_epoch = -(-len(data.indices("train")) // REAL_TRAIN["batch_size"])
        epochs = args.epochs or max(REAL_EPOCHS, -(-REAL_MIN_STEPS // steps_per_epoch))
        tcfg = TrainConfig(max_epochs=epochs, seed=args.seed, device=device, **REAL_TRAIN)
        if label == REAL_MODELS[0][0]:
            log(f"{args.dataset}: {data!r}; data options {opts.to_dict()}")
        log(f"training {label} ({epochs} epochs, lr {tcfg.lr}, batch {tcfg.batch_size})")
        ts = time.perf_counter()
        runs[label] = train_run(
            data, cfg, tcfg, out / name, data_options=opts.to_dict(), progress=not args.quiet, model_name=name
        )
        seconds[label] = time.perf_counter() - ts

    # ---------------------------------------------------------------------------------- evaluation
    test = data.indices("test")
    first, *others = list(runs)
    scores = score_run(
        runs[first],
        data,
        ate_sets={"held-out cells": test},
        iwelbo_sets={"held-out cells": test},
        name=first,
        others={o: runs[o] for o in others},
        top_k=TOP_K,
        n_samples=ATE_SAMPLES,
        library_size=MATCHED,
        seed=args.seed,
        iwelbo_seeds=IWELBO_SEEDS,
        n_particles=IWELBO_PARTICLES,
        log=log,
    )
    rep = scores.ate["held-out cells"]
    table = rep.table
    ceiling = rep.get("ceiling")
    if ceiling is not None:  # the test cells' agreement with themselves, beside the models
        table = pd.concat([table, ceiling[[c for c in table.columns if c in ceiling.columns]]])
    rows = []
    for m in table.index:
        res = scores.iwelbo.get(m, {}).get("held-out cells")
        row = {"method": m}
        row["test IWELBO"] = mean_std(res["mean"], res["std"], "{:.2f}") if res else "–"
        for col, short in (("pearson", "ATE r"), ("pearson_topk", f"ATE r top{TOP_K}"), ("mse", "ATE MSE")):
            row[short] = mean_std(float(table.loc[m, col]), fmt="{:.4f}" if col == "mse" else "{:.3f}")
        rows.append(row)
    comparison = pd.DataFrame(rows).set_index("method")
    table_md = markdown_table(comparison)
    notes = (
        f"{args.dataset}: held-out test cells (64/16/20 split stratified by perturbation and "
        f"{', '.join(levels) or 'nothing else'}). ATE: perturbseq transform"
        f"{' with the size factor' if options.get('size_factor_key') else ''}; model sampled at the test "
        f"cells' own depths and levels ({rep.conditions}), {ATE_SAMPLES} samples; top{TOP_K}: the genes "
        "of "
        "largest |empirical ATE| per perturbation. Baselines use training cells only; noise_ceiling: a "
        "same-size replicate experiment, perfect_predictor: a noiseless prediction of the true effects. "
        "IWELBO: nats per cell, "
        f"mean ± Monte Carlo sd over evaluation seeds {list(IWELBO_SEEDS)}, {IWELBO_PARTICLES} particles."
    )
    atomic_write(out / "comparison.csv", lambda tmp: comparison.to_csv(tmp))
    atomic_write(
        out / "comparison.md",
        lambda tmp: Path(tmp).write_text(
            f"# pyrovae demo ({args.dataset}, seed {args.seed})\n\n{table_md}\n\n{notes}\n"
        ),
    )
    atomic_write(out / "ate_metrics.csv", lambda tmp: table.to_csv(tmp))
    atomic_write(out / "ate_per_perturbation.csv", lambda tmp: rep.per_perturbation.to_csv(tmp, index=False))
    figures = []
    try:
        figures.append(
            plot_training_curves({k: r.metrics() for k, r in runs.items()}, out / "training_curves.png")
        )
        preds = {k: v for k, v in rep.preds.items() if k in runs or k == "train_mean"}
        figures.append(plot_ate_scatter(rep.ate_true, preds, rep.table, out / "ate_scatter.png", top_k=TOP_K))
    except ImportError as err:
        log(f"(no figures: {err})")
    wall = time.perf_counter() - t0
    write_json(
        out / "summary.json",
        {
            "dataset": args.dataset,
            "data_options": options,
            "seed": args.seed,
            "train_settings": REAL_TRAIN,
            "torch_threads": torch.get_num_threads(),
            "device": device,
            "train_seconds": seconds,
            "wall_seconds": wall,
            "iwelbo": scores.iwelbo_summary,
            "comparison": comparison.reset_index().to_dict(orient="records"),
            "figures": [str(f) for f in figures],
            "notes": notes,
        },
    )
    print()
    print(table_md)
    print()
    print(notes)
    print(f"\nwrote {out}/; wall time {wall / 60:.1f} min ({wall:.0f} s)")
    return 0
