"""Settings of the Perturb-seq simulator: :class:`SimulationConfig`, its presets, the seeds and constants.

The generative process is described in :mod:`pyrovae.simulate.perturbseq`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "SimulationConfig",
    "PRESETS",
    "GROUND_TRUTH_DESCRIPTION",
    "MT_GENES",
    "CONTROL_LABEL",
    "GRN_SHAPES",
    "check_seed",
    "numbered_names",
    "seed_stream",
    "resolve_config",
]

#: obs label of control cells.
CONTROL_LABEL = "control"
#: names of the mitochondrial-like genes (last genes of ``var``).
MT_GENES = ("MT-CO1", "MT-CO2", "MT-ND1")
#: low-quality artifact: library size multiplier and log-boost of the MT genes.
LOW_QUALITY_LIBRARY_FACTOR = 0.3
LOW_QUALITY_MT_LOG_BOOST = 2.5
#: decoder scales: pre-activation bias sd and output weight scale (times 1/sqrt(H)).
DECODER_BIAS_SD = 0.5
DECODER_OUT_SCALE = 1.5
#: baseline log-expression: ordinary genes N(0, sd); GRN genes N(mean, sd).
BASELINE_SD = 1.0
EXPRESSED_BASELINE_MEAN = 1.0
EXPRESSED_BASELINE_SD = 0.5
#: each MT gene's baseline share of the other genes' baseline mass (about 3% MT counts in good cells).
MT_SHARE = 0.01
MT_BASELINE_SD = 0.3
#: cells per chunk when sampling counts (a constant so that output does not depend on the machine).
CHUNK_CELLS = 4096

#: GRN shapes of :class:`SimulationConfig` (``grn_shape``) and the sizes of their motifs.
GRN_SHAPES = ("random", "chain", "fork", "collider")
CHAIN_LENGTH = 4
FORK_CHILDREN = 3
COLLIDER_PARENTS = 2

# sub-stream ids of ``default_rng([seed, k])``
S_MECH, S_DECODER, S_BASELINE, S_GRN, S_DISPERSION, S_DOUBLES, S_CELLS, S_BATCH = range(8)


@dataclass(frozen=True)
class SimulationConfig:
    """Sizes and effect strengths of a simulated Perturb-seq dataset (see the module docstring).

    Attributes:
        n_genes: total number of genes ``G`` (>= n_perturbed + n_extra_grn_genes + 3 MT genes).
        n_latent: latent dimensions ``K``.
        n_perturbed: number of single-gene perturbation targets ``T`` (genes ``PG..``).
        n_extra_grn_genes: non-perturbed GRN genes ``E`` (genes ``EG..``, downstream markers).
        n_doubles: number of double perturbations ``"A+B"`` (distinct random pairs).
        n_control_cells: control cells.
        cells_per_single: cells per single perturbation.
        cells_per_double: cells per double perturbation.
        mask_prob: ``P(m_tk = 1)`` of the latent mechanism masks.
        effect_mean: mean of ``|e_tk|``.
        effect_sd: sd of ``|e_tk|``.
        grn_edge_prob: probability of each forward edge of the GRN DAG.
        grn_weight: edge weights are ``+-grn_weight * U(0.5, 1)``.
        grn_shape: network of the GRN genes, one of :data:`GRN_SHAPES`: ``"random"`` (a random DAG with
            ``grn_edge_prob``), ``"chain"``, ``"fork"``, ``"collider"`` (see the module docstring, step 5).
        knockdown: log-fold shift of a perturbed gene itself (negative: CRISPRi knock-down).
        library_log_mean: mean of log library size.
        library_log_sd: sd of log library size.
        dispersion_range: ``(low, high)`` of the per-gene NB concentration ``theta ~ LogUniform``.
        frac_low_quality: fraction of low-quality cells.
        decoder_hidden: hidden units ``H`` of the random decoder.
        n_batches: batches (replicates, lanes); cells are assigned to them at random (``obs["batch"]``
            ``B1 ..``, only when ``n_batches > 1``).
        batch_effect: sd of each batch's per-gene log-fold shift ``beta_b ~ N(0, batch_effect^2)`` (G,),
            added to every cell's log-means (step 9); 0: batches differ in name only.
        batch_confounding: probability that a cell goes to its label's own batch (group index mod
            ``n_batches``) instead of a uniformly random one: batches confounded with perturbations, so
            that a pooled comparison mixes batch shifts into the effects.
    """

    n_genes: int
    n_latent: int
    n_perturbed: int
    n_extra_grn_genes: int
    n_doubles: int
    n_control_cells: int
    cells_per_single: int
    cells_per_double: int
    mask_prob: float
    effect_mean: float
    effect_sd: float
    grn_edge_prob: float
    grn_weight: float
    knockdown: float
    library_log_mean: float
    library_log_sd: float
    dispersion_range: tuple[float, float]
    frac_low_quality: float
    decoder_hidden: int
    grn_shape: str = "random"
    n_batches: int = 1
    batch_effect: float = 0.0
    batch_confounding: float = 0.0

    @property
    def n_cells(self) -> int:
        """Total number of cells ``N``."""
        return (
            self.n_control_cells
            + self.n_perturbed * self.cells_per_single
            + self.n_doubles * self.cells_per_double
        )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        ints = [
            "n_genes",
            "n_latent",
            "n_perturbed",
            "n_extra_grn_genes",
            "n_doubles",
            "n_control_cells",
            "cells_per_single",
            "cells_per_double",
            "decoder_hidden",
            "n_batches",
        ]
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"SimulationConfig.{name} must be a non-negative integer, got {v!r}")
        if not (np.isfinite(self.batch_effect) and self.batch_effect >= 0):
            raise ValueError(f"SimulationConfig.batch_effect must be >= 0, got {self.batch_effect!r}")
        if not 0.0 <= self.batch_confounding <= 1.0:
            raise ValueError(
                f"SimulationConfig.batch_confounding must be in [0, 1], got {self.batch_confounding!r}"
            )
        for name in ("n_latent", "n_perturbed", "decoder_hidden", "n_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"SimulationConfig.{name} must be >= 1, got {getattr(self, name)}")
        needed = self.n_perturbed + self.n_extra_grn_genes + len(MT_GENES)
        if self.n_genes < needed:
            raise ValueError(
                f"SimulationConfig.n_genes={self.n_genes} is too small: need at least n_perturbed + "
                f"n_extra_grn_genes + {len(MT_GENES)} MT genes = {needed}"
            )
        max_pairs = self.n_perturbed * (self.n_perturbed - 1) // 2
        if self.n_doubles > max_pairs:
            raise ValueError(
                f"SimulationConfig.n_doubles={self.n_doubles} exceeds the {max_pairs} distinct pairs of "
                f"{self.n_perturbed} perturbed genes"
            )
        if self.n_cells < 1:
            raise ValueError("the configuration simulates no cells")
        for name in ("mask_prob", "grn_edge_prob"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"SimulationConfig.{name} must lie in [0, 1], got {v}")
        if not 0.0 <= float(self.frac_low_quality) < 1.0:
            raise ValueError(
                f"SimulationConfig.frac_low_quality must lie in [0, 1), got {self.frac_low_quality}"
            )
        for name in ("effect_sd", "library_log_sd", "grn_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"SimulationConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("effect_mean", "knockdown", "library_log_mean"):
            if not np.isfinite(float(getattr(self, name))):
                raise ValueError(f"SimulationConfig.{name} must be finite, got {getattr(self, name)}")
        if self.grn_shape not in GRN_SHAPES:
            raise ValueError(
                f"SimulationConfig.grn_shape must be one of {list(GRN_SHAPES)}, got {self.grn_shape!r}"
            )
        rng_ = tuple(self.dispersion_range)
        if len(rng_) != 2 or not (0 < float(rng_[0]) <= float(rng_[1]) < np.inf):
            raise ValueError(
                f"SimulationConfig.dispersion_range must be (low, high) with 0 < low <= high, got {rng_!r}"
            )


#: the named simulation settings (``"tiny"``, ``"default"``, ``"large"``)
PRESETS: dict[str, SimulationConfig] = {
    # ~390 cells x 40 genes: unit tests and the quick demo.
    "tiny": SimulationConfig(
        n_genes=40,
        n_latent=4,
        n_perturbed=6,
        n_extra_grn_genes=2,
        n_doubles=3,
        n_control_cells=60,
        cells_per_single=40,
        cells_per_double=30,
        mask_prob=0.3,
        effect_mean=1.5,
        effect_sd=0.5,
        grn_edge_prob=0.25,
        grn_weight=0.8,
        knockdown=-1.5,
        library_log_mean=8.0,
        library_log_sd=0.3,
        dispersion_range=(3.0, 30.0),
        frac_low_quality=0.05,
        decoder_hidden=16,
    ),
    # 6,900 cells x 200 genes: the default dataset (a SAMS-VAE trains on it in minutes on a laptop).
    "default": SimulationConfig(
        n_genes=200,
        n_latent=10,
        n_perturbed=24,
        n_extra_grn_genes=16,
        n_doubles=12,
        n_control_cells=1500,
        cells_per_single=150,
        cells_per_double=150,
        mask_prob=0.2,
        effect_mean=1.5,
        effect_sd=0.5,
        grn_edge_prob=0.06,
        grn_weight=0.8,
        knockdown=-1.5,
        library_log_mean=8.0,
        library_log_sd=0.3,
        dispersion_range=(3.0, 30.0),
        frac_low_quality=0.05,
        decoder_hidden=64,
    ),
    # 10,400 cells x 72 genes: a targeted-panel CRISPRi screen (few genes, most targets measured, strong
    # on-target knock-downs, hundreds of cells per target: effects the data pins down).
    "targeted_panel": SimulationConfig(
        n_genes=72,
        n_latent=8,
        n_perturbed=14,
        n_extra_grn_genes=10,
        n_doubles=0,
        n_control_cells=2000,
        cells_per_single=600,
        cells_per_double=0,
        mask_prob=0.2,
        effect_mean=0.8,
        effect_sd=0.3,
        grn_edge_prob=0.1,
        grn_weight=0.8,
        knockdown=-2.5,
        library_log_mean=7.3,
        library_log_sd=0.4,
        dispersion_range=(3.0, 30.0),
        frac_low_quality=0.02,
        decoder_hidden=32,
    ),
    # 100,000 cells x 2,000 genes: benchmarks.
    "large": SimulationConfig(
        n_genes=2000,
        n_latent=32,
        n_perturbed=200,
        n_extra_grn_genes=100,
        n_doubles=100,
        n_control_cells=10000,
        cells_per_single=300,
        cells_per_double=300,
        mask_prob=0.1,
        effect_mean=1.5,
        effect_sd=0.5,
        grn_edge_prob=0.01,
        grn_weight=0.8,
        knockdown=-1.5,
        library_log_mean=8.5,
        library_log_sd=0.3,
        dispersion_range=(3.0, 30.0),
        frac_low_quality=0.05,
        decoder_hidden=128,
    ),
}

#: documentation of ``uns["ground_truth"]`` (stored under its ``"description"`` key).
GROUND_TRUTH_DESCRIPTION = """\
Ground truth of pyrovae.simulate.simulate_perturbseq (T perturbed genes, K latent dims, G genes,
n = T + E GRN genes, D doubles, H decoder hidden units):
- treatments (T,) str: single perturbation names = target genes, the row order of masks/embeddings.
- masks (T, K) int8: latent mechanism masks m_t (each row has >= 1 active dim).
- embeddings (T, K) float32: latent embeddings e_t (also off-mask entries).
- latent_effects (T, K) float32: masks * embeddings, the latent shift of each perturbation; a double shifts
  by the sum of its two rows.
