"""Named models = the skeleton + an effect block + guide options. A model is data, not a class.

Defaults follow the reference papers and their code: SAMS-VAE mask prior 0.01, embedding prior 1,
q(M) logits initialised at 0, temperature 1, basal encoder conditioned on (x, z_p); GPO-VAE mask prior 0.3,
K = 5 hops, cf-KL weight 0.1. Layer sizes default to a small network suited to the simulated data; the
papers' sizes are in ``experiments/configs``.

Departure (SAMS-VAE's inference): ``sams_vae`` and ``sams_vae_learned_sparsity`` train with
:data:`SAMS_INFERENCE` (the spike-and-slab guide, masks started on, frozen for a quarter of the run's
steps, the sparse rotation, the mask logits at lr 0.02), the model and objective unchanged; the
reference's settings stay available as ``sams_vae_reference``. With the reference's settings the masks
stay undecided (most q(m) near their start) and the held-out ATE trails CPA-VAE's; with these, SAMS-VAE
reaches CPA-VAE's held-out ATE with masks well above chance (docs/models/sams_vae.md).

Departure (GPO-VAE): ``gpo_vae`` aligns its GRN W with the options of :data:`GPO_ALIGNMENT`, not the
reference's (every cell, per-cell ``|delta_x|``, GRN weight 100), which stay
available as ``gpo_vae_reference``. On planted GRNs of four shapes (chain, fork, collider, random DAG;
3 seeds each) the reference's W ranks direct edges no better than ``|differential expression|`` (paired
AUPRC difference within the seed spread on three of the four), GPO_ALIGNMENT's by +0.07 to +0.10 AUPRC,
more than the spread on all four (docs/findings.md, "GPO-VAE: direct edges against ``|DE|``").
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import numpy as np
import torch

from pyrovae.config import check_range, coerce_fields, replace_checked
from pyrovae.data.gene_features import GENE_FEATURE_SOURCES
from pyrovae.data.prepare import Requirement, ordered
from pyrovae.models.artifact import ArtifactBlock
from pyrovae.models.effects import (
    AdditiveEffect,
    BetaBernoulliActionEffect,
    BetaBernoulliMaskEffect,
    ConcatDosageEffect,
    EffectBlock,
    LearnedSparsityMaskEffect,
)
from pyrovae.models.effects.guides import Guide
from pyrovae.models.mask_estimators import MaskEstimator
from pyrovae.models.penalties import CounterfactualKL, GRNAlignment, GRNTarget
from pyrovae.models.skeleton import PerturbationVAE

#: model families (the effect blocks of :func:`build_effect`)
Family = Literal[
    "sams", "sams_beta_bernoulli", "sams_learned_sparsity", "cpa", "svae_plus", "conditional", "gpo"
]
FAMILIES = typing.get_args(Family)
Likelihood = Literal["nb", "poisson", "normal"]
#: the basal encoder's input: the expression, with the latent shift, or with the dosage row
Conditioning = Literal["x", "x_shift", "x_dosage"]
#: the families whose latent basis ``mask_rotation`` can rotate (masks on an additive latent effect)
#: the largest layer width / latent size / QC column count a config accepts (a layer holds width x genes
#: weights: 65536 x 20000 genes is 5 GB already; beyond it a typo like n_latent=10**12 would exhaust memory)
MAX_WIDTH = 65536
ROTATABLE_FAMILIES = ("sams", "sams_beta_bernoulli", "sams_learned_sparsity")
#: the families whose effect rows can have a gene-feature prior (``gene_features``)
FEATURE_FAMILIES = ("sams", "sams_beta_bernoulli", "sams_learned_sparsity", "cpa", "gpo")


@dataclasses.dataclass
class ModelConfig:
    """Everything that defines a model (saved in a run's ``config.json``)."""

    family: Family = "sams"
    n_latent: int = 10
    likelihood: Likelihood = "nb"
    # q(E) family: mean_field | correlated (reference) | spike_slab (q(e | m = 1) free, q(e | m = 0) the
    # prior; a departure from the reference), see pyrovae.models.effects.guides
    guide: Guide = "correlated"
    conditioning: Conditioning = "x_shift"
    mask_prior: float = 0.01
    embedding_prior_scale: float = 1.0
    temperature: float = 1.0
    mask_init_logits: float = 0.0
    # gradient estimator of the q(M) logits: straight_through (reference) | score_function | loo | relaxed
    # (see pyrovae.models.effects.AdditiveEffect); the temperature anneals to temperature_final if set
    mask_estimator: MaskEstimator = "straight_through"
    mask_baseline_beta: float = 0.9
    temperature_final: float | None = None
    temperature_anneal_steps: int = 1000
    # warm-up of the mask KL's gradient over this many steps (0: none, the reference; a departure while < 1)
    mask_kl_warmup_steps: int = 0
    # the q(M) logits take no gradient for this many first training steps (0: none, the reference)
    mask_freeze_steps: int = 0
    # ... or for this fraction of the run's training steps (max_epochs x batches per epoch, at most
    # max_steps), resolved by the Trainer (0: none); give one of the two
    mask_freeze_fraction: float = 0.0
    # when the freeze ends, rotate the latent basis to the one in which the mean effects are sparsest
    # (pyrovae.models.rotation; a reparametrisation of the iterate, the objective unchanged)
    mask_rotation: bool = False
    # Adam step size of the q(M) logits (None: the network's lr, the reference); TrainConfig.mask_lr, when
    # set, overrides it
    mask_lr: float | None = None
    decoder_hidden: int = 128
    decoder_layers: int = 1
    encoder_hidden: int = 128
    encoder_layers: int = 1
    embedding_encoder_hidden: int = 128
    embedding_encoder_layers: int = 2
    # Beta(c1, c2) prior of the mask probabilities: SVAE+, sams_beta_bernoulli; of the per-treatment mask
    # prior level: sams_learned_sparsity
    svae_beta_c1: float = 1.0
    svae_beta_c2: float = 2.0
    # CRADLE-VAE quality-control component
    artifact: bool = False
    n_qc: int = 1
    cf_weight: float = 0.1  # per-cell mean here, a batch sum in the reference (see CounterfactualKL)
    # GPO-VAE GRN-aligned optimisation
    grn_weight: float = 100.0
    grn_threshold: float = 0.5  # reference: 0.4 Adamson, 0.8 K562, 0.5 RPE1
    grn_hops: int = 5
    sparsity_weight: float = 1.0  # reference: 1 Adamson, 5 K562, 10 RPE1
    grn_target: GRNTarget = (
        "cell"  # reference: per-cell |delta_x|; "group": per-perturbation mean (GRNAlignment)
    )
    grn_singles_only: bool = False  # reference: align every cell; True: single-perturbation cells only
    # effects predicted from gene features (pyrovae.models.effects.features; SAMS-VAE, CPA-VAE, GPO-VAE):
    # None (off) | data (PCA of the training pseudobulk) | table (gene_features_file: gene x dimension)
    # | graph (gene_features_file: an edge list); gene_feature_dim: F (a table's width replaces it when
    # trained)
    gene_features: str | None = None
    gene_features_file: str | None = None
    gene_feature_dim: int = 10

    def __post_init__(self) -> None:
        coerce_fields(self)  # also the typed choices (Literal): family, likelihood, guide, ...
        check_range("mask_prior", self.mask_prior, gt=0, lt=1)
        for name in ("embedding_prior_scale", "temperature", "svae_beta_c1", "svae_beta_c2"):
            check_range(name, getattr(self, name), gt=0)
        for name in ("n_latent", "decoder_hidden", "encoder_hidden", "embedding_encoder_hidden", "n_qc"):
            check_range(name, getattr(self, name), ge=1, le=MAX_WIDTH)
        for name in ("decoder_layers", "encoder_layers", "embedding_encoder_layers", "grn_hops"):
            check_range(name, getattr(self, name), ge=0)
        for name in ("cf_weight", "grn_weight", "grn_threshold", "sparsity_weight"):
            check_range(name, getattr(self, name), ge=0)
        check_range("gene_features", self.gene_features, choices=GENE_FEATURE_SOURCES)
        check_range("gene_feature_dim", self.gene_feature_dim, ge=1, le=MAX_WIDTH)
        if self.gene_features is not None and self.family not in FEATURE_FAMILIES:
            raise ValueError(
                f"gene_features={self.gene_features!r} needs an additive effect block "
                f"{FEATURE_FAMILIES}, not family {self.family!r}; leave gene_features unset"
            )
        if self.gene_features in ("table", "graph") and not self.gene_features_file:
            raise ValueError(
                f"gene_features={self.gene_features!r} needs gene_features_file (CLI: "
                "--gene-features FILE or --gene-graph FILE)"
            )
        check_range("mask_init_logits", self.mask_init_logits)
        check_range("mask_baseline_beta", self.mask_baseline_beta, ge=0, lt=1)
        check_range("temperature_final", self.temperature_final, gt=0)
        check_range("temperature_anneal_steps", self.temperature_anneal_steps, ge=1)
        check_range("mask_kl_warmup_steps", self.mask_kl_warmup_steps, ge=0)
        check_range("mask_freeze_steps", self.mask_freeze_steps, ge=0)
        check_range("mask_freeze_fraction", self.mask_freeze_fraction, ge=0, lt=1)
        check_range("mask_lr", self.mask_lr, gt=0)
        if self.mask_freeze_steps and self.mask_freeze_fraction:
            raise ValueError(
                "give mask_freeze_steps (a number of steps) or mask_freeze_fraction (a fraction of the run's "
                f"steps), not both: got {self.mask_freeze_steps} and {self.mask_freeze_fraction}"
            )
        freezes = self.mask_freeze_steps > 0 or self.mask_freeze_fraction > 0
        if self.mask_rotation and (not freezes or self.family not in ROTATABLE_FAMILIES):
            raise ValueError(
                "mask_rotation rotates the latent basis when the mask freeze ends (masks still on): set "
                "mask_freeze_fraction > 0 (or mask_freeze_steps > 0) and use a SAMS-VAE family "
                f"{ROTATABLE_FAMILIES}, not {self.family!r} with mask_freeze_steps={self.mask_freeze_steps}, "
                f"mask_freeze_fraction={self.mask_freeze_fraction}"
            )

    def replace(self, **kw: Any) -> ModelConfig:
        return replace_checked(self, "model", **kw)

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> ModelConfig:
        """The config of a run's ``config.json`` (``"model"``), written by this or an older pyrovae.

        Options that were removed because they had one value left (:data:`REMOVED_OPTIONS`) are dropped
        when they hold it; a run that used another value cannot be rebuilt: one clear error.
        """
        kw = dict(stored)
        for name, (kept, why) in REMOVED_OPTIONS.items():
            if name not in kw:
                continue
            value = kw.pop(name)
            if value != kept:
                raise ValueError(
                    f"this run was trained with {name}={value!r}, an option removed in this version of "
                    f"pyrovae ({why}); retrain it, or read it with the pyrovae that wrote it"
                )
        return cls().replace(**kw)


#: options removed from :class:`ModelConfig`: {name: (the value every kept run has, why it was removed)};
#: the measurements stay in the documentation (findings)
REMOVED_OPTIONS: dict[str, tuple[Any, str]] = {
    "mask_baseline": ("decaying_avg", "the learned score-function baseline reduced no variance"),
    "grn_hop_norm": ("T", "the knock-down normalisation of the k-hop terms measured worse"),
}


#: GPO-VAE's GRN alignment in the named model ``gpo_vae`` (departures from the reference, see the module
#: docstring and :class:`~pyrovae.models.penalties.GRNAlignment`): align on single-perturbation cells only
#: (on a combination cell the reference fits S_a + S_b to delta_x - c, pulling both rows towards each
#: other's targets), to the per-perturbation ``|mean OT-paired difference|`` (pairing noise averaged out
#: before the absolute value), with a 10x GRN weight (the per-cell alignment is otherwise weak against the
#: ELBO).
GPO_ALIGNMENT: dict[str, Any] = {"grn_singles_only": True, "grn_target": "group", "grn_weight": 1000.0}

#: SAMS-VAE's inference in the named model ``sams_vae`` (the paper's model and objective, the fixed mask
#: prior; departures from the reference's inference, see the module docstring): the spike-and-slab guide,
#: masks started on (q(m) = sigmoid(3) = 0.95) and frozen for the first quarter of the run's training
#: steps while the effects are learned, then the latent basis rotated to the sparsest orientation of the
#: mean effects (a reparametrisation), then the masks pruned at their own Adam step size 0.02.
SAMS_INFERENCE: dict[str, Any] = {
    "guide": "spike_slab",
    "mask_init_logits": 3.0,
    "mask_freeze_fraction": 0.25,
    "mask_rotation": True,
    "mask_lr": 0.02,
}

#: The named models of the two papers (``*_reference``: the reference's settings, kept for parity).
MODEL_ZOO: dict[str, dict[str, Any]] = {
    "sams_vae": {"family": "sams", **SAMS_INFERENCE},
    "sams_vae_reference": {"family": "sams", "guide": "correlated"},
    "sams_vae_mf": {"family": "sams", "guide": "mean_field"},
    "sams_vae_beta_bernoulli": {"family": "sams_beta_bernoulli", "guide": "correlated"},
    "sams_vae_learned_sparsity": {"family": "sams_learned_sparsity", **SAMS_INFERENCE},
    "cpa_vae": {"family": "cpa", "guide": "mean_field"},
    "svae_plus": {"family": "svae_plus", "conditioning": "x"},
    "conditional_vae": {"family": "conditional", "conditioning": "x_dosage"},
    "cradle_vae": {"family": "sams", "guide": "correlated", "artifact": True},
    "gpo_vae": {"family": "gpo", "guide": "correlated", "mask_prior": 0.3, "artifact": True, **GPO_ALIGNMENT},
    "gpo_vae_reference": {"family": "gpo", "guide": "correlated", "mask_prior": 0.3, "artifact": True},
}

#: data options a named model needs unless the user set them
#: (:meth:`pyrovae.data.options.DataOptions.with_defaults`)
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "svae_plus": {"encode_combos_as_unique": True},  # SVAE+ models one action per distinct combination
}


