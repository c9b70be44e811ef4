"""The scvi-tools-style API (pyrovae.Model): setup, train, results aligned by obs_names, save/load, backed
AnnData, reprs; and the README's Python example, run as written (with fast settings)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import pyrovae
from pyrovae.model import SETUP_KEY
from pyrovae.simulate import simulate_perturbseq

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_latent=4, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)
FAST = dict(max_epochs=3, batch_size=128, lr=1e-3, progress=False)


@pytest.fixture(scope="module")
def tiny_adata():
    return simulate_perturbseq("tiny", seed=0)


@pytest.fixture(scope="module")
def trained(tiny_adata):
    adata = tiny_adata.copy()
    pyrovae.Model.setup_anndata(
        adata, perturbation_key="perturbation", split_mode="combinations", heldout=0.25
    )
    model = pyrovae.Model(adata, model="sams_vae", **SMALL)
    model.train(**FAST)
    return adata, model


# --------------------------------------------------------------------------------------------- setup
def test_setup_anndata_records_the_options_and_checks_keys(tiny_adata):
    adata = tiny_adata.copy()
    pyrovae.Model.setup_anndata(adata, perturbation_key="perturbation", split_seed=3)
    assert adata.uns[SETUP_KEY] == {"perturbation_key": "perturbation", "split_seed": 3}
    with pytest.raises(ValueError, match="obs has no such column"):
        pyrovae.Model.setup_anndata(adata, perturbation_key="guide")
    with pytest.raises(ValueError, match="no such layer"):
        pyrovae.Model.setup_anndata(adata, layer="counts")
    with pytest.raises(ValueError, match="unknown setup keyword"):
        pyrovae.Model.setup_anndata(adata, batch="b")
    # the same keywords on the constructor are recorded too; unknown options name the valid ones
    m = pyrovae.Model(adata, model="cpa_vae", split_seed=5, **SMALL)
    assert adata.uns[SETUP_KEY]["split_seed"] == 5 and m.setup["split_seed"] == 5
    with pytest.raises(ValueError, match="training options such as max_epochs go to .train"):
        pyrovae.Model(adata, max_epochs=3)
    with pytest.raises(ValueError, match="unknown model"):
        pyrovae.Model(adata, model="scvi")
    with pytest.raises(ValueError, match="not trained"):
        m.get_latent_representation()


def test_a_written_and_reread_setup_is_used(tiny_adata, tmp_path):
    adata = tiny_adata.copy()
    pyrovae.Model.setup_anndata(adata, split_mode="combinations", heldout=["PG02+PG03"])
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    m = pyrovae.Model(back, model="cpa_vae", **SMALL)
    held = m.data.labels == "PG02+PG03"
    assert held.any() and (m.data.split[held] == "test").all()


def test_layer_of_raw_counts(tiny_adata):
    adata = tiny_adata.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()  # what scanpy users keep in X
    with pytest.raises(ValueError, match="non-integer values"):
        pyrovae.Model(adata, model="cpa_vae", **SMALL)
    m = pyrovae.Model(adata, model="cpa_vae", layer="counts", **SMALL).train(max_epochs=1, progress=False)
    assert m.data.is_count_data and m.setup["layer"] == "counts"
    assert m.get_latent_representation().shape == (adata.n_obs, 4)


def test_reprs_are_short(trained):
    adata, model = trained
    for obj in (model, model.data, model.run, model.posterior()):
        text = repr(obj)
        assert len(text) < 300, text
    assert "390 cells x 40 genes" in repr(model.data) and "trained 3 epochs" in repr(model)


# ------------------------------------------------------------------------------------------ training
def test_train_history_and_devices(trained, tiny_adata):
    adata, model = trained
    hist = model.history
    assert isinstance(hist, pd.DataFrame) and list(hist.index) == [1, 2, 3]
    assert {"train_loss", "val_loss"} <= set(hist.columns) and np.isfinite(hist["val_loss"]).all()
    assert model.device == pyrovae.resolve_device("auto")
    m = pyrovae.CPAVAE(tiny_adata.copy(), **SMALL)
    with pytest.raises(ValueError, match="unknown training option"):
        m.train(max_epoch=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU-only build|sees no GPU"):
            m.train(accelerator="gpu", **FAST)
    m.train(max_epochs=2, accelerator="cpu", early_stopping=False, batch_size=128, progress=False)
    assert m.run.train_cfg.patience > 2 and m.run.train_cfg.device == "cpu"
    m.train(max_epochs=3, resume=True, progress=False)  # continues the same run: 3 epochs in all
    assert list(m.history.index) == [1, 2, 3]


def test_train_then_ate_on_the_tiny_dataset(trained):
    adata, model = trained
    ate = model.get_ate(["PG01+PG02", "PG01", "control"], n_samples=200)
    assert list(ate.index) == ["PG01+PG02", "PG01", "control"] and list(ate.columns) == list(adata.var_names)
    assert np.isfinite(ate.to_numpy()).all()
    assert np.all(ate.loc["control"].to_numpy() == 0.0)  # common random numbers: control vs itself
    assert set(model.get_ate(n_samples=20).index) == set(model.data.groups())
    with pytest.raises(ValueError, match="unknown"):
        model.get_ate(["PG99"])


def test_predict_returns_an_anndata(trained):
    _, model = trained
    pred = model.predict(["PG01+PG02", "control"], n_cells=7)
    assert pred.shape == (14, 40) and list(pred.obs["perturbation"].unique()) == ["PG01+PG02", "control"]
    lib = model.predict(["PG01"], n_cells=5, library_size="data").obs["library_size"]
    assert (lib > 0).all()


# ----------------------------------------------------------------------------- aligned by obs_names
@pytest.mark.parametrize("give_mean", [True, False])
def test_latent_is_aligned_by_obs_names_under_shuffle_and_subset(trained, give_mean):
    adata, model = trained
    z = pd.DataFrame(model.get_latent_representation(give_mean=give_mean), index=adata.obs_names)
    assert z.shape == (adata.n_obs, 4) and np.isfinite(z.to_numpy()).all()
    perm = np.random.default_rng(1).permutation(adata.n_obs)
    shuffled = adata[perm].copy()
    zs = model.get_latent_representation(shuffled, give_mean=give_mean)
    np.testing.assert_allclose(zs, z.loc[shuffled.obs_names].to_numpy(), atol=1e-5)
    keep = np.flatnonzero(adata.obs["perturbation"].isin(["control", "PG02", "PG02+PG03"]))[::2]
    subset = adata[keep]  # a view, as scanpy users make them
    zsub = model.get_latent_representation(subset, give_mean=give_mean)
    np.testing.assert_allclose(zsub, z.loc[subset.obs_names].to_numpy(), atol=1e-5)
    part = model.get_latent_representation(indices=[5, 0], give_mean=give_mean)
    np.testing.assert_allclose(part, z.iloc[[5, 0]].to_numpy(), atol=1e-6)


def test_shifted_minus_basal_is_the_perturbation_effect(trained):
    """With give_mean and the same global draws, shifted - basal = the mean effect row d (E * M)."""
    adata, model = trained
    basal = model.get_latent_representation(n_samples=25)
    shifted = model.get_latent_representation(kind="shifted", n_samples=25)
    effect = model.get_perturbation_effects(n_samples=25)["effect"]
    labels = model.data.labels
    for lab in ("control", "PG03", "PG02+PG03"):
        rows = labels == lab
        want = np.zeros(4) if lab == "control" else effect.loc[lab.split("+")].sum(axis=0).to_numpy()
        np.testing.assert_allclose(
            shifted[rows] - basal[rows], np.broadcast_to(want, (rows.sum(), 4)), atol=1e-5
        )


def test_inplace_writes_obsm(trained):
    adata, model = trained
    out = model.get_latent_representation(inplace=True, key_added="X_test")
    assert out is None and adata.obsm["X_test"].shape == (adata.n_obs, 4)


def test_iwelbo_is_indexed_by_obs_names(trained):
    adata, model = trained
    iw = model.get_iwelbo(split="test", n_particles=4)
    assert set(iw.index) <= set(adata.obs_names) and np.isfinite(iw["iwelbo"]).all()
    sub = adata[:50]
    iws = model.get_iwelbo(sub, n_particles=4)
    assert list(iws.index) == list(sub.obs_names)
    with pytest.raises(ValueError, match="split= selects"):
        model.get_iwelbo(sub, split="test")


# ------------------------------------------------------------------------------------------ effects
def test_effects_and_mask_probabilities(trained, tiny_adata):
    adata, model = trained
    eff = model.get_perturbation_effects(n_samples=30)
    assert set(eff) == {"effect", "effect_sd", "mask_probability"}
    assert list(eff["effect"].index) == model.run.treatments and list(eff["effect"].columns) == [
        f"z{k}" for k in range(4)
    ]
    q = torch.sigmoid(model.module.effect.q_mask_logits).detach().numpy()
    np.testing.assert_allclose(eff["mask_probability"].to_numpy(), q, rtol=1e-6)
    assert (eff["effect_sd"].to_numpy() >= 0).all()
    cpa = pyrovae.Model(tiny_adata.copy(), model="cpa_vae", **SMALL).train(max_epochs=1, progress=False)
    assert set(cpa.get_perturbation_effects(n_samples=5)) == {"effect", "effect_sd"}
    with pytest.raises(ValueError, match="only for model 'gpo_vae'"):
        cpa.get_grn()
    cond = pyrovae.ConditionalVAE(tiny_adata.copy(), **SMALL).train(max_epochs=1, progress=False)
    assert cond.get_perturbation_effects() == {}
    assert cond.get_latent_representation().shape == (tiny_adata.n_obs, 4)
    with pytest.raises(ValueError, match="kind='basal'"):
        cond.get_latent_representation(kind="shifted")


def test_svae_plus_basal_removes_the_prior_shift(tiny_adata):
    m = pyrovae.SVAEPlus(tiny_adata.copy(), **SMALL).train(max_epochs=1, progress=False)
    assert m.setup["encode_combos_as_unique"] is True
    basal = m.get_latent_representation(n_samples=10)
    shifted = m.get_latent_representation(kind="shifted", n_samples=10)
    ctrl = m.data.labels == "control"
    np.testing.assert_allclose(basal[ctrl], shifted[ctrl], atol=1e-6)  # controls have no shift
    assert np.abs(basal[~ctrl] - shifted[~ctrl]).max() > 0


def test_gpo_vae_grn(tiny_adata):
    m = pyrovae.GPOVAE(tiny_adata.copy(), **SMALL).train(max_epochs=1, batch_size=128, progress=False)
    grn = m.get_grn()
    T = len(m.run.treatments)
    assert len(grn) == T * (T - 1) and grn["probability"].between(0, 1).all()
    eff = m.get_perturbation_effects(n_samples=5)
    assert list(eff["mask_probability"].columns) == m.run.treatments
    with pytest.raises(ValueError, match="kind='basal'"):
        m.get_latent_representation(kind="shifted")


# --------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "m")
    assert {"config.json", "schema.json", "best.pt", "last.pt", "metrics.csv"} <= {
        p.name for p in (tmp_path / "m").iterdir()
    }
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")
    back = pyrovae.Model.load(tmp_path / "m", adata)
    assert back.model_name == "sams_vae" and back.is_trained
    np.testing.assert_array_equal(
        back.predict(["PG01+PG02"], n_cells=30).X, model.predict(["PG01+PG02"], n_cells=30).X
    )
    pd.testing.assert_frame_equal(back.get_ate(["PG02"], n_samples=50), model.get_ate(["PG02"], n_samples=50))
    np.testing.assert_array_equal(back.get_latent_representation(), model.get_latent_representation())
    pd.testing.assert_frame_equal(back.history, model.history)
    # the CLI reads the same directory
    assert pyrovae.load_run(tmp_path / "m").model_cfg == model.model_cfg
    # validated against the AnnData it is given
    with pytest.raises(ValueError, match="gene mismatch"):
        pyrovae.Model.load(tmp_path / "m", adata[:, :30].copy())
    with pytest.raises(ValueError, match="pass the AnnData"):
        pyrovae.Model.load(tmp_path / "m")
    with pytest.raises(ValueError, match="not 'cpa_vae'"):
        pyrovae.CPAVAE.load(tmp_path / "m", adata)
    model.save(tmp_path / "m", overwrite=True, save_anndata=True)
    again = pyrovae.SAMSVAE.load(tmp_path / "m")
    assert list(again.adata.obs_names) == list(adata.obs_names)


def test_a_backed_anndata_stays_on_disk_and_gives_the_same_model(tiny_adata, tmp_path):
    path = tmp_path / "tiny.h5ad"
    tiny_adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    m = pyrovae.Model(backed, model="cpa_vae", **SMALL)
    assert not isinstance(m.data.counts, np.ndarray) and "backed" in repr(m.data)
    mem = pyrovae.Model(tiny_adata.copy(), model="cpa_vae", **SMALL)
    m.train(**FAST)
    mem.train(**FAST)
    np.testing.assert_allclose(m.history["val_loss"], mem.history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(m.get_latent_representation(), mem.get_latent_representation(), atol=1e-6)
    m.get_latent_representation(inplace=True)
    assert backed.isbacked and backed.obsm["X_pyrovae"].shape == (backed.n_obs, 4)


# -------------------------------------------------------------------------------------------- README
def _readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python section has no python block"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's example as written, with fewer epochs / draws (settings only, the calls unchanged)."""
    code = _readme_python_block()
    fast = code
    for slow, quick in (
        ("max_epochs=50", "max_epochs=2"),
        ("n_samples=2500", "n_samples=50"),
        ("n_cells=500", "n_cells=20"),
        ("n_draws=100", "n_draws=5"),
    ):
        assert slow in fast, f"the README example no longer has {slow}; update this test's replacements"
        fast = fast.replace(slow, quick)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(fast, "README.md", "exec"), namespace)
    assert "model" in namespace and namespace["model"].is_trained
    assert "X_pyrovae" in namespace["adata"].obsm
    assert (tmp_path / "runs" / "example" / "best.pt").exists()


