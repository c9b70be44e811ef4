"""Mask inference protocol: SAMS-VAE with each q(M) estimator against its dense ablation (CPA-VAE).

Per regime (one invocation = one simulated regime: ``--preset``/``--sim-set`` or ``--simulator
sams_reference``), with the demo's split where the data has combinations (a seeded quarter of the doubles
held out, test only, plus 10 % held-out cells of every other label;
:func:`pyrovae.data.protocols.heldout_combinations_split`)
or else a stratified 80/10/10 cell split. Models (``configs/mask_inference.yaml``): CPA-VAE (also at twice
the epochs, ``cpa_vae_2x``: at least SAMS-VAE's wall-clock), SAMS-VAE with every mask fixed on (the dense
ablation, ``fixed_masks_on``), SAMS-VAE with the straight-through (reference), score-function (Pyro
TraceGraph_ELBO, decaying-average or learned baseline), leave-one-out, DisARM and relaxed estimators, with
masks starting off or on (``mask_init_logits``), per-model mask learning rates (``train_overrides``), the
mask-KL warm-up, the mean-field guide, and the Beta-Bernoulli SAMS-VAE. Every model gets the demo's epochs
and optimiser settings unless ``train_overrides`` says otherwise; the seconds are reported (the budget is
in epochs, not seconds: a time cap would make the numbers depend on the machine's load).

Metrics per model and training seed:

- ATE Pearson r and R² (all genes and each perturbation's top-20 by |empirical ATE|) of the held-out
  combinations (``_combos``; empirical ATE of their cells, all in test) and of the seen perturbations on
  their held-out test cells (``_cells``);
- validation and test IWELBO (nats per cell);
- mask precision / recall / F1 after latent matching, the chance F1 of as many random positives, the
  number of positives, the effect MCC (:func:`pyrovae.evaluate.structure.planted_structure`);
- ``undecided``: the fraction of q(m) in (0.2, 0.8), at the end and averaged over training steps;
- training seconds.

Usage::

    python -m experiments.mask_inference --out runs/exp/masks_default
    python -m experiments.mask_inference --out runs/exp/masks_ref --simulator sams_reference \\
        --set likelihood=normal
    python -m experiments.mask_inference --out runs/exp/masks_dense --sim-set mask_prob=0.25 n_latent=16
    # rows of an earlier invocation reused (same data, split, settings), ATE Monte Carlo spread
    python -m experiments.mask_inference --out runs/exp/more --models cpa_vae sams_dense \\
        --include runs/exp/masks_default --ate-mc-seeds 1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from experiments import common
from pyrovae import report
from pyrovae.baselines.ate import baseline_ates
from pyrovae.data.protocols import split_summary
from pyrovae.evaluate.structure import planted_rows
from pyrovae.predict.posterior import Posterior
from pyrovae.runs import load_run

NAME = "mask_inference"
REFERENCE_MODEL = "cpa_vae"
METRICS = {
    "ate_r_combos": "ATE r (held-out combos)",
    "ate_r2_combos": "ATE R² (combos)",
    "ate_r_top20_combos": "ATE r top-20 (combos)",
    "ate_r2_top20_combos": "ATE R² top-20 (combos)",
    "ate_r_cells": "ATE r (held-out cells)",
    "ate_r2_cells": "ATE R² (cells)",
    "val_iwelbo": "val IWELBO",
    "test_iwelbo": "test IWELBO",
    "test_iwelbo_vs_cpa": "test IWELBO - CPA",
    "mask_precision": "mask P",
    "mask_recall": "mask R",
    "mask_f1": "mask F1",
    "mask_chance_f1": "chance F1",
    "mask_positives": "positives",
    "undecided_final": "q(m) in (0.2,0.8), end",
    "undecided_mean": "q(m) in (0.2,0.8), mean over training",
    "effect_mcc": "effect MCC",
    "train_s": "train s",
    "ate_r_combos_mc_sd": "ATE r combos, MC sd",
    "ate_r2_combos_mc_sd": "ATE R² combos, MC sd",
    "ate_r_cells_mc_sd": "ATE r cells, MC sd",
    "ate_r2_cells_mc_sd": "ATE R² cells, MC sd",
}
#: the ATE metrics whose Monte Carlo spread ``--ate-mc-seeds`` measures
MC_METRICS = ("ate_r_combos", "ate_r2_combos", "ate_r_cells", "ate_r2_cells")
FMTS = {
    "val_iwelbo": "{:.1f}",
    "test_iwelbo": "{:.1f}",
    "test_iwelbo_vs_cpa": "{:.2f}",
    "mask_positives": "{:.0f}",
    "train_s": "{:.0f}",
}


def build_parser():
    p = common.build_parser(NAME, __doc__)
    group = p.add_argument_group(NAME)
    group.add_argument(
        "--include",
        nargs="+",
        default=[],
        metavar="DIR",
        help="earlier --out directories of this script on the same data, split and settings: their rows of "
        "the models and seeds asked for here are summarised with the new ones instead of being rerun "
        "(training is deterministic per seed)",
    )
    group.add_argument(
        "--ate-mc-seeds",
        nargs="+",
        type=int,
        default=[],
        metavar="SEED",
        help="also score every model's ATE at these evaluation seeds (its run reloaded from --out or an "
        "--include directory) and report the Monte Carlo sd of the ATE metrics over the evaluation seeds",
    )
    return p


def model_settings(settings: dict, model: str) -> dict:
    """Everything in the settings that defines one model's runs (to check that included rows match)."""
    return {
        **common.model_spec(settings, model),
        "fixed_on": model in (settings.get("fixed_masks_on") or ()),
        "eval": settings["eval"],
        "split_seed": settings.get("split_seed"),
    }


