"""``pyrovae demo``: the main job end to end on the embedded simulated dataset, no download.

1. Simulate the default dataset (with ground truth) and write it into the run directory (``data.h5ad``).
2. Split it: a quarter of the double perturbations are *held-out combinations* (all their cells in
   ``test``, never trained on); every other label (controls, singles, the other doubles) is split
   80/10/10 into train/val/test, so held-out cells of seen perturbations are scored too.
3. Train SAMS-VAE (the zoo's ``sams_vae``: spike-and-slab guide; masks frozen on, then the latent basis
   rotated and the masks pruned) and CPA-VAE (seeded, progress bar) into ``sams_vae/`` and ``cpa_vae/``.
4. Evaluate on the two held-out sets separately: test IWELBO (100 particles, 3 evaluation seeds: mean and
   Monte Carlo spread), ATE metrics (empirical ATE of held-out cells vs model ATE at their depths, with
   trivial baselines fitted on the training cells), and SAMS-VAE's mask recovery against the simulated
   masks (mask probabilities q(m = 1) from the effect block's ``mask_probs``, thresholded at 0.5, latent
   axes matched) with its chance level.
5. Print one comparison table (Markdown) and write it (``comparison.csv``, ``comparison.md``), the detailed
   tables, a ``summary.json`` and the figures (training curves, ATE scatter, mask heatmap).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pyrovae.commands.common import add_device_arg, command_device, positive_int, seed_int
from pyrovae.commands.demo_gpo import run_gpo
from pyrovae.commands.demo_real import run_real
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.dosage import build_dosage
from pyrovae.data.protocols import heldout_combinations_split
from pyrovae.datasets import DATASETS
from pyrovae.evaluate.score import score_run
from pyrovae.evaluate.structure import mask_recovery
from pyrovae.models.zoo import model_config
from pyrovae.outputs import atomic_write, fresh_output_dir, write_json
from pyrovae.plot import plot_ate_scatter, plot_mask_heatmap, plot_training_curves
from pyrovae.predict.conditions import MATCHED
from pyrovae.report import markdown_table, mean_std
from pyrovae.runs import train_run
from pyrovae.simulate import CONTROL_LABEL, GRN_SHAPES, ground_truth, simulate_perturbseq
from pyrovae.train.trainer import TrainConfig

# Settings chosen for the demo's budget (1.4 min measured on 2 idle cores for the default preset, < 10 min):
# the reference trains with lr 3e-4, batch 512 for hundreds of epochs; with a few minutes of CPU we use a
# larger step (lr 2e-3, kept stable by the global gradient clipping at 100) on batches of 256 cells, 3
# ELBO particles, and a fixed epoch budget (early stopping on the validation loss still picks the best).
# SAMS-VAE is the zoo's sams_vae (pyrovae.models.zoo.SAMS_INFERENCE: the paper's model with its inference
# settings, measured in docs/models/sams_vae.md).
DEMO_TRAIN = dict(lr=2e-3, batch_size=256, n_particles=3, patience=10, val_particles=3)
DEMO_EPOCHS = {"tiny": 30, "default": 120, "large": 3}
MODELS = (("SAMS-VAE", "sams_vae"), ("CPA-VAE", "cpa_vae"))
HELDOUT_FRACTION = 0.25
IWELBO_PARTICLES, IWELBO_SEEDS = 100, (0, 1, 2)
ATE_SAMPLES, TOP_K = 2500, 20


def run(args: argparse.Namespace) -> int:
    if getattr(args, "dataset", None):
        return run_real(args)
    if getattr(args, "model", "sams") == "gpo":
        return run_gpo(args)
    t0 = time.perf_counter()
    device = command_device(args)
    out = fresh_output_dir(args.out, "demo", args.overwrite)  # replaces only a demo pyrovae wrote
    log = print if not args.quiet else (lambda *a, **k: None)

    # ------------------------------------------------------------------ data: simulate, split, write
    adata = simulate_perturbseq(args.preset, seed=args.seed)
    truth = ground_truth(adata)
    raw = adata.obs["perturbation"].astype(str).to_numpy()
    _, _, canon = build_dosage(raw, CONTROL_LABEL, "+")
    split, held = heldout_combinations_split(
        canon.astype(str), CONTROL_LABEL, "+", args.seed, HELDOUT_FRACTION
    )
    adata.obs["split"] = pd.Categorical(split)
    atomic_write(out / "data.h5ad", lambda tmp: adata.write_h5ad(tmp))
    opts = {"perturbation_key": "perturbation", "split_key": "split", "control_label": CONTROL_LABEL}
    data = load_perturbation_data(adata, **opts)
    log(
        f"simulated {args.preset!r} (seed {args.seed}): {data.n_cells} cells x {data.n_genes} genes, "
        f"{data.n_treatments} treatments; held-out combinations (test only): {', '.join(held)}"
    )

    # ------------------------------------------------------------------------------------ training
    epochs = args.epochs or DEMO_EPOCHS.get(args.preset, 20)
    n_latent = int(np.asarray(truth["masks"]).shape[1])  # the simulator's K, so masks are comparable
    runs, seconds = {}, {}
    for label, name in MODELS:
        ts = time.perf_counter()
        tcfg = TrainConfig(max_epochs=epochs, seed=args.seed, device=device, **DEMO_TRAIN)
        cfg = model_config(name, n_latent=n_latent)
        log(f"training {label} ({epochs} epochs, lr {tcfg.lr}, batch {tcfg.batch_size})")
        runs[label] = train_run(data, cfg, tcfg, out / name, data_options=opts, progress=not args.quiet)
        seconds[label] = time.perf_counter() - ts

    # ---------------------------------------------------------------------------------- evaluation
    test = data.indices("test")
    is_held = np.isin(data.labels[test], held)
    sets = {
        "held-out cells": test[~is_held],
        # the controls of the test split are the reference of the held-out combinations' ATE
        "held-out combos": np.concatenate([test[is_held], test[data.labels[test] == data.control_label]]),
    }
    iw_rows = {"held-out cells": test[~is_held], "held-out combos": test[is_held]}
    first, *others = list(runs)
    scores = score_run(
        runs[first],
        data,
        ate_sets=sets,
        iwelbo_sets=iw_rows,
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
    ates = scores.ate
    iw = {(m, s): res for m, by_set in scores.iwelbo.items() for s, res in by_set.items()}
    probs = runs["SAMS-VAE"].model.effect.mask_probs().cpu().numpy()
    order = [data.treatments.index(t) for t in truth["treatments"]]
    probs = probs[order]
    mask = mask_recovery(truth["masks"], probs, seed=args.seed)

    # ------------------------------------------------------------------------------- one table
    methods = list(ates["held-out cells"].table.index)
    rows_num, rows_md = [], []
    for m in methods + ["random mask (chance)"]:
        num: dict[str, Any] = {"method": m}
        md: dict[str, Any] = {"method": m}
        for set_name in iw_rows:
            key = f"IWELBO {set_name}"
            res = iw.get((m, set_name))
            num[key] = res["mean"] if res else np.nan
            num[f"{key} MC sd"] = res["std"] if res else np.nan
            md[key] = mean_std(res["mean"], res["std"], "{:.2f}") if res else "–"
        for set_name in sets:
            tab = ates[set_name].table
            for col, short in (("pearson", "ATE r"), ("pearson_topk", f"ATE r top{TOP_K}")):
                v = float(tab.loc[m, col]) if m in tab.index else np.nan
                num[f"{short} {set_name}"] = v
                md[f"{short} {set_name}"] = mean_std(v)
        f1 = mask["f1"] if m == "SAMS-VAE" else mask["chance_f1"] if m.startswith("random mask") else np.nan
        num["mask F1"] = f1
        md["mask F1"] = mean_std(f1)
        rows_num.append(num)
        rows_md.append(md)
    table = pd.DataFrame(rows_num).set_index("method")
    table_md = markdown_table(pd.DataFrame(rows_md).set_index("method"))

    notes = (
        f"IWELBO: nats per cell (mean ± Monte Carlo sd over evaluation seeds {list(IWELBO_SEEDS)}, "
        f"{IWELBO_PARTICLES} particles), a posterior-predictive bound under q, not the model evidence. "
        f"ATE r: Pearson r between model and empirical ATE (perturbseq transform; empirical ATE on held-out "
        f"test cells vs test controls; model sampled at the compared cells' depths, {ATE_SAMPLES} samples "
        f"with common random numbers); top{TOP_K}: the {TOP_K} genes of largest |empirical ATE| per "
        "perturbation. Baselines "
        "(train_mean, additive, global_mean) use training cells only; train_mean has no prediction for "
        "held-out combinations (dropped). Mask F1: SAMS-VAE's thresholded q(mask) vs the simulated masks "
        f"after latent matching (precision {mask['precision']:.2f}, recall {mask['recall']:.2f}); chance: "
        "random masks with as many positives."
    )
    atomic_write(out / "comparison.csv", lambda tmp: table.to_csv(tmp))
    atomic_write(
        out / "comparison.md",
        lambda tmp: Path(tmp).write_text(
            f"# pyrovae demo ({args.preset} preset, seed {args.seed})\n\n{table_md}\n\n{notes}\n"
        ),
    )
    for set_name, rep in ates.items():
        slug = set_name.replace(" ", "_").replace("-", "")
        atomic_write(out / f"ate_metrics_{slug}.csv", lambda tmp, rep=rep: rep.table.to_csv(tmp))
        atomic_write(
            out / f"ate_per_perturbation_{slug}.csv",
            lambda tmp, rep=rep: rep.per_perturbation.to_csv(tmp, index=False),
        )
    cells = pd.concat([res["cells"].assign(model=m, set=s) for (m, s), res in iw.items()])
    atomic_write(out / "iwelbo_cells.csv", lambda tmp: cells.to_csv(tmp, index_label="cell"))

    figures = []
    try:
        figures.append(
            plot_training_curves({k: r.metrics() for k, r in runs.items()}, out / "training_curves.png")
        )
        for set_name, rep in ates.items():
            slug = set_name.replace(" ", "_").replace("-", "")
            preds = {k: v for k, v in rep.preds.items() if k in runs or k == "additive"}
            figures.append(
                plot_ate_scatter(rep.ate_true, preds, rep.table, out / f"ate_scatter_{slug}.png", top_k=TOP_K)
            )
        figures.append(
            plot_mask_heatmap(
                probs,
                truth["treatments"],
                out / "mask_heatmap.png",
                true_mask=truth["masks"],
                title="SAMS-VAE q(mask)",
            )
        )
    except ImportError as err:
        log(f"(no figures: {err})")
    wall = time.perf_counter() - t0
    write_json(
        out / "summary.json",
        {
            "preset": args.preset,
            "seed": args.seed,
            "epochs": epochs,
            "train_settings": DEMO_TRAIN,
            "models": dict(MODELS),
            "n_latent": n_latent,
            "heldout_combinations": held,
            "torch_threads": torch.get_num_threads(),
            "device": device,
            "train_seconds": seconds,
            "wall_seconds": wall,
            "iwelbo": {
                f"{m} / {s}": summ
                for m, by_set in scores.iwelbo_summary.items()
                for s, summ in by_set.items()
            },
            "mask_recovery": mask,
            "comparison": table.reset_index().to_dict(orient="records"),
            "figures": [str(f) for f in figures],
            "notes": notes,
        },
    )
    print()
    print(table_md)
    print()
    print(notes)
    print(
        f"\nwrote {out}/ (comparison.csv/.md, summary.json, figures, runs {MODELS[0][1]}/ and cpa_vae/); "
        f"wall time {wall / 60:.1f} min ({wall:.0f} s; training "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + ")"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="simulate, train SAMS-VAE and CPA-VAE, evaluate, compare (a few minutes)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument(
        "--preset",
        default="default",
        choices=["tiny", "default", "large"],
        help="simulated dataset (default: default)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=sorted(DATASETS),
        help="an embedded real dataset instead of the simulated preset (e.g. papalexi2021: SAMS-VAE and "
        "CPA-VAE on held-out real cells against the baselines; pyrovae.commands.demo_real)",
    )
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="training epochs per model (default: per preset)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars or log lines (the table is printed)"
    )
    p.add_argument(
        "--model",
        default="sams",
        choices=["sams", "gpo"],
        help="sams (default): SAMS-VAE and CPA-VAE on held-out combinations; gpo: GPO-VAE's GRN recovery "
        "and unseen perturbations against baselines (pyrovae.commands.demo_gpo)",
    )
    p.add_argument(
        "--grn-shape",
        default=None,
        choices=list(GRN_SHAPES),
        help="with --model gpo: the simulated GRN's shape (default: the preset's, random)",
    )
    add_device_arg(p)
    p.set_defaults(func=run)
