"""pyrovae: Pyro models of single-cell perturbation responses.

SAMS-VAE and its baselines (CPA-VAE, SVAE+, conditional VAE) and GPO-VAE / CRADLE-VAE, as Pyro
model/guide pairs on one shared skeleton, trained with SVI + TraceGraph_ELBO, evaluated by held-out
IWELBO and average-treatment-effect checks.

Typical use (the scvi-tools-style API of :mod:`pyrovae.model`)::

    import pyrovae
    pyrovae.Model.setup_anndata(adata, perturbation_key="perturbation")
    model = pyrovae.Model(adata, model="sams_vae", n_latent=10)
    model.train(max_epochs=100)
    adata.obsm["X_pyrovae"] = model.get_latent_representation()

or the library underneath::

    data = pyrovae.load_perturbation_data("screen.h5ad", perturbation_key="perturbation")
    run = pyrovae.train_run(data, pyrovae.model_config("sams_vae"), pyrovae.TrainConfig(), "runs/r1")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below are imported on first use (``import pyrovae`` stays fast)
    from pyrovae import datasets
    from pyrovae.data import MinibatchLoader, PerturbationData, load_perturbation_data
    from pyrovae.data.options import DataOptions
    from pyrovae.evaluate.enrichment import latent_enrichment
    from pyrovae.evaluate.grn_reference import score_run_reference
    from pyrovae.evaluate.knowledge import read_gene_sets, read_interactions
    from pyrovae.model import CPAVAE, CRADLEVAE, GPOVAE, SAMSVAE, ConditionalVAE, Model, SVAEPlus
    from pyrovae.models.skeleton import PerturbationVAE
    from pyrovae.models.zoo import MODEL_ZOO, ModelConfig, build_model, model_config
    from pyrovae.predict.arviz import to_arviz
    from pyrovae.predict.posterior import Posterior
    from pyrovae.runs import Run, load_run, train_run
    from pyrovae.setup import read_data
    from pyrovae.train.device import resolve_device
    from pyrovae.train.trainer import TrainConfig, Trainer

#: where each public name lives; imported when first used, so that ``import pyrovae`` (and the command
#: line's start, before its own imports, where Ctrl-C must still end in one line) does not load torch
_LAZY = {
    "datasets": "pyrovae.datasets",  # a module
    "DataOptions": "pyrovae.data.options",
    "read_data": "pyrovae.setup",
    **dict.fromkeys(("MinibatchLoader", "PerturbationData", "load_perturbation_data"), "pyrovae.data"),
    "to_arviz": "pyrovae.predict.arviz",
    "resolve_device": "pyrovae.train.device",
    "Posterior": "pyrovae.predict.posterior",
    **dict.fromkeys(("Run", "load_run", "train_run"), "pyrovae.runs.run"),
    **dict.fromkeys(("TrainConfig", "Trainer"), "pyrovae.train.trainer"),
    **dict.fromkeys(
        ("Model", "SAMSVAE", "CPAVAE", "SVAEPlus", "ConditionalVAE", "CRADLEVAE", "GPOVAE"), "pyrovae.model"
    ),
    "PerturbationVAE": "pyrovae.models.skeleton",
    **dict.fromkeys(("read_gene_sets", "read_interactions"), "pyrovae.evaluate.knowledge"),
    "latent_enrichment": "pyrovae.evaluate.enrichment",
    "score_run_reference": "pyrovae.evaluate.grn_reference",
    **dict.fromkeys(("MODEL_ZOO", "ModelConfig", "build_model", "model_config"), "pyrovae.models.zoo"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if _LAZY[name] == f"{__name__}.{name}" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyrovae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "DataOptions",
    "datasets",
    "read_data",
    "Model",
    "SAMSVAE",
    "CPAVAE",
    "SVAEPlus",
    "ConditionalVAE",
    "CRADLEVAE",
    "GPOVAE",
    "Posterior",
    "to_arviz",
    "resolve_device",
    "MinibatchLoader",
    "PerturbationData",
    "load_perturbation_data",
    "Run",
    "load_run",
    "train_run",
    "TrainConfig",
    "Trainer",
    "PerturbationVAE",
    "MODEL_ZOO",
    "ModelConfig",
    "build_model",
    "model_config",
    "read_gene_sets",
    "read_interactions",
    "latent_enrichment",
    "score_run_reference",
]
