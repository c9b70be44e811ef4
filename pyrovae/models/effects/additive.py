"""The additive effect block: z = z_basal (+) D (E * M) (SAMS-VAE, CPA-VAE, GPO-VAE)."""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.models.distributions import HardenedBernoulli
from pyrovae.models.effects.base import EffectBlock
from pyrovae.models.effects.features import FeatureFitStep, FeaturePrior
from pyrovae.models.effects.guides import guide_family
from pyrovae.models.effects.unseen import grn_transfer
from pyrovae.models.mask_estimators import (
    BASELINE_PARAM,
    mask_site,
)
from pyrovae.models.options import MaskOptions
from pyrovae.models.plates import PERTURBATION_PLATE, matmul_dosage, weighted_plate
from pyrovae.models.roles import parameter_roles
from pyrovae.models.rotation import SparseRotationStep, rotate_heads, rotated_scales
from pyrovae.nn.mlp import GaussianMLP

__all__ = ["AdditiveEffect", "FIXED_MASK_LOGIT"]

#: ``|logit|`` of a mask entry fixed by :meth:`AdditiveEffect.fix_masks` (q puts 6e-6 on the other value).
FIXED_MASK_LOGIT = 12.0


class AdditiveEffect(EffectBlock):
    """z = z_basal (+) D (E * M): SAMS-VAE (masks), CPA-VAE (no masks), GPO-VAE (square, concatenated).

    Args:
        n_treatments: T.
        effect_dim: dimension of each treatment's effect row (K for SAMS/CPA; T for GPO).
        mask_prior: Bernoulli prior probability of a mask entry; ``None``: no masks (CPA-VAE).
        embedding_prior_scale: prior std of E.
        guide: the q(E) family (:mod:`pyrovae.models.effects.guides`): ``"mean_field"``, ``"correlated"``
            (the reference), ``"spike_slab"``.
        compose: ``"add"``: decoder sees z_basal + z_p (needs effect_dim == n_latent);
            ``"concat"``: decoder sees [z_basal, z_p] (GPO-VAE).
        masks: the masks' inference (:class:`~pyrovae.models.options.MaskOptions`; its ``prior`` and Beta
            parameters are not read here: ``mask_prior`` and the subclasses' own arguments are): the q(M)
            logits' start, the gradient estimator and its temperature schedule, the mask-KL warm-up, the
            freeze (``freeze_steps``, or ``freeze_fraction`` resolved to steps by :meth:`start_training`:
            max(1, floor(fraction x steps)), the Trainer calling it with ``max_epochs`` x batches per epoch,
            at most ``max_steps``; a resumed run keeps the value once its freeze has ended), the rotation and
            the logits' own Adam step size (``lr``; ``None``: the network's; the training setting
            ``TrainConfig.mask_lr`` overrides it; :func:`param_groups`). The freeze: the q(M) logits take no
            gradient during the first steps (they stay at their start while q(E | M), the encoder and the
            decoder learn); an optimisation schedule, not a change of the objective, meant for masks started
            on. The mask-KL warm-up scales the gradient of the mask KL term by beta = min(1, (s + 1) / n) at
            training step s (:func:`mask_kl_warmup_surrogate`; a departure from the objective while
            beta < 1). The rotation: once, when the freeze ends, the
            :class:`~pyrovae.train.trainer.Trainer` rotates the latent basis to the one in which
            :meth:`mean_effects` are sparsest (:func:`~pyrovae.models.rotation.sparsest_rotation`,
            :func:`~pyrovae.models.rotation.rotate_latent`): with the masks still on, the likelihood and
            priors cannot tell the bases apart, so this reparametrises the current iterate (exact in the
            means) and the masks are then pruned in a basis where most entries are small.
        n_gene_features: F > 0: effects predicted from gene features
            (:class:`~pyrovae.models.effects.features.FeaturePrior`, see there for the objective): the prior
            mean of row t of E is b + W^T x_t, the free means of q(E) (q(E | M)'s network's loc) are
            offsets from it, and a treatment with no training cell is predicted at it with every mask on
            (``untrained_method`` ``"gene_features"``, GPO-VAE included, instead of its GRN transfer).
            0: the prior mean is 0 (the papers' model).

    Mask estimators: :func:`pyrovae.models.mask_estimators.mask_site` (``straight_through``, the reference;
    ``score_function``, ``loo``, ``disarm``: unbiased; ``relaxed``: relaxed masks in the likelihood).
    """

    def __init__(
        self,
        n_treatments: int,
        effect_dim: int,
        mask_prior: float | None = 0.01,
        embedding_prior_scale: float = 1.0,
        guide: str = "correlated",
        compose: str = "add",
        masks: MaskOptions | None = None,
        embedding_encoder_hidden: int = 200,
        embedding_encoder_layers: int = 2,
        n_gene_features: int = 0,
    ) -> None:
        super().__init__()
        masks = MaskOptions() if masks is None else masks
        if masks.rotation and (not masks.freezes or compose != "add" or mask_prior is None):
            raise ValueError(
                "mask_rotation needs a mask freeze (mask_freeze_steps or mask_freeze_fraction > 0) and masks "
                "on an additive latent effect"
            )
        temperature, mask_init_logits = masks.temperature, masks.init_logits
        self.mask_estimator, self.mask_baseline_beta = masks.estimator, masks.baseline_beta
        self.temperature_final, self.temperature_anneal_steps = (
            masks.temperature_final,
            masks.temperature_anneal_steps,
        )
        self.mask_kl_warmup_steps = masks.kl_warmup_steps
        self.mask_freeze_steps, self.mask_freeze_fraction = masks.freeze_steps, masks.freeze_fraction
        self.mask_rotation, self.mask_lr = masks.rotation, masks.lr
        self._fresh_baseline = True
        if self.temperature_final is not None or self.mask_kl_warmup_steps or masks.freezes:
            # training steps taken (a buffer, so a resumed run continues the schedule)
            self.register_buffer("mask_step", torch.zeros((), dtype=torch.long))
        if self.mask_freeze_fraction:
            # the freeze's length in steps once resolved (0: not yet; a buffer, so a resumed run keeps it
            # even when it is resumed with more epochs)
            self.register_buffer("mask_freeze_resolved", torch.zeros((), dtype=torch.long))
        self.q_E = guide_family(guide)
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
        if self.q_E.free or not self.use_masks:
            # mean-field, spike-and-slab (the slab), CPA-VAE: q(E)'s free parameters
            self.q_E_loc = nn.Parameter(torch.zeros(n_treatments, effect_dim))
            self.q_E_log_scale = nn.Parameter(torch.zeros(n_treatments, effect_dim))
        if self.q_E.network and self.use_masks:
            self.q_E_net = GaussianMLP(
                effect_dim + n_treatments, effect_dim, embedding_encoder_hidden, embedding_encoder_layers
            )
        self.feature_prior = (
            FeaturePrior(n_treatments, n_gene_features, effect_dim, 3.0 * embedding_prior_scale)
            if n_gene_features
            else None
        )

    def score_feature_prior(self) -> None:
        """The model's log-prior of the gene-feature weights (if any): a global factor, called outside the
        perturbations plate so that no row weight scales it."""
        if self.feature_prior is not None:
            self.feature_prior.weight_log_prior()

    def prior_E_loc(self) -> torch.Tensor | None:
        """(T, K) prior mean of the effect rows (the gene-feature prediction), ``None`` for mean 0."""
        return None if self.feature_prior is None else self.feature_prior.loc()

    def model_globals(self, weights):
        T, K = self.n_treatments, self.shift_dim
        out = {}
        self.score_feature_prior()
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            if self.use_masks:
                out["mask"] = pyro.sample("mask", self._prior_mask(self.mask_prior.expand(T, K)))
            out["E"] = self._sample_p_E()
        return out

    def _sample_p_E(self) -> torch.Tensor:
        T, K = self.n_treatments, self.shift_dim
        loc = self.prior_E_loc()
        if loc is None:
            loc = torch.zeros_like(self.eye[:, :1]).expand(T, K)
        return pyro.sample("E", dist.Normal(loc, self.embedding_prior_scale).to_event(1))

    def guide_globals(self, weights):
        T = self.n_treatments
        out = {}
        with weighted_plate(PERTURBATION_PLATE, T, weights):
            if self.use_masks:
                out["mask"] = self._sample_q_mask(self.q_mask_logits)
            out["E"] = self._sample_q_E(out.get("mask"))
        return out

    def _q_E_normal(self, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(E | M = m) (..., T, K): the free parameters (mean-field, CPA-VAE, and the
        spike-and-slab guide's slab) or q(E | M)'s network on [m_t, onehot(t)] (with the free offsets)."""
        if m is None:
            loc, scale = self.q_E_loc, self.q_E_log_scale.exp() + 1e-4
        else:
            loc, scale = self.q_E.normal(self, m)
        return loc, scale

    def _sample_q_E(self, m: torch.Tensor | None) -> torch.Tensor:
        """q(E) (mean-field) or q(E | M) (correlated) inside the perturbations plate; (..., T, K)."""
        loc, scale = self._q_E_normal(m)
        if m is None:
            return pyro.sample("E", dist.Normal(loc, scale).to_event(1))
        return pyro.sample("E", self.q_E.site(self, m, loc, scale))

    def start_training(self, total_steps: int) -> None:
        """Resolve ``mask_freeze_fraction`` to ``mask_freeze_steps`` for a run of ``total_steps`` steps. A
        resumed run (the checkpoint holds the value) keeps the freeze it started with once that freeze has
        ended (so the rotation happens once); resumed before its end, it follows the new plan, ending no
        earlier than the next step."""
        if self.mask_freeze_fraction:
            resolved, step = int(self.mask_freeze_resolved), int(self.mask_step)
            if resolved == 0 or step < resolved:
                new = max(1, int(self.mask_freeze_fraction * int(total_steps)), step + 1)
                self.mask_freeze_resolved.fill_(new)
            self.mask_freeze_steps = int(self.mask_freeze_resolved)

    def training_hooks(self) -> list[Any]:
        hooks: list[Any] = [SparseRotationStep(self)] if self.mask_rotation else []
        if self.feature_prior is not None and hasattr(self, "q_E_loc"):
            hooks.append(FeatureFitStep(self))  # free q means: the exact (W, b) step
        return hooks

    # ------------------------------------------------------------------------------- mask estimators
    def current_temperature(self) -> torch.Tensor:
        """The relaxation temperature at the current training step (see ``temperature_final``)."""
        if self.temperature_final is None:
            return self.temperature
        frac = min(1.0, float(self.mask_step) / self.temperature_anneal_steps)
        return self.temperature * (self.temperature_final / self.temperature) ** frac

    def _prior_mask(self, probs: torch.Tensor) -> dist.Distribution:
        """p(m) with batch shape (T,) and event (K,); a relaxed mask is scored by its hard value."""
        fn = HardenedBernoulli if self.mask_estimator == "relaxed" else dist.Bernoulli
        return fn(probs=probs).to_event(1)

    def mask_kl_weight(self) -> float:
        """beta of the mask-KL warm-up at the current training step (1 without warm-up)."""
        if not self.mask_kl_warmup_steps:
            return 1.0
        return min(1.0, (float(self.mask_step) + 1.0) / self.mask_kl_warmup_steps)

    def masks_frozen(self) -> bool:
        """True while training within the first ``mask_freeze_steps`` steps (the q(M) logits take no
        gradient)."""
        if not self.mask_freeze_steps:
            return False  # (no read of the step buffer: no host sync per step on an accelerator)
        return self.training and torch.is_grad_enabled() and int(self.mask_step) < self.mask_freeze_steps

    def _sample_q_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The q(M) site (inside the perturbations plate) for this block's estimator; (..., T, K)."""
        training = self.training and torch.is_grad_enabled()
        tau, beta = self.current_temperature(), self.mask_kl_weight()
        if self.masks_frozen():
            logits = logits.detach()  # no gradient reaches the q(M) logits (mask_freeze_steps)
        if training and hasattr(self, "mask_step"):
            self.mask_step += 1
        baseline = None
        if self.mask_estimator == "score_function":
            baseline = {"use_decaying_avg_baseline": True, "baseline_beta": self.mask_baseline_beta}
            if training and self._fresh_baseline:
                # Pyro keeps the moving average in the global param store under the site's name: start
                # each model's training from zero (reproducible, and no stale shape from another model)
                store = pyro.get_param_store()
                if BASELINE_PARAM in store:
                    del store[BASELINE_PARAM]
                self._fresh_baseline = False
        fn, infer = mask_site(self.mask_estimator, logits, tau, beta, baseline)
        return pyro.sample("mask", fn.to_event(1), infer=infer)

    def effect_rows(self, g):
        return g["E"] * g["mask"] if self.use_masks else g["E"]

    def mask_probs(self) -> torch.Tensor | None:
        return torch.sigmoid(self.q_mask_logits.detach()) if self.use_masks else None

    def mask_logits(self) -> torch.Tensor | None:
        return self.q_mask_logits.detach() if self.use_masks else None

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        # q(E)'s free mean-field parameters are variational; q(E | M)'s network is a network; masks fixed by
        # fix_masks are a buffer, seen by no optimiser
        free_e = hasattr(self, "q_E_loc")
        # the gene-feature prior's (W, b) are point estimates with their own prior (W): no weight decay
        feat = [] if self.feature_prior is None else [self.feature_prior.weight, self.feature_prior.bias]
        return parameter_roles(
            self,
            variational=([self.q_E_loc, self.q_E_log_scale] if free_e else []) + feat,
            mask_logits=self.mask_role_parameters(),
        )

    @torch.no_grad()
    def mean_effects(self) -> torch.Tensor:
        """(T, K) the mean of q(E | M) with every mask on (of q(E) for CPA-VAE and the mean-field guide):
        the effect rows :func:`~pyrovae.models.rotation.sparsest_rotation` reads."""
        on = self.q_mask_logits.new_ones(self.n_treatments, self.shift_dim) if self.use_masks else None
        return self._q_E_normal(on)[0].detach().clone()

    @torch.no_grad()
    def rotate(self, R: torch.Tensor) -> list[nn.Parameter]:
        """Express q(E) in the latent basis z' = z @ R (called by
        :func:`~pyrovae.models.rotation.rotate_latent`); returns the parameters it changed. Means rotate
        exactly: E' = E @ R (the free means, and the loc head of q(E | M)'s network). Scales keep the
        rotated marginal variances (:func:`~pyrovae.models.rotation.rotated_scales`; on the network's
        log-variance head, the weighted mean of the old log variances). q(M) and the network's mask input
        are unchanged (see ``rotate_latent``)."""
        if self.compose != "add":
            raise ValueError("only an additive latent effect can be rotated (not GPO-VAE's GRN)")
        changed: list[nn.Parameter] = []
        if hasattr(self, "q_E_net"):
            changed += rotate_heads(self.q_E_net, R)
        if self.feature_prior is not None:  # mu' = mu R: the prior (isotropic) and W's prior are invariant
            fp = self.feature_prior
            fp.weight.copy_(fp.weight @ R.to(fp.weight))
            fp.bias.copy_(fp.bias @ R.to(fp.bias))
            changed += [fp.weight, fp.bias]
        if hasattr(self, "q_E_loc"):
            Rt = R.to(self.q_E_loc)
            self.q_E_loc.copy_(self.q_E_loc @ Rt)
            new = rotated_scales(self.q_E_log_scale.exp() + 1e-4, Rt)  # scale = exp(b) + 1e-4
            self.q_E_log_scale.copy_((new - 1e-4).clamp_min(1e-6).log())
            changed += [self.q_E_loc, self.q_E_log_scale]
        return changed

    def mask_role_parameters(self) -> list[nn.Parameter]:
        """The parameters that take the mask logits' optimiser settings (``mask_lr``): the q(M) logits
        unless there are none (CPA-VAE) or :meth:`fix_masks` made them a buffer."""
        logits = self.q_mask_logits if self.use_masks else None
        return [logits] if isinstance(logits, nn.Parameter) else []

    @property
    def is_grn(self) -> bool:
        """True for GPO-VAE's square gene x gene effect space (masks, concatenated, effect_dim == T)."""
        return self.use_masks and self.compose == "concat" and self.shift_dim == self.n_treatments

    def untrained_method(self, transfer: bool = True) -> str:
        if transfer and self.feature_prior is not None:
            return "gene_features"
        return "grn_transfer" if transfer and self.is_grn else "prior_draw"

    def predict_untrained(self, g, untrained, seen=None):
        """With gene features: the feature prediction of the untrained rows
        (:meth:`~pyrovae.models.effects.features.FeaturePrior.predict`, every block, GPO-VAE included).
        Without: GPO-VAE's :func:`~pyrovae.models.effects.unseen.grn_transfer`; other additive blocks keep
        the prior draws."""
        if not bool(untrained.any()):
            return g
        if self.feature_prior is not None:
            return self.feature_prior.predict(g, untrained)
        if not self.is_grn:
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
        return matmul_dosage(d, self.effect_rows(g))

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
