"""Mask recovery: does SAMS-VAE find the planted masks of a simulation, and what do they cost in ELBO?

Protocol (the SAMS-VAE code's simulation study, on our simulator): simulated
data with planted masks (``--preset``, ``--sim-seed``; or an ``.h5ad`` written by ``pyrovae simulate``,
which carries ``uns["ground_truth"]``), a fixed stratified 80/10/10 cell split; the seeds are training seeds.

Models (``configs/mask_recovery.yaml``):

- ``sams_vae``: SAMS-VAE, correlated guide, q(M) learned (the previous demo's settings: ``mask_lr``,
  masks start mostly off);
- ``cpa_vae``: CPA-VAE, the same model without masks (every latent dimension on);
- ``sams_vae_planted``: SAMS-VAE with q(M) fixed at the planted masks
  (:meth:`~pyrovae.models.effects.AdditiveEffect.fix_masks`), everything else trained. A control: it is
  what a perfect mask estimator would reach, so its validation/test IWELBO against ``sams_vae``'s says
  whether the ELBO prefers the planted masks to the learned ones at this budget.

Metrics: mask precision / recall / F1 after latent matching (estimated mask = q(m) > 0.5, as the reference
code does) with the chance F1 of random masks with as many positives (mean and sd); the MCC of the
posterior-mean latent effects against the planted ones (Hungarian-matched |Pearson r|, every model);
validation and test IWELBO, and both relative to CPA-VAE of the same seed (``- CPA``: > 0 means better
than CPA-VAE).

Usage::

    python -m experiments.mask_recovery --out runs/exp/masks            # default preset, 3 seeds
    python -m experiments.mask_recovery --out runs/exp/masks_sim1 --sim-seed 1
"""

from __future__ import annotations

import sys

import numpy as np

from experiments import common
from pyrovae import report
from pyrovae.data.protocols import cell_split, split_summary
from pyrovae.evaluate.structure import planted_rows

NAME = "mask_recovery"
METRICS = {
    "mask_precision": "mask precision",
    "mask_recall": "mask recall",
    "mask_f1": "mask F1",
    "mask_chance_f1": "chance F1",
    "mask_positives": "mask positives",
    "effect_mcc": "effect MCC",
    "val_iwelbo": "val IWELBO",
    "test_iwelbo": "test IWELBO",
    "val_iwelbo_vs_cpa": "val IWELBO - CPA",
    "test_iwelbo_vs_cpa": "test IWELBO - CPA",
}
FMTS = {
    "val_iwelbo": "{:.2f}",
    "test_iwelbo": "{:.2f}",
    "val_iwelbo_vs_cpa": "{:.2f}",
    "test_iwelbo_vs_cpa": "{:.2f}",
    "mask_positives": "{:.0f}",
}
REFERENCE_MODEL = "cpa_vae"


def build_parser():
    p = common.build_parser(NAME, __doc__)
    common.add_split_seed_option(p.add_argument_group(NAME))
    return p


def summarise(exp: common.Experiment) -> str:
    res = exp.results_frame()
    for metric in ("val_iwelbo", "test_iwelbo"):
        res = common.add_relative(res, metric, {"model": REFERENCE_MODEL}, name=f"{metric}_vs_cpa")
    common.write_frame(exp.out / "results.csv", res)
    agg = report.aggregate(res, ["model"], list(METRICS) + ["train_s"], order={"model": exp.models})
    table = report.format_summary(agg, ["model"], METRICS, FMTS).rename(columns={"n": "seeds"})
    n_true = res["mask_true_positives"].dropna()
    notes = [
        f"{exp.source['description']}; budget {exp.settings['budget']}; training seeds {exp.seeds}; "
        f"stratified 80/10/10 cell split with split seed {exp.settings['split_seed']}.",
        "Mask metrics after latent matching (Hungarian on true-positive counts), estimated mask = q(m) > 0.5"
        + (f"; {int(n_true.iloc[0])} planted positives." if len(n_true) else "."),
        "chance F1: random masks with as many positives as the estimated one, matched the same way.",
        "effect MCC: Hungarian-matched |Pearson r| between posterior-mean and planted latent effects.",
        "IWELBO: nats per cell; '- CPA' is the paired difference to CPA-VAE of the same seed (> 0: better).",
        "sams_vae_planted: q(M) fixed at the planted masks (a control, not an estimator).",
    ]
    md = exp.write_table("summary", table, "Mask recovery: SAMS-VAE against planted masks", notes, raw=agg)
    common.plot_bars(
        agg,
        "model",
        {
            "mask_f1": "mask F1",
            "mask_chance_f1": "chance F1",
            "effect_mcc": "effect MCC",
            "test_iwelbo_vs_cpa": "test IWELBO - CPA-VAE",
        },
        exp.out / "mask_recovery.png",
        title="mask recovery",
    )
    return md


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exp = common.Experiment(NAME, args)
    truth = exp.planted_truth()
    masks = np.asarray(truth["masks"])
    exp.settings["model"].setdefault("n_latent", int(masks.shape[1]))
    split_seed = common.split_seed(args, exp)
    labels, ctrl = exp.labels()
    split = cell_split(labels, seed=split_seed, test_frac=0.1, val_frac=1 / 9, stratify=True)
    data = exp.load(split)
    rows = planted_rows(data.treatments, truth["treatments"])
    planted = np.zeros((data.n_treatments, masks.shape[1]), dtype=np.float32)
    planted[rows] = masks
    exp.log(
        f"cell split (seed {split_seed}): {len(data.indices('train'))} train, "
        f"{len(data.indices('val'))} val, {len(data.indices('test'))} test cells; "
        f"{int(masks.sum())} planted mask entries of {masks.size}"
    )
    planted_models = set(exp.settings.get("planted") or [])
    for seed in exp.seeds:
        for model in exp.models:
            mcfg, tcfg = exp.configs(model, seed=seed)
            exp.fit_and_score(
                data,
                model,
                mcfg,
                tcfg,
                f"seed{seed}/{model}",
                None,
                tags={"model": model, "seed": seed},
                extra=lambda run, seed=seed: common.structure_metrics(run, truth, rows, seed),
                prepare=(lambda m: m.effect.fix_masks(planted)) if model in planted_models else None,
            )
    md = summarise(exp)
    exp.finish({"split": split_summary(split, labels, ctrl, args.combo_sep), "split_seed": split_seed})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
