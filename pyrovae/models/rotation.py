"""The sparsest orthogonal rotation of a latent basis, and rotating a model's latent space by it.

Why (README "Sparse rotation"): with every mask on, SAMS-VAE's likelihood and priors are invariant to an
orthogonal change of the basal latent basis, z' = z R: the basal prior N(0, I) and the effect prior
N(0, s^2 I) are isotropic, the effects enter the decoder as z + d (E * M), and the decoder's first layer is
linear in its input. Only the O(1) mask KL (against the O(N) likelihood) prefers the basis in which the
effects are sparse, so training from dense masks ends in an arbitrary rotation of the planted effects and
pruning in that basis costs fit. :func:`sparsest_rotation` finds the rotation in which the posterior-mean
effect rows are sparsest (least L1 norm: the rotation criterion of sparse factor analysis, not varimax,
which on a 24 x 16 effect matrix moves even the planted basis away from itself), and
:func:`rotate_latent` applies it to a model as an exact reparametrisation of its current state, except for
the diagonal Gaussian scales (see there). ``ModelConfig.masks.rotation`` does this once, when
``mask_freeze_steps`` ends; a schedule on the optimisation path, not a change of the objective.

Conventions: row vectors, so a latent z (..., K) becomes z @ R; R is (K, K) with R^T R = I.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["sparsest_rotation", "rotate_latent", "rotate_heads", "rotated_scales", "SparseRotationStep"]


def sparsest_rotation(
    effects: torch.Tensor,
    restarts: int = 16,
    steps: int = 600,
    lr: float = 0.05,
    smoothing: float = 1e-2,
    seed: int = 0,
) -> torch.Tensor:
    """The orthogonal (K, K) R minimising sum_tk ``|(effects @ R)_tk|`` (smoothed), over several restarts.

    R = matrix_exp(A - A^T) (the special orthogonal group), A by Adam on sum sqrt((E R)^2 + smoothing *
    mean(E^2)), from the identity and from ``restarts - 1`` seeded random starts (batched); the result is
    the restart with the least exact L1 norm, and never worse than the identity. Deterministic for a seed
    (float64 on the CPU).

    Args:
        effects: (T, K) effect rows (e.g. the posterior-mean latent effect of each treatment).
        restarts: number of starting points (the first is the identity).
        steps: Adam steps per start.
        lr: Adam step size on the skew-symmetric generator.
        smoothing: the L1 smoothing, relative to the mean squared effect.
        seed: seed of the random starts.

    Returns:
        (K, K) float64 orthogonal matrix.
    """
    E = torch.as_tensor(effects).detach().to("cpu", torch.float64)
    if E.ndim != 2:
        raise ValueError(f"effects must be (T, K), got shape {tuple(E.shape)}")
    if restarts < 1 or steps < 0:
        raise ValueError("sparsest_rotation needs restarts >= 1 and steps >= 0")
    K = E.shape[1]
    eps = smoothing * float(E.pow(2).mean().clamp_min(1e-12))
    gen = torch.Generator().manual_seed(int(seed))
    start = torch.randn(restarts, K, K, generator=gen, dtype=torch.float64)
    start[0] = 0.0  # the identity
    gen_params = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([gen_params], lr=lr)
    for _ in range(steps):
        R = torch.linalg.matrix_exp(gen_params - gen_params.transpose(-1, -2))
        loss = torch.sqrt((E @ R) ** 2 + eps).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        R = torch.linalg.matrix_exp(gen_params - gen_params.transpose(-1, -2))
        l1 = (E @ R).abs().sum(dim=(-2, -1))
        best = int(torch.argmin(l1))
        if l1[best] > E.abs().sum():  # never worse than not rotating
            return torch.eye(K, dtype=torch.float64)
        return R[best]


def rotated_scales(scale: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The marginal standard deviations of x @ R for independent x with sds ``scale`` (..., K):
    sqrt(scale^2 @ (R * R)). (A diagonal Gaussian rotated is not diagonal; this keeps its marginals.)"""
    return (scale.pow(2) @ R.to(scale).pow(2)).sqrt()


@torch.no_grad()
def _rotate_input_columns(layer: nn.Linear, start: int, R: torch.Tensor) -> None:
    """``layer`` reads the K inputs at ``start`` in the rotated basis (input u' = u @ R): W_u <- W_u @ R."""
    K = R.shape[0]
    block = layer.weight[:, start : start + K]
    block.copy_(block @ R.to(block))


@torch.no_grad()
def _rotate_output_rows(layer: nn.Linear, R: torch.Tensor) -> None:
    """``layer``'s K outputs y become y @ R: W <- R^T W, b <- b @ R."""
    Rt = R.to(layer.weight)
    layer.weight.copy_(Rt.T @ layer.weight)
    layer.bias.copy_(layer.bias @ Rt)


