"""GPO-VAE / CRADLE-VAE penalties against hand computations, and short training runs on simulated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyrovae.models.penalties import CounterfactualKL, GRNAlignment, k_hop_accumulation
from pyrovae.models.zoo import build_model, model_config


def _gpo(T: int = 2, G: int = 6):
    cfg = model_config("gpo_vae", n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8)
    return build_model(cfg, G, T, seed=0)


# ------------------------------------------------------------------------------------------ K-hop
def test_k_hop_2x2_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(k_hop_accumulation(w, 0), w)
    # W^2 = [[7, 10], [15, 22]];  S = W + W^2 / 2
    s1 = torch.tensor([[4.5, 7.0], [10.5, 15.0]])
    torch.testing.assert_close(k_hop_accumulation(w, 1), s1)
    # W^3 = [[37, 54], [81, 118]];  S = W + W^2/2 + W^3/4
    s2 = s1 + torch.tensor([[9.25, 13.5], [20.25, 29.5]])
    torch.testing.assert_close(k_hop_accumulation(w, 2), s2)


def test_k_hop_3x3_matches_power_sum():
    w = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.5, -0.5], [1.0, 0.25, -2.0]], dtype=torch.float64)
    T, K = 3, 5
    expect = sum(np.linalg.matrix_power(w.numpy(), k) / T ** (k - 1) for k in range(1, K + 2))
    np.testing.assert_allclose(k_hop_accumulation(w, K).numpy(), expect, rtol=1e-12)


# ------------------------------------------------------------------------------------------ GRN loss
def test_grn_alignment_and_sparsity_by_hand():
    model = _gpo(T=2)
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    with torch.no_grad():
        model.effect.q_mask_logits.copy_(w)
    # hops = 1: W^2 = [[0.5, -3], [1.5, 3.5]], S = W + W^2 / 2 = [[1.25, -2.5], [1.25, 3.75]]
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # A, B, A+B (multi-hot), control
    dx = torch.tensor([[2.0, 0.0], [0.5, 4.0], [1.0, 1.0], [0.2, 0.3]])
    c = 0.5
    # d S = [[1.25, -2.5], [1.25, 3.75], [2.5, 1.25], [0, 0]];  target = dx - c
    # residuals |dS - target|: [0.25, 2.0], [1.25, 0.25], [2.0, 0.75], [0.3, 0.2]  -> sum 7.0, mean 7/8
    penalty = GRNAlignment(weight=100.0, threshold=c, hops=1, sparsity_weight=2.0)
    out = penalty(model, {"d": d, "delta_x": dx})
    assert out["grn_alignment"].item() == pytest.approx(100.0 * 7.0 / 8.0, rel=1e-6)
    sig = [1 / (1 + math.exp(-v)) for v in (1.0, -1.0, 0.5, 2.0)]
    assert out["grn_sparsity"].item() == pytest.approx(2.0 * sum(sig) / 4.0, rel=1e-6)
    # gradients reach W
    sum(out.values()).backward()
    assert model.effect.q_mask_logits.grad is not None
    assert torch.isfinite(model.effect.q_mask_logits.grad).all()


def test_grn_alignment_needs_delta_x():
    model = _gpo(T=2)
    with pytest.raises(ValueError, match="delta_x"):
        GRNAlignment()(model, {"d": torch.zeros(1, 2)})


# ------------------------------------------------------------------------------------------ cf-KL
def test_counterfactual_kl_is_closed_form_gaussian_kl(monkeypatch):
    model = _gpo(T=2, G=4)
    B, K = 3, 3
    gen = torch.Generator().manual_seed(0)
    loc1, loc2 = torch.randn(B, K, generator=gen), torch.randn(B, K, generator=gen)
    sd1, sd2 = torch.rand(B, K, generator=gen) + 0.5, torch.rand(B, K, generator=gen) + 0.5
    batch = {
        "x": torch.ones(B, 4),
        "cfx": 2 * torch.ones(B, 4),
        "d": torch.zeros(B, 2),
        "qc": torch.tensor([[0.0], [1.0], [0.0]]),
        "has_cf": torch.tensor([1.0, 1.0, 0.0]),
        "library_size": torch.full((B,), 4.0),
    }
    seen = []

    def fake(x, b, g, flip_qc=False):
        seen.append(flip_qc)
        return (loc1, sd1) if x is b["cfx"] else (loc2, sd2)

    monkeypatch.setattr(model, "encoder_dist", fake)
    out = CounterfactualKL(weight=0.1)(model, batch)
    # closed form: KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    kl = torch.log(sd2 / sd1) + (sd1**2 + (loc1 - loc2) ** 2) / (2 * sd2**2) - 0.5
    expect = 0.1 * (kl.sum(-1) * batch["has_cf"]).sum() / B
    assert out["counterfactual_kl"].item() == pytest.approx(expect.item(), rel=1e-5)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc1, sd1), torch.distributions.Normal(loc2, sd2)
    )
    assert out["counterfactual_kl"].item() == pytest.approx(
        0.1 * (ref.sum(-1) * batch["has_cf"]).sum().item() / B, rel=1e-5
    )
    assert seen == [True, True]  # both encodings flip the QC status


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny_gpo_data():
    from pyrovae.data.anndata import load_perturbation_data
    from pyrovae.data.prepare import prepare_gpo_data
    from pyrovae.simulate import simulate_perturbseq

    adata = simulate_perturbseq("tiny", seed=0)
    return prepare_gpo_data(load_perturbation_data(adata), qc_key="low_quality", seed=0)


def test_gpo_vae_defaults_depart_from_the_reference_which_stays_available():
    from pyrovae.models.zoo import GPO_ALIGNMENT

    gpo, ref = model_config("gpo_vae"), model_config("gpo_vae_reference")
    assert (gpo.grn.singles_only, gpo.grn.target, gpo.grn.weight) == (True, "group", 1000.0)
    assert GPO_ALIGNMENT == {"grn_singles_only": True, "grn_target": "group", "grn_weight": 1000.0}
    # the reference: every cell, per-cell |delta_x|, GRN weight 100
    assert (ref.grn.singles_only, ref.grn.target, ref.grn.weight) == (False, "cell", 100.0)
    # everything else is the same model
    same = {k: v for k, v in gpo.to_dict().items() if k not in GPO_ALIGNMENT}
    assert same == {k: v for k, v in ref.to_dict().items() if k not in GPO_ALIGNMENT}
    pen = build_model(gpo, 6, 2, seed=0).penalties[-1]
    assert (pen.singles_only, pen.target, pen.weight) == (True, "group", 1000.0)


@pytest.mark.parametrize("name", ["gpo_vae", "gpo_vae_reference", "cradle_vae"])
def test_trains_with_penalties_on_tiny_simulation(tiny_gpo_data, name):
    from pyrovae.train.trainer import TrainConfig, Trainer

    data = tiny_gpo_data
    assert (data.dosage.getnnz(axis=1) == 2).any()  # combinations: multi-hot rows
    cfg = model_config(name, n_latent=4, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=16)
    model = build_model(cfg, data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=0)
    hist = Trainer(model, data, TrainConfig(max_epochs=3, batch_size=128, lr=3e-3, n_particles=2)).fit(
        progress=False
    )
    assert len(hist) == 3
    for rec in hist:
        assert all(math.isfinite(v) for v in rec.values())
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert "counterfactual_kl" in hist[0]
    if name.startswith("gpo_vae"):
        assert {"grn_alignment", "grn_sparsity"} <= set(hist[0])
        assert model.effect.q_mask_logits.shape == (data.n_treatments, data.n_treatments)
    for p in model.parameters():
        assert torch.isfinite(p).all()


# ------------------------------------------------------------------------------ unseen perturbations
def _schema(T: int, G: int, counts: list[int]) -> dict:
    return {
        "genes": [f"g{j}" for j in range(G)],
        "treatments": [f"P{t}" for t in range(T)],
        "control_label": "control",
        "sep": "+",
        "train_treatment_counts": counts,
    }


def _gpo_with_grn(T: int = 4, G: int = 6):
    model = _gpo(T, G)
    w = torch.full((T, T), -20.0)
    w[0, 1] = w[0, 2] = 20.0  # seen P0 reaches P1 and P2
    w[1, 2] = 20.0  # seen P1 reaches P2
    w[2, 3] = 20.0  # unseen P2 -> P3 (trained only through K-hop paths)
    with torch.no_grad():
        model.effect.q_mask_logits.copy_(w)
    return model


def test_posterior_predicts_unseen_perturbations_by_grn_transfer():
    import warnings

    from pyrovae.predict.posterior import Posterior

    model = _gpo_with_grn()
    schema = _schema(4, 6, [10, 10, 0, 0])  # P2 held out, P3 never perturbed
    post = Posterior(model, schema)
    assert post.untrained_method == "grn_transfer"
    assert post.prediction_methods(["P0", "P2", "P0+P2", "control"]) == {
        "P0": "trained",
        "P2": "grn_transfer",
        "P0+P2": "grn_transfer",
        "control": "trained",
    }
    g = post.global_samples(50, seed=3)
    m, e = torch.as_tensor(g["mask"]), torch.as_tensor(g["E"])
    # the unseen row's mask is its GRN row (P2 -> P3) plus the self effect; seen rows are q's draws
    torch.testing.assert_close(m[:, 2], torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(50, 4))
    torch.testing.assert_close(m[:, 0], torch.tensor([0.0, 1.0, 1.0, 0.0]).expand(50, 4))
    # effect on P2's own coordinate: the mean over the seen rows reaching P2 (P0 and P1)
    torch.testing.assert_close(e[:, 2, 2], (e[:, 0, 2] + e[:, 1, 2]) / 2)
    # P3's coordinate: no seen row acts on it, so 0
    torch.testing.assert_close(e[:, 2, 3], torch.zeros(50))
    # the same seed gives the same draws; the prior-draw control differs on the unseen row only
    np.testing.assert_array_equal(post.global_samples(50, seed=3)["E"], g["E"])
    prior = Posterior(model, schema, transfer=False)
    assert prior.untrained_method == "prior_draw"
    gp = prior.global_samples(50, seed=3)
    np.testing.assert_array_equal(gp["E"][:, :2], g["E"][:, :2])
    assert not np.allclose(gp["E"][:, 2], g["E"][:, 2])
    # every output states the method; GPO's transfer does not warn, the prior draw does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ate = post.model_ate(["P0", "P2"], n_samples=20, seed=0)
        cells = post.predict(["P2", "control"], n_cells=3, seed=0)
    assert ate.attrs["prediction"] == {"P0": "trained", "P2": "grn_transfer"}
    assert cells.obs["prediction"].tolist() == ["grn_transfer"] * 3 + ["trained"] * 3
    assert cells.uns["pyrovae_sample"]["prediction"] == {"P2": "grn_transfer", "control": "trained"}
    with pytest.warns(UserWarning, match="prior"):
        assert prior.model_ate(["P2"], n_samples=20).attrs["prediction"] == {"P2": "prior_draw"}
    # the unseen prediction is not the prior's: the transfer moves P2's own coordinate like P0 and P1 do
    with pytest.warns(UserWarning, match="prior"):
        assert not np.allclose(ate.loc["P2"], prior.model_ate(["P2"], n_samples=20).loc["P2"])


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("sams_vae", "prior_draw"),
        ("cpa_vae", "prior_draw"),
        ("svae_plus", "no_shift"),
        ("conditional_vae", "untrained_weights"),
    ],
)
def test_every_model_states_how_it_predicts_unseen_perturbations(name, method):
    from pyrovae.predict.posterior import Posterior

    cfg = model_config(name, n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=8)
    model = build_model(cfg, 6, 3, seed=0)
    post = Posterior(model, _schema(3, 6, [5, 5, 0]))
    assert model.effect.untrained_method() == method and post.untrained_method == method
    assert post.prediction_methods(["P0", "P2"]) == {"P0": "trained", "P2": method}
    if method in ("prior_draw", "untrained_weights"):
        with pytest.warns(UserWarning, match="no training cell"):
            post.model_ate(["P2"], n_samples=5)
    # a trained perturbation never warns
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post.model_ate(["P0"], n_samples=5)


def test_removed_options_are_refused_now_and_read_in_old_runs_configs():
    """grn_hop_norm and mask_baseline are gone: an option the user gives is unknown, a run's stored config
    with the one value they had left loads, and one with a removed value is one clear error."""
    from pyrovae.models.zoo import ModelConfig

    for name, value in (("grn_hop_norm", "T"), ("mask_baseline", "decaying_avg")):
        with pytest.raises(ValueError, match=name):
            model_config("gpo_vae", **{name: value})
    stored = {**model_config("gpo_vae").to_dict(), "grn_hop_norm": "T", "mask_baseline": "decaying_avg"}
    assert ModelConfig.from_stored(stored) == model_config("gpo_vae")
    with pytest.raises(ValueError, match="mask_baseline='learned', an option removed"):
        ModelConfig.from_stored({**stored, "mask_baseline": "learned"})
    with pytest.raises(ValueError, match="grn_hop_norm='knockdown', an option removed"):
        ModelConfig.from_stored({**stored, "grn_hop_norm": "knockdown"})


def test_grn_alignment_group_target():
    model = _gpo(T=2)
    d = torch.tensor([[1.0, 0.0]])
    batch = {"d": d, "delta_x": torch.tensor([[5.0, 5.0]]), "delta_x_group": torch.tensor([[1.0, 0.2]])}
    w = model.effect.q_mask_logits.detach()
    out = GRNAlignment(weight=1.0, threshold=0.5, hops=0, sparsity_weight=0.0, target="group")(model, batch)
    expect = (d @ w - (batch["delta_x_group"] - 0.5)).abs().mean()
    assert out["grn_alignment"].item() == pytest.approx(expect.item())
    with pytest.raises(ValueError, match="delta_x_group"):
        GRNAlignment(target="group")(model, {"d": d, "delta_x": batch["delta_x"]})
    with pytest.raises(ValueError, match="grn_target"):
        GRNAlignment(target="bad")


def test_grn_alignment_singles_only_ignores_combination_cells():
    model = _gpo(T=2)
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # a single and a combination cell
    dx = torch.tensor([[1.0, 0.2], [3.0, 3.0]])
    w = model.effect.q_mask_logits.detach()
    pen = GRNAlignment(weight=1.0, threshold=0.5, hops=0, sparsity_weight=0.0, singles_only=True)
    out = pen(model, {"d": d, "delta_x": dx})
    expect = (d[:1] @ w - (dx[:1] - 0.5)).abs().mean()
    assert out["grn_alignment"].item() == pytest.approx(expect.item())
    every = GRNAlignment(weight=1.0, threshold=0.5, hops=0, sparsity_weight=0.0)(
        model, {"d": d, "delta_x": dx}
    )
    assert every["grn_alignment"].item() == pytest.approx((d @ w - (dx - 0.5)).abs().mean().item())
    # a batch of combinations only: no alignment term, but still a tensor in the graph
    none = pen(model, {"d": d[1:], "delta_x": dx[1:]})
    assert none["grn_alignment"].item() == 0.0
