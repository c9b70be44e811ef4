"""Decoders: a trunk on the latent state followed by a likelihood head over G genes."""

from __future__ import annotations

import numpy as np
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions.utils import lazy_property

from pyrovae.nn.mlp import ResidualMLP

LIKELIHOODS = ("nb", "poisson", "normal")
COUNT_LIKELIHOODS = ("nb", "poisson")

#: Library size at which counts are sampled by default (the reference code's ATE setting).
DEFAULT_LIBRARY_SIZE = 1e4


#: counts below this are looked up in :func:`count_lgammas`' per-gene table (larger ones computed directly)
LGAMMA_TABLE_SIZE = 64


def count_lgammas(concentration: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """lgamma(c + x) - lgamma(c) - lgamma(x + 1), the negative binomial's count terms, shape of ``counts``.

    For a per-gene concentration c (G,) and integer counts x (..., G) (data: no gradient) the values are a
    per-gene table over the counts k < K = min(max x + 1, LGAMMA_TABLE_SIZE), looked up: G K lgamma
    evaluations (and digamma in the backward pass) instead of one per entry of x, the same float32
    arithmetic on the same numbers (tests/nn/test_likelihoods.py); counts >= K are computed directly.
    Anything else (non-integer or negative counts, other shapes, counts with a gradient): directly.
    """
    c, x = concentration, counts
    direct = x.requires_grad or c.dim() != 1 or x.dim() < 1 or x.shape[-1] != c.shape[0] or x.numel() == 0
    if not direct:
        low, top = (float(v) for v in torch.aminmax(x))
        direct = low < 0 or top >= 2**24 or not torch.equal(x, x.floor())
    if direct:
        return torch.lgamma(c + x) - torch.lgamma(c) - torch.lgamma(x + 1.0)
    k = min(int(top) + 1, LGAMMA_TABLE_SIZE)
    grid = torch.arange(k, dtype=c.dtype, device=c.device)
    table = torch.lgamma(c.unsqueeze(-1) + grid) - torch.lgamma(c).unsqueeze(-1) - torch.lgamma(grid + 1.0)
    offsets = torch.arange(c.shape[0], dtype=x.dtype, device=x.device) * k  # row g of the (G, k) table
    out = torch.take(table, (x.clamp(max=k - 1) + offsets).long())
    if top >= k:
        big = (x >= k).nonzero(as_tuple=True)
        cg, xb = c[big[-1]], x[big]
        out = out.index_put(big, torch.lgamma(cg + xb) - torch.lgamma(cg) - torch.lgamma(xb + 1.0))
    return out


class GammaPoissonMean(dist.GammaPoisson):
    """The decoder's negative binomial: ``dist.GammaPoisson(theta, clamp(theta / m, min=MIN_RATE))`` given its
    concentration theta (per gene, (G,) or any shape broadcasting to the batch) and mean m (the full batch
    shape, e.g. (P, B, G)); ``sample``, ``mean`` and ``variance`` are GammaPoisson's on that rate.

    ``log_prob`` computes the same density in two ways that are cheaper than Pyro's:

    - the three lgamma terms on the concentration's and the value's own shapes ((B, G) for x of shape (B, G)
      and theta (G,)), not broadcast to (P, B, G): lgamma(theta + x) - lgamma(theta) - lgamma(x + 1);
    - where the clamp is inactive (theta / m >= MIN_RATE everywhere: checked on the batch, first by the
      bound max m <= min theta / MIN_RATE, free), the terms in the rate in the log domain,
      theta log r - (theta + x) log(1 + r) = theta log theta + x log m - (theta + x) log(theta + m)
      with r = theta / m: two logs on (P, B, G), no division, clamp or log1p (and at large theta / m
      no less accurate in float32 than the rate form: ``tests/nn/test_likelihoods.py``). Where the clamp
      is active anywhere in the batch, the rate form, clamped as the reference's CRADLE/GPO code does
      (the CRADLE-VAE / GPO-VAE decoder; the SAMS-VAE code has no clamp).

    The density and its gradients are those of Pyro's ``GammaPoisson`` on the clamped rate to float
    rounding (``tests/nn/test_likelihoods.py``). The rate (for sampling and validation) is made on first
    use only. ``log_domain = False`` (a class attribute) always takes the rate form (the benchmark's
    previous code path).
    """

    #: lower bound of the Gamma rate theta / m (the reference's ``clamp(rate, min=1e-6)``).
    MIN_RATE = 1e-6
    log_domain = True

    def __init__(self, concentration, mean, validate_args=None):
        self._own_concentration = torch.as_tensor(concentration, dtype=mean.dtype, device=mean.device)
        self._mean = mean
        batch_shape = torch.broadcast_shapes(self._own_concentration.shape, mean.shape)
        # skip GammaPoisson.__init__ (it makes the rate); Distribution.__init__ validates the arguments
        super(dist.GammaPoisson, self).__init__(batch_shape, validate_args=validate_args)

    @lazy_property
    def _gamma(self):
        rate = (self._own_concentration / self._mean).clamp(min=self.MIN_RATE)
        concentration = self._own_concentration.expand(self.batch_shape)
        return dist.Gamma(concentration, rate.expand(self.batch_shape), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GammaPoissonMean, _instance)
        batch_shape = torch.Size(batch_shape)
        new._own_concentration = self._own_concentration
        new._mean = self._mean.expand(batch_shape)
        super(dist.GammaPoisson, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def clamp_active(self) -> bool:
        """Whether theta / m < MIN_RATE anywhere (then ``log_prob`` takes the clamped rate form)."""
        c, m = self._own_concentration.detach(), self._mean.detach()
        if float(m.amax()) <= 0.99 * float(c.amin()) / self.MIN_RATE:  # a bound on (B + G) numbers
            return False
        return bool(((c / m) < self.MIN_RATE).any())

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        c, m = self._own_concentration, self._mean
        post = c + value
        if not self.log_domain:  # the previous code path (benchmark)
            lgammas = torch.lgamma(post) - torch.lgamma(c) - torch.lgamma(value + 1.0)
        else:
            lgammas = count_lgammas(c, value)
        if self.log_domain and not self.clamp_active():
            return lgammas + c * c.log() + value * m.log() - post * (m + c).log()
        rate = (c / m).clamp(min=self.MIN_RATE)
        return lgammas + c * rate.log() - post * torch.log1p(rate)


class Decoder(nn.Module):
    """p(x | u, library size) with an event of G genes.

    - ``"nb"``: negative binomial, mean mu = l * softmax(f(u)), per-gene concentration theta (init 1):
      ``GammaPoisson(theta, clamp(theta / (mu + 1e-4), min=1e-6))`` (mean m = mu + 1e-4, variance
      m + m^2 / theta), as :class:`GammaPoissonMean` of theta and m.
    - ``"poisson"``: Poisson with rate l * softmax(f(u)).
    - ``"normal"``: Normal(f(u), per-gene scale), for log-normalised data (library size unused).

    ``rest=True`` (the library size is an external size factor l, e.g. a cell's whole-transcriptome total
    while only G highly variable genes are modelled): the softmax runs over G + 1 categories, the last one
    the counts outside the modelled genes, and the mean of gene g is l * softmax(f(u))_g. The modelled
    genes' share of the depth is then learned (and may change with the perturbation) instead of being
    forced to 1, so mu sums to what the G genes hold, not to l.

    Shapes: u (..., B, n_in), library_size (B,) -> a distribution with batch shape (..., B) and event (G,).
    """

    def __init__(
        self,
        n_in: int,
        n_genes: int,
        n_hidden: int,
        n_layers: int,
        likelihood: str = "nb",
        rest: bool = False,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; use one of {LIKELIHOODS}")
        self.likelihood = likelihood
        self.rest = bool(rest) and likelihood in COUNT_LIKELIHOODS
        self.trunk = ResidualMLP(n_in, n_hidden, n_layers)
        self.head = nn.Linear(self.trunk.n_out, n_genes + int(self.rest))
        if likelihood == "nb":
            self.log_theta = nn.Parameter(torch.zeros(n_genes))
        if likelihood == "normal":
            self.log_scale = nn.Parameter(torch.zeros(n_genes))

    @torch.no_grad()
    def init_rest_share(self, share: float) -> None:
        """Start the outside-genes category at the data's share: with the other logits near 0, the modelled
        genes then hold ``share`` of the size factor at initialisation (a softmax starting uniform over
        G + 1 categories would give them G / (G + 1), often 20 times the data's, which training at a small
        learning rate takes thousands of steps to undo)."""
        if not self.rest:
            raise ValueError("init_rest_share needs a decoder with the outside-genes category (rest=True)")
        share = float(share)
        if not 0.0 < share < 1.0:
            raise ValueError(
                f"the modelled genes' share of the size factor must be in (0, 1), got {share:.4g}: size "
                "factors must exceed the counts over the modelled genes (whole-transcriptome totals)"
            )
        g = self.head.out_features - 1
        self.head.bias[-1] = self.head.bias[:-1].mean() + float(np.log(g * (1.0 - share) / share))

    def mean_fraction(self, u: torch.Tensor) -> torch.Tensor:
        """(..., B, G) expected fraction of a cell's library size per gene (count likelihoods)."""
        frac = torch.softmax(self.head(self.trunk(u)), dim=-1)
        return frac[..., :-1] if self.rest else frac

    def log_mean(self, u: torch.Tensor) -> torch.Tensor:
        """(..., B, G) the mean expression on the log scale, free of the library size: log of
        :meth:`mean_fraction` (count likelihoods), the mean itself for ``"normal"`` (log-normalised data)."""
        out = self.head(self.trunk(u))
        if self.likelihood == "normal":
            return out
        logp = torch.log_softmax(out, dim=-1)
        return logp[..., :-1] if self.rest else logp

    def forward(self, u: torch.Tensor, library_size: torch.Tensor | None) -> dist.Distribution:
        out = self.head(self.trunk(u))
        if self.likelihood == "normal":
            return dist.Normal(out, self.log_scale.exp()).to_event(1)
        if library_size is None:
            raise ValueError("a count likelihood needs the library size of each cell")
        frac = torch.softmax(out, dim=-1)
        if self.rest:
            frac = frac[..., :-1]
        mu = library_size.unsqueeze(-1) * frac
        if self.likelihood == "poisson":
            return dist.Poisson(mu + 1e-8).to_event(1)
        theta = self.log_theta.exp()
        return GammaPoissonMean(theta, mu + 1e-4).to_event(1)
