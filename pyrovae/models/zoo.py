"""Named models = the skeleton + an effect block + guide options. A model is data, not a class.

Defaults follow the reference papers and their code: SAMS-VAE mask prior 0.01, embedding prior 1,
q(M) logits initialised at 0, temperature 1, basal encoder conditioned on (x, z_p); GPO-VAE mask prior 0.3,
K = 5 hops, cf-KL weight 0.1. Layer sizes default to a small network suited to the simulated data; the
papers' sizes are in ``experiments/configs``.

Departure (SAMS-VAE's inference): ``sams_vae``, ``sams_vae_learned_sparsity``,
``sams_vae_beta_bernoulli`` and ``cradle_vae`` train with :data:`SAMS_INFERENCE` (the spike-and-slab
guide, masks started on, frozen for a quarter of the run's steps, the sparse rotation, the mask logits at
lr 0.02), ``sams_vae_mf`` with its schedule (:data:`SAMS_SCHEDULE`) on its own mean-field guide; the models
and objectives are unchanged. The reference's settings stay available as ``sams_vae_reference``,
``sams_vae_mf_reference``, ``sams_vae_beta_bernoulli_reference`` and ``cradle_vae_reference``. With the
reference's settings the masks stay undecided (most q(m) near their start) and the held-out ATE trails
CPA-VAE's; with these, each of them reaches CPA-VAE's held-out ATE with masks well above chance
(docs/models/sams_vae.md).

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

from pyrovae.config import check_range, coerce_value
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
from pyrovae.models.options import (
    MAX_WIDTH,
    SECTIONS,
    ArtifactOptions,
    GeneFeatureOptions,
    GRNOptions,
    MaskOptions,
    NetworkOptions,
)
from pyrovae.models.penalties import CounterfactualKL, GRNAlignment
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
ROTATABLE_FAMILIES = ("sams", "sams_beta_bernoulli", "sams_learned_sparsity")
#: the families whose effect rows can have a gene-feature prior (``gene_features``)
FEATURE_FAMILIES = ("sams", "sams_beta_bernoulli", "sams_learned_sparsity", "cpa", "gpo")


@dataclasses.dataclass
class ModelConfig:
    """Everything that defines a model (saved in a run's ``config.json``): the model's family, latent
    size, likelihood, q(E) family and conditioning, and five sections (:mod:`pyrovae.models.options`).

    Options are set by their flat key (``model_config("sams_vae", mask_lr=0.05)``,
    ``cfg.replace(n_latent=20, grn_weight=10)``, ``--set mask_lr=0.05``: :meth:`keys` lists them) and read
    from their section (``cfg.masks.lr``) or by key (:meth:`get`).

    Attributes:
        family: the effect block (:func:`build_effect`).
        n_latent: K, the latent size.
        likelihood: the observation model (``nb``, ``poisson``; ``normal`` for continuous data).
        guide: q(E)'s family (:mod:`pyrovae.models.effects.guides`): ``mean_field``, ``correlated`` (the
            reference) or ``spike_slab`` (q(e | m = 1) free, q(e | m = 0) the prior; a departure from the
            reference).
        conditioning: the basal encoder's input: the expression, with the latent shift, or with the dosage.
        embedding_prior_scale: the prior scale of the latent effects E.
        network, masks, grn, artifact, features: the sections.
    """

    family: Family = "sams"
    n_latent: int = 10
    likelihood: Likelihood = "nb"
    guide: Guide = "correlated"
    conditioning: Conditioning = "x_shift"
    embedding_prior_scale: float = 1.0
    network: NetworkOptions = dataclasses.field(default_factory=NetworkOptions)
    masks: MaskOptions = dataclasses.field(default_factory=MaskOptions)
    grn: GRNOptions = dataclasses.field(default_factory=GRNOptions)
    artifact: ArtifactOptions = dataclasses.field(default_factory=ArtifactOptions)
    features: GeneFeatureOptions = dataclasses.field(default_factory=GeneFeatureOptions)

    def __post_init__(self) -> None:
        for name in TOP_LEVEL:  # the typed choices (Literal): family, likelihood, guide, conditioning
            setattr(self, name, coerce_value(name, _HINTS[name], getattr(self, name)))
        for name, section in SECTIONS.items():
            if not isinstance(getattr(self, name), section):
                raise TypeError(f"ModelConfig.{name} must be a {section.__name__}; set options by key")
        check_range("n_latent", self.n_latent, ge=1, le=MAX_WIDTH)
        check_range("embedding_prior_scale", self.embedding_prior_scale, gt=0)
        if self.features.enabled and self.family not in FEATURE_FAMILIES:
            raise ValueError(
                f"gene_features={self.features.source!r} needs an additive effect block "
                f"{FEATURE_FAMILIES}, not family {self.family!r}; leave gene_features unset"
            )
        masks = self.masks
        if masks.rotation and (not masks.freezes or self.family not in ROTATABLE_FAMILIES):
            raise ValueError(
                "mask_rotation rotates the latent basis when the mask freeze ends (masks still on): set "
                "mask_freeze_fraction > 0 (or mask_freeze_steps > 0) and use a SAMS-VAE family "
                f"{ROTATABLE_FAMILIES}, not {self.family!r} with mask_freeze_steps={masks.freeze_steps}, "
                f"mask_freeze_fraction={masks.freeze_fraction}"
            )

    @staticmethod
    def keys() -> tuple[str, ...]:
        """Every option's flat key (the top-level fields', then each section's)."""
        return tuple(KEYS)

    def get(self, key: str) -> Any:
        """The value of the option ``key`` (a flat key, e.g. ``"mask_lr"``)."""
        if key not in KEYS:
            raise ValueError(f"unknown model option {key!r}; valid: {list(KEYS)}")
        section, name = KEYS[key]
        return getattr(self if section is None else getattr(self, section), name)

    def to_dict(self) -> dict[str, Any]:
        """{key: value} of every option (a run's ``config.json``; :meth:`from_stored` reads it back)."""
        return {key: self.get(key) for key in KEYS}

    def replace(self, **kw: Any) -> ModelConfig:
        """A copy with the options ``kw`` (flat keys) changed, every section checked again."""
        unknown = sorted(set(kw) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; valid: {list(KEYS)}")
        top: dict[str, Any] = {}
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in kw.items():
            section, name = KEYS[key]
            if section is None:
                top[name] = value
            else:
                by_section.setdefault(section, {})[name] = value
        for section, changes in by_section.items():
            top[section] = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **top)

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


