"""``pyrovae grn``: export a GPO-VAE run's gene regulatory network, and score it.

::

    pyrovae grn RUN [--out grn.csv] [--self-loops] [--min-prob 0] [--overwrite]
                    [--data x.h5ad [--truth] [--statistical]]
                    [--reference EDGES.csv [--undirected] [--top-k 100] [--permutations 1000]]

- writes every edge (source, target, probability = sigmoid(W), block) to ``--out`` atomically, refusing to
  overwrite an existing file unless ``--overwrite``; prints the number of edges with probability > 0.5 in
  each block (``perturbed``: both ends perturbed genes; ``extended``: any end a never-perturbed GRN gene);
- ``--data``: the data the run was trained on (read with the run's schema and split options), used to tell
  perturbed from extended genes (held-out perturbations included) and for the scores below;
- ``--truth``: the data is a simulated ``.h5ad`` (``pyrovae simulate``): score sigma(W) against its planted
  GRN (AUROC, AUPRC, precision/recall at 0.5) next to the correlation, differential-expression and random
  baselines; ``--scores-out`` writes that table as CSV;
- ``--statistical``: CausalBench-style evaluation of the edges with probability > ``--edge-threshold`` on
  the held-out (test) cells: Mann-Whitney test of child expression, control versus parent-perturbed cells
  (true/false positives, mean Wasserstein distance), and the false omission rate on random non-edges; then
  the same for the top-k edges of GPO-VAE and of the DE / deconvolved-DE / correlation baselines, k = the
  number of GPO-VAE edges tested (mu-WD falls with the edge count, so only matched counts compare);
- ``--reference``: the user's interaction list (source, target[, sign]; CSV or TSV: CollecTRI, DoRothEA,
  STRING, ...): GPO-VAE's sigma(W) and, with ``--data``, every GRN baseline scored against it (AUROC, AUPRC,
  enrichment over the prevalence, precision at ``--top-k``, a node-permutation p-value of the AUPRC; sign
  accuracy where the list and the method have signs;
  :func:`pyrovae.evaluate.grn_reference.score_run_reference`),
  written to ``--reference-out`` (default ``RUN/grn_reference_<list name>.csv``) with a summary beside it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from pyrovae.commands.common import (
    add_device_arg,
    command_device,
    non_negative_int,
    positive_int,
    refuse_existing,
    run_lock_if_inside,
    seed_int,
)
from pyrovae.data.anndata import read_anndata
from pyrovae.evaluate.grn_export import (
    edge_counts,
    grn_edges,
    run_n_perturbed,
    score_run_grn,
    statistical_scores,
)
from pyrovae.evaluate.grn_reference import score_run_reference
from pyrovae.evaluate.knowledge import read_interactions
from pyrovae.outputs import atomic_write, atomic_write_all, check_not_owned, json_writer
from pyrovae.runs import load_run
from pyrovae.simulate import ground_truth


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if not math.isfinite(float(v)) else f"{float(v):.3f}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _reference_paths(args: argparse.Namespace) -> tuple[Path, Path] | None:
    if not args.reference:
        return None
    ref = Path(args.reference)
    out = Path(args.reference_out) if args.reference_out else Path(args.run) / f"grn_reference_{ref.stem}.csv"
    if out.suffix != ".csv":
        raise ValueError(f"--reference-out {out} must end in .csv (the summary goes beside it as .json)")
    return out, out.with_name(out.stem + "_summary.json")


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.reference:
        raise ValueError(
            "nothing to do: give --out (the edge table) and/or --reference (an interaction list)"
        )
    out = Path(args.out) if args.out else None
    ref_paths = _reference_paths(args)
    for path, flag in (
        (out, "--out"),
        (args.scores_out, "--scores-out"),
        *((p, "--reference-out") for p in ref_paths or ()),
    ):
        if path is not None:
            check_not_owned(path, flag)
    if out is not None and out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    if ref_paths:
        refuse_existing(list(ref_paths), args.overwrite)
    reference = read_interactions(args.reference) if args.reference else None
    if (args.truth or args.statistical) and not args.data:
        raise ValueError("--truth and --statistical need the data (--data x.h5ad)")
    for flag, value in (("--min-prob", args.min_prob), ("--edge-threshold", args.edge_threshold)):
        if not 0 <= value <= 1:  # NaN fails too
            raise ValueError(f"{flag} is a probability and must be in [0, 1], got {value}")
    run_ = load_run(args.run, checkpoint=args.checkpoint, device=command_device(args))
    data = None
    adata = None
    if args.data:
        adata = read_anndata(args.data)
        overrides = {"split_key": args.split_key} if args.split_key else {}
        data = run_.load_data(adata, **overrides)
        if args.split_key and args.statistical:
            run_.warn_seen(data, args.split, args.split_key)
    n_pert = run_n_perturbed(run_, data)
    edges = grn_edges(run_, n_perturbed=n_pert, include_self_loops=args.self_loops, min_prob=args.min_prob)
    counts = edge_counts(edges, 0.5)
    T = len(run_.treatments)
    if out is not None:
        atomic_write(out, lambda tmp: edges.to_csv(tmp, index=False))
        print(
            f"wrote {out}: {len(edges)} edges among {T} GRN nodes ({n_pert} perturbed, {T - n_pert} "
            f"extended); probability > 0.5: {counts['perturbed']} perturbed-block, "
            f"{counts['extended']} extended-block"
        )
    blind = int(((edges["probability"] > 0.5) & ~edges["regulator_perturbed"]).sum())
    if blind:
        print(
            f"note: {blind} of the edges above 0.5 leave a gene with no perturbed training cell "
            "(regulator_perturbed = False): no knock-down informs those rows, so read them as no evidence"
        )
    if args.truth:
        truth = ground_truth(adata)
        scores = score_run_grn(run_, truth, data, baselines=True, split="train")
        cols = ["method", "block", "auroc", "auprc", "precision_at_k", "precision", "recall", "n_pred_edges"]
        cols += ["n_true_edges", "sign_accuracy"]
        print("GRN recovery against the planted GRN (self-loops excluded; baselines on training cells):")
        print(_table(scores.to_dict(orient="records"), [c for c in cols if c in scores.columns]))
        if args.scores_out:
            sp = Path(args.scores_out)
            if sp.exists() and not args.overwrite:
                raise FileExistsError(f"{sp} exists; pass --overwrite to replace it")
            atomic_write(sp, lambda tmp: scores.to_csv(tmp, index=False))
    if reference is not None:
        table, report = score_run_reference(
            run_,
            reference,
            data,
            undirected=args.undirected,
            top_k=args.top_k,
            n_permutations=args.permutations,
            seed=args.seed,
        )
        report["reference_file"] = str(args.reference)
        ref_out, ref_json = ref_paths
        with run_lock_if_inside(ref_out, Path(args.run)):
            atomic_write_all(
                {
                    ref_out: lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"),
                    ref_json: json_writer(report),
                }
            )
        print(
            f"wrote {ref_out}: {report['n_edges_matched']} of the {report['n_edges']} edges of "
            f"{Path(args.reference).name} join two of the run's {T} GRN genes "
            f"({report['n_genes_matched']} of its {report['n_genes']} genes matched; "
            f"{report['n_signed_matched']} signed)"
            + ("" if data is not None else "; pass --data for the baselines (|DE|, deconvolved DE, ...)")
        )
        cols = [
            "method",
            "block",
            "auroc",
            "auprc",
            "random_auprc",
            "enrichment",
            "p_value",
            "precision_at_top",
        ]
        cols += ["sign_accuracy", "sign_majority"]
        print(
            f"against the reference (self-loops excluded; precision at the top {args.top_k}; p-value: "
            f"{args.permutations} node permutations; baselines on training cells):"
        )
        print(_table(table.to_dict(orient="records"), [c for c in cols if c in table.columns]))
    if args.statistical:
        res, matched = statistical_scores(
            run_, data, edges, args.edge_threshold, args.split, n_pert, args.seed
        )
        print(
            f"statistical evaluation on the {args.split!r} cells (edges with probability > "
            f"{args.edge_threshold}, perturbed block):"
        )
        print(
            json.dumps(
                {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.items()},
                indent=2,
            )
        )
        if matched is not None:
            k = int(matched["k"].iloc[0])
            print(
                f"at a matched edge count (each method's top {k} perturbed-block edges; "
                "baselines on training cells):"
            )
            print(_table(matched.reset_index().to_dict(orient="records"), ["method", *matched.columns]))
    return 0


def register(sub) -> None:
    p = sub.add_parser("grn", help="export (and score) the gene regulatory network of a GPO-VAE run")
    p.add_argument("run", help="run directory of a trained gpo_vae model")
    p.add_argument("--out", default=None, help="output edge table (.csv)")
    p.add_argument("--self-loops", action="store_true", help="keep j -> j edges")
    p.add_argument("--min-prob", type=float, default=0.0, help="drop edges below this probability")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--data", default=None, help="the .h5ad the run was trained on")
    p.add_argument("--split-key", default=None, help="obs column with train/val/test (default: the run's)")
    p.add_argument("--truth", action="store_true", help="score against the planted GRN of a simulated --data")
    p.add_argument("--scores-out", default=None, help="with --truth: write the score table here (.csv)")
    p.add_argument(
        "--statistical",
        action="store_true",
        help="CausalBench-style statistical evaluation on held-out cells",
    )
    p.add_argument("--split", default="test", help="cells of --statistical (default: test)")
    p.add_argument("--edge-threshold", type=float, default=0.5, help="edges of --statistical: probability >")
    p.add_argument(
        "--reference", default=None, help="interaction list to score against (CSV/TSV: source,target[,sign])"
    )
    p.add_argument(
        "--reference-out", default=None, help="its score table (default RUN/grn_reference_<name>.csv)"
    )
    p.add_argument("--undirected", action="store_true", help="the list's edges count in both directions")
    p.add_argument("--top-k", type=positive_int, default=100, help="k of the reference's precision at k")
    p.add_argument(
        "--permutations", type=non_negative_int, default=1000, help="node permutations of the reference null"
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed of --statistical's negatives and --reference's null"
    )
    add_device_arg(p)
    p.set_defaults(func=run)
