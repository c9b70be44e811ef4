"""``pyrovae enrich``: gene-set enrichment of a run's latent dimensions (the user's GMT file).

::

    pyrovae enrich RUN --gene-sets FILE.gmt [--out TABLE.csv] [--n-cells 256] [--permutations 10000]
                       [--min-size 3] [--max-size 500] [--seed 0] [--overwrite]

For each latent dimension and gene set: enrichment of the genes the dimension drives (decoder
sensitivity) and of the perturbations whose masks use it, AUROC with a permutation p-value and
Benjamini-Hochberg FDR; and whether perturbations whose targets share a set share latent dimensions
(:func:`pyrovae.evaluate.enrichment.latent_enrichment`). Writes the table (default
``RUN/enrichment_<gmt name>.csv``) and a summary beside it (``..._summary.json``) atomically, refusing to
overwrite them unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pyrovae.commands.common import (
    add_device_arg,
    command_device,
    non_negative_int,
    positive_int,
    refuse_existing,
    run_lock_if_inside,
    seed_int,
)
from pyrovae.evaluate.enrichment import latent_enrichment
from pyrovae.evaluate.knowledge import read_gene_sets
from pyrovae.outputs import atomic_write_all, check_not_owned, json_writer
from pyrovae.report import markdown_table
from pyrovae.runs import load_run


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    gmt = Path(args.gene_sets)
    out = Path(args.out) if args.out else run_dir / f"enrichment_{gmt.stem}.csv"
    if out.suffix != ".csv":
        raise ValueError(f"--out {out} must end in .csv (the summary goes beside it as .json)")
    if not 0 < args.fdr <= 1:  # NaN fails too
        raise ValueError(f"--fdr is a false discovery rate and must be in (0, 1], got {args.fdr}")
    out_json = out.with_name(out.stem + "_summary.json")
    for path in (out, out_json):
        check_not_owned(path)
    refuse_existing([out, out_json], args.overwrite)
    gene_sets = read_gene_sets(gmt)
    run_ = load_run(run_dir, checkpoint=args.checkpoint, device=command_device(args))
    table, summary = latent_enrichment(
        run_,
        gene_sets,
        n_cells=args.n_cells,
        n_permutations=args.permutations,
        min_size=args.min_size,
        max_size=args.max_size or None,
        seed=args.seed,
    )
    summary["gene_sets_file"] = str(gmt)
    with run_lock_if_inside(out, run_dir):
        atomic_write_all(
            {
                out: lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"),
                out_json: json_writer(summary),
            }
        )
    g = summary["genes"]
    print(
        f"wrote {out} ({len(table)} tests) and {out_json.name}: {g['n_matched_genes']} of the "
        f"{g['n_set_genes']} genes of {gmt.name}'s {g['n_sets']} sets are genes of the run; "
        f"{g['n_sets_tested']} sets tested on genes"
        + (
            f", {summary['perturbations']['n_sets_tested']} on perturbations (by {summary['usage']})"
            if "perturbations" in summary
            else f" (perturbations not tested: {summary['usage']})"
        )
    )
    for level, part in table.groupby("level", sort=True):
        hits = part[part["fdr"] < args.fdr]
        print(f"{level}: {len(hits)} of {len(part)} (dimension, set) tests at FDR < {args.fdr:g}")
        top = part.head(args.show)
        cols = ["dimension", "gene_set", "n_members", "auroc", "p_value", "fdr", "leading"]
        print(markdown_table(top[cols], floatfmt="{:.3g}", index=False))
    c = summary.get("comembership")
    if c:
        auc = "nan" if not math.isfinite(c["auroc"]) else f"{c['auroc']:.3f}"
        print(
            f"perturbations sharing a gene set share latent dimensions: AUROC {auc} (permutation p = "
            f"{c['p_value']:.3g}; {c['n_perturbations']} annotated perturbations, {c['n_positive_pairs']} of "
            f"{c['n_pairs']} pairs share a set)"
        )
    return 0


def register(sub) -> None:
    p = sub.add_parser("enrich", help="gene-set enrichment of a run's latent dimensions (a GMT file)")
    p.add_argument("run", help="run directory of a trained model")
    p.add_argument(
        "--gene-sets", required=True, help="gene sets, GMT format (NAME<TAB>DESCRIPTION<TAB>GENES...)"
    )
    p.add_argument("--out", default=None, help="output table (.csv; default RUN/enrichment_<gmt name>.csv)")
    p.add_argument("--n-cells", type=positive_int, default=256, help="cells of the decoder sensitivity")
    p.add_argument(
        "--permutations", type=non_negative_int, default=10000, help="random sets (shuffles) per p-value"
    )
    p.add_argument("--min-size", type=positive_int, default=3, help="fewest set members in the data to test")
    p.add_argument("--max-size", type=non_negative_int, default=500, help="most set members (0: no limit)")
    p.add_argument("--fdr", type=float, default=0.05, help="FDR level of the printed counts")
    p.add_argument("--show", type=positive_int, default=10, help="rows printed per level")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the cells and of the permutation nulls")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    add_device_arg(p)
    p.set_defaults(func=run)
