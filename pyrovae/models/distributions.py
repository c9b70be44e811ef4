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
    (the reference code overrides ``log_prob`` the same way).
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
    leave-one-out estimator of :mod:`~pyrovae.models.mask_estimators`). ``log_prob`` is the
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
    meaningless next to a Bernoulli prior; the reference code does the same).
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
    :mod:`~pyrovae.models.mask_estimators`). Samples carry no gradient (see
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


class SpikeSlabNormal(dist.TorchDistribution):
    """q(e | m) of the ``spike_slab`` guide, per entry: Normal(loc, scale) where m = 1 (the slab), the prior
    Normal(0, prior_scale) where m = 0 (the spike's effect row is never seen by the likelihood).

    This is the spike-and-slab variational family (Titsias & Lazaro-Gredilla 2011): with q(e | m = 0) equal
    to the prior, an entry that is off costs no KL and its slab parameters are fitted only by the draws in
    which it is on. ``log_prob(e) = m log N(e; loc, scale) + (1 - m) log N(e; 0, prior_scale)``, exact for a
    hard m and linear in m, so a straight-through mask gradient sees the KL cost of switching an entry on.

    ``rsample``: while gradients are recorded (training) it returns the slab draw loc + scale * eps for every
    entry. Where m = 0 the value does not change the ELBO's integrand (the likelihood sees e * m and
    log p(e) - log q(e | 0) = 0 for any e), so the estimate and its expectation are those of the family's
    exact draws, while the straight-through gradient of e * m at m = 0 is the slab's effect (the change in
    likelihood if the entry were on), not prior noise. Otherwise (prediction) it returns the exact draw:
    the slab where m = 1, a prior draw where m = 0.

    Args:
        mask: (..., K) 0/1 masks (hard values; a straight-through mask keeps its gradient).
        loc, scale: the slab's parameters, broadcastable with ``mask``.
        prior_scale: the prior's standard deviation (a scalar tensor).
        prior_loc: the prior's mean, broadcastable with ``loc`` (``None``: 0; the gene-feature prediction of
            :class:`~pyrovae.models.effects.features.FeaturePrior`).
    """

    arg_constraints = {}
    support = dist.constraints.real
    has_rsample = True

    def __init__(self, mask, loc, scale, prior_scale, prior_loc=None, validate_args=None):
        if prior_loc is None:
            prior_loc = torch.zeros_like(torch.as_tensor(loc))
        self.mask, self.loc, self.scale, self.prior_loc = torch.broadcast_tensors(mask, loc, scale, prior_loc)
        self.prior_scale = torch.as_tensor(prior_scale, dtype=self.loc.dtype, device=self.loc.device)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return SpikeSlabNormal(
            self.mask.expand(shape),
            self.loc.expand(shape),
            self.scale.expand(shape),
            self.prior_scale,
            self.prior_loc.expand(shape),
        )

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        slab = self.loc + self.scale * eps
        if torch.is_grad_enabled():
            return slab
        spike = self.prior_loc + self.prior_scale * torch.randn(
            shape, dtype=self.loc.dtype, device=self.loc.device
        )
        return torch.where(self.mask > 0.5, slab, spike)

    def log_prob(self, value):
        slab = dist.Normal(self.loc, self.scale).log_prob(value)
        prior = dist.Normal(self.prior_loc, self.prior_scale).log_prob(value)
        return self.mask * slab + (1.0 - self.mask) * prior
