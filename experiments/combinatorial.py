"""Combinatorial generalisation: predict held-out double perturbations (SAMS-VAE paper, Norman OOD).

Protocol (shared/reference/sams_vae.md §5.4; :func:`pyrovae.data.protocols.combinatorial_split`): a
seeded shuffle of the combinations holds out the last ceil(0.25 C) as test combinations (their test cells
are never trained on); training uses singles and controls plus the first floor(f C) combinations, f in
{0, 0.25, 0.5, 0.75, 1} (nested as f grows; disjoint from the test combinations for f <= 0.75; at f = 1
the reference trains on every combination, the held-out ones included, on cells other than the test cells
-- use ``--combo-pool heldout_excluded`` to make f a fraction of the non-held-out combinations instead).

Models: SAMS-VAE (correlated and mean-field guides), CPA-VAE, conditional VAE (combinations as multi-hot
dosage rows, so a held-out double is predicted by composing its singles) and SVAE+ (one treatment per
distinct combination, ``encode_combos_as_unique``: it cannot compose, held-out doubles fall back to the
prior). Metrics on the held-out combinations: test IWELBO, test IWELBO relative to SAMS-VAE (correlated) at
f = 0 for the same split seed, ATE Pearson r over all genes and the top-20 genes; mean ± std over split
seeds.

Usage::

    python experiments/combinatorial.py --out runs/exp/combinatorial                 # simulated, small
    python experiments/combinatorial.py --data norman.h5ad --perturbation-key condition \\
        --control-label ctrl --layer counts --gene-key highly_variable --full --out runs/exp/norman_ood
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import common
from pyrovae.data.protocols import POOLS, canonical_labels, combinatorial_split, split_summary

NAME = "combinatorial"
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
        help="fractions f of combinations in training (default: the config's)",
    )
    g.add_argument("--frac-test", type=float, default=None, help="fraction of combinations held out (0.25)")
    g.add_argument(
        "--combo-pool",
        choices=POOLS,
        default=None,
        help="'all' (reference: f of all combinations; f = 1 trains the held-out ones on other "
        "cells) or 'heldout_excluded' (f of the non-held-out combinations)",
    )
    return p


def summarise(exp: common.Experiment) -> str:
    res = exp.results_frame()
    ref = exp.settings.get("reference_model", "sams_vae")
    res = common.add_relative(res, "test_iwelbo", {"model": ref, "frac": 0.0}, match=("seed",))
    common.write_frame(exp.out / "results.csv", res)
    by = ["frac", "model"]
    order = {"model": exp.models}
    agg = common.aggregate(res, by, list(METRICS) + list(HELDOUT_METRICS) + ["train_s"], order=order)
    agg = agg.sort_values("frac", kind="stable").reset_index(drop=True)
    table = common.format_summary(agg, by, {**METRICS, **HELDOUT_METRICS}, FMTS)
    table = table.rename(columns={"frac": "frac. combos in train", "n": "seeds"})
    notes = [
        f"{exp.source['description']}; budget {exp.settings['budget']}; split seeds {exp.seeds}.",
        "Test = the test cells of the held-out combinations (last ceil(frac_test C) of a seeded shuffle); "
        f"combination pool {exp.settings['protocol']['pool']!r}"
        + (
            " (at f = 1 the held-out combinations' other cells are in training, as in the reference)."
            if exp.settings["protocol"]["pool"] == "all"
            else "."
        ),
        f"test IWELBO rel. = test IWELBO minus that of {ref} at f = 0 for the same split seed.",
        "baseline rows (no model; ATE from the training cells only): additive = the sum of the singles' "
        "training ATEs; per-perturbation train mean = the combination's own training ATE (none for a "
        "combination without training cells).",
        "ATE r: Pearson r between model and empirical ATE of the held-out combinations (empirical ATE on all "
        "cells, the reference's); 'test cells': against the empirical ATE of the test cells only.",
        "svae_plus encodes every combination as its own treatment (it cannot compose); held-out "
        "combinations are drawn from its prior.",
    ]
    md = exp.write_table(
        "summary", table, "Combinatorial generalisation (held-out combinations)", notes, raw=agg
    )
    common.plot_lines(
        agg,
        "frac",
        {
            "test_iwelbo_rel": "test IWELBO rel. (nats/cell)",
            "ate_r": "ATE Pearson r",
            "ate_r_top20": "ATE Pearson r, top-20 genes",
        },
        exp.out / "combinatorial.png",
        xlabel="fraction of combinations in training",
        title="held-out combinations",
    )
    return md


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exp = common.Experiment(NAME, args)
    proto = dict(exp.settings.get("protocol") or {})
    proto.setdefault("frac_test", 0.25)
    proto.setdefault("pool", "all")
    if args.frac_test is not None:
        proto["frac_test"] = args.frac_test
    if args.combo_pool is not None:
        proto["pool"] = args.combo_pool
    exp.settings["protocol"] = proto
    fractions = [
        float(f) for f in (args.fractions or exp.settings.get("fractions", [0.0, 0.25, 0.5, 0.75, 1.0]))
    ]
    labels, ctrl = exp.labels()
    canon, n_pert, _ = canonical_labels(labels, ctrl, args.combo_sep)
    unique_models = set(exp.settings.get("unique_encoding", ["svae_plus"]))
    splits = {}
    for seed in exp.seeds:
        for f in fractions:
            split = combinatorial_split(
                labels, f, ctrl, args.combo_sep, frac_test=proto["frac_test"], seed=seed, pool=proto["pool"]
            )
            splits[(seed, f)] = split_summary(split, labels, ctrl, args.combo_sep)
            test_perts = sorted(set(canon[(split == "test") & (n_pert > 1)]))
            exp.log(
                f"split seed {seed}, f = {f}: {splits[(seed, f)]['train']['combination_labels']} training "
                f"combinations, {len(test_perts)} held-out, {int((split == 'test').sum())} test cells"
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
                    tags={"model": model, "frac": f, "seed": seed, "n_test_combos": len(test_perts)},
                )
    md = summarise(exp)
    exp.finish(
        {
            "protocol": proto,
            "fractions": fractions,
            "splits": {f"seed{s}_f{f:g}": v for (s, f), v in splits.items()},
        }
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
