"""``pyrovae demo --model gpo``: GPO-VAE's two promises on a simulated screen with a planted GRN.

1. Simulate the preset (``--grn-shape``: the planted network, :data:`pyrovae.simulate.GRN_SHAPES`) and
   hold out :data:`N_HELDOUT` perturbed genes, chosen with the seed: every cell that received one of them
   (combinations included) goes to ``test``, so the model never sees them (``pyrovae train
   --holdout-perturbations``); the other cells are split 80/10/10 by cell.
2. Prepare the data as ``pyrovae train --model gpo_vae`` does (QC flags from the simulated truth, OT pairing
   with controls, delta_x) and train GPO-VAE (the zoo's ``gpo_vae``, with :data:`DEMO_GPO_MODEL` and
   :data:`DEMO_GPO_TRAIN` for the demo's budget) into ``gpo_vae/``.
3. GRN recovery: the edge probabilities sigma(W) against the planted GRN, self-loops and the held-out
   genes excluded (no method has data on their edges), on the perturbed -> perturbed and
   perturbed -> extended blocks (AUPRC, AUROC, precision at the true edge count),
   next to ``|DE|``, deconvolved DE, the OT-paired DE (GPO-VAE's alignment target without the model),
   ``|correlation|`` and random (:func:`pyrovae.evaluate.grn_export.score_run_grn`).
4. Unseen perturbations: the ATE of the held-out genes' test cells (:func:`pyrovae.evaluate.score.score_ate`,
   as ``pyrovae ate``): GPO-VAE's prediction (its ``untrained_method``, stated in the table), GPO-VAE with
   prior draws on those rows, zero effect, the seen perturbations' mean effect and the gene's own
   knock-down pushed through the ``|DE|`` and the deconvolved GRN.
5. Print both tables (Markdown) and write them (``grn_recovery.csv``, ``unseen_ate.csv``,
   ``comparison_gpo.md``) and a ``summary.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pyrovae.commands.common import command_device
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.prepare import prepare_data
from pyrovae.evaluate.grn_export import score_run_grn
from pyrovae.evaluate.score import score_ate
from pyrovae.models.zoo import data_requirements, model_config
from pyrovae.outputs import atomic_write, fresh_output_dir, write_json
from pyrovae.report import markdown_table
from pyrovae.runs import train_run
from pyrovae.simulate import CONTROL_LABEL, ground_truth, simulate_perturbseq
from pyrovae.train.trainer import TrainConfig

#: held-out perturbed genes (never trained on) and the demo's training budget (about 1 CPU-minute on the
#: default preset): the settings of the GPO-VAE measurements in experiments/README.md (lr 2e-3, batch 512,
#: 3 particles, 40 epochs; threshold c = 0.65 on the simulator's delta_x scale; W's own learning rate
#: mask_lr 0.02, since with few steps Adam caps W near lr x steps).
N_HELDOUT = 2
DEMO_GPO_TRAIN = dict(lr=2e-3, mask_lr=0.02, batch_size=512, n_particles=3, val_particles=3, patience=20)
DEMO_GPO_MODEL = dict(grn_threshold=0.65)
DEMO_GPO_EPOCHS = {"tiny": 20, "default": 40, "large": 3}
DEMO_GPO_ATE_SAMPLES = {"tiny": 300, "default": 1000, "large": 1000}
GRN_METHODS = {
    "gpo_vae": "GPO-VAE sigma(W)",
    "de": "|DE|",
    "deconvolved_de": "deconvolved DE",
    "paired_de": "OT-paired DE (no model)",
    "correlation": "|correlation|",
    "random": "random",
}
GRN_BLOCKS = {"perturbed": "P->P", "perturbed->extended": "P->E"}
UNSEEN_METHODS = {
    "zero_effect": "zero effect",
    "seen_mean": "mean of seen perturbations",
    "grn_de": "own knock-down through |DE| GRN",
    "grn_deconvolved": "own knock-down through deconvolved GRN",
}


def heldout_genes(treatments: list[str], seed: int, n: int = N_HELDOUT) -> list[str]:
    """``n`` perturbed genes chosen with ``seed`` (sorted)."""
    if len(treatments) <= n:
        raise ValueError(f"the demo holds out {n} perturbed genes and needs more than {n}")
    return sorted(np.random.default_rng(seed).choice(treatments, size=n, replace=False).tolist())


def without_genes(truth: dict, genes: list[str]) -> dict:
    """The planted GRN restricted to the GRN genes not in ``genes`` (``grn_genes``, ``grn_adjacency``)."""
    drop = set(genes)
    keep = [i for i, g in enumerate(truth["grn_genes"]) if str(g) not in drop]
    adj = np.asarray(truth["grn_adjacency"])[np.ix_(keep, keep)]
    return {**truth, "grn_genes": [str(truth["grn_genes"][i]) for i in keep], "grn_adjacency": adj}


def grn_table(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per method, AUPRC / AUROC / precision at the true edge count per block."""
    rows = []
    for method, label in GRN_METHODS.items():
        part = scores[scores["method"] == method].set_index("block")
        if part.empty:
            continue
        row: dict = {"method": label}
        for block, short in GRN_BLOCKS.items():
            for col, name in (("auprc", "AUPRC"), ("auroc", "AUROC"), ("precision_at_k", "prec@k")):
                v = part[col].get(block, np.nan) if col in part else np.nan
                row[f"{name} {short}"] = float(v) if pd.notna(v) else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def unseen_table(rep: dict, model_label: str) -> pd.DataFrame:
    """Pearson r and MSE of each method on the unseen singles (all genes pooled), method stated."""
    table = rep.unseen_table
    group = "unseen singles" if "unseen singles" in table.index.get_level_values("group") else "all unseen"
    part = table.xs(group, level="group")
    labels = {
        model_label: f"GPO-VAE ({rep.untrained_method})",
        f"{model_label}_prior_draw": "GPO-VAE (prior_draw)",
        **UNSEEN_METHODS,
    }
    rows = [
        {"method": label, "ATE r": float(part.loc[m, "pearson"]), "ATE MSE": float(part.loc[m, "mse"])}
        for m, label in labels.items()
        if m in part.index
    ]
    return pd.DataFrame(rows).set_index("method")


