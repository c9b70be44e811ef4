"""``pyrovae iwelbo | ate | sample``: score a run on held-out cells, check its ATEs, sample from it.

Each command reads the data with ``run.load_data`` (the run's genes, treatments, label reading and split),
writes its outputs atomically, and refuses to overwrite an existing output unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from pyrovae.commands.common import (
    add_device_arg,
    command_device,
    non_negative_int,
    positive_int,
    refuse_existing,
    run_lock_if_inside,
    seed_int,
)
from pyrovae.data.gene_features import describe_source
from pyrovae.evaluate.celleval import cell_eval_available, cell_eval_inputs, run_cell_eval
from pyrovae.evaluate.score import score_run
from pyrovae.nn.likelihoods import DEFAULT_LIBRARY_SIZE
from pyrovae.outputs import (
    atomic_write,
    atomic_write_all,
    check_not_owned,
    json_writer,
    staged_dir,
    write_json,
)
from pyrovae.plot import plot_ate_scatter
from pyrovae.predict.conditions import MATCHED
from pyrovae.predict.posterior import Posterior
from pyrovae.report import markdown_table
from pyrovae.runs import load_run

# ------------------------------------------------------------------------------------------- helpers


def _library_arg(value: str) -> str | float:
    """``matched`` / ``data`` -> ``"matched"``, ``fixed`` -> 1e4 (the reference's), a number -> itself."""
    if value in ("matched", "data"):
        return MATCHED
    if value == "fixed":
        return DEFAULT_LIBRARY_SIZE
    try:
        out = float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--library must be 'matched', 'fixed' or a number, got {value!r}"
        ) from err
    if not (np.isfinite(out) and out > 0):
        raise argparse.ArgumentTypeError(f"--library must be a finite number > 0, got {value!r}")
    return out


def _covariate_arg(value: str) -> tuple[str, str]:
    """``KEY=LEVEL`` -> (key, level)."""
    key, sep, level = value.partition("=")
    if not sep or not key.strip() or not level.strip():
        raise argparse.ArgumentTypeError(
            f"--covariate must be KEY=LEVEL (e.g. cell_type=A172), got {value!r}"
        )
    return key.strip(), level.strip()


def _load(args: argparse.Namespace):
    run = load_run(args.run, checkpoint=getattr(args, "checkpoint", "best"), device=command_device(args))
    overrides = {}
    if getattr(args, "split_key", None):
        overrides["split_key"] = args.split_key
    # load_data prepares the data as training did (held-out perturbations, CRADLE/GPO extras)
    data = run.load_data(args.data, **overrides) if getattr(args, "data", None) else None
    if data is not None and getattr(args, "split_key", None) and not getattr(args, "all_cells", False):
        run.warn_seen(data, args.split, args.split_key)  # a column that marks training cells as test
    return run, data


# -------------------------------------------------------------------------------------------- iwelbo


