"""SVAE+'s effect block: Beta-Bernoulli masks on a learned action mean in the cell latent's prior."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.models.distributions import StraightThroughBernoulli
from pyrovae.models.effects.base import EffectBlock
from pyrovae.models.plates import PERTURBATION_PLATE, matmul_dosage, weighted_plate
from pyrovae.models.roles import parameter_roles

__all__ = ["BetaBernoulliActionEffect"]


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
