"""Effects predicted from gene features: :class:`FeaturePrior`, the learned prior mean of the effect rows.

With the option on (``ModelConfig.gene_features``), treatment t's latent effect row has the prior

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

__all__ = ["FeaturePrior", "FEATURE_PRIOR_SITE"]

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
                f"gene features have shape {tuple(v.shape)} but the model expects {tuple(self.features.shape)} "
                "(treatments x gene_feature_dim)"
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
