"""Batch as a covariate against none, on simulated screens with a planted batch effect (ground truth known).

Data: the simulator's ``--preset`` with ``n_batches`` batches whose per-gene log-fold shifts have sd
``batch_effect``, and cells sent to their label's own batch with probability ``batch_confounding`` (batches
confounded with perturbations, as when a screen's perturbations were run in different lanes); one dataset
per seed (simulation seed = training seed). Split: 64/16/20 by cell, stratified by perturbation and batch.

Models (zoo names, ``--models``) trained with ``batch_key="batch"`` and without, the demo's training
settings. Scored on the test cells: test IWELBO, and the ATE of every single perturbation at each batch
level against the simulator's true ATE at that level (:func:`pyrovae.simulate.simulated_ate`, the
test cells' depths): the model with the batch is evaluated at the level (``covariates={"batch": b}``); the
model without can only give its one prediction (at the level's cells' depths). Reference rows: the
empirical ATE of the level's test cells (noisy, unbiased at its level) and the pooled training mean
(confounded by the batch shifts).

Usage::

    python -m experiments.batch_effect --out runs/exp/batch --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

import pyrovae
from pyrovae.baselines.ate import baseline_ates
from pyrovae.data.protocols import cell_split
from pyrovae.evaluate.ate import ate_metrics
from pyrovae.evaluate.empirical import empirical_ate
from pyrovae.report import markdown_table
from pyrovae.simulate import ground_truth, simulated_ate

SPLIT = "batch_effect_split"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default")
    p.add_argument("--n-batches", type=int, default=3)
    p.add_argument("--batch-effect", type=float, default=0.5)
    p.add_argument("--batch-confounding", type=float, default=0.7)
    p.add_argument("--models", nargs="+", default=["cpa_vae"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--ate-samples", type=int, default=2000)
    p.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        adata = pyrovae.datasets.simulate_perturbseq(
            args.preset,
            seed=seed,
            n_batches=args.n_batches,
            batch_effect=args.batch_effect,
            batch_confounding=args.batch_confounding,
        )
        truth = ground_truth(adata)
        labels = adata.obs["perturbation"].astype(str).to_numpy()
        batch = adata.obs["batch"].astype(str).to_numpy()
        adata.obs[SPLIT] = cell_split(np.char.add(labels, "|" + batch), seed=seed, stratify=True)
        singles = list(truth["treatments"])
        test = np.flatnonzero(adata.obs[SPLIT].to_numpy() == "test")
        lib = np.asarray(adata.X.sum(1)).reshape(-1)
        levels = sorted(set(batch.tolist()))
        truths, empirical = {}, {}
        for b, level in enumerate(levels):
            at = test[batch[test] == level]
            depths = {lab: lib[at][labels[at] == lab] for lab in ["control", *singles]}
            depths = {k: (v if len(v) else lib[test]) for k, v in depths.items()}
            truths[level] = pd.DataFrame(
                simulated_ate(truth, singles, depths, seed=seed, batch=b),
                index=singles,
                columns=adata.var_names,
            )
            present = [s for s in singles if (labels[at] == s).any()]
            empirical[level] = empirical_ate(
                adata.X[at], labels[at], "control", groups=present, genes=adata.var_names
            )
        for level in levels:
            m = ate_metrics(truths[level], empirical[level])
            rows.append(
                {
                    "seed": seed,
                    "method": "empirical (test cells of the level)",
                    "level": level,
                    "ate_r": m["pearson"],
                    "ate_mse": m["mse"],
                }
            )
        for with_batch in (True, False):
            for name in args.models:
                opts = {"batch_key": "batch" if with_batch else None}  # None: drop a recorded one
                model = pyrovae.Model(adata, model=name, split_key=SPLIT, n_latent=10, **opts)
                t0 = time.perf_counter()
                model.train(
                    max_epochs=args.max_epochs,
                    seed=seed,
                    lr=2e-3,
                    batch_size=256,
                    n_particles=3,
                    val_particles=3,
                    progress=False,
                )
                seconds = time.perf_counter() - t0
                iw = model.get_iwelbo(split="test", n_particles=50)["iwelbo"].mean()
                method = f"{name} {'with' if with_batch else 'without'} batch"
                if with_batch and name == args.models[0]:  # the pooled training mean, once per seed
                    pooled = baseline_ates(model.data, singles)["train_mean"]
                for level in levels:
                    at = test[batch[test] == level]
                    cov = {"batch": level} if with_batch else None
                    data = model.data
                    pred = model.posterior().model_ate(
                        singles,
                        n_samples=args.ate_samples,
                        library_size="matched",
                        data=data,
                        rows=at,
                        covariates=cov,
                        seed=seed,
                    )
                    m = ate_metrics(truths[level], pred)
                    rows.append(
                        {
                            "seed": seed,
                            "method": method,
                            "level": level,
                            "ate_r": m["pearson"],
                            "ate_mse": m["mse"],
                            "test_iwelbo": iw,
                            "seconds": seconds,
                        }
                    )
                    if with_batch and name == args.models[0]:
                        mp = ate_metrics(truths[level], pooled)
                        rows.append(
                            {
                                "seed": seed,
                                "method": "train_mean (pooled over batches)",
                                "level": level,
                                "ate_r": mp["pearson"],
                                "ate_mse": mp["mse"],
                            }
                        )
                print(f"seed {seed} {method}: test IWELBO {iw:.2f}, {seconds:.0f} s", flush=True)
        pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)
    frame = pd.DataFrame(rows)
    per_seed = frame.groupby(["method", "seed"], sort=False)[["ate_r", "ate_mse", "test_iwelbo"]].mean()
    summary = per_seed.groupby("method", sort=False).agg(["mean", "std"])
    text = pd.DataFrame(
        {
            c: [
                f"{summary.loc[m, (c, 'mean')]:.4f} ± {summary.loc[m, (c, 'std')]:.4f}"
                if np.isfinite(summary.loc[m, (c, "mean")])
                else "–"
                for m in summary.index
            ]
            for c in ("ate_r", "ate_mse", "test_iwelbo")
        },
        index=summary.index,
    )
    (out / "summary.md").write_text(
        "ATE against the simulator's true ATE at each batch level (mean over levels, then mean ± sd over "
        f"seeds {args.seeds})\n\n" + markdown_table(text) + "\n"
    )
    print(markdown_table(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
