"""The evaluation protocol: score trained runs on chosen cells (held-out IWELBO, ATE with trivial baselines).

:func:`score_run` is the one model-agnostic entry point; ``pyrovae iwelbo``, ``pyrovae ate`` and
``pyrovae demo`` call it and only write and print what it returns. The pieces:

- :func:`iwelbo_summary`: the JSON-ready summary of :func:`~pyrovae.predict.iwelbo.iwelbo_over_seeds`;
- :func:`ate_report`: empirical ATE of chosen cells versus model ATE(s) and the trivial baselines;
- :func:`score_ate`: :func:`ate_report` for one run plus its unseen perturbations (a treatment with no
  training cell): the unseen-perturbation baselines, the prior-draw control of a model that transfers
  (GPO-VAE), how each perturbation was predicted, and the metrics grouped over the unseen labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pyrovae.baselines.unseen import unseen_perturbation_baselines
from pyrovae.data.matrix import select_rows
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.data.prepare import prepare_data
from pyrovae.evaluate.ate import ate_table
from pyrovae.evaluate.empirical import data_totals, empirical_ate
from pyrovae.evaluate.field import combination_members, field_table
from pyrovae.evaluate.results import ATEReport, RunScores
from pyrovae.models.zoo import data_requirements
from pyrovae.predict.conditions import MATCHED
from pyrovae.predict.iwelbo import iwelbo_over_seeds
from pyrovae.predict.posterior import Posterior
from pyrovae.runs import Run

# -------------------------------------------------------------------------------------------- iwelbo


def iwelbo_summary(res: dict[str, Any], split_name: str) -> dict[str, Any]:
    """JSON-ready summary of :func:`~pyrovae.predict.iwelbo.iwelbo_over_seeds` (plus per-label means)."""
    cells = res["cells"]
    return {
        "split": split_name,
        "mean_iwelbo": res["mean"],
        "mc_std_over_seeds": res["std"],
        "per_seed": res["per_seed"],
        "n_cells": res["n_cells"],
        "n_particles": res["n_particles"],
        "score_globals": res["score_globals"],
        "bound": (
            "prior-predictive marginal likelihood (globals scored)"
            if res["score_globals"]
            else "posterior-predictive likelihood under q (globals not scored; not the model evidence)"
        ),
        "per_label": {
            str(k): float(v) for k, v in cells.groupby("label", observed=True)["iwelbo"].mean().items()
        },
    }


# ----------------------------------------------------------------------------------------------- ATE


def ate_transform(likelihood: str) -> str:
    """The ATE transform of a model's likelihood: ``"perturbseq"`` for counts, ``"mean"`` for ``normal``."""
    return "perturbseq" if likelihood != "normal" else "mean"


