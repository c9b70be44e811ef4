"""Real screens: held-out cells of a real Perturb-seq dataset, every model beside every baseline.

Protocol: a 64/16/20 train/val/test split of the cells, stratified by perturbation (and by the covariate
level, where the dataset has one), fixed by ``--split-seed``; the seeds are training seeds. Training: the
demo's settings (Adam lr 2e-3, batches of 256, 3 particles) for ``--max-epochs`` epochs and at least
``--min-steps`` steps (a small dataset gets more epochs), early stopping on the validation loss.

Models: zoo names (default ``sams_vae cpa_vae conditional_vae``; ``gpo_vae`` where the targets are
measured genes), trained with the dataset's data options (batch / covariates / size factor,
:data:`pyrovae.datasets.DATASETS`), scored on the test cells: ATE Pearson r (all genes, top-20 by
|effect|), MSE (model ATE sampled at the test cells' own depths, ``library_size="matched"``), test
IWELBO, training seconds; with a covariate, ATE r per level too (``summary_by_level.md``).

Baselines from the training cells (:mod:`pyrovae.baselines`): no change (zero effect), per-perturbation
training mean, additive, mean of all perturbed cells, systema's matching mean, the linear PCA + ridge
baseline (targets that are measured genes). The noise ceiling (:mod:`pyrovae.evaluate.ceiling`): the
agreement of the test cells with themselves over random halvings, as a same-size replicate experiment
(``noise_ceiling``) and as the score of a noiseless predictor (``perfect_predictor``).

Usage::

    python -m experiments.real_screens --dataset papalexi2021 --out runs/exp/papalexi
    python -m experiments.real_screens --dataset mcfaline2023 --seeds 0 1 2 --out runs/exp/mcfaline
    python -m experiments.real_screens --data screen.h5ad --batch-key lane --out runs/exp/mine

Outputs in ``--out``: ``runs.csv`` (one row per model, seed and method), ``summary.md`` (mean +- sd over
seeds), ``summary.png``, and the run directories.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import pandas as pd

import pyrovae
from pyrovae.commands.demo_real import real_split
from pyrovae.datasets import DATASETS
from pyrovae.evaluate.score import score_run
from pyrovae.report import markdown_table

SPLIT_COLUMN = "real_screens_split"
METRICS = ("pearson", "pearson_topk", "mse")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=sorted(DATASETS), help="an embedded dataset")
    src.add_argument("--data", help="an .h5ad of raw counts (obs 'perturbation')")
    p.add_argument("--batch-key", default=None)
    p.add_argument("--covariate-keys", default=None, help="comma-separated")
    p.add_argument("--size-factor-key", default=None)
    p.add_argument("--no-covariates", action="store_true", help="ignore the dataset's batch / covariates")
    p.add_argument("--models", nargs="+", default=["sams_vae", "cpa_vae", "conditional_vae"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument(
        "--min-steps",
        type=int,
        default=2000,
        help="train at least this many steps (small datasets: more epochs; default 2000)",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3, the demo's)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--ate-samples", type=int, default=2500)
    p.add_argument("--iwelbo-particles", type=int, default=50)
    p.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dataset:
        adata, opts = DATASETS[args.dataset].load(), dict(DATASETS[args.dataset].data_options)
    else:
        adata, opts = ad.read_h5ad(args.data), {}
    for key in ("batch_key", "covariate_keys", "size_factor_key"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    # the split is stratified by the dataset's levels with or without --no-covariates: the same test cells
    strata = ["perturbation", *pyrovae.DataOptions.from_dict(opts).categorical_keys]
    adata.obs[SPLIT_COLUMN] = real_split(adata.obs, strata, args.split_seed)
    if args.no_covariates:
        opts.pop("batch_key", None)
        opts.pop("covariate_keys", None)
    options = pyrovae.DataOptions.from_dict({**opts, "split_key": SPLIT_COLUMN})
    # ATE per level of the dataset's first categorical column (also for a model trained without it)
    level_key = strata[1] if len(strata) > 1 else None
    rows = []
    for model in args.models:
        for seed in args.seeds:
            run_dir = out / f"{model}_seed{seed}"
            m = pyrovae.Model(adata, model=model, n_latent=args.n_latent, **options.to_dict())
            t0 = time.perf_counter()
            n_train = int((adata.obs[SPLIT_COLUMN] == "train").sum())
            epochs = max(args.max_epochs, -(-args.min_steps // -(-n_train // args.batch_size)))
            m.train(
                max_epochs=epochs,
                seed=seed,
                run_dir=run_dir,
                overwrite=True,
                progress=False,
                lr=args.lr,
                batch_size=args.batch_size,
                n_particles=3,
                val_particles=3,
            )
            seconds = time.perf_counter() - t0
            data = m.data
            test = data.indices("test")
            scores = score_run(
                m.run,
                data,
                ate_sets={"test": test},
                iwelbo_sets={"test": "test"},
                name=model,
                n_samples=args.ate_samples,
                n_particles=args.iwelbo_particles,
                iwelbo_seeds=(0,),
                seed=seed,
                by=level_key,
            )
            for set_name, part in scores.ate.items():  # ATE r per level of the first covariate
                if set_name != "test":
                    rows.append(
                        {
                            "method": model,
                            "seed": seed,
                            "level": set_name.split("=", 1)[1].rstrip("]"),
                            **{f"{k}_level": float(part.table.loc[model, k]) for k in METRICS},
                        }
                    )
            rep = scores.ate["test"]
            table = pd.concat(
                [
                    rep.table,
                    rep.ceiling[list(rep.table.columns.intersection(rep.ceiling.columns))],
                ]
            )
            for method, r in table.iterrows():
                first = model == args.models[0] and seed == args.seeds[0]
                if method != model and not first:
                    continue  # the baselines depend on neither the model nor the seed: once
                row = {
                    "method": method,
                    "seed": seed if method == model else -1,
                    **{k: float(r[k]) for k in METRICS},
                }
                if method == model:
                    row.update(test_iwelbo=scores.iwelbo[model]["test"]["mean"], seconds=seconds)
                rows.append(row)
            frame = pd.DataFrame(rows)
            frame.to_csv(out / "runs.csv", index=False)
            print(
                f"{model} seed {seed}: ATE r {table.loc[model, 'pearson']:.3f}, MSE "
                f"{table.loc[model, 'mse']:.4f}, {seconds:.0f} s",
                flush=True,
            )
    frame = pd.DataFrame(rows)
    if "level" in frame.columns:
        by_level = (
            frame.dropna(subset=["level"])
            .groupby(["method", "level"])[[f"{k}_level" for k in METRICS]]
            .agg(["mean", "std"])
        )
        (out / "summary_by_level.md").write_text(markdown_table(by_level.round(4)) + "\n")
        print(markdown_table(by_level.round(4)))
        frame = frame[frame["level"].isna()]
    frame = frame.drop_duplicates(subset=["method", "seed"])
    summary = frame.groupby("method", sort=False)[
        [c for c in ("pearson", "pearson_topk", "mse", "test_iwelbo", "seconds") if c in frame.columns]
    ].agg(["mean", "std"])
    cols = [c for c in ("pearson", "pearson_topk", "mse", "test_iwelbo", "seconds") if c in frame.columns]
    text = pd.DataFrame(
        {
            c: [
                f"{summary.loc[m, (c, 'mean')]:.3f}"
                + (f" ± {summary.loc[m, (c, 'std')]:.3f}" if summary.loc[m, (c, "std")] > 0 else "")
                for m in summary.index
            ]
            for c in cols
        },
        index=summary.index,
    )
    (out / "summary.md").write_text(markdown_table(text) + "\n")
    print(markdown_table(text))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, metric in zip(axes, ("pearson", "mse")):
            s = summary[(metric, "mean")].dropna()
            ax.barh(s.index, s.values, xerr=summary.loc[s.index, (metric, "std")].fillna(0).values)
            ax.set_title(f"ATE {metric} (test cells)")
        fig.tight_layout()
        fig.savefig(out / "summary.png", dpi=120)
    except ImportError as err:
        print(f"(no figure: {err})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
