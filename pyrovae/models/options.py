"""The sections of a model's configuration (:class:`~pyrovae.models.zoo.ModelConfig`).

A model's options come in sections, each a small dataclass that checks its own values once, when it is made
(or replaced): the networks' sizes (:class:`NetworkOptions`), the masks and their inference
(:class:`MaskOptions`), GPO-VAE's GRN alignment (:class:`GRNOptions`), CRADLE-VAE's quality-control
component (:class:`ArtifactOptions`) and the gene-feature prior of the effects (:class:`GeneFeatureOptions`).
Checks that join options of several sections (e.g. the rotation needs a family with masks) are
:class:`~pyrovae.models.zoo.ModelConfig`'s.

Every option also has one flat **key**, the name used on the command line (``--set mask_lr=0.02``), in YAML
files, in a run's ``config.json`` and in the error messages: a section's ``KEYS`` maps its fields to their
keys (``MaskOptions.lr`` is ``mask_lr``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from pyrovae.config import check_range, coerce_value
from pyrovae.data.gene_features import GeneFeatureSource
from pyrovae.models.mask_estimators import MaskEstimator
from pyrovae.models.penalties import GRNTarget

__all__ = [
    "MAX_WIDTH",
    "ArtifactOptions",
    "GeneFeatureOptions",
    "GRNOptions",
    "MaskOptions",
    "NetworkOptions",
    "SECTIONS",
]

#: the largest layer width / latent size / QC column count a config accepts (a layer holds width x genes
#: weights: 65536 x 20000 genes is 5 GB already; beyond it a typo like n_latent=10**12 would exhaust memory)
MAX_WIDTH = 65536


def coerce_section(obj: Any) -> None:
    """Coerce every field of the section ``obj`` to its annotated type, in place (errors name the key)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, coerce_value(obj.KEYS[f.name], hints[f.name], getattr(obj, f.name)))


@dataclasses.dataclass
class NetworkOptions:
    """Hidden widths and depths of the networks: the decoder, the basal encoder q(z | x, ...) and the
    correlated guide's perturbation-embedding network q(E | M)."""

    decoder_hidden: int = 128
    decoder_layers: int = 1
    encoder_hidden: int = 128
    encoder_layers: int = 1
    embedding_encoder_hidden: int = 128
    embedding_encoder_layers: int = 2

    KEYS: ClassVar[dict[str, str]] = {
        "decoder_hidden": "decoder_hidden",
        "decoder_layers": "decoder_layers",
        "encoder_hidden": "encoder_hidden",
        "encoder_layers": "encoder_layers",
        "embedding_encoder_hidden": "embedding_encoder_hidden",
        "embedding_encoder_layers": "embedding_encoder_layers",
    }

    def __post_init__(self) -> None:
        coerce_section(self)
        for name in ("decoder_hidden", "encoder_hidden", "embedding_encoder_hidden"):
            check_range(name, getattr(self, name), ge=1, le=MAX_WIDTH)
        for name in ("decoder_layers", "encoder_layers", "embedding_encoder_layers"):
            check_range(name, getattr(self, name), ge=0)


