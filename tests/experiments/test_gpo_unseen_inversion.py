"""experiments/gpo_unseen_inversion.py on a tiny CLI-trained GPO-VAE run with held-out perturbations."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pyrovae.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_decoder_inversion_scores_next_to_the_cli_rows(tmp_path):
    data, run = tmp_path / "d.h5ad", tmp_path / "gpo"
    assert main(["simulate", "--preset", "tiny", "--seed", "1", "--out", str(data)]) == 0
    train = ["train", "--data", str(data), "--model", "gpo_vae", "--out", str(run), "--quiet"]
    train += ["--holdout-perturbations", "PG02", "--qc-key", "low_quality", "--set", "max_epochs=2"]
    assert main(train) == 0
    assert main(["ate", str(run), "--data", str(data), "--n-samples", "30"]) == 0
    script = importlib.import_module("experiments.gpo_unseen_inversion")
    out = tmp_path / "inv.csv"
    assert script.main(["--runs", str(run), "--other-weight", "1", "0.01", "--out", str(out)]) == 0
    res = pd.read_csv(out).set_index("method")
    assert {"inversion_w1", "inversion_w0.01", "gpo", "grn_de", "zero_effect"} <= set(res.index)
    assert np.isfinite(res["mse"]).all() and np.isfinite(res["kappa"]).all()
    # letting the other genes move brings gene j closer to its target kappa: the decoder's trade-off
    miss = (res["own_gene_shift"] - res["kappa"]).abs()
    assert miss["inversion_w0.01"] <= miss["inversion_w1"] + 1e-6
