"""GRN recovery: GPO-VAE against its ablations, scored on a known gene regulatory network (GPO-VAE paper).

Protocol (the GPO-VAE paper's code: GRN alignment, split and settings): a random 64/16/20 cell-level split,
fixed (split seed 0); the seeds are training seeds. The data is prepared with
:func:`pyrovae.data.prepare.prepare_gpo_data` (GRN nodes = perturbed genes + extended genes, QC flags,
counterfactual expression, OT pairing with controls and delta X), once, and shared by every run.
``--holdout PG03,PG11`` first moves every cell of those perturbations (combinations included) to test
(:func:`pyrovae.data.prepare.holdout_perturbations`), and then also scores their ATE as predicted through
the GRN against the prior fallback, zero and the seen mean (``unseen.csv``).

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

Every run's GRN scores against the reference, baselines included (every column of
:func:`pyrovae.evaluate.grn_export.score_run_grn`), go to ``grn_scores.csv``.

**The GRN check preset** (``--config experiments/configs/gpo_grn_check.yaml``; it replaces the former
``gpo_grn_check.py``): one GPO-VAE with the reference's GRN settings (threshold 0.65, mask prior 0.3,
K = 5 hops, lr 2e-3, 80 epochs) on the data layer's seeded 80/10/10 split (``split: data``), for a study of
one setting at a time: every other setting is a ``--set`` (see experiments/README.md).

Usage::

    python -m experiments.grn_recovery --out runs/exp/grn                             # simulated, small
    python -m experiments.grn_recovery --config experiments/configs/gpo_grn_check.yaml --out runs/check \
        --sim-seed 0 --split-seed 0 --seeds 0 --holdout PG03 --set grn_singles_only=true mask_lr=0.02
    python -m experiments.grn_recovery --data adamson.h5ad --perturbation-key gene \\
        --control-label non-targeting --grn-genes-key FC2 --grn-truth edges.csv --full --out runs/exp/adamson
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import pandas as pd

from experiments import common
from pyrovae import report
from pyrovae.data.grn import UNS_KEY, var_grn_genes
from pyrovae.data.prepare import holdout_perturbations, prepare_gpo_data
from pyrovae.data.protocols import canonical_labels, cell_split, make_split, split_summary
from pyrovae.evaluate.ate import ate_table
from pyrovae.evaluate.empirical import empirical_ate
from pyrovae.evaluate.grn_export import edge_counts, grn_edges, run_n_perturbed, score_run_grn
from pyrovae.predict.posterior import Posterior
from pyrovae.simulate import ground_truth

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
    g.add_argument(
        "--holdout",
        default="",
        help="comma-separated perturbed genes to hold out (all their cells, combinations included, go to "
        "test); then also compare the GRN-based prediction of their ATE with the prior fallback",
    )
    g.add_argument(
        "--pairing-method",
        default=None,
        choices=["auto", "emd", "sinkhorn"],
        help="OT pairing of perturbed cells with controls (default: the config's 'prepare', else auto)",
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
        return ground_truth(exp.adata)
    return None


def grn_metrics(run, data, table: pd.DataFrame | None) -> dict[str, float]:
    """AUPRC/AUROC per block (``table``: the run's own :func:`score_run_grn` rows; None without a reference
    GRN) and the number of edges with probability > 0.5."""
    n_pert = run_n_perturbed(run, data)
    counts = edge_counts(grn_edges(run, n_perturbed=n_pert))
    out: dict[str, float] = {
        "edges": float(sum(counts.values())),
        "edges_perturbed": float(counts["perturbed"]),
    }
    if table is not None:
        for _, r in table.iterrows():
            for metric in ("auprc", "auroc"):
                if metric in r and pd.notna(r[metric]):
                    out[f"{metric}_{r['block']}"] = float(r[metric])
    return out


def baseline_rows(table: pd.DataFrame) -> list[dict]:
    """The non-model GRN baselines (correlation, differential expression, random) of a
    :func:`score_run_grn` table as results rows."""
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
        f"training seeds {exp.seeds}; "
        + (
            f"the data layer's seeded 80/10/10 cell split (split seed {exp.settings['split_seed']})"
            if exp.settings.get("split") == "data"
            else f"cell split 64/16/20 with split seed {exp.settings['split_seed']}"
        )
        + (f"; held-out perturbations {exp.settings['holdout']}." if exp.settings.get("holdout") else "."),
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


def make_cell_split(exp: common.Experiment, labels: np.ndarray, ctrl: str, seed: int) -> np.ndarray:
    """The config's split: ``cells`` (default) the protocol's 64/16/20 cell split, ``data`` the data
    layer's seeded 80/10/10 stratified split (what ``pyrovae train`` makes with ``--split-seed``)."""
    kind = exp.settings.setdefault("split", "cells")
    if kind == "cells":
        return cell_split(labels, seed=seed)
    if kind == "data":
        canon = canonical_labels(labels, ctrl, exp.args.combo_sep)[0]
        return make_split(canon, ctrl, exp.args.combo_sep, mode="cells", seed=seed)
    raise ValueError(f"{exp.settings['config_path']}: split must be 'cells' or 'data', got {kind!r}")


