"""Mask-logit gradient estimators: unbiased where claimed (closed-form expected gradient), the Bernoulli
mask log-density under every estimator, the temperature schedule, training with each."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceGraph_ELBO

from pyrovae.data.loader import MinibatchLoader
from pyrovae.models.effects import CELL_PLATE, MASK_ESTIMATORS, AdditiveEffect
from pyrovae.models.options import MaskOptions
from pyrovae.models.zoo import build_model, model_config
from pyrovae.train.trainer import TrainConfig, Trainer, make_elbo
from tests.helpers import assert_trains

# the tiny model: T = 3 treatments (the third has no cell), K = 2, mean-field q(E) held fixed,
# y_i ~ N(d_i (E * M), sigma^2 I); cells 0-1 got treatment 0, cells 2-4 treatment 1, cell 5 is a control
ALPHA, SIGMA = 0.2, 0.7
LOGITS = torch.tensor([[0.4, -0.8], [1.2, 0.0], [-0.5, 0.3]])
E_LOC = torch.tensor([[1.5, -1.0], [0.5, 2.0], [1.0, 1.0]])
E_SCALE = torch.tensor([[0.3, 0.5], [0.4, 0.2], [1.0, 1.0]])
D = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [0, 1], [0, 0]])
D = torch.cat([D, torch.zeros(6, 1)], dim=1)
Y = torch.tensor([[1.2, -0.3], [2.0, 0.1], [0.2, 1.9], [0.9, 2.4], [0.1, 1.5], [0.3, -0.2]])


class TinyModel:
    """The effect block alone with a Gaussian observation per cell (signature of PerturbationVAE)."""

    def __init__(self, estimator: str, guide: str = "mean_field", **kw):
        """``kw``: mask options by key (``temperature``, ``mask_freeze_steps``, ...)."""
        field = {key: name for name, key in MaskOptions.KEYS.items()}
        masks = MaskOptions(estimator=estimator, **{field[k]: v for k, v in kw.items()})
        self.effect = AdditiveEffect(3, 2, mask_prior=ALPHA, guide=guide, masks=masks)
        with torch.no_grad():
            self.effect.q_mask_logits.copy_(LOGITS)
            self.effect.q_E_loc.copy_(E_LOC)
            self.effect.q_E_log_scale.copy_((E_SCALE - 1e-4).log())

    def model(self, batch):
        g = self.effect.model_globals(None)
        with pyro.plate(CELL_PLATE, batch["d"].shape[0], dim=-1):
            loc = self.effect.shift(batch["d"], g)
            pyro.sample("y", dist.Normal(loc, SIGMA).to_event(1), obs=batch["y"])

    def guide(self, batch):
        self.effect.guide_globals(None)


def exact_gradient() -> torch.Tensor:
    """d ELBO / d logits in closed form: for m ~ Bern(p), e ~ N(mu, s^2) and each cell of treatment t,
    E log N(y; e m, sigma^2) = const - (y^2 - 2 y mu p + p (mu^2 + s^2)) / (2 sigma^2); the mask KL gives
    -p (1 - p) (logit - logit alpha)."""
    p = torch.sigmoid(LOGITS)
    dp = p * (1 - p)
    member = (D != 0).float()  # (B, T)
    lik = torch.einsum("bt,bk->tk", member, Y) * 2 * E_LOC - member.sum(0)[:, None] * (E_LOC**2 + E_SCALE**2)
    return dp * (lik / (2 * SIGMA**2) - (LOGITS - math.log(ALPHA / (1 - ALPHA))))


def exact_spike_slab_gradient() -> torch.Tensor:
    """The same under the spike-and-slab guide (q(e | m = 0) the prior N(0, 1)): the likelihood's moments
    of e m are the mean-field ones (e m is the slab draw times m), and the E term becomes
    -p KL(N(mu, s^2) || N(0, 1)), whose logit gradient is -p (1 - p) KL."""
    p = torch.sigmoid(LOGITS)
    kl_e = -torch.log(E_SCALE) + 0.5 * (E_SCALE**2 + E_LOC**2) - 0.5
    return exact_gradient() - p * (1 - p) * kl_e


def gradient_draws(estimator: str, n_draws: int, n_particles: int = 4, seed: int = 0, **kw) -> torch.Tensor:
    """(n_draws, T, K) estimates of d ELBO / d logits (one optimiser step's gradient each)."""
    pyro.set_rng_seed(seed)
    tiny = TinyModel(estimator, **kw)
    elbo = make_elbo(n_particles)
    batch = {"d": D, "y": Y}
    out = []
    for _ in range(n_draws):
        tiny.effect.q_mask_logits.grad = None
        elbo.loss_and_grads(tiny.model, tiny.guide, batch)
        out.append(-tiny.effect.q_mask_logits.grad.clone())
    return torch.stack(out)


@pytest.mark.parametrize("estimator", ["score_function", "loo", "disarm"])
def test_unbiased_estimators_average_to_the_exact_gradient(estimator):
    draws = gradient_draws(estimator, 200, n_particles=64)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    exact = exact_gradient()
    # within 4 standard errors everywhere, and the standard errors are small against the gradient
    assert torch.all((mean - exact).abs() < 4 * se + 1e-6), (mean, exact, se)
    assert float(se.max()) < 0.1 * float(exact.abs().max())


@pytest.mark.parametrize("estimator", ["score_function", "loo", "disarm"])
def test_unbiased_estimators_under_the_spike_slab_guide(estimator):
    """guide=spike_slab: the training-time E value (the slab draw where m = 0, see SpikeSlabNormal) keeps
    every unbiased estimator unbiased for the spike-and-slab ELBO's closed-form gradient."""
    draws = gradient_draws(estimator, 200, n_particles=64, guide="spike_slab")
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    exact = exact_spike_slab_gradient()
    assert torch.all((mean - exact).abs() < 4 * se + 1e-6), (mean, exact, se)
    assert float(se.max()) < 0.1 * float(exact.abs().max())
    # the E term moves the gradient by more than the test's resolution: the test tells the guides apart
    assert float((exact - exact_gradient()).abs().max()) > 8 * float(se.max())


@pytest.mark.parametrize("estimator", ["loo", "disarm"])
def test_rao_blackwellised_estimators_have_lower_variance_than_pyro_score_function(estimator):
    """Per-treatment Rao-Blackwellisation + leave-one-out baseline / antithetic pairs against Pyro's score
    function (same state, same number of particles)."""
    sf = gradient_draws("score_function", 200)[50:]  # after the moving-average baseline warmed up
    ours = gradient_draws(estimator, 200)[50:]
    assert float(ours.var(0).sum()) < 0.5 * float(sf.var(0).sum())


def test_straight_through_is_biased_on_the_closed_form_model():
    """The reference estimator's bias (straight-through at a fixed temperature), measured: it is why the
    others exist. (The KL part of its gradient is pathwise through the relaxation too.)"""
    draws = gradient_draws("straight_through", 200, n_particles=64)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert float(((mean - exact_gradient()).abs() / se).max()) > 6


def test_relaxed_mask_kl_gradient_is_the_analytic_one():
    """With only a control cell the likelihood does not depend on the masks: the relaxed estimator's gradient
    of the logits is exactly -grad KL(q(M) || p(M)), draw by draw."""
    pyro.set_rng_seed(0)
    tiny = TinyModel("relaxed")
    empty = {"d": D[5:], "y": Y[5:]}
    elbo = make_elbo(3)
    p = torch.sigmoid(LOGITS)
    exact = -p * (1 - p) * (LOGITS - math.log(ALPHA / (1 - ALPHA)))
    for _ in range(3):
        tiny.effect.q_mask_logits.grad = None
        elbo.loss_and_grads(tiny.model, tiny.guide, empty)
        assert torch.allclose(-tiny.effect.q_mask_logits.grad, exact, atol=1e-5)


def test_loo_and_disarm_need_vectorised_particles():
    tiny = TinyModel("loo")
    with pytest.raises(ValueError, match="n_particles >= 2"):
        make_elbo(1).loss_and_grads(tiny.model, tiny.guide, {"d": D, "y": Y})
    tiny = TinyModel("disarm")
    with pytest.raises(ValueError, match="n_particles >= 2"):
        make_elbo(1).loss_and_grads(tiny.model, tiny.guide, {"d": D, "y": Y})


def test_disarm_with_an_odd_particle_is_unbiased():
    draws = gradient_draws("disarm", 200, n_particles=65)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert torch.all((mean - exact_gradient()).abs() < 4 * se + 1e-6)


def test_antithetic_pairs_are_exact_bernoulli_draws_coupled_by_one_uniform():
    from pyrovae.models.distributions import AntitheticBernoulli

    torch.manual_seed(0)
    logits = torch.tensor([-1.5, 0.0, 2.0])
    m = AntitheticBernoulli(logits=logits).expand((20000, 3)).sample()
    assert torch.allclose(m[:10000].mean(0), torch.sigmoid(logits), atol=0.015)
    assert torch.allclose(m[10000:].mean(0), torch.sigmoid(logits), atol=0.015)
    # b = 1[u < p], b~ = 1[1 - u < p]: both on with probability max(0, 2p - 1)
    both = (m[:10000] * m[10000:]).mean(0)
    assert torch.allclose(both, (2 * torch.sigmoid(logits) - 1).clamp_min(0), atol=0.015)


@pytest.mark.parametrize("guide", ["mean_field", "spike_slab"])
@pytest.mark.parametrize("estimator", MASK_ESTIMATORS)
def test_mask_log_density_is_bernoulli_under_every_estimator(estimator, guide):
    tiny = TinyModel(estimator, guide=guide, temperature=0.5)
    batch = {"d": D, "y": Y}
    with pyro.plate("particles", 6, dim=-2):
        gtr = poutine.trace(tiny.guide).get_trace(batch)
        mtr = poutine.trace(poutine.replay(tiny.model, trace=gtr)).get_trace(batch)
    gtr.compute_log_prob()
    mtr.compute_log_prob()
    value = gtr.nodes["mask"]["value"]
    hard = (value > 0.5).float()
    if estimator != "relaxed":  # a relaxed mask is soft while training, scored by its hard value
        assert torch.equal(value, hard)
    else:
        assert bool(((value > 0) & (value < 1)).any())
    q = dist.Bernoulli(logits=LOGITS).log_prob(hard).sum(-1)
    p = dist.Bernoulli(probs=torch.tensor(ALPHA)).log_prob(hard).sum(-1)
    assert torch.allclose(gtr.nodes["mask"]["log_prob"], q)
    assert torch.allclose(mtr.nodes["mask"]["log_prob"], p)
    # prediction (no gradient): hard, exact Bernoulli(sigmoid(logits)) draws under every estimator
    with torch.no_grad(), pyro.plate("particles", 20000, dim=-2):
        m = poutine.trace(tiny.guide).get_trace(batch).nodes["mask"]["value"]
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(m.mean(0), torch.sigmoid(LOGITS), atol=0.015)


def test_temperature_anneals_geometrically_in_training_steps_only():
    tiny = TinyModel("relaxed", temperature=1.0, temperature_final=0.1, temperature_anneal_steps=10)
    elbo = make_elbo(2)
    batch = {"d": D, "y": Y}
    for _ in range(5):
        elbo.loss_and_grads(tiny.model, tiny.guide, batch)
    assert float(tiny.effect.current_temperature()) == pytest.approx(0.1**0.5)
    with torch.no_grad():  # evaluation does not advance the schedule
        elbo.loss(tiny.model, tiny.guide, batch)
    assert int(tiny.effect.mask_step) == 5
    for _ in range(20):
        elbo.loss_and_grads(tiny.model, tiny.guide, batch)
    assert float(tiny.effect.current_temperature()) == pytest.approx(0.1)
    assert "mask_step" in tiny.effect.state_dict()  # a resumed run continues the schedule


def test_bad_estimator_options_are_clear_errors():
    with pytest.raises(ValueError, match="mask_estimator must be one of"):
        MaskOptions(estimator="reinforce")
    with pytest.raises(ValueError, match="temperature_final must be > 0"):
        MaskOptions(temperature_final=0.0)


@pytest.mark.parametrize("estimator", ["score_function", "loo", "disarm", "relaxed"])
@pytest.mark.parametrize("name", ["sams_vae", "sams_vae_beta_bernoulli"])
def test_skeleton_trains_with_every_estimator(name, estimator, tiny_data):
    cfg = model_config(
        name,
        n_latent=3,
        decoder_hidden=16,
        encoder_hidden=16,
        embedding_encoder_hidden=16,
        mask_estimator=estimator,
        temperature_final=0.3 if estimator == "relaxed" else None,
    )
    model = build_model(cfg, tiny_data.n_genes, tiny_data.n_treatments, seed=0)
    before = model.effect.q_mask_logits.detach().clone()
    hist = Trainer(
        model, tiny_data, TrainConfig(seed=0, max_epochs=10, batch_size=64, lr=5e-3, n_particles=3)
    ).fit(progress=False)
    assert_trains(hist)
    assert float((model.effect.q_mask_logits.detach() - before).abs().max()) > 1e-3


@pytest.mark.parametrize("estimator", ["loo", "relaxed"])
def test_surrogate_terms_change_the_gradient_not_the_elbo_value(estimator):
    batch = {"d": D, "y": Y}
    tiny = TinyModel(estimator)
    pyro.set_rng_seed(3)
    ours = make_elbo(4).loss_and_grads(tiny.model, tiny.guide, batch)
    pyro.set_rng_seed(3)
    plain = TraceGraph_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    assert ours == pytest.approx(plain.loss(tiny.model, tiny.guide, batch), rel=1e-6)


def _scored_traces(model, batch, n_particles: int = 3):
    """(guide trace, replayed model trace) of the skeleton on ``batch`` under a particles plate,
    log-densities computed."""
    with pyro.plate("particles", n_particles, dim=-2):
        gtr = poutine.trace(model.guide).get_trace(batch)
        mtr = poutine.trace(poutine.replay(model.model, trace=gtr)).get_trace(batch)
    gtr.compute_log_prob()
    mtr.compute_log_prob()
    return gtr, mtr


def test_beta_bernoulli_mask_terms_are_the_map_penalty(tiny_data):
    """sams_vae_beta_bernoulli: log p(m | pi) - log q(m | pi) = 0 exactly, so the masks' only regulariser is
    log Beta(pi; a, b) at pi = sigmoid(q_mask_logits) (the reference code's Beta-Bernoulli model)."""
    cfg = model_config("sams_vae_beta_bernoulli", n_latent=3, decoder_hidden=8, encoder_hidden=8)
    model = build_model(cfg, tiny_data.n_genes, tiny_data.n_treatments, seed=0)
    with torch.no_grad():
        model.effect.q_mask_logits.normal_()
    batch = MinibatchLoader(tiny_data, "train", batch_size=7).batch(np.arange(7))
    gtr, mtr = _scored_traces(model, batch)
    assert torch.allclose(mtr.nodes["mask"]["log_prob"], gtr.nodes["mask"]["log_prob"])
    pi = torch.sigmoid(model.effect.q_mask_logits).clamp(1e-6, 1 - 1e-6)
    expected = dist.Beta(1.0, 2.0).log_prob(pi).sum(-1)
    assert torch.allclose(mtr.nodes["mask_prob"]["log_prob"], expected.expand(3, -1), atol=1e-5)
    assert float(gtr.nodes["mask_prob"]["log_prob"].abs().max()) == 0.0


def test_learned_sparsity_terms_are_bernoulli_at_the_learned_level(tiny_data):
    """sams_vae_learned_sparsity: log p(m) is Bernoulli(alpha_t) at alpha = sigmoid(q_sparsity_logits), one
    level per treatment row (T,) broadcast over the K entries under the particles plate; the level's term
    is the MAP penalty log Beta(alpha; c1, c2) (guide: a Delta); it starts at the paper's mask prior, its
    logits train with the mask logits, and the ELBO moves it towards the mean of q(m_t.)."""
    cfg = model_config("sams_vae_learned_sparsity", n_latent=3, decoder_hidden=8, encoder_hidden=8)
    model = build_model(cfg, tiny_data.n_genes, tiny_data.n_treatments, seed=0)
    eff, T = model.effect, tiny_data.n_treatments
    torch.testing.assert_close(eff.sparsity(), torch.full((T,), 0.01))
    with torch.no_grad():
        eff.q_mask_logits.normal_()
        eff.q_sparsity_logits.normal_()
    batch = MinibatchLoader(tiny_data, "train", batch_size=7).batch(np.arange(7))
    gtr, mtr = _scored_traces(model, batch)
    m, alpha = gtr.nodes["mask"]["value"], eff.sparsity()
    assert m.shape == (3, T, 3) and gtr.nodes["mask_sparsity"]["value"].shape[-1:] == (T,)
    expected = dist.Bernoulli(probs=alpha.clamp(1e-6, 1 - 1e-6)[:, None]).log_prob(m).sum(-1)
    torch.testing.assert_close(mtr.nodes["mask"]["log_prob"], expected, atol=1e-5, rtol=1e-5)
    q = dist.Bernoulli(logits=eff.q_mask_logits).log_prob(m).sum(-1)
    torch.testing.assert_close(gtr.nodes["mask"]["log_prob"], q)
    hyper = dist.Beta(1.0, 2.0).log_prob(alpha.clamp(1e-6, 1 - 1e-6))
    lp = mtr.nodes["mask_sparsity"]["log_prob"].detach()
    torch.testing.assert_close(lp, hyper.expand_as(lp), atol=1e-5, rtol=1e-5)
    assert float(gtr.nodes["mask_sparsity"]["log_prob"].abs().max()) == 0.0
    roles = eff.param_roles()
    assert any(p is eff.q_sparsity_logits for p in roles["mask_logits"])
    assert not any(p is eff.q_sparsity_logits for p in roles["network"] + roles["variational"])
    # the gradient moves alpha_t towards the mean of q(m_t.): masks on (q = 0.95), level 0.01 -> up
    with torch.no_grad():
        eff.q_mask_logits.fill_(3.0)
        eff.q_sparsity_logits.fill_(math.log(0.01 / 0.99))
    make_elbo(8).loss_and_grads(model.model, model.guide, batch)
    assert bool((eff.q_sparsity_logits.grad < 0).all())  # the loss falls as alpha rises


@pytest.mark.parametrize("estimator", ["straight_through", "relaxed"])
def test_mask_kl_warmup_scales_the_mask_kl_gradient_not_the_elbo(estimator):
    """With only a control cell the logits' gradient is the mask KL's alone: with the warm-up it is beta =
    (step + 1) / n times the one without, draw by draw (same seed), and the ELBO's value is unchanged."""
    empty = {"d": D[5:], "y": Y[5:]}
    n = 4
    warm, plain = TinyModel(estimator, mask_kl_warmup_steps=n), TinyModel(estimator)
    elbo = make_elbo(3)
    for step in range(n + 2):
        assert warm.effect.mask_kl_weight() == pytest.approx(min(1.0, (step + 1) / n))
        grads, losses = [], []
        for tiny in (warm, plain):
            tiny.effect.q_mask_logits.grad = None
            pyro.set_rng_seed(step)
            losses.append(elbo.loss_and_grads(tiny.model, tiny.guide, empty))
            grads.append(tiny.effect.q_mask_logits.grad.clone())
        beta = min(1.0, (step + 1) / n)
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
        assert torch.allclose(grads[0], beta * grads[1], atol=1e-6)
        assert float(grads[1].abs().max()) > 1e-3
    assert int(warm.effect.mask_step) == n + 2
    with torch.no_grad():  # evaluation does not advance the schedule
        elbo.loss(warm.model, warm.guide, empty)
    assert int(warm.effect.mask_step) == n + 2


def test_mask_kl_warmup_options_are_checked():
    with pytest.raises(ValueError, match="mask_kl_warmup_steps works with"):
        MaskOptions(estimator="loo", kl_warmup_steps=10)
    with pytest.raises(ValueError, match="mask_kl_warmup_steps"):
        model_config("sams_vae", mask_kl_warmup_steps=-1)


@pytest.mark.parametrize("estimator", MASK_ESTIMATORS)
def test_mask_freeze_stops_the_logits_gradient_for_n_steps_only(estimator):
    """mask_freeze_steps = n: the q(M) logits take no gradient in the first n training steps and the same
    gradient as without the freeze afterwards (same seeds); the ELBO's value and q(E)'s gradient are
    unchanged throughout; evaluation does not advance the count."""
    n, batch = 3, {"d": D, "y": Y}
    elbo = make_elbo(4)

    def run(tiny):
        out = []
        pyro.clear_param_store()  # the score function's moving-average baseline lives there
        for step in range(n + 2):
            for q in (tiny.effect.q_mask_logits, tiny.effect.q_E_loc):
                q.grad = None
            pyro.set_rng_seed(step)
            loss = elbo.loss_and_grads(tiny.model, tiny.guide, batch)
            out.append((loss, tiny.effect.q_mask_logits.grad, tiny.effect.q_E_loc.grad.clone()))
        return out

    frozen = TinyModel(estimator, mask_freeze_steps=n)
    with torch.no_grad():
        elbo.loss(frozen.model, frozen.guide, batch)
    assert int(frozen.effect.mask_step) == 0
    for step, (a, b) in enumerate(zip(run(frozen), run(TinyModel(estimator)))):
        assert a[0] == pytest.approx(b[0], rel=1e-6)
        torch.testing.assert_close(a[2], b[2])
        assert float(b[1].abs().max()) > 1e-3
        if step < n:
            assert a[1] is None or float(a[1].abs().max()) == 0.0
        elif estimator != "score_function":
            torch.testing.assert_close(a[1], b[1])
        else:  # its baseline learned from the frozen steps too: same gradient up to the baseline's state
            assert float(a[1].abs().max()) > 1e-3
    with pytest.raises(ValueError, match="mask_freeze_steps"):
        model_config("sams_vae", mask_freeze_steps=-1)
