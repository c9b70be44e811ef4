"""Plain torch building blocks shared by every model: the residual MLP trunk and Gaussian heads."""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """``n_layers`` Linear layers, each followed by LeakyReLU; layers 2.. are residual (h <- f(h) + h).

    With ``n_layers = 0`` the trunk is the identity (heads then act on the raw input: a linear model).
    Accepts any leading dimensions: (..., n_in) -> (..., n_out).
    """

    def __init__(self, n_in: int, n_hidden: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(n_layers):
            self.layers.append(nn.Linear(n_in if i == 0 else n_hidden, n_hidden))
        self.act = nn.LeakyReLU()
        self.n_out = n_hidden if n_layers > 0 else n_in

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            out = self.act(layer(h))
            h = out if i == 0 else out + h
        return h


class GaussianMLP(nn.Module):
    """MLP with a Gaussian head: returns (loc, scale) of shape (..., n_out); scale = sqrt(exp(.) + 1e-4)."""

    def __init__(self, n_in: int, n_out: int, n_hidden: int, n_layers: int) -> None:
        super().__init__()
        self.trunk = ResidualMLP(n_in, n_hidden, n_layers)
        self.loc = nn.Linear(self.trunk.n_out, n_out)
        self.log_var = nn.Linear(self.trunk.n_out, n_out)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(h)
        return self.loc(h), (self.log_var(h).clamp(max=30.0).exp() + 1e-4).sqrt()