- grn_genes (n,) str: GRN genes (perturbed genes first, then extra GRN genes), order of the GRN matrices.
- grn_adjacency (n, n) float32: weighted DAG adjacency A, row = parent, column = child, zero diagonal.
- grn_total_effect (n, n) float32: (I - A)^{-1} - I, total (direct + indirect) downstream effect: perturbing
  gene i shifts the log-mean of GRN gene j != i by knockdown * grn_total_effect[i, j] (and of i itself by
  knockdown); a double sums the shifts of its targets.
- knockdown float: log-fold shift of a perturbed gene itself.
- doubles (D,) str: the double perturbations "A+B" (A < B).
- dispersion (G,) float32: NB concentration theta_g of each gene (var order).
- baseline (G,) float32: per-gene baseline log-expression.
- decoder: dict W1 (K, H), b1 (H,), W2 (H, G) float32; log-means = baseline + tanh(z W1 + b1) W2
  (+ GRN shift on GRN genes, + MT boost on low-quality cells), mean counts = library * softmax(log-means).
- mt_genes (3,) str: mitochondrial-like genes inflated in low-quality cells.
- low_quality_library_factor float, low_quality_mt_log_boost float: the low-quality artifact.
- seed int, preset str ("custom" for a SimulationConfig argument): how the data was made; the full
  configuration is uns["simulation_config"].
