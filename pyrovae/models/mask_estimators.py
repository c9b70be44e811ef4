"""Gradient estimators of the q(M) logits (the ``mask`` guide site of the SAMS-VAE family): the surrogate-
ELBO terms that change the gradient, never the ELBO's value (the training ELBO adds them:
:class:`pyrovae.train.trainer.SurrogateTraceGraphELBO`), and :func:`mask_site`, the site's distribution and
``infer`` dict per estimator."""

from __future__ import annotations

import typing
from functools import partial
from typing import Literal

import pyro.distributions as dist
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from pyrovae.models.distributions import (
    AntitheticBernoulli,
    DetachedBernoulli,
    RelaxedBernoulliMask,
    StraightThroughBernoulli,
)
from pyrovae.models.plates import CELL_PLATE, PERTURBATION_PLATE

#: Key of a guide site's ``infer`` dict holding ``fn(model_trace, guide_trace) -> tensor``, an extra
#: term of the *surrogate* ELBO (gradient only) that the training ELBO adds
#: (:func:`pyrovae.train.trainer.make_elbo`).
SURROGATE_ELBO = "surrogate_elbo"
#: Estimators of the gradient of the q(M) logits (:func:`mask_site`).
MaskEstimator = Literal["straight_through", "score_function", "loo", "disarm", "relaxed"]
MASK_ESTIMATORS = typing.get_args(MaskEstimator)
#: Pyro's param-store name of the decaying-average baseline of the ``mask`` site (TraceGraph_ELBO).
BASELINE_PARAM = "__baseline_avg_downstream_cost_mask"


def _dosage_of(trace) -> torch.Tensor:
    """The (B, T) dosage of the minibatch a skeleton trace was run on (its first argument, the batch)."""
    try:
        return trace.nodes["_INPUT"]["args"][0]["d"]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(
            "this mask estimator needs the traces of PerturbationVAE.model/guide(batch, ...)"
        ) from e


def per_treatment_costs(model_trace, guide_trace) -> torch.Tensor:
    """(P, T) the (detached) ELBO terms that depend on each treatment's masks, per particle.

    Cost of treatment t = sum over the cells that received t (d_it != 0) of their log p - log q terms
    (sites of the cells plate), plus row t's global terms (sites of the perturbations plate), all with the
    traces' scales. Every other term of the ELBO is independent of m_t, because a cell's terms depend on M
    only through d_i (E * M) and the guide's row t of q(E | M) only through m_t.
    """
    member = (_dosage_of(guide_trace) != 0).to(torch.get_default_dtype())
    cells, rows = 0.0, 0.0
    for tr, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in tr.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            frames = {f.name for f in site["cond_indep_stack"]}
            if CELL_PLATE in frames:
                cells = cells + sign * site["log_prob"].detach()
            elif PERTURBATION_PLATE in frames:
                rows = rows + sign * site["log_prob"].detach()
    return torch.matmul(cells, member.to(cells.dtype)) + rows


def leave_one_out_surrogate(model_trace, guide_trace) -> torch.Tensor:
    """Surrogate-ELBO term of the ``loo`` estimator (gradient only; see :class:`AdditiveEffect`).

    sum_{p, t} log q(m_pt) * (c_pt - mean_{j != p} c_jt), c = :func:`per_treatment_costs`. Its gradient,
    divided by P (the ELBO averages particles), is unbiased for the gradient of E_q[ELBO] w.r.t. the
    logits: the baseline of particle p is independent of m_p, and the terms left out of c_t do not
    depend on m_t. Pyro's own surrogate adds the rest (the explicit -log q(m) term, zero in expectation).
    """
    site = guide_trace.nodes["mask"]
    if site["value"].dim() < 3 or site["value"].shape[0] < 2:
        raise ValueError("mask_estimator='loo' needs at least 2 vectorised particles (n_particles >= 2)")
    cost = per_treatment_costs(model_trace, guide_trace)
    n = cost.shape[0]
    baseline = (cost.sum(0, keepdim=True) - cost) / (n - 1)
    score = site["fn"].log_prob(site["value"])  # (P, T), unscaled, differentiable in the logits
    return (score * (cost - baseline)).sum()