#: ModelConfig's own options (not in a section); their keys are their names
TOP_LEVEL = ("family", "n_latent", "likelihood", "guide", "conditioning", "embedding_prior_scale")
_HINTS = typing.get_type_hints(ModelConfig)
#: {flat key: (section attribute or None, field name)} of every model option
KEYS: dict[str, tuple[str | None, str]] = {
    **{name: (None, name) for name in TOP_LEVEL},
    **{key: (section, name) for section, cls in SECTIONS.items() for name, key in cls.KEYS.items()},
}


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

#: SAMS-VAE's mask schedule (departures from the reference's inference, see the module docstring): masks
#: started on (q(m) = sigmoid(3) = 0.95) and frozen for the first quarter of the run's training steps while
#: the effects are learned, then the latent basis rotated to the sparsest orientation of the mean effects (a
#: reparametrisation), then the masks pruned at their own Adam step size 0.02.
SAMS_SCHEDULE: dict[str, Any] = {
    "mask_init_logits": 3.0,
    "mask_freeze_fraction": 0.25,
    "mask_rotation": True,
    "mask_lr": 0.02,
}
#: SAMS-VAE's inference in the named model ``sams_vae`` (the paper's model and objective, the fixed mask
#: prior): the spike-and-slab guide with :data:`SAMS_SCHEDULE`.
SAMS_INFERENCE: dict[str, Any] = {"guide": "spike_slab", **SAMS_SCHEDULE}

