"""The q(E) families of :class:`~pyrovae.models.effects.additive.AdditiveEffect`, one small strategy object
each: which parameters the block creates for it, q(E | M)'s (loc, scale), the ``E`` site's distribution,
and how its free scales rotate with the latent basis.

The block owns the parameters (their names ``q_E_loc``, ``q_E_log_scale``, ``q_E_net`` are a checkpoint's
keys); a strategy is stateless and reads them from the block.

- ``mean_field``: q(M) q(E) factorised, q(e_t) = Normal(a_t, exp(b_t) + 1e-4) with free (T, K) a, b.
- ``correlated`` (the reference): q(M) q(E | M) with an MLP on [m_t, onehot(t)].
- ``spike_slab``: q(E | M) factorised over entries, q(e_tk | m_tk = 1) = Normal(a_tk, exp(b_tk) + 1e-4)
  (the slab, as CPA-VAE's q(E)) and q(e_tk | m_tk = 0) = p(e_tk), the prior (the spike: an entry that is
  off costs no KL; :class:`~pyrovae.models.distributions.SpikeSlabNormal`, Titsias & Lazaro-Gredilla
  2011). No network. A departure from the reference's guide family (the objective is the paper's): the
  reference's q(E | M) network must learn both states of every entry, and its off-state draws reach the
  straight-through mask gradient as noise.

A block without masks (CPA-VAE) has free parameters only, whatever the family: its q(E) is mean-field.
"""

from __future__ import annotations

import typing
from typing import Literal

import pyro.distributions as dist
import torch

from pyrovae.models.distributions import SpikeSlabNormal

__all__ = ["QEffect", "GUIDES", "guide_family"]


class QEffect:
    """One q(E) family (see the module docstring). Subclasses set the flags and override what differs."""

    name: str = ""
    #: free (T, K) parameters ``q_E_loc``, ``q_E_log_scale`` (always created for a block without masks)
    free: bool = True
    #: q(E | M)'s network ``q_E_net`` on [m_t, onehot(t)] (only for a block with masks)
    network: bool = False

    def normal(self, block, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) (..., T, K) of q(E | M = m) for masks ``m`` (..., T, K); default: the free ones."""
        return block.q_E_loc, block.q_E_log_scale.exp() + 1e-4

    def site(self, block, m: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        """The ``E`` site's distribution (batch (..., T), event (K,)) given masks ``m``."""
        return dist.Normal(loc, scale).to_event(1)


class MeanField(QEffect):
    name = "mean_field"


class Correlated(QEffect):
    name, free, network = "correlated", False, True

    def normal(self, block, m):
        # the MLP on [m_t, onehot(t)]: the one-hot block of its first layer is a row lookup
        return block.q_E_net.forward_parts([m, block.n_treatments])


class SpikeSlab(QEffect):
    name = "spike_slab"

    def site(self, block, m, loc, scale):
        return SpikeSlabNormal(m, loc, scale, block.embedding_prior_scale).to_event(1)


_FAMILIES = {f.name: f() for f in (MeanField, Correlated, SpikeSlab)}
#: q(E) families of :class:`~pyrovae.models.effects.additive.AdditiveEffect` (``correlated``: the
#: reference's; ``spike_slab``: a departure from the reference's guide family, the objective unchanged)
Guide = Literal["mean_field", "correlated", "spike_slab"]
GUIDES = typing.get_args(Guide)
assert set(GUIDES) == set(_FAMILIES), "every q(E) family is a Guide choice"


def guide_family(name: str) -> QEffect:
    """The q(E) family called ``name`` (one of :data:`GUIDES`)."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown guide {name!r}; use one of {GUIDES}")
    return _FAMILIES[name]
