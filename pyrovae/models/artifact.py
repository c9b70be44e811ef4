"""CRADLE-VAE's quality-control (artifact) latent.

Q artifact rows A_r ~ N(0, s^2 I_L) live in their own global plate ``qc_rows``. A cell with QC-failure
indicators q_i (Q,) gets the extra decoder and encoder input q_i A (the reference concatenates
[z_basal, z_p, artifact]); a QC-passing cell gets zeros. The reference's model used ``ones @ A`` for every
failing cell while its guide used ``q @ A``; here both use ``q @ A`` (identical for Q = 1).
The counterfactual term is in :func:`counterfactual_kl`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.data.prepare import QC_FLAGS
from pyrovae.models.plates import weighted_plate
from pyrovae.models.roles import parameter_roles

QC_PLATE = "qc_rows"


class ArtifactBlock(nn.Module):
    """Artifact latent A (Q, L) with a free mean-field Gaussian posterior; reads ``batch["qc"]`` (B, Q)."""

    data_needs = (QC_FLAGS,)

    def __init__(self, n_qc: int, n_latent: int, prior_scale: float = 1.0) -> None:
        super().__init__()
        self.n_qc, self.n_latent = n_qc, n_latent
        self.register_buffer("prior_scale", torch.tensor(float(prior_scale)))
        self.q_loc = nn.Parameter(torch.zeros(n_qc, n_latent))
        self.q_log_scale = nn.Parameter(torch.zeros(n_qc, n_latent))

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """The optimiser roles of the block's parameters: both are variational (no weight decay)."""
        return parameter_roles(self, variational=[self.q_loc, self.q_log_scale])

    def model_globals(self, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with weighted_plate(QC_PLATE, self.n_qc, weights):
            a = pyro.sample(
                "qc_E",
                dist.Normal(torch.zeros_like(self.q_loc), self.prior_scale).to_event(1),
            )
        return {"qc_E": a}

    def guide_globals(self, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        with weighted_plate(QC_PLATE, self.n_qc, weights):
            a = pyro.sample("qc_E", dist.Normal(self.q_loc, self.q_log_scale.exp() + 1e-4).to_event(1))
        return {"qc_E": a}

    def block(self, qc: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, Q) indicators -> (..., B, L) artifact input q A."""
        return torch.matmul(qc, g["qc_E"])


def gaussian_kl(
    loc1: torch.Tensor, scale1: torch.Tensor, loc2: torch.Tensor, scale2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(loc1, scale1^2) || N(loc2, scale2^2))."""
    var_ratio = (scale1 / scale2) ** 2
    return 0.5 * (var_ratio + ((loc1 - loc2) / scale2) ** 2 - 1.0 - torch.log(var_ratio))
