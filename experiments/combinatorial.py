"""Combinatorial generalisation: predict held-out double perturbations (SAMS-VAE paper, Norman OOD).

Protocol (the SAMS-VAE paper's Norman OOD task; :func:`pyrovae.data.protocols.combinatorial_split`): a
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

    python -m experiments.combinatorial --out runs/exp/combinatorial                 # simulated, small
    python -m experiments.combinatorial --data norman.h5ad --perturbation-key condition \\
        --control-label ctrl --layer counts --gene-key highly_variable --full --out runs/exp/norman_ood
"""

from __future__ import annotations

import sys

from experiments import combo_protocols, common
from pyrovae.data.protocols import POOLS, combinatorial_split

NAME = "combinatorial"


def build_parser():
    p = common.build_parser(NAME, __doc__)
    g = p.add_argument_group(NAME)
    combo_protocols.add_fractions_option(g, "combinations in training")
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
    pool = exp.settings["protocol"]["pool"]
    notes = [
        "Test = the test cells of the held-out combinations (last ceil(frac_test C) of a seeded shuffle); "
        f"combination pool {pool!r}"
        + (
            " (at f = 1 the held-out combinations' other cells are in training, as in the reference)."
            if pool == "all"
            else "."
        ),
        "ATE r: Pearson r between model and empirical ATE of the held-out combinations (empirical ATE on all "
        "cells, the reference's); 'test cells': against the empirical ATE of the test cells only.",
        "svae_plus encodes every combination as its own treatment (it cannot compose); held-out "
        "combinations are drawn from its prior.",
    ]
    return combo_protocols.summarise(
        exp,
        "frac. combos in train",
        "Combinatorial generalisation (held-out combinations)",
        notes,
        "combinatorial.png",
        xlabel="fraction of combinations in training",
        figure_title="held-out combinations",
    )


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
    fracs = combo_protocols.fractions(args, exp)

    def make_split(labels, f, ctrl, seed):
        return combinatorial_split(
            labels, f, ctrl, args.combo_sep, frac_test=proto["frac_test"], seed=seed, pool=proto["pool"]
        )

    def describe(split, n_pert, summary, test_perts):
        return (
            f"{summary['train']['combination_labels']} training combinations, {len(test_perts)} held-out, "
            f"{int((split == 'test').sum())} test cells"
        )

    splits = combo_protocols.run(
        exp, fracs, args.combo_sep, make_split, describe, lambda perts: {"n_test_combos": len(perts)}
    )
    md = summarise(exp)
    exp.finish({"protocol": proto, "fractions": fracs, "splits": splits})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
