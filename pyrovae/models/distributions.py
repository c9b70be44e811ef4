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


class DetachedBernoulli(dist.Bernoulli):
    """q(m) = Bernoulli(logits) whose samples carry no gradient, marked reparameterised.

    Pyro then adds no score-function term of its own for the site (and tracks no provenance); the mask
    estimator supplies the whole gradient of the logits through a surrogate term instead (the
    leave-one-out estimator of :class:`~pyrovae.models.effects.AdditiveEffect`). ``log_prob`` is the
    Bernoulli one.
    """

    has_rsample = True

    def rsample(self, sample_shape=()):
        return self.sample(torch.Size(sample_shape))


class RelaxedBernoulliMask(dist.RelaxedBernoulli):
    """Binary Concrete q(m) at a temperature, scored as the Bernoulli draw it relaxes.

    While gradients are recorded (training) ``rsample`` returns the soft value
    s = sigmoid((logit u + logits) / temperature); otherwise (prediction, evaluation) the hard value
    1[s > 0.5] = 1[logit u + logits > 0], an exact Bernoulli(sigmoid(logits)) draw. ``log_prob(value)`` is
    the Bernoulli log-probability of the hard value 1[value > 0.5], never the Concrete density (which would be
    meaningless next to a Bernoulli prior, shared/reference/sams_vae.md §9.2).
    """

    support = dist.constraints.unit_interval

    def rsample(self, sample_shape=()):
        s = super().rsample(torch.Size(sample_shape))
        return s if torch.is_grad_enabled() else (s > 0.5).to(s.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return dist.Bernoulli(logits=self.logits).log_prob((value > 0.5).to(value.dtype))


class HardenedBernoulli(dist.Bernoulli):
    """The Bernoulli prior of a relaxed mask: scores the hard value 1[value > 0.5] of a soft sample."""

    support = dist.constraints.unit_interval

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return super().log_prob((value > 0.5).to(value.dtype))


class AntitheticBernoulli(DetachedBernoulli):
    """q(m) = Bernoulli(logits) drawn in antithetic pairs along the leading (particle) dimension.

    With batch shape (P, ...), h = P // 2: particle p < h is m = 1[u < sigmoid(logits)] and particle p + h
    is m~ = 1[1 - u < sigmoid(logits)] for the same uniforms u; with P odd the last particle is independent.
    Each particle is an exact Bernoulli draw, the pairs are coupled (the DisARM estimator of
    :class:`~pyrovae.models.effects.AdditiveEffect`). Samples carry no gradient (see
    :class:`DetachedBernoulli`). Without a leading dimension of size >= 2 the draws are independent.
    """

    def sample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        if len(shape) < 2 or shape[0] < 2:
            return super().sample(torch.Size(sample_shape))
        p = self.probs.expand(shape)
        half = shape[0] // 2
        with torch.no_grad():
            u = torch.rand((half,) + shape[1:], dtype=p.dtype, device=p.device)
            rest = torch.rand((shape[0] - 2 * half,) + shape[1:], dtype=p.dtype, device=p.device)
            u = torch.cat([u, 1.0 - u, rest], dim=0)
            return (u < p).to(p.dtype)
