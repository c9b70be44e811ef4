"""Held-out predictive IWELBO per cell (the SAMS-VAE paper's evaluation metric).

For the held-out cells i of a split, with K global particles g_k ~ q(g) drawn ONCE and shared by every
cell and batch (untrained treatments' rows from the prior)::

    z_ik  ~ q(z_basal | x_i, d_i, g_k)
    w_ik  = log p(x_i | z_ik, d_i, g_k, l_i) + log p(z_ik | d_i, g_k) - log q(z_ik | x_i, d_i, g_k)
    IWELBO_i = logsumexp_k w_ik - log K

**What it bounds.** By default the globals are *not* scored, so IWELBO_i is a lower bound on the
posterior-predictive log-likelihood under q, log E_{q(g)}[p(x_i | d_i, g)] (in expectation over the shared
draws, as K grows), **not** on the model evidence. With ``score_globals=True`` every w_ik gets
log p(g_k) - log q(g_k) (summed over all global rows, the untrained rows excluded since they are proposed
from the prior): a per-cell importance-weighted bound on the *prior*-predictive marginal likelihood
log E_{p(g)}[p(x_i | d_i, g)] (loose unless q(g) is close to the prior; with SVAE+'s point-mass q of the
mask probabilities it is a MAP-style score, not a bound).

Units: nats per cell, summed over genes. Because the K global draws are shared, per-cell values are
correlated and the mean over cells carries Monte Carlo noise from only K global draws:
:func:`iwelbo_over_seeds` reports its spread over evaluation seeds.

Memory is bounded by looping over cell batches and particle chunks with a running logsumexp. The basal
noise of each cell comes from a generator keyed by (seed, block of cells), so the result does not depend on
``batch_size`` or ``particle_chunk``: same seed, same numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine

from pyrovae.data.loader import MinibatchLoader
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.models.plates import PERTURBATION_PLATE
from pyrovae.models.skeleton import PerturbationVAE
from pyrovae.predict.posterior import rng_scope, split_rows

_NOISE_BLOCK = 256  # cells per block of basal noise (fixed, so results do not depend on batch_size)


class _CellNoise:
    """Standard normal noise (K particles, cells, latent) keyed by (seed, block of split positions)."""

    def __init__(self, seed: int, n_particles: int, dim: int, device) -> None:
        self.seed, self.n_particles, self.dim, self.device = int(seed), n_particles, dim, device
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _block(self, b: int) -> torch.Tensor:
        if b not in self._cache:
            state = np.random.SeedSequence([self.seed, 7919, b]).generate_state(1)[0]
            gen = torch.Generator().manual_seed(int(state))
            self._cache[b] = torch.randn(self.n_particles, _NOISE_BLOCK, self.dim, generator=gen)
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[b]

    def get(self, pos: np.ndarray) -> torch.Tensor:
        """(K, len(pos), dim) noise of the cells at split positions ``pos``."""
        blocks, offsets = np.divmod(np.asarray(pos, dtype=np.int64), _NOISE_BLOCK)
        out = torch.empty(self.n_particles, len(pos), self.dim)
        for b in np.unique(blocks):
            sel = np.flatnonzero(blocks == b)
            out[:, torch.as_tensor(sel)] = self._block(int(b))[:, torch.as_tensor(offsets[sel])]
        return out.to(self.device)


def _sample_nodes(trace) -> dict[str, dict[str, Any]]:
    return {k: s for k, s in trace.nodes.items() if s["type"] == "sample"}


def _global_log_weight(
    model_nodes: dict, guide_nodes: dict, names: Sequence[str], untrained: torch.Tensor | None
) -> torch.Tensor:
    """(P,) sum over global rows of log p(g) - log q(g) at the drawn values; untrained rows excluded."""
    total = 0.0
    for name in names:
        m, q = model_nodes[name], guide_nodes[name]
        lw = m["fn"].log_prob(m["value"]) - q["fn"].log_prob(q["value"])  # (P, rows)
        in_pert = any(f.name == PERTURBATION_PLATE for f in m["cond_indep_stack"])
        if in_pert and untrained is not None and bool(untrained.any()):
            lw = torch.where(untrained.to(lw.device), torch.zeros_like(lw), lw)
        total = total + lw.reshape(lw.shape[0], -1).sum(-1)
    return torch.as_tensor(total)


def _global_parts(model: PerturbationVAE, g: dict[str, torch.Tensor], P: int) -> tuple[dict, dict]:
    """What the guide's and the model's global parts return conditioned on the draw ``g`` (P, T, ...) of
    P particles (:meth:`~pyrovae.models.skeleton.PerturbationVAE.fixed_globals`)."""
    with pyro.plate("_particles", P, dim=-2):
        guide = poutine.condition(lambda: model.run_globals("guide"), data=g)()
        prior = poutine.condition(lambda: model.run_globals("model"), data=g)()
    return guide, prior


def _chunk_log_weights(
    model: PerturbationVAE,
    batch: dict[str, torch.Tensor],
    g: dict[str, torch.Tensor],
    eps: torch.Tensor,
    want_globals: bool,
    untrained: torch.Tensor | None,
    parts: tuple[dict, dict] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w (P, B) for one particle chunk with globals ``g`` (P, T, ...) and basal noise ``eps`` (P, B, K);
    plus the (P,) global log weight when ``want_globals``. ``parts``: :func:`_global_parts` of ``g``
    (then the global parts of the guide and model are not run again)."""
    P = eps.shape[0]
    fixed = (
        model.fixed_globals(*parts) if parts is not None and not want_globals else contextlib.nullcontext()
    )
    with pyro.plate("_particles", P, dim=-2), fixed:
        gtr = poutine.trace(poutine.condition(model.guide, data=g)).get_trace(batch)
        q_z = gtr.nodes["z_basal"]["fn"]
        base = q_z.base_dist if hasattr(q_z, "base_dist") else q_z
        z = base.loc.expand(eps.shape) + base.scale.expand(eps.shape) * eps
        mtr = poutine.trace(poutine.condition(model.model, data={**g, "z_basal": z})).get_trace(batch)
    w = mtr.nodes["x"]["fn"].log_prob(batch["x"]) + mtr.nodes["z_basal"]["fn"].log_prob(z) - q_z.log_prob(z)
    gw = None
    if want_globals:
        gw = _global_log_weight(_sample_nodes(mtr), _sample_nodes(gtr), list(g), untrained)
    return w, gw


