"""The effect-block interface (:class:`EffectBlock`): what the skeleton calls, with the defaults of a
block without global sites."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pyrovae.models.roles import parameter_roles

__all__ = ["EffectBlock", "UNTRAINED_METHODS"]

#: how a treatment with no training cell is predicted (:meth:`EffectBlock.untrained_method`):
#: ``grn_transfer`` (GPO-VAE: mask row from the learned GRN, effect sizes from seen perturbations),
#: ``prior_draw`` (rows drawn from the prior: no information), ``no_shift`` (the control's state, SVAE+),
#: ``untrained_weights`` (the conditional VAE: the dosage column meets network weights never trained),
#: ``gene_features`` (the effect predicted from the target gene's features,
#: :class:`~pyrovae.models.effects.features.FeaturePrior`).
UNTRAINED_METHODS = ("grn_transfer", "prior_draw", "no_shift", "untrained_weights", "gene_features")


class EffectBlock(nn.Module):
    """Base class; the defaults describe a block without global sites."""

    #: rotate the latent basis when the mask freeze ends (``AdditiveEffect`` ``mask_rotation``)
    mask_rotation: bool = False
    #: the model's own Adam step size of its mask logits (``ModelConfig.masks.lr``;
    #: :func:`pyrovae.train.optim.param_groups`)
    mask_lr: float | None = None

    shift_dim: int = 0
    has_globals: bool = True

    def model_globals(self, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}

    def guide_globals(self, weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {}

    def prior_loc(self, d: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def shift(self, d: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def decoder_in_dim(self, n_latent: int) -> int:
        return n_latent

    def decoder_input(self, z: torch.Tensor, d: torch.Tensor, g: dict[str, torch.Tensor]) -> torch.Tensor:
        return z

    def untrained_fallback(
        self, g: dict[str, torch.Tensor], untrained: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Global draws for treatments without a training cell, after their rows were redrawn from the
        prior (``untrained`` (T,) bool). Blocks whose per-treatment values are parameters without a prior
        (SVAE+'s action mean) replace them here; the default keeps the prior draws."""
        return g

    def untrained_method(self, transfer: bool = True) -> str:
        """How a treatment with no training cell is predicted (one of :data:`UNTRAINED_METHODS`).

        ``"prior_draw"`` (the default): its rows are drawn from the prior, a random effect that carries no
        information about it. ``transfer=False`` asks for the method without :meth:`predict_untrained`'s
        transfer (what :meth:`~pyrovae.models.skeleton.PerturbationVAE.sample_globals` alone gives).
        """
        return "prior_draw"

    def predict_untrained(
        self,
        g: dict[str, torch.Tensor],
        untrained: torch.Tensor,
        seen: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Global draws for *predicting* treatments with no training cell (unseen perturbations).

        Args:
            g: draws of :meth:`~pyrovae.models.skeleton.PerturbationVAE.sample_globals` with
                ``untrained`` (untrained rows already drawn from the prior, then
                :meth:`untrained_fallback`), shapes (n, T, ...).
            untrained: (T,) bool, the rows to predict.
            seen: (T,) bool, rows trained on data that a transfer may learn from (default ``~untrained``).

        Returns:
            the draws with the untrained rows predicted as :meth:`untrained_method` says. The default keeps
            ``g`` (prior draws); GPO-VAE's block transfers effects through its GRN
            (:func:`~pyrovae.models.effects.unseen.grn_transfer`).
        """
        return g

    def effect_rows(self, g: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(..., T, shift_dim) per-treatment latent effect (for interpretation), if the block has one."""
        return None

    def check_dosage(self, d: torch.Tensor) -> None:
        """Raise a clear error if this block cannot handle the dosage matrix."""

    def check_treatments_per_cell(self, counts: np.ndarray | torch.Tensor) -> None:
        """Raise a clear error if this block cannot handle cells with ``counts`` (N,) treatments each (the
        data-wide form of :meth:`check_dosage`, computed without densifying a sparse dosage)."""

    def mask_probs(self) -> torch.Tensor | None:
        """(T, dim) q(m = 1) of the block's mask entries, detached; ``None`` for a block without masks."""
        return None

    def mask_logits(self) -> torch.Tensor | None:
        """(T, dim) logits of q(m = 1), detached, for a block whose q(M) is Bernoulli with free logits
        (SAMS-VAE, GPO-VAE: there the (T, T) GRN W); ``None`` otherwise."""
        return None

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """The block's parameters by optimiser role (:data:`~pyrovae.models.roles.PARAM_ROLES`,
        :func:`pyrovae.train.optim.param_groups`): network
        weights, variational parameters (and point-estimated per-treatment values), mask logits. The
        default: every parameter is a network weight."""
        return parameter_roles(self)

    def start_training(self, total_steps: int) -> None:
        """Called by the :class:`~pyrovae.train.trainer.Trainer` before its first step (and again on a resume)
        with the run's planned number of training steps (``max_epochs`` x batches per epoch, at most
        ``max_steps``): a block resolves step schedules given as fractions of the run here. Default: none."""

    def training_hooks(self) -> list[Any]:
        """Objects whose ``after_step(trainer)`` the :class:`~pyrovae.train.trainer.Trainer` calls after each
        optimiser step (schedules that change the model between steps, e.g. the sparse rotation). Default:
        none."""
        return []