def disarm_surrogate(model_trace, guide_trace) -> torch.Tensor:
    """Surrogate-ELBO term of the ``disarm`` estimator (Dong, Mnih & Tucker 2020; gradient only).

    Particles p and p + h, h = P // 2, are an antithetic pair (b, b~) (:class:`AntitheticBernoulli`; with P
    odd the last particle enters the ELBO but not this mask gradient). Per pair and
    entry (t, k) the DisARM gradient of the logit is 1/2 (c_t(b) - c_t(b~)) (-1)^{b~_tk} 1[b_tk != b~_tk]
    sigmoid(``|logit_tk|``), with c = :func:`per_treatment_costs` (the per-treatment Rao-Blackwellisation of
    ``loo``, valid here too: the terms left out of c_t do not depend on m_t and the pair's marginals are
    equal). The term is linear in the logits with the pair-averaged gradient as its (detached) slope,
    times P because the ELBO averages particles.
    """
    site = guide_trace.nodes["mask"]
    b = site["value"]
    if b.dim() < 3 or b.shape[0] < 2:
        raise ValueError("mask_estimator='disarm' needs at least 2 vectorised particles (n_particles >= 2)")
    logits = site["fn"].base_dist.logits  # (P, T, K), differentiable
    cost = per_treatment_costs(model_trace, guide_trace)
    half = b.shape[0] // 2
    b1, b2 = b[:half], b[half : 2 * half]
    diff = 0.5 * (cost[:half] - cost[half : 2 * half]).unsqueeze(-1)  # (h, T, 1)
    sign = 1.0 - 2.0 * b2
    g = (diff * sign * (b1 != b2).to(b.dtype) * torch.sigmoid(logits[:half].abs())).mean(0)
    return (logits * g.detach()).sum()


def mask_kl_warmup_surrogate(beta: float, analytic: bool, model_trace, guide_trace) -> torch.Tensor:
    """Surrogate-ELBO term of the mask-KL warm-up: the gradient of the mask term becomes beta times its own.

    The mask term is the sampled log p(m) - log q(m) (straight-through: its gradient is pathwise through
    the relaxation plus the logits' direct one) or, with ``analytic`` (the ``relaxed`` estimator, whose
    surrogate already swapped it for the analytic term), -KL(q(M) || p(M)); both with the sites' scales.
    Adding (beta - 1) (term - term.detach()) leaves the ELBO's value unchanged and scales the term's
    gradient by beta. Departure from the paper's objective (the paper has no schedule): while
    beta < 1 the gradient is that of an ELBO whose mask KL is down-weighted by beta.
    """
    q_site, p_site = guide_trace.nodes["mask"], model_trace.nodes["mask"]
    if analytic:
        q = dist.Bernoulli(logits=q_site["fn"].base_dist.logits)
        p = dist.Bernoulli(logits=p_site["fn"].base_dist.logits)
        kl = torch.distributions.kl_divergence(q, p).sum(-1)
        term = -scale_and_mask(kl, p_site["scale"], p_site["mask"])
    else:
        term = p_site["log_prob"] - q_site["log_prob"]
    return (beta - 1.0) * (term - term.detach()).sum()


def sum_of_surrogates(terms, model_trace, guide_trace) -> torch.Tensor:
    """The sum of several surrogate-ELBO terms of one site (``fn(model_trace, guide_trace)`` each)."""
    return sum(term(model_trace, guide_trace) for term in terms)