def model_config(name: str, *, variant: bool = False, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a named model with overrides (``n_latent=...`` etc.).

    A named model's ``family`` and ``artifact`` cannot be overridden (that would train another model under
    its name) unless ``variant=True``: a study's own named variant built on this model's other settings
    (the experiment scripts' ``model_overrides``)."""
    if name not in MODEL_ZOO:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODEL_ZOO)}")
    base = MODEL_ZOO[name]
    # checked before the overrides are applied, so the refusal names the cause (not a later cross-field
    # check of the other family's options)
    fixed = [
        k
        for k in ("family", "artifact")
        if not variant and k in base and k in overrides and overrides[k] != base[k]
    ]
    if fixed:
        asked = {**base, **overrides}
        same = [m for m, d in MODEL_ZOO.items() if all(d.get(k) == asked[k] for k in fixed)]
        raise ValueError(
            f"{name} is {', '.join(f'{k}={base[k]!r}' for k in fixed)}: it cannot be changed "
            f"(that would train another model under the name {name}); choose that model instead "
            f"({', '.join(same) if same else 'see the model zoo'})"
        )
    cfg = ModelConfig().replace(**base).replace(**overrides)
    return cfg


def build_effect(cfg: ModelConfig, n_treatments: int) -> EffectBlock:
    """The effect block of a config."""
    common = dict(
        embedding_prior_scale=cfg.embedding_prior_scale,
        guide=cfg.guide,
        temperature=cfg.temperature,
        mask_init_logits=cfg.mask_init_logits,
        embedding_encoder_hidden=cfg.embedding_encoder_hidden,
        embedding_encoder_layers=cfg.embedding_encoder_layers,
        mask_estimator=cfg.mask_estimator,
        mask_baseline_beta=cfg.mask_baseline_beta,
        temperature_final=cfg.temperature_final,
        temperature_anneal_steps=cfg.temperature_anneal_steps,
        mask_kl_warmup_steps=cfg.mask_kl_warmup_steps,
        mask_freeze_steps=cfg.mask_freeze_steps,
        mask_rotation=cfg.mask_rotation,
        mask_freeze_fraction=cfg.mask_freeze_fraction,
        mask_lr=cfg.mask_lr,
    )
    if cfg.family in FEATURE_FAMILIES:
        common["n_gene_features"] = cfg.gene_feature_dim if cfg.gene_features is not None else 0
    if cfg.family == "sams":
        return AdditiveEffect(n_treatments, cfg.n_latent, mask_prior=cfg.mask_prior, compose="add", **common)
    if cfg.family in ("sams_beta_bernoulli", "sams_learned_sparsity"):
        if cfg.family == "sams_beta_bernoulli":  # Beta(c1, c2) on each entry's mask probability
            block, kw = BetaBernoulliMaskEffect, common
        else:  # Beta(c1, c2) on each treatment's prior level, which starts at mask_prior
            block, kw = LearnedSparsityMaskEffect, {"mask_prior": cfg.mask_prior, **common}
        return block(n_treatments, cfg.n_latent, cfg.svae_beta_c1, cfg.svae_beta_c2, compose="add", **kw)
    if cfg.family == "cpa":
        return AdditiveEffect(n_treatments, cfg.n_latent, mask_prior=None, compose="add", **common)
    if cfg.family == "gpo":
        return AdditiveEffect(
            n_treatments, n_treatments, mask_prior=cfg.mask_prior, compose="concat", **common
        )
    if cfg.family == "svae_plus":
        return BetaBernoulliActionEffect(
            n_treatments,
            cfg.n_latent,
            cfg.svae_beta_c1,
            cfg.svae_beta_c2,
            cfg.temperature,
            cfg.mask_init_logits,
        )
    if cfg.family == "conditional":
        return ConcatDosageEffect(n_treatments)
    raise ValueError(f"unknown model family {cfg.family!r}")