def run_iwelbo(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    suffix = "_prior" if args.score_globals else ""
    out = Path(args.out) if args.out else run_dir / f"iwelbo_{args.split}{suffix}.csv"
    if out.suffix != ".csv":
        raise ValueError(f"--out {out} must end in .csv (the per-cell table; the summary goes beside it)")
    # the summary sits next to the per-cell table; never on the same path
    out_json = out.with_name(out.stem + "_summary.json")
    for path in (out, out_json):
        check_not_owned(path)
    refuse_existing([out, out_json], args.overwrite)
    if len(set(args.seeds)) < len(args.seeds):
        raise ValueError(
            f"--seeds {' '.join(map(str, args.seeds))} repeats a seed: repeated seeds give the same "
            "estimate, so their spread is no Monte Carlo error; give distinct seeds (e.g. --seeds 0 1 2)"
        )
    run, data = _load(args)
    if len(data.indices(args.split)) == 0:
        raise ValueError(f"the {args.split!r} split of {args.data} has no cells")
    scores = score_run(
        run,
        data,
        iwelbo_sets={args.split: args.split},
        iwelbo_seeds=args.seeds,
        n_particles=args.particles,
        batch_size=args.batch_size,
        particle_chunk=args.particle_chunk,
        score_globals=args.score_globals,
    )
    res = scores.iwelbo[scores.name][args.split]
    cells = res["cells"]
    summary = scores.iwelbo_summary[scores.name][args.split]
    summary.update({"run": str(run_dir), "data": str(args.data), "per_cell_csv": str(out)})
    with run_lock_if_inside(out, run_dir):
        atomic_write_all(
            {
                out: lambda tmp: cells.to_csv(tmp, index_label="cell"),
                out_json: json_writer(summary),
            }
        )
    spread = (
        f" ± {res['std']:.3f} (MC spread: std over seeds {list(args.seeds)})" if len(args.seeds) > 1 else ""
    )
    print(
        f"{args.split} IWELBO, {res['n_particles']} particles, {res['n_cells']} cells: "
        f"{res['mean']:.3f} nats/cell{spread}"
    )
    print(f"  bound on the {summary['bound']}")
    per_label = pd.Series(summary["per_label"]).sort_values()
    if len(per_label) > 1:
        shown = per_label if len(per_label) <= 12 else pd.concat([per_label.head(6), per_label.tail(6)])
        print("  per label (lowest/highest):", ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))
    print(f"wrote {out} and {out_json}")
    return 0


# ----------------------------------------------------------------------------------------------- ATE

#: metrics printed on the console (the CSV has all of them)
SHOWN_ATE_COLUMNS = (
    "pearson",
    "pearson_topk",
    "pearson_de_topk",
    "pearson_delta_pert",
    "mse",
    "mae",
    "pds",
    "rank",
    "centroid_accuracy",
    "interaction_pearson",
    "energy_distance",
    "n_perturbations",
    "n_dropped",
)


