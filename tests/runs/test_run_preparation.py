"""A run prepares the data its model needs in one place (train_run, Run.load_data) and records it in
prep.json; runs of older versions (the record in schema.json["gpo"]) still load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.prepare import prepare_gpo_data
from pyrovae.models.zoo import MODEL_ZOO, data_requirements, model_config
from pyrovae.outputs import check_replaceable
from pyrovae.runs import load_run, train_run
from pyrovae.runs.directory import PREP, SCHEMA
from pyrovae.simulate import simulate_perturbseq
from pyrovae.train.trainer import TrainConfig

SMALL = dict(n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)
FAST = dict(max_epochs=2, batch_size=128, lr=5e-3, n_particles=1, val_particles=1, seed=0)


def test_each_named_model_declares_its_data_needs():
    needs = {name: [r.name for r in data_requirements(model_config(name))] for name in MODEL_ZOO}
    for gpo in ("gpo_vae", "gpo_vae_reference"):
        assert needs[gpo] == ["qc_flags", "counterfactuals", "grn_targets"]
    gpo_or_cradle = ("gpo_vae", "gpo_vae_reference", "cradle_vae", "cradle_vae_reference")
    for cradle in ("cradle_vae", "cradle_vae_reference"):
        assert needs[cradle] == ["qc_flags", "counterfactuals"]
    assert all(not v for k, v in needs.items() if k not in gpo_or_cradle)
    # every extras key a requirement makes is one the model's penalties / blocks read
    provides = {k for r in data_requirements(model_config("gpo_vae")) for k in r.provides}
    assert provides == {"qc", "cfx", "has_cf", "delta_x", "delta_x_group"}


@pytest.fixture(scope="module")
def adata():
    return simulate_perturbseq("tiny", seed=0)


@pytest.fixture(scope="module")
def gpo_run(adata, tmp_path_factory):
    """GPO-VAE trained through train_run on *unprepared* data: train_run prepares it."""
    out = tmp_path_factory.mktemp("gpo") / "run"
    data = load_perturbation_data(adata)
    opts = {"qc_key": "low_quality", "split_seed": 0}
    run = train_run(data, model_config("gpo_vae", **SMALL), TrainConfig(**FAST), out, opts, progress=False)
    return run, opts


def test_train_run_prepares_and_records_the_preparation(adata, gpo_run):
    run, opts = gpo_run
    ref = prepare_gpo_data(load_perturbation_data(adata), qc_key="low_quality", seed=0)
    rec = json.loads((run.path / PREP).read_text())
    assert rec["requirements"] == ["qc_flags", "counterfactuals", "grn_targets"]
    assert rec["nodes"] == list(ref.treatments) == run.treatments
    assert rec["n_perturbed"] == ref.uns["pyrovae_gpo"]["n_perturbed"] and rec["qc_key"] == "low_quality"
    assert "gpo" not in json.loads((run.path / SCHEMA).read_text())  # no special schema key any more
    check_replaceable(run.path, "run")  # prep.json is one of pyrovae's own files: --overwrite may replace it
    loaded = run.load_data(adata)
    assert loaded.treatments == ref.treatments
    for k in ("qc", "cfx", "has_cf", "delta_x", "delta_x_group"):
        np.testing.assert_array_equal(loaded.extras[k], ref.extras[k], err_msg=k)


def test_a_run_with_the_old_schema_record_still_loads(adata, gpo_run, tmp_path):
    import shutil

    run, _ = gpo_run
    old = tmp_path / "old"
    shutil.copytree(run.path, old)
    rec = json.loads((old / PREP).read_text())
    (old / PREP).unlink()
    schema = json.loads((old / SCHEMA).read_text())
    schema["gpo"] = {"n_perturbed": rec["n_perturbed"], "extended": rec["extended"]}  # the old layout
    (old / SCHEMA).write_text(json.dumps(schema))
    new_data = run.load_data(adata)
    old_data = load_run(old).load_data(adata)
    assert old_data.treatments == new_data.treatments
    assert old_data.uns["pyrovae_gpo"]["n_perturbed"] == rec["n_perturbed"]
    for k in ("qc", "cfx", "delta_x", "delta_x_group"):
        np.testing.assert_array_equal(old_data.extras[k], new_data.extras[k], err_msg=k)


def test_a_need_the_data_cannot_meet_fails_before_any_run_dir(adata, tmp_path):
    data = load_perturbation_data(adata)
    out = tmp_path / "cradle"
    with pytest.raises(ValueError, match="no QC column 'nope'"):
        train_run(data, model_config("cradle_vae", **SMALL), TrainConfig(**FAST), out, {"qc_key": "nope"})
    assert not out.exists()
    bad = adata.copy()
    bad.obs["perturbation"] = bad.obs["perturbation"].astype(str).str.replace("PG01", "KO1")
    with pytest.raises(ValueError, match="not in var_names"):
        train_run(load_perturbation_data(bad), model_config("gpo_vae", **SMALL), TrainConfig(**FAST), out)
    assert not out.exists()