def ate_report(
    posterior,
    data,
    rows: np.ndarray,
    *,
    top_k: int = 20,
    n_samples: int = 2500,
    library_size: str | float = MATCHED,
    seed: int = 0,
    chunk: int = 256,
    model_name: str = "model",
    baselines: bool = True,
    extra_models: dict[str, Any] | None = None,
    extra_preds: dict[str, pd.DataFrame] | None = None,
    cache: dict[tuple, pd.DataFrame] | None = None,
    covariates: dict[str, str] | None = None,
    de: bool = True,
    cells: bool = False,
    n_cells: int = 200,
    ceiling: bool = True,
    ceiling_splits: int = 5,
    mc_seeds: int = 1,
) -> ATEReport:
    """Empirical ATE of the cells ``rows`` versus model ATE(s) and trivial baselines.

    The model ATE is sampled at the depth of the compared cells by default (``library_size="matched"``:
    each sample takes the library size, and covariates, of a cell of its label among ``rows``;
    :meth:`~pyrovae.predict.posterior.Posterior.model_ate`); a number samples every cell at that depth (the
    reference's 1e4). ``covariates`` ({key: level}) evaluates the model at chosen levels.

    The empirical ATE uses the perturbed cells in ``rows`` and, as reference, the control cells in
    ``rows`` (all control cells of the data if ``rows`` holds none, which happens for a test split made of
    held-out combinations only). Baselines are computed from the training cells only.

    ``extra_preds``: further predictions ({name: A x G DataFrame}, rows indexed by label), e.g. the
    unseen-perturbation baselines of :func:`pyrovae.baselines.unseen.unseen_perturbation_baselines`.
    ``cache``: model ATEs already computed with these settings, by (model name, perturbations); filled
    in, so that cell sets with the same perturbations share one prediction (:func:`score_run`).

    The table holds the field-standard metrics too (:func:`pyrovae.evaluate.field.field_table`: all
    model-free baselines, DE top-k genes with ``de``, interaction residuals, the noise ceiling with
    ``ceiling`` over ``ceiling_splits`` halvings); ``cells`` adds the energy distance of ``n_cells``
    predicted cells per perturbation (:meth:`~pyrovae.predict.posterior.Posterior.predict`, at
    ``library_size``) against the held-out cells; ``mc_seeds`` > 1 adds each model's ``<metric>_mc_sd``,
    the spread of its metrics over model ATEs (and, with ``cells``, predicted cells) at seeds ``seed``,
    ``seed + 1``, ...

    Returns:
        an :class:`~pyrovae.evaluate.results.ATEReport` (its ``unseen`` fields left empty).
    """
    rows = np.asarray(rows)
    labels = data.labels[rows]
    ctrl = data.control_label
    perts = sorted({str(v) for v in labels} - {ctrl})
    if not perts:
        raise ValueError("the selected cells hold no perturbed cell; nothing to compare")
    control_source = "selected cells"
    if not (labels == ctrl).any():
        rows = np.concatenate([rows, np.flatnonzero((data.labels == ctrl) & (data.split != ""))])
        control_source = "all control cells (none among the selected cells)"
    transform = ate_transform(posterior.model.likelihood)
    # sparse counts stay sparse (empirical_ate densifies one row batch at a time); same numbers as dense
    ate_true = empirical_ate(
        select_rows(data.counts, rows),
        data.labels[rows],
        ctrl,
        genes=data.genes,
        transform=transform,
        totals=data_totals(data, rows),
    )
    ate_true = ate_true.loc[perts]
    preds: dict[str, pd.DataFrame] = {}
    cache = {} if cache is None else cache
    members = combination_members(perts, data.sep)  # for the interaction residuals of combinations
    model_singles, mc_preds, predicted_cells, mc_cells = {}, {}, {}, {}
    models = {model_name: posterior, **(extra_models or {})}
    kw = dict(
        n_samples=n_samples,
        library_size=library_size,
        data=data,
        chunk=chunk,
        transform=transform,
        rows=rows,
        covariates=covariates,
    )
    # matched depths depend on the compared cells: sets share a prediction only with the same cells
    cell_key = hash(np.asarray(rows).tobytes()) if isinstance(library_size, str) else None
    cond = (cell_key, tuple(sorted((covariates or {}).items())))
    for name, post in models.items():
        asked = [((name, tuple(perts), *cond), perts, seed)]
        asked += [((name, tuple(members), *cond), members, seed)] if members else []
        asked += [((name, tuple(perts), *cond, seed + k), perts, seed + k) for k in range(1, mc_seeds)]
        for key, labs, s in asked:
            if key not in cache:
                cache[key] = post.model_ate(labs, seed=s, **kw)
        preds[name] = cache[asked[0][0]]
        model_singles[name] = pd.concat([preds[name], *([cache[asked[1][0]]] if members else [])])
        mc_preds[name] = [cache[key] for key, _, _ in asked[1 + bool(members) :]]
        if cells:
            predicted_cells[name], *mc_cells[name] = [
                post.predict(
                    [*perts, ctrl],
                    n_cells=n_cells,
                    library_size=library_size,
                    data=data,
                    seed=seed + k,
                    chunk=chunk,
                    covariates=covariates,
                )
                for k in range(mc_seeds)
            ]
    for name, df in (extra_preds or {}).items():
        preds[name] = df.loc[perts]
    field = field_table(
        data,
        rows,
        ate_true,
        preds,
        transform=transform,
        top_k=top_k,
        model_singles=model_singles,
        baselines=baselines,
        de=de,
        cells=predicted_cells or None,
        ceiling=ceiling,
        ceiling_splits=ceiling_splits,
        mc_preds=mc_preds if mc_seeds > 1 else None,
        mc_cells=mc_cells if mc_seeds > 1 else None,
        seed=seed,
    )
    return ATEReport(
        ate_true=ate_true,
        preds=field["preds"],
        table=field["table"],
        per_perturbation=field["per_perturbation"],
        control_source=control_source,
        perturbations=perts,
        prediction=dict(preds[model_name].attrs.get("prediction", {})),
        conditions=preds[model_name].attrs.get("conditions", ""),
        **{k: field[k] for k in ("ceiling", "vs_baseline", "baseline_names", "de_qvalues", "energy")},
    )


