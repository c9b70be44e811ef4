"""Distributions the guides need beyond Pyro's stock ones."""

from __future__ import annotations

import pyro.distributions as dist
import torch


class StraightThroughBernoulli(dist.RelaxedBernoulliStraightThrough):
    """q(m) = Bernoulli(sigmoid(logits)) sampled with a straight-through relaxed estimator.

    ``rsample`` returns hard 0/1 values, which are exact Bernoulli(sigmoid(logits)) draws for any
    temperature (the temperature only shapes the gradient, taken through the relaxed sample).

    ``log_prob`` scores the *hard* value under the discrete Bernoulli. Pyro's parent class scores the
    relaxed value under the Concrete density, which is meaningless next to a Bernoulli prior
    (see shared/reference/sams_vae.md §3.1, §9.2).
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return dist.Bernoulli(logits=self.logits).log_prob(value)

    @property
    def mode(self) -> torch.Tensor:
        return (self.probs > 0.5).to(self.probs.dtype)
