"""Data efficiency ("resource paucity"): how much of each combination must be seen (SAMS-VAE paper, Norman).

Protocol (the SAMS-VAE paper's Norman data-efficiency task;
:func:`pyrovae.data.protocols.data_efficiency_split`): 20% of ALL combination cells are test cells and 16%
validation cells; training uses the first f fraction of the remaining 64% (nested as f grows), f in
{0, 0.25, 0.5, 0.75, 1}; singles and controls are split 80/20 train/val. Every combination is tested,
with between 0% and 64% of its cells in training.

Models and metrics as in ``combinatorial.py``: test IWELBO (also relative to SAMS-VAE correlated at f = 0
for the same split seed), ATE Pearson r (all genes, top-20) of the combinations with test cells; mean ± std
over split seeds.

Usage::

    python -m experiments.data_efficiency --out runs/exp/data_efficiency               # simulated, small
    python -m experiments.data_efficiency --data norman.h5ad --perturbation-key condition \\
        --control-label ctrl --layer counts --gene-key highly_variable --full --out runs/exp/norman_eff
"""

from __future__ import annotations

import sys

from experiments import combo_protocols, common
from pyrovae.data.protocols import data_efficiency_split

NAME = "data_efficiency"


def build_parser():
    p = common.build_parser(NAME, __doc__)
    g = p.add_argument_group(NAME)
    combo_protocols.add_fractions_option(g, "the 64%% training part of combination cells")
    return p


def summarise(exp: common.Experiment) -> str:
    notes = [
        "Test = 20% of the cells of every combination; training uses the first f of the 64% training part "
        "of the combination cells (f = 1: 64% of each combination's cells).",
        "ATE r: Pearson r between model and empirical ATE of the tested combinations (empirical ATE on all "
        "cells, the reference's, which includes the training cells for f > 0); 'test cells': against the "
        "empirical ATE of the test cells only.",
    ]
    return combo_protocols.summarise(
        exp,
        "frac. combo cells in train",
        "Data efficiency (fraction of combination cells in training)",
        notes,
        "data_efficiency.png",
        xlabel="fraction of combination cells in training",
        figure_title="data efficiency",
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exp = common.Experiment(NAME, args)
    fracs = combo_protocols.fractions(args, exp)

    def make_split(labels, f, ctrl, seed):
        return data_efficiency_split(labels, f, ctrl, args.combo_sep, seed=seed)

    def describe(split, n_pert, summary, test_perts):
        return (
            f"{int(((split == 'train') & (n_pert > 1)).sum())} training combination cells, "
            f"{int((split == 'test').sum())} test cells of {len(test_perts)} combinations"
        )

    splits = combo_protocols.run(exp, fracs, args.combo_sep, make_split, describe)
    md = summarise(exp)
    exp.finish({"fractions": fracs, "splits": splits})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
