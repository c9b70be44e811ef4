"""The FLOP-saving paths compute the same function: split first layers, row lookups, sparse dosages."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from bench.benchmark import synthetic_data
from pyrovae.data.loader import MinibatchLoader
from pyrovae.models import effects, penalties
from pyrovae.models.zoo import MODEL_ZOO, build_model, model_config
from pyrovae.nn import likelihoods
from pyrovae.nn.likelihoods import GammaPoissonMean
from pyrovae.nn.mlp import GaussianMLP
from pyrovae.train.trainer import make_elbo, split_counts


def _naive_parts(net, parts):
    lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts if not isinstance(p, int)))
    full = [
        torch.eye(p).expand(lead + (p,)) if isinstance(p, int) else p.expand(lead + p.shape[-1:])
        for p in parts
    ]
    return net(torch.cat(full, dim=-1))


def _pyro_gamma_poisson(concentration, mean):
    rate = (concentration / mean).clamp(min=GammaPoissonMean.MIN_RATE)
    return dist.GammaPoisson(concentration, rate)


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_forward_parts_equals_forward_on_the_concatenation(layers):
    torch.manual_seed(0)
    net = GaussianMLP(7 + 3 + 5, 4, 6, layers)
    x = torch.randn(5, 7, requires_grad=True)  # shared by the particles
    zp = torch.randn(3, 5, 3, requires_grad=True)  # one per particle
    got = net.forward_parts([x, zp, 5])
    want = _naive_parts(net, [x, zp, 5])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    grads_got = torch.autograd.grad(sum(g.sum() for g in got), [x, zp, *net.parameters()])
    grads_want = torch.autograd.grad(sum(w.sum() for w in want), [x, zp, *net.parameters()])
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_forward_parts_checks_the_width():
    net = GaussianMLP(6, 2, 4, 1)
    with pytest.raises(ValueError, match="features"):
        net.forward_parts([torch.zeros(3, 4)])


@pytest.mark.parametrize("hot", [1, 2])
def test_sparse_dosage_product_equals_the_dense_product(hot):
    rng = np.random.default_rng(0)
    B, T, K, P = 40, 30, 4, 3
    d = np.zeros((B, T), dtype=np.float32)
    for i in range(B):
        if i % 5:  # some controls (all-zero rows)
            d[i, rng.choice(T, hot, replace=False)] = 1.0
    d = torch.as_tensor(d)
    rows = torch.randn(P, T, K, requires_grad=True)
    got = effects.matmul_dosage(d, rows)
    want = torch.matmul(d, rows)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(*(torch.autograd.grad(v.pow(2).sum(), rows)[0] for v in (got, want)))
    dense = torch.rand(B, T)  # not sparse: the plain product
    torch.testing.assert_close(effects.matmul_dosage(dense, rows), torch.matmul(dense, rows))


@pytest.mark.parametrize("name", sorted(MODEL_ZOO))
def test_every_model_has_the_same_loss_and_gradients_as_with_the_plain_products(name, monkeypatch):
    """Before/after: the ELBO and its gradients with the fast paths equal those with cat + dense matmuls."""
    data = synthetic_data(150, 12, 10, seed=2)  # T = 10 > 8 and one-hot: the sparse dosage path runs

    def loss_and_grads():
        model = build_model(
            model_config(name, n_latent=3, decoder_hidden=8, encoder_hidden=8),
            12,
            10,
            data.norm_mean,
            data.norm_std,
            seed=0,
        )
        batch = next(iter(MinibatchLoader(data, "train", 60, shuffle=True, seed=0)))
        counts = split_counts(model, data, "train", "cpu")
        n = len(data.indices("train"))
        w = model.global_weights(batch, counts, n, "per_treatment")
        pyro.set_rng_seed(5)
        loss = make_elbo(3).loss_and_grads(model.model, model.guide, batch, n, w, 1.0 / n)
        extras = model.extra_losses(batch)
        if extras:
            sum(extras.values()).backward()
        return loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    fast_loss, fast_grads = loss_and_grads()
    monkeypatch.setattr(GaussianMLP, "forward_parts", _naive_parts)
    monkeypatch.setattr(effects, "matmul_dosage", torch.matmul)
    monkeypatch.setattr(penalties, "matmul_dosage", torch.matmul)
    monkeypatch.setattr(likelihoods, "GammaPoissonMean", _pyro_gamma_poisson)
    plain_loss, plain_grads = loss_and_grads()
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert fast_grads.keys() == plain_grads.keys()
    for k in fast_grads:
        torch.testing.assert_close(fast_grads[k], plain_grads[k], rtol=1e-4, atol=1e-6, msg=k)
