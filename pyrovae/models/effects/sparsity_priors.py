"""SAMS-VAE with a learned sparsity: Beta-Bernoulli masks (the reference's ``sams_vae_beta_bernoulli``)
and a learned per-treatment mask prior level (a departure from the paper's fixed prior)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.models.effects.additive import AdditiveEffect
from pyrovae.models.plates import PERTURBATION_PLATE, weighted_plate

__all__ = ["BetaBernoulliMaskEffect", "LearnedSparsityMaskEffect"]


class BetaBernoulliMaskEffect(AdditiveEffect):
    """SAMS-VAE with Beta-Bernoulli masks (the reference code's ``sams_vae_beta_bernoulli``).

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
        self.score_feature_prior()
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
            m = self._sample_q_mask(torch.logit(pi))
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
        self.score_feature_prior()
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            hyper = dist.Beta(self.sparsity_a.expand(T), self.sparsity_b.expand(T))
            alpha = pyro.sample("mask_sparsity", hyper)
            m = pyro.sample("mask", self._prior_mask(alpha.unsqueeze(-1).expand(alpha.shape + (K,))))
            return {"mask_sparsity": alpha, "mask": m, "E": self._sample_p_E()}

    def guide_globals(self, weights):
        with weighted_plate(PERTURBATION_PLATE, self.n_treatments, weights):
            lam = self.q_sparsity_logits.detach() if self.masks_frozen() else self.q_sparsity_logits
            alpha = pyro.sample("mask_sparsity", dist.Delta(torch.sigmoid(lam).clamp(1e-6, 1 - 1e-6)))
            m = self._sample_q_mask(self.q_mask_logits)
            return {"mask_sparsity": alpha, "mask": m, "E": self._sample_q_E(m)}

    def sparsity(self) -> torch.Tensor:
        """(T,) the learned per-treatment mask prior levels alpha_t."""
        return torch.sigmoid(self.q_sparsity_logits.detach())

    def mask_role_parameters(self) -> list[nn.Parameter]:
        return [*super().mask_role_parameters(), self.q_sparsity_logits]
