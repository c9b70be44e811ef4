"""Training, IWELBO and ATE throughput of every named model, side by side with a plain-torch SAMS-VAE.

Usage::

    OMP_NUM_THREADS=1 python bench/benchmark.py --out bench/results/replogle.csv      # the Replogle setting
    python bench/benchmark.py --quick --out /tmp/quick.csv                            # seconds: a smoke test

Configuration (``--size replogle``, the SAMS-VAE paper's Replogle setting): G = 1187 genes, T = 722
single-gene treatments, K = 100 latent dimensions, batch 512, 5 vectorised particles, encoder and decoder
one hidden layer of 400, the correlated guide's embedding encoder 2 x 200, library-size negative binomial.
The data are synthetic (Poisson counts, one treatment or control per cell, every treatment present): the
benchmark measures compute, not fit.

What is timed (medians over ``--steps`` steps after 2 warm-up steps; the implementations alternate step by
step in one process, so a load change on a shared machine hits them alike):

- ``pyro``: one :meth:`pyrovae.train.trainer.Trainer.train_step` (TraceGraph_ELBO loss and gradients,
  penalties, gradient clipping, Adam) of each named model on prepared minibatches;
- ``torch``: the same SAMS-VAE objective written here in plain torch (:func:`plain_sams_loss`: hand-written
  log-densities, the same networks and parameters, the same per-treatment global scaling, Adam and
  clipping), with the reference code's network inputs: the basal encoder on the concatenation
  [x, z_p] for every particle and the embedding encoder on [m_t, onehot(t)];
- ``torch_fused``: the same objective and draws, with the two first-layer shortcuts pyrovae's own
  networks take (:meth:`pyrovae.nn.mlp.ResidualMLP.forward_parts`): the x block of the encoder's first layer
  once per cell instead of once per particle, the one-hot block as a row lookup of the weight; and the
  negative binomial's log-domain form (:func:`nb_log_prob_log_domain`).
  ``pyro / torch_fused`` is Pyro's own overhead; ``pyro / torch`` the figure against a plain
  implementation of the reference's networks;
- ``pyro_before`` (with ``--before``): each model with pyrovae's speed paths switched off
  (:func:`plain_paths`: the code before they were added, the same function) and Pyro's validation on every
  step (the previous default), so ``vs_before`` is the speed-up of the cuts measured in the same process;
- ``pyro_prev`` (with ``--previous``): each model run as ``pyro`` but with the negative binomial's previous
  rate form (:func:`previous_paths`, main at d74d563), so ``vs_prev`` is the speed-up of the log-domain
  form (:class:`pyrovae.nn.likelihoods.GammaPoissonMean`) measured in the same process;
- ``pyro_validated`` (SAMS-VAE only): ``pyro`` with Pyro's and torch's validation on every step
  (``TrainConfig(validate_args=True)``); ``pyro`` runs as :meth:`~pyrovae.train.trainer.Trainer.fit` runs a
  step by default, validation on the Trainer's first step only (:meth:`Trainer.step_validation`).

Columns: ``cells_per_s`` (training throughput), ``step_ms``, ``step_iqr_ms`` (spread), ``vs_torch``
(cells/s over the plain-torch SAMS-VAE's), ``vs_fused`` (over ``torch_fused``'s: the same FLOPs, so Pyro's
own overhead), ``vs_before`` (over the same model's ``pyro_before``), ``vs_prev`` (over its ``pyro_prev``),
``gflop_step`` (matmul FLOPs of one step, forward and backward,
counted with :class:`torch.utils.flop_counter.FlopCounterMode`), ``mflop_cell``, ``gflops`` (achieved),
``frac_peak`` (of the fp32 matmul peak at this thread count: the best 1024^3 product timed at the start,
before every step and after every round, since a shared machine's load comes and goes),
``frac_peak_paired`` (the median over the timed steps of the step's GFLOP/s over the GFLOP/s of a 1024^3
product timed just before it: the fraction under the same load, which ``frac_peak`` understates on a
loaded machine),
``step_peak_mb`` (peak resident memory above the level before the step; CUDA: peak allocated),
``iwelbo_cells_per_s`` (:func:`pyrovae.predict.iwelbo.predictive_iwelbo`, 100 particles),
``ate_samples_per_s`` (:meth:`pyrovae.predict.posterior.Posterior.model_ate`, 2500 samples of 8
perturbations, in 10 calls of 250 samples; each call draws its global particles up to 256 at a time,
O(256 T K) memory), ``eval_peak_mb``. The plain-torch rows leave the
evaluation columns empty.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyro.distributions as dist  # noqa: E402

from pyrovae.data.anndata import PerturbationData, load_perturbation_data  # noqa: E402
from pyrovae.data.loader import MinibatchLoader  # noqa: E402
from pyrovae.models import penalties  # noqa: E402
from pyrovae.models.effects import additive, svae_plus  # noqa: E402
from pyrovae.models.skeleton import PerturbationVAE  # noqa: E402
from pyrovae.models.zoo import MODEL_ZOO, build_model, model_config  # noqa: E402
from pyrovae.nn import likelihoods  # noqa: E402
from pyrovae.nn.likelihoods import GammaPoissonMean  # noqa: E402
from pyrovae.nn.mlp import GaussianMLP  # noqa: E402
from pyrovae.predict.iwelbo import predictive_iwelbo  # noqa: E402
from pyrovae.predict.posterior import Posterior  # noqa: E402
from pyrovae.train.trainer import TrainConfig, Trainer, seed_everything, split_counts  # noqa: E402

#: benchmark sizes: the Replogle setting and a tiny one for the smoke test.
SIZES: dict[str, dict[str, int]] = {
    "replogle": dict(
        n_genes=1187,
        n_treatments=722,
        n_latent=100,
        batch_size=512,
        n_particles=5,
        hidden=400,
        emb_hidden=200,
        emb_layers=2,
        n_cells=4096,
        iwelbo_cells=256,
        iwelbo_particles=100,
        ate_samples=2500,
        ate_chunk=250,
        ate_perturbations=8,
    ),
    "quick": dict(
        n_genes=30,
        n_treatments=6,
        n_latent=4,
        batch_size=32,
        n_particles=2,
        hidden=16,
        emb_hidden=8,
        emb_layers=2,
        n_cells=256,
        iwelbo_cells=32,
        iwelbo_particles=10,
        ate_samples=40,
        ate_chunk=20,
        ate_perturbations=2,
    ),
}

COLUMNS = [
    "model",
    "impl",
    "cells_per_s",
    "step_ms",
    "step_iqr_ms",
    "vs_torch",
    "vs_fused",
    "vs_before",
    "vs_prev",
    "gflop_step",
    "mflop_cell",
    "gflops",
    "frac_peak",
    "frac_peak_paired",
    "step_peak_mb",
    "iwelbo_cells_per_s",
    "ate_samples_per_s",
    "eval_peak_mb",
]
#: columns left empty on the plain-torch rows (no evaluation there).
EVAL_COLUMNS = ("iwelbo_cells_per_s", "ate_samples_per_s", "eval_peak_mb")
#: columns that may be empty: the evaluation ones (on "pyro", "pyro_before" and "pyro_prev" rows only),
#: vs_before and vs_prev (filled with --before / --previous, on "pyro" rows)
OPTIONAL_COLUMNS = EVAL_COLUMNS + ("vs_before", "vs_prev")


# ------------------------------------------------------------------------------------------ data
def synthetic_data(n_cells: int, n_genes: int, n_treatments: int, seed: int = 0) -> PerturbationData:
    """Poisson counts, one treatment (or control, 10 %) per cell, every treatment on >= 1 cell, all cells
    in the training split; random CRADLE/GPO extras (``qc``, ``cfx``, ``has_cf``, ``delta_x`` and its label
    mean ``delta_x_group``)."""
    rng = np.random.default_rng(seed)
    names = [f"P{t:04d}" for t in range(n_treatments)]
    which = rng.integers(0, n_treatments + max(1, n_treatments // 9), size=n_cells)
    which[:n_treatments] = np.arange(n_treatments)
    which[n_treatments] = n_treatments  # at least one control
    labels = np.array([names[w] if w < n_treatments else "control" for w in which])
    gene_rate = rng.lognormal(-0.5, 1.0, size=n_genes)
    lib = rng.lognormal(0.0, 0.3, size=(n_cells, 1))
    x = rng.poisson(gene_rate * lib).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(x))
    a.obs_names = [f"c{i}" for i in range(n_cells)]
    a.var_names = [f"g{j}" for j in range(n_genes)]
    a.obs["perturbation"] = labels
    a.obs["split"] = "train"
    data = load_perturbation_data(a, split_key="split", control_label="control")
    data.extras["qc"] = (rng.random((n_cells, 1)) < 0.05).astype(np.float32)
    data.extras["cfx"] = x[rng.permutation(n_cells)]
    data.extras["has_cf"] = np.ones(n_cells, dtype=np.float32)
    data.extras["delta_x"] = np.abs(rng.normal(size=(n_cells, data.n_treatments))).astype(np.float32)
    # GPO-VAE's default target (grn_target="group"): each cell's label mean of delta_x
    codes, _ = pd.factorize(pd.Series(labels))
    sums = np.zeros((codes.max() + 1, data.n_treatments), dtype=np.float64)
    np.add.at(sums, codes, data.extras["delta_x"])
    group = sums / np.bincount(codes)[:, None]
    data.extras["delta_x_group"] = group[codes].astype(np.float32)
    return data


# ------------------------------------------------------------------------------------ plain torch
_LOG_2PI = math.log(2.0 * math.pi)


def normal_log_prob(x: torch.Tensor, loc: torch.Tensor | float, scale: torch.Tensor | float) -> torch.Tensor:
    """Elementwise log N(x; loc, scale^2)."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return -0.5 * ((x - loc) / scale) ** 2 - scale.log() - 0.5 * _LOG_2PI


