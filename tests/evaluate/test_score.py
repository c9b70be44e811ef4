"""score_run: the one evaluation protocol (IWELBO on chosen cells, ATE with baselines, several runs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.prepare import prepare_data
from pyrovae.evaluate.ate import pearson
from pyrovae.evaluate.score import ate_report, iwelbo_summary, score_run
from pyrovae.models.zoo import data_requirements, model_config
from pyrovae.predict.iwelbo import iwelbo_over_seeds
from pyrovae.predict.posterior import Posterior
from pyrovae.runs import train_run
from pyrovae.train.trainer import TrainConfig
from tests.helpers import make_adata

SMALL = dict(n_latent=3, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)
FAST = dict(max_epochs=2, batch_size=64, lr=5e-3, patience=100, seed=0)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    data = load_perturbation_data(make_adata())
    root = tmp_path_factory.mktemp("score")
    runs = {
        name: train_run(data, model_config(name, **SMALL), TrainConfig(**FAST), root / name, progress=False)
        for name in ("sams_vae", "cpa_vae")
    }
    return data, runs


def test_score_run_matches_its_parts(two_runs):
    data, runs = two_runs
    test = data.indices("test")
    kw = dict(top_k=5, n_samples=40, seed=1)
    res = score_run(
        runs["sams_vae"],
        data,
        ate_sets={"test": test},
        iwelbo_sets={"test": "test", "rows": test[:10]},
        others={"cpa": runs["cpa_vae"]},
        iwelbo_seeds=(0, 1),
        n_particles=5,
        **kw,
    )
    name = res.name
    assert name == runs["sams_vae"].model_cfg.family == "sams"  # the family by default
    # the IWELBO of every run on every set is iwelbo_over_seeds with the run's untrained treatments
    for model, run in ((name, runs["sams_vae"]), ("cpa", runs["cpa_vae"])):
        for set_name, rows in (("test", "test"), ("rows", test[:10])):
            direct = iwelbo_over_seeds(
                run.model, data, rows, seeds=(0, 1), n_particles=5, untrained=run.untrained
            )
            assert res.iwelbo[model][set_name]["mean"] == pytest.approx(direct["mean"], abs=1e-9)
            assert res.iwelbo_summary[model][set_name] == iwelbo_summary(direct, set_name)
    # the ATE is ate_report with the other run as an extra model, in one table with the baselines
    rep = res.ate["test"]
    direct = ate_report(
        Posterior.from_run(runs["sams_vae"]),
        data,
        test,
        model_name=name,
        extra_models={"cpa": Posterior.from_run(runs["cpa_vae"])},
        **kw,
    )
    pd.testing.assert_frame_equal(rep.table, direct.table)
    assert list(rep.table.index[:2]) == [name, "cpa"]
    assert {"train_mean", "additive", "global_mean"} <= set(rep.table.index)
    # every label is trained here: the models' rows say so, the baselines' rows say baseline
    per = rep.per_perturbation
    is_model = per["method"].isin([name, "cpa"])
    assert (per.loc[is_model, "prediction"] == "trained").all()
    assert (per.loc[~is_model, "prediction"] == "baseline").all()
    assert rep.unseen == [] and rep.unseen_table is None


def test_score_run_needs_perturbed_cells(two_runs):
    data, runs = two_runs
    ctrl = np.flatnonzero(data.labels == data.control_label)
    with pytest.raises(ValueError, match="no perturbed cell"):
        score_run(runs["cpa_vae"], data, ate_sets={"controls": ctrl}, n_samples=10)


def test_ate_report_field_metrics(two_runs):
    """The field-standard additions: cells (energy distance), Monte Carlo spread, ceiling, vs baseline."""
    data, runs = two_runs
    test = data.indices("test")
    post = Posterior.from_run(runs["sams_vae"])
    kw = dict(top_k=5, n_samples=30, seed=2, model_name="sams")
    rep = ate_report(post, data, test, cells=True, n_cells=20, mc_seeds=2, ceiling_splits=2, **kw)
    table = rep.table
    assert {"no_change", "matching_mean", "linear"} <= set(table.index)
    # energy distance for the model and the two cell baselines only; NaN for mean-only baselines
    assert np.isfinite(table.loc[["sams", "no_change", "train_mean"], "energy_distance"]).all()
    assert table.loc[["additive", "linear"], "energy_distance"].isna().all()
    assert set(rep.energy["method"]) == {"sams", "no_change", "train_mean"}
    # the model's Monte Carlo spread over two model-ATE seeds; the second seed's table reproduces it
    other = post.model_ate(rep.perturbations, n_samples=30, seed=3, data=data, rows=test)
    sd = table.loc["sams", "pearson_mc_sd"]
    t = rep.ate_true.to_numpy()
    r = [pearson(t, rep.preds["sams"].to_numpy()), pearson(t, other.loc[rep.ate_true.index].to_numpy())]
    assert sd == pytest.approx(np.std(r, ddof=1))
    assert np.isnan(table.loc["no_change", "pearson_mc_sd"])  # baselines are not sampled
    # the energy distance's spread over predicted cells at the two seeds
    assert table.loc["sams", "energy_distance_mc_sd"] >= 0 and np.isnan(
        table.loc["no_change", "energy_distance_mc_sd"]
    )
    # A+B is scored for interactions by every predictor that predicts its members
    assert table.loc["sams", "n_interactions"] == 1 and table.loc["additive", "interaction_mse"] >= 0
    assert list(rep.ceiling.index) == ["noise_ceiling", "perfect_predictor"]
    assert 0 < rep.ceiling.iloc[0]["pearson"] <= rep.ceiling.iloc[1]["pearson"] <= 1
    vs = rep.vs_baseline
    assert list(vs.index) == list(table.index) and set(vs.attrs["baseline"]) <= set(vs.columns)
    assert rep.de_qvalues.shape == rep.ate_true.shape
    # without the options: no energy column, no spread
    plain = ate_report(post, data, test, ceiling=False, de=False, **kw)
    assert "energy_distance" not in plain.table and plain.ceiling is None
    assert plain.table["pearson_de_topk"].isna().all()


def test_score_run_prepares_the_data_each_run_reads(two_runs, tmp_path):
    """A CRADLE-VAE run reads QC flags beyond the counts: scored on the raw data, each run's IWELBO is
    computed on the data prepared as in its training (it failed with KeyError 'qc' before)."""
    data, runs = two_runs
    cradle = train_run(
        data, model_config("cradle_vae", **SMALL), TrainConfig(**FAST), tmp_path / "c", progress=False
    )
    assert "qc" not in data.extras  # the raw data
    res = score_run(
        runs["sams_vae"],
        data,
        iwelbo_sets={"test": "test"},
        others={"cradle": cradle},
        iwelbo_seeds=(0,),
        n_particles=3,
    )
    prepared = prepare_data(data, data_requirements(cradle.model_cfg), cradle.data_options)
    direct = iwelbo_over_seeds(
        cradle.model, prepared, "test", seeds=(0,), n_particles=3, untrained=cradle.untrained
    )
    assert res.iwelbo["cradle"]["test"]["mean"] == pytest.approx(direct["mean"], abs=1e-9)