- batch_shift (n_batches, G) float32 (only with n_batches > 1): each batch's per-gene log-fold shift.
Per cell: obs["perturbation"] (label), obs["low_quality"] (bool), obs["batch"] (with n_batches > 1)."""


# ------------------------------------------------------------------------------------------ helpers
def resolve_config(preset: str | SimulationConfig, overrides: dict[str, Any]) -> tuple[SimulationConfig, str]:
    """The preset (a name or a config) with ``overrides`` applied, validated, and its name."""
    if isinstance(preset, SimulationConfig):
        config, name = preset, "custom"
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown simulation preset {preset!r}; valid presets are {sorted(PRESETS)}")
        config, name = PRESETS[preset], preset
    else:
        raise TypeError(
            f"preset must be a preset name {sorted(PRESETS)} or a SimulationConfig, "
            f"got {type(preset).__name__}"
        )
    if overrides:
        fields = {f.name for f in dataclasses.fields(SimulationConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"unknown SimulationConfig field(s) {unknown} in overrides; valid fields are {sorted(fields)}"
            )
        if "dispersion_range" in overrides:
            overrides = {**overrides, "dispersion_range": tuple(overrides["dispersion_range"])}
        config = dataclasses.replace(config, **overrides)
    config.validate()
    return config, name


def check_seed(seed: Any) -> int:
    """The seed as an int; a clear error unless it is a non-negative integer (shared by the simulators)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def numbered_names(prefix: str, n: int, width: int) -> list[str]:
    """``n`` names ``prefix`` + 1-based number, zero-padded to at least ``width`` digits (``G01``, ...)."""
    w = max(width, len(str(n)))
    return [f"{prefix}{i + 1:0{w}d}" for i in range(n)]


def seed_stream(seed: int, k: int) -> np.random.Generator:
    """Independent generator ``k`` of ``seed`` (one per simulation stage: stages do not shift each other)."""
    return np.random.default_rng([seed, k])