def unseen_labels(post: Posterior, data: PerturbationData, rows: np.ndarray) -> list[str]:
    """The perturbation labels among ``rows`` with a treatment that has no training cell (sorted)."""
    perts = sorted({str(v) for v in data.labels[rows]} - {data.control_label})
    return [p for p, m in post.prediction_methods(perts).items() if m != "trained"] if perts else []


def score_ate(
    run: Run,
    data: PerturbationData,
    rows: np.ndarray,
    *,
    name: str,
    others: Mapping[str, Run] | None = None,
    top_k: int = 20,
    n_samples: int = 2500,
    library_size: str | float = MATCHED,
    seed: int = 0,
    chunk: int = 256,
    cache: dict[tuple, pd.DataFrame] | None = None,
    baselines: bool = True,
    covariates: dict[str, str] | None = None,
    field_options: Mapping[str, Any] | None = None,
) -> ATEReport:
    """:func:`ate_report` of ``run`` (named ``name``; ``others`` in the same table) on the cells ``rows``,
    with the run's unseen perturbations (a treatment with no training cell) scored apart.

    For unseen labels the unseen-perturbation baselines
    (:func:`~pyrovae.baselines.unseen.unseen_perturbation_baselines`; NaN on the seen labels) join the table,
    and a model that transfers to them (GPO-VAE through its GRN) is also shown as
    ``<name>_prior_draw``, with prior draws on those rows: the worth of the transfer (both only with
    ``baselines``). ``field_options``: :func:`ate_report`'s ``de``, ``cells``, ``n_cells``, ``ceiling``,
    ``ceiling_splits``, ``mc_seeds``.

    Returns:
        :func:`ate_report`'s :class:`~pyrovae.evaluate.results.ATEReport`, its ``per_perturbation`` with a
        ``prediction`` column (how each model predicted each label, ``"baseline"`` for baselines and
        controls), with ``unseen`` (the unseen labels), ``untrained_method`` (how ``run`` predicts them)
        and ``unseen_table`` (the metrics per group: all unseen, unseen singles, combinations with an unseen
        member; None without unseen labels).
    """
    post = Posterior.from_run(run)
    models = {o: Posterior.from_run(r) for o, r in (others or {}).items()}
    unseen = unseen_labels(post, data, rows)
    transform = ate_transform(run.model.likelihood)
    extra_preds = None
    if unseen and baselines:
        names = [t for t, u in zip(post.treatments, post.untrained.tolist()) if u]
        # rows of the seen labels stay NaN: these baselines are about the unseen ones
        perts = sorted({str(lab) for lab in data.labels[rows]} - {data.control_label})
        extra_preds = {
            k: df.reindex(perts)
            for k, df in unseen_perturbation_baselines(data, unseen, names, transform=transform).items()
        }
    # a model that transfers (GPO-VAE) is also shown with prior draws on unseen rows: the transfer's worth
    control = (
        baselines
        and bool(unseen)
        and post.untrained_method != post.model.effect.untrained_method(transfer=False)
    )
    if control:
        models[f"{name}_prior_draw"] = Posterior.from_run(run, transfer=False)
    with warnings.catch_warnings():
        if control:  # the deliberate prior-draw control; the model itself does not draw from the prior
            warnings.filterwarnings("ignore", message=".*drawn from the prior.*")
        rep = ate_report(
            post,
            data,
            rows,
            top_k=top_k,
            n_samples=n_samples,
            library_size=library_size,
            seed=seed,
            chunk=chunk,
            model_name=name,
            extra_models=models or None,
            extra_preds=extra_preds,
            cache=cache,
            baselines=baselines,
            covariates=covariates,
            **(field_options or {}),
        )
    method_of = {name: rep.prediction}
    for o in others or {}:
        method_of[o] = dict(rep.preds[o].attrs.get("prediction", {}))
    per_pert = rep.per_perturbation
    per_pert["prediction"] = [
        method_of[m].get(p, "trained") if m in method_of else "baseline"
        for m, p in zip(per_pert["method"], per_pert["perturbation"])
    ]
    rep.unseen, rep.untrained_method = list(unseen), post.untrained_method
    rep.unseen_table = _unseen_table(rep, unseen, data.sep, top_k) if unseen else None
    return rep


