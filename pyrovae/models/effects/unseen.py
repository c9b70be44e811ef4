"""Prediction of unseen perturbations (no training cell) from a learned GRN: GPO-VAE's
:func:`grn_transfer`."""

from __future__ import annotations

import torch

__all__ = ["grn_transfer"]


@torch.no_grad()
def grn_transfer(
    g: dict[str, torch.Tensor],
    mask_logits: torch.Tensor,
    unseen: torch.Tensor,
    seen: torch.Tensor,
    self_effect: bool = True,
) -> dict[str, torch.Tensor]:
    """GPO-VAE's prediction of unseen perturbations from its GRN (W = ``mask_logits``, (T, T)).

    For an unseen perturbation of gene j (no training cell, so its E_j row got no ELBO signal):

    - mask row M_j ~ q(M_j) = Bernoulli(sigmoid(W_j)) (redrawn here): gene j's outgoing GRN edges, trained
      only through the K-hop terms of the GRN loss (paths t -> j -> k of seen perturbations t) and the
      sparsity penalty; with ``self_effect`` M_jj = 1 (a CRISPR perturbation acts on its own target gene);
    - effect row E_j, coordinate k: the mean of E_tk over the seen perturbations t whose (same-draw) masks
      reach both j and k (M_tj = M_tk = 1): how gene k's coordinate moves when a seen perturbation moves j
      and k together; where no seen perturbation reaches j and k, the mean of E_tk over seen t with
      M_tk = 1; where none acts on k, 0.

    Seen rows and rows in neither set are returned unchanged. Departure: the reference has no prediction
    for unseen perturbations (its ``mask_test`` zeroes their dosage, so they are predicted as controls).

    Args:
        g: global draws with ``mask`` and ``E`` of shape (n, T, T).
        unseen, seen: (T,) bool row sets (``seen`` minus ``unseen`` is used).

    Returns:
        a new dict with the ``mask`` and ``E`` rows of ``unseen`` replaced.
    """
    unseen = unseen.to(mask_logits.device).bool()
    seen = seen.to(mask_logits.device).bool() & ~unseen
    if not bool(unseen.any()):
        return g
    mask, E = g["mask"].clone(), g["E"].clone()
    u_idx, s_idx = torch.nonzero(unseen).reshape(-1), torch.nonzero(seen).reshape(-1)
    prob = torch.sigmoid(torch.nan_to_num(mask_logits[u_idx], nan=0.0))
    m_u = torch.bernoulli(prob.expand(mask.shape[0], *prob.shape))  # (n, U, T)
    if self_effect:
        m_u[:, torch.arange(len(u_idx)), u_idx] = 1.0
    ms, es = mask[:, s_idx], E[:, s_idx]  # (n, S, T)
    me = ms * es
    cnt_k = ms.sum(1, keepdim=True)  # (n, 1, T): seen rows acting on k
    fallback = torch.where(cnt_k > 0, me.sum(1, keepdim=True) / cnt_k.clamp_min(1.0), torch.zeros_like(cnt_k))
    reach = ms[:, :, u_idx].transpose(1, 2)  # (n, U, S): seen rows reaching j
    num, den = reach @ me, reach @ ms  # (n, U, T)
    E[:, u_idx] = torch.where(den > 0, num / den.clamp_min(1.0), fallback.expand_as(num))
    mask[:, u_idx] = m_u
    return {**g, "mask": mask, "E": E}