def run_ate(args: argparse.Namespace) -> int:
    tag = "all" if args.all_cells else args.split
    out_dir = Path(args.out) if args.out else Path(args.run) / f"ate_{tag}"
    check_not_owned(out_dir)
    if out_dir.exists() and out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out_dir} already holds ATE results; pass --overwrite to replace them")
    if args.cell_eval and not cell_eval_available():
        raise ValueError("--cell-eval needs the cell-eval package: pip install 'pyrovae[eval]'")
    run, data = _load(args)
    if args.all_cells:
        rows = np.arange(data.n_cells)
        scope = "all cells (every split, training cells included: the reference's version, not held out)"
    else:
        rows = data.indices(args.split)
        scope = f"held-out {args.split} cells" if args.split != "train" else "training cells (not held out)"
    if len(rows) == 0:
        raise ValueError(f"the {args.split!r} split of {args.data} has no cells")
    model_name = run.model_cfg.family if args.name is None else args.name
    reports = score_run(
        run,
        data,
        ate_sets={scope: rows},
        name=model_name,
        top_k=args.top_k,
        n_samples=args.n_samples,
        library_size=args.library,
        seed=args.seed,
        by=args.by,
        field_options=dict(
            cells=args.cells,
            n_cells=args.n_cells,
            ceiling=args.ceiling_splits > 0,
            ceiling_splits=max(args.ceiling_splits, 1),
            mc_seeds=args.mc_seeds,
        ),
    ).ate
    levels = {k: v for k, v in reports.items() if k != scope}
    rep = reports[scope]
    table, per_pert, unseen, unseen_table = (
        rep.table,
        rep.per_perturbation,
        rep.unseen,
        rep.unseen_table,
    )
    method_of = rep.prediction
    fig = ce = None
    # every file goes into a staging folder swapped in whole: no stale file of an earlier --name, no table
    # without its summary after a kill
    with (
        run_lock_if_inside(out_dir, Path(args.run)),
        staged_dir(out_dir, "ate", args.overwrite, protect=(args.data,)) as stage,
    ):
        atomic_write(stage / "ate_metrics.csv", lambda tmp: table.to_csv(tmp))
        atomic_write(stage / "ate_metrics.md", lambda tmp: Path(tmp).write_text(markdown_table(table) + "\n"))
        atomic_write(stage / "ate_per_perturbation.csv", lambda tmp: per_pert.to_csv(tmp, index=False))
        if unseen_table is not None:
            atomic_write(stage / "ate_metrics_unseen.csv", lambda tmp: unseen_table.to_csv(tmp))
        if levels:
            by_table = pd.concat({k: v.table for k, v in levels.items()}, names=["cells"])
            atomic_write(stage / f"ate_metrics_by_{_slug(args.by)}.csv", lambda tmp: by_table.to_csv(tmp))
        atomic_write(stage / "ate_empirical.csv", lambda tmp: rep.ate_true.to_csv(tmp))
        if rep.ceiling is not None:
            atomic_write(stage / "ate_ceiling.csv", lambda tmp: rep.ceiling.to_csv(tmp))
        if rep.vs_baseline is not None:
            atomic_write(stage / "ate_vs_baseline.csv", lambda tmp: rep.vs_baseline.to_csv(tmp))
        if rep.energy is not None:
            atomic_write(stage / "ate_energy.csv", lambda tmp: rep.energy.to_csv(tmp, index=False))
        for name, df in rep.preds.items():
            atomic_write(stage / f"ate_pred_{_slug(name)}.csv", lambda tmp, df=df: df.to_csv(tmp))
        write_json(
            stage / "ate_summary.json",
            {
                "run": str(args.run),
                "data": str(args.data),
                "scope": scope,
                "control_reference": rep.control_source,
                "library_size": args.library,
                "model_conditions": rep.conditions,
                "n_samples": args.n_samples,
                "top_k": args.top_k,
                "seed": args.seed,
                "perturbations": rep.perturbations,
                "metrics": table.reset_index().to_dict(orient="records"),
                "unseen_prediction": {
                    "method": rep.untrained_method,
                    "gene_features": describe_source(
                        run.model_cfg.features.source, run.model_cfg.features.file
                    )
                    or None,
                    "perturbations": {p: method_of.get(p, "trained") for p in unseen},
                },
                "metrics_unseen": None
                if unseen_table is None
                else unseen_table.reset_index().to_dict(orient="records"),
                "noise_ceiling": None
                if rep.ceiling is None
                else rep.ceiling.reset_index().to_dict(orient="records"),
                "best_baseline_per_metric": None
                if rep.vs_baseline is None
                else rep.vs_baseline.attrs["baseline"],
                "mc_seeds": args.mc_seeds,
            },
        )
        if args.cell_eval:
            print(f"running cell-eval ({args.cell_eval_profile}) on {args.n_cells} predicted cells per label")
            inputs = cell_eval_inputs(
                Posterior.from_run(run),
                data,
                rows,
                n_cells=args.n_cells,
                library_size=args.library,
                seed=args.seed,
            )
            ce = run_cell_eval(
                inputs[0],
                inputs[1],
                data.control_label,
                stage / "cell_eval",
                train=inputs[2],
                profile=args.cell_eval_profile,
            )
        try:
            fig = plot_ate_scatter(
                rep.ate_true, rep.preds, rep.table, stage / "ate_scatter.png", top_k=args.top_k
            )
        except ImportError as err:
            print(f"(no figure: {err})")
    print(
        f"ATE on {scope}; {len(rep.perturbations)} perturbations; controls: {rep.control_source}; "
        f"model sampled at: {rep.conditions}"
    )
    shown = [c for c in SHOWN_ATE_COLUMNS if c in table.columns]
    ceiling = rep.ceiling
    print(markdown_table(table[shown] if ceiling is None else pd.concat([table[shown], ceiling[shown]])))
    for name, part in levels.items():
        print(f"{name}:")
        print(markdown_table(part.table[shown]))
    if ceiling is not None:
        print(
            f"noise_ceiling: the held-out cells against themselves ({int(ceiling['n_splits'].iloc[0])} "
            "random halvings; correlations Spearman-Brown corrected, errors to full depth; sd in "
            "ate_ceiling.csv): a same-size replicate experiment; perfect_predictor: a noiseless prediction "
            "of the population effect"
        )
    if ce is not None:
        avg = ce["score"].set_index("metric")["from_baseline"].get("avg_score", float("nan"))
        print(f"cell-eval: avg_score against its mean baseline {avg:.3f} (0 = the baseline, 1 = perfect)")
    if args.mc_seeds > 1:
        spread = table.loc[model_name, [f"{c}_mc_sd" for c in shown if f"{c}_mc_sd" in table.columns]]
        print(
            f"Monte Carlo sd of {model_name} over {args.mc_seeds} model-ATE seeds: "
            + ", ".join(f"{k[:-6]} {v:.3g}" for k, v in spread.items())
        )
    if unseen:
        print(
            f"unseen perturbations (a treatment with no training cell): {', '.join(unseen)}; predicted by "
            f"{model_name} with {rep.untrained_method}"
            + feature_note(run)
            + (" (a prior draw: no information about them)" if rep.untrained_method == "prior_draw" else "")
        )
        for group, part in unseen_table.groupby(level="group", sort=False):
            print(f"{group}:")
            print(markdown_table(part.droplevel("group")[[c for c in shown if c in part.columns]]))
    print(
        f"(all metrics in ate_metrics.csv) wrote {out_dir}/ (ate_metrics.csv/.md, ate_per_perturbation.csv, "
        f"ate_empirical.csv, ate_pred_*.csv{', ate_metrics_unseen.csv' if unseen else ''}"
        f"{', ate_ceiling.csv' if ceiling is not None else ''}"
        f"{', ate_vs_baseline.csv' if rep.vs_baseline is not None else ''}"
        f"{', ate_energy.csv' if rep.energy is not None else ''}"
        f"{', cell_eval/' if args.cell_eval else ''}"
        f"{', ate_scatter.png' if fig else ''})"
    )
    return 0


