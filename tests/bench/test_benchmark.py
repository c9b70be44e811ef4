"""The benchmark script: its plain-torch SAMS-VAE is the same objective as pyrovae's, and --quick runs."""

from __future__ import annotations

import csv
import math

import pyro
import pytest
import torch

from bench import benchmark
from pyrovae.data.loader import MinibatchLoader
from pyrovae.models.zoo import build_model, model_config
from pyrovae.train.trainer import make_elbo, split_counts


@pytest.mark.parametrize("n_treatments", [5, 12])  # 12: pyrovae takes its sparse dosage path
@pytest.mark.parametrize("fused", [False, True])
def test_plain_torch_loss_equals_pyro_loss_on_the_same_draws(fused, n_treatments):
    data = benchmark.synthetic_data(120, 15, n_treatments, seed=1)
    model = build_model(
        model_config(
            "sams_vae_reference", n_latent=3, decoder_hidden=8, encoder_hidden=8, embedding_encoder_hidden=6
        ),
        data.n_genes,
        data.n_treatments,
        data.norm_mean,
        data.norm_std,
        seed=0,
    )
    with torch.no_grad():  # masks away from 0.5 so that hard draws differ between rows
        model.effect.q_mask_logits.normal_(0.0, 2.0)
    batch = next(iter(MinibatchLoader(data, "train", 40, shuffle=True, seed=0)))
    counts = split_counts(model, data, "train", "cpu")
    n = len(data.indices("train"))
    w = model.global_weights(batch, counts, n, "per_treatment")
    pyro.set_rng_seed(3)
    want = make_elbo(4).loss(model.model, model.guide, batch, n, w, 1.0 / n)
    pyro.set_rng_seed(3)
    got = benchmark.plain_sams_loss(model, batch, n, counts["perturbations"], 4, fused=fused)
    assert math.isfinite(want)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    got.backward()  # and it is differentiable in every network
    assert model.effect.q_E_net.loc.weight.grad is not None and model.encoder.loc.weight.grad is not None
    assert model.effect.q_mask_logits.grad.abs().sum() > 0


def test_quick_benchmark_writes_the_table(tmp_path):
    out = tmp_path / "quick.csv"
    argv = ["--quick", "--models", "sams_vae_reference,cpa_vae", "--out", str(out), "--warmup", "1"]
    argv += ["--before", "--previous"]
    assert benchmark.main(argv) == 0
    with open(out) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == benchmark.COLUMNS
    assert [(r["model"], r["impl"]) for r in rows] == [
        ("sams_vae_reference", "pyro"),
        ("sams_vae_reference", "pyro_before"),
        ("sams_vae_reference", "pyro_prev"),
        ("sams_vae_reference", "pyro_validated"),
        ("sams_vae_reference", "torch"),
        ("sams_vae_reference", "torch_fused"),
        ("cpa_vae", "pyro"),
        ("cpa_vae", "pyro_before"),
        ("cpa_vae", "pyro_prev"),
    ]
    for r in rows:
        for c in benchmark.COLUMNS[2:]:
            if c in benchmark.OPTIONAL_COLUMNS and r[c] == "":
                evaluated = r["impl"] in ("pyro", "pyro_before", "pyro_prev")
                assert (c in benchmark.EVAL_COLUMNS and not evaluated) or (
                    c in ("vs_before", "vs_prev") and r["impl"] != "pyro"
                ), (c, r)
                continue
            v = float(r[c])
            assert math.isfinite(v), (c, r)
            assert v >= 0 if c.endswith("_mb") or c == "step_iqr_ms" else v > 0, (c, r)
    assert float(rows[4]["vs_torch"]) == 1.0 and float(rows[5]["vs_fused"]) == 1.0
    assert rows[0]["vs_before"] != "" and rows[0]["vs_prev"] != ""


def test_plain_paths_restore_the_fast_paths():
    from pyrovae.models.effects import additive as effects
    from pyrovae.nn import likelihoods
    from pyrovae.nn.mlp import GaussianMLP

    fast = (GaussianMLP.forward_parts, effects.matmul_dosage, likelihoods.GammaPoissonMean)
    with benchmark.plain_paths():
        assert effects.matmul_dosage is torch.matmul
    assert (GaussianMLP.forward_parts, effects.matmul_dosage, likelihoods.GammaPoissonMean) == fast
    with benchmark.previous_paths():
        assert not likelihoods.GammaPoissonMean.log_domain
    assert likelihoods.GammaPoissonMean.log_domain


