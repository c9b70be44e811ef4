"""Data efficiency ("resource paucity"): how much of each combination must be seen (SAMS-VAE paper, Norman).

Protocol (shared/reference/sams_vae.md §5.4; :func:`pyrovae.data.protocols.data_efficiency_split`): 20% of
ALL combination cells are test cells and 16% validation cells; training uses the first f fraction of the
remaining 64% (nested as f grows), f in {0, 0.25, 0.5, 0.75, 1}; singles and controls are split 80/20
train/val. Every combination is tested, with between 0% and 64% of its cells in training.

Models and metrics as in ``combinatorial.py``: test IWELBO (also relative to SAMS-VAE correlated at f = 0
for the same split seed), ATE Pearson r (all genes, top-20) of the combinations with test cells; mean ± std
over split seeds.

Usage::

    python experiments/data_efficiency.py --out runs/exp/data_efficiency               # simulated, small
    python experiments/data_efficiency.py --data norman.h5ad --perturbation-key condition \\
        --control-label ctrl --layer counts --gene-key highly_variable --full --out runs/exp/norman_eff
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import common
from pyrovae.data.protocols import canonical_labels, data_efficiency_split, split_summary

NAME = "data_efficiency"
# the two combination protocols report the same metrics
METRICS, HELDOUT_METRICS = common.COMBO_METRICS, common.COMBO_HELDOUT_METRICS
BASELINES, FMTS = common.COMBO_BASELINES, common.COMBO_FMTS


def build_parser():
    p = common.build_parser(NAME, __doc__)
    g = p.add_argument_group(NAME)
    g.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=None,
        help="fractions f of the 64%% training part of combination cells (default: the config's)",
    )
    return p


def summarise(exp: common.Experiment) -> str:
    res = exp.results_frame()
    ref = exp.settings.get("reference_model", "sams_vae")
    res = common.add_relative(res, "test_iwelbo", {"model": ref, "frac": 0.0}, match=("seed",))
    common.write_frame(exp.out / "results.csv", res)
    by = ["frac", "model"]
    agg = common.aggregate(
        res, by, list(METRICS) + list(HELDOUT_METRICS) + ["train_s"], order={"model": exp.models}
    )
    agg = agg.sort_values("frac", kind="stable").reset_index(drop=True)
    table = common.format_summary(agg, by, {**METRICS, **HELDOUT_METRICS}, FMTS)
    table = table.rename(columns={"frac": "frac. combo cells in train", "n": "seeds"})
    notes = [
        f"{exp.source['description']}; budget {exp.settings['budget']}; split seeds {exp.seeds}.",
        "Test = 20% of the cells of every combination; training uses the first f of the 64% training part "
        "of the combination cells (f = 1: 64% of each combination's cells).",
        f"test IWELBO rel. = test IWELBO minus that of {ref} at f = 0 for the same split seed.",
        "baseline rows (no model; ATE from the training cells only): additive = the sum of the singles' "
        "training ATEs; per-perturbation train mean = the combination's own training ATE (none for a "
        "combination without training cells).",
        "ATE r: Pearson r between model and empirical ATE of the tested combinations (empirical ATE on all "
        "cells, the reference's, which includes the training cells for f > 0); 'test cells': against the "
        "empirical ATE of the test cells only.",
    ]
    md = exp.write_table(
        "summary", table, "Data efficiency (fraction of combination cells in training)", notes, raw=agg
    )
    common.plot_lines(
        agg,
        "frac",
        {
            "test_iwelbo_rel": "test IWELBO rel. (nats/cell)",
            "ate_r": "ATE Pearson r",
            "ate_r_top20": "ATE Pearson r, top-20 genes",
        },
        exp.out / "data_efficiency.png",
        xlabel="fraction of combination cells in training",
        title="data efficiency",
    )
    return md


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exp = common.Experiment(NAME, args)
    fractions = [
        float(f) for f in (args.fractions or exp.settings.get("fractions", [0.0, 0.25, 0.5, 0.75, 1.0]))
    ]
    labels, ctrl = exp.labels()
    canon, n_pert, _ = canonical_labels(labels, ctrl, args.combo_sep)
    unique_models = set(exp.settings.get("unique_encoding", ["svae_plus"]))
    splits = {}
    for seed in exp.seeds:
        for f in fractions:
            split = data_efficiency_split(labels, f, ctrl, args.combo_sep, seed=seed)
            splits[(seed, f)] = split_summary(split, labels, ctrl, args.combo_sep)
            test_perts = sorted(set(canon[(split == "test") & (n_pert > 1)]))
            exp.log(
                f"split seed {seed}, f = {f}: {int(((split == 'train') & (n_pert > 1)).sum())} training "
                f"combination cells, {int((split == 'test').sum())} test cells "
                f"of {len(test_perts)} combinations"
            )
            loaded = {False: exp.load(split)}
            exp.score_baselines(loaded[False], test_perts, {"frac": f, "seed": seed}, which=BASELINES)
            for model in exp.models:
                unique = model in unique_models
                if unique not in loaded:
                    loaded[unique] = exp.load(split, encode_combos_as_unique=unique)
                mcfg, tcfg = exp.configs(model, seed=int(exp.settings.get("train_seed", 0)))
                exp.fit_and_score(
                    loaded[unique],
                    model,
                    mcfg,
                    tcfg,
                    f"seed{seed}/f{f:g}/{model}",
                    test_perts,
                    tags={"model": model, "frac": f, "seed": seed},
                )
    md = summarise(exp)
    exp.finish({"fractions": fractions, "splits": {f"seed{s}_f{f:g}": v for (s, f), v in splits.items()}})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
