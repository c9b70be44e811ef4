"""Where a test-IWELBO gap between two mask_inference runs comes from (a diagnostic of
``experiments/mask_inference.py`` output; no training).

For each training seed and model of an earlier ``mask_inference.py`` invocation (``--runs DIR``, the same
regime options), the held-out predictive IWELBO (:func:`pyrovae.predict.iwelbo.predictive_iwelbo`, global
particles drawn once and shared by the cells, globals not scored) is recomputed

- at 100 and at 400 particles: does the gap to the reference model shrink with more particles (an estimator
  effect) or not (a fit gap)?
- with q(E)'s standard deviation narrowed to 0.01 (the mean-field log-scale set to log 0.01; the
  correlated guide's log-variance head set to -30, so that its scale sits at its floor sqrt(1e-4)): how
  much of each model's score comes from the width of q(E) rather than from its mean and the networks?
- per cell group: the held-out combinations, the seen perturbations' test cells, the test control cells
  (which see no effect row at all: a gap there is in the encoder / decoder) and 1,500 training cells.

Differences are paired per seed against ``--reference`` (CPA-VAE). Usage::

    python -m experiments.iwelbo_gap --out runs/exp/gap_dense --runs runs/exp/masks_dense \\
        --sim-set mask_prob=0.25 n_latent=16 --models cpa_vae sams_dense sams_on_mlr02
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import torch

from experiments import common
from pyrovae.predict.iwelbo import predictive_iwelbo
from pyrovae.report import add_relative
from pyrovae.runs import load_run

NARROW_SD = 0.01


def narrow_q_E(effect) -> None:
    """Set q(E)'s standard deviation to NARROW_SD (in place; mean-field or the correlated guide's head)."""
    with torch.no_grad():
        if hasattr(effect, "q_E_log_scale"):
            effect.q_E_log_scale.fill_(math.log(NARROW_SD))
        if hasattr(effect, "q_E_net"):  # scale = sqrt(exp(log_var) + 1e-4) >= 0.01
            effect.q_E_net.log_var.weight.zero_()
            effect.q_E_net.log_var.bias.fill_(-30.0)


def main(argv=None) -> int:
    parser = common.build_parser("mask_inference", __doc__)
    parser.add_argument("--runs", nargs="+", required=True, help="mask_inference.py output directories")
    parser.add_argument("--reference", default="cpa_vae")
    args = parser.parse_args(argv)
    exp = common.Experiment("mask_inference", args)
    split, held, _, _ = exp.combination_split()
    data = exp.load(split)
    rows = []
    train = np.asarray(data.indices("train"))[:1500]
    for seed in exp.seeds:
        for model in exp.models:
            run_dir = common.find_run(args.runs, seed, model)
            if run_dir is None:
                exp.log(f"  seed{seed}/{model}: no run in {args.runs}")
                continue
            run = load_run(run_dir)
            for mode, k in (("as trained", 100), ("as trained", 400), (f"q(E) sd {NARROW_SD}", 100)):
                if mode != "as trained":  # the last mode: the run narrowed in place
                    narrow_q_E(run.model.effect)
                row = {"model": model, "seed": seed, "globals": mode, "particles": k}
                test = predictive_iwelbo(run.model, data, "test", n_particles=k, seed=0)
                is_held = test["label"].isin(held).to_numpy()
                is_ctrl = (test["label"] == data.control_label).to_numpy()
                row["test"] = test["iwelbo"].mean()
                row["test_combos"] = test["iwelbo"][is_held].mean() if is_held.any() else np.nan
                row["test_seen"] = test["iwelbo"][~is_held & ~is_ctrl].mean()
                row["test_control"] = test["iwelbo"][is_ctrl].mean()
                row["train_1500"] = predictive_iwelbo(run.model, data, train, n_particles=k, seed=0)[
                    "iwelbo"
                ].mean()
                rows.append(row)
                exp.log(f"  seed{seed}/{model} {mode}, {k} particles: test {row['test']:.2f}")
    df = pd.DataFrame(rows)
    cols = ["test", "test_combos", "test_seen", "test_control", "train_1500"]
    match = ("seed", "globals", "particles")
    for c in cols:
        df = add_relative(df, c, {"model": args.reference}, match=match, name=f"{c} - ref")
    out = df[["model", *match, *cols, *(f"{c} - ref" for c in cols)]]
    summ = out.groupby(["model", "globals", "particles"])[[f"{c} - ref" for c in cols]].agg(["mean", "std"])
    common.write_frame(exp.out / "results.csv", out)
    common.write_frame(exp.out / "summary.csv", summ, index=True)
    print(summ.round(2).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