@torch.no_grad()
def predictive_iwelbo(
    model: PerturbationVAE,
    data: PerturbationData,
    split: str | Sequence[int] | np.ndarray | None = "test",
    n_particles: int = 100,
    batch_size: int = 128,
    particle_chunk: int = 25,
    seed: int = 0,
    untrained: torch.Tensor | None = None,
    score_globals: bool = False,
    validate_args: bool = False,
    reuse_globals: bool = True,
) -> pd.DataFrame:
    """Per-cell held-out predictive IWELBO (see the module docstring for what it bounds).

    Args:
        model: a trained model (set to eval mode).
        data: data read with the model's schema (same genes and treatments).
        split: ``"train"``/``"val"``/``"test"``, ``None`` (every cell with a split) or row positions.
        n_particles: K, global particles (drawn once, shared across cells) and basal samples per cell.
        batch_size: cells per batch (memory: particle_chunk * batch_size * G).
        particle_chunk: particles per vectorised pass.
        seed: same seed, same numbers (independent of ``batch_size`` / ``particle_chunk``).
        untrained: (T,) bool, treatments whose rows are drawn from the prior (``run.untrained``);
            ``None``: every row from q.
        score_globals: add log p(g_k) - log q(g_k) to every weight (prior-predictive bound).
        validate_args: Pyro's and torch's checks (distribution arguments, supports, plate shapes) on every
            batch; ``False`` (default): on the first batch only, as set globally (``pyro.enable_validation``),
            and off for the others, as training does (:meth:`~pyrovae.train.trainer.Trainer.step_validation`).
            The numbers are the same; the checks took ~25 % of an IWELBO pass (bench/README.md).
        reuse_globals: run the guide's and the model's global parts (q(E | M)'s network over all T rows,
            the priors) once per particle chunk and reuse them for every batch (the same numbers); ``False``
            runs them for every batch (the former path: at T = 10,000 it dominated the pass).

    Returns:
        DataFrame indexed by obs names (row positions if absent) with columns ``iwelbo`` (nats per cell)
        and ``label``.
    """
    if n_particles < 1 or particle_chunk < 1:
        raise ValueError("n_particles and particle_chunk must be >= 1")
    rows = split_rows(data, split)
    device = next(iter(model.parameters())).device
    model.eval()
    if untrained is not None:
        untrained = torch.as_tensor(untrained, dtype=torch.bool, device=device)
    loader = MinibatchLoader(data, None, batch_size, indices=rows, device=device)
    K = int(n_particles)
    out = np.empty(len(rows), dtype=np.float64)
    with rng_scope(seed):
        g_all = model.sample_globals(K, untrained=untrained)
        noise = _CellNoise(seed, K, model.n_latent, device)
        global_w = torch.zeros(K, device=device) if score_globals else None
        first = True
        parts: dict[int, tuple[dict, dict]] = {}  # particle chunk start -> its global parts
        for batch in loader:
            pos = batch["idx"].cpu().numpy()
            eps_all = noise.get(pos)
            lse = torch.full((len(pos),), -math.inf, dtype=torch.float64, device=device)
            checks = contextlib.nullcontext() if validate_args or first else pyro.validation_enabled(False)
            with checks:
                for s in range(0, K, particle_chunk):
                    e = min(s + particle_chunk, K)
                    g = {k: v[s:e] for k, v in g_all.items()}
                    if reuse_globals and s not in parts:
                        parts[s] = _global_parts(model, g, e - s)
                    w, gw = _chunk_log_weights(
                        model, batch, g, eps_all[s:e], score_globals and first, untrained, parts.get(s)
                    )
                    if score_globals:
                        if first:
                            global_w[s:e] = gw
                        w = w + global_w[s:e, None]
                    lse = torch.logaddexp(lse, torch.logsumexp(w.double(), dim=0))
            first = False
            out[pos] = (lse - math.log(K)).cpu().numpy()
    index = data.obs.index[rows] if data.obs is not None and len(data.obs) == data.n_cells else rows
    return pd.DataFrame({"iwelbo": out, "label": data.labels[rows]}, index=pd.Index(index))


