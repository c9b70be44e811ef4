"""AnnData in, tensors out."""

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.dosage import build_dosage, dosage_for, parse_label
from pyrovae.data.loader import MinibatchLoader
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.data.protocols import make_split

__all__ = [
    "PerturbationData",
    "load_perturbation_data",
    "make_split",
    "build_dosage",
    "dosage_for",
    "parse_label",
    "MinibatchLoader",
]
