"""Perturbation-effect blocks: the only part that differs between model families.

A block owns the global (perturbation-plated) latent sites, their variational families, and how a cell's
dosage row d turns them into a latent shift. The skeleton (:mod:`pyrovae.models.skeleton`) calls:

- ``model_globals(weights)`` / ``guide_globals(weights)``: sample the global sites in the
  ``perturbations`` plate (size T), each row scaled by ``weights`` (T,)
  (:func:`pyrovae.models.plates.weighted_plate`);
  return a dict of samples, shapes (..., T, K) (a leading particle dim when particles are vectorised).
- ``prior_loc(d, g)``: prior mean of the cell latent (SVAE+), else ``None`` (standard normal).
- ``shift(d, g)``: the latent offset z_p, (..., B, shift_dim).
- ``decoder_input(z, d, g)``: what the decoder sees, (..., B, decoder_in_dim).

Modules: :mod:`~pyrovae.models.effects.base` (the interface), :mod:`~pyrovae.models.effects.additive`
(SAMS-VAE, CPA-VAE, GPO-VAE) with its q(E) families :mod:`~pyrovae.models.effects.guides`,
:mod:`~pyrovae.models.effects.sparsity_priors` (Beta-Bernoulli, learned sparsity level),
:mod:`~pyrovae.models.effects.svae_plus`, :mod:`~pyrovae.models.effects.conditional`,
:mod:`~pyrovae.models.effects.unseen` (GPO-VAE's unseen-perturbation transfer). The plate plumbing is
:mod:`pyrovae.models.plates`, the q(M) gradient estimators :mod:`pyrovae.models.mask_estimators`, the
parameter roles :mod:`pyrovae.models.roles` (the optimiser's rules: :mod:`pyrovae.train.optim`). This
package re-exports the names used elsewhere.
"""

from pyrovae.models.effects.additive import FIXED_MASK_LOGIT, AdditiveEffect
from pyrovae.models.effects.base import UNTRAINED_METHODS, EffectBlock
from pyrovae.models.effects.conditional import ConcatDosageEffect
from pyrovae.models.effects.guides import GUIDES
from pyrovae.models.effects.sparsity_priors import BetaBernoulliMaskEffect, LearnedSparsityMaskEffect
from pyrovae.models.effects.svae_plus import BetaBernoulliActionEffect
from pyrovae.models.effects.unseen import grn_transfer
from pyrovae.models.mask_estimators import (
    BASELINE_PARAM,
    MASK_ESTIMATORS,
    SURROGATE_ELBO,
    per_treatment_costs,
)
from pyrovae.models.plates import CELL_PLATE, PERTURBATION_PLATE, matmul_dosage, weighted_plate
from pyrovae.models.roles import PARAM_ROLES, parameter_roles

__all__ = [
    "AdditiveEffect",
    "BASELINE_PARAM",
    "BetaBernoulliActionEffect",
    "BetaBernoulliMaskEffect",
    "CELL_PLATE",
    "ConcatDosageEffect",
    "EffectBlock",
    "FIXED_MASK_LOGIT",
    "GUIDES",
    "LearnedSparsityMaskEffect",
    "MASK_ESTIMATORS",
    "PARAM_ROLES",
    "PERTURBATION_PLATE",
    "SURROGATE_ELBO",
    "UNTRAINED_METHODS",
    "grn_transfer",
    "matmul_dosage",
    "parameter_roles",
    "per_treatment_costs",
    "weighted_plate",
]