def iwelbo_over_seeds(
    model: PerturbationVAE,
    data: PerturbationData,
    split: str | Sequence[int] | np.ndarray | None = "test",
    seeds: Sequence[int] = (0, 1, 2),
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`predictive_iwelbo` for several evaluation seeds (to report the Monte Carlo spread).

    Returns:
        dict with ``mean`` (mean over seeds of the mean IWELBO per cell), ``std`` (their standard deviation
        over seeds, ddof=1; 0 for one seed), ``per_seed`` ({seed: mean IWELBO}), ``n_cells``,
        ``n_particles``, ``score_globals`` and ``cells``: a DataFrame with ``iwelbo`` (per-cell mean over
        seeds), ``label`` and one column ``iwelbo_seed<s>`` per seed.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("give at least one seed")
    frames = {s: predictive_iwelbo(model, data, split, seed=s, **kwargs) for s in seeds}
    means = np.array([float(f["iwelbo"].mean()) for f in frames.values()])
    first = frames[seeds[0]]
    cells = pd.DataFrame(
        {
            "iwelbo": np.mean([f["iwelbo"].to_numpy() for f in frames.values()], axis=0),
            "label": first["label"],
        },
        index=first.index,
    )
    for s, f in frames.items():
        cells[f"iwelbo_seed{s}"] = f["iwelbo"].to_numpy()
    return {
        "mean": float(means.mean()),
        "std": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
        "per_seed": {int(s): float(m) for s, m in zip(seeds, means)},
        "n_cells": int(len(first)),
        "n_particles": int(kwargs.get("n_particles", 100)),
        "score_globals": bool(kwargs.get("score_globals", False)),
        "cells": cells,
    }
