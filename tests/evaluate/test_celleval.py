"""cell-eval through pyrovae (the optional ``eval`` extra); skipped where cell-eval is not installed."""

import numpy as np
import pandas as pd
import pytest

import pyrovae
from pyrovae.evaluate.ate import per_perturbation_metrics
from pyrovae.evaluate.celleval import PERT_COL, cell_eval_adata, lognorm
from pyrovae.evaluate.empirical import empirical_ate
from pyrovae.simulate import simulate_perturbseq

cell_eval = pytest.importorskip("cell_eval")

from pyrovae.evaluate.celleval import run_cell_eval  # noqa: E402


def _cells(seed, n=40, genes=30):
    """Counts of control and three perturbations (each shifts its own genes), with varied depths."""
    rng = np.random.default_rng(seed)
    groups = ["ctrl", "P1", "P2", "P3"]
    labels = np.repeat(groups, n)
    rate = np.full((len(labels), genes), 3.0)
    for i, g in enumerate(groups[1:]):
        rate[labels == g, 5 * i : 5 * i + 5] *= 3.0
        rate[labels == g, 20 + i] *= 0.3
    depth = rng.lognormal(0.0, 0.4, size=(len(labels), 1))
    return rng.poisson(rate * depth).astype(np.float64), labels


def test_lognorm_is_log1p_of_normalised_counts():
    x = np.array([[1.0, 3.0], [0.0, 0.0]])
    assert np.allclose(lognorm(x), [np.log1p([2500.0, 7500.0]), [0.0, 0.0]])


def test_cell_eval_pearson_delta_equals_pyrovae(tmp_path):
    genes = [f"g{j}" for j in range(30)]
    x_real, lab_real = _cells(0)
    x_pred, lab_pred = _cells(1, n=60)
    real = cell_eval_adata(lognorm(x_real), lab_real, genes, "real_")
    pred = cell_eval_adata(lognorm(x_pred), lab_pred, genes, "pred_")
    train = cell_eval_adata(lognorm(_cells(2)[0]), _cells(2)[1], genes, "train_")
    res = run_cell_eval(pred, real, "ctrl", tmp_path / "ce", train=train, profile="full")
    ce = res["results"].set_index("perturbation")["pearson_delta"]
    # pyrovae: per-perturbation Pearson r of the empirical ATEs (log2 scale: a constant factor of ln)
    ate_real = empirical_ate(x_real, lab_real, "ctrl", genes=genes)
    ate_pred = empirical_ate(x_pred, lab_pred, "ctrl", genes=genes)
    ours = per_perturbation_metrics(ate_real, {"m": ate_pred}).set_index("perturbation")["pearson"]
    assert sorted(ce.index) == ["P1", "P2", "P3"]
    assert np.allclose(ce.loc[ours.index].to_numpy(), ours.to_numpy(), atol=1e-5)
    # cell-eval's tables are written next to each other, the baseline-normalised score included
    for name in ("results.csv", "agg_results.csv", "score.csv", "baseline/agg_results.csv"):
        assert (tmp_path / "ce" / name).is_file(), name
    score = pd.read_csv(tmp_path / "ce" / "score.csv")
    assert "avg_score" in set(score["metric"])
    assert PERT_COL in real.obs


def test_model_cell_eval(tmp_path):
    adata = simulate_perturbseq("tiny", seed=0)
    pyrovae.Model.setup_anndata(adata, perturbation_key="perturbation")
    model = pyrovae.Model(adata, model="cpa_vae", n_latent=3, decoder_hidden=16, encoder_hidden=16)
    model.train(max_epochs=1, batch_size=128, progress=False)
    res = model.cell_eval(tmp_path / "ce", n_cells=30, profile="minimal")
    assert "pearson_delta" in res["results"].columns and "avg_score" in set(res["score"]["metric"])
    assert (tmp_path / "ce" / "agg_results.csv").is_file()
