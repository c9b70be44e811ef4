"""pyrovae: Pyro models of single-cell perturbation responses.

SAMS-VAE and its baselines (CPA-VAE, SVAE+, conditional VAE) and GPO-VAE / CRADLE-VAE, as Pyro
model/guide pairs on one shared skeleton, trained with SVI + TraceGraph_ELBO, evaluated by held-out
IWELBO and average-treatment-effect checks.

Typical use::

    import pyrovae
    data = pyrovae.load_perturbation_data("screen.h5ad", perturbation_key="perturbation")
    run = pyrovae.train_run(data, pyrovae.model_config("sams_vae"), pyrovae.TrainConfig(), "runs/r1")
"""

from pyrovae.data import MinibatchLoader, PerturbationData, load_perturbation_data
from pyrovae.infer.runs import Run, load_run, train_run
from pyrovae.infer.train import TrainConfig, Trainer
from pyrovae.models.skeleton import PerturbationVAE
from pyrovae.models.zoo import MODEL_ZOO, ModelConfig, build_model, model_config

__version__ = "0.1.0"

__all__ = [
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
]
