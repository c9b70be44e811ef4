"""Plate and dosage plumbing shared by the skeleton, the effect blocks, the artifact block and the mask
estimators: the plate names, :func:`weighted_plate` (global rows scaled by per-row weights) and
:func:`matmul_dosage` (a cell's dosage row times the per-treatment rows)."""

from __future__ import annotations

from contextlib import contextmanager

import pyro
import torch
from pyro import poutine

__all__ = ["PERTURBATION_PLATE", "CELL_PLATE", "weighted_plate", "matmul_dosage"]

PERTURBATION_PLATE = "perturbations"
CELL_PLATE = "cells"


@contextmanager
def weighted_plate(name: str, size: int, weights: torch.Tensor | None):
    """A plate over global rows whose log-densities are scaled row-wise by ``weights``.

    Rows with weight 0 are masked out (Pyro forbids non-positive scales). ``weights=None``: unscaled.
    """
    with pyro.plate(name, size, dim=-1):
        if weights is None:
            yield
        else:
            with poutine.mask(mask=weights > 0), poutine.scale(scale=weights.clamp_min(1e-30)):
                yield


def matmul_dosage(d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, T) @ (..., T, K) -> (..., B, K).

    A sparse dosage matrix (at most one entry in 8 non-zero, as the one- or few-hot rows of a screen with
    more than 8 treatments) is applied as a gather of the rows of its non-zero entries and a scatter-add
    over cells: O(nnz K) instead of O(B T K), the same sums (exact for one-hot rows, up to float rounding
    otherwise). Gradients flow to ``rows`` (and to ``d``'s non-zero values) as through the product.
    """
    if d.dim() == 2 and d.shape[-1] > 8:
        i, t = torch.nonzero(d, as_tuple=True)
        if 8 * i.numel() <= d.numel():
            vals = d[i, t].unsqueeze(-1).to(rows.dtype)
            out = rows.new_zeros(rows.shape[:-2] + (d.shape[0], rows.shape[-1]))
            return out.index_add(-2, i, rows[..., t, :] * vals)
    return torch.matmul(d, rows)
