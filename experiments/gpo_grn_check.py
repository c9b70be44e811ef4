"""GPO-VAE GRN recovery on the simulated default dataset, next to simple baselines.

Simulates ``simulate_perturbseq(preset, seed)``, prepares the GPO data (OT control pairing, delta_x, QC,
counterfactuals; timed), trains GPO-VAE into a run directory and scores sigma(W) against the planted GRN
(AUROC / AUPRC, self-loops excluded) on two node sets: the perturbed genes (the rows fitted to data) and all
GRN genes (extended rows included), next to the correlation and differential-expression baselines computed
on the training cells and the random baseline (AUPRC = edge density). Writes ``grn_scores.csv``,
``grn_check.json`` and ``grn.csv`` (all edges) into the run directory.

Usage (about 6-8 minutes on 2 CPU cores with the defaults)::

    python experiments/gpo_grn_check.py --out runs/gpo_grn_check --overwrite
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/gpo_grn_check")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--particles", type=int, default=3)
    p.add_argument("--latent", type=int, default=10)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.65, help="GRN threshold c on delta_x")
    p.add_argument("--sparsity", type=float, default=1.0, help="sparsity penalty weight")
    p.add_argument("--grn-weight", type=float, default=100.0)
    p.add_argument("--hops", type=int, default=5)
    p.add_argument(
        "--hop-norm",
        default="T",
        choices=["T", "knockdown"],
        help="scaling of the k-hop terms (see GRNAlignment)",
    )
    p.add_argument("--mask-prior", type=float, default=0.3)
    p.add_argument(
        "--singles-only", action="store_true", help="GRN alignment on single-perturbation cells only"
    )
    p.add_argument(
        "--mask-lr",
        type=float,
        default=None,
        help="Adam learning rate of the mask logits W (default: --lr). Adam moves each W entry by about lr "
        "per step, so with few steps W cannot reach its alignment target (see experiments/README.md)",
    )
    p.add_argument(
        "--target", default="cell", choices=["cell", "group"], help="GRN alignment target (see GRNAlignment)"
    )
    p.add_argument(
        "--sim",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="SimulationConfig overrides of the preset, e.g. grn_edge_prob=0.15 n_genes=100",
    )
    p.add_argument(
        "--qc-key", default="low_quality", help="obs column with QC failures ('' = compute MAD QC flags)"
    )
    p.add_argument("--pairing-method", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--holdout",
        default="",
        help="comma-separated perturbed genes to hold out (all their cells, combinations included, go to "
        "test); then also compare the GRN-based prediction of their ATE with the prior fallback",
    )
    p.add_argument("--ate-samples", type=int, default=1000)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import pandas as pd
    import torch

    from pyrovae.data.anndata import load_perturbation_data
    from pyrovae.data.prepare import holdout_perturbations, prepare_gpo_data
    from pyrovae.data.simulate import ground_truth, simulate_perturbseq
    from pyrovae.evaluate.grn_export import grn_edges, run_n_perturbed, score_run_grn
    from pyrovae.infer.runs import atomic_write, train_run, write_json
    from pyrovae.infer.train import TrainConfig
    from pyrovae.models.zoo import model_config

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())) if args.device == "cpu" else 2)
    sim = {}
    for item in args.sim:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--sim takes KEY=VALUE, got {item!r}")
        sim[key] = float(value) if any(c in value for c in ".e") else int(value)
    adata = simulate_perturbseq(args.preset, seed=args.seed, **sim)
    truth = ground_truth(adata)
    data = load_perturbation_data(adata, split_seed=args.seed)
    held = [h.strip() for h in args.holdout.split(",") if h.strip()]
    if held:
        data = holdout_perturbations(data, held)
    t0 = time.perf_counter()
    data = prepare_gpo_data(
        data, qc_key=args.qc_key or None, pairing_method=args.pairing_method, seed=args.seed
    )
    prep_s = time.perf_counter() - t0
    timings = data.uns["pyrovae_gpo"]["timings"]
    dx = data.extras["delta_x"]
    tr = data.indices("train")
    ctrl = tr[data.labels[tr] == data.control_label]
    dx_stats = {
        "control_median": float(np.median(dx[ctrl])),
        "control_q90": float(np.quantile(dx[ctrl], 0.9)),
        "perturbed_median": float(np.median(dx[tr[data.labels[tr] != data.control_label]])),
    }
    print(
        f"data: {data.n_cells} cells x {data.n_genes} genes, {data.n_treatments} GRN nodes "
        f"({data.uns['pyrovae_gpo']['n_perturbed']} perturbed); prepare {prep_s:.1f}s "
        f"(OT pairing {timings.get('pairing_s', float('nan')):.2f}s); delta_x {dx_stats}"
    )

    mcfg = model_config(
        "gpo_vae",
        n_latent=args.latent,
        decoder_hidden=args.hidden,
        encoder_hidden=args.hidden,
        embedding_encoder_hidden=args.hidden,
        grn_threshold=args.threshold,
        sparsity_weight=args.sparsity,
        grn_weight=args.grn_weight,
        grn_hops=args.hops,
        grn_hop_norm=args.hop_norm,
        grn_target=args.target,
        grn_singles_only=args.singles_only,
        mask_prior=args.mask_prior,
    )
    tcfg = TrainConfig(
        lr=args.lr,
        mask_lr=args.mask_lr,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        n_particles=args.particles,
        val_particles=args.particles,
        patience=args.epochs,
        seed=args.seed,
        device=args.device,
    )
    t0 = time.perf_counter()
    run = train_run(
        data,
        mcfg,
        tcfg,
        args.out,
        data_options={"split_seed": args.seed},
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    train_s = time.perf_counter() - t0
    scores = score_run_grn(run, truth, data)
    cols = [
        "method",
        "block",
        "auroc",
        "auprc",
        "random_auprc",
        "precision_at_k",
        "precision",
        "recall",
        "n_pred_edges",
        "n_true_edges",
        "sign_accuracy",
    ]
    scores = scores[[c for c in cols if c in scores.columns]]
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(scores.to_string(index=False))
    n_pert = run_n_perturbed(run, data)
    edges = grn_edges(run, n_perturbed=n_pert)
    atomic_write(Path(args.out) / "grn.csv", lambda tmp: edges.to_csv(tmp, index=False))
    atomic_write(Path(args.out) / "grn_scores.csv", lambda tmp: scores.to_csv(tmp, index=False))
    unseen = unseen_check(run, data, held, n_pert, args.ate_samples, args.seed) if held else None
    hist = run.metrics()
    summary = {
        "args": vars(args),
        "prepare_seconds": prep_s,
        "pairing_seconds": timings.get("pairing_s"),
        "train_seconds": train_s,
        "epochs": len(hist),
        "final": hist[-1] if hist else {},
        "delta_x": dx_stats,
        "scores": scores.to_dict(orient="records"),
        "unseen": None if unseen is None else unseen.reset_index().to_dict(orient="records"),
    }
    write_json(Path(args.out) / "grn_check.json", summary)
    print(f"trained {len(hist)} epochs in {train_s:.0f}s; wrote {args.out}/grn_scores.csv")
    return 0


def unseen_check(run, data, held, n_pert, n_samples, seed):
    """ATE of the held-out perturbations (test cells vs test controls) against: the GRN-based prediction
    (``Posterior``, whose GPO block transfers unseen rows through the GRN), the prior fallback
    (``Posterior(transfer=False)``), zero (the control state, what the reference's
    mask_test predicts) and the mean ATE of the seen single perturbations on the training cells."""
    import warnings

    import pandas as pd

    from pyrovae.evaluate.ate import ate_table, empirical_ate
    from pyrovae.infer.predictive import Posterior

    te = data.indices("test")
    lab = data.labels[te]
    tokens = [set(str(v).split(data.sep)) for v in lab]
    groups = sorted({str(v) for v, tk in zip(lab, tokens) if tk & set(held)})
    truth = empirical_ate(data.rows(te), lab, data.control_label, groups=groups, genes=data.genes)
    tr = data.indices("train")
    seen = [t for t in data.groups("train") if data.sep not in t]
    seen_ate = empirical_ate(
        data.rows(tr), data.labels[tr], data.control_label, groups=seen, genes=data.genes
    )
    with warnings.catch_warnings():  # the prior fallback is a deliberate control here
        warnings.filterwarnings("ignore", message=".*drawn from the prior.*")
        prior = Posterior.from_run(run, transfer=False).model_ate(groups, n_samples, seed=seed)
    preds = {
        "gpo_grn_prediction": Posterior.from_run(run).model_ate(groups, n_samples, seed=seed),
        "prior_fallback": prior,
        "zero_effect": pd.DataFrame(0.0, index=truth.index, columns=truth.columns),
        "seen_mean": pd.DataFrame(
            np.tile(seen_ate.to_numpy().mean(0), (len(groups), 1)), index=truth.index, columns=truth.columns
        ),
    }
    table = ate_table(truth, preds)
    cols = ["pearson", "pearson_topk", "mse", "direction_acc_topk", "jaccard_topk", "n_perturbations"]
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(f"held-out perturbations {held} ({groups}); ATE on test cells:")
        print(table[cols].to_string())
    return table[cols]


if __name__ == "__main__":
    raise SystemExit(main())
