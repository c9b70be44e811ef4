"""What a model needs from the data beyond counts, dosage and split, and the one preparation that supplies it.

A model's effect block, artifact block and penalties each declare the per-cell data they read from a
minibatch as :class:`Requirement` objects (their ``data_needs``); the named model gathers them
(:func:`pyrovae.models.zoo.data_requirements`), and :func:`prepare_data` supplies them. ``train_run`` and
``Run.load_data`` (:mod:`pyrovae.runs.run`) both call it, so training and evaluation see the same data, and
a requirement the data cannot meet (a QC column that does not exist, a GPO-VAE perturbation that is not a
measured gene) is one ``ValueError`` before any run directory is made, not a failure inside a penalty.

- ``qc_flags`` (CRADLE-VAE's artifact block): ``qc`` (N, 1), 1 = the cell fails QC
  (:func:`pyrovae.data.qc.qc_indicator`: ``obs[qc_key]``, else MAD flags on QC metrics);
- ``counterfactuals`` (CRADLE-VAE's counterfactual KL): ``cfx`` (N, G) and ``has_cf`` (N,)
  (:func:`pyrovae.data.qc.counterfactual_table`: the median of same-label, same-split cells with the
  opposite QC status; seeded);
- ``grn_targets`` (GPO-VAE's GRN alignment): the GRN nodes as treatments, ``delta_x`` and ``delta_x_group``
  (N, T) (:func:`pyrovae.data.grn.grn_targets`: OT pairing with controls, ΔX).

The extras are carried by every minibatch (:class:`~pyrovae.data.loader.MinibatchLoader`). ``cfx``,
``delta_x`` and ``delta_x_group`` are held in O(groups + N) memory, not as (N, G) / (N, T) arrays, and
a minibatch's rows are made when it is drawn (:mod:`pyrovae.data.extras`).

Options (a run's data options, ``config.json``): ``holdout_perturbations`` (any model, applied first:
:func:`holdout_perturbations`), ``qc_key``, ``extra_genes``, ``pairing_method``, ``pairing_reg`` and
``split_seed`` (which seeds the pairing and the counterfactual draws; it names the pairing cache column).

The record of what was prepared, with which settings (``seed``, ``qc_key``, ``qc_threshold``, the GRN
``nodes``, ``n_perturbed``, ``extended``, ``pairing_method``, ``pairing_reg``, ``timings``), is kept in
``uns["pyrovae_gpo"]`` and saved by a run in its own file ``prep.json`` (:func:`preparation_record`), from
which ``Run.load_data`` prepares evaluation data the same way.

**Held-out perturbations** (:func:`holdout_perturbations`). Every cell whose label contains one of the
given perturbations (singles and the combinations containing them) moves to the ``test`` split, so neither
training nor validation ever sees them, and the training normalisation statistics are recomputed without
them. Unlike the reference's ``mask_test`` (which zeroes the held-out dosage columns in every split) their
dosage columns are *kept*: the cells are not turned into control-like cells, and at prediction time the
dosage row really names the perturbation. :func:`prepare_data` applies it *before* the requirements, so that
the pairing and counterfactuals are built within the final splits.

What a model can do with such a perturbation (N_t = 0 in training):

- SAMS-VAE / CPA-VAE / CRADLE-VAE: nothing. The row's q was never updated, so prediction falls back to the
  prior (:meth:`~pyrovae.models.skeleton.PerturbationVAE.sample_globals` with ``untrained``): a random
  effect, i.e. no information about this perturbation.
- GPO-VAE: its GRN row W_j (gene j's outgoing edges) is *not* entirely untrained. It receives gradient from
  the K-hop terms of the GRN loss through paths t -> j -> k of seen perturbations t (the W^2, W^3, ...
  terms of S), and from the sparsity penalty. Its effect block's ``predict_untrained`` hook
  (:func:`pyrovae.models.effects.grn_transfer`), which every :class:`~pyrovae.predict.posterior.Posterior`
  of a GPO-VAE run uses (``pyrovae ate`` / ``sample`` included), takes that row for the mask of the unseen
  perturbation and transfers effect sizes from the seen perturbations (see its docstring). This is a weak
  signal: the higher-order terms carry 1/T^(k-1) factors and the direct terms of the seen rows absorb most
  of the residual, so the prediction is only as good as the learned regulators-of-regulators structure.
  It is no substitute for observing the perturbation.
- Any of these trained with ``gene_features`` (:mod:`pyrovae.models.effects.features`): the prior mean of
  every effect row is a learned function of the target gene's features, and an unseen perturbation is
  predicted at it (``untrained_method`` ``"gene_features"``, GPO-VAE's GRN transfer replaced).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pyrovae.config import preview
from pyrovae.data.anndata import log_norm_stats
from pyrovae.data.grn import MAX_GRN_NODES, UNS_KEY, grn_targets
from pyrovae.data.matrix import nonzero_counts
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.data.qc import counterfactual_table, qc_indicator

#: data options (kept in a run's ``config.json``) read by :func:`prepare_data`, besides ``split_seed``.
MODEL_DATA_OPTIONS = ("holdout_perturbations", "qc_key", "extra_genes", "pairing_method", "pairing_reg")


@dataclasses.dataclass(frozen=True)
class PrepOptions:
    """The settings of a preparation, read from data options by :meth:`from_options`."""

    qc_key: str | None = None
    qc_threshold: float = 3.0  # MAD multiple of the computed QC flags (the reference's 3)
    extra_genes: tuple[str, ...] | None = None
    pairing_method: str = "auto"
    pairing_reg: float = 0.05
    seed: int = 0
    n_cf: int = 50  # at most this many opposite-status cells enter each counterfactual median
    max_grn_nodes: int = MAX_GRN_NODES  # GPO-VAE's largest GRN (pyrovae.data.grn.check_grn_size)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> PrepOptions:
        """From data options (``qc_key``, ``extra_genes``, ``pairing_method``, ``pairing_reg``,
        ``split_seed`` -> ``seed``; also ``qc_threshold``, ``n_cf``, ``max_grn_nodes``); missing or ``None``
        ones: defaults."""
        o = dict(options or {})
        extra = o.get("extra_genes")
        return cls(
            qc_key=o.get("qc_key") or None,
            qc_threshold=3.0 if o.get("qc_threshold") is None else float(o["qc_threshold"]),
            extra_genes=None if extra is None else tuple(str(g) for g in extra),
            pairing_method=o.get("pairing_method") or "auto",
            pairing_reg=float(o.get("pairing_reg") or 0.05),
            seed=int(o.get("split_seed") or 0),
            n_cf=50 if o.get("n_cf") is None else int(o["n_cf"]),
            max_grn_nodes=MAX_GRN_NODES if o.get("max_grn_nodes") is None else int(o["max_grn_nodes"]),
        )


#: a preparation step: (data, options, force) -> (data with the extras, record entries), or None if the
#: data already holds what the step makes
Step = Callable[[PerturbationData, PrepOptions, bool], "tuple[PerturbationData, dict[str, Any]] | None"]


@dataclasses.dataclass(frozen=True)
class Requirement:
    """Per-cell data a model component reads from every minibatch, and how to make it.

    ``provides``: the ``PerturbationData.extras`` keys it makes; ``order``: steps run in increasing order
    (a step may read what an earlier one made); ``step``: see :data:`Step`; ``after``: the requirements
    its step reads (:func:`ordered` adds them).
    """

    name: str
    provides: tuple[str, ...]
    order: int
    step: Step = dataclasses.field(repr=False, compare=False)
    after: tuple[Requirement, ...] = dataclasses.field(default=(), repr=False, compare=False)


def _qc_flags(data: PerturbationData, opts: PrepOptions, force: bool):
    if not force and "qc" in data.extras:
        return None
    extras = {**data.extras, "qc": qc_indicator(data, opts.qc_key, opts.qc_threshold)}
    return dataclasses.replace(data, extras=extras), {}


def _counterfactuals(data: PerturbationData, opts: PrepOptions, force: bool):
    if not force and "cfx" in data.extras and "has_cf" in data.extras:
        return None
    t0 = time.perf_counter()
    qc = np.asarray(data.extras["qc"], dtype=np.float32).reshape(data.n_cells, -1)
    cfx, has_cf = counterfactual_table(
        data.counts, data.labels, data.split, qc.max(1) > 0, n_sample=opts.n_cf, seed=opts.seed
    )
    extras = {
        **data.extras,
        "cfx": cfx,  # GroupRows: the group medians and a code per cell, rows made per minibatch
        "has_cf": np.asarray(has_cf, dtype=np.float32).reshape(-1),
    }
    return dataclasses.replace(data, extras=extras), {
        "timings": {"counterfactual_s": time.perf_counter() - t0}
    }


def _grn_targets(data: PerturbationData, opts: PrepOptions, force: bool):
    return grn_targets(
        data,
        extra_genes=opts.extra_genes,
        pairing_method=opts.pairing_method,
        pairing_reg=opts.pairing_reg,
        seed=opts.seed,
        force=force,
        max_grn_nodes=opts.max_grn_nodes,
    )


#: CRADLE-VAE's QC-failure indicator (the artifact block's input).
QC_FLAGS = Requirement("qc_flags", ("qc",), 0, _qc_flags)
#: CRADLE-VAE's counterfactual expression (the counterfactual KL), built on the QC flags.
COUNTERFACTUALS = Requirement("counterfactuals", ("cfx", "has_cf"), 1, _counterfactuals, after=(QC_FLAGS,))
#: GPO-VAE's GRN nodes and alignment targets (the GRN alignment penalty).
GRN_TARGETS = Requirement("grn_targets", ("delta_x", "delta_x_group"), 2, _grn_targets)


def ordered(requirements: Iterable[Requirement]) -> list[Requirement]:
    """The distinct requirements, with those they build on (``after``), in the order their steps run."""
    reqs: dict[str, Requirement] = {}

    def add(req: Requirement) -> None:
        for dep in req.after:
            add(dep)
        reqs.setdefault(req.name, req)

    for req in requirements:
        add(req)
    return sorted(reqs.values(), key=lambda r: r.order)


def prepare_data(
    data: PerturbationData,
    requirements: Iterable[Requirement],
    options: Mapping[str, Any] | None = None,
    force: bool = False,
    verbose: bool = False,
) -> PerturbationData:
    """``data`` with what ``requirements`` need (module docstring), the same way for training and evaluation.

    Args:
        data: validated data.
        requirements: what the model needs (:func:`pyrovae.models.zoo.data_requirements`).
        options: data options (module docstring); other keys are ignored.
        force: recompute everything, ignoring cached pairing and extras.
        verbose: print timings.

    Returns:
        A new :class:`PerturbationData` (the input is not modified), or ``data`` itself when nothing is to
        do (no hold-out, and every requirement already met).

    Raises:
        ValueError: a requirement the data cannot meet (names the problem and the fix).
    """
    options = dict(options or {})
    held = options.get("holdout_perturbations")
    if held and not set(map(str, held)) <= set(held_out(data)):  # held out already: nothing to redo
        data = holdout_perturbations(data, held)
    reqs = ordered(requirements)
    opts = PrepOptions.from_options(options)
    record: dict[str, Any] = {
        "seed": opts.seed,
        "qc_key": opts.qc_key or "",
        "qc_threshold": opts.qc_threshold,
    }
    timings: dict[str, float] = {}
    done = False
    for req in reqs:
        out = req.step(data, opts, force)
        if out is None:
            continue
        data, part = out
        timings.update(part.pop("timings", {}))
        record.update(part)
        done = True
    if not done:
        return data
    record["timings"] = timings
    prev = data.uns.get(UNS_KEY)
    uns = {**data.uns, UNS_KEY: {**prev, **record} if isinstance(prev, dict) else record}
    if verbose:
        print("prepare_data:", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()) or "all cached")
    return dataclasses.replace(data, obs=data.obs.copy(), uns=uns)


def preparation_record(data: PerturbationData, requirements: Iterable[Requirement]) -> dict[str, Any] | None:
    """What a run saves in ``prep.json``: the requirements met and the record of how (``None``: nothing).

    The timings are left out (they differ from run to run)."""
    names = [r.name for r in ordered(requirements)]
    rec = data.uns.get(UNS_KEY)
    if not names:
        return None
    rec = {k: v for k, v in rec.items() if k != "timings"} if isinstance(rec, dict) else {}
    return {"requirements": names, **rec}


def record_options(record: Mapping[str, Any]) -> dict[str, Any]:
    """The data options a saved :func:`preparation_record` was made with (to prepare the same way again)."""
    out: dict[str, Any] = {}
    if "seed" in record:
        out["split_seed"] = int(record["seed"])
    if "qc_key" in record:
        out["qc_key"] = record["qc_key"] or None
    if "qc_threshold" in record:
        out["qc_threshold"] = float(record["qc_threshold"])
    for k in ("pairing_method", "pairing_reg"):
        if k in record:
            out[k] = record[k]
    return out


def prepare_gpo_data(
    data: PerturbationData,
    extra_genes: Sequence[str] | None = None,
    qc_key: str | None = None,
    qc_threshold: float = 3.0,
    pairing_method: str = "auto",
    pairing_reg: float = 0.05,
    seed: int = 0,
    n_cf: int = 50,
    force: bool = False,
    grn: bool = True,
    verbose: bool = False,
) -> PerturbationData:
    """:func:`prepare_data` with GPO-VAE's requirements (QC flags, counterfactuals, GRN targets).

    ``grn=False``: CRADLE-VAE's (no GRN nodes, no ``delta_x``; its perturbations need not be genes).
    Other arguments: :class:`PrepOptions` (``seed`` is the ``split_seed`` option).
    """
    reqs = [QC_FLAGS, COUNTERFACTUALS] + ([GRN_TARGETS] if grn else [])
    options = {
        "extra_genes": extra_genes,
        "qc_key": qc_key,
        "qc_threshold": qc_threshold,
        "pairing_method": pairing_method,
        "pairing_reg": pairing_reg,
        "split_seed": seed,
        "n_cf": n_cf,
    }
    return prepare_data(data, reqs, options, force=force, verbose=verbose)


def prepare_cradle_data(data: PerturbationData, **kw: Any) -> PerturbationData:
    """:func:`prepare_gpo_data` with ``grn=False``: only the CRADLE-VAE extras ``qc``, ``cfx``, ``has_cf``."""
    return prepare_gpo_data(data, grn=False, **kw)


# ------------------------------------------------------------------------------------------ held out
#: uns key listing the perturbations :func:`holdout_perturbations` moved to test.
HELDOUT_KEY = "pyrovae_heldout_perturbations"


def held_out(data: PerturbationData) -> list[str]:
    """The perturbations held out of ``data`` by :func:`holdout_perturbations` (``[]``: none)."""
    return [str(p) for p in np.asarray(data.uns.get(HELDOUT_KEY, [])).reshape(-1)]


def holdout_perturbations(data: PerturbationData, perturbations: Sequence[str]) -> PerturbationData:
    """Move every cell that received one of ``perturbations`` (alone or in a combination) to ``test``.

    Their dosage columns are kept (unlike the reference's ``mask_test``), cells with no split stay unused,
    and the training normalisation statistics are recomputed on the remaining training cells. The
    perturbations get N_t = 0 in training, so :attr:`~pyrovae.runs.run.Run.untrained` marks them and
    prediction uses the prior for them (or, for GPO-VAE, the GRN transfer
    :func:`pyrovae.models.effects.grn_transfer`); every prediction states which.

    Raises ``ValueError`` for names that are not treatment columns, or if no training cell would remain.
    """
    if isinstance(perturbations, str):
        perturbations = [perturbations]
    names = [str(p) for p in perturbations]
    if not names:
        raise ValueError("no perturbations to hold out")
    col = {t: j for j, t in enumerate(data.treatments)}
    unknown = [p for p in names if p not in col]
    if unknown:
        raise ValueError(
            f"cannot hold out {unknown}: not treatment columns of the data ({preview(data.treatments)}). "
            "Name single perturbations; to hold out combinations only, load the data with "
            "split_mode='combinations'"
        )
    cols = [col[p] for p in names]
    hit = nonzero_counts(data.dosage[:, cols], 1) > 0
    split = data.split.copy()
    split[hit & (split != "")] = "test"
    train_idx = np.flatnonzero(split == "train")
    if len(train_idx) == 0:
        raise ValueError("holding these perturbations out leaves no training cell")
    if not nonzero_counts(data.dosage[train_idx], 1).any():
        raise ValueError("holding these perturbations out leaves no perturbed training cell")
    mean, std = log_norm_stats(data.counts, train_idx)
    uns = dict(data.uns)
    uns[HELDOUT_KEY] = sorted(set(held_out(data)) | set(names))
    if "delta_x" in data.extras or "cfx" in data.extras:
        warnings.warn(
            "holding out perturbations after the GPO/CRADLE preparation: the pairing and counterfactuals "
            "were built within the old splits; call holdout_perturbations first, or prepare again with "
            "force=True",
            stacklevel=2,
        )
    return dataclasses.replace(data, split=split.astype(str), norm_mean=mean, norm_std=std, uns=uns)
