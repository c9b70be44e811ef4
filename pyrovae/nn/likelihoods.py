"""Decoders: a trunk on the latent state followed by a likelihood head over G genes."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.nn.mlp import ResidualMLP

LIKELIHOODS = ("nb", "poisson", "normal")
COUNT_LIKELIHOODS = ("nb", "poisson")

#: Library size at which counts are sampled by default (the reference's ATE setting, §5.2).
DEFAULT_LIBRARY_SIZE = 1e4


class GammaPoissonSharedConcentration(dist.GammaPoisson):
    """``dist.GammaPoisson`` whose ``log_prob`` keeps the concentration at its own shape.

    Pyro's version broadcasts the concentration to the full batch shape, so with a per-gene concentration
    (G,) and P particles its lgamma terms (and their digamma gradients) run on (P, B, G) elements although
    concentration + x has only (B, G) distinct values. Here they run on (B, G) (the same density, up to float
    rounding: lgamma(c + x) - lgamma(c) - lgamma(x + 1) + c log r - (c + x) log(1 + r)); only the terms in
    the rate have the full shape. In a SAMS-VAE step at the Replogle sizes this was half the step's time.
    """

    def __init__(self, concentration, rate, validate_args=None):
        super().__init__(concentration, rate, validate_args=validate_args)
        self._own_concentration = torch.as_tensor(
            concentration, dtype=self.rate.dtype, device=self.rate.device
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(GammaPoissonSharedConcentration, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._own_concentration = self._own_concentration
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        c, rate = self._own_concentration, self.rate
        post = c + value
        return (
            torch.lgamma(post)
            - torch.lgamma(c)
            - torch.lgamma(value + 1.0)
            + c * rate.log()
            - post * torch.log1p(rate)
        )


class Decoder(nn.Module):
    """p(x | u, library size) with an event of G genes.

    - ``"nb"``: negative binomial, mean mu = l * softmax(f(u)), per-gene concentration theta (init 1):
      ``GammaPoisson(theta, theta / (mu + 1e-4))`` (variance mu + mu^2 / theta).
    - ``"poisson"``: Poisson with rate l * softmax(f(u)).
    - ``"normal"``: Normal(f(u), per-gene scale), for log-normalised data (library size unused).

    Shapes: u (..., B, n_in), library_size (B,) -> a distribution with batch shape (..., B) and event (G,).
    """

    def __init__(self, n_in: int, n_genes: int, n_hidden: int, n_layers: int, likelihood: str = "nb") -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; use one of {LIKELIHOODS}")
        self.likelihood = likelihood
        self.trunk = ResidualMLP(n_in, n_hidden, n_layers)
        self.head = nn.Linear(self.trunk.n_out, n_genes)
        if likelihood == "nb":
            self.log_theta = nn.Parameter(torch.zeros(n_genes))
        if likelihood == "normal":
            self.log_scale = nn.Parameter(torch.zeros(n_genes))

    def mean_fraction(self, u: torch.Tensor) -> torch.Tensor:
        """(..., B, G) expected fraction of a cell's counts per gene (count likelihoods)."""
        return torch.softmax(self.head(self.trunk(u)), dim=-1)

    def forward(self, u: torch.Tensor, library_size: torch.Tensor | None) -> dist.Distribution:
        out = self.head(self.trunk(u))
        if self.likelihood == "normal":
            return dist.Normal(out, self.log_scale.exp()).to_event(1)
        if library_size is None:
            raise ValueError("a count likelihood needs the library size of each cell")
        mu = library_size.unsqueeze(-1) * torch.softmax(out, dim=-1)
        if self.likelihood == "poisson":
            return dist.Poisson(mu + 1e-8).to_event(1)
        theta = self.log_theta.exp()
        return GammaPoissonSharedConcentration(theta, (theta / (mu + 1e-4)).clamp(min=1e-6)).to_event(1)
