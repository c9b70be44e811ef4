"""Simple model-free ATE baselines: no change, systema's matching mean, and all baselines at once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pyrovae.baselines.ate import baseline_ates
from pyrovae.baselines.linear import linear_baseline_ates
from pyrovae.data.perturbation_data import PerturbationData

__all__ = ["no_change_ates", "matching_mean_ates", "all_baseline_ates"]


def no_change_ates(groups: Sequence[str], genes: Sequence[str]) -> pd.DataFrame:
    """The "no change" prediction: a zero effect for every label (the perturbed cells look like control).

    Returns DataFrame (len(groups), len(genes)) of zeros indexed by label.
    """
    return pd.DataFrame(
        np.zeros((len(groups), len(genes))),
        index=pd.Index([str(g) for g in groups], name="perturbation"),
        columns=[str(g) for g in genes],
    )


def matching_mean_ates(
    train_effects: pd.DataFrame, perturbed_mean: np.ndarray, groups: Sequence[str], sep: str = "+"
) -> pd.DataFrame:
    """systema's matching-mean baseline: a label's prediction is the mean of its members' training effects.

    A combination A+B is predicted as (ATE_A + ATE_B) / 2 over its members that have training cells
    (one seen member: its effect); a single seen perturbation as its own training effect; a label with
    no seen member as the effect of the average perturbed training cell (``perturbed_mean``, systema's
    perturbed mean). Unlike the additive baseline it does not add the members' effects, so it tells how
    much of a combination is an average response rather than a sum.

    Args:
        train_effects: (S, G) training ATEs of single perturbations, indexed by label.
        perturbed_mean: (G,) mean g(x) of all training perturbed cells minus the control mean.
        groups: the labels to predict; sep: combination separator.

    Returns:
        DataFrame (len(groups), G) indexed by label.
    """
    perturbed_mean = np.asarray(perturbed_mean, dtype=np.float64).reshape(-1)
    rows = []
    for g in groups:
        parts = [s for s in (str(g).split(sep) if sep else [str(g)]) if s in train_effects.index]
        rows.append(train_effects.loc[parts].to_numpy(np.float64).mean(0) if parts else perturbed_mean)
    return pd.DataFrame(
        np.array(rows).reshape(len(rows), train_effects.shape[1]),
        index=pd.Index([str(g) for g in groups], name="perturbation"),
        columns=train_effects.columns,
    )


def all_baseline_ates(
    data: PerturbationData,
    groups: Sequence[str],
    *,
    transform: str = "perturbseq",
    split: str = "train",
    n_components: int = 10,
    ridge: float = 0.1,
    target_sum: float = 1e4,
) -> dict[str, pd.DataFrame]:
    """Every model-free baseline's ATE of the labels ``groups``, from the ``split`` (training) cells only.

    ``no_change`` (:func:`no_change_ates`), ``train_mean``, ``additive``, ``global_mean``
    (:func:`pyrovae.baselines.ate.baseline_ates`), ``matching_mean`` (:func:`matching_mean_ates`) and
    ``linear`` (:func:`pyrovae.baselines.linear.linear_baseline_ates`, ``n_components``, ``ridge``).

    Returns:
        {name: DataFrame (len(groups), G) indexed by label}; NaN rows where a baseline cannot predict.
    """
    groups = [str(g) for g in groups]
    members = sorted({s for g in groups for s in g.split(data.sep) if s} - set(groups))
    base = baseline_ates(data, groups + members, transform=transform, split=split, target_sum=target_sum)
    singles = base["train_mean"].loc[[g for g in groups + members if data.sep not in g]].dropna()
    perturbed = base["global_mean"].to_numpy(dtype=np.float64)[0] if groups else np.zeros(len(data.genes))
    out = {"no_change": no_change_ates(groups, data.genes)}
    out.update({k: v.loc[groups] for k, v in base.items()})
    out["matching_mean"] = matching_mean_ates(singles, perturbed, groups, data.sep)
    out["linear"] = linear_baseline_ates(
        data,
        groups,
        n_components=n_components,
        ridge=ridge,
        transform=transform,
        split=split,
        target_sum=target_sum,
    )
    return out
