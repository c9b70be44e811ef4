"""Prior knowledge recovered on simulated data with planted structure (issue 28, user knowledge half).

For each seed: simulate a dataset (``pyrovae simulate``), write the knowledge a user would bring, built from
the simulator's truth, and a shuffled copy of it (the negative control):

- ``planted.gmt``: one set per true latent dimension k: the target genes of the perturbations whose planted
  mask uses k, and the ``--top-genes`` genes the true decoder drives most along k (largest
  ``|E_z d log softmax(eta(z))_g / d z_k|``, z ~ N(0, I)); ``shuffled.gmt``: the same set sizes filled with
  genes drawn at random from the data's genes;
- ``planted.csv``: the planted GRN's edges (source, target, sign of the weight); ``shuffled.csv``: as many
  random ordered pairs of GRN genes with random signs.

Then trains the zoo's ``sams_vae`` and ``gpo_vae`` (``pyrovae train``, the demos' settings) and a control,
SAMS-VAE with q(M) fixed at the planted masks (``sams_vae_planted_masks``: latent k is planted dimension k),
and runs the commands a user would:
``pyrovae enrich SAMS_RUN --gene-sets planted.gmt`` (and shuffled.gmt) and
``pyrovae grn GPO_RUN --reference planted.csv --data data.h5ad`` (and shuffled.csv). ``results.csv``: one
row per (seed, knowledge, metric); ``summary.md``: mean ± sd over seeds.

Usage::

    python -m experiments.knowledge_recovery --out runs/exp/knowledge --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from pyrovae.cli import main as cli
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.models.zoo import model_config
from pyrovae.runs import train_run
from pyrovae.simulate import ground_truth
from pyrovae.train.trainer import TrainConfig

SIM = ["n_control_cells=800", "cells_per_single=80", "cells_per_double=60"]
#: the demos' training settings (pyrovae.commands.demo and demo_gpo)
TRAIN_CFG = {
    "sams_vae": dict(lr=2e-3, batch_size=256, n_particles=3, val_particles=3, patience=10),
    "gpo_vae": dict(lr=2e-3, mask_lr=0.02, batch_size=512, n_particles=3, val_particles=3, patience=20),
}
EPOCHS = {"sams_vae": 120, "gpo_vae": 40}
PLANTED_RUN = "sams_vae_planted_masks"


def true_sensitivity(truth: dict, n: int = 2000, seed: int = 0) -> np.ndarray:
    """(K, G) E_z[d log softmax(baseline + tanh(z W1 + b1) W2) / d z_k] of the simulator's decoder."""
    dec = truth["decoder"]
    W1, b1, W2 = (np.asarray(dec[k], dtype=np.float64) for k in ("W1", "b1", "W2"))
    base = np.asarray(truth["baseline"], dtype=np.float64)
    z = np.random.default_rng(seed).standard_normal((n, W1.shape[0]))
    h = np.tanh(z @ W1 + b1)  # (n, H)
    eta = base + h @ W2
    p = np.exp(eta - eta.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = []
    for k in range(W1.shape[0]):
        d_eta = ((1 - h**2) * W1[k]) @ W2  # (n, G)
        out.append((d_eta - (p * d_eta).sum(1, keepdims=True)).mean(0))
    return np.stack(out)


def write_knowledge(adata: ad.AnnData, folder: Path, top_genes: int, seed: int) -> dict:
    truth = ground_truth(adata)
    genes = np.asarray(adata.var_names).astype(str)
    treatments = np.asarray(truth["treatments"]).astype(str)
    masks = np.asarray(truth["masks"]) != 0
    J = np.abs(true_sensitivity(truth, seed=seed))
    rng = np.random.default_rng([seed, 28])
    planted, shuffled = [], []
    for k in range(masks.shape[1]):
        members = (
            list(treatments[masks[:, k]])
            + [g for g in genes[np.argsort(-J[k])] if g not in treatments][:top_genes]
        )
        planted.append(f"DIM{k}\tplanted latent dimension {k}\t" + "\t".join(members))
        rand = rng.choice(genes, size=len(members), replace=False)
        shuffled.append(f"RANDOM{k}\tshuffled\t" + "\t".join(rand))
    (folder / "planted.gmt").write_text("\n".join(planted) + "\n")
    (folder / "shuffled.gmt").write_text("\n".join(shuffled) + "\n")
    adj = np.asarray(truth["grn_adjacency"])
    grn = np.asarray(truth["grn_genes"]).astype(str)
    src, tgt = np.nonzero(adj)
    pd.DataFrame({"source": grn[src], "target": grn[tgt], "sign": np.sign(adj[src, tgt]).astype(int)}).to_csv(
        folder / "planted.csv", index=False
    )
    pairs = [(a, b) for a in range(len(grn)) for b in range(len(grn)) if a != b]
    pick = rng.choice(len(pairs), size=len(src), replace=False)
    pd.DataFrame(
        {
            "source": [grn[pairs[i][0]] for i in pick],
            "target": [grn[pairs[i][1]] for i in pick],
            "sign": rng.choice([-1, 1], size=len(pick)),
        }
    ).to_csv(folder / "shuffled.csv", index=False)
    return {"n_edges": int(len(src)), "n_sets": int(masks.shape[1])}


def enrichment_rows(d: Path, run: str, kind: str, seed: int, permutations: int) -> list[dict]:
    """``pyrovae enrich`` of one run with one GMT, summarised."""
    csv = d / f"enrichment_{run}_{kind}.csv"
    args = ["enrich", str(d / run), "--gene-sets", str(d / f"{kind}.gmt"), "--out", str(csv)]
    assert cli([*args, "--overwrite", "--permutations", str(permutations), "--seed", str(seed)]) == 0
    table = pd.read_csv(csv)
    summary = pd.read_json(csv.with_name(csv.stem + "_summary.json"), typ="series")
    tag = {"seed": seed, "knowledge": kind, "run": run}
    rows = []
    for level, part in table.groupby("level"):
        best = part.groupby("gene_set")["fdr"].min()
        top = part.groupby("gene_set")["auroc"].max().mean()
        # the dimension where each planted set DIMk is most enriched, against k (the control ties them)
        where = part.sort_values(["p_value", "auroc"], ascending=[True, False]).groupby("gene_set").first()
        own = [f"z{name[3:]}" == dim for name, dim in where["dimension"].items() if name.startswith("DIM")]
        rows += [
            {**tag, "metric": f"{level}: sets found (FDR<0.05)", "value": float((best < 0.05).mean())},
            {
                **tag,
                "metric": f"{level}: best dimension is the planted one",
                "value": np.mean(own) if own else None,
            },
            {**tag, "metric": f"{level}: tests at FDR<0.05", "value": float((part["fdr"] < 0.05).sum())},
            {**tag, "metric": f"{level}: best AUROC per set (mean)", "value": float(top)},
        ]
    c = summary.get("comembership") or {}
    rows.append({**tag, "metric": "co-membership AUROC", "value": c.get("auroc")})
    rows.append({**tag, "metric": "co-membership p", "value": c.get("p_value")})
    return rows


def train_planted(data: Path, out: Path, epochs: int, seed: int) -> None:
    """SAMS-VAE with q(M) fixed at the simulator's masks (AdditiveEffect.fix_masks): latent k is planted
    dimension k, so the enrichment's answer is known; trained with the same settings as the CLI's runs."""
    adata = ad.read_h5ad(data)
    truth = ground_truth(adata)
    pdata = load_perturbation_data(adata, split_seed=0)
    pos = {str(t): i for i, t in enumerate(truth["treatments"])}
    masks = np.asarray(truth["masks"], dtype=np.float32)
    planted = torch.as_tensor(np.stack([masks[pos[str(t)]] for t in pdata.treatments]))
    # the reference's inference (no sparse rotation: rotating the latent basis would untie dimension k from
    # mask column k), as experiments/mask_recovery.py's planted control
    cfg = model_config("sams_vae_reference", n_latent=masks.shape[1])
    tcfg = TrainConfig(max_epochs=epochs, seed=seed, **TRAIN_CFG["sams_vae"])
    train_run(pdata, cfg, tcfg, out, progress=False, prepare=lambda m: m.effect.fix_masks(planted))


def run_seed(seed: int, out: Path, epochs: dict, top_genes: int, permutations: int) -> list[dict]:
    d = out / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    data = d / "data.h5ad"
    if not data.exists():
        args = ["simulate", "--preset", "default", "--seed", str(seed), "--out", str(data)]
        assert cli([*args, "--set", *SIM]) == 0
    write_knowledge(ad.read_h5ad(data), d, top_genes, seed)
    for model, settings in TRAIN_CFG.items():
        if not (d / model / "best.pt").exists():
            t0 = time.time()
            args = ["train", "--data", str(data), "--model", model, "--out", str(d / model), "--quiet"]
            sets = [f"{k}={v}" for k, v in settings.items()]
            assert cli([*args, "--set", f"max_epochs={epochs[model]}", f"seed={seed}", *sets]) == 0
            print(f"seed {seed}: trained {model} in {time.time() - t0:.0f} s", flush=True)
    if not (d / PLANTED_RUN / "best.pt").exists():
        t0 = time.time()
        train_planted(data, d / PLANTED_RUN, epochs["sams_vae"], seed)
        print(f"seed {seed}: trained {PLANTED_RUN} in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for kind in ("planted", "shuffled"):
        for run in ("sams_vae", PLANTED_RUN):
            rows += enrichment_rows(d, run, kind, seed, permutations)
        ref = d / f"grn_reference_{kind}.csv"
        args = ["grn", str(d / "gpo_vae"), "--reference", str(d / f"{kind}.csv"), "--data", str(data)]
        args += ["--reference-out", str(ref), "--overwrite", "--permutations", str(permutations)]
        assert cli([*args, "--seed", str(seed)]) == 0
        t = pd.read_csv(ref)
        tag = {"seed": seed, "knowledge": kind, "run": "gpo_vae"}
        for _, r in t[t["block"] == "perturbed->perturbed"].iterrows():
            for m in ("auprc", "random_auprc", "auroc", "p_value", "precision_at_k", "sign_accuracy"):
                rows.append({**tag, "metric": f"GRN {r['method']}: {m}", "value": r[m]})
    return rows


def _cell(res: pd.DataFrame, **where) -> str:
    sel = np.ones(len(res), dtype=bool)
    for k, v in where.items():
        sel &= (res[k] == v).to_numpy()
    v = res.loc[sel, "value"].astype(float).dropna()
    return "–" if v.empty else f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}"


def tables(res: pd.DataFrame) -> str:
    """The two tables of docs/knowledge.md (mean ± sd over seeds)."""
    n = res["seed"].nunique()
    lines = [
        "Gene sets (`pyrovae enrich`; share of the 10 sets found at FDR < 0.05 in some latent dimension, "
        f"the best AUROC per set averaged over sets, co-membership AUROC and its p-value; {n} seeds):",
        "",
        "| run | GMT | genes: sets found | genes: best AUROC | genes: in its own dimension | "
        "perturbations: sets found | perturbations: best AUROC | co-membership AUROC | co-membership p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in ("sams_vae", PLANTED_RUN):
        for kind in ("planted", "shuffled"):
            m = ["genes: sets found (FDR<0.05)", "genes: best AUROC per set (mean)"]
            m += ["genes: best dimension is the planted one"]
            m += ["perturbations: sets found (FDR<0.05)", "perturbations: best AUROC per set (mean)"]
            m += ["co-membership AUROC", "co-membership p"]
            cells = [_cell(res, run=run, knowledge=kind, metric=x) for x in m]
            lines.append(f"| {run} | {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Interaction lists (`pyrovae grn --reference`, perturbed -> perturbed block; {n} seeds):",
        "",
        "| method | list | AUPRC | prevalence | AUROC | p-value | precision at k | sign accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    methods = [m.split(":")[0][4:] for m in res["metric"] if m.startswith("GRN ")]
    for method in dict.fromkeys(methods):
        for kind in ("planted", "shuffled"):
            m = ["auprc", "random_auprc", "auroc", "p_value", "precision_at_k", "sign_accuracy"]
            cells = [_cell(res, run="gpo_vae", knowledge=kind, metric=f"GRN {method}: {x}") for x in m]
            lines.append(f"| {method} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, nargs=2, default=None, help="SAMS-VAE and GPO-VAE epochs")
    p.add_argument("--top-genes", type=int, default=15)
    p.add_argument("--permutations", type=int, default=10000)
    p.add_argument("--tables-only", action="store_true", help="rewrite summary.md from results.csv")
    args = p.parse_args(argv)
    out = Path(args.out)
    epochs = dict(zip(EPOCHS, args.epochs)) if args.epochs else EPOCHS
    if args.tables_only:
        res = pd.read_csv(out / "results.csv")
    else:
        rows = []
        for seed in args.seeds:
            rows += run_seed(seed, out, epochs, args.top_genes, args.permutations)
            pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
        res = pd.DataFrame(rows)
    text = tables(res)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
