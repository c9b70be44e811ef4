"""Loop and summary shared by the combination protocols (``combinatorial.py``, ``data_efficiency.py``).

Both train every model on a split per (split seed, fraction f of combinations in training), score the
test combinations, report test IWELBO relative to the reference model at f = 0 per split seed, and plot the
metrics against f. Only the split function and the wording of the notes differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments import common
from pyrovae import report
from pyrovae.data.protocols import canonical_labels, split_summary

METRICS = {
    "test_iwelbo": "test IWELBO",
    "test_iwelbo_rel": "test IWELBO rel.",
    "ate_r": "ATE r (test)",
    "ate_r_top20": "ATE r top-20 (test)",
    "val_iwelbo": "val IWELBO",
}
HELDOUT_METRICS = {"ate_r_heldout": "ATE r (test cells)", "ate_r_top20_heldout": "ATE r top-20 (test cells)"}
BASELINES = ("additive", "train_mean")  # no-model ATE references (training cells only)
FMTS = {"test_iwelbo": "{:.2f}", "test_iwelbo_rel": "{:.2f}", "val_iwelbo": "{:.2f}"}
PLOTTED = {
    "test_iwelbo_rel": "test IWELBO rel. (nats/cell)",
    "ate_r": "ATE Pearson r",
    "ate_r_top20": "ATE Pearson r, top-20 genes",
}
BASELINE_NOTE = (
    "baseline rows (no model; ATE from the training cells only): additive = the sum of the singles' "
    "training ATEs; per-perturbation train mean = the combination's own training ATE (none for a "
    "combination without training cells)."
)


def add_fractions_option(group, what: str) -> None:
    """``--fractions`` (read by :func:`fractions`); ``what`` says what f is a fraction of."""
    group.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=None,
        help=f"fractions f of {what} (default: the config's)",
    )


def fractions(args, exp: common.Experiment) -> list[float]:
    """The fractions f to run: ``--fractions``, else the config's, else the papers' grid."""
    return [float(f) for f in (args.fractions or exp.settings.get("fractions", [0.0, 0.25, 0.5, 0.75, 1.0]))]


def run(
    exp: common.Experiment,
    fractions: Sequence[float],
    combo_sep: str,
    make_split: Callable[[np.ndarray, float, str, int], np.ndarray],
    describe: Callable[[np.ndarray, np.ndarray, dict[str, Any], list[str]], str],
    extra_tags: Callable[[list[str]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train and score every model of ``exp`` on ``make_split(labels, f, control, seed)`` for every split
    seed and fraction; ``describe(split, n_pert, summary, test_perts)`` is the logged line of a split.

    Returns the per-split summaries, keyed ``seed<s>_f<f>`` (for :meth:`Experiment.finish`).
    """
    labels, ctrl = exp.labels()
    canon, n_pert, _ = canonical_labels(labels, ctrl, combo_sep)
    unique_models = set(exp.settings.get("unique_encoding", ["svae_plus"]))
    splits: dict[str, Any] = {}
    for seed in exp.seeds:
        for f in fractions:
            split = make_split(labels, f, ctrl, seed)
            summary = split_summary(split, labels, ctrl, combo_sep)
            splits[f"seed{seed}_f{f:g}"] = summary
            test_perts = sorted(set(canon[(split == "test") & (n_pert > 1)]))
            exp.log(f"split seed {seed}, f = {f}: " + describe(split, n_pert, summary, test_perts))
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
                    tags={
                        "model": model,
                        "frac": f,
                        "seed": seed,
                        **(extra_tags(test_perts) if extra_tags else {}),
                    },
                )
    return splits


def summarise(
    exp: common.Experiment,
    frac_header: str,
    title: str,
    notes: Sequence[str],
    figure: str,
    xlabel: str,
    figure_title: str,
) -> str:
    """Write ``results.csv`` (with the relative IWELBO), the summary table and the figure; return the
    Markdown table. ``notes`` are the protocol-specific notes (the shared ones are added here)."""
    res = exp.results_frame()
    ref = exp.settings.get("reference_model", "sams_vae")
    res = common.add_relative(res, "test_iwelbo", {"model": ref, "frac": 0.0}, match=("seed",))
    common.write_frame(exp.out / "results.csv", res)
    by = ["frac", "model"]
    agg = report.aggregate(
        res, by, list(METRICS) + list(HELDOUT_METRICS) + ["train_s"], order={"model": exp.models}
    )
    agg = agg.sort_values("frac", kind="stable").reset_index(drop=True)
    table = report.format_summary(agg, by, {**METRICS, **HELDOUT_METRICS}, FMTS)
    table = table.rename(columns={"frac": frac_header, "n": "seeds"})
    all_notes = [
        f"{exp.source['description']}; budget {exp.settings['budget']}; split seeds {exp.seeds}.",
        notes[0],
        f"test IWELBO rel. = test IWELBO minus that of {ref} at f = 0 for the same split seed.",
        BASELINE_NOTE,
        *notes[1:],
    ]
    md = exp.write_table("summary", table, title, all_notes, raw=agg)
    common.plot_lines(agg, "frac", PLOTTED, exp.out / figure, xlabel=xlabel, title=figure_title)
    return md