@dataclasses.dataclass
class MaskOptions:
    """The masks M (SAMS-VAE's families, GPO-VAE, SVAE+): their prior, q(M)'s start, gradient estimator and
    schedule.

    Attributes:
        prior: the fixed prior probability of a mask entry (SAMS-VAE's α; GPO-VAE's GRN prior); the learned
            per-treatment level's start for ``sams_learned_sparsity``.
        init_logits: the q(M) logits' start (0: q(m) = 0.5, the reference; 3: masks started on).
        estimator: the gradient estimator of the q(M) logits (:mod:`pyrovae.models.mask_estimators`).
        baseline_beta: the decaying-average baseline's decay (``estimator="score_function"``).
        temperature: the straight-through / relaxed Bernoulli temperature; it anneals to
            ``temperature_final`` (if set) over ``temperature_anneal_steps`` steps.
        kl_warmup_steps: warm-up of the mask KL's gradient over this many steps (0: none, the reference; a
            departure while < 1).
        freeze_steps: the q(M) logits take no gradient for this many first training steps (0: none) ...
        freeze_fraction: ... or for this fraction of the run's training steps (max_epochs x batches per
            epoch, at most max_steps), resolved by the trainer (0: none); give one of the two.
        rotation: when the freeze ends, rotate the latent basis to the one in which the mean effects are
            sparsest (:mod:`pyrovae.models.rotation`; a reparametrisation, the objective unchanged).
        lr: the Adam step size of the q(M) logits (``None``: the network's lr, the reference); the training
            setting ``TrainConfig.mask_lr``, when set, overrides it.
        beta_c1, beta_c2: the Beta(c1, c2) prior of the mask probabilities (SVAE+, ``sams_beta_bernoulli``)
            or of the per-treatment prior level (``sams_learned_sparsity``).
    """

    prior: float = 0.01
    init_logits: float = 0.0
    estimator: MaskEstimator = "straight_through"
    baseline_beta: float = 0.9
    temperature: float = 1.0
    temperature_final: float | None = None
    temperature_anneal_steps: int = 1000
    kl_warmup_steps: int = 0
    freeze_steps: int = 0
    freeze_fraction: float = 0.0
    rotation: bool = False
    lr: float | None = None
    beta_c1: float = 1.0
    beta_c2: float = 2.0

    KEYS: ClassVar[dict[str, str]] = {
        "prior": "mask_prior",
        "init_logits": "mask_init_logits",
        "estimator": "mask_estimator",
        "baseline_beta": "mask_baseline_beta",
        "temperature": "temperature",
        "temperature_final": "temperature_final",
        "temperature_anneal_steps": "temperature_anneal_steps",
        "kl_warmup_steps": "mask_kl_warmup_steps",
        "freeze_steps": "mask_freeze_steps",
        "freeze_fraction": "mask_freeze_fraction",
        "rotation": "mask_rotation",
        "lr": "mask_lr",
        "beta_c1": "svae_beta_c1",
        "beta_c2": "svae_beta_c2",
    }

    def __post_init__(self) -> None:
        coerce_section(self)
        key = self.KEYS
        check_range(key["prior"], self.prior, gt=0, lt=1)
        for name in ("temperature", "beta_c1", "beta_c2"):
            check_range(key[name], getattr(self, name), gt=0)
        check_range(key["init_logits"], self.init_logits)
        check_range(key["baseline_beta"], self.baseline_beta, ge=0, lt=1)
        check_range(key["temperature_final"], self.temperature_final, gt=0)
        check_range(key["temperature_anneal_steps"], self.temperature_anneal_steps, ge=1)
        check_range(key["kl_warmup_steps"], self.kl_warmup_steps, ge=0)
        check_range(key["freeze_steps"], self.freeze_steps, ge=0)
        check_range(key["freeze_fraction"], self.freeze_fraction, ge=0, lt=1)
        check_range(key["lr"], self.lr, gt=0)
        if self.freeze_steps and self.freeze_fraction:
            raise ValueError(
                "give mask_freeze_steps (a number of steps) or mask_freeze_fraction (a fraction of the run's "
                f"steps), not both: got {self.freeze_steps} and {self.freeze_fraction}"
            )
        if self.kl_warmup_steps and self.estimator not in ("straight_through", "relaxed"):
            raise ValueError(
                "mask_kl_warmup_steps works with mask_estimator 'straight_through' or 'relaxed' (the score-"
                f"function estimators weight the mask KL inside their costs), not {self.estimator!r}"
            )

    @property
    def freezes(self) -> bool:
        """Whether the q(M) logits are frozen for the first steps of training."""
        return self.freeze_steps > 0 or self.freeze_fraction > 0