def _unseen_table(rep: ATEReport, unseen: Sequence[str], sep: str, top_k: int) -> pd.DataFrame:
    """:func:`~pyrovae.evaluate.ate.ate_table` over the unseen labels, by group (index: group, method).

    Unseen singles apart from combinations with an unseen member (whose seen member carries signal); a
    method with no prediction for a group (all NaN) is left out of that group."""
    groups = {
        "all unseen": list(unseen),
        "unseen singles": [p for p in unseen if sep not in p],
        "combinations with an unseen member": [p for p in unseen if sep in p],
    }
    parts = {}
    for group, labs in groups.items():
        if labs:
            preds = {k: v.loc[labs] for k, v in rep.preds.items() if not v.loc[labs].isna().all().all()}
            parts[group] = ate_table(rep.ate_true.loc[labs], preds, top_k)
    return pd.concat(parts, names=["group"])


# ------------------------------------------------------------------------------------------ score_run


def level_sets(
    data: PerturbationData, sets: Mapping[str, np.ndarray], by: str | None
) -> list[tuple[str, np.ndarray, dict[str, str] | None]]:
    """(name, rows, covariates) of every set and, with ``by``, of each set's cells at each level of the obs
    column ``by`` that holds perturbed cells (named ``"<set> [by=level]"``). When ``by`` is a covariate of
    the model, the model is evaluated at the level (``covariates``); any other obs column only selects the
    cells (a model trained without it can still be scored per level)."""
    out = [(name, np.asarray(rows), None) for name, rows in sets.items()]
    if by is None:
        return out
    if by in data.covariate_levels:
        values, levels, model_level = data.covariate_values(by), data.covariate_levels[by], True
    elif by in data.obs.columns:
        values = data.obs[by].astype(str).to_numpy()
        levels, model_level = sorted(set(values[data.split != ""].tolist())), False
    else:
        raise ValueError(
            f"--by {by!r}: neither a covariate of the run ({list(data.covariate_levels) or 'none'}) nor an "
            "obs column of the data"
        )
    for name, rows in sets.items():
        rows = np.asarray(rows)
        for level in levels:
            at = rows[values[rows] == level]
            if (data.labels[at] != data.control_label).any():
                out.append((f"{name} [{by}={level}]", at, {by: level} if model_level else None))
    return out


