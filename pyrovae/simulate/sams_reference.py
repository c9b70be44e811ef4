"""The SAMS-VAE reference simulator's regime: sparse latent shifts read out by a random LeakyReLU network.

the SAMS-VAE code's ``SAMSVAESimulationDataModule``, at a configurable size:

1. Masks ``m_t ~ Bernoulli(mask_prob)^K`` (>= 1 active entry per treatment; the reference allows none)
   and embeddings ``e_tk = +-|N(effect_mean, effect_sd)|`` (reference: K = 15, T = 100, p = 2/15, N(5, 0.5)).
2. ``z = z_b + m_t * e_t`` with ``z_b ~ N(0, I_K)``; one treatment per cell (one-hot dosage). Unlike the
   reference, which has no control group (its ATE "control" is treatment 0), ``n_control_cells`` cells
   get no shift (pyrovae's loaders need a control label).
3. Decoder: ``n_hidden_layers`` bias-free linear layers of ``n_hidden`` units with LeakyReLU(0.2), then a
   bias-free linear layer to ``G`` genes; every weight matrix is (semi-)orthogonal (QR of a Gaussian).
4. ``mean`` is divided by its per-gene sd (over all cells); ``x = mean + N(0, s^2)`` with
   ``s^2 = noise_frac / (1 - noise_frac)``, so noise makes up ``noise_frac`` of each gene's variance.

``X`` is continuous (train with ``likelihood="normal"``). Ground truth in ``uns["ground_truth"]`` (read by
:func:`pyrovae.simulate.ground_truth`): ``treatments``, ``masks``, ``embeddings``, ``latent_effects``,
``seed``, ``preset`` (``"sams_reference"``) and ``description``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pyrovae.simulate.config import CONTROL_LABEL, check_seed, numbered_names, seed_stream
from pyrovae.simulate.perturbseq import planted_mechanisms

__all__ = ["SamsReferenceConfig", "simulate_sams_reference"]

_LEAK = 0.2
_S_MECH, _S_DECODER, _S_CELLS = range(3)


@dataclass(frozen=True)
class SamsReferenceConfig:
    """Sizes of the reference-regime simulation (defaults: the ``default`` preset's K, T and mask rate,
    the reference's effect size, decoder and noise; 7,500 cells x 100 genes)."""

    n_genes: int = 100
    n_latent: int = 10
    n_treatments: int = 24
    cells_per_treatment: int = 300
    n_control_cells: int = 300
    mask_prob: float = 0.2
    effect_mean: float = 5.0
    effect_sd: float = 0.5
    n_hidden: int = 50
    n_hidden_layers: int = 4
    noise_frac: float = 0.2

    def __post_init__(self) -> None:
        for name in (
            "n_genes",
            "n_latent",
            "n_treatments",
            "cells_per_treatment",
            "n_control_cells",
            "n_hidden",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SamsReferenceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.n_hidden_layers) < 0:
            raise ValueError(f"SamsReferenceConfig.n_hidden_layers must be >= 0, got {self.n_hidden_layers}")
        if not 0.0 <= float(self.mask_prob) <= 1.0:
            raise ValueError(f"SamsReferenceConfig.mask_prob must be in [0, 1], got {self.mask_prob}")
        if not 0.0 < float(self.noise_frac) < 1.0:
            raise ValueError(f"SamsReferenceConfig.noise_frac must be in (0, 1), got {self.noise_frac}")
        if float(self.effect_sd) < 0:
            raise ValueError(f"SamsReferenceConfig.effect_sd must be >= 0, got {self.effect_sd}")


def _orthogonal(n_in: int, n_out: int, rng: np.random.Generator) -> np.ndarray:
    """(n_in, n_out) matrix with orthonormal rows or columns (whichever are fewer)."""
    q, r = np.linalg.qr(rng.normal(size=(max(n_in, n_out), min(n_in, n_out))))
    q = q * np.sign(np.diag(r))  # uniform (Haar) rather than QR-convention dependent
    return q if n_in >= n_out else q.T


def simulate_sams_reference(seed: int = 0, **overrides: Any) -> ad.AnnData:
    """Simulate the reference SAMS-VAE simulation's regime (see the module docstring).

    Args:
        seed: non-negative integer seed; the same seed and settings give identical output.
        **overrides: :class:`SamsReferenceConfig` fields, e.g. ``effect_mean=3``.

    Returns:
        AnnData ``(N, G)`` with float32 dense ``X`` (continuous), ``obs["perturbation"]`` (categorical:
        ``"control"``, ``"T01"`` ..), genes ``g001`` .., ``uns["ground_truth"]`` and
        ``uns["simulation_config"]``.
    """
    known = {f.name for f in fields(SamsReferenceConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown simulation setting(s) {unknown}; valid: {sorted(known)}")
    seed = check_seed(seed)
    cfg = SamsReferenceConfig(**overrides)
    K, T, G = cfg.n_latent, cfg.n_treatments, cfg.n_genes
    masks, embeddings = planted_mechanisms(
        T, K, cfg.mask_prob, cfg.effect_mean, cfg.effect_sd, seed_stream(seed, _S_MECH)
    )
    effects = masks * embeddings

    rng_dec = seed_stream(seed, _S_DECODER)
    widths = [K] + [cfg.n_hidden] * cfg.n_hidden_layers + [G]
    weights = [_orthogonal(a, b, rng_dec) for a, b in zip(widths[:-1], widths[1:])]

    rng = seed_stream(seed, _S_CELLS)
    group = np.concatenate(
        [np.full(cfg.n_control_cells, -1), np.repeat(np.arange(T), cfg.cells_per_treatment)]
    )
    group = rng.permutation(group)
    z = rng.normal(size=(len(group), K))
    treated = group >= 0
    z[treated] += effects[group[treated]]
    h = z
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = np.where(h > 0, h, _LEAK * h)
    sd = h.std(axis=0)
    mean = h / np.where(sd > 0, sd, 1.0)
    x = mean + rng.normal(size=mean.shape) * np.sqrt(cfg.noise_frac / (1.0 - cfg.noise_frac))

    names = numbered_names("T", T, 2)
    labels = np.array([CONTROL_LABEL] + names, dtype=object)[group + 1]
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(labels, categories=[CONTROL_LABEL] + names)},
        index=pd.Index([f"cell{i:0{len(str(len(group)))}d}" for i in range(len(group))]),
    )
    var = pd.DataFrame(index=pd.Index(numbered_names("g", G, 3)))
    truth = {
        "treatments": np.asarray(names, dtype=str),
        "masks": masks.astype(np.int8),
        "embeddings": embeddings.astype(np.float32),
        "latent_effects": effects.astype(np.float32),
        "seed": seed,
        "preset": "sams_reference",
        "description": __doc__,
    }
    return ad.AnnData(
        X=x.astype(np.float32),
        obs=obs,
        var=var,
        uns={"ground_truth": truth, "simulation_config": asdict(cfg)},
    )
