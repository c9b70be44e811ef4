"""Held-out cells (Replogle-style): test IWELBO and ATE of every model on a random cell-level split.

Protocol (the SAMS-VAE paper's Replogle task; :func:`pyrovae.data.protocols.cell_split`): a random 64/16/20
train/val/test split of the cells, fixed (split seed 0, as the reference's ``random_state=0``); the seeds
are training seeds. Every perturbation is seen in training: this is an in-distribution check.

Models: SAMS-VAE (correlated and mean-field guides) with the mask prior swept over {0.1, 0.01, 0.001},
CPA-VAE, conditional VAE and SVAE+ (the papers' sweep axes are in the YAML config; every setting is a row
of ``all_settings.md``); ``summary.md`` keeps, per model, the setting with the best mean validation IWELBO
(the reference's selection). Trivial baselines (no model): the per-perturbation mean of the training
cells and the global mean of the training cells (ATE only).

ATE: all perturbations. ``ATE r (all cells)`` is the reference's metric (empirical ATE over every cell,
training cells included, which makes it easy: the per-perturbation training mean nearly saturates it);
``ATE r (test cells)`` compares with the empirical ATE of the held-out test cells only.

Usage::

    python -m experiments.heldout_cells --out runs/exp/heldout                        # simulated, small
    python -m experiments.heldout_cells --data replogle.h5ad --perturbation-key gene \\
        --control-label non-targeting --full --out runs/exp/replogle
"""

from __future__ import annotations

import itertools
import sys

import pandas as pd

from experiments import common
from pyrovae import report
from pyrovae.data.protocols import canonical_labels, cell_split, split_summary

NAME = "heldout_cells"
METRICS = {
    "val_iwelbo": "val IWELBO",
    "test_iwelbo": "test IWELBO",
    "ate_r": "ATE r (all cells)",
    "ate_r_top20": "ATE r top-20 (all cells)",
    "ate_r_heldout": "ATE r (test cells)",
    "ate_r_top20_heldout": "ATE r top-20 (test cells)",
}
FMTS = {"val_iwelbo": "{:.2f}", "test_iwelbo": "{:.2f}"}


def build_parser():
    p = common.build_parser(NAME, __doc__)
    g = p.add_argument_group(NAME)
    common.add_split_seed_option(g)
    g.add_argument("--stratify", action="store_true", help="stratify the cell split by perturbation")
    return p


def expand_settings(model: str, sweep: dict | None) -> list[dict]:
    """Every combination of a model's swept values (``[{}]`` without a sweep)."""
    axes = dict((sweep or {}).get(model) or {})
    if not axes:
        return [{}]
    keys = sorted(axes)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(list(axes[k]) for k in keys))]


def setting_name(setting: dict) -> str:
    return (
        ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())
        or "default"
    )


def summarise(exp: common.Experiment) -> str:
    res = exp.results_frame()
    by = ["model", "setting"]
    order = {"model": exp.models}
    agg = report.aggregate(res, by, list(METRICS) + ["train_s"], order=order)
    all_table = report.format_summary(agg, by, METRICS, FMTS).rename(columns={"n": "seeds"})
    notes = [
        f"{exp.source['description']}; budget {exp.settings['budget']}; "
        f"training seeds {exp.seeds}; cell split "
        f"64/16/20 with split seed {exp.settings['split_seed']}.",
        "ATE over all perturbations; 'all cells' = the reference's empirical ATE (every cell, training cells "
        "included); 'test cells' = the empirical ATE of the held-out test cells.",
        "Baselines (no model, no IWELBO; from the training cells only): per-perturbation train mean = the "
        "perturbation's own training ATE; global train mean = the mean of all perturbed training cells minus "
        "the control mean (the same row for every perturbation); additive = the sum of the singles' training "
        "ATEs (combinations only differ from the train mean).",
    ]
    exp.write_table("all_settings", all_table, "Held-out cells: every setting", notes, raw=agg)
    # the reference's selection: per model, the setting with the best mean validation IWELBO
    picked = []
    for _model, grp in agg.groupby("model", sort=False):
        if grp["val_iwelbo_mean"].notna().any():
            picked.append(grp.loc[grp["val_iwelbo_mean"].idxmax()])
        else:
            picked.append(grp.iloc[0])
    sel = pd.DataFrame(picked).reset_index(drop=True)
    table = report.format_summary(sel, by, METRICS, FMTS).rename(columns={"n": "seeds"})
    md = exp.write_table(
        "summary", table, "Held-out cells (setting per model chosen on validation IWELBO)", notes, raw=sel
    )
    sel = sel.assign(label=sel["model"] + " (" + sel["setting"] + ")")
    common.plot_bars(
        sel,
        "label",
        {
            "test_iwelbo": "test IWELBO (nats/cell)",
            "ate_r": "ATE r (all cells)",
            "ate_r_heldout": "ATE r (test cells)",
        },
        exp.out / "heldout_cells.png",
        title="held-out cells",
    )
    sams = agg[agg["model"].isin(["sams_vae", "sams_vae_mf"]) & agg["setting"].str.startswith("mask_prior")]
    if len(sams):
        sams = sams.assign(mask_prior=sams["setting"].str.extract(r"mask_prior=([0-9.e-]+)")[0].astype(float))
        common.plot_lines(
            sams,
            "mask_prior",
            {"val_iwelbo": "val IWELBO", "test_iwelbo": "test IWELBO", "ate_r_heldout": "ATE r (test cells)"},
            exp.out / "mask_prior_sweep.png",
            xlabel="mask prior",
            title="SAMS-VAE mask prior",
        )
    return md


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exp = common.Experiment(NAME, args)
    split_seed = common.split_seed(args, exp)
    labels, ctrl = exp.labels()
    split = cell_split(labels, seed=split_seed, stratify=args.stratify)
    summary = split_summary(split, labels, ctrl, args.combo_sep)
    unique_models = set(exp.settings.get("unique_encoding", ["svae_plus"]))
    loaded = {False: exp.load(split)}
    data = loaded[False]
    perts = sorted(set(data.labels[data.indices("test")]) - {data.control_label})
    exp.log(
        f"cell split (seed {split_seed}): {len(data.indices('train'))} train, "
        f"{len(data.indices('val'))} val, "
        f"{len(data.indices('test'))} test cells; ATE over {len(perts)} perturbations"
    )
    # trivial baselines (training cells only, no model, no seed)
    has_combos = bool((canonical_labels(labels, ctrl, args.combo_sep)[1] > 1).any())
    which = ("train_mean", "global_mean") + (("additive",) if has_combos else ())
    exp.score_baselines(data, perts, {"setting": "baseline", "seed": -1}, which=which)
    for seed in exp.seeds:
        for model in exp.models:
            unique = model in unique_models
            if unique not in loaded:
                loaded[unique] = exp.load(split, encode_combos_as_unique=True)
            for setting in expand_settings(model, exp.settings.get("sweep")):
                name = setting_name(setting)
                mcfg, tcfg = exp.configs(model, seed=seed, **setting)
                run_name = f"seed{seed}/{model}" + ("" if not setting else "_" + name.replace(", ", "_"))
                exp.fit_and_score(
                    loaded[unique],
                    model,
                    mcfg,
                    tcfg,
                    run_name,
                    perts,
                    tags={"model": model, "setting": name, "seed": seed, **setting},
                )
    md = summarise(exp)
    exp.finish({"split": summary, "split_seed": split_seed})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