#: The named models of the two papers (``*_reference``: the reference's settings, kept for parity).
MODEL_ZOO: dict[str, dict[str, Any]] = {
    "sams_vae": {"family": "sams", **SAMS_INFERENCE},
    "sams_vae_reference": {"family": "sams", "guide": "correlated"},
    "sams_vae_mf": {"family": "sams", "guide": "mean_field", **SAMS_SCHEDULE},
    "sams_vae_mf_reference": {"family": "sams", "guide": "mean_field"},
    "sams_vae_beta_bernoulli": {"family": "sams_beta_bernoulli", **SAMS_INFERENCE},
    "sams_vae_beta_bernoulli_reference": {"family": "sams_beta_bernoulli", "guide": "correlated"},
    "sams_vae_learned_sparsity": {"family": "sams_learned_sparsity", **SAMS_INFERENCE},
    "cpa_vae": {"family": "cpa", "guide": "mean_field"},
    "svae_plus": {"family": "svae_plus", "conditioning": "x"},
    "conditional_vae": {"family": "conditional", "conditioning": "x_dosage"},
    "cradle_vae": {"family": "sams", "artifact": True, **SAMS_INFERENCE},
    "cradle_vae_reference": {"family": "sams", "guide": "correlated", "artifact": True},
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
    masks = cfg.masks
    common = dict(
        embedding_prior_scale=cfg.embedding_prior_scale,
        guide=cfg.guide,
        embedding_encoder_hidden=cfg.network.embedding_encoder_hidden,
        embedding_encoder_layers=cfg.network.embedding_encoder_layers,
        masks=masks,
    )
    if cfg.family in FEATURE_FAMILIES:
        common["n_gene_features"] = cfg.features.dim if cfg.features.enabled else 0
    if cfg.family == "sams":
        return AdditiveEffect(n_treatments, cfg.n_latent, mask_prior=masks.prior, compose="add", **common)
    if cfg.family in ("sams_beta_bernoulli", "sams_learned_sparsity"):
        if cfg.family == "sams_beta_bernoulli":  # Beta(c1, c2) on each entry's mask probability
            block, kw = BetaBernoulliMaskEffect, common
        else:  # Beta(c1, c2) on each treatment's prior level, which starts at mask_prior
            block, kw = LearnedSparsityMaskEffect, {"mask_prior": masks.prior, **common}
        return block(n_treatments, cfg.n_latent, masks.beta_c1, masks.beta_c2, compose="add", **kw)
    if cfg.family == "cpa":
        return AdditiveEffect(n_treatments, cfg.n_latent, mask_prior=None, compose="add", **common)
    if cfg.family == "gpo":
        return AdditiveEffect(n_treatments, n_treatments, mask_prior=masks.prior, compose="concat", **common)
    if cfg.family == "svae_plus":
        return BetaBernoulliActionEffect(
            n_treatments,
            cfg.n_latent,
            masks.beta_c1,
            masks.beta_c2,
            masks.temperature,
            masks.init_logits,
        )
    if cfg.family == "conditional":
        return ConcatDosageEffect(n_treatments)
    raise ValueError(f"unknown model family {cfg.family!r}")


def build_penalties(cfg: ModelConfig) -> list[torch.nn.Module]:
    """The loss terms of a config beyond the ELBO (:mod:`pyrovae.models.penalties`); none need data sizes."""
    out: list[torch.nn.Module] = []
    if cfg.artifact.enabled:
        out.append(CounterfactualKL(cfg.artifact.cf_weight))
    if cfg.family == "gpo":
        out.append(
            GRNAlignment(
                cfg.grn.weight,
                cfg.grn.threshold,
                cfg.grn.hops,
                cfg.grn.sparsity_weight,
                cfg.grn.target,
                cfg.grn.singles_only,
            )
        )
    return out


def data_requirements(cfg: ModelConfig) -> tuple[Requirement, ...]:
    """What a config's model reads from every minibatch beyond counts and dosage, gathered from the
    ``data_needs`` its components declare (artifact block, penalties; the effect blocks need nothing
    more), in the order :func:`pyrovae.data.prepare.prepare_data` supplies them."""
    parts: list[Any] = [ArtifactBlock] if cfg.artifact.enabled else []
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
    art = cfg.artifact
    artifact = ArtifactBlock(art.n_qc, cfg.n_latent, cfg.embedding_prior_scale) if art.enabled else None
    model = PerturbationVAE(
        n_genes,
        n_treatments,
        cfg.n_latent,
        build_effect(cfg, n_treatments),
        likelihood=cfg.likelihood,
        conditioning=cfg.conditioning,
        decoder_hidden=cfg.network.decoder_hidden,
        decoder_layers=cfg.network.decoder_layers,
        encoder_hidden=cfg.network.encoder_hidden,
        encoder_layers=cfg.network.encoder_layers,
        norm_mean=None if norm_mean is None else torch.as_tensor(np.asarray(norm_mean), dtype=torch.float32),
        norm_std=None if norm_std is None else torch.as_tensor(np.asarray(norm_std), dtype=torch.float32),
        norm_log=norm_log,
        artifact=artifact,
        n_covariates=n_covariates,
        size_factors=size_factors,
    )
    model.penalties.extend(build_penalties(cfg))
    return model
