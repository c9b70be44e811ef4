"""Effects predicted from gene features: :class:`FeaturePrior`, the learned prior mean of the effect rows.

With the option on (``ModelConfig.features``), treatment t's latent effect row has the prior

    e_t ~ Normal(mu_t, s^2 I),   mu_t = b + W^T x_t,

where x_t (F,) are the features of t's target gene (:mod:`pyrovae.data.gene_features`; zero for a target
without features, so mu_t = b), s the effect prior's scale, and (W (F, K), b (K,)) are point-estimated
model parameters with the prior W ~ Normal(0, s^2) (elementwise; the features are standardised and divided
by sqrt(F), so b + W^T x has about the prior's scale). The objective is

    ELBO(theta, phi; data) + log Normal(W; 0, s^2 I),

the ELBO of the model with the prior above, maximised in the variational parameters, the network weights
and phi = (W, b) (empirical Bayes for the prior mean, MAP with the weight prior). The log-prior of W is a
``pyro.factor`` (``gene_feature_weight_prior``) outside the perturbations plate: a global term counted
once per full-data objective, so the minibatch estimate stays unbiased (it is not scaled by the cell
subsample, only by the skeleton's overall ``scale``, as every term).

The guide's free means are parametrised as mu_t + a_t (q(E | M)'s network: its loc plus mu_t), so every
treatment's q starts at its feature prediction, and a seen treatment's a_t pays the KL cost of departing
from it: seen perturbations are shrunk toward what their features predict. Unseen perturbations (no training
cell: their rows are masked out of the objective) are predicted by :meth:`FeaturePrior.predict`: e_u = mu_u
with every mask entry on (``untrained_method`` ``"gene_features"``).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["FeaturePrior", "FeatureFitStep", "FEATURE_PRIOR_SITE"]

#: the name of the log-prior factor of the feature weights W
FEATURE_PRIOR_SITE = "gene_feature_weight_prior"


class FeaturePrior(nn.Module):
    """mu = b + x W, the prior mean of the (T, K) effect rows from (T, F) gene features.

    The features are buffers (``features`` (T, F), ``has_features`` (T,)), filled by :meth:`set_features`
    before training; a checkpoint carries them, so a reloaded run predicts from the same features.

    Args:
        n_treatments: T.
        n_features: F.
        effect_dim: K.
        prior_scale: s, the prior scale of W (the effect prior's scale).
    """

    def __init__(self, n_treatments: int, n_features: int, effect_dim: int, prior_scale: float = 1.0) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"gene features need at least one dimension, got {n_features}")
        self.register_buffer("features", torch.zeros(n_treatments, n_features))
        self.register_buffer("has_features", torch.zeros(n_treatments, dtype=torch.bool))
        self.register_buffer("weight_prior_scale", torch.tensor(float(prior_scale)))
        self.weight = nn.Parameter(torch.zeros(n_features, effect_dim))
        self.bias = nn.Parameter(torch.zeros(effect_dim))

    @torch.no_grad()
    def set_features(self, values, has) -> None:
        """Store the (T, F) features and (T,) availability (rows without features are set to zero)."""
        v = torch.as_tensor(values, dtype=self.features.dtype)
        h = torch.as_tensor(has, dtype=torch.bool)
        if tuple(v.shape) != tuple(self.features.shape) or tuple(h.shape) != tuple(self.has_features.shape):
            raise ValueError(
                f"gene features have shape {tuple(v.shape)} but the model expects "
                f"{tuple(self.features.shape)} (treatments x gene_feature_dim)"
            )
        self.features.copy_(torch.where(h.unsqueeze(-1), v, torch.zeros_like(v)))
        self.has_features.copy_(h)

    def loc(self) -> torch.Tensor:
        """(T, K) the prior mean mu = b + x W."""
        return self.bias + self.features @ self.weight

    def weight_log_prior(self) -> None:
        """Score log Normal(W; 0, s^2 I) as the factor :data:`FEATURE_PRIOR_SITE` (call in the model only)."""
        lp = dist.Normal(0.0, self.weight_prior_scale).log_prob(self.weight).sum()
        pyro.factor(FEATURE_PRIOR_SITE, lp)

    @torch.no_grad()
    def fit(self, means: torch.Tensor, weights: torch.Tensor, effect_scale: torch.Tensor | float) -> None:
        """Set (W, b) to the maximum of the objective in them given q: per latent coordinate k, the ridge
        regression of the q means ``means`` (T, K) on [x, 1] with row weights ``weights`` (T, K) and penalty
        s_E^2 / s_W^2 on W (none on b), s_E = ``effect_scale`` (the effect prior's scale).

        This is exact for a q(E) whose mean does not depend on the weights (free means): E_q log N(e_tk;
        mu_tk, s_E^2) = -(m_tk - mu_tk)^2 / (2 s_E^2) + const, weighted by the expected row weight (1 for
        a treatment with training cells, 0 otherwise) and, for the spike-and-slab guide, by q(m_tk = 1)
        (an entry that is off has q(e | m = 0) = p(e): its term cancels)."""
        x = torch.cat([self.features, torch.ones_like(self.features[:, :1])], 1).double()  # (T, F + 1)
        lam = (torch.as_tensor(effect_scale, dtype=torch.float64) / self.weight_prior_scale.double()) ** 2
        pen = torch.diag(torch.cat([lam.expand(self.features.shape[1]), lam.new_zeros(1)]))
        w = weights.double()
        y = means.double()
        gram = torch.einsum("tf,tk,tg->kfg", x, w, x) + pen  # (K, F + 1, F + 1)
        rhs = torch.einsum("tf,tk,tk->kf", x, w, y)  # (K, F + 1)
        gram = gram + 1e-8 * torch.eye(x.shape[1], dtype=gram.dtype)
        beta = torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)  # (K, F + 1)
        self.weight.copy_(beta[:, :-1].T.to(self.weight.dtype))
        self.bias.copy_(beta[:, -1].to(self.bias.dtype))

    @torch.no_grad()
    def predict(self, g: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global draws ``g`` (n, T, K) with the ``rows`` (T,) bool set to the prior mean (``E``) and every
        mask entry on (``mask``, if any): the feature-predicted effect of a perturbation with no cell."""
        rows = rows.to(self.features.device).bool()
        out = dict(g)
        mu = self.loc().to(g["E"].dtype)
        out["E"] = torch.where(rows.unsqueeze(-1), mu.expand_as(g["E"]), g["E"])
        if "mask" in g:
            out["mask"] = torch.where(rows.unsqueeze(-1), torch.ones_like(g["mask"]), g["mask"])
        return out


class FeatureFitStep:
    """Training-step hook (an effect block's ``training_hooks``): after each optimiser step, set the feature
    prior's (W, b) to their exact optimum given the current q (:meth:`FeaturePrior.fit`): coordinate
    ascent on the same objective, which reaches the empirical-Bayes fit far faster than its gradient (whose
    per-cell scale is 1 / N). Only for blocks whose q(E) means are free parameters (``mean_field``,
    ``spike_slab``, CPA-VAE); with q(E | M)'s network (``correlated``) the weights train by gradient alone.

    Args:
        effect: the additive effect block (``feature_prior``, ``q_E_loc``, ``mask_probs()``).
    """

    def __init__(self, effect: nn.Module) -> None:
        self.effect = effect
        self.trained: torch.Tensor | None = None

    def after_step(self, trainer) -> None:
        """Called by the :class:`~pyrovae.train.trainer.Trainer` after each optimiser step."""
        eff = self.effect
        if self.trained is None:  # the treatments with training cells, read once
            self.trained = ~torch.as_tensor(trainer.data.untrained(), device=eff.q_E_loc.device)
        probs = eff.mask_probs() if eff.guide_kind == "spike_slab" else None
        w = self.trained.to(eff.q_E_loc.dtype).unsqueeze(-1).expand_as(eff.q_E_loc)
        if probs is not None:
            w = w * probs
        eff.feature_prior.fit(eff.q_E_loc.detach(), w, eff.embedding_prior_scale)