@torch.no_grad()
def _rotate_log_var_rows(layer: nn.Linear, R: torch.Tensor) -> None:
    """A log-variance head's outputs v become v @ (R * R), a weighted mean of the old log variances (the
    log of :func:`rotated_scales`' variances up to Jensen's gap, which is 0 where the variances are equal)."""
    W2 = R.to(layer.weight).pow(2)
    layer.weight.copy_(W2.T @ layer.weight)
    layer.bias.copy_(layer.bias @ W2)


def rotate_heads(net, R: torch.Tensor) -> list[nn.Parameter]:
    """A :class:`~pyrovae.nn.mlp.GaussianMLP`'s outputs in the basis y' = y @ R: the mean head exactly,
    the log-variance head by the weighted mean of the old log variances; returns the changed parameters."""
    _rotate_output_rows(net.loc, R)
    _rotate_log_var_rows(net.log_var, R)
    return [net.loc.weight, net.loc.bias, net.log_var.weight, net.log_var.bias]


def _first_layers(trunk_layers: nn.ModuleList, heads: list[nn.Linear]) -> list[nn.Linear]:
    """The Linear layers that read a network's input: the trunk's first layer, or its heads without one."""
    return [trunk_layers[0]] if len(trunk_layers) else heads


def rotate_latent(model, R: torch.Tensor) -> list[nn.Parameter]:
    """Change the basal latent basis of ``model`` (a :class:`~pyrovae.models.skeleton.PerturbationVAE`
    with an additive effect block) to z' = z @ R, in place; returns the parameters it changed.

    Exact: the decoder's first layer reads z' + d (E' * M) with E' = E @ R, so the likelihood of every
    (z, E) is unchanged, and the basal and effect priors are isotropic. The basal encoder's mean head and
    its ``x_shift`` input block rotate exactly. Approximate: the diagonal Gaussian scales of q(z | x) and
    q(E) keep the rotated distribution's marginal variances (not its correlations), and q(M) and the
    correlated guide's mask input stay as they are, so call it while the masks are (nearly) all on, when
    the likelihood cannot tell the bases apart (``ModelConfig.masks.rotation``: at the end of the mask
    freeze).

    Args:
        model: the model; its effect block must compose additively (SAMS-VAE, CPA-VAE families).
        R: (K, K) orthogonal matrix (e.g. :func:`sparsest_rotation` of the mean effects).
    """
    effect = model.effect
    K = model.n_latent
    if not hasattr(effect, "rotate") or getattr(effect, "compose", None) != "add":
        raise ValueError("rotate_latent needs an additive latent effect block (SAMS-VAE or CPA-VAE families)")
    R = torch.as_tensor(R)
    if tuple(R.shape) != (K, K):
        raise ValueError(f"the rotation must be (K, K) = ({K}, {K}), got {tuple(R.shape)}")
    if not torch.allclose(
        R.T.double() @ R.double(), torch.eye(K, dtype=torch.float64, device=R.device), atol=1e-5
    ):
        raise ValueError("the rotation must be orthogonal (R^T R = I)")
    changed: list[nn.Parameter] = []
    dec = model.decoder
    for layer in _first_layers(dec.trunk.layers, [dec.head]):  # latent columns come first
        _rotate_input_columns(layer, 0, R)
        changed.append(layer.weight)
    enc = model.encoder
    if model.conditioning == "x_shift":  # the encoder's input: [x (G), shift (K), ...]
        for layer in _first_layers(enc.trunk.layers, [enc.loc, enc.log_var]):
            _rotate_input_columns(layer, model.n_genes, R)
            changed.append(layer.weight)
    changed += rotate_heads(enc, R)
    changed += effect.rotate(R)
    return list({id(p): p for p in changed}.values())


class SparseRotationStep:
    """The training-step hook of ``ModelConfig.masks.rotation`` (an effect block's
    :meth:`~pyrovae.models.effects.EffectBlock.training_hooks`): once, after the step at which the mask
    freeze ends, rotate the model's latent basis to the sparsest orientation of its mean effects over the
    treatments with training cells (:func:`sparsest_rotation`, :func:`rotate_latent`); the Adam moments of
    the changed parameters restart (they were in the old basis).

    Args:
        effect: the additive effect block (its ``mask_freeze_steps`` and ``mean_effects()``).
    """

    def __init__(self, effect: nn.Module) -> None:
        self.effect = effect

    def after_step(self, trainer) -> None:
        """Called by the :class:`~pyrovae.train.trainer.Trainer` after each optimiser step."""
        if trainer.step == self.effect.mask_freeze_steps:
            self.rotate(trainer)

    def rotate(self, trainer) -> torch.Tensor:
        """Rotate ``trainer.model`` now; returns R (K, K). Under data parallelism every rank applies rank
        0's rotation (broadcast)."""
        trained = ~torch.as_tensor(trainer.data.untrained(), device=trainer.device)
        R = sparsest_rotation(self.effect.mean_effects()[trained], seed=trainer.cfg.seed)
        if trainer.ddp is not None:
            R = R.to(trainer.device)
            trainer.ddp.broadcast_tensor(R)
        for p in rotate_latent(trainer.model, R):
            trainer.optimizer.state.pop(p, None)
        return R
