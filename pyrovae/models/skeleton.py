"""The one model skeleton every family shares: plates, the basal latent, the decoder, minibatch scaling.

Generative model (per cell i, given its dosage row d_i, library size l_i and covariates c_i)::

    g        ~ p(g)                      global sites of the effect block, plate "perturbations" (T)
    [A       ~ N(0, I)                   artifact rows, plate "qc_rows" (Q), CRADLE/GPO only]
    z_i      ~ N(prior_loc(d_i, g), I)   plate "cells" (N, subsampled to B)
    x_i      ~ p(x | decoder_input(z_i, d_i, g) [, q_i A] [, c_i], l_i)

Batch and categorical covariates (``batch["covariates"]``, (B, C) one-hot, C = the total number of
levels) enter the decoder and the basal encoder by concatenation, as in scVI: the basal state is then
read, and the expression generated, given the batch / cell line, so a replicate's shift is neither absorbed
into z_basal nor into the perturbation effects. Effects themselves are shared across levels (an additive
latent shift whose consequence in expression may differ by level through the decoder).

Guide: the effect block's q(g) [and q(A)], then q(z_i | norm(x_i), conditioning) where the conditioning is
``"x"`` (x alone), ``"x_shift"`` (x and the same particle's latent shift z_p = d_i (E * M), the setting of
every reported SAMS-VAE number) or ``"x_dosage"`` (x and d_i; conditional VAE).

Minibatch scaling: every call takes ``n_cells`` (N of the split) and the subsample positions ``idx``, so
Pyro scales local sites by N / B. Global rows are scaled by ``weights`` (T,):

- ``"per_treatment"`` (the reference): w_t = (N / B) * sum_{i in batch} 1[d_it != 0] / N_t, which is 1 in
  expectation over minibatches for a treatment with N_t > 0 training cells, and 0 for N_t = 0 (such
  treatments fall back to their prior at prediction time, see :meth:`PerturbationVAE.sample_globals`);
- ``"standard"``: w_t = 1 (every step pays the full global KL).

Both make the minibatch objective an unbiased estimate of the full-data ELBO. ``scale`` multiplies
everything (training uses 1/N, so losses are per-cell nats).

Shapes: with P vectorised particles, globals are (P, T, K), cell sites (P, B, K) and log p(x) (P, B).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyrovae.models.artifact import QC_PLATE, ArtifactBlock
from pyrovae.models.effects import EffectBlock
from pyrovae.models.plates import CELL_PLATE, PERTURBATION_PLATE
from pyrovae.models.roles import PARAM_ROLES
from pyrovae.nn.likelihoods import Decoder
from pyrovae.nn.mlp import GaussianMLP

CONDITIONINGS = ("x", "x_shift", "x_dosage")


def _sample_values(trace) -> dict[str, torch.Tensor]:
    """Values of the sample sites of a trace (plates excluded)."""
    return {
        k: s["value"] for k, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
    }


_ids = itertools.count()


class PerturbationVAE(nn.Module):
    """Pyro model/guide pair assembled from an effect block (and optionally an artifact block).

    Args:
        n_genes: G.
        n_treatments: T.
        n_latent: K, size of the basal latent.
        effect: the family's :class:`~pyrovae.models.effects.EffectBlock`.
        likelihood: ``"nb"``, ``"poisson"`` or ``"normal"``.
        conditioning: what the basal encoder sees besides x (see module docstring).
        norm_mean, norm_std: (G,) encoder input standardisation statistics (training split).
        norm_log: standardise log1p(x) (count data) rather than x.
        artifact: CRADLE-VAE quality-control block, or ``None``.
        n_covariates: C, width of the one-hot batch and covariates (``batch["covariates"]``); 0: none.
        size_factors: the library size is an external size factor (the decoder's softmax then has a
            category for the counts outside the modelled genes).
    """

    def __init__(
        self,
        n_genes: int,
        n_treatments: int,
        n_latent: int,
        effect: EffectBlock,
        likelihood: str = "nb",
        conditioning: str = "x_shift",
        decoder_hidden: int = 400,
        decoder_layers: int = 1,
        encoder_hidden: int = 400,
        encoder_layers: int = 1,
        norm_mean: torch.Tensor | None = None,
        norm_std: torch.Tensor | None = None,
        norm_log: bool = True,
        artifact: ArtifactBlock | None = None,
        n_covariates: int = 0,
        size_factors: bool = False,
    ) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown encoder conditioning {conditioning!r}; use one of {CONDITIONINGS}")
        if conditioning == "x_shift" and effect.shift_dim == 0:
            conditioning = "x"  # nothing to condition on (SVAE+ / conditional VAE)
        self.n_genes, self.n_treatments, self.n_latent = n_genes, n_treatments, n_latent
        self.effect, self.artifact, self.conditioning = effect, artifact, conditioning
        self.likelihood, self.norm_log = likelihood, norm_log
        self.register_buffer(
            "norm_mean", torch.zeros(n_genes) if norm_mean is None else torch.as_tensor(norm_mean)
        )
        self.register_buffer(
            "norm_std", torch.ones(n_genes) if norm_std is None else torch.as_tensor(norm_std)
        )
        art_dim = artifact.n_latent if artifact is not None else 0
        self.n_covariates, self.size_factors = int(n_covariates), bool(size_factors)
        self.decoder = Decoder(
            effect.decoder_in_dim(n_latent) + art_dim + self.n_covariates,
            n_genes,
            decoder_hidden,
            decoder_layers,
            likelihood,
            rest=self.size_factors,
        )
        extra = {"x": 0, "x_shift": effect.shift_dim, "x_dosage": n_treatments}[conditioning]
        self.encoder = GaussianMLP(
            n_genes + extra + art_dim + self.n_covariates, n_latent, encoder_hidden, encoder_layers
        )
        self._pyro_name = f"pyrovae{next(_ids)}"
        #: Extra loss terms that are not log-densities (GRN alignment, sparsity, counterfactual KL).
        self.penalties = nn.ModuleList()

    # ----------------------------------------------------------------------------------------- helpers
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G) encoder input: standardised log1p(x) (count data) or standardised x."""
        h = torch.log1p(x) if self.norm_log else x
        return (h - self.norm_mean) / self.norm_std

    def global_weights(
        self, batch: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], n_cells: int, mode: str
    ) -> dict[str, torch.Tensor | None]:
        """Per-row scales of the global plates for one minibatch (see module docstring).

        Args:
            counts: ``{"perturbations": N_t (T,), "qc_rows": N_r (Q,)}`` over the split.
            mode: ``"per_treatment"``, ``"standard"`` or ``"none"`` (globals not scored: weight 0).
        """
        out: dict[str, torch.Tensor | None] = {}
        members = {PERTURBATION_PLATE: batch["d"]}
        if self.artifact is not None:
            members[QC_PLATE] = batch["qc"]
        for name, mem in members.items():
            size = mem.shape[-1]
            if mode == "standard":
                out[name] = torch.ones(size, device=mem.device)
            elif mode == "none":
                out[name] = torch.zeros(size, device=mem.device)
            elif mode == "per_treatment":
                n_t = counts[name]
                inv = torch.where(n_t > 0, 1.0 / n_t.clamp_min(1.0), torch.zeros_like(n_t))
                out[name] = (n_cells / mem.shape[0]) * (mem != 0).float().sum(0) * inv
            else:
                raise ValueError(f"unknown global scaling {mode!r}")
        return out

    @contextlib.contextmanager
    def fixed_globals(self, guide: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> Iterator[None]:
        """Within the block, the guide's and the model's global parts return ``guide`` / ``model`` (what
        they returned when run conditioned on a draw) instead of running: a trace then holds the local
        sites only. Evaluation with globals drawn once (IWELBO) uses it so that q(E | M)'s network (a pass
        over all T rows) runs once per particle chunk, not once per batch; the local computations, and
        so the numbers, are the same."""
        self._fixed = {"guide": guide, "model": model}
        try:
            yield
        finally:
            self._fixed = None

    def run_globals(self, which: str) -> dict[str, torch.Tensor]:
        """The global part of the ``"guide"`` or the ``"model"`` alone (its sample sites, under the caller's
        plates and handlers); returns what it hands the local part."""
        return self._globals(which, None)

    def _globals(self, which: str, weights: dict[str, torch.Tensor | None] | None) -> dict[str, torch.Tensor]:
        fixed = getattr(self, "_fixed", None)
        if fixed is not None:
            return fixed[which]
        weights = weights or {}
        g = getattr(self.effect, f"{which}_globals")(weights.get(PERTURBATION_PLATE))
        if self.artifact is not None:
            g.update(getattr(self.artifact, f"{which}_globals")(weights.get(QC_PLATE)))
        return g

    def _artifact_input(self, batch: dict[str, torch.Tensor], g: dict[str, torch.Tensor], flip: bool = False):
        if self.artifact is None:
            return None
        qc = batch["qc"]
        return self.artifact.block(1.0 - qc if flip else qc, g)

    def encoder_dist(
        self,
        x: torch.Tensor,
        batch: dict[str, torch.Tensor],
        g: dict[str, torch.Tensor],
        flip_qc: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z | x, ...), shapes (..., B, K)."""
        parts = [self.normalize(x)]
        if self.conditioning == "x_shift":
            parts.append(self.effect.shift(batch["d"], g))
        elif self.conditioning == "x_dosage":
            parts.append(batch["d"])
        art = self._artifact_input(batch, g, flip_qc)
        if art is not None:
            parts.append(art)
        if self.n_covariates:
            parts.append(self.covariates(batch))
        # the encoder on cat(parts): x's block of the first layer runs once, not once per particle
        return self.encoder.forward_parts(parts)

    def decoder_dist(
        self, z: torch.Tensor, batch: dict[str, torch.Tensor], g: dict[str, torch.Tensor]
    ) -> dist.Distribution:
        """p(x | z, d, g[, qc]) with batch shape (..., B) and event (G,)."""
        return self.decoder(self.decoder_features(z, batch, g), batch.get("library_size"))

    def decoder_features(
        self, z: torch.Tensor, batch: dict[str, torch.Tensor], g: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """(..., B, D) what the decoder reads: the effect block's decoder input of z (B, K) [, the artifact
        block's input] [, the covariates]; its first K columns are the (shifted) latent for every family."""
        u = self.effect.decoder_input(z, batch["d"], g)
        art = self._artifact_input(batch, g)
        if art is not None:
            u = torch.cat([u, art.expand(u.shape[:-1] + art.shape[-1:])], dim=-1)
        if self.n_covariates:
            cov = self.covariates(batch)
            u = torch.cat([u, cov.expand(u.shape[:-1] + cov.shape[-1:])], dim=-1)
        return u

    def covariates(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(..., B, C) one-hot batch and covariates of the minibatch; an error naming the fix if absent."""
        cov = batch.get("covariates")
        if cov is None or cov.shape[-1] != self.n_covariates:
            got = None if cov is None else tuple(cov.shape)
            raise ValueError(
                f"this model was trained with {self.n_covariates} covariate levels (batch / covariates) but "
                f"the minibatch carries {got}; read the data with the run's batch_key / covariate_keys"
            )
        return cov

    # -------------------------------------------------------------------------------- model and guide
    def model(
        self,
        batch: dict[str, torch.Tensor],
        n_cells: int | None = None,
        weights: dict[str, torch.Tensor | None] | None = None,
        scale: float = 1.0,
    ) -> None:
        """Generative model. ``batch["x"]`` absent or ``None``: counts are sampled (prediction)."""
        pyro.module(self._pyro_name, self)
        d = batch["d"]
        self.effect.check_dosage(d)
        n_cells, idx = (n_cells, batch.get("idx")) if n_cells is not None else (d.shape[0], None)
        with poutine.scale(scale=scale):
            g = self._globals("model", weights)
            with pyro.plate(CELL_PLATE, n_cells, subsample=idx, dim=-1):
                loc = self.effect.prior_loc(d, g)
                if loc is None:
                    loc = d.new_zeros(d.shape[:-1] + (self.n_latent,))
                z = pyro.sample("z_basal", dist.Normal(loc, 1.0).to_event(1))
                pyro.sample("x", self.decoder_dist(z, batch, g), obs=batch.get("x"))

    def guide(
        self,
        batch: dict[str, torch.Tensor],
        n_cells: int | None = None,
        weights: dict[str, torch.Tensor | None] | None = None,
        scale: float = 1.0,
    ) -> None:
        """Variational family; needs ``batch["x"]`` (the encoder reads the cells)."""
        pyro.module(self._pyro_name, self)
        d = batch["d"]
        n_cells, idx = (n_cells, batch.get("idx")) if n_cells is not None else (d.shape[0], None)
        with poutine.scale(scale=scale):
            g = self._globals("guide", weights)
            with pyro.plate(CELL_PLATE, n_cells, subsample=idx, dim=-1):
                loc, sd = self.encoder_dist(batch["x"], batch, g)
                pyro.sample("z_basal", dist.Normal(loc, sd).to_event(1))

    def extra_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The penalties of this model for one minibatch, each in per-cell units (added to the loss)."""
        out: dict[str, torch.Tensor] = {}
        for penalty in self.penalties:
            out.update(penalty(self, batch))
        return out

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """The model's parameters by optimiser role (:data:`~pyrovae.models.roles.PARAM_ROLES`; the rules
        per role: :func:`pyrovae.train.optim.param_groups`): roles from the effect and artifact blocks'
        ``param_roles``; encoder, decoder and penalty parameters (absent here) are network weights."""
        roles: dict[str, list[nn.Parameter]] = {role: [] for role in PARAM_ROLES}
        for block in (self.effect, self.artifact):
            for role, params in (block.param_roles() if block is not None else {}).items():
                roles[role] += params
        return roles

    def draw_globals(self) -> dict[str, torch.Tensor]:
        """One differentiable draw of the global sites from the guide (shapes (T, ...)), for penalties."""
        with poutine.trace() as tr:
            self._globals("guide", None)
        return _sample_values(tr.trace)

    # ------------------------------------------------------------------------------ global posterior
    def global_site_names(self) -> list[str]:
        """Names of the global sample sites (those the guide samples outside the cells plate)."""
        with poutine.trace() as tr, pyro.plate("_p", 1, dim=-2):
            self._globals("guide", None)
        return list(_sample_values(tr.trace))

    @torch.no_grad()
    def sample_globals(
        self,
        n: int,
        untrained: torch.Tensor | None = None,
        source: str = "guide",
    ) -> dict[str, torch.Tensor]:
        """n draws of the global sites, shapes (n, T, ...) (and (n, Q, L) for artifact rows).

        Args:
            untrained: (T,) bool; these treatments' rows are drawn from the *prior* instead of q
                (treatments with no training cell carry no information in q); SVAE+, whose action mean
                has no prior, gives them no shift (see ``EffectBlock.untrained_fallback``).
            source: ``"guide"`` (posterior) or ``"prior"``.
        """
        which = "guide" if source == "guide" else "model"
        with poutine.trace() as tr, pyro.plate("_particles", n, dim=-2):
            self._globals(which, None)
        out = _sample_values(tr.trace)
        if source == "guide" and untrained is not None and bool(untrained.any()):
            with poutine.trace() as trp, pyro.plate("_particles", n, dim=-2):
                self._globals("model", None)
            for k in out:
                site = trp.trace.nodes.get(k)
                # only sites of the perturbation plate have one row per treatment (not e.g. qc_E)
                if site is None or PERTURBATION_PLATE not in {f.name for f in site["cond_indep_stack"]}:
                    continue
                rows = untrained.reshape((-1,) + (1,) * site["fn"].event_dim)  # (T,) at the plate's dim
                out[k] = torch.where(rows, site["value"], out[k])
            out = self.effect.untrained_fallback(out, untrained)
        return out

    def config(self) -> dict[str, Any]:
        return {"n_genes": self.n_genes, "n_treatments": self.n_treatments, "n_latent": self.n_latent}
