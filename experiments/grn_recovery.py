"""GRN recovery: GPO-VAE against its ablations, scored on a known gene regulatory network (GPO-VAE paper).

Protocol (shared/reference/gpo_vae_cradle_vae.md §4.5, §5.6, §4.9): a random 64/16/20 cell-level split,
fixed (split seed 0); the seeds are training seeds. The data is prepared with
:func:`pyrovae.data.prepare.prepare_gpo_data` (GRN nodes = perturbed genes + extended genes, QC flags,
counterfactual expression, OT pairing with controls and delta X), once, and shared by every run.

Models (``gpo_vae`` with the config's hyperparameters, and three ablations):

- ``gpo_vae``: the full model (GRN alignment loss with K-hop accumulation, sparsity penalty);
- ``no_grn_loss``: ``grn_weight = 0`` (the mask logits W get no GRN alignment; only the ELBO shapes them);
- ``no_k_hop``: ``grn_hops = 0`` (alignment of the direct effects W only, S = W);
- ``no_sparsity``: ``sparsity_weight = 0``.

Metrics: AUPRC and AUROC of the edge probabilities sigmoid(W) against the planted GRN (self-loops
excluded), on the perturbed-gene block and on every GRN gene; the number of edges with probability > 0.5;
plus non-model baselines (|correlation| of expression, differential expression of each perturbation,
random = edge density); test IWELBO and ATE Pearson r over all perturbations. The planted GRN is the
simulator's ground truth; for real data pass a reference edge list with ``--grn-truth`` (CSV with
``source``/``target`` columns, e.g. from a curated database), otherwise only the ATE/IWELBO metrics and
edge counts are reported.

Usage::

    python experiments/grn_recovery.py --out runs/exp/grn                             # simulated, small
    python experiments/grn_recovery.py --data adamson.h5ad --perturbation-key gene \\
        --control-label non-targeting --grn-genes-key FC2 --grn-truth edges.csv --full --out runs/exp/adamson
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd

from experiments import common
from pyrovae import report
from pyrovae.data.protocols import cell_split, split_summary

NAME = "grn_recovery"
BLOCKS = {"perturbed": "perturbed genes", "grn_genes": "all GRN genes"}
METRICS = {
    "auprc_perturbed": "AUPRC (perturbed)",
    "auroc_perturbed": "AUROC (perturbed)",
    "auprc_grn_genes": "AUPRC (all GRN genes)",
    "auroc_grn_genes": "AUROC (all GRN genes)",
    "edges": "edges p>0.5",
    "test_iwelbo": "test IWELBO",
    "ate_r": "ATE r (all cells)",
    "ate_r_top20": "ATE r top-20 (all cells)",
    "ate_r_heldout": "ATE r (test cells)",
}
FMTS = {"test_iwelbo": "{:.2f}", "edges": "{:.1f}"}


def build_parser():
    p = common.build_parser(NAME, __doc__)
    g = p.add_argument_group(NAME)
    common.add_split_seed_option(g)
    g.add_argument(
        "--grn-truth",
        default=None,
        help="CSV edge list (columns source, target) of a reference GRN to score against "
        "(default: the simulator's planted GRN; none for real data)",
    )
    g.add_argument(
        "--grn-genes-key",
        default=None,
        help="boolean var column of extended (never perturbed) GRN genes, e.g. FC2 (Adamson) / FC3 "
        "(Replogle) in the GPO-VAE files; default: var['grn_gene'] of simulated data",
    )
    g.add_argument(
        "--qc-key",
        default=None,
        help="obs column with the QC-failure flag (1 = fails); default: MAD flags computed from counts",
    )
    return p


def reference_grn(exp: common.Experiment, path: str | None) -> dict | None:
    """``{"grn_genes", "grn_adjacency"}`` of the reference network, or ``None`` when there is none."""
    if path:
        edges = pd.read_csv(path)
        missing = {"source", "target"} - set(edges.columns)
        if missing:
            raise ValueError(f"{path} needs columns 'source' and 'target' (missing {sorted(missing)})")
        genes = sorted(set(edges["source"].astype(str)) | set(edges["target"].astype(str)))
        pos = {g: i for i, g in enumerate(genes)}
        adj = np.zeros((len(genes), len(genes)), dtype=np.float32)
        adj[[pos[s] for s in edges["source"].astype(str)], [pos[t] for t in edges["target"].astype(str)]] = (
            1.0
        )
        return {"grn_genes": genes, "grn_adjacency": adj}
    if exp.source["kind"] == "simulated":
        from pyrovae.data.simulate import ground_truth

        return ground_truth(exp.adata)
    return None


def grn_metrics(run, data, truth: dict | None) -> dict[str, float]:
    """AUPRC/AUROC per block against ``truth`` and the number of edges with probability > 0.5."""
    from pyrovae.evaluate.grn_export import edge_counts, grn_edges, run_n_perturbed, score_run_grn

    n_pert = run_n_perturbed(run, data)
    counts = edge_counts(grn_edges(run, n_perturbed=n_pert))
    out: dict[str, float] = {
        "edges": float(sum(counts.values())),
        "edges_perturbed": float(counts["perturbed"]),
    }
    if truth is not None:
        table = score_run_grn(run, truth, data, baselines=False)
        for _, r in table.iterrows():
            for metric in ("auprc", "auroc"):
                if metric in r and pd.notna(r[metric]):
                    out[f"{metric}_{r['block']}"] = float(r[metric])
    return out


def baseline_rows(run, data, truth: dict) -> list[dict]:
    """The non-model GRN baselines (correlation, differential expression, random) as results rows."""
    from pyrovae.evaluate.grn_export import score_run_grn

    table = score_run_grn(run, truth, data, baselines=True)
    rows: dict[str, dict] = {}
    for _, r in table[table["method"] != "gpo_vae"].iterrows():
        row = rows.setdefault(r["method"], {"model": f"baseline: {r['method']}", "seed": -1})
        for metric in ("auprc", "auroc"):
            if metric in r and pd.notna(r[metric]):
                row[f"{metric}_{r['block']}"] = float(r[metric])
    return list(rows.values())


def summarise(exp: common.Experiment) -> str:
    res = exp.results_frame()
    agg = report.aggregate(res, ["model"], list(METRICS) + ["train_s"], order={"model": exp.models})
    table = report.format_summary(agg, ["model"], METRICS, FMTS).rename(columns={"n": "seeds"})
    notes = [
        f"{exp.source['description']}; budget {exp.settings['budget']}; "
        f"training seeds {exp.seeds}; cell split "
        f"64/16/20 with split seed {exp.settings['split_seed']}.",
        "Ablations: no_grn_loss = grn_weight 0; no_k_hop = grn_hops 0 (S = W); "
        "no_sparsity = sparsity_weight 0.",
        "AUPRC/AUROC of sigmoid(W) against the reference GRN, self-loops excluded; 'perturbed' = edges "
        "between perturbed genes, 'all GRN genes' = perturbed + extended genes. baseline: random has "
        "AUPRC = edge density and AUROC = 0.5.",
        "ATE over all perturbations ('all cells' = the reference's empirical ATE; 'test cells' = held-out).",
    ]
    if exp.settings.get("grn_truth") is None:
        notes.append("No reference GRN: AUPRC/AUROC not computed (pass --grn-truth edges.csv).")
    md = exp.write_table("summary", table, "GRN recovery: GPO-VAE and ablations", notes, raw=agg)
    common.plot_bars(
        agg,
        "model",
        {
            "auprc_perturbed": "AUPRC (perturbed genes)",
            "auprc_grn_genes": "AUPRC (all GRN genes)",
            "ate_r": "ATE r (all cells)",
        },
        exp.out / "grn_recovery.png",
        title="GRN recovery",
    )
    return md


def main(argv=None) -> int:
    from pyrovae.data.grn import var_grn_genes
    from pyrovae.data.prepare import prepare_gpo_data

    args = build_parser().parse_args(argv)
    exp = common.Experiment(NAME, args)
    split_seed = common.split_seed(args, exp)
    truth = reference_grn(exp, args.grn_truth)
    exp.settings["grn_truth"] = "simulated" if truth is not None and not args.grn_truth else args.grn_truth
    labels, ctrl = exp.labels()
    split = cell_split(labels, seed=split_seed)
    summary = split_summary(split, labels, ctrl, args.combo_sep)
    extra_genes = None
    key = args.grn_genes_key or ("grn_gene" if "grn_gene" in exp.adata.var.columns else None)
    if key:
        if key not in exp.adata.var.columns:
            raise ValueError(f"var has no column {key!r}; var columns are {list(exp.adata.var.columns)}")
        extra_genes = var_grn_genes(exp.adata, key)
    import time

    t0 = time.perf_counter()
    data = prepare_gpo_data(
        exp.load(split),
        extra_genes=extra_genes,
        qc_key=args.qc_key,
        seed=split_seed,
        **(exp.settings.get("prepare") or {}),
    )
    exp.log(
        f"prepared GPO data in {time.perf_counter() - t0:.1f}s: {data.n_treatments} GRN nodes, "
        f"{len(data.indices('train'))} train / {len(data.indices('val'))} val / {len(data.indices('test'))} "
        "test cells"
    )
    perts = sorted(set(data.labels[data.indices("test")]) - {data.control_label})
    baselines_done = False
    for seed in exp.seeds:
        for model in exp.models:
            mcfg, tcfg = exp.configs(model, seed=seed)
            scored = exp.fit_and_score(
                data,
                model,
                mcfg,
                tcfg,
                f"seed{seed}/{model}",
                perts,
                tags={"model": model, "seed": seed},
                extra=lambda run: grn_metrics(run, data, truth),
            )
            if truth is not None and not baselines_done:
                for row in baseline_rows(scored.run, data, truth):
                    exp.record(row)
                baselines_done = True
    md = summarise(exp)
    exp.finish({"split": summary, "split_seed": split_seed, "grn_nodes": list(data.treatments)})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