def nb_log_prob(x: torch.Tensor, concentration: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Elementwise log NB(x) of the Gamma(concentration, rate)-Poisson mixture."""
    return (
        torch.lgamma(x + concentration)
        - torch.lgamma(concentration)
        - torch.lgamma(x + 1.0)
        + concentration * rate.log()
        - (x + concentration) * torch.log1p(rate)
    )


def nb_log_prob_log_domain(
    x: torch.Tensor, concentration: torch.Tensor, log_concentration: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    """:func:`nb_log_prob` at rate concentration / mean, the rate terms in the log domain."""
    post = x + concentration
    return (
        torch.lgamma(post)
        - torch.lgamma(concentration)
        - torch.lgamma(x + 1.0)
        + concentration * log_concentration
        + x * mean.log()
        - post * (mean + concentration).log()
    )


def _standard_normal(shape, like: torch.Tensor) -> torch.Tensor:
    # the call Pyro's Normal.rsample makes, so the same seed gives the same draws
    return torch.empty(shape, dtype=like.dtype, device=like.device).normal_()


def _concat_parts(net, parts: list):
    """``net.forward_parts(parts)`` the plain way: the MLP on the materialised concatenation."""
    return _mlp(net, parts, fused=False)


@contextlib.contextmanager
def plain_paths():
    """pyrovae with its speed paths switched off, i.e. the code before they were added: MLPs on
    materialised concatenations (no split first layer, one-hot blocks multiplied), dense dosage products,
    Pyro's GammaPoisson (lgamma on the particle-broadcast shape). The same function (tested in
    tests/models/test_fast_paths.py), so ``pyro_before`` rows measure the cuts in the same process.
    (It predates :func:`previous_paths`, so the negative binomial is Pyro's on the rate in either.)"""
    from unittest import mock

    with (
        mock.patch.object(GaussianMLP, "forward_parts", _concat_parts),
        mock.patch.object(additive, "matmul_dosage", torch.matmul),
        mock.patch.object(svae_plus, "matmul_dosage", torch.matmul),
        mock.patch.object(penalties, "matmul_dosage", torch.matmul),
        mock.patch.object(likelihoods, "GammaPoissonMean", pyro_gamma_poisson),
    ):
        yield


def pyro_gamma_poisson(concentration: torch.Tensor, mean: torch.Tensor) -> dist.GammaPoisson:
    """The decoder's negative binomial as Pyro's ``GammaPoisson`` (lgamma on the broadcast shape)."""
    rate = (concentration / mean).clamp(min=GammaPoissonMean.MIN_RATE)
    return dist.GammaPoisson(concentration, rate)


@contextlib.contextmanager
def previous_paths():
    """pyrovae as it was before the negative binomial's log-domain form (main at d74d563): the rate form
    lgamma terms on (B, G), theta log r - (theta + x) log1p(r) on (P, B, G) with r = clamp(theta / m)).
    The same function (tests/nn/test_likelihoods.py), so ``pyro_prev`` rows measure that cut."""
    from unittest import mock

    with mock.patch.object(GammaPoissonMean, "log_domain", False):
        yield


def _in(ctx, fn):
    def call(*args, **kw):
        with ctx():
            return fn(*args, **kw)

    return call


def _mlp(net, parts: list, fused: bool):
    """A pyrovae GaussianMLP / ResidualMLP on the concatenation of ``parts`` (ints: identity blocks)."""
    if fused:
        return net.forward_parts(parts)
    lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts if not isinstance(p, int)))
    rows = lead[-1]
    full = [
        torch.eye(p, device=parts[0].device).expand(lead + (p,))
        if isinstance(p, int)
        else p.expand(lead + p.shape[-1:])
        for p in parts
    ]
    assert all(f.shape[-2] == rows for f in full)
    return net(torch.cat(full, dim=-1))


