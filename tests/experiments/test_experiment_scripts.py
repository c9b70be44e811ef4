"""Each experiment script end to end in a tiny setting (slow: run with `python -m pytest -m slow`)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--preset", "tiny", "--set", "max_epochs=2", "iwelbo_particles=4", "ate_samples=40"]


def _script(name: str):
    return importlib.import_module(f"experiments.{name}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, extra, metric",
    [
        ("combinatorial", ["--fractions", "0.0", "1.0"], "iwelbo"),
        ("data_efficiency", [], "iwelbo"),
        ("heldout_cells", [], "iwelbo"),
        ("grn_recovery", [], "auprc"),
        ("mask_recovery", ["--seeds", "0"], "mask_f1"),
    ],
)
def test_experiment_script_writes_tables_and_figures(name, extra, metric, tmp_path):
    out = tmp_path / name
    assert _script(name).main(["--out", str(out), *TINY, *extra]) == 0
    results = pd.read_csv(out / "results.csv")
    assert len(results) > 0
    cols = [c for c in results.columns if metric in c.lower()]
    assert cols, f"no {metric} column in {list(results.columns)}"
    assert np.isfinite(results[cols].to_numpy(dtype=float)).any()
    assert (out / "summary.csv").exists() and (out / "summary.md").read_text().strip()
    assert list(out.glob("*.png")), "no figure written"
    # never overwrite a finished experiment without being asked
    with pytest.raises((FileExistsError, SystemExit)):
        _script(name).main(["--out", str(out), *TINY, *extra])


@pytest.mark.slow
def test_mask_recovery_planted_control_scores_perfect_masks(tmp_path):
    out = tmp_path / "masks"
    args = ["--out", str(out), *TINY, "--seeds", "0", "--sim-set", "knockdown=0"]
    assert _script("mask_recovery").main(args) == 0
    assert json.loads((out / "experiment.json").read_text())["data"]["overrides"] == {"knockdown": 0}
    res = pd.read_csv(out / "results.csv").set_index("model")
    assert res.loc["sams_vae_planted", "mask_f1"] == 1.0  # q(M) fixed at the planted masks
    assert np.isnan(res.loc["cpa_vae", "mask_f1"])  # no masks to score
    assert res.loc["cpa_vae", "test_iwelbo_vs_cpa"] == 0.0


def test_mask_recovery_refuses_data_without_planted_masks(tmp_path):
    import anndata as ad

    from pyrovae.simulate import simulate_perturbseq

    adata = simulate_perturbseq("tiny", seed=0)
    del adata.uns["ground_truth"]
    path = tmp_path / "real.h5ad"
    ad.AnnData(X=adata.X, obs=adata.obs, var=adata.var).write_h5ad(path)
    with pytest.raises(ValueError, match="planted masks"):
        _script("mask_recovery").main(["--data", str(path), "--out", str(tmp_path / "o"), *TINY])


REF_SIM = [
    "--simulator",
    "sams_reference",
    "--sim-set",
    "n_genes=20",
    "n_latent=3",
    "n_treatments=4",
    "cells_per_treatment=30",
    "n_control_cells=30",
]


def test_mask_recovery_on_the_reference_simulator(tmp_path):
    """The continuous reference-regime simulation trains with the normal likelihood and is recorded."""
    out = tmp_path / "ref"
    args = ["--out", str(out), *REF_SIM, *TINY[2:], "likelihood=normal", "--seeds", "0"]
    assert _script("mask_recovery").main(args) == 0
    source = json.loads((out / "experiment.json").read_text())["data"]
    assert source["simulator"] == "sams_reference" and source["overrides"]["n_latent"] == 3
    res = pd.read_csv(out / "results.csv").set_index("model")
    assert res.loc["sams_vae_planted", "mask_f1"] == 1.0
    assert np.isfinite(res["test_iwelbo"]).all()
    # the default count likelihood refuses continuous data, before any run directory is made
    with pytest.raises(ValueError, match="--set likelihood=normal"):
        _script("mask_recovery").main(["--out", str(tmp_path / "nb"), *REF_SIM, *TINY[2:], "--seeds", "0"])
    assert not (tmp_path / "nb" / "runs").exists()


def test_every_mask_inference_model_is_a_valid_config():
    """Every model of configs/mask_inference.yaml resolves to a valid ModelConfig and TrainConfig (a typo in
    an override would otherwise fail only when that row is run)."""
    from experiments.common import load_settings
    from pyrovae.models.zoo import model_config
    from pyrovae.train.trainer import TrainConfig

    mod = _script("mask_inference")
    settings = load_settings("mask_inference")
    assert len(settings["models"]) == len(set(settings["models"]))
    for name in settings["models"]:
        spec = mod.model_settings(settings, name)
        model_config(spec["base"], variant=True, **spec["model"])
        TrainConfig(**spec["train"])
    for section in ("model_base", "model_overrides", "train_overrides"):
        assert set(settings.get(section) or {}) <= set(settings["models"]), section


@pytest.mark.slow
def test_mask_inference_scores_estimators_and_baselines(tmp_path):
    out = tmp_path / "mi"
    models = ["cpa_vae", "sams_dense", "sams_loo", "sams_relaxed", "sams_ls_on_ss_frz_loo"]
    args = ["--out", str(out), *TINY, "--seeds", "0", "--models", *models]
    assert _script("mask_inference").main(args) == 0
    res = pd.read_csv(out / "results.csv")
    dense = res[res["model"] == "sams_dense"].iloc[0]  # the dense ablation: every mask fixed on
    assert dense["mask_recall"] == 1.0 and not np.isfinite(dense.get("undecided_mean", np.nan))
    models = set(res["model"])
    assert {"cpa_vae", "sams_dense", "sams_loo", "sams_relaxed"} <= models
    assert any(m.startswith("baseline: additive") for m in models)
    sams = res[res["model"] == "sams_loo"].iloc[0]
    for col in ("ate_r_combos", "ate_r_cells", "test_iwelbo", "mask_f1", "undecided_mean", "effect_mcc"):
        assert np.isfinite(sams[col]), col
    assert 0.0 <= sams["undecided_mean"] <= 1.0
    assert (out / "summary.md").read_text().strip()
    # --include: the rows of an earlier invocation are summarised, not rerun
    out2 = tmp_path / "mi2"
    args2 = [
        "--out",
        str(out2),
        *TINY,
        "--seeds",
        "0",
        "--models",
        "cpa_vae",
        "sams_dense",
        "--include",
        str(out),
    ]
    assert _script("mask_inference").main([*args2, "--ate-mc-seeds", "1"]) == 0
    res2 = pd.read_csv(out2 / "results.csv")
    assert not (out2 / "runs" / "seed0" / "cpa_vae").exists()
    cpa, cpa2 = (r[r["model"] == "cpa_vae"].iloc[0] for r in (res, res2))
    assert cpa2["test_iwelbo"] == cpa["test_iwelbo"]
    # the ATE's Monte Carlo spread over evaluation seeds 0 and 1 (the runs reloaded from --include)
    assert (res2.loc[res2["model"].isin(["cpa_vae", "sams_dense"]), "ate_r_cells_mc_sd"] > 0).all()
    with pytest.raises(ValueError, match="other settings"):
        _script("mask_inference").main([*args2[:1], str(tmp_path / "mi3"), *args2[2:], "--set", "lr=0.01"])


@pytest.mark.slow
def test_iwelbo_gap_rescores_earlier_runs(tmp_path):
    out = tmp_path / "mi"
    base = [*TINY, "--seeds", "0", "--models", "cpa_vae", "sams_dense"]
    assert _script("mask_inference").main(["--out", str(out), *base]) == 0
    gap = tmp_path / "gap"
    assert _script("iwelbo_gap").main(["--out", str(gap), "--runs", str(out), *base]) == 0
    res = pd.read_csv(gap / "results.csv")
    assert len(res) == 6  # 2 models x (100, 400 particles, q(E) narrowed)
    assert set(res["particles"]) == {100, 400}
    cpa = res[res["model"] == "cpa_vae"]
    assert (cpa["test - ref"] == 0).all()
    sams = res[res["model"] == "sams_dense"]
    assert np.isfinite(sams[["test", "test - ref", "test_control - ref", "train_1500"]].to_numpy()).all()
    # the narrowed q(E) changes the score; the control cells (no effect row) do not move
    as_trained = sams[(sams["globals"] == "as trained") & (sams["particles"] == 100)].iloc[0]
    narrow = sams[sams["globals"] != "as trained"].iloc[0]
    assert narrow["test"] != as_trained["test"]
    assert narrow["test_control"] == pytest.approx(as_trained["test_control"])


@pytest.mark.slow
def test_mask_estimators_reports_every_estimator(tmp_path):
    cfg = tmp_path / "est.yaml"
    cfg.write_text(
        "estimators: [straight_through, score_function, loo, disarm, relaxed]\n"
        "reference_estimator: loo\nrelaxed_temperature: 0.5\nbaseline_burn_in: 3\n"
        "model: {mask_init_logits: -1.5}\n"
        "train: {lr: 0.002, mask_lr: 0.05, batch_size: 64, n_particles: 3, val_particles: 3}\n"
        "small: {seed: 0, warmup_epochs: [0, 1], n_draws: 5, reference_draws: 10}\n"
    )
    out = tmp_path / "est"
    assert _script("mask_estimators").main(["--out", str(out), "--preset", "tiny", "--config", str(cfg)]) == 0
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 10 and set(res["estimator"]) == {
        "straight_through",
        "score_function",
        "loo",
        "disarm",
        "relaxed",
    }
    assert np.isfinite(res[["mean_variance", "median_snr", "seconds_per_step"]].to_numpy()).all()


def test_grn_check_preset_scores_the_grn_and_the_held_out_perturbations(tmp_path):
    """The GRN check (formerly gpo_grn_check.py) is a config of grn_recovery.py: one GPO-VAE on the data
    layer's seeded split, every GRN score in grn_scores.csv, held-out perturbations in unseen.csv."""
    out = tmp_path / "check"
    cfg = str(ROOT / "experiments" / "configs" / "gpo_grn_check.yaml")
    args = ["--out", str(out), "--config", cfg, *TINY, "patience=2", "--holdout", "PG03"]
    assert _script("grn_recovery").main(args) == 0
    scores = pd.read_csv(out / "grn_scores.csv")
    assert {"gpo_vae", "de", "correlation", "random"} <= set(scores["method"])
    assert set(scores["model"]) == {"gpo_vae"} and np.isfinite(scores["auprc"]).all()
    unseen = pd.read_csv(out / "unseen.csv").set_index("method")
    assert set(unseen.index) == {"gpo_grn_prediction", "prior_fallback", "zero_effect", "seen_mean"}
    assert (unseen["n_perturbations"] > 0).all()
    info = json.loads((out / "experiment.json").read_text())
    assert info["settings"]["split"] == "data" and info["settings"]["holdout"] == ["PG03"]
    res = pd.read_csv(out / "results.csv").set_index("model")
    assert np.isfinite(res.loc["gpo_vae", ["auprc_perturbed", "test_iwelbo", "ate_r"]].astype(float)).all()


@pytest.mark.slow
def test_knowledge_recovery_writes_planted_and_shuffled_rows(tmp_path):
    out = tmp_path / "knowledge"
    argv = ["--out", str(out), "--seeds", "0", "--epochs", "2", "2", "--permutations", "50"]
    assert _script("knowledge_recovery").main(argv) == 0
    res = pd.read_csv(out / "results.csv")
    assert {"planted", "shuffled"} == set(res["knowledge"])
    assert {"sams_vae", "sams_vae_planted_masks", "gpo_vae"} == set(res["run"])
    assert res["metric"].str.startswith("GRN de:").any() and (out / "summary.md").read_text().strip()
