"""Perturbation-effect blocks: the only part that differs between model families.

A block owns the global (perturbation-plated) latent sites, their variational families, and how a cell's
dosage row d turns them into a latent shift. The skeleton (:mod:`pyrovae.models.skeleton`) calls:

- ``model_globals(weights)`` / ``guide_globals(weights)``: sample the global sites in the
  ``perturbations`` plate (size T), each row scaled by ``weights`` (T,) (see :func:`weighted_plate`);
  return a dict of samples, shapes (..., T, K) (a leading particle dim when particles are vectorised).
- ``prior_loc(d, g)``: prior mean of the cell latent (SVAE+), else ``None`` (standard normal).
- ``shift(d, g)``: the latent offset z_p, (..., B, shift_dim).
- ``decoder_input(z, d, g)``: what the decoder sees, (..., B, decoder_in_dim).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.runtime import get_plates
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyrovae.models.distributions import (
    AntitheticBernoulli,
    DetachedBernoulli,
    HardenedBernoulli,
    RelaxedBernoulliMask,
    SpikeSlabNormal,
    StraightThroughBernoulli,
)
from pyrovae.models.rotation import SparseRotationStep, rotate_heads, rotated_scales
from pyrovae.nn.mlp import GaussianMLP

PERTURBATION_PLATE = "perturbations"
CELL_PLATE = "cells"
#: Key of a guide site's ``infer`` dict holding ``fn(model_trace, guide_trace) -> tensor``, an extra
#: term of the *surrogate* ELBO (gradient only) that the training ELBO adds
#: (:func:`pyrovae.infer.train.make_elbo`).
SURROGATE_ELBO = "surrogate_elbo"
#: Estimators of the gradient of the q(M) logits (:class:`AdditiveEffect`).
MASK_ESTIMATORS = ("straight_through", "score_function", "loo", "disarm", "relaxed")
#: Pyro's param-store name of the decaying-average baseline of the ``mask`` site (TraceGraph_ELBO).
BASELINE_PARAM = "__baseline_avg_downstream_cost_mask"
#: baselines of the ``score_function`` estimator: Pyro's decaying average of the downstream cost, or that
#: plus a learned correction (:class:`LearnedMaskBaseline`, fitted by Pyro's squared-error baseline loss)
MASK_BASELINES = ("decaying_avg", "learned")
#: q(E) families of :class:`AdditiveEffect` (``correlated``: the reference's; ``correlated_free*`` and
#: ``spike_slab``: departures from the reference's guide family, the objective unchanged)
GUIDES = ("mean_field", "correlated", "correlated_free", "correlated_free_scale", "spike_slab")
#: how a treatment with no training cell is predicted (:meth:`EffectBlock.untrained_method`):
#: ``grn_transfer`` (GPO-VAE: mask row from the learned GRN, effect sizes from seen perturbations),
#: ``prior_draw`` (rows drawn from the prior: no information), ``no_shift`` (the control's state, SVAE+),
#: ``untrained_weights`` (the conditional VAE: the dosage column meets network weights never trained).
UNTRAINED_METHODS = ("grn_transfer", "prior_draw", "no_shift", "untrained_weights")
#: |logit| of a mask entry fixed by :meth:`AdditiveEffect.fix_masks` (q puts 6e-6 on the other value).
FIXED_MASK_LOGIT = 12.0


@contextmanager
def weighted_plate(name: str, size: int, weights: torch.Tensor | None):
    """A plate over global rows whose log-densities are scaled row-wise by ``weights``.

    Rows with weight 0 are masked out (Pyro forbids non-positive scales). ``weights=None``: unscaled.
    """
    with pyro.plate(name, size, dim=-1):
        if weights is None:
            yield
        else:
            with poutine.mask(mask=weights > 0), poutine.scale(scale=weights.clamp_min(1e-30)):
                yield


def matmul_dosage(d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, T) @ (..., T, K) -> (..., B, K).

    A sparse dosage matrix (at most one entry in 8 non-zero, as the one- or few-hot rows of a screen with
    more than 8 treatments) is applied as a gather of the rows of its non-zero entries and a scatter-add
    over cells: O(nnz K) instead of O(B T K), the same sums (exact for one-hot rows, up to float rounding
    otherwise). Gradients flow to ``rows`` (and to ``d``'s non-zero values) as through the product.
    """
    if d.dim() == 2 and d.shape[-1] > 8:
        i, t = torch.nonzero(d, as_tuple=True)
        if 8 * i.numel() <= d.numel():
            vals = d[i, t].unsqueeze(-1).to(rows.dtype)
            out = rows.new_zeros(rows.shape[:-2] + (d.shape[0], rows.shape[-1]))
            return out.index_add(-2, i, rows[..., t, :] * vals)
    return torch.matmul(d, rows)


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
    sigmoid(|logit_tk|), with c = :func:`per_treatment_costs` (the per-treatment Rao-Blackwellisation of
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
    gradient by beta. Departure from the paper's objective (no schedule there, reference §4.3): while
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


class LearnedMaskBaseline(nn.Module):
    """A learned correction to the decaying-average baseline of the ``score_function`` estimator.

    b_t = c_t + sum_s W_ts w_s for treatment t, where w (T,) is the minibatch's per-row weights of the
    global terms (:meth:`~pyrovae.models.skeleton.PerturbationVAE.global_weights`: which treatments the
    minibatch holds, and how many cells of each), so b predicts how the minibatch's composition moves the
    downstream cost of each treatment's masks. Added to Pyro's decaying average (both are used:
    ``infer["baseline"]`` with ``use_decaying_avg_baseline`` and ``nn_baseline``); c and W start at 0 and
    are fitted by Pyro's baseline loss, the squared error to the (detached) downstream cost, which the
    ELBO's gradient never sees. A baseline that does not depend on the masks keeps the estimator unbiased.
    """

    def __init__(self, n_treatments: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(n_treatments))
        self.weight = nn.Parameter(torch.zeros(n_treatments, n_treatments))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """(..., T, T) the batch weights broadcast to each row -> (..., T) baselines."""
        return (w * self.weight).sum(-1) + self.offset


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


#: optimiser roles of a parameter (:meth:`EffectBlock.param_roles`, :func:`param_groups`)
PARAM_ROLES = ("network", "variational", "mask_logits")


def parameter_roles(
    module: nn.Module, variational: Sequence[nn.Parameter] = (), mask_logits: Sequence[nn.Parameter] = ()
) -> dict[str, list[nn.Parameter]]:
    """{role: parameters} of ``module``: the given variational and mask-logit parameters, every other
    parameter of ``module`` a network weight (roles: :data:`PARAM_ROLES`)."""
    special = {id(q) for q in (*variational, *mask_logits)}
    return {
        "network": [q for q in module.parameters() if id(q) not in special],
        "variational": list(variational),
        "mask_logits": list(mask_logits),
    }


def param_groups(
    module: nn.Module,
    roles: Mapping[str, Sequence[nn.Parameter]],
    cfg,
    model_mask_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Adam parameter groups of ``module.parameters()`` (in their order) by role.

    Weight decay (``cfg.weight_decay``) regularises network weights only; variational parameters and
    point-estimated per-treatment values get none, so the optimum is the ELBO's (the reference decays
    everything; §10.12). Mask logits get their own step size (without decay): ``cfg.mask_lr`` when it is
    set, else the model's ``model_mask_lr`` (``ModelConfig.mask_lr``) when that is set, else they join the
    variational group (the network's step). A parameter absent from ``roles`` is a network weight.

    Args:
        module: the model (or block) whose parameters are grouped.
        roles: {role: parameters}, roles among :data:`PARAM_ROLES` (e.g. :meth:`EffectBlock.param_roles`).
        cfg: the training settings (``weight_decay``, ``mask_lr``; a
            :class:`~pyrovae.infer.train.TrainConfig`).
        model_mask_lr: the model's own step size of its mask logits (used when ``cfg.mask_lr`` is unset).

    Returns:
        ``[{network, weight_decay}, {variational, weight_decay 0}]`` plus ``{mask logits, weight_decay 0,
        lr mask_lr}`` when there are mask logits and a mask step size is set.
    """
    mask_lr = cfg.mask_lr if cfg.mask_lr is not None else model_mask_lr
    role_of = {id(q): role for role in ("variational", "mask_logits") for q in roles.get(role, ())}
    decay, no_decay, masks = [], [], []
    for q in module.parameters():
        role = role_of.get(id(q), "network")
        if role == "mask_logits" and mask_lr is not None:
            masks.append(q)
        else:
            (decay if role == "network" else no_decay).append(q)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if masks:
        groups.append({"params": masks, "weight_decay": 0.0, "lr": mask_lr})
    return groups


class EffectBlock(nn.Module):
    """Base class; the defaults describe a block without global sites."""

    #: rotate the latent basis when the mask freeze ends (:class:`AdditiveEffect` ``mask_rotation``)
    mask_rotation: bool = False
    #: the model's own Adam step size of its mask logits (``ModelConfig.mask_lr``; :func:`param_groups`)
    mask_lr: float | None = None

    shift_dim: int = 0
    has_globals: bool = True

    def model_globals(self, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}

    def guide_globals(self, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}

    def prior_loc(self, d: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def shift(self, d: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def decoder_in_dim(self, n_latent: int) -> int:
        return n_latent

    def decoder_input(self, z: torch.Tensor, d: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor:
        return z

    def untrained_fallback(
        self, g: dict[str, torch.Tensor], untrained: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Global draws for treatments without a training cell, after their rows were redrawn from the
        prior (``untrained`` (T,) bool). Blocks whose per-treatment values are parameters without a prior
        (SVAE+'s action mean) replace them here; the default keeps the prior draws."""
        return g

    def untrained_method(self, transfer: bool = True) -> str:
        """How a treatment with no training cell is predicted (one of :data:`UNTRAINED_METHODS`).

        ``"prior_draw"`` (the default): its rows are drawn from the prior, a random effect that carries no
        information about it. ``transfer=False`` asks for the method without :meth:`predict_untrained`'s
        transfer (what :meth:`~pyrovae.models.skeleton.PerturbationVAE.sample_globals` alone gives).
        """
        return "prior_draw"

    def predict_untrained(
        self,
        g: dict[str, torch.Tensor],
        untrained: torch.Tensor,
        seen: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Global draws for *predicting* treatments with no training cell (unseen perturbations).

        Args:
            g: draws of :meth:`~pyrovae.models.skeleton.PerturbationVAE.sample_globals` with
                ``untrained`` (untrained rows already drawn from the prior, then
                :meth:`untrained_fallback`), shapes (n, T, ...).
            untrained: (T,) bool, the rows to predict.
            seen: (T,) bool, rows trained on data that a transfer may learn from (default ``~untrained``).

        Returns:
            the draws with the untrained rows predicted as :meth:`untrained_method` says. The default keeps
            ``g`` (prior draws); GPO-VAE's block transfers effects through its GRN (:func:`grn_transfer`).
        """
        return g

    def effect_rows(self, g: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(..., T, shift_dim) per-treatment latent effect (for interpretation), if the block has one."""
        return None

    def check_dosage(self, d: torch.Tensor) -> None:
        """Raise a clear error if this block cannot handle the dosage matrix."""

    def check_treatments_per_cell(self, counts: np.ndarray | torch.Tensor) -> None:
        """Raise a clear error if this block cannot handle cells with ``counts`` (N,) treatments each (the
        data-wide form of :meth:`check_dosage`, computed without densifying a sparse dosage)."""

    def mask_probs(self) -> torch.Tensor | None:
        """(T, dim) q(m = 1) of the block's mask entries, detached; ``None`` for a block without masks."""
        return None

    def mask_logits(self) -> torch.Tensor | None:
        """(T, dim) logits of q(m = 1), detached, for a block whose q(M) is Bernoulli with free logits
        (SAMS-VAE, GPO-VAE: there the (T, T) GRN W); ``None`` otherwise."""
        return None

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """The block's parameters by optimiser role (:data:`PARAM_ROLES`, :func:`param_groups`): network
        weights, variational parameters (and point-estimated per-treatment values), mask logits. The
        default: every parameter is a network weight."""
        return parameter_roles(self)

    def param_groups(self, cfg) -> list[dict[str, Any]]:
        """Adam parameter groups of this block's parameters under ``cfg`` (:func:`param_groups`)."""
        return param_groups(self, self.param_roles(), cfg, self.mask_lr)

    def start_training(self, total_steps: int) -> None:
        """Called by the :class:`~pyrovae.infer.train.Trainer` before its first step (and again on a resume)
        with the run's planned number of training steps (``max_epochs`` x batches per epoch, at most
        ``max_steps``): a block resolves step schedules given as fractions of the run here. Default: none."""

    def training_hooks(self) -> list[Any]:
        """Objects whose ``after_step(trainer)`` the :class:`~pyrovae.infer.train.Trainer` calls after each
        optimiser step (schedules that change the model between steps, e.g. the sparse rotation). Default:
        none."""
        return []


class AdditiveEffect(EffectBlock):
    """z = z_basal (+) D (E * M): SAMS-VAE (masks), CPA-VAE (no masks), GPO-VAE (square, concatenated).

    Args:
        n_treatments: T.
        effect_dim: dimension of each treatment's effect row (K for SAMS/CPA; T for GPO).
        mask_prior: Bernoulli prior probability of a mask entry; ``None``: no masks (CPA-VAE).
        embedding_prior_scale: prior std of E.
        guide: ``"mean_field"``: q(M) q(E) factorised with free parameters; ``"correlated"``:
            q(M) q(E | M) with an MLP on [m_t, onehot(t)] (the reference, §3.3); ``"correlated_free"``:
            q(M) q(E | M) = Normal(a_t + loc([m_t, onehot(t)]), exp(b_t) * scale([m_t, onehot(t)])) with
            free per-treatment parameters a, b (T, K) (variational, initialised at 0, so the guide starts as
            ``"correlated"``) on top of the same MLP. A departure from the reference's guide family (the
            objective is the paper's): each treatment's effect gets its own free mean, as in CPA-VAE's
            mean-field q(E), while the network keeps the dependence on the masks. ``"correlated_free_scale"``:
            Normal(a_t + loc([m_t, onehot(t)]), exp(b_t) + 1e-4): the same free mean offset and CPA-VAE's free
            per-entry scale (starting at 1) instead of the network's (a departure; a diagnostic of where the
            dense-mask IWELBO gap to CPA-VAE comes from, README "Mask inference"). ``"spike_slab"``:
            q(E | M) factorised over entries, q(e_tk | m_tk = 1) = Normal(a_tk, exp(b_tk) + 1e-4) with free
            parameters (the slab, as CPA-VAE's q(E)) and q(e_tk | m_tk = 0) = p(e_tk), the prior (the spike:
            an entry that is off costs no KL; :class:`~pyrovae.models.distributions.SpikeSlabNormal`,
            Titsias & Lazaro-Gredilla 2011). No network. A departure from the reference's guide family (the
            objective is the paper's): the reference's q(E | M) network must learn both states of every
            entry, and its off-state draws reach the straight-through mask gradient as noise.
        compose: ``"add"``: decoder sees z_basal + z_p (needs effect_dim == n_latent);
            ``"concat"``: decoder sees [z_basal, z_p] (GPO-VAE).
        temperature: relaxation temperature of the straight-through / relaxed mask estimators.
        mask_init_logits: initial q(M) logits (0: probability 0.5, as the reference).
        mask_estimator: gradient estimator of the q(M) logits (see "Mask estimators" below).
        mask_baseline_beta: decay of the ``score_function`` estimator's moving-average baseline.
        temperature_final: anneal the temperature geometrically from ``temperature`` to this over
            ``temperature_anneal_steps`` training steps (``None``: fixed, the reference).
        mask_kl_warmup_steps: scale the gradient of the mask KL term by beta = min(1, (s + 1) / n) at
            training step s (:func:`mask_kl_warmup_surrogate`; ``straight_through`` and ``relaxed``
            only). 0: none (the reference). Departure from the paper's objective while beta < 1.
        mask_baseline: baseline of the ``score_function`` estimator (:data:`MASK_BASELINES`):
            ``"decaying_avg"`` (Pyro's) or ``"learned"`` (Pyro's plus :class:`LearnedMaskBaseline`).
        mask_freeze_fraction: the same freeze for this fraction of the run's training steps, resolved to
            ``mask_freeze_steps`` = max(1, floor(fraction x steps)) by :meth:`start_training` (the Trainer
            calls it with ``max_epochs`` x batches per epoch, at most ``max_steps``; a resumed run keeps
            the value its first start resolved). 0: none.
        mask_lr: the block's own Adam step size of its q(M) logits (``None``: the network's; a
            training setting ``TrainConfig.mask_lr`` overrides it; :func:`param_groups`).
        mask_freeze_steps: the q(M) logits take no gradient during the first n training steps (they stay
            at ``mask_init_logits`` while q(E | M), the encoder and the decoder learn), then every estimator
            trains them as usual. 0: none (the reference). An optimisation schedule, not a change of the
            objective: the ELBO and its gradient in every other parameter are unchanged. Meant for masks
            started on: the effects are learned before the masks can be pruned on the gradients of
            still-untrained effect draws (measured, README "Spike and slab": it softens the spike-and-slab
            guide's pruning under straight-through but does not stop it).
        mask_rotation: once, when the freeze ends, the :class:`~pyrovae.infer.train.Trainer` rotates the
            latent basis to the one in which :meth:`mean_effects` are sparsest
            (:func:`~pyrovae.models.rotation.sparsest_rotation`,
            :func:`~pyrovae.models.rotation.rotate_latent`): with the masks still on, the likelihood and
            priors cannot tell the bases apart, so this is a reparametrisation of the current iterate
            (exact in the means), and the masks are then pruned in a basis where most entries are small.
            A schedule, not a change of the objective; needs ``mask_freeze_steps > 0`` (README "Sparse
            rotation": measured in three regimes).

    Mask estimators (every one samples exact Bernoulli(sigmoid(logits)) masks at prediction time and
    scores masks with the Bernoulli log-density, so the ELBO's value is the same in all):

    - ``"straight_through"`` (reference parity, §3.1): hard masks, gradient through the relaxed sample
      (biased).
    - ``"score_function"``: q(M) a plain ``Bernoulli`` site, so Pyro's ``TraceGraph_ELBO`` adds the
      score-function term with its own variance reduction (provenance-based downstream costs) and a
      decaying-average baseline per (particle, treatment) (``infer={"baseline": ...}``). Unbiased.
    - ``"loo"``: REINFORCE with two variance reductions, unbiased: (i) per-treatment Rao-Blackwellisation:
      the score of m_t is weighted only by the terms that depend on m_t, i.e. the cells that received t
      and row t's global terms (cell i's terms depend on M only through d_i (E * M)); (ii) the
      leave-one-out baseline over the P vectorised particles (the mean of the other particles' cost of
      treatment t). Needs ``n_particles >= 2``.
    - ``"disarm"``: DisARM (Dong et al. 2020) on antithetic pairs of particles, with the same
      per-treatment Rao-Blackwellisation; unbiased. Needs ``n_particles >= 2`` (an odd last particle
      does not enter the mask gradient).
    - ``"relaxed"``: the masks the likelihood sees are binary-Concrete samples (Maddison et al. 2017)
      at the (optionally annealed) temperature, so the likelihood gradient is pathwise (biased; exact as
      the temperature goes to 0). The mask term is scored as the hard draw 1[s > 0.5] under the Bernoulli
      q and prior, and its gradient is the exact analytic KL(q(M) || p(M)) gradient. Departure from the
      paper's objective during training only: the likelihood term is that of relaxed masks.
    """

    def __init__(
        self,
        n_treatments: int,
        effect_dim: int,
        mask_prior: float | None = 0.01,
        embedding_prior_scale: float = 1.0,
        guide: str = "correlated",
        compose: str = "add",
        temperature: float = 1.0,
        mask_init_logits: float = 0.0,
        embedding_encoder_hidden: int = 200,
        embedding_encoder_layers: int = 2,
        mask_estimator: str = "straight_through",
        mask_baseline_beta: float = 0.9,
        temperature_final: float | None = None,
        temperature_anneal_steps: int = 1000,
        mask_kl_warmup_steps: int = 0,
        mask_baseline: str = "decaying_avg",
        mask_freeze_steps: int = 0,
        mask_rotation: bool = False,
        mask_freeze_fraction: float = 0.0,
        mask_lr: float | None = None,
    ) -> None:
        super().__init__()
        if mask_estimator not in MASK_ESTIMATORS:
            raise ValueError(f"unknown mask_estimator {mask_estimator!r}; use one of {MASK_ESTIMATORS}")
        if mask_baseline not in MASK_BASELINES:
            raise ValueError(f"unknown mask_baseline {mask_baseline!r}; use one of {MASK_BASELINES}")
        if mask_kl_warmup_steps < 0:
            raise ValueError(f"mask_kl_warmup_steps must be >= 0, got {mask_kl_warmup_steps}")
        if mask_kl_warmup_steps and mask_estimator not in ("straight_through", "relaxed"):
            raise ValueError(
                "mask_kl_warmup_steps works with mask_estimator 'straight_through' or 'relaxed' (the score-"
                f"function estimators weight the mask KL inside their costs), not {mask_estimator!r}"
            )
        if mask_freeze_steps < 0:
            raise ValueError(f"mask_freeze_steps must be >= 0, got {mask_freeze_steps}")
        if not 0.0 <= mask_freeze_fraction < 1.0:
            raise ValueError(f"mask_freeze_fraction must be in [0, 1), got {mask_freeze_fraction}")
        if mask_freeze_steps and mask_freeze_fraction:
            raise ValueError("give mask_freeze_steps or mask_freeze_fraction, not both")
        if mask_lr is not None and mask_lr <= 0:
            raise ValueError(f"mask_lr must be > 0, got {mask_lr}")
        self.mask_kl_warmup_steps, self.mask_baseline = int(mask_kl_warmup_steps), mask_baseline
        self.mask_freeze_steps = int(mask_freeze_steps)
        self.mask_freeze_fraction = float(mask_freeze_fraction)
        self.mask_lr = None if mask_lr is None else float(mask_lr)
        freezes = bool(mask_freeze_steps or mask_freeze_fraction)
        if mask_rotation and (not freezes or compose != "add" or mask_prior is None):
            raise ValueError(
                "mask_rotation needs a mask freeze (mask_freeze_steps or mask_freeze_fraction > 0) and masks "
                "on an additive latent effect"
            )
        self.mask_rotation = bool(mask_rotation)
        if not 0.0 <= mask_baseline_beta < 1.0:
            raise ValueError(f"mask_baseline_beta must be in [0, 1), got {mask_baseline_beta}")
        if temperature <= 0 or (temperature_final is not None and temperature_final <= 0):
            raise ValueError("mask temperatures must be > 0")
        if temperature_anneal_steps < 1:
            raise ValueError(f"temperature_anneal_steps must be >= 1, got {temperature_anneal_steps}")
        self.mask_estimator, self.mask_baseline_beta = mask_estimator, float(mask_baseline_beta)
        self.temperature_final, self.temperature_anneal_steps = (
            temperature_final,
            int(temperature_anneal_steps),
        )
        self._fresh_baseline = True
        if temperature_final is not None or self.mask_kl_warmup_steps or freezes:
            # training steps taken (a buffer, so a resumed run continues the schedule)
            self.register_buffer("mask_step", torch.zeros((), dtype=torch.long))
        if self.mask_freeze_fraction:
            # the freeze's length in steps once resolved (0: not yet; a buffer, so a resumed run keeps it
            # even when it is resumed with more epochs)
            self.register_buffer("mask_freeze_resolved", torch.zeros((), dtype=torch.long))
        if guide not in GUIDES:
            raise ValueError(f"unknown guide {guide!r}; use one of {GUIDES}")
        if compose not in ("add", "concat"):
            raise ValueError(f"unknown compose {compose!r}; use 'add' or 'concat'")
        if mask_prior is not None and not 0.0 < mask_prior < 1.0:
            raise ValueError(f"mask_prior must be in (0, 1), got {mask_prior}")
        self.n_treatments, self.shift_dim = n_treatments, effect_dim
        self.use_masks = mask_prior is not None
        self.guide_kind, self.compose = guide, compose
        self.register_buffer("mask_prior", torch.tensor(mask_prior if self.use_masks else 0.5))
        self.register_buffer("embedding_prior_scale", torch.tensor(float(embedding_prior_scale)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("eye", torch.eye(n_treatments))
        if self.use_masks:
            self.q_mask_logits = nn.Parameter(torch.full((n_treatments, effect_dim), float(mask_init_logits)))
            if mask_estimator == "score_function" and mask_baseline == "learned":
                self.q_mask_baseline = LearnedMaskBaseline(n_treatments)
        if guide != "correlated" or not self.use_masks:
            # mean-field: q(E)'s parameters; correlated_free*: the free offsets a, b of q(E | M)
            self.q_E_loc = nn.Parameter(torch.zeros(n_treatments, effect_dim))
            self.q_E_log_scale = nn.Parameter(torch.zeros(n_treatments, effect_dim))
        if guide not in ("mean_field", "spike_slab") and self.use_masks:
            self.q_E_net = GaussianMLP(
                effect_dim + n_treatments, effect_dim, embedding_encoder_hidden, embedding_encoder_layers
            )

    def model_globals(self, weights):
        T, K = self.n_treatments, self.shift_dim
        out = {}
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            if self.use_masks:
                out["mask"] = pyro.sample("mask", self._prior_mask(self.mask_prior.expand(T, K)))
            out["E"] = self._sample_p_E()
        return out

    def _sample_p_E(self) -> torch.Tensor:
        T, K = self.n_treatments, self.shift_dim
        loc = torch.zeros_like(self.eye[:, :1]).expand(T, K)
        return pyro.sample("E", dist.Normal(loc, self.embedding_prior_scale).to_event(1))

    def guide_globals(self, weights):
        T = self.n_treatments
        out = {}
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            if self.use_masks:
                out["mask"] = self._sample_q_mask(self.q_mask_logits, weights)
            out["E"] = self._sample_q_E(out.get("mask"))
        return out

    def _q_E_normal(self, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(E | M = m) (..., T, K): the free parameters (mean-field, CPA-VAE, and the
        spike-and-slab guide's slab) or q(E | M)'s network on [m_t, onehot(t)] (with the free offsets)."""
        if m is None or self.guide_kind in ("mean_field", "spike_slab"):
            return self.q_E_loc, self.q_E_log_scale.exp() + 1e-4
        # the MLP on [m_t, onehot(t)]: the one-hot block of its first layer is a row lookup
        loc, scale = self.q_E_net.forward_parts([m, self.n_treatments])
        if self.guide_kind == "correlated_free":
            return loc + self.q_E_loc, scale * self.q_E_log_scale.exp()
        if self.guide_kind == "correlated_free_scale":
            return loc + self.q_E_loc, (self.q_E_log_scale.exp() + 1e-4).expand_as(loc)
        return loc, scale

    def _sample_q_E(self, m: torch.Tensor | None) -> torch.Tensor:
        """q(E) (mean-field) or q(E | M) (correlated) inside the perturbations plate; (..., T, K)."""
        loc, scale = self._q_E_normal(m)
        if m is not None and self.guide_kind == "spike_slab":
            fn = SpikeSlabNormal(m, loc, scale, self.embedding_prior_scale)
            return pyro.sample("E", fn.to_event(1))
        return pyro.sample("E", dist.Normal(loc, scale).to_event(1))

    def start_training(self, total_steps: int) -> None:
        """Resolve ``mask_freeze_fraction`` to ``mask_freeze_steps`` for a run of ``total_steps`` steps, once:
        a resumed run keeps the freeze it started with (the checkpoint holds it)."""
        if self.mask_freeze_fraction:
            if int(self.mask_freeze_resolved) == 0:
                self.mask_freeze_resolved.fill_(max(1, int(self.mask_freeze_fraction * int(total_steps))))
            self.mask_freeze_steps = int(self.mask_freeze_resolved)

    def training_hooks(self) -> list[Any]:
        return [SparseRotationStep(self)] if self.mask_rotation else []

    # ------------------------------------------------------------------------------- mask estimators
    def current_temperature(self) -> torch.Tensor:
        """The relaxation temperature at the current training step (see ``temperature_final``)."""
        if self.temperature_final is None:
            return self.temperature
        frac = min(1.0, float(self.mask_step) / self.temperature_anneal_steps)
        return self.temperature * (self.temperature_final / self.temperature) ** frac

    def _prior_mask(self, probs: torch.Tensor) -> dist.Distribution:
        """p(m) with batch shape (T,) and event (K,); a relaxed mask is scored by its hard value."""
        fn = HardenedBernoulli if self.mask_estimator == "relaxed" else dist.Bernoulli
        return fn(probs=probs).to_event(1)

    def mask_kl_weight(self) -> float:
        """beta of the mask-KL warm-up at the current training step (1 without warm-up)."""
        if not self.mask_kl_warmup_steps:
            return 1.0
        return min(1.0, (float(self.mask_step) + 1.0) / self.mask_kl_warmup_steps)

    def masks_frozen(self) -> bool:
        """True while training within the first ``mask_freeze_steps`` steps (the q(M) logits take no
        gradient)."""
        if not self.mask_freeze_steps:
            return False  # (no read of the step buffer: no host sync per step on an accelerator)
        return self.training and torch.is_grad_enabled() and int(self.mask_step) < self.mask_freeze_steps

    def _learned_baseline_input(self, weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """(plates..., T, T): the minibatch's row weights (T,) broadcast to the mask site's plate shape (the
        vectorised particles included) and to each row, the input of :class:`LearnedMaskBaseline`."""
        T = self.n_treatments
        w = like.new_ones(T) if weights is None else weights.detach().to(like.dtype)
        frames = [f for f in get_plates() if f.vectorized and f.dim is not None]
        shape = [1] * max([-f.dim for f in frames] + [1])
        for f in frames:
            shape[f.dim] = f.size
        return w.expand(*shape, T)

    def _sample_q_mask(self, logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The q(M) site (inside the perturbations plate) for this block's estimator; (..., T, K)."""
        training = self.training and torch.is_grad_enabled()
        tau, beta = self.current_temperature(), self.mask_kl_weight()
        if self.masks_frozen():
            logits = logits.detach()  # no gradient reaches the q(M) logits (mask_freeze_steps)
        if training and hasattr(self, "mask_step"):
            self.mask_step += 1
        est, infer = self.mask_estimator, {}
        if est == "straight_through":
            fn = StraightThroughBernoulli(tau, logits=logits)
            if beta < 1.0:
                infer = {SURROGATE_ELBO: partial(mask_kl_warmup_surrogate, beta, False)}
        elif est == "score_function":
            fn = dist.Bernoulli(logits=logits)
            baseline = {"use_decaying_avg_baseline": True, "baseline_beta": self.mask_baseline_beta}
            if self.mask_baseline == "learned":
                baseline["nn_baseline"] = self.q_mask_baseline
                baseline["nn_baseline_input"] = self._learned_baseline_input(weights, logits)
            infer = {"baseline": baseline}
            if training and self._fresh_baseline:
                # Pyro keeps the moving average in the global param store under the site's name: start
                # each model's training from zero (reproducible, and no stale shape from another model)
                store = pyro.get_param_store()
                if BASELINE_PARAM in store:
                    del store[BASELINE_PARAM]
                self._fresh_baseline = False
        elif est == "loo":
            fn = DetachedBernoulli(logits=logits)
            infer = {SURROGATE_ELBO: leave_one_out_surrogate}
        elif est == "disarm":
            fn = AntitheticBernoulli(logits=logits)
            infer = {SURROGATE_ELBO: disarm_surrogate}
        else:
            fn = RelaxedBernoulliMask(tau, logits=logits)
            infer = {SURROGATE_ELBO: analytic_mask_kl_surrogate}
            if beta < 1.0:
                warm = partial(mask_kl_warmup_surrogate, beta, True)
                infer = {SURROGATE_ELBO: partial(sum_of_surrogates, (analytic_mask_kl_surrogate, warm))}
        return pyro.sample("mask", fn.to_event(1), infer=infer)

    def effect_rows(self, g):
        return g["E"] * g["mask"] if self.use_masks else g["E"]

    def mask_probs(self) -> torch.Tensor | None:
        return torch.sigmoid(self.q_mask_logits.detach()) if self.use_masks else None

    def mask_logits(self) -> torch.Tensor | None:
        return self.q_mask_logits.detach() if self.use_masks else None

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        # q(E)'s free mean-field parameters are variational; q(E | M)'s network is a network; masks fixed by
        # fix_masks are a buffer, seen by no optimiser
        free_e = self.guide_kind != "correlated" or not self.use_masks
        # the learned score-function baseline is part of the estimator, not of the model: no weight decay
        baseline = list(self.q_mask_baseline.parameters()) if hasattr(self, "q_mask_baseline") else []
        return parameter_roles(
            self,
            variational=([self.q_E_loc, self.q_E_log_scale] if free_e else []) + baseline,
            mask_logits=self.mask_role_parameters(),
        )

    @torch.no_grad()
    def mean_effects(self) -> torch.Tensor:
        """(T, K) the mean of q(E | M) with every mask on (of q(E) for CPA-VAE and the mean-field guide):
        the effect rows :func:`~pyrovae.models.rotation.sparsest_rotation` reads."""
        on = self.q_mask_logits.new_ones(self.n_treatments, self.shift_dim) if self.use_masks else None
        return self._q_E_normal(on)[0].detach().clone()

    @torch.no_grad()
    def rotate(self, R: torch.Tensor) -> list[nn.Parameter]:
        """Express q(E) in the latent basis z' = z @ R (called by
        :func:`~pyrovae.models.rotation.rotate_latent`); returns the parameters it changed. Means rotate
        exactly: E' = E @ R (the free means, and the loc head of q(E | M)'s network). Scales keep the
        rotated marginal variances (:func:`~pyrovae.models.rotation.rotated_scales`; on the network's
        log-variance head and on the ``correlated_free`` log-scale factors, the weighted mean of the old
        log variances). q(M) and the network's mask input are unchanged (see ``rotate_latent``)."""
        if self.compose != "add":
            raise ValueError("only an additive latent effect can be rotated (not GPO-VAE's GRN)")
        changed: list[nn.Parameter] = []
        if hasattr(self, "q_E_net"):
            changed += rotate_heads(self.q_E_net, R)
        if hasattr(self, "q_E_loc"):
            Rt = R.to(self.q_E_loc)
            self.q_E_loc.copy_(self.q_E_loc @ Rt)
            if self.guide_kind == "correlated_free":  # a factor on the network's scale
                self.q_E_log_scale.copy_(self.q_E_log_scale @ Rt.pow(2))
            else:  # scale = exp(b) + 1e-4
                new = rotated_scales(self.q_E_log_scale.exp() + 1e-4, Rt)
                self.q_E_log_scale.copy_((new - 1e-4).clamp_min(1e-6).log())
            changed += [self.q_E_loc, self.q_E_log_scale]
        return changed

    def mask_role_parameters(self) -> list[nn.Parameter]:
        """The parameters that take the mask logits' optimiser settings (``mask_lr``): the q(M) logits
        unless there are none (CPA-VAE) or :meth:`fix_masks` made them a buffer."""
        logits = self.q_mask_logits if self.use_masks else None
        return [logits] if isinstance(logits, nn.Parameter) else []

    @property
    def is_grn(self) -> bool:
        """True for GPO-VAE's square gene x gene effect space (masks, concatenated, effect_dim == T)."""
        return self.use_masks and self.compose == "concat" and self.shift_dim == self.n_treatments

    def untrained_method(self, transfer: bool = True) -> str:
        return "grn_transfer" if transfer and self.is_grn else "prior_draw"

    def predict_untrained(self, g, untrained, seen=None):
        """GPO-VAE: :func:`grn_transfer` of the untrained rows; other additive blocks keep the prior draws."""
        if not self.is_grn or not bool(untrained.any()):
            return g
        return grn_transfer(g, self.q_mask_logits, untrained, ~untrained if seen is None else seen)

    def fix_masks(self, masks: torch.Tensor) -> None:
        """Fix q(M) at known masks and stop training it (a control, e.g. a simulation's planted masks).

        q(m_tk) becomes Bernoulli(sigmoid(+-FIXED_MASK_LOGIT)), a point mass up to 6e-6, and
        ``q_mask_logits`` turns from a parameter into a buffer of the same name, so no optimiser sees it and
        a checkpoint keeps it (call this again after rebuilding a model to resume training it). The ELBO is
        unchanged: it still scores log p(M) - log q(M) at the fixed masks, so the run's ELBO is that of the
        given mask structure with everything else trained.

        Args:
            masks: (T, effect_dim) 0/1 masks, rows in this model's treatment order.
        """
        if not self.use_masks:
            raise ValueError("this effect block has no masks (CPA-VAE); fix_masks needs SAMS-VAE or GPO-VAE")
        old = self.q_mask_logits
        m = torch.as_tensor(masks)
        if tuple(m.shape) != tuple(old.shape):
            raise ValueError(
                f"masks have shape {tuple(m.shape)} but the model's masks are (T, K) = {tuple(old.shape)}; "
                "give one row per treatment (the model's order) and one column per latent dimension "
                "(n_latent must match the masks' width)"
            )
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("masks must be 0/1")
        logits = torch.where(m.to(old.device) > 0, FIXED_MASK_LOGIT, -FIXED_MASK_LOGIT).to(old.dtype)
        del self.q_mask_logits
        self.register_buffer("q_mask_logits", logits)

    def shift(self, d, g):
        return matmul_dosage(d, self.effect_rows(g))

    def decoder_in_dim(self, n_latent: int) -> int:
        if self.compose == "add":
            if self.shift_dim != n_latent:
                raise ValueError("compose='add' needs effect_dim == n_latent")
            return n_latent
        return n_latent + self.shift_dim

    def decoder_input(self, z, d, g):
        zp = self.shift(d, g)
        if self.compose == "add":
            return z + zp
        return torch.cat([z, zp.expand(z.shape[:-1] + zp.shape[-1:])], dim=-1)


class BetaBernoulliMaskEffect(AdditiveEffect):
    """SAMS-VAE with Beta-Bernoulli masks (reference ``sams_vae_beta_bernoulli``, §2.5): a learned sparsity.

    pi_tk ~ Beta(a, b), m_tk | pi_tk ~ Bernoulli(pi_tk), e_t ~ N(0, s^2 I), z = z_basal + D (E * M).
    Guide (the reference's first two guides): q(pi) = Delta(sigmoid(lambda)) (a MAP estimate of each
    entry's mask probability, ``q_mask_logits`` = lambda), q(m | pi) = Bernoulli(pi) sampled with the
    block's mask estimator, then q(E) or q(E | M) as in SAMS-VAE. So log p(m | pi) - log q(m | pi) = 0
    exactly and the mask's regulariser is the MAP penalty log Beta(pi; a, b) in place of SAMS-VAE's
    Bernoulli KL: the sparsity level each entry is pulled to is learned from the data, not fixed.

    Args:
        beta_a, beta_b: the Beta prior (a = 1, b > 1 favours sparse masks; prior mean a / (a + b)).
        **kw: as :class:`AdditiveEffect` (``mask_prior`` is not used).
    """

    def __init__(self, n_treatments: int, effect_dim: int, beta_a: float = 1.0, beta_b: float = 2.0, **kw):
        if beta_a <= 0 or beta_b <= 0:
            raise ValueError(f"Beta prior concentrations must be > 0, got ({beta_a}, {beta_b})")
        super().__init__(n_treatments, effect_dim, mask_prior=0.5, **kw)
        self.register_buffer("beta_a", torch.tensor(float(beta_a)))
        self.register_buffer("beta_b", torch.tensor(float(beta_b)))

    def model_globals(self, weights):
        T, K = self.n_treatments, self.shift_dim
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            pi = pyro.sample(
                "mask_prob", dist.Beta(self.beta_a.expand(T, K), self.beta_b.expand(T, K)).to_event(1)
            )
            m = pyro.sample("mask", self._prior_mask(pi))
            return {"mask_prob": pi, "mask": m, "E": self._sample_p_E()}

    def guide_globals(self, weights):
        with weighted_plate(PERTURBATION_PLATE, self.n_treatments, weights):
            lam = self.q_mask_logits.detach() if self.masks_frozen() else self.q_mask_logits
            pi = torch.sigmoid(lam).clamp(1e-6, 1 - 1e-6)
            pi = pyro.sample("mask_prob", dist.Delta(pi, event_dim=1))
            m = self._sample_q_mask(torch.logit(pi), weights)
            return {"mask_prob": pi, "mask": m, "E": self._sample_q_E(m)}


class LearnedSparsityMaskEffect(AdditiveEffect):
    """SAMS-VAE whose mask prior level is learned per treatment (the issue's "sparsity prior whose strength
    is learned per treatment"; a departure from the paper's fixed Bernoulli(alpha) prior).

    alpha_t ~ Beta(c1, c2), m_tk | alpha_t ~ Bernoulli(alpha_t), e_t ~ N(0, s^2 I), z = z_basal + D (E * M).
    Guide: q(alpha_t) = Delta(sigmoid(lambda_t)) (a MAP estimate, ``q_sparsity_logits`` = lambda, started at
    logit(``mask_prior``) so training starts from the paper's prior), then q(M) and q(E | M) as in
    SAMS-VAE with the block's estimator and guide. The ELBO's mask term is
    sum_k log Bernoulli(m_tk; alpha_t) - log q(m_tk) plus the MAP penalty log Beta(alpha_t; c1, c2): for
    fixed q(M) the best alpha_t is about the mean of q(m_t.), so each treatment's sparsity level follows
    how many of its entries the data switch on, where the paper's alpha is the same fixed 0.01 for every
    treatment and every dataset. The level's logits train with the mask logits (``mask_lr``).

    Args:
        sparsity_a, sparsity_b: the Beta(c1, c2) hyperprior of alpha_t.
        **kw: as :class:`AdditiveEffect` (``mask_prior``: the initial level).
    """

    def __init__(
        self, n_treatments: int, effect_dim: int, sparsity_a: float = 1.0, sparsity_b: float = 2.0, **kw
    ):
        if sparsity_a <= 0 or sparsity_b <= 0:
            raise ValueError(f"Beta hyperprior concentrations must be > 0, got ({sparsity_a}, {sparsity_b})")
        super().__init__(n_treatments, effect_dim, **kw)
        self.register_buffer("sparsity_a", torch.tensor(float(sparsity_a)))
        self.register_buffer("sparsity_b", torch.tensor(float(sparsity_b)))
        init = torch.logit(self.mask_prior).item()
        self.q_sparsity_logits = nn.Parameter(torch.full((n_treatments,), init))

    def model_globals(self, weights):
        T, K = self.n_treatments, self.shift_dim
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            hyper = dist.Beta(self.sparsity_a.expand(T), self.sparsity_b.expand(T))
            alpha = pyro.sample("mask_sparsity", hyper)
            m = pyro.sample("mask", self._prior_mask(alpha.unsqueeze(-1).expand(alpha.shape + (K,))))
            return {"mask_sparsity": alpha, "mask": m, "E": self._sample_p_E()}

    def guide_globals(self, weights):
        with weighted_plate(PERTURBATION_PLATE, self.n_treatments, weights):
            lam = self.q_sparsity_logits.detach() if self.masks_frozen() else self.q_sparsity_logits
            alpha = pyro.sample("mask_sparsity", dist.Delta(torch.sigmoid(lam).clamp(1e-6, 1 - 1e-6)))
            m = self._sample_q_mask(self.q_mask_logits, weights)
            return {"mask_sparsity": alpha, "mask": m, "E": self._sample_q_E(m)}

    def sparsity(self) -> torch.Tensor:
        """(T,) the learned per-treatment mask prior levels alpha_t."""
        return torch.sigmoid(self.q_sparsity_logits.detach())

    def mask_role_parameters(self) -> list[nn.Parameter]:
        return [*super().mask_role_parameters(), self.q_sparsity_logits]


class BetaBernoulliActionEffect(EffectBlock):
    """SVAE+ (the SAMS-VAE authors' re-implementation after Lopez et al.; not the original sVAE).

    pi_tk ~ Beta(c1, c2), m_tk ~ Bernoulli(pi_tk), a learned action mean mu_t (a parameter, not a random
    variable); the cell latent z ~ N(d (M * mu), I) for one-hot d; the decoder sees z alone. Guide:
    q(pi) = Delta(sigmoid(lambda)) (a MAP estimate) and q(m | pi) = straight-through Bernoulli(pi), so the
    mask KL vanishes exactly and the pi term is the MAP penalty log Beta(pi; c1, c2).
    """

    shift_dim = 0

    def __init__(
        self,
        n_treatments: int,
        n_latent: int,
        beta_c1: float = 1.0,
        beta_c2: float = 2.0,
        temperature: float = 1.0,
        mask_init_logits: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_treatments, self.n_latent = n_treatments, n_latent
        self.register_buffer("c1", torch.tensor(float(beta_c1)))
        self.register_buffer("c2", torch.tensor(float(beta_c2)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.action_mean = nn.Parameter(0.1 * torch.randn(n_treatments, n_latent))
        self.q_mask_prob_logits = nn.Parameter(torch.full((n_treatments, n_latent), float(mask_init_logits)))

    def model_globals(self, weights):
        T, K = self.n_treatments, self.n_latent
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            pi = pyro.sample("mask_prob", dist.Beta(self.c1.expand(T, K), self.c2.expand(T, K)).to_event(1))
            m = pyro.sample("mask", dist.Bernoulli(probs=pi).to_event(1))
        return {"mask_prob": pi, "mask": m}

    def guide_globals(self, weights):
        T = self.n_treatments
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            pi = torch.sigmoid(self.q_mask_prob_logits).clamp(1e-6, 1 - 1e-6)
            pi = pyro.sample("mask_prob", dist.Delta(pi, event_dim=1))
            m = pyro.sample("mask", StraightThroughBernoulli(self.temperature, probs=pi).to_event(1))
        return {"mask_prob": pi, "mask": m}

    def check_dosage(self, d: torch.Tensor) -> None:
        self.check_treatments_per_cell((d != 0).sum(-1))

    def check_treatments_per_cell(self, counts: np.ndarray | torch.Tensor) -> None:
        if len(counts) and int(counts.max()) > 1:
            raise ValueError(
                "SVAE+ needs one-hot treatments (one perturbation per cell) but the data has combinations; "
                "load the data with encode_combos_as_unique=True (CLI: --encode-combos-as-unique)"
            )

    def effect_rows(self, g):
        return g["mask"] * self.action_mean

    def untrained_method(self, transfer: bool = True) -> str:
        return "no_shift"

    def mask_probs(self) -> torch.Tensor | None:
        return torch.sigmoid(self.q_mask_prob_logits.detach()).clamp(1e-6, 1 - 1e-6)  # as the guide's

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        # the action mean is a point estimate (no prior, no decay); the MAP mask-probability logits are
        # variational and keep the network's step (not TrainConfig.mask_lr)
        return parameter_roles(self, variational=[self.action_mean, self.q_mask_prob_logits])

    def untrained_fallback(self, g, untrained):
        # mu_t is a parameter with no prior, so an untrained treatment has no prior to fall back to and mu_t
        # would stay at its random initialisation; its masks are set to 0 instead, so the treatment gets
        # the control's prior N(0, I) (no shift).
        return {**g, "mask": torch.where(untrained.unsqueeze(-1), torch.zeros_like(g["mask"]), g["mask"])}

    def prior_loc(self, d, g):
        return matmul_dosage(d, self.effect_rows(g))


class ConcatDosageEffect(EffectBlock):
    """Conditional VAE: no global latents; the decoder sees [z, d] (and the encoder [x, d])."""

    has_globals = False

    def __init__(self, n_treatments: int) -> None:
        super().__init__()
        self.n_treatments = n_treatments

    def untrained_method(self, transfer: bool = True) -> str:
        # no global rows: an untrained dosage column reaches encoder and decoder weights that never saw it
        return "untrained_weights"

    def decoder_in_dim(self, n_latent: int) -> int:
        return n_latent + self.n_treatments

    def decoder_input(self, z, d, g):
        return torch.cat([z, d.expand(z.shape[:-1] + d.shape[-1:])], dim=-1)


@torch.no_grad()
def grn_transfer(
    g: dict[str, torch.Tensor],
    mask_logits: torch.Tensor,
    unseen: torch.Tensor,
    seen: torch.Tensor,
    self_effect: bool = True,
) -> dict[str, torch.Tensor]:
    """GPO-VAE's prediction of unseen perturbations from its GRN (W = ``mask_logits``, (T, T)).

    For an unseen perturbation of gene j (no training cell, so its E_j row got no ELBO signal):

    - mask row M_j ~ q(M_j) = Bernoulli(sigmoid(W_j)) (redrawn here): gene j's outgoing GRN edges, trained
      only through the K-hop terms of the GRN loss (paths t -> j -> k of seen perturbations t) and the
      sparsity penalty; with ``self_effect`` M_jj = 1 (a CRISPR perturbation acts on its own target gene);
    - effect row E_j, coordinate k: the mean of E_tk over the seen perturbations t whose (same-draw) masks
      reach both j and k (M_tj = M_tk = 1): how gene k's coordinate moves when a seen perturbation moves j
      and k together; where no seen perturbation reaches j and k, the mean of E_tk over seen t with
      M_tk = 1; where none acts on k, 0.

    Seen rows and rows in neither set are returned unchanged. Departure: the reference has no prediction
    for unseen perturbations (its ``mask_test`` predicts them as controls, gpo_vae_cradle_vae.md §10.13).

    Args:
        g: global draws with ``mask`` and ``E`` of shape (n, T, T).
        unseen, seen: (T,) bool row sets (``seen`` minus ``unseen`` is used).

    Returns:
        a new dict with the ``mask`` and ``E`` rows of ``unseen`` replaced.
    """
    unseen = unseen.to(mask_logits.device).bool()
    seen = seen.to(mask_logits.device).bool() & ~unseen
    if not bool(unseen.any()):
        return g
    mask, E = g["mask"].clone(), g["E"].clone()
    u_idx, s_idx = torch.nonzero(unseen).reshape(-1), torch.nonzero(seen).reshape(-1)
    prob = torch.sigmoid(torch.nan_to_num(mask_logits[u_idx], nan=0.0))
    m_u = torch.bernoulli(prob.expand(mask.shape[0], *prob.shape))  # (n, U, T)
    if self_effect:
        m_u[:, torch.arange(len(u_idx)), u_idx] = 1.0
    ms, es = mask[:, s_idx], E[:, s_idx]  # (n, S, T)
    me = ms * es
    cnt_k = ms.sum(1, keepdim=True)  # (n, 1, T): seen rows acting on k
    fallback = torch.where(cnt_k > 0, me.sum(1, keepdim=True) / cnt_k.clamp_min(1.0), torch.zeros_like(cnt_k))
    reach = ms[:, :, u_idx].transpose(1, 2)  # (n, U, S): seen rows reaching j
    num, den = reach @ me, reach @ ms  # (n, U, T)
    E[:, u_idx] = torch.where(den > 0, num / den.clamp_min(1.0), fallback.expand_as(num))
    mask[:, u_idx] = m_u
    return {**g, "mask": mask, "E": E}
