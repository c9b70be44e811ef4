"""What the evaluation protocol returns (:mod:`pyrovae.evaluate.score`): small typed records instead of
nested dicts, so that a caller reads ``scores.ate["test"].table`` and a misspelt field is an
``AttributeError`` where it is written, not a ``KeyError`` at run time in another module.

Shapes: A perturbation labels compared, G genes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

__all__ = ["ATEReport", "RunScores"]


@dataclasses.dataclass
class ATEReport:
    """The empirical ATE of chosen cells against the models' and the baselines' predictions
    (:func:`~pyrovae.evaluate.score.ate_report`, :func:`~pyrovae.evaluate.score.score_ate`).

    Attributes:
        ate_true: (A, G) the empirical ATE of the compared cells, rows indexed by label.
        preds: {method: (A, G) predicted ATE}: the models and the baselines.
        table: one row per method, its metrics (:func:`~pyrovae.evaluate.field.field_table`).
        per_perturbation: long table (method, perturbation, metrics, and with
            :func:`~pyrovae.evaluate.score.score_ate` ``prediction``: how the method predicted the label).
        control_source: which control cells the empirical ATE used.
        perturbations: the A labels compared (sorted).
        prediction: {label: how the scored model predicted it}
            (:meth:`~pyrovae.predict.posterior.Posterior.prediction_methods`).
        conditions: the depth and covariate levels the model was sampled at, in words.
        ceiling: the noise-ceiling rows (None without ``ceiling``).
        vs_baseline: each method's per-perturbation comparison with the best baseline (None when off).
        baseline_names: the model-free baselines in the table.
        de_qvalues: (A, G) differential-expression q-values of the compared cells (None without ``de``).
        energy: the energy distances of predicted cells (None without ``cells``).
        unseen: the labels with a treatment that has no training cell
            (:func:`~pyrovae.evaluate.score.score_ate`; empty from ``ate_report``).
        untrained_method: how the scored run predicts unseen treatments (``score_ate``).
        unseen_table: the metrics over the unseen labels by group (None without unseen labels).
    """

    ate_true: pd.DataFrame
    preds: dict[str, pd.DataFrame]
    table: pd.DataFrame
    per_perturbation: pd.DataFrame
    control_source: str
    perturbations: list[str]
    prediction: dict[str, str]
    conditions: str
    ceiling: pd.DataFrame | None = None
    vs_baseline: pd.DataFrame | None = None
    baseline_names: list[str] = dataclasses.field(default_factory=list)
    de_qvalues: pd.DataFrame | None = None
    energy: pd.DataFrame | None = None
    unseen: list[str] = dataclasses.field(default_factory=list)
    untrained_method: str | None = None
    unseen_table: pd.DataFrame | None = None


@dataclasses.dataclass
class RunScores:
    """What :func:`~pyrovae.evaluate.score.score_run` measured of a run and the runs compared with it.

    Attributes:
        name: the scored run's name in the tables.
        ate: {cell set: its :class:`ATEReport`}.
        iwelbo: {model: {cell set: :func:`~pyrovae.predict.iwelbo.iwelbo_over_seeds`'s result}}.
        iwelbo_summary: {model: {cell set: :func:`~pyrovae.evaluate.score.iwelbo_summary`'s JSON-ready
            dict}}.
    """

    name: str
    ate: dict[str, ATEReport]
    iwelbo: dict[str, dict[str, dict[str, Any]]]
    iwelbo_summary: dict[str, dict[str, dict[str, Any]]]