def feature_note(run) -> str:
    """`` (gene features from ...)`` for a run trained with gene features, else ``""``."""
    what = describe_source(run.model_cfg.features.source, run.model_cfg.features.file)
    return f" (gene features from {what})" if what else ""


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# -------------------------------------------------------------------------------------------- sample


def run_sample(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_not_owned(out)
    if args.data and out.resolve() == Path(args.data).resolve():
        raise ValueError(f"--out {out} is the input --data; write the samples to another file")
    refuse_existing([out], args.overwrite)
    if out.suffix != ".h5ad":
        raise ValueError(f"--out must end in .h5ad, got {out}")
    if args.library == MATCHED and not args.data:
        raise ValueError("--library matched needs --data (the library sizes are drawn from its cells)")
    run, data = _load(args)
    post = Posterior.from_run(run)
    adata = post.predict(
        args.perturbation,
        n_cells=args.n_cells,
        library_size=args.library,
        data=data,
        seed=args.seed,
        covariates=dict(args.covariate or []),
    )
    unseen = {k: v for k, v in adata.uns["pyrovae_sample"]["prediction"].items() if v != "trained"}
    adata.uns["pyrovae_sample"]["run"] = str(args.run)
    atomic_write(out, lambda tmp: adata.write_h5ad(tmp))
    counts = ", ".join(f"{k}: {v}" for k, v in adata.obs["perturbation"].value_counts(sort=False).items())
    print(
        f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes "
        f"({counts}; {adata.uns['pyrovae_sample']['conditions']}, seed {args.seed})"
    )
    if unseen:
        print(
            f"unseen perturbations (a treatment with no training cell): {', '.join(sorted(unseen))}; "
            f"predicted with {post.untrained_method}{feature_note(run)} (obs['prediction'], "
            "uns['pyrovae_sample']['prediction'])"
        )
    return 0


# ------------------------------------------------------------------------------------------ register


def register(sub) -> None:
    p = sub.add_parser("iwelbo", help="held-out predictive IWELBO per cell of a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", required=True, help=".h5ad with the run's genes (read with the run's settings)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--split-key", default=None, help="obs column with the split (default: the run's)")
    p.add_argument(
        "--particles", type=positive_int, default=100, help="K global and basal particles (default 100)"
    )
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--particle-chunk", type=positive_int, default=25, help="particles per vectorised pass")
    p.add_argument(
        "--seeds",
        type=seed_int,
        nargs="+",
        default=[0, 1, 2],
        help="evaluation seeds; the spread of the mean over seeds is the Monte Carlo error",
    )
    p.add_argument(
        "--score-globals",
        action="store_true",
        help="also score the global draws (bound on the prior-predictive marginal likelihood)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="per-cell CSV (default RUN/iwelbo_<split>.csv; the summary goes to <stem>_summary.json)",
    )
    p.add_argument("--overwrite", action="store_true")
    add_device_arg(p)
    p.set_defaults(func=run_iwelbo)

    p = sub.add_parser("ate", help="empirical vs model average treatment effects, with baselines")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", required=True, help=".h5ad with the run's genes")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="cells of the empirical ATE (default: held-out test cells)",
    )
    p.add_argument("--split-key", default=None, help="obs column with the split (default: the run's)")
    p.add_argument(
        "--all-cells",
        action="store_true",
        help="empirical ATE on all cells, training cells included (the reference's version)",
    )
    p.add_argument(
        "--top-k", type=positive_int, default=20, help="top-k DE genes per perturbation (default 20)"
    )
    p.add_argument("--n-samples", type=positive_int, default=2500, help="model samples (default 2500)")
    p.add_argument(
        "--library",
        "--library-size",
        dest="library",
        type=_library_arg,
        default=MATCHED,
        help="model library size: matched (default: each sample at the depth, and covariates, of a compared "
        "cell of its label), fixed (1e4, the reference's), or a number",
    )
    p.add_argument(
        "--by",
        default=None,
        help="a covariate of the run (e.g. cell_type): also score the cells of each level, the model at that "
        "level",
    )
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--name", default=None, help="the model's name in the table (default: its family)")
    p.add_argument(
        "--mc-seeds",
        type=positive_int,
        default=3,
        help="model ATEs at this many seeds: each model metric's Monte Carlo sd (<metric>_mc_sd; default 3)",
    )
    p.add_argument(
        "--ceiling-splits",
        type=non_negative_int,
        default=5,
        help="random halvings of the held-out cells for the noise ceiling (default 5; 0: no ceiling)",
    )
    p.add_argument(
        "--cells",
        action="store_true",
        help="also compare predicted with held-out cells (energy distance in a PCA; --n-cells per label)",
    )
    p.add_argument(
        "--n-cells",
        type=positive_int,
        default=500,
        help="predicted cells per label for --cells and --cell-eval (default 500)",
    )
    p.add_argument(
        "--cell-eval",
        action="store_true",
        help="also run cell-eval (pip install 'pyrovae[eval]') on predicted and held-out cells; "
        "tables in OUT/cell_eval/",
    )
    p.add_argument(
        "--cell-eval-profile",
        default="full",
        choices=["full", "vcc", "minimal", "de", "anndata"],
        help="cell-eval's metric profile (default full)",
    )
    p.add_argument("--out", default=None, help="output directory (default RUN/ate_<split>, RUN/ate_all)")
    p.add_argument("--overwrite", action="store_true")
    add_device_arg(p)
    p.set_defaults(func=run_ate)

    p = sub.add_parser("sample", help="sample posterior-predictive counts for perturbations (an .h5ad)")
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--perturbation",
        action="extend",
        nargs="+",
        required=True,
        help="labels like A, A+B, control (repeat or list several)",
    )
    p.add_argument("--n-cells", type=positive_int, default=1000, help="cells per perturbation (default 1000)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument(
        "--library",
        "--library-size",
        dest="library",
        type=_library_arg,
        default=DEFAULT_LIBRARY_SIZE,
        help="library size: a number (default 1e4) or matched (drawn from --data's cells of each label)",
    )
    p.add_argument(
        "--covariate",
        type=_covariate_arg,
        action="append",
        default=None,
        help="KEY=LEVEL to sample at (repeat for several keys; default: the training levels in proportion)",
    )
    p.add_argument("--data", default=None, help=".h5ad to draw library sizes from (with --library matched)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--overwrite", action="store_true")
    add_device_arg(p)
    p.set_defaults(func=run_sample)
