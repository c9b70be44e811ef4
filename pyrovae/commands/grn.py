"""``pyrovae grn``: export a GPO-VAE run's gene regulatory network, and score it.

::

    pyrovae grn RUN --out grn.csv [--self-loops] [--min-prob 0] [--overwrite]
                    [--data x.h5ad [--truth] [--statistical]]

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
  number of GPO-VAE edges tested (mu-WD falls with the edge count, so only matched counts compare).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from pyrovae.commands.common import add_device_arg, command_device, seed_int
from pyrovae.data.anndata import read_anndata
from pyrovae.evaluate.grn_export import (
    edge_counts,
    grn_edges,
    run_n_perturbed,
    score_run_grn,
    statistical_scores,
)
from pyrovae.outputs import atomic_write, check_not_owned
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


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_not_owned(out)
    if args.scores_out:
        check_not_owned(args.scores_out, "--scores-out")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
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
    atomic_write(out, lambda tmp: edges.to_csv(tmp, index=False))
    counts = edge_counts(edges, 0.5)
    T = len(run_.treatments)
    print(
        f"wrote {out}: {len(edges)} edges among {T} GRN nodes ({n_pert} perturbed, {T - n_pert} extended); "
        f"probability > 0.5: {counts['perturbed']} perturbed-block, {counts['extended']} extended-block"
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
    p.add_argument("--out", required=True, help="output edge table (.csv)")
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
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the negative sampling of --statistical")
    add_device_arg(p)
    p.set_defaults(func=run)