def include_rows(exp: common.Experiment, dirs) -> set[tuple[str, int]]:
    """Record the rows of earlier runs (``--include``) of this invocation's models and seeds; the
    (model, seed) pairs recorded. A directory of other data or other settings for a model is refused."""
    done: set[tuple[str, int]] = set()
    for d in map(Path, dirs):
        info_path, res_path = d / "experiment.json", d / "results.csv"
        if not info_path.exists() or not res_path.exists():
            raise FileNotFoundError(f"--include {d}: no experiment.json and results.csv of a finished run")
        info = json.loads(info_path.read_text())
        if info.get("data", {}).get("description") != exp.source["description"]:
            raise ValueError(
                f"--include {d}: other data ({info.get('data', {}).get('description')!r}, "
                f"here {exp.source['description']!r})"
            )
        res = pd.read_csv(res_path)
        res = res[res["model"].isin(exp.models) & res["seed"].isin(exp.seeds)]
        for row in res.to_dict("records"):
            key = (row["model"], int(row["seed"]))
            if key in done:
                continue
            if model_settings(info["settings"], row["model"]) != model_settings(exp.settings, row["model"]):
                raise ValueError(f"--include {d}: {row['model']} was run with other settings than here")
            row["seed"] = int(row["seed"])
            exp.record({k: v for k, v in row.items() if not (isinstance(v, float) and v != v)})
            done.add(key)
    return done


class MaskTracker:
    """Records the fraction of q(m) in (0.2, 0.8) at every training step (a gradient hook on the logits).

    ``fixed_on``: first fix every mask on (:meth:`~pyrovae.models.effects.AdditiveEffect.fix_masks`), the
    dense ablation of SAMS-VAE: the same model and guide (q(E | M) included) with q(M) a point mass at 1.
    """

    def __init__(self, fixed_on: bool = False):
        self.fractions: list[float] = []
        self.fixed_on = fixed_on

    def __call__(self, model) -> None:
        if self.fixed_on:
            model.effect.fix_masks(torch.ones_like(model.effect.q_mask_logits))
        logits = getattr(model.effect, "q_mask_logits", None)
        if not isinstance(logits, torch.nn.Parameter):  # no masks (CPA-VAE) or masks fixed
            return

        def hook(grad, logits=logits):
            p = torch.sigmoid(logits.detach())
            self.fractions.append(float(((p > 0.2) & (p < 0.8)).float().mean()))
            return grad

        logits.register_hook(hook)

    def summary(self) -> dict[str, float]:
        if not self.fractions:
            return {}
        return {"undecided_final": self.fractions[-1], "undecided_mean": float(np.mean(self.fractions))}