def analytic_mask_kl_surrogate(model_trace, guide_trace) -> torch.Tensor:
    """Surrogate-ELBO term of the ``relaxed`` estimator: the mask term's gradient becomes -grad KL.

    Removes the gradient of the sampled log p(m) - log q(m) (a relaxed sample's hard value carries none
    but the zero-mean score of q) and adds that of the analytic -KL(q(m_t) || p(m_t)), with the sites'
    scales (row weights and 1/N). The ELBO's value keeps the sampled term.
    """
    q_site, p_site = guide_trace.nodes["mask"], model_trace.nodes["mask"]
    sampled = p_site["log_prob"] - q_site["log_prob"]
    q = dist.Bernoulli(logits=q_site["fn"].base_dist.logits)
    p = dist.Bernoulli(logits=p_site["fn"].base_dist.logits)
    kl = scale_and_mask(torch.distributions.kl_divergence(q, p).sum(-1), p_site["scale"], p_site["mask"])
    return -(sampled - sampled.detach()).sum() - (kl - kl.detach()).sum()


def mask_site(
    estimator: str, logits: torch.Tensor, temperature: torch.Tensor, kl_weight: float, baseline=None
) -> tuple[dist.TorchDistribution, dict]:
    """The q(M) distribution (batch (..., T), event (K,) after ``to_event(1)``) and the ``infer`` dict of
    the ``mask`` guide site for one gradient estimator of the logits.

    Every estimator samples exact Bernoulli(sigmoid(logits)) masks at prediction time and scores masks
    with the Bernoulli log-density, so the ELBO's value is the same in all:

    - ``"straight_through"`` (reference parity): hard masks, gradient through the relaxed sample at
      ``temperature`` (biased).
    - ``"score_function"``: a plain ``Bernoulli`` site, so Pyro's ``TraceGraph_ELBO`` adds the
      score-function term with its own variance reduction (provenance-based downstream costs) and the
      ``baseline`` settings (``infer={"baseline": ...}``). Unbiased.
    - ``"loo"``: REINFORCE with the per-treatment Rao-Blackwellisation and the leave-one-out baseline over
      the vectorised particles (:func:`leave_one_out_surrogate`); unbiased, ``n_particles >= 2``.
    - ``"disarm"``: DisARM on antithetic pairs of particles (:func:`disarm_surrogate`); unbiased.
    - ``"relaxed"``: binary-Concrete masks in the likelihood at ``temperature`` (pathwise, biased), the
      mask term's gradient the analytic KL's (:func:`analytic_mask_kl_surrogate`). Departure from the
      paper's objective during training only.

    ``kl_weight`` < 1 (straight-through, relaxed) scales the mask KL's gradient
    (:func:`mask_kl_warmup_surrogate`).
    """
    infer: dict = {}
    if estimator == "straight_through":
        fn = StraightThroughBernoulli(temperature, logits=logits)
        if kl_weight < 1.0:
            infer = {SURROGATE_ELBO: partial(mask_kl_warmup_surrogate, kl_weight, False)}
    elif estimator == "score_function":
        fn = dist.Bernoulli(logits=logits)
        infer = {"baseline": baseline}
    elif estimator == "loo":
        fn = DetachedBernoulli(logits=logits)
        infer = {SURROGATE_ELBO: leave_one_out_surrogate}
    elif estimator == "disarm":
        fn = AntitheticBernoulli(logits=logits)
        infer = {SURROGATE_ELBO: disarm_surrogate}
    elif estimator == "relaxed":
        fn = RelaxedBernoulliMask(temperature, logits=logits)
        infer = {SURROGATE_ELBO: analytic_mask_kl_surrogate}
        if kl_weight < 1.0:
            warm = partial(mask_kl_warmup_surrogate, kl_weight, True)
            infer = {SURROGATE_ELBO: partial(sum_of_surrogates, (analytic_mask_kl_surrogate, warm))}
    else:
        raise ValueError(f"unknown mask_estimator {estimator!r}; use one of {MASK_ESTIMATORS}")
    return fn, infer
