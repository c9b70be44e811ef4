"""Perturbation-effect blocks: the only part that differs between model families.

A block owns the global (perturbation-plated) latent sites, their variational families, and how a cell's
dosage row d turns them into a latent shift. The skeleton (:mod:`pyrovae.models.skeleton`) calls:

- ``model_globals(weights)`` / ``guide_globals(weights)``: sample the global sites in the
  ``perturbations`` plate (size T), each row scaled by ``weights`` (T,) (see :func:`weighted_plate`);
  return a dict of samples, shapes (..., T, K) (a leading particle dim when particles are vectorised).
- ``prior_loc(d, g)``: prior mean of the cell latent (SVAE+), else ``None`` (standard normal).
- ``shift(d, g)``: the latent offset z_p, (..., B, shift_dim).
- ``decoder_input(z, d, g)``: what the decoder sees, (..., B, decoder_in_dim).
"""

from __future__ import annotations

from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrovae.models.distributions import StraightThroughBernoulli
from pyrovae.nn.mlp import GaussianMLP

PERTURBATION_PLATE = "perturbations"
#: how a treatment with no training cell is predicted (:meth:`EffectBlock.untrained_method`):
#: ``grn_transfer`` (GPO-VAE: mask row from the learned GRN, effect sizes from seen perturbations),
#: ``prior_draw`` (rows drawn from the prior: no information), ``no_shift`` (the control's state, SVAE+),
#: ``untrained_weights`` (the conditional VAE: the dosage column meets network weights never trained).
UNTRAINED_METHODS = ("grn_transfer", "prior_draw", "no_shift", "untrained_weights")
#: |logit| of a mask entry fixed by :meth:`AdditiveEffect.fix_masks` (q puts 6e-6 on the other value).
FIXED_MASK_LOGIT = 12.0


@contextmanager
def weighted_plate(name: str, size: int, weights: torch.Tensor | None):
    """A plate over global rows whose log-densities are scaled row-wise by ``weights``.

    Rows with weight 0 are masked out (Pyro forbids non-positive scales). ``weights=None``: unscaled.
    """
    with pyro.plate(name, size, dim=-1):
        if weights is None:
            yield
        else:
            with poutine.mask(mask=weights > 0), poutine.scale(scale=weights.clamp_min(1e-30)):
                yield


