"""The decoder's negative binomial (GammaPoissonMean) is Pyro's GammaPoisson on the clamped rate."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

from pyrovae.nn.likelihoods import LGAMMA_TABLE_SIZE, Decoder, GammaPoissonMean, count_lgammas

MIN_RATE = GammaPoissonMean.MIN_RATE


def _case(theta_scale: float, mean_scale: float, count_scale: float, dtype=torch.float32, seed: int = 0):
    """theta (G,), mean (P, B, G), counts (B, G) with zeros, at the given scales."""
    g = torch.Generator().manual_seed(seed)
    P, B, G = 3, 5, 7
    theta = (torch.rand(G, generator=g, dtype=dtype) + 0.5) * theta_scale
    mean = (torch.rand(P, B, G, generator=g, dtype=dtype) + 1e-3) * mean_scale
    counts = torch.poisson(torch.rand(B, G, generator=g, dtype=dtype) * count_scale, generator=g)
    counts[0] = 0.0  # zero counts
    return theta.requires_grad_(), mean.requires_grad_(), counts


def _pyro_reference(theta, mean, counts):
    return dist.GammaPoisson(theta, (theta / mean).clamp(min=MIN_RATE)).log_prob(counts)


def _value_and_grads(fn, theta, mean, counts):
    v = fn(theta, mean, counts)
    return (v, *torch.autograd.grad(v.sum(), [theta, mean]))


CASES = {  # theta, mean and count scales
    "typical": (1.0, 10.0, 10.0),
    "zero and tiny means": (1.0, 1e-4, 0.5),
    "large counts": (1.0, 3e4, 3e4),
    "tiny dispersion (theta large)": (1e5, 5.0, 5.0),
    "huge dispersion (theta small)": (1e-3, 5.0, 5.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_log_prob_and_gradients_equal_pyros_gamma_poisson(case):
    theta, mean, counts = _case(*CASES[case], dtype=torch.float64)
    got = _value_and_grads(lambda t, m, x: GammaPoissonMean(t, m).log_prob(x), theta, mean, counts)
    want = _value_and_grads(_pyro_reference, theta, mean, counts)
    for a, b, what in zip(got, want, ("value", "d/d theta", "d/d mean")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=what)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_float32_log_prob_is_within_float_rounding_of_torchs_negative_binomial(case, seed):
    """Against float64 torch NegativeBinomial (the same density while the clamp is inactive): within a few
    float32 ulps of the largest term, as the rate form is (at large counts both lose ~1e-2 nats to the
    cancellation of terms of ~1e6)."""
    theta, mean, counts = _case(*CASES[case], seed=seed)
    d = GammaPoissonMean(theta, mean)
    assert not d.clamp_active()
    t, m, x = theta.detach().double(), mean.detach().double(), counts.double()
    ref = torch.distributions.NegativeBinomial(total_count=t, logits=m.log() - t.log()).log_prob(x)
    scale = (torch.lgamma(t + x) + (x * m.log()).abs() + ((t + x) * (t + m).log()).abs()).max()
    tol = 4 * torch.finfo(torch.float32).eps * scale
    with torch.no_grad():
        assert (d.log_prob(counts).double() - ref).abs().max() <= tol
        assert (_pyro_reference(theta, mean, counts).double() - ref).abs().max() <= tol  # the same bound


def test_the_clamped_corner_takes_the_rate_form_and_equals_pyros():
    theta = torch.tensor([1e-3, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    mean = torch.tensor([[5e3, 1.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([[4.0, 0.0, 2.0], [0.0, 7.0, 1.0]], dtype=torch.float64)
    d = GammaPoissonMean(theta, mean)
    assert d.clamp_active()  # theta / m = 2e-7 < 1e-6 in one entry
    got = _value_and_grads(lambda t, m, x: GammaPoissonMean(t, m).log_prob(x), theta, mean, counts)
    want = _value_and_grads(_pyro_reference, theta, mean, counts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not GammaPoissonMean(theta, mean.detach().clamp(max=10.0)).clamp_active()


def test_both_forms_agree_and_the_rate_form_switch(monkeypatch):
    theta, mean, counts = _case(1.0, 10.0, 10.0, dtype=torch.float64)
    fast = _value_and_grads(lambda t, m, x: GammaPoissonMean(t, m).log_prob(x), theta, mean, counts)
    monkeypatch.setattr(GammaPoissonMean, "log_domain", False)
    rate_form = _value_and_grads(lambda t, m, x: GammaPoissonMean(t, m).log_prob(x), theta, mean, counts)
    for a, b in zip(fast, rate_form):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_distribution_interface_shapes_sampling_and_moments():
    theta, mean, counts = _case(2.0, 10.0, 10.0)
    d = GammaPoissonMean(theta, mean)
    ref = dist.GammaPoisson(theta, (theta / mean).clamp(min=MIN_RATE))
    assert d.batch_shape == (3, 5, 7) and d.event_shape == ()
    torch.testing.assert_close(d.mean, ref.mean)
    torch.testing.assert_close(d.variance, ref.variance)
    big = d.expand(torch.Size([2, 3, 5, 7]))
    assert big.batch_shape == (2, 3, 5, 7)
    torch.testing.assert_close(big.log_prob(counts), ref.expand(torch.Size([2, 3, 5, 7])).log_prob(counts))
    assert d.to_event(1).log_prob(counts).shape == (3, 5)
    torch.manual_seed(0)
    a = d.sample(torch.Size([2]))
    torch.manual_seed(0)
    b = ref.sample(torch.Size([2]))
    assert a.shape == (2, 3, 5, 7) and torch.equal(a, b)  # the same draws for the same seed
    with pytest.raises(ValueError):
        GammaPoissonMean(-theta, mean, validate_args=True)


def test_decoder_nb_is_the_mean_parametrised_gamma_poisson():
    torch.manual_seed(0)
    dec = Decoder(4, 6, 8, 1, "nb")
    u, lib = torch.randn(2, 3, 4), torch.tensor([100.0, 200.0, 50.0])
    d = dec(u, lib)
    mu = lib.unsqueeze(-1) * dec.mean_fraction(u)
    x = torch.poisson(mu.detach()[0])
    theta = dec.log_theta.exp()
    ref = dist.GammaPoisson(theta, (theta / (mu + 1e-4)).clamp(min=MIN_RATE)).to_event(1)
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))


@pytest.mark.parametrize("top", [5.0, 500.0])  # within the table / beyond it (some entries computed directly)
def test_count_lgammas_table_equals_the_direct_terms(top):
    g = torch.Generator().manual_seed(1)
    theta = (torch.rand(9, generator=g) * 3 + 0.01).requires_grad_()
    x = torch.poisson(torch.rand(4, 6, 9, generator=g) * top, generator=g)
    x[0, 0] = 0.0
    assert (x.max() >= LGAMMA_TABLE_SIZE) == (top > LGAMMA_TABLE_SIZE)
    got = count_lgammas(theta, x)
    want = torch.lgamma(theta + x) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
    assert torch.equal(got, want)  # the same float32 arithmetic on the same numbers
    up = torch.randn(x.shape, generator=g)
    (g1,) = torch.autograd.grad((got * up).sum(), theta)
    (g2,) = torch.autograd.grad((want * up).sum(), theta)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


def test_count_lgammas_computes_non_integer_or_negative_values_directly():
    theta = torch.tensor([0.5, 2.0])
    for x in (torch.tensor([[0.5, 1.0]]), torch.tensor([[-1.0, 2.0]]), torch.zeros(0, 2)):
        want = torch.lgamma(theta + x) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
        torch.testing.assert_close(count_lgammas(theta, x), want, equal_nan=True)
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)  # counts with a gradient: directly, differentiable
    count_lgammas(theta, x).sum().backward()
    assert x.grad is not None