def plain_sams_loss(
    model: PerturbationVAE,
    batch: dict[str, torch.Tensor],
    n_cells: int,
    n_t: torch.Tensor,
    n_particles: int,
    fused: bool = False,
) -> torch.Tensor:
    """The SAMS-VAE negative ELBO per cell of one minibatch in plain torch (P vectorised particles).

    The same estimator as ``TraceGraph_ELBO`` on :class:`PerturbationVAE` with the correlated guide (every
    site is reparameterised, so it is the plain reparameterised ELBO): per particle,
    sum_t w_t [log p(m_t) - log q(m_t) + log p(e_t) - log q(e_t | m_t)]
    + (N / B) sum_i [log p(x_i | z_i + d_i (E * M)) + log p(z_i) - log q(z_i | x_i, d_i (E * M))],
    with w_t = (N / B) #{i in batch: d_it != 0} / N_t, all divided by N; minus the mean over particles.
    Draws are made in Pyro's order (mask uniforms, E, z), so the same seed gives the same loss.
    """
    eff = model.effect
    d, x, lib = batch["d"], batch["x"], batch["library_size"]
    B, P = x.shape[0], n_particles
    T, K = eff.n_treatments, eff.shift_dim
    w = torch.where(
        n_t > 0, (n_cells / B) * (d != 0).float().sum(0) / n_t.clamp_min(1.0), torch.zeros_like(n_t)
    )
    # q(M): straight-through relaxed Bernoulli (hard values forward, the relaxed sample's gradient)
    logits = eff.q_mask_logits.expand(P, T, K)
    eps = torch.finfo(logits.dtype).eps
    probs = torch.sigmoid(logits).clamp(eps, 1 - eps)
    u = torch.rand(P, T, K, dtype=logits.dtype, device=logits.device).clamp(eps, 1 - eps)
    soft = torch.sigmoid((u.log() - (-u).log1p() + probs.log() - (-probs).log1p()) / eff.temperature)
    soft = soft.clamp(eps, 1 - eps)
    hard = torch.round(soft).detach()
    mask = hard + soft - soft.detach()
    log_q_m = (hard * logits - F.softplus(logits)).sum(-1)
    prior = eff.mask_prior
    log_p_m = (hard * prior.log() + (1 - hard) * torch.log1p(-prior)).sum(-1)
    # q(E | M): the embedding encoder on [m_t, onehot(t)]
    loc_e, scale_e = _mlp(eff.q_E_net, [mask, T], fused)
    e = loc_e + scale_e * _standard_normal(loc_e.shape, loc_e)
    log_q_e = normal_log_prob(e, loc_e, scale_e).sum(-1)
    log_p_e = normal_log_prob(e, 0.0, eff.embedding_prior_scale).sum(-1)
    glob = ((log_p_m - log_q_m + log_p_e - log_q_e) * w).sum(-1)  # (P,)
    # cells: q(z | x, z_p), p(x | z + z_p)
    zp = torch.matmul(d, e * mask)  # (P, B, K)
    loc_z, scale_z = _mlp(model.encoder, [model.normalize(x), zp], fused)
    z = loc_z + scale_z * _standard_normal(loc_z.shape, loc_z)
    log_q_z = normal_log_prob(z, loc_z, scale_z).sum(-1)
    log_p_z = normal_log_prob(z, 0.0, 1.0).sum(-1)
    dec = model.decoder
    mu = lib.unsqueeze(-1) * torch.softmax(dec.head(dec.trunk(z + zp)), dim=-1)
    theta = dec.log_theta.exp()
    if fused:  # the log-domain form pyrovae's GammaPoissonMean takes (the clamp is inactive at these sizes)
        log_p_x = nb_log_prob_log_domain(x, theta, dec.log_theta, mu + 1e-4).sum(-1)
    else:
        log_p_x = nb_log_prob(x, theta, (theta / (mu + 1e-4)).clamp(min=1e-6)).sum(-1)
    local = (log_p_x + log_p_z - log_q_z).sum(-1) * (n_cells / B)  # (P,)
    return -((glob + local) / n_cells).mean()