def unseen_references(data, held: list[str]) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """The data-only part of :func:`unseen_check`, the same for every run: the test labels containing a
    held-out perturbation, their empirical ATE (test cells vs test controls) and the zero-effect and
    seen-singles-mean predictions (the mean ATE of the seen single perturbations on the training cells)."""
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
    trivial = {
        "zero_effect": pd.DataFrame(0.0, index=truth.index, columns=truth.columns),
        "seen_mean": pd.DataFrame(
            np.tile(seen_ate.to_numpy().mean(0), (len(groups), 1)), index=truth.index, columns=truth.columns
        ),
    }
    return groups, truth, trivial


def unseen_check(run, references, n_samples: int, seed: int) -> pd.DataFrame:
    """ATE of the held-out perturbations (test cells vs test controls) against: the GRN-based prediction
    (``Posterior``, whose GPO block transfers unseen rows through the GRN), the prior fallback
    (``Posterior(transfer=False)``), zero (the control state, what the reference's mask_test predicts)
    and the mean ATE of the seen single perturbations on the training cells (``references``:
    :func:`unseen_references`)."""
    groups, truth, trivial = references
    with warnings.catch_warnings():  # the prior fallback is a deliberate control here
        warnings.filterwarnings("ignore", message=".*drawn from the prior.*")
        prior = Posterior.from_run(run, transfer=False).model_ate(groups, n_samples, seed=seed)
    preds = {
        "gpo_grn_prediction": Posterior.from_run(run).model_ate(groups, n_samples, seed=seed),
        "prior_fallback": prior,
        **trivial,
    }
    cols = ["pearson", "pearson_topk", "mse", "direction_acc_topk", "jaccard_topk", "n_perturbations"]
    return ate_table(truth, preds)[cols]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exp = common.Experiment(NAME, args)
    split_seed = common.split_seed(args, exp)
    truth = reference_grn(exp, args.grn_truth)
    exp.settings["grn_truth"] = "simulated" if truth is not None and not args.grn_truth else args.grn_truth
    labels, ctrl = exp.labels()
    split = make_cell_split(exp, labels, ctrl, split_seed)
    summary = split_summary(split, labels, ctrl, args.combo_sep)
    extra_genes = None
    key = args.grn_genes_key or ("grn_gene" if "grn_gene" in exp.adata.var.columns else None)
    if key:
        if key not in exp.adata.var.columns:
            raise ValueError(f"var has no column {key!r}; var columns are {list(exp.adata.var.columns)}")
        extra_genes = var_grn_genes(exp.adata, key)
    held = [h.strip() for h in args.holdout.split(",") if h.strip()]
    exp.settings["holdout"] = held
    prep = dict(exp.settings.get("prepare") or {})
    if args.pairing_method:
        prep["pairing_method"] = args.pairing_method
    data = exp.load(split)
    if held:
        data = holdout_perturbations(data, held)
    t0 = time.perf_counter()
    preset_qc_key = prep.pop("qc_key", None)  # always out of prep: it is passed once, by name
    qc_key = args.qc_key or preset_qc_key
    data = prepare_gpo_data(data, extra_genes=extra_genes, qc_key=qc_key, seed=split_seed, **prep)
    prep_s = time.perf_counter() - t0
    exp.log(
        f"prepared GPO data in {prep_s:.1f}s: {data.n_treatments} GRN nodes, "
        f"{len(data.indices('train'))} train / {len(data.indices('val'))} val / {len(data.indices('test'))} "
        "test cells"
    )
    perts = sorted(set(data.labels[data.indices("test")]) - {data.control_label})
    base = None  # the GRN baselines: data only, the same for every run, scored once (with the first run)
    own: dict[str, pd.DataFrame | None] = {}  # the current run's own GRN scores, scored once

    def run_metrics(run) -> dict[str, float]:
        own["grn"] = None if truth is None else score_run_grn(run, truth, data, baselines=False)
        return grn_metrics(run, data, own["grn"])

    scores, unseen = [], []
    references = unseen_references(data, held) if held else None
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
                extra=run_metrics,
            )
            if truth is not None:
                if base is None:
                    full = score_run_grn(scored.run, truth, data)
                    base = full[full["method"] != "gpo_vae"]
                    for row in baseline_rows(base):
                        exp.record(row)
                table = pd.concat([own["grn"], base], ignore_index=True)
                scores.append(table.assign(model=model, seed=seed))
                common.write_frame(exp.out / "grn_scores.csv", pd.concat(scores, ignore_index=True))
            if held:
                ev = exp.settings["eval"]
                # seeded by the training seed, as the former gpo_grn_check.py
                table = unseen_check(scored.run, references, int(ev["ate_samples"]), seed)
                unseen.append(table.reset_index().assign(model=model, seed=seed))
                common.write_frame(exp.out / "unseen.csv", pd.concat(unseen, ignore_index=True))
    md = summarise(exp)
    timings = data.uns[UNS_KEY]["timings"]
    exp.finish(
        {
            "split": summary,
            "split_seed": split_seed,
            "grn_nodes": list(data.treatments),
            "prepare_seconds": prep_s,
            "pairing_seconds": timings.get("pairing_s"),
        }
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
