"""Prediction from a trained run: the posterior (:class:`Posterior`: samples, counterfactual cells, the model
ATE), held-out IWELBO (:func:`predictive_iwelbo`) and export to ArviZ (:func:`to_arviz`)."""

from pyrovae.predict.arviz import to_arviz
from pyrovae.predict.iwelbo import predictive_iwelbo
from pyrovae.predict.posterior import Posterior

__all__ = ["Posterior", "predictive_iwelbo", "to_arviz"]
