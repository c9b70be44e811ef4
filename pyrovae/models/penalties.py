"""Loss terms that are not log-densities, added to the negative ELBO in one place (the training step).

Each penalty is called as ``penalty(model, batch) -> {name: scalar tensor}`` in per-cell units (the same
units as the training loss, which is the negative ELBO divided by N), and declares the per-cell data it
reads from the batch as ``data_needs`` (:class:`~pyrovae.data.prepare.Requirement` objects, gathered by
:func:`pyrovae.models.zoo.data_requirements` and supplied by :func:`pyrovae.data.prepare.prepare_data`).
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
from torch import nn

from pyrovae.data import prepare
from pyrovae.models.artifact import gaussian_kl
from pyrovae.models.plates import matmul_dosage


def k_hop_accumulation(w: torch.Tensor, hops: int) -> torch.Tensor:
    """S = sum_{k=1}^{hops+1} W^k / T^(k-1) for a square (T, T) matrix W (GPO-VAE's K-hop sum)."""
    t = w.shape[-1]
    acc, power = w, w
    for _ in range(hops):
        power = power @ w / t
        acc = acc + power
    return acc


#: what :class:`GRNAlignment` aligns to: per-cell ``|delta_x|`` (the reference) or its per-perturbation mean.
GRNTarget = Literal["cell", "group"]
GRN_TARGETS = typing.get_args(GRNTarget)


class GRNAlignment(nn.Module):
    """GPO-VAE's GRN-aligned parameter optimisation on the mask logits W (T, T).

    - alignment: ``weight * mean_{i, j} | (d_i S)_j - (delta_x_ij - threshold) |`` with S the K-hop sum
      of W and delta_x the OT-based ``|log-expression difference|`` of each cell to its matched control on the
      T GRN genes;
    - sparsity: ``sparsity_weight * mean sigmoid(W)``.

    S = sum_k W^k / T^(k-1) (:func:`k_hop_accumulation`, the reference's scaling). With T >= 10 nodes the
    path terms are tiny next to W (a path a -> b -> c of two strong edges adds W_ab W_bc / T), so W must
    absorb every indirect effect: W is a thresholded ``|DE|`` of the total effect.

    ``target``: ``"cell"`` (the reference) aligns to the per-cell ``|delta_x|``; ``"group"`` (a departure) to
    ``batch["delta_x_group"]``, the ``|mean signed paired difference|`` of the cell's perturbation
    (:func:`pyrovae.data.grn.group_delta_x`), which averages the pairing noise out before the absolute
    value, as ``|DE|`` does.

    ``singles_only`` (a departure): align on single-perturbation cells only. The reference aligns every
    cell, and on a combination cell d_i S = S_a + S_b is fitted to delta_x - threshold with the threshold
    subtracted once for two rows, which pulls both rows towards each other's targets (on simulated data
    with combinations this costs W its lead over ``|DE|``; see experiments/README.md).

    Needs ``batch["delta_x"]`` (B, T) (and ``batch["delta_x_group"]`` with ``target="group"``).
    """

    data_needs = (prepare.GRN_TARGETS,)

    def __init__(
        self,
        weight: float = 100.0,
        threshold: float = 0.5,
        hops: int = 5,
        sparsity_weight: float = 1.0,
        target: str = "cell",
        singles_only: bool = False,
    ):
        super().__init__()
        self.weight, self.threshold, self.hops, self.sparsity_weight = (
            weight,
            threshold,
            hops,
            sparsity_weight,
        )
        if target not in GRN_TARGETS:
            raise ValueError(f"unknown grn_target {target!r}; use one of {GRN_TARGETS}")
        self.target, self.singles_only = target, bool(singles_only)

    def forward(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "delta_x" not in batch:
            raise ValueError(
                "GPO-VAE needs delta_x (OT-paired expression differences) in every batch; prepare the data "
                "with pyrovae.data.prepare.prepare_data(...) (train_run does)"
            )
        key = "delta_x" if self.target == "cell" else "delta_x_group"
        if key not in batch:
            raise ValueError(
                f"grn_target={self.target!r} needs {key} in every batch; prepare the data with "
                "pyrovae.data.prepare.prepare_data(...) (again, with force=True, for data prepared before)"
            )
        dx = batch[key]
        w = model.effect.q_mask_logits
        s = k_hop_accumulation(w, self.hops)
        target = dx - self.threshold
        resid = (matmul_dosage(batch["d"], s) - target).abs()  # (B, T)
        if self.singles_only:
            single = (batch["d"] != 0).sum(-1) == 1
            align = resid[single].mean() if bool(single.any()) else resid.sum() * 0.0
        else:
            align = resid.mean()
        sparsity = torch.sigmoid(w).mean()
        return {"grn_alignment": self.weight * align, "grn_sparsity": self.sparsity_weight * sparsity}


class CounterfactualKL(nn.Module):
    """CRADLE-VAE's counterfactual term, as a true Gaussian KL in per-cell units.

    For a cell with a counterfactual expression cfx_i (the median of same-perturbation, same-split cells
    with the opposite QC status), compare the basal posterior of the counterfactual cell encoded with the
    flipped QC status, q(z | cfx_i, d_i, (1 - q_i) A), with the posterior of the real cell encoded as if its
    QC status were flipped, q(z | x_i, d_i, (1 - q_i) A):

        weight * (1/B) * sum_{i with a counterfactual} KL(q_ref || q_cf)

    Departures from the reference code (CRADLE-VAE's and GPO-VAE's counterfactual term): the exact
    Gaussian KL (the reference omits the 1/sigma_2^2 on the mean term); averaged over the batch like the
    ELBO rather than summed (so ``weight`` does not depend on the batch size); both encodings share one draw
    of the global sites. Because the reference summed over the batch (512 cells) while its ELBO was a
    per-cell mean, the same nominal weight is about 500 times weaker here; ``cf_weight = 0.1 * batch_size``
    matches the reference's strength on the mean-vs-sum axis (its KL also lacked the 1/sigma^2 factor).

    Needs ``batch["qc"]`` (B, Q), ``batch["cfx"]`` (B, G) and ``batch["has_cf"]`` (B,).
    """

    data_needs = (prepare.QC_FLAGS, prepare.COUNTERFACTUALS)

    def __init__(self, weight: float = 0.1):
        super().__init__()
        self.weight = weight

    def forward(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.weight == 0 or "cfx" not in batch:
            return {}
        g = model.draw_globals()
        loc_ref, sd_ref = model.encoder_dist(batch["cfx"], batch, g, flip_qc=True)
        loc_cf, sd_cf = model.encoder_dist(batch["x"], batch, g, flip_qc=True)
        kl = gaussian_kl(loc_ref, sd_ref, loc_cf, sd_cf).sum(-1)
        kl = (kl * batch["has_cf"]).sum() / batch["x"].shape[0]
        return {"counterfactual_kl": self.weight * kl}
