"""Embedded datasets: small subsets of published CRISPR screens shipped with pyrovae, and the simulators.

Every real dataset is an AnnData with raw UMI counts in ``X`` (CSR, float32, integer valued),
``obs["perturbation"]`` = ``control`` / ``A`` / ``A+B``, the study's original labels in other obs columns,
unique gene symbols as ``var_names``, and ``uns["conversion_notes"]`` saying how it was converted. Each was
converted once from a public repository whose licence allows redistribution with its notice; the notices are
shipped in ``pyrovae/datasets/licences/`` (:func:`licence` prints one). None has ground truth for masks or a
GRN: evaluate on held-out cells against the trivial baselines and the noise ceiling.

``DATASETS[name]`` gives each one's loader, a description and the data options it is meant to be read with
(``pyrovae demo --dataset NAME`` and ``experiments/real_screens.py`` use them):

- ``papalexi2021``: Papalexi et al. 2021 (Nat Genet), ECCITE-seq CRISPR knock-outs in THP-1 cells (IFN-gamma
  / PD-L1 pathway). 16,093 cells x 299 genes, 25 single targets and 1,912 control cells, 3 biological
  replicates (``obs["bio_rep"]``, read as the batch). Source: the ``sceptredata`` R package
  (Katsevich-Lab/sceptredata, ``data/lowmoi_example_data.rda``, MIT). The 299 genes are that package's
  downsample; 9 of the 25 targets are among them. Guides were assigned with the common low-MOI rule (the
  top guide, kept with at least 5 guide UMIs of which it holds more than 80 %); guide counts in
  ``obsm["grna_counts"]``. About 200 counts per cell over the 299 genes.
- ``mcfaline2023``: McFaline-Figueroa et al. 2023/2024, CRISPRi of 9 kinases in three glioblastoma lines
  (``obs["cell_type"]``: A172, T98G, U87MG; effects differ between them). 2,586 cells x 500 highly variable
  genes, 300 control cells. Source: PerturBench's development file (altoslabs/perturbench,
  ``src/perturbench/data/resources/devel.h5ad``, BSD-3-Clause), which stored log-normalised values only;
  the integer counts were recovered exactly from them (the original values are in
  ``layers["log1p_norm_perturbench"]``). The counts cover 500 genes only, a few hundred per cell:
  ``obs["ncounts"]``, each cell's whole-transcriptome library size, is its size factor.
- ``scmageck_mcf10a``: the scMAGeCK example (Yang et al. 2020, Genome Biol): CROP-seq knock-outs of tumour
  suppressors in MCF10A cells at high MOI. 5,500 cells x 28 genes, 29 single targets and 345 real double
  infections (mostly 1-5 cells each). Source: weililab/scMAGeCK, ``inst/extdata/`` (BSD-2-Clause per its
  DESCRIPTION). Good for label parsing and tiny end-to-end runs, not for model quality.

Simulated data with ground truth: :func:`simulate_perturbseq` (the project's simulator, presets ``tiny``,
``default``, ``large``, ``targeted_panel``) and :func:`simulate_sams_reference` (the SAMS-VAE paper's
generative story).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from importlib import resources
from typing import Any

import anndata as ad

from pyrovae.simulate import simulate_perturbseq, simulate_sams_reference

__all__ = [
    "DATASETS",
    "Dataset",
    "licence",
    "mcfaline2023",
    "papalexi2021",
    "path",
    "scmageck_mcf10a",
    "simulate_perturbseq",
    "simulate_sams_reference",
]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An embedded dataset: its file, licence notice, a one-line description and the data options
    (:class:`~pyrovae.data.options.DataOptions` fields) it is meant to be read with."""

    name: str
    file: str
    licence_file: str
    description: str
    data_options: dict[str, Any]

    def load(self) -> ad.AnnData:
        """The AnnData, read into memory (a fresh copy on every call)."""
        return ad.read_h5ad(path(self.name))


DATASETS: dict[str, Dataset] = {
    "papalexi2021": Dataset(
        "papalexi2021",
        "papalexi2021_sceptredata.h5ad",
        "sceptredata_LICENSE.md",
        "Papalexi 2021 ECCITE-seq knock-outs in THP-1: 16,093 cells x 299 genes, 25 targets, 3 replicates",
        {"batch_key": "bio_rep"},
    ),
    "mcfaline2023": Dataset(
        "mcfaline2023",
        "mcfaline2023_perturbench_devel.h5ad",
        "perturbench_LICENSE.txt",
        "McFaline-Figueroa 2023 CRISPRi in 3 glioblastoma lines: 2,586 cells x 500 HVGs, 9 targets",
        {"covariate_keys": ["cell_type"], "size_factor_key": "ncounts"},
    ),
    "scmageck_mcf10a": Dataset(
        "scmageck_mcf10a",
        "scmageck_mcf10a_28genes.h5ad",
        "scMAGeCK_DESCRIPTION",
        "scMAGeCK MCF10A CROP-seq at high MOI: 5,500 cells x 28 genes, 29 targets, 345 doubles",
        {},
    ),
}


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; embedded datasets: {sorted(DATASETS)}")
    return DATASETS[name]


def path(name: str):
    """The path of an embedded dataset's ``.h5ad`` inside the installed package."""
    return resources.files(__name__).joinpath("data", _dataset(name).file)


def licence(name: str) -> str:
    """The licence notice of an embedded dataset's source."""
    return resources.files(__name__).joinpath("licences", _dataset(name).licence_file).read_text()


def _loader(name: str) -> Callable[[], ad.AnnData]:
    def load() -> ad.AnnData:
        return _dataset(name).load()

    load.__name__ = name
    load.__doc__ = (
        f"{DATASETS[name].description} (raw counts; read it with the data options "
        f"{DATASETS[name].data_options or 'defaults'}; provenance and licence: :mod:`pyrovae.datasets`)."
    )
    return load


papalexi2021 = _loader("papalexi2021")
mcfaline2023 = _loader("mcfaline2023")
scmageck_mcf10a = _loader("scmageck_mcf10a")