@dataclasses.dataclass
class GRNOptions:
    """GPO-VAE's GRN-aligned optimisation (:class:`~pyrovae.models.penalties.GRNAlignment`).

    Attributes:
        weight: the alignment term's weight.
        threshold: the alignment target's threshold (reference: 0.4 Adamson, 0.8 K562, 0.5 RPE1).
        hops: K, the number of k-hop terms.
        sparsity_weight: the GRN's L1 weight (reference: 1 Adamson, 5 K562, 10 RPE1).
        target: ``"cell"`` (the reference: per-cell ``|delta_x|``) or ``"group"`` (the per-perturbation
            ``|mean delta_x|``).
        singles_only: align on single-perturbation cells only (the reference: every cell).
    """

    weight: float = 100.0
    threshold: float = 0.5
    hops: int = 5
    sparsity_weight: float = 1.0
    target: GRNTarget = "cell"
    singles_only: bool = False

    KEYS: ClassVar[dict[str, str]] = {
        "weight": "grn_weight",
        "threshold": "grn_threshold",
        "hops": "grn_hops",
        "sparsity_weight": "sparsity_weight",
        "target": "grn_target",
        "singles_only": "grn_singles_only",
    }

    def __post_init__(self) -> None:
        coerce_section(self)
        check_range("grn_hops", self.hops, ge=0)
        for name in ("weight", "threshold", "sparsity_weight"):
            check_range(self.KEYS[name], getattr(self, name), ge=0)


@dataclasses.dataclass
class ArtifactOptions:
    """CRADLE-VAE's quality-control (artifact) component (:class:`~pyrovae.models.artifact.ArtifactBlock`).

    Attributes:
        enabled: the model has the component (the key ``artifact``).
        n_qc: the number of QC indicator columns.
        cf_weight: the counterfactual KL's weight (a per-cell mean here, a batch sum in the reference; see
            :class:`~pyrovae.models.penalties.CounterfactualKL`).
    """

    enabled: bool = False
    n_qc: int = 1
    cf_weight: float = 0.1

    KEYS: ClassVar[dict[str, str]] = {"enabled": "artifact", "n_qc": "n_qc", "cf_weight": "cf_weight"}

    def __post_init__(self) -> None:
        coerce_section(self)
        check_range("n_qc", self.n_qc, ge=1, le=MAX_WIDTH)
        check_range("cf_weight", self.cf_weight, ge=0)


@dataclasses.dataclass
class GeneFeatureOptions:
    """Effects predicted from gene features (:mod:`pyrovae.models.effects.features`; SAMS-VAE, CPA-VAE,
    GPO-VAE).

    Attributes:
        source: ``None`` (off), ``"data"`` (PCA of the training pseudobulk), ``"table"`` (``file``: gene x
            dimension) or ``"graph"`` (``file``: an edge list).
        file: the table or edge list.
        dim: F, the features' width (a table's width replaces it when trained).
    """

    source: GeneFeatureSource | None = None
    file: str | None = None
    dim: int = 10

    KEYS: ClassVar[dict[str, str]] = {
        "source": "gene_features",
        "file": "gene_features_file",
        "dim": "gene_feature_dim",
    }

    def __post_init__(self) -> None:
        coerce_section(self)
        check_range("gene_feature_dim", self.dim, ge=1, le=MAX_WIDTH)
        if self.source in ("table", "graph") and not self.file:
            raise ValueError(
                f"gene_features={self.source!r} needs gene_features_file (CLI: --gene-features FILE or "
                "--gene-graph FILE)"
            )

    @property
    def enabled(self) -> bool:
        """Whether the effects have a gene-feature prior."""
        return self.source is not None


#: {attribute of ModelConfig: its section's class}
SECTIONS: dict[str, type] = {
    "network": NetworkOptions,
    "masks": MaskOptions,
    "grn": GRNOptions,
    "artifact": ArtifactOptions,
    "features": GeneFeatureOptions,
}