class PlainTorchSAMS:
    """A plain-torch SAMS-VAE training step on a pyrovae SAMS-VAE's networks (see :func:`plain_sams_loss`)."""

    def __init__(
        self, model: PerturbationVAE, cfg: TrainConfig, n_cells: int, n_t: torch.Tensor, fused: bool
    ):
        self.model, self.cfg, self.n_cells, self.n_t, self.fused = model, cfg, n_cells, n_t, fused
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = plain_sams_loss(self.model, batch, self.n_cells, self.n_t, self.cfg.n_particles, self.fused)
        loss.backward()
        if self.cfg.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.optimizer.step()
        return float(loss.detach())


# --------------------------------------------------------------------------------------- measuring
def matmul_peak_gflops(n: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """Best fp32 matmul throughput of an n x n x n product (GFLOP/s) at the current thread count."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rss_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def peak_memory(device, out: list):
    """Append the peak memory (MB) of the block above the level before it (CPU: resident set; CUDA:
    allocated)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        out.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    try:  # reset the high-water mark (Linux >= 4.0); else the peak is the process's so far
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss_mb("VmRSS")
    yield
    out.append(max(_rss_mb("VmHWM") - base, 0.0))


def count_flops(fn: Callable[[], object]) -> float:
    """Matmul FLOPs of one call (forward and backward) counted by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def timed(fn: Callable[[], object], device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


#: the implementations whose evaluation throughput is measured, with the code paths they run under
EVALUATED = {"pyro": contextlib.nullcontext, "pyro_before": plain_paths, "pyro_prev": previous_paths}


def run_benchmark(
    size: str = "replogle",
    models: list[str] | None = None,
    steps: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    seed: int = 0,
    eval_models: list[str] | None = None,
    log: Callable[[str], None] = print,
    before: bool = False,
    previous: bool = False,
) -> tuple[list[dict[str, float | str]], dict[str, float]]:
    """Measure every implementation; returns (rows with :data:`COLUMNS`, machine info).

    ``before``: also a ``pyro_before`` row per model, the same model run under :func:`plain_paths`;
    ``previous``: a ``pyro_prev`` row per model, run under :func:`previous_paths`.
    """
    s = SIZES[size]
    models = list(MODEL_ZOO) if models is None else models
    eval_models = models if eval_models is None else eval_models
    peak_n = 512 if size == "quick" else 1024
    peak = matmul_peak_gflops(peak_n, device=device)  # re-measured every round, the best kept (shared CPUs)
    data = synthetic_data(s["n_cells"], s["n_genes"], s["n_treatments"], seed)
    overrides = dict(
        n_latent=s["n_latent"],
        likelihood="nb",
        decoder_hidden=s["hidden"],
        encoder_hidden=s["hidden"],
        embedding_encoder_hidden=s["emb_hidden"],
        embedding_encoder_layers=s["emb_layers"],
    )
    tcfg = TrainConfig(batch_size=s["batch_size"], n_particles=s["n_particles"], device=device, seed=seed)
    seed_everything(seed)
    loader = MinibatchLoader(
        data, "train", s["batch_size"], shuffle=True, seed=seed, drop_last=True, device=device
    )
    t_load = time.perf_counter()
    batches = list(loader)
    loader_cells_per_s = len(batches) * s["batch_size"] / (time.perf_counter() - t_load)
    n = loader.n_cells

    impls: list[tuple[str, str, Callable[[dict], object], object]] = []
    trainers: dict[tuple[str, str], Trainer] = {}
    for name in models:
        variants = ("pyro",) + (("pyro_before",) if before else ()) + (("pyro_prev",) if previous else ())
        if name == "sams_vae_reference":
            variants += ("pyro_validated",)
        for impl in variants:
            model = build_model(
                model_config(name, **overrides),
                data.n_genes,
                data.n_treatments,
                data.norm_mean,
                data.norm_std,
                seed=seed,
            )
            trainer = Trainer(model, data, tcfg)
            counts = split_counts(model, data, "train", device)
            trainers[(name, impl)] = trainer
            step = lambda b, tr=trainer, c=counts: tr.train_step(b, n, c)  # noqa: E731
            if impl == "pyro_before":  # the code before the cuts: speed paths off, validation on every step
                step = _in(plain_paths, step)
            elif impl == "pyro":  # as Trainer.fit runs it: validation on the first step only (the default)
                step = _in(trainer.step_validation, step)
            elif impl == "pyro_prev":  # the previous code path, run as "pyro" is
                step = _in(previous_paths, _in(trainer.step_validation, step))
            impls.append((name, impl, step, model))
        if name == "sams_vae_reference":
            n_t = counts["perturbations"]
            for impl, fused in (("torch", False), ("torch_fused", True)):
                m2 = build_model(
                    model_config(name, **overrides),
                    data.n_genes,
                    data.n_treatments,
                    data.norm_mean,
                    data.norm_std,
                    seed=seed,
                ).to(device)
                plain = PlainTorchSAMS(m2, tcfg, n, n_t, fused)
                impls.append((name, impl, plain.train_step, m2))

    times: dict[tuple[str, str], list[float]] = {(m, i): [] for m, i, _, _ in impls}
    peaks: dict[tuple[str, str], list[float]] = {(m, i): [] for m, i, _, _ in impls}
    near_peaks: dict[tuple[str, str], list[float]] = {(m, i): [] for m, i, _, _ in impls}
    for r in range(warmup + steps):
        batch = batches[r % len(batches)]
        for mname, impl, step, _ in impls:  # alternate: every implementation once per round
            mem: list[float] = []
            near = matmul_peak_gflops(peak_n, repeats=1, device=device)  # the peak just before this step
            with peak_memory(device, mem):
                dt = timed(lambda f=step, b=batch: f(b), device)
            if r >= warmup:
                times[(mname, impl)].append(dt)
                peaks[(mname, impl)].append(mem[0])
                near_peaks[(mname, impl)].append(near)
            peak = max(peak, near)
        peak = max(peak, matmul_peak_gflops(peak_n, repeats=2, device=device))
        log(f"round {r + 1}/{warmup + steps} (matmul peak so far {peak:.1f} GFLOP/s)")

    rows: list[dict[str, float | str]] = []
    for mname, impl, step, _ in impls:
        t = np.asarray(times[(mname, impl)])
        med = float(np.median(t))
        flops = count_flops(lambda f=step: f(batches[0]))
        rows.append(
            {
                "model": mname,
                "impl": impl,
                "cells_per_s": s["batch_size"] / med,
                "step_ms": 1e3 * med,
                "step_iqr_ms": 1e3 * float(np.subtract(*np.percentile(t, [75, 25]))),
                "gflop_step": flops / 1e9,
                "mflop_cell": flops / s["batch_size"] / 1e6,
                "gflops": flops / med / 1e9,
                "frac_peak": flops / med / 1e9 / peak,
                "frac_peak_paired": float(np.median(flops / t / 1e9 / np.asarray(near_peaks[(mname, impl)]))),
                "step_peak_mb": float(np.max(peaks[(mname, impl)])),
            }
        )
    ref = next((r["cells_per_s"] for r in rows if r["impl"] == "torch"), None)
    ref_fused = next((r["cells_per_s"] for r in rows if r["impl"] == "torch_fused"), None)
    by_key = {(r["model"], r["impl"]): r for r in rows}
    for r in rows:
        r["vs_torch"] = r["cells_per_s"] / ref if ref else float("nan")
        r["vs_fused"] = r["cells_per_s"] / ref_fused if ref_fused else float("nan")
        old = by_key.get((r["model"], "pyro_before"))
        if r["impl"] == "pyro" and old is not None:
            r["vs_before"] = r["cells_per_s"] / old["cells_per_s"]
        prev = by_key.get((r["model"], "pyro_prev"))
        if r["impl"] == "pyro" and prev is not None:
            r["vs_prev"] = r["cells_per_s"] / prev["cells_per_s"]

    # evaluation throughput (Pyro models only)
    eval_rows = data.indices("train")[: s["iwelbo_cells"]]
    perts = list(data.treatments[: s["ate_perturbations"]])
    for r in rows:
        if r["impl"] not in EVALUATED or r["model"] not in eval_models:
            continue
        model = trainers[(r["model"], r["impl"])].model.eval()
        mem: list[float] = []
        paths = EVALUATED[r["impl"]]()
        with peak_memory(device, mem), paths:
            dt = timed(
                lambda m=model: predictive_iwelbo(
                    m, data, eval_rows, n_particles=s["iwelbo_particles"], batch_size=128, seed=seed
                ),
                device,
            )
            r["iwelbo_cells_per_s"] = len(eval_rows) / dt
            post = Posterior(model, data.schema())
            t_ate = 0.0
            for k, start in enumerate(range(0, s["ate_samples"], s["ate_chunk"])):
                chunk = min(s["ate_chunk"], s["ate_samples"] - start)
                t_ate += timed(
                    lambda c=chunk, k=k, post=post: post.model_ate(perts, n_samples=c, seed=seed + k), device
                )
            r["ate_samples_per_s"] = s["ate_samples"] / t_ate
        r["eval_peak_mb"] = mem[0]
        log(f"evaluated {r['model']} ({r['impl']})")
    info = {
        "peak_gflops": peak,
        "threads": torch.get_num_threads(),
        "device": device,
        "loader_cells_per_s": loader_cells_per_s,
        "n_cells": n,
    }
    return rows, info


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}"


def format_table(rows: list[dict], info: dict) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.rjust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in COLUMNS) for r in rows]
    lines.append(
        f"matmul peak {info['peak_gflops']:.1f} GFLOP/s, {info['threads']} thread(s), {info['device']}; "
        f"loader {info['loader_cells_per_s']:.0f} cells/s"
    )
    return "\n".join(lines)


def write_rows(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(
                {c: _fmt(r.get(c)) if not isinstance(r.get(c), float) else repr(r[c]) for c in COLUMNS}
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/benchmark.csv", help="CSV file to write")
    p.add_argument("--size", choices=sorted(SIZES), default="replogle")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 steps (smoke test)")
    p.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    p.add_argument("--eval-models", default=None, help="models whose IWELBO/ATE are measured (default: all)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--before", action="store_true", help="also each model with the speed paths off (pyro_before rows)"
    )
    p.add_argument(
        "--previous",
        action="store_true",
        help="also each model with the previous negative binomial (pyro_prev rows: main at d74d563)",
    )
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--steps and --threads must be >= 1 and --warmup >= 0")
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available on this machine")
    torch.set_num_threads(a.threads)
    size, steps = ("quick", min(a.steps, 2)) if a.quick else (a.size, a.steps)

    def split(v):
        return None if v is None else [m.strip() for m in v.split(",") if m.strip()]

    models = split(a.models)
    unknown = sorted(set(models or []) - set(MODEL_ZOO))
    if unknown:
        p.error(f"unknown model(s) {unknown}; available: {sorted(MODEL_ZOO)}")
    rows, info = run_benchmark(
        size,
        models,
        steps,
        a.warmup,
        a.device,
        a.seed,
        split(a.eval_models),
        log=lambda m: print(m, file=sys.stderr),
        before=a.before,
        previous=a.previous,
    )
    print(format_table(rows, info))
    write_rows(a.out, rows)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
