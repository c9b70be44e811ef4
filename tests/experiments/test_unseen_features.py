"""experiments/unseen_features.py end to end in a tiny setting (slow)."""

from __future__ import annotations

import importlib

import pandas as pd
import pytest


@pytest.mark.slow
def test_unseen_features_script_writes_its_tables(tmp_path):
    script = importlib.import_module("experiments.unseen_features")
    out = tmp_path / "uf"
    args = ["--out", str(out), "--preset", "tiny", "--shapes", "chain", "--seeds", "0", "--n-sets", "1"]
    args += [
        "--n-heldout",
        "2",
        "--models",
        "cpa_vae",
        "cpa_vae+data",
        "cpa_vae+table",
        "--ate-samples",
        "20",
    ]
    args += ["--iwelbo-particles", "2", "--train-set", "max_epochs=1"]
    assert script.main(args) == 0
    unseen = pd.read_csv(out / "unseen.csv")
    methods = set(unseen["method"])
    assert {
        "cpa_vae",
        "cpa_vae+data",
        "cpa_vae+table",
        "zero_effect",
        "seen_mean",
        "linear",
        "grn_de",
    } <= methods
    assert "grn_deconvolved" in methods
    seen = pd.read_csv(out / "seen.csv")
    assert set(seen["model"]) == {"cpa_vae", "cpa_vae+data", "cpa_vae+table"}
    assert "paired difference" in (out / "summary.md").read_text()
