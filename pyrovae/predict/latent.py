"""Per-cell latent representations of a trained model (:meth:`pyrovae.Model.get_latent_representation`).

``basal``: z_basal, the cell's state with its perturbation's effect removed; ``shifted``: the perturbed latent
the decoder reads, z_basal + d (E * M). The posterior mean over global draws, or one draw whose cell noise is
keyed by the cell's name, so the same cell gets the same draw in any AnnData that holds it. Shapes: n
global draws, B cells per batch, K latent dimensions.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from pyrovae.data.loader import MinibatchLoader
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.predict.posterior import Posterior

__all__ = ["cell_noise", "latent_representation"]


def cell_noise(names: Sequence[str], seed: int, dim: int) -> np.ndarray:
    """(len(names), dim) standard normal noise keyed by (seed, obs name): the same cell, the same noise,
    whatever the order or the subset of the AnnData it comes in."""
    out = np.empty((len(names), dim), dtype=np.float32)
    for i, name in enumerate(names):
        out[i] = np.random.default_rng([int(seed), zlib.crc32(str(name).encode())]).standard_normal(dim)
    return out


@torch.no_grad()
def latent_representation(
    posterior: Posterior,
    data: PerturbationData,
    rows: np.ndarray,
    kind: str = "basal",
    give_mean: bool = True,
    n_samples: int = 25,
    batch_size: int = 256,
    seed: int = 0,
    name: str = "this model",
) -> np.ndarray:
    """(len(rows), K) latent representation of the cells ``rows`` of ``data`` (read with the run's schema).

    Args:
        kind: ``"basal"`` (for SVAE+, whose latent carries the shift in its prior mean, z minus that mean)
            or ``"shifted"`` (SAMS/CPA/CRADLE-VAE; SVAE+: z). GPO-VAE and the conditional VAE have no
            shifted latent of width K (ValueError).
        give_mean: the posterior mean E_q[z] = mean over ``n_samples`` global draws g of the encoder mean
            (exact in z given g); ``False``: one draw z ~ q(z | x, d, g) with one global draw g shared by
            all cells and cell noise keyed by obs name (:func:`cell_noise`).
        name: the model's name in the error messages.
    """
    vae = posterior.model
    if kind not in ("basal", "shifted"):
        raise ValueError(f"unknown kind {kind!r}; use 'basal' or 'shifted'")
    if kind == "shifted" and not (
        vae.effect.has_globals and vae.effect.decoder_in_dim(vae.n_latent) == vae.n_latent
    ):
        raise ValueError(
            f"{name} has no shifted latent of width n_latent (its decoder reads the latent "
            "concatenated with the perturbation's effect or dosage); use kind='basal'"
        )
    n = int(n_samples) if give_mean else 1
    g = {
        k: torch.as_tensor(v, device=posterior.device)
        for k, v in posterior.global_samples(n, seed).items()
        if k != "effect"
    }
    names = data.obs.index.to_numpy()[rows]
    out, start = [], 0
    for batch in MinibatchLoader(data, None, batch_size, indices=rows, device=posterior.device):
        loc, scale = vae.encoder_dist(batch["x"], batch, g)  # (n, B, K), or (B, K) without globals
        b = batch["d"].shape[0]
        cells, start = names[start : start + b], start + b  # the loader yields the rows in order
        if give_mean:
            z = loc
        else:
            eps = torch.as_tensor(cell_noise(cells, seed, vae.n_latent), device=posterior.device)
            z = loc + scale * eps
        if kind == "basal":
            prior = vae.effect.prior_loc(batch["d"], g) if g else None
            z = z if prior is None else z - prior
        else:
            z = vae.effect.decoder_input(z, batch["d"], g)
        out.append(z.reshape(-1, *z.shape[-2:]).mean(0))
    return torch.cat(out).cpu().numpy()
