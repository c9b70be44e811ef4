"""Shared fixtures: Pyro validation on, and tiny hand-made perturbation data (no simulator needed)."""

from __future__ import annotations

import pyro
import pytest

from pyrovae.data.anndata import load_perturbation_data
from tests.helpers import make_adata


@pytest.fixture(autouse=True)
def _validation():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield


@pytest.fixture
def tiny_data():
    return load_perturbation_data(make_adata())


@pytest.fixture
def tiny_data_unique():
    return load_perturbation_data(make_adata(), encode_combos_as_unique=True)
