"""Simulated Perturb-seq data with known ground truth (masks, latent effects, GRN, artifacts, batches).

- :func:`simulate_perturbseq` (:mod:`pyrovae.simulate.perturbseq`): the project's count simulator, with the
  presets of :data:`PRESETS` (:class:`SimulationConfig`, :mod:`pyrovae.simulate.config`), the true ATE under
  it (:func:`simulated_ate`), a chunked writer for any size (:func:`write_perturbseq_h5ad`) and the planted
  parameters read back (:func:`ground_truth`).
- :func:`simulate_sams_reference` (:mod:`pyrovae.simulate.sams_reference`): the SAMS-VAE paper's simulation
  regime (continuous data, a fixed random decoder).
"""

from pyrovae.simulate.config import (
    CONTROL_LABEL,
    GRN_SHAPES,
    GROUND_TRUTH_DESCRIPTION,
    MT_GENES,
    PRESETS,
    SimulationConfig,
)
from pyrovae.simulate.perturbseq import (
    ground_truth,
    simulate_perturbseq,
    simulated_ate,
    write_perturbseq_h5ad,
)
from pyrovae.simulate.sams_reference import SamsReferenceConfig, simulate_sams_reference

__all__ = [
    "CONTROL_LABEL",
    "GRN_SHAPES",
    "GROUND_TRUTH_DESCRIPTION",
    "MT_GENES",
    "PRESETS",
    "SamsReferenceConfig",
    "SimulationConfig",
    "ground_truth",
    "simulate_perturbseq",
    "simulate_sams_reference",
    "simulated_ate",
    "write_perturbseq_h5ad",
]