def _matmul_dosage(d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, T) @ (..., T, K) -> (..., B, K)."""
    return torch.matmul(d, rows)


class EffectBlock(nn.Module):
    """Base class; the defaults describe a block without global sites."""

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
            ``g`` (prior draws); GPO-VAE's block transfers effects through its GRN (:func:`grn_transfer`).
        """
        return g

    def effect_rows(self, g: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(..., T, shift_dim) per-treatment latent effect (for interpretation), if the block has one."""
        return None

    def check_dosage(self, d: torch.Tensor) -> None:
        """Raise a clear error if this block cannot handle the dosage matrix."""


class AdditiveEffect(EffectBlock):
    """z = z_basal (+) D (E * M): SAMS-VAE (masks), CPA-VAE (no masks), GPO-VAE (square, concatenated).

    Args:
        n_treatments: T.
        effect_dim: dimension of each treatment's effect row (K for SAMS/CPA; T for GPO).
        mask_prior: Bernoulli prior probability of a mask entry; ``None``: no masks (CPA-VAE).
        embedding_prior_scale: prior std of E.
        guide: ``"mean_field"``: q(M) q(E) factorised with free parameters; ``"correlated"``:
            q(M) q(E | M) with an MLP on [m_t, onehot(t)].
        compose: ``"add"``: decoder sees z_basal + z_p (needs effect_dim == n_latent);
            ``"concat"``: decoder sees [z_basal, z_p] (GPO-VAE).
        temperature: relaxation temperature of the straight-through mask estimator.
        mask_init_logits: initial q(M) logits (0: probability 0.5, as the reference).
    """

    def __init__(
        self,
        n_treatments: int,
        effect_dim: int,
        mask_prior: float | None = 0.01,
        embedding_prior_scale: float = 1.0,
        guide: str = "correlated",
        compose: str = "add",
        temperature: float = 1.0,
        mask_init_logits: float = 0.0,
        embedding_encoder_hidden: int = 200,
        embedding_encoder_layers: int = 2,
    ) -> None:
        super().__init__()
        if guide not in ("mean_field", "correlated"):
            raise ValueError(f"unknown guide {guide!r}; use 'mean_field' or 'correlated'")
        if compose not in ("add", "concat"):
            raise ValueError(f"unknown compose {compose!r}; use 'add' or 'concat'")
        if mask_prior is not None and not 0.0 < mask_prior < 1.0:
            raise ValueError(f"mask_prior must be in (0, 1), got {mask_prior}")
        self.n_treatments, self.shift_dim = n_treatments, effect_dim
        self.use_masks = mask_prior is not None
        self.guide_kind, self.compose = guide, compose
        self.register_buffer("mask_prior", torch.tensor(mask_prior if self.use_masks else 0.5))
        self.register_buffer("embedding_prior_scale", torch.tensor(float(embedding_prior_scale)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("eye", torch.eye(n_treatments))
        if self.use_masks:
            self.q_mask_logits = nn.Parameter(torch.full((n_treatments, effect_dim), float(mask_init_logits)))
        if guide == "mean_field" or not self.use_masks:
            self.q_E_loc = nn.Parameter(torch.zeros(n_treatments, effect_dim))
            self.q_E_log_scale = nn.Parameter(torch.zeros(n_treatments, effect_dim))
        else:
            self.q_E_net = GaussianMLP(
                effect_dim + n_treatments, effect_dim, embedding_encoder_hidden, embedding_encoder_layers
            )

    def model_globals(self, weights):
        T, K = self.n_treatments, self.shift_dim
        out = {}
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            if self.use_masks:
                out["mask"] = pyro.sample(
                    "mask", dist.Bernoulli(probs=self.mask_prior.expand(T, K)).to_event(1)
                )
            out["E"] = pyro.sample(
                "E",
                dist.Normal(
                    torch.zeros_like(self.eye[:, :1]).expand(T, K), self.embedding_prior_scale
                ).to_event(1),
            )
        return out

    def guide_globals(self, weights):
        T = self.n_treatments
        out = {}
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            if self.use_masks:
                out["mask"] = pyro.sample(
                    "mask",
                    StraightThroughBernoulli(self.temperature, logits=self.q_mask_logits).to_event(1),
                )
            if self.use_masks and self.guide_kind == "correlated":
                m = out["mask"]
                inp = torch.cat([m, self.eye.expand(m.shape[:-1] + (T,))], dim=-1)
                loc, scale = self.q_E_net(inp)
            else:
                loc, scale = self.q_E_loc, self.q_E_log_scale.exp() + 1e-4
            out["E"] = pyro.sample("E", dist.Normal(loc, scale).to_event(1))
        return out

    def effect_rows(self, g):
        return g["E"] * g["mask"] if self.use_masks else g["E"]

    @property
    def is_grn(self) -> bool:
        """True for GPO-VAE's square gene x gene effect space (masks, concatenated, effect_dim == T)."""
        return self.use_masks and self.compose == "concat" and self.shift_dim == self.n_treatments

    def untrained_method(self, transfer: bool = True) -> str:
        return "grn_transfer" if transfer and self.is_grn else "prior_draw"

    def predict_untrained(self, g, untrained, seen=None):
        """GPO-VAE: :func:`grn_transfer` of the untrained rows; other additive blocks keep the prior draws."""
        if not self.is_grn or not bool(untrained.any()):
            return g
        return grn_transfer(g, self.q_mask_logits, untrained, ~untrained if seen is None else seen)

    def fix_masks(self, masks: torch.Tensor) -> None:
        """Fix q(M) at known masks and stop training it (a control, e.g. a simulation's planted masks).

        q(m_tk) becomes Bernoulli(sigmoid(+-FIXED_MASK_LOGIT)), a point mass up to 6e-6, and
        ``q_mask_logits`` turns from a parameter into a buffer of the same name, so no optimiser sees it and
        a checkpoint keeps it (call this again after rebuilding a model to resume training it). The ELBO is
        unchanged: it still scores log p(M) - log q(M) at the fixed masks, so the run's ELBO is that of the
        given mask structure with everything else trained.

        Args:
            masks: (T, effect_dim) 0/1 masks, rows in this model's treatment order.
        """
        if not self.use_masks:
            raise ValueError("this effect block has no masks (CPA-VAE); fix_masks needs SAMS-VAE or GPO-VAE")
        old = self.q_mask_logits
        m = torch.as_tensor(masks)
        if tuple(m.shape) != tuple(old.shape):
            raise ValueError(
                f"masks have shape {tuple(m.shape)} but the model's masks are (T, K) = {tuple(old.shape)}; "
                "give one row per treatment (the model's order) and one column per latent dimension "
                "(n_latent must match the masks' width)"
            )
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("masks must be 0/1")
        logits = torch.where(m.to(old.device) > 0, FIXED_MASK_LOGIT, -FIXED_MASK_LOGIT).to(old.dtype)
        del self.q_mask_logits
        self.register_buffer("q_mask_logits", logits)

    def shift(self, d, g):
        return _matmul_dosage(d, self.effect_rows(g))

    def decoder_in_dim(self, n_latent: int) -> int:
        if self.compose == "add":
            if self.shift_dim != n_latent:
                raise ValueError("compose='add' needs effect_dim == n_latent")
            return n_latent
        return n_latent + self.shift_dim

    def decoder_input(self, z, d, g):
        zp = self.shift(d, g)
        if self.compose == "add":
            return z + zp
        return torch.cat([z, zp.expand(z.shape[:-1] + zp.shape[-1:])], dim=-1)


class BetaBernoulliActionEffect(EffectBlock):
    """SVAE+ (the SAMS-VAE authors' re-implementation after Lopez et al.; not the original sVAE).

    pi_tk ~ Beta(c1, c2), m_tk ~ Bernoulli(pi_tk), a learned action mean mu_t (a parameter, not a random
    variable); the cell latent z ~ N(d (M * mu), I) for one-hot d; the decoder sees z alone. Guide:
    q(pi) = Delta(sigmoid(lambda)) (a MAP estimate) and q(m | pi) = straight-through Bernoulli(pi), so the
    mask KL vanishes exactly and the pi term is the MAP penalty log Beta(pi; c1, c2).
    """

    shift_dim = 0

    def __init__(
        self,
        n_treatments: int,
        n_latent: int,
        beta_c1: float = 1.0,
        beta_c2: float = 2.0,
        temperature: float = 1.0,
        mask_init_logits: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_treatments, self.n_latent = n_treatments, n_latent
        self.register_buffer("c1", torch.tensor(float(beta_c1)))
        self.register_buffer("c2", torch.tensor(float(beta_c2)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.action_mean = nn.Parameter(0.1 * torch.randn(n_treatments, n_latent))
        self.q_mask_prob_logits = nn.Parameter(torch.full((n_treatments, n_latent), float(mask_init_logits)))

    def model_globals(self, weights):
        T, K = self.n_treatments, self.n_latent
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            pi = pyro.sample("mask_prob", dist.Beta(self.c1.expand(T, K), self.c2.expand(T, K)).to_event(1))
            m = pyro.sample("mask", dist.Bernoulli(probs=pi).to_event(1))
        return {"mask_prob": pi, "mask": m}

    def guide_globals(self, weights):
        T = self.n_treatments
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            pi = torch.sigmoid(self.q_mask_prob_logits).clamp(1e-6, 1 - 1e-6)
            pi = pyro.sample("mask_prob", dist.Delta(pi, event_dim=1))
            m = pyro.sample("mask", StraightThroughBernoulli(self.temperature, probs=pi).to_event(1))
        return {"mask_prob": pi, "mask": m}

    def check_dosage(self, d: torch.Tensor) -> None:
        if d.numel() and int((d != 0).sum(-1).max()) > 1:
            raise ValueError(
                "SVAE+ needs one-hot treatments (one perturbation per cell) but the data has combinations; "
                "load the data with encode_combos_as_unique=True (CLI: --encode-combos-as-unique)"
            )

    def effect_rows(self, g):
        return g["mask"] * self.action_mean

    def untrained_method(self, transfer: bool = True) -> str:
        return "no_shift"

    def untrained_fallback(self, g, untrained):
        # mu_t is a parameter with no prior, so an untrained treatment has no prior to fall back to and mu_t
        # would stay at its random initialisation; its masks are set to 0 instead, so the treatment gets
        # the control's prior N(0, I) (no shift).
        return {**g, "mask": torch.where(untrained.unsqueeze(-1), torch.zeros_like(g["mask"]), g["mask"])}

    def prior_loc(self, d, g):
        return _matmul_dosage(d, self.effect_rows(g))


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
    for unseen perturbations (its ``mask_test`` predicts them as controls, gpo_vae_cradle_vae.md §10.13).

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