def score_run(
    run: Run,
    data: PerturbationData,
    *,
    ate_sets: Mapping[str, np.ndarray] | None = None,
    iwelbo_sets: Mapping[str, str | np.ndarray] | None = None,
    name: str | None = None,
    others: Mapping[str, Run] | None = None,
    top_k: int = 20,
    n_samples: int = 2500,
    library_size: str | float = MATCHED,
    seed: int = 0,
    chunk: int = 256,
    iwelbo_seeds: Sequence[int] = (0, 1, 2),
    n_particles: int = 100,
    batch_size: int = 128,
    particle_chunk: int = 25,
    score_globals: bool = False,
    log: Callable[[str], Any] | None = None,
    baselines: bool = True,
    by: str | None = None,
    field_options: Mapping[str, Any] | None = None,
) -> RunScores:
    """Score ``run`` (and the runs ``others``, compared with it) on chosen sets of cells of ``data``.

    Args:
        run: the trained run (``data`` read with ``run.load_data``: its genes, treatments and split).
        ate_sets: {set name: (n,) row positions}: :func:`score_ate` on each set, the other runs' ATEs in the
            same table (model ATE with ``n_samples`` samples at ``library_size``, seeded by ``seed``; top-k
            genes by ``|empirical ATE|`` ``top_k``).
        iwelbo_sets: {set name: split name or row positions}: held-out IWELBO
            (:func:`~pyrovae.predict.iwelbo.iwelbo_over_seeds`, ``n_particles`` particles, evaluation seeds
            ``iwelbo_seeds``) of every run on each set, each run's untrained treatments as in training.
        name: the name of ``run`` in the tables (default: its model family).
        baselines: also score the trivial and unseen-perturbation baselines (and a transferring model's
            prior-draw control) in the ATE tables (False: the runs only, for callers that read the models'
            rows alone).
        field_options: the field-standard options of :func:`ate_report` (``de``, ``cells``, ``n_cells``,
            ``ceiling``, ``ceiling_splits``, ``mc_seeds``); each ATE set's dict then holds ``ceiling`` (the
            noise ceiling row) and ``vs_baseline`` beside ``table``.
        log: called with one line before each IWELBO and ATE computation (progress).
        by: a covariate of the run (e.g. ``"cell_type"``): every ATE set is also scored per level, on its
            cells at that level with the model evaluated at that level (sets ``"<set> [key=level]"``).

    Returns:
        a :class:`~pyrovae.evaluate.results.RunScores`: ``name``, ``ate`` ({set: :func:`score_ate`'s
        report}), ``iwelbo`` ({model: {set: :func:`iwelbo_over_seeds`'s dict}}) and ``iwelbo_summary``
        ({model: {set: :func:`iwelbo_summary`}}).
    """
    name = run.model_cfg.family if name is None else name
    runs = {name: run, **(others or {})}
    log = log or (lambda msg: None)
    iwelbo: dict[str, dict[str, dict[str, Any]]] = {}
    for model, r in runs.items():
        iwelbo[model] = {}
        # what the run's model reads beyond the counts (e.g. CRADLE-VAE's QC flags), as in training;
        # data prepared before is returned as it is
        run_data = prepare_data(data, data_requirements(r.model_cfg), r.data_options) if iwelbo_sets else data
        for set_name, rows in (iwelbo_sets or {}).items():
            n = len(data.indices(rows)) if isinstance(rows, str) else len(rows)
            log(f"IWELBO of {model} on {set_name} ({n} cells, {n_particles} particles)")
            iwelbo[model][set_name] = iwelbo_over_seeds(
                r.model,
                run_data,
                rows,
                seeds=iwelbo_seeds,
                n_particles=n_particles,
                batch_size=batch_size,
                particle_chunk=particle_chunk,
                untrained=r.untrained,
                score_globals=score_globals,
            )
    ate, cache = {}, {}  # sets with the same perturbations share one model ATE per model
    for set_name, rows, covariates in level_sets(data, ate_sets or {}, by):
        log(f"ATE on {set_name}")
        ate[set_name] = score_ate(
            run,
            data,
            rows,
            name=name,
            others=others,
            top_k=top_k,
            n_samples=n_samples,
            library_size=library_size,
            seed=seed,
            chunk=chunk,
            cache=cache,
            baselines=baselines,
            covariates=covariates,
            field_options=field_options,
        )
    return RunScores(
        name=name,
        ate=ate,
        iwelbo=iwelbo,
        iwelbo_summary={
            m: {s: iwelbo_summary(res, s) for s, res in sets.items()} for m, sets in iwelbo.items()
        },
    )