def ate_sets(data, held: list[str], seen: list[str]) -> list[tuple[list[str], str, pd.DataFrame]]:
    """(perturbations, metric suffix, empirical ATE of their test cells) of the held-out combinations and of
    the seen perturbations' held-out cells: the data-only truths, computed once for every run and baseline."""
    test = data.indices("test")
    return [
        (list(perts), suffix, common.empirical_ates(data, perts, test))
        for perts, suffix in ((held, "_combos"), (seen, "_cells"))
        if perts
    ]


def ate_metrics(exp: common.Experiment, run, data, sets, seed: int | None = None) -> dict[str, float]:
    """ATE scores of the held-out combinations and of the seen perturbations on their held-out cells
    (``sets``: :func:`ate_sets`; model ATE drawn with evaluation seed ``seed``, default the config's
    ``eval_seed``)."""
    ev = exp.settings["eval"]
    post = Posterior.from_run(run)
    k = int(ev["top_k"])
    out: dict[str, float] = {}
    for perts, suffix, truth in sets:
        pred = post.model_ate(
            list(perts),
            n_samples=int(ev["ate_samples"]),
            library_size=common.eval_library(ev["library_size"]),
            data=data,  # matched: each label at its cells' depths
            seed=int(ev["eval_seed"] if seed is None else seed),
            chunk=int(ev["ate_chunk"]),
            transform=common.ate_transform(data),
        )
        out.update(common.ate_scores(truth, pred, k, suffix=suffix))
    return out


def ate_mc_spread(exp: common.Experiment, data, sets, dirs, seeds) -> None:
    """Monte Carlo spread of the sampled ATE metrics (:data:`MC_METRICS`): every model row's run (under
    ``--out`` or an ``--include`` directory) is reloaded and its ATE scored again at the evaluation
    ``seeds``; ``<metric>_mc_sd`` is the sd over the evaluation seeds, the config's one included."""
    roots = [exp.out, *map(Path, dirs)]
    for row in exp.results:
        if row.get("model") not in exp.models or "seed" not in row:
            continue
        path = common.find_run(roots, int(row["seed"]), row["model"])
        if path is None:
            exp.log(f"  seed{int(row['seed'])}/{row['model']}: no run directory, no Monte Carlo spread")
            continue
        run = load_run(path)  # a dense ablation's fixed masks come back with its checkpoint
        draws = [row] + [ate_metrics(exp, run, data, sets, seed=s) for s in seeds]
        for k in MC_METRICS:
            vals = [d[k] for d in draws if k in d]
            if len(vals) > 1:
                row[f"{k}_mc_sd"] = float(np.std(vals, ddof=1))
    exp.log(f"ATE Monte Carlo spread over evaluation seeds {[exp.settings['eval']['eval_seed'], *seeds]}")


def score_baselines(exp: common.Experiment, data, sets) -> None:
    """One results row per trivial ATE predictor (training cells only; pyrovae.baselines.ate.baseline_ates):
    the per-perturbation training mean and the additive sum of the singles, scored like the models."""
    k = int(exp.settings["eval"]["top_k"])
    rows = {name: {"model": common.BASELINE_NAMES.get(name, name)} for name in ("train_mean", "additive")}
    for perts, suffix, truth in sets:
        preds = baseline_ates(data, perts, transform=common.ate_transform(data))
        for name, row in rows.items():
            row.update(common.ate_scores(truth, preds[name], k, suffix=suffix))
    for row in rows.values():
        exp.record(row)