def run_gpo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    device = command_device(args)
    out = fresh_output_dir(args.out, "demo", args.overwrite)  # replaces only a demo pyrovae wrote
    log = print if not args.quiet else (lambda *a, **k: None)

    sim = {"grn_shape": args.grn_shape} if args.grn_shape else {}
    adata = simulate_perturbseq(args.preset, seed=args.seed, **sim)
    truth = ground_truth(adata)
    held = heldout_genes(list(truth["treatments"]), args.seed)
    atomic_write(out / "data.h5ad", lambda tmp: adata.write_h5ad(tmp))
    opts = {
        "perturbation_key": "perturbation",
        "control_label": CONTROL_LABEL,
        "split_seed": args.seed,
        "holdout_perturbations": held,
        "qc_key": "low_quality",
    }
    cfg = model_config("gpo_vae", **DEMO_GPO_MODEL)
    data = load_perturbation_data(adata, perturbation_key="perturbation", split_seed=args.seed)
    # what the model declares it needs, prepared once: train_run keeps prepared data as it is, and the
    # scores below read the same data (the GRN nodes as treatments, ΔX, QC)
    data = prepare_data(data, data_requirements(cfg), opts)
    shape = args.grn_shape or adata.uns["simulation_config"].get("grn_shape", "random")
    log(
        f"simulated {args.preset!r} (seed {args.seed}, GRN shape {shape}): {data.n_cells} cells x "
        f"{data.n_genes} genes, {data.n_treatments} GRN nodes; held-out perturbations (test only): "
        f"{', '.join(held)}"
    )

    epochs = args.epochs or DEMO_GPO_EPOCHS.get(args.preset, 20)
    tcfg = TrainConfig(max_epochs=epochs, seed=args.seed, device=device, **DEMO_GPO_TRAIN)
    log(f"training GPO-VAE ({epochs} epochs, lr {tcfg.lr}, batch {tcfg.batch_size})")
    ts = time.perf_counter()
    run = train_run(data, cfg, tcfg, out / "gpo_vae", data_options=opts, progress=not args.quiet)
    train_s = time.perf_counter() - ts

    # the held-out genes' rows have no data for any method (GPO-VAE's are untrained), so they are left out
    scores = score_run_grn(run, without_genes(truth, held), data, baselines=True, split="train")
    grn = grn_table(scores)
    n_samples = DEMO_GPO_ATE_SAMPLES.get(args.preset, 1000)
    rep = score_ate(run, data, data.indices("test"), name="gpo_vae", n_samples=n_samples, seed=args.seed)
    unseen = unseen_table(rep, "gpo_vae")
    notes = (
        f"GRN: sigma(W) and the baselines against the planted {shape} GRN, self-loops excluded; P->P = "
        "perturbed -> perturbed genes, P->E = perturbed -> extended genes, the held-out genes left out "
        "(no method has data on their edges); prec@k = precision at the block's true edge count; "
        "baselines from training cells. Unseen: held-out "
        f"{', '.join(held)} (no training cell); ATE r / MSE between predicted and empirical ATE of their "
        f"test cells (perturbseq transform, all genes pooled; {n_samples} model samples); GPO-VAE predicts "
        f"them by {rep.untrained_method}; zero effect has no r (a constant prediction)."
    )
    md = (
        f"# pyrovae demo: GPO-VAE ({args.preset} preset, seed {args.seed}, GRN shape {shape})\n\n"
        f"## GRN recovery\n\n{markdown_table(grn)}\n\n## Unseen perturbations\n\n"
        f"{markdown_table(unseen)}\n\n{notes}\n"
    )
    atomic_write(out / "grn_recovery.csv", lambda tmp: grn.to_csv(tmp))
    atomic_write(out / "grn_scores.csv", lambda tmp: scores.to_csv(tmp, index=False))
    atomic_write(out / "unseen_ate.csv", lambda tmp: unseen.to_csv(tmp))
    atomic_write(out / "ate_metrics_unseen.csv", lambda tmp: rep.unseen_table.to_csv(tmp))
    atomic_write(out / "comparison_gpo.md", lambda tmp: Path(tmp).write_text(md))
    wall = time.perf_counter() - t0
    write_json(
        out / "summary.json",
        {
            "model": "gpo_vae",
            "preset": args.preset,
            "seed": args.seed,
            "grn_shape": shape,
            "epochs": epochs,
            "train_settings": DEMO_GPO_TRAIN,
            "model_options": DEMO_GPO_MODEL,
            "heldout_perturbations": held,
            "unseen_prediction": rep.untrained_method,
            "device": device,
            "train_seconds": train_s,
            "wall_seconds": wall,
            "grn_recovery": grn.reset_index().to_dict(orient="records"),
            "unseen_ate": unseen.reset_index().to_dict(orient="records"),
            "notes": notes,
        },
    )
    print()
    print(md)
    print(
        f"wrote {out}/ (comparison_gpo.md, grn_recovery.csv, unseen_ate.csv, summary.json, run gpo_vae/); "
        f"wall time {wall / 60:.1f} min ({wall:.0f} s; training {train_s:.0f} s)"
    )
    return 0