def test_scale_run_smoke(tmp_path):
    from bench import scale_run

    out = tmp_path / "scale.csv"
    argv = [
        "scale",
        "--cells",
        "1200",
        "--genes",
        "60",
        "--perturbations",
        "8",
        "--latent",
        "4",
        "--hidden",
        "16",
    ]
    argv += ["--batch-size", "128", "--iwelbo-particles", "4", "--workdir", str(tmp_path), "--out", str(out)]
    assert scale_run.main(argv) == 0
    with open(out) as f:
        rows = {r["phase"]: r for r in csv.DictReader(f)}
    assert list(rows) == [
        "write h5ad (chunked)",
        "read backed + validate",
        "train sams_vae_reference, 1 epoch (+ validation)",
        "IWELBO (4 particles)",
    ]
    for r in rows.values():
        assert float(r["seconds"]) > 0 and float(r["peak_rss_mb"]) > 0
    assert math.isfinite(float(rows["IWELBO (4 particles)"]["iwelbo"]))
    assert int(float(rows["train sams_vae_reference, 1 epoch (+ validation)"]["cells"])) > 0
    # GPO-VAE on the same file: its preparation phase (compact extras), capped steps, the model ATE
    gpo = tmp_path / "gpo.csv"
    argv[argv.index(str(out))] = str(gpo)
    argv += ["--model", "gpo_vae", "--max-steps", "3", "--ate-samples", "20", "--iwelbo-cells", "50"]
    assert scale_run.main(argv) == 0
    with open(gpo) as f:
        rows = {r["phase"]: r for r in csv.DictReader(f)}
    prep = rows["prepare (qc_flags, counterfactuals, grn_targets)"]
    assert 0 < float(prep["extras_mb"]) < float(prep["extras_dense_mb"])
    assert int(float(rows["train gpo_vae, 3 steps (+ validation)"]["cells"])) == 3 * 128
    assert int(float(rows["IWELBO (4 particles)"]["cells"])) == 50
    assert float(rows["model ATE (20 samples, 8 perturbations)"]["samples_per_s"]) > 0


def test_wide_smoke(tmp_path):
    from bench import wide

    out = tmp_path / "wide.csv"
    argv = ["--models", "cradle_vae", "--treatments", "30", "--genes", "40", "--latent", "3", "--hidden", "8"]
    argv += ["--steps", "1", "--iwelbo-cells", "8", "--iwelbo-particles", "3", "--ate-samples", "10"]
    argv += ["--compare-iwelbo", "cradle_vae", "--batch-size", "32", "--out", str(out)]
    assert wide.main(argv) == 0
    with open(out) as f:
        rows = {r["phase"]: r for r in csv.DictReader(f)}
    before = rows["cradle_vae T=30: IWELBO (before: checks and global parts on every batch)"]
    assert before["same_numbers"] == "True"
    assert float(rows["cradle_vae T=30: model ATE"]["samples_per_s"]) > 0


def test_log_domain_negative_binomial_is_the_same_density():
    from bench import nb_logprob

    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    x = torch.poisson(torch.full((7, 11), 2.0, dtype=torch.float64), generator=g)
    lib = torch.rand(7, generator=g, dtype=torch.float64) * 100 + 10
    log_theta = torch.randn(11, generator=g, dtype=torch.float64)
    want = nb_logprob.nb_rate_form(out, log_theta, x, lib)
    got = nb_logprob.nb_log_domain(out, log_theta, x, lib)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(nb_logprob.nb_pyrovae(out, log_theta, x, lib), want, rtol=1e-10, atol=1e-10)
    m = lib.unsqueeze(-1) * torch.softmax(out, -1) + 1e-4  # both are the NB density of mean m
    ref = torch.distributions.NegativeBinomial(total_count=log_theta.exp(), probs=m / (m + log_theta.exp()))
    ref = ref.log_prob(x)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8)
