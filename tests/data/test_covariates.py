"""Data options, batches / covariates and size factors: the one door, stored levels, clear errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import pyrovae
from pyrovae.cli import main
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.options import DataOptions
from pyrovae.datasets import DATASETS, licence, path
from pyrovae.setup import resolve_options
from tests.helpers import make_adata

SMALL = dict(n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)


def _with_covariates(seed: int = 0):
    a = make_adata(seed=seed)
    rng = np.random.default_rng(seed)
    a.obs["rep"] = rng.choice(["r1", "r2"], size=a.n_obs)
    a.obs["line"] = np.where(np.arange(a.n_obs) % 3 == 0, "L1", "L2")
    a.obs["depth"] = np.asarray(a.X.sum(1)).reshape(-1) * 10.0
    return a


def test_data_options_are_typed_and_checked():
    opts = DataOptions(covariate_keys="line, rep", heldout="0.5", split_mode="combinations")
    assert opts.covariate_keys == ("line", "rep") and opts.heldout == 0.5
    assert DataOptions.from_dict(opts.to_dict()) == opts
    with pytest.raises(ValueError, match="unknown data option"):
        DataOptions.from_dict({"batch": "rep"})
    with pytest.raises(ValueError, match="combo_sep"):
        DataOptions(combo_sep="")
    with pytest.raises(ValueError, match="differ from batch_key"):
        DataOptions(batch_key="rep", covariate_keys=["rep"])
    with pytest.raises(ValueError, match="fraction"):
        DataOptions(heldout=2)
    # the zoo's data default applies where the user left it unset, never over a user's choice
    assert resolve_options({}, "svae_plus").encode_combos_as_unique is True
    assert resolve_options({"encode_combos_as_unique": False}, "svae_plus").encode_combos_as_unique is False
    assert resolve_options({}, "sams_vae").encode_combos_as_unique is False


def test_covariates_are_one_hot_with_stored_levels_and_unseen_levels_refused():
    a = _with_covariates()
    data = load_perturbation_data(a, batch_key="rep", covariate_keys=["line"])
    assert data.covariate_levels == {"rep": ["r1", "r2"], "line": ["L1", "L2"]}
    cov = data.extras["covariates"]
    assert cov.shape == (a.n_obs, 4) and np.all(cov.sum(1) == 2)
    assert list(data.covariate_values("line")[:3]) == ["L1", "L2", "L2"]
    combos = data.schema()["covariate_combos"]
    assert sum(combos["counts"]) == len(data.indices("train"))
    b = a.copy()
    b.obs["line"] = b.obs["line"].replace("L2", "L3")
    with pytest.raises(ValueError, match="not trained on"):
        load_perturbation_data(b, schema=data.schema())
    c = a.copy()
    c.obs.loc[c.obs_names[0], "rep"] = None
    with pytest.raises(ValueError, match="missing value"):
        load_perturbation_data(c, batch_key="rep")
    with pytest.raises(ValueError, match="no covariate column 'nope'"):
        load_perturbation_data(a, covariate_keys=["nope"])


def test_size_factors_are_validated_and_used():
    a = _with_covariates()
    data = load_perturbation_data(a, size_factor_key="depth")
    np.testing.assert_allclose(data.library_size, np.asarray(a.X.sum(1)).reshape(-1) * 10.0, rtol=1e-6)
    a.obs.loc[a.obs_names[3], "depth"] = 0.0
    with pytest.raises(ValueError, match="positive finite"):
        load_perturbation_data(a, size_factor_key="depth")


def test_model_with_covariates_trains_predicts_at_a_level_and_refuses_unknown_levels():
    a = _with_covariates()
    model = pyrovae.Model(a, model="cpa_vae", batch_key="rep", covariate_keys=["line"], **SMALL)
    model.train(max_epochs=2, batch_size=64, progress=False)
    assert model.run.model.n_covariates == 4
    pred = model.predict(["A", "control"], n_cells=20, covariates={"line": "L1"})
    assert pred.uns["pyrovae_sample"]["covariates"] == {"line": "L1"}
    ate = model.get_ate(["A"], n_samples=50, covariates={"line": "L2"})
    assert "line=L2" in ate.attrs["conditions"] and np.isfinite(ate.to_numpy()).all()
    with pytest.raises(ValueError, match="not a level the model was trained on"):
        model.predict(["A"], n_cells=5, covariates={"line": "L9"})
    with pytest.raises(ValueError, match="not a covariate"):
        model.get_ate(["A"], n_samples=5, covariates={"donor": "d1"})


def test_cli_and_model_write_identical_config(tmp_path):
    a = _with_covariates()
    a.write_h5ad(tmp_path / "d.h5ad")
    opts = ["--set", "n_latent=3", "decoder_hidden=16", "encoder_hidden=16", "max_epochs=2", "batch_size=64"]
    rc = main(
        [
            "train",
            "--data",
            str(tmp_path / "d.h5ad"),
            "--model",
            "svae_plus",
            "--out",
            str(tmp_path / "cli"),
            "--batch-key",
            "rep",
            "--covariate-keys",
            "line",
            "--size-factor-key",
            "depth",
            "--quiet",
            *opts,
        ]
    )
    assert rc == 0
    model = pyrovae.Model(
        a,
        model="svae_plus",
        batch_key="rep",
        covariate_keys=["line"],
        size_factor_key="depth",
        n_latent=3,
        decoder_hidden=16,
        encoder_hidden=16,
    )
    model.train(max_epochs=2, batch_size=64, progress=False, run_dir=tmp_path / "api", accelerator="cpu")
    cli = json.loads((tmp_path / "cli" / "config.json").read_text())
    api = json.loads((tmp_path / "api" / "config.json").read_text())
    assert cli == api
    assert cli["data"]["encode_combos_as_unique"] is True  # SVAE+'s default, the same through both doors
    assert cli["data"]["size_factor_key"] == "depth" and cli["data"]["covariate_keys"] == ["line"]

    # evaluation by level and sampling at a level, through the CLI
    data = str(tmp_path / "d.h5ad")
    out = tmp_path / "ate"
    assert (
        main(
            [
                "ate",
                str(tmp_path / "cli"),
                "--data",
                data,
                "--by",
                "line",
                "--n-samples",
                "50",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    by = pd.read_csv(out / "ate_metrics_by_line.csv")
    assert {"held-out test cells [line=L1]", "held-out test cells [line=L2]"} <= set(by["cells"])
    summary = json.loads((out / "ate_summary.json").read_text())
    assert "depth-matched" in summary["model_conditions"]
    assert (
        main(
            [
                "ate",
                str(tmp_path / "cli"),
                "--data",
                data,
                "--library-size",
                "1e4",
                "--n-samples",
                "50",
                "--out",
                str(tmp_path / "ate_fixed"),
            ]
        )
        == 0
    )
    fixed = json.loads((tmp_path / "ate_fixed" / "ate_summary.json").read_text())
    assert fixed["library_size"] == 1e4 and "library size 10000" in fixed["model_conditions"]
    sample = tmp_path / "s.h5ad"
    assert (
        main(
            [
                "sample",
                str(tmp_path / "cli"),
                "--perturbation",
                "A",
                "--n-cells",
                "5",
                "--covariate",
                "line=L2",
                "--out",
                str(sample),
            ]
        )
        == 0
    )
    assert ad.read_h5ad(sample).uns["pyrovae_sample"]["covariates"] == {"line": "L2"}


def test_embedded_datasets_ship_with_their_licences():
    for name in DATASETS:
        assert path(name).is_file(), name
        assert len(licence(name)) > 100, name
    adata = pyrovae.datasets.mcfaline2023()
    assert {"ncounts", "cell_type"} <= set(adata.obs.columns)
    data = load_perturbation_data(adata, **DATASETS["mcfaline2023"].data_options)
    assert data.size_factor_key == "ncounts" and list(data.covariate_levels) == ["cell_type"]
    assert isinstance(adata.obs, pd.DataFrame)