def summarise(exp: common.Experiment, held: list[str]) -> str:
    res = exp.results_frame()
    for metric in ("val_iwelbo", "test_iwelbo"):
        res = common.add_relative(res, metric, {"model": REFERENCE_MODEL}, name=f"{metric}_vs_cpa")
    common.write_frame(exp.out / "results.csv", res)
    metrics = {k: v for k, v in METRICS.items() if k in res.columns}
    order = exp.models + [m for m in res["model"].unique() if m not in exp.models]
    agg = report.aggregate(res, ["model"], list(metrics), order={"model": order})
    table = report.format_summary(agg, ["model"], metrics, FMTS).rename(columns={"n": "seeds"})
    n_true = res["mask_true_positives"].dropna() if "mask_true_positives" in res else []
    notes = [
        f"{exp.source['description']}; budget {exp.settings['budget']} (every model: "
        f"{exp.settings['train'].get('max_epochs')} epochs, the same optimiser settings, except "
        f"{exp.settings.get('train_overrides') or 'none'}); training seeds "
        f"{exp.seeds}; split seed {exp.settings['split_seed']}.",
        (f"held-out combinations (test only): {', '.join(held)}; " if held else "no combinations; ")
        + "held-out cells: the test cells (10 %) of every seen perturbation.",
        "ATE: model ATE from q against the empirical ATE of the held-out (test) cells; "
        f"{exp.settings['eval']['ate_samples']} samples.",
        "Mask metrics after latent matching, estimated mask = q(m) > 0.5"
        + (f"; {int(n_true.iloc[0])} planted positives." if len(n_true) else ".")
        + " chance F1: as many random positives, matched the same way.",
        "IWELBO: nats per cell; '- CPA' is the paired difference to CPA-VAE of the same seed (> 0: better).",
    ]
    return exp.write_table("summary", table, "Mask inference: estimators against CPA-VAE", notes, raw=agg)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exp = common.Experiment(NAME, args)
    truth = exp.planted_truth()
    exp.settings["model"].setdefault("n_latent", int(np.asarray(truth["masks"]).shape[1]))
    split, held, labels, ctrl = exp.combination_split()
    data = exp.load(split)
    rows = planted_rows(data.treatments, truth["treatments"])
    seen = data.groups("train")
    exp.log(
        f"split: {len(data.indices('train'))} train, {len(data.indices('val'))} val, "
        f"{len(data.indices('test'))} test cells; {len(held)} held-out combinations, {len(seen)} seen labels"
    )
    sets = ate_sets(data, held, seen)
    score_baselines(exp, data, sets)
    done = include_rows(exp, args.include)
    for seed in exp.seeds:
        for model in exp.models:
            if (model, seed) in done:
                exp.log(f"  seed{seed}/{model}: from --include")
                continue
            mcfg, tcfg = exp.configs(model, seed=seed)  # train_overrides included
            tracker = MaskTracker(fixed_on=model in (exp.settings.get("fixed_masks_on") or ()))

            def extra(run, seed=seed, tracker=tracker):
                out = common.structure_metrics(run, truth, rows, seed)
                out.update(tracker.summary())
                out.update(ate_metrics(exp, run, data, sets))
                return out

            exp.fit_and_score(
                data,
                model,
                mcfg,
                tcfg,
                f"seed{seed}/{model}",
                None,
                {"model": model, "seed": seed},
                extra=extra,
                prepare=tracker,
            )
    if args.ate_mc_seeds:
        ate_mc_spread(exp, data, sets, args.include, args.ate_mc_seeds)
    md = summarise(exp, held)
    exp.finish({"split": split_summary(split, labels, ctrl, args.combo_sep), "heldout_combinations": held})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