def test_scvi_style_example_runs(tmp_path, capsys):
    """examples/scvi_style.py on the tiny preset (2 epochs): figure, saved model, annotated AnnData."""
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("scvi_style", ROOT / "examples" / "scvi_style.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "ex"
    assert example.main(["--out", str(out), "--preset", "tiny", "--epochs", "2", "--device", "cpu"]) == 0
    assert "identical predictions: True" in capsys.readouterr().out
    assert (out / "ate_scatter.png").exists() and (out / "model" / "best.pt").exists()
    back = ad.read_h5ad(out / "annotated.h5ad")
    assert back.obsm["X_pyrovae"].shape == (back.n_obs, 10) and "pyrovae_effects" in back.uns


def test_a_model_with_overridden_zoo_options_loads_as_its_named_model(tiny_adata, tmp_path):
    """SAMSVAE(guide="spike_slab") overrides a field its zoo entry sets (guide): the run records the name it
    was trained as, so SAMSVAE.load reads it back (it used to infer the name from the options and refuse)."""
    adata = tiny_adata.copy()
    pyrovae.SAMSVAE.setup_anndata(adata, perturbation_key="perturbation")
    model = pyrovae.SAMSVAE(adata, guide="spike_slab", **SMALL).train(**{**FAST, "max_epochs": 1})
    model.save(tmp_path / "m")
    back = pyrovae.SAMSVAE.load(tmp_path / "m", adata)
    assert back.model_name == "sams_vae" and back.model_cfg.guide == "spike_slab"


def test_a_cli_run_loads_into_the_python_api(tiny_adata, tmp_path):
    from pyrovae.cli import main

    path = tmp_path / "tiny.h5ad"
    tiny_adata.write_h5ad(path)
    net = [f"{k}={v}" for k, v in SMALL.items()]
    args = ["train", "--data", str(path), "--model", "cpa_vae", "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*args, "--device", "cpu", "--set", *net, "max_epochs=1"]) == 0
    model = pyrovae.CPAVAE.load(tmp_path / "run", ad.read_h5ad(path), accelerator="cpu")
    assert model.model_name == "cpa_vae" and len(model.history) == 1
    assert model.get_latent_representation().shape == (tiny_adata.n_obs, 4)


def test_unseen_perturbations_through_the_public_api(tiny_adata):
    """pyrovae.GPOVAE trained with held-out perturbations predicts them by its GRN transfer, says so in
    every output and does not warn; a SAMS-VAE on the same setup draws them from the prior and warns."""
    import warnings

    adata = simulate_perturbseq("tiny", seed=0, grn_shape="chain")
    pyrovae.Model.setup_anndata(adata, holdout_perturbations=["PG02"], qc_key="low_quality")
    gpo = pyrovae.GPOVAE(adata, **SMALL)
    gpo.train(max_epochs=1, batch_size=128, progress=False)
    post = gpo.posterior()
    assert post.untrained_method == "grn_transfer"
    pg02 = post.treatments.index("PG02")
    assert bool(post.untrained[pg02]) and not bool(post.untrained[post.treatments.index("PG01")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ate = gpo.get_ate(["PG01", "PG02", "PG02+PG05"], n_samples=30)
        cells = gpo.predict(["PG02", "control"], n_cells=4)
    assert ate.attrs["prediction"] == {"PG01": "trained", "PG02": "grn_transfer", "PG02+PG05": "grn_transfer"}
    assert np.isfinite(ate.to_numpy()).all() and not np.allclose(ate.loc["PG02"], 0.0)
    assert cells.obs["prediction"].tolist() == ["grn_transfer"] * 4 + ["trained"] * 4
    # the same seed gives the same unseen prediction
    pd.testing.assert_frame_equal(gpo.get_ate(["PG01", "PG02", "PG02+PG05"], n_samples=30), ate)
    sams = pyrovae.Model(adata, model="sams_vae", **SMALL)
    sams.train(max_epochs=1, batch_size=128, progress=False)
    with pytest.warns(UserWarning, match="drawn from the prior"):
        assert sams.get_ate(["PG02"], n_samples=10).attrs["prediction"] == {"PG02": "prior_draw"}
