"""Training: the SVI trainer (:class:`Trainer`, :class:`TrainConfig`), its optimiser, devices and
data-parallel (DDP) context."""

from pyrovae.train.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