def build_penalties(cfg: ModelConfig) -> list[torch.nn.Module]:
    """The loss terms of a config beyond the ELBO (:mod:`pyrovae.models.penalties`); none need data sizes."""
    out: list[torch.nn.Module] = []
    if cfg.artifact:
        out.append(CounterfactualKL(cfg.cf_weight))
    if cfg.family == "gpo":
        out.append(
            GRNAlignment(
                cfg.grn_weight,
                cfg.grn_threshold,
                cfg.grn_hops,
                cfg.sparsity_weight,
                cfg.grn_target,
                cfg.grn_singles_only,
            )
        )
    return out


def data_requirements(cfg: ModelConfig) -> tuple[Requirement, ...]:
    """What a config's model reads from every minibatch beyond counts and dosage, gathered from the
    ``data_needs`` its components declare (artifact block, penalties; the effect blocks need nothing
    more), in the order :func:`pyrovae.data.prepare.prepare_data` supplies them."""
    parts: list[Any] = [ArtifactBlock] if cfg.artifact else []
    parts += build_penalties(cfg)
    return tuple(ordered(req for part in parts for req in part.data_needs))


def build_model(
    cfg: ModelConfig,
    n_genes: int,
    n_treatments: int,
    norm_mean: np.ndarray | torch.Tensor | None = None,
    norm_std: np.ndarray | torch.Tensor | None = None,
    norm_log: bool = True,
    seed: int | None = None,
    n_covariates: int = 0,
    size_factors: bool = False,
) -> PerturbationVAE:
    """Assemble the skeleton for a config; ``seed`` makes the parameter initialisation reproducible.

    ``n_covariates``: C, the width of the data's one-hot batch and covariates (0: none);
    ``size_factors``: the library size is an external size factor (the decoder then keeps a share of the
    counts outside the modelled genes, see :class:`~pyrovae.nn.likelihoods.Decoder`).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(
                cfg, n_genes, n_treatments, norm_mean, norm_std, norm_log, None, n_covariates, size_factors
            )
    if cfg.likelihood not in ("nb", "poisson", "normal"):
        raise ValueError(f"unknown likelihood {cfg.likelihood!r}; use 'nb', 'poisson' or 'normal'")
    artifact = ArtifactBlock(cfg.n_qc, cfg.n_latent, cfg.embedding_prior_scale) if cfg.artifact else None
    model = PerturbationVAE(
        n_genes,
        n_treatments,
        cfg.n_latent,
        build_effect(cfg, n_treatments),
        likelihood=cfg.likelihood,
        conditioning=cfg.conditioning,
        decoder_hidden=cfg.decoder_hidden,
        decoder_layers=cfg.decoder_layers,
        encoder_hidden=cfg.encoder_hidden,
        encoder_layers=cfg.encoder_layers,
        norm_mean=None if norm_mean is None else torch.as_tensor(np.asarray(norm_mean), dtype=torch.float32),
        norm_std=None if norm_std is None else torch.as_tensor(np.asarray(norm_std), dtype=torch.float32),
        norm_log=norm_log,
        artifact=artifact,
        n_covariates=n_covariates,
        size_factors=size_factors,
    )
    model.penalties.extend(build_penalties(cfg))
    return model
