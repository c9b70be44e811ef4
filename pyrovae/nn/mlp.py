"""Plain torch building blocks shared by every model: the residual MLP trunk and Gaussian heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

    def forward_parts(self, parts: list[torch.Tensor | int]) -> torch.Tensor:
        """``forward(cat(parts, -1))`` (parts broadcast over their leading dims) without the concatenation.

        The first layer's pre-activation is a sum of one product per part with its block of weight columns,
        so a part with fewer leading dims (the cells' x, shared by every particle) is multiplied once and
        broadcast, not once per particle. An int part ``n`` stands for the identity block ``eye(n)`` (one
        row per position, e.g. onehot(t) for T treatments): its product is the transposed weight block, a
        row lookup with no FLOPs. The same function as :meth:`forward` (up to float rounding).
        """
        if not self.layers:
            raise ValueError("forward_parts needs at least one layer (the identity trunk has no weights)")
        first, start, pre = self.layers[0], 0, None
        for part in parts:
            width = part if isinstance(part, int) else part.shape[-1]
            w = first.weight[:, start : start + width]
            term = w.t() if isinstance(part, int) else F.linear(part, w)
            pre = term if pre is None else pre + term
            start += width
        if start != first.in_features:
            raise ValueError(
                f"the parts have {start} features in all but the first layer takes {first.in_features}"
            )
        h = self.act(pre + first.bias)
        for layer in self.layers[1:]:
            h = self.act(layer(h)) + h
        return h


class GaussianMLP(nn.Module):
    """MLP with a Gaussian head: returns (loc, scale) of shape (..., n_out); scale = sqrt(exp(.) + 1e-4)."""

    def __init__(self, n_in: int, n_out: int, n_hidden: int, n_layers: int) -> None:
        super().__init__()
        self.trunk = ResidualMLP(n_in, n_hidden, n_layers)
        self.loc = nn.Linear(self.trunk.n_out, n_out)
        self.log_var = nn.Linear(self.trunk.n_out, n_out)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._head(self.trunk(h))

    def forward_parts(self, parts: list[torch.Tensor | int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(cat(parts, -1))`` computed part by part (see :meth:`ResidualMLP.forward_parts`)."""
        if not self.trunk.layers:  # a linear model: nothing to split
            lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts if not isinstance(p, int)))
            full = [
                torch.eye(p, device=self.loc.weight.device).expand(lead + (p,))
                if isinstance(p, int)
                else p.expand(lead + p.shape[-1:])
                for p in parts
            ]
            return self(torch.cat(full, dim=-1))
        return self._head(self.trunk.forward_parts(parts))

    def _head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), (self.log_var(h).clamp(max=30.0).exp() + 1e-4).sqrt()
