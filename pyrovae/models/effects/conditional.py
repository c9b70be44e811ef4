"""The conditional VAE's effect block: no global latents, the dosage concatenated to the decoder's input."""

from __future__ import annotations

import torch

from pyrovae.models.effects.base import EffectBlock

__all__ = ["ConcatDosageEffect"]


class ConcatDosageEffect(EffectBlock):
    """Conditional VAE: no global latents; the decoder sees [z, d] (and the encoder [x, d])."""

    has_globals = False

    def __init__(self, n_treatments: int) -> None:
        super().__init__()
        self.n_treatments = n_treatments

    def untrained_method(self, transfer: bool = True) -> str:
        # no global rows: an untrained dosage column reaches encoder and decoder weights that never saw it
        return "untrained_weights"

    def decoder_in_dim(self, n_latent: int) -> int:
        return n_latent + self.n_treatments

    def decoder_input(self, z, d, g):
        return torch.cat([z, d.expand(z.shape[:-1] + d.shape[-1:])], dim=-1)
