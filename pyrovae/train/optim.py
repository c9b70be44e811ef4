"""The optimiser's parameter groups: the rules per parameter role (:mod:`pyrovae.models.roles`).

Weight decay regularises network weights only; variational parameters and point-estimated per-treatment
values get none; mask logits get their own Adam step size (see :func:`param_groups`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

__all__ = ["param_groups", "model_param_groups"]


def param_groups(
    module: nn.Module,
    roles: Mapping[str, Sequence[nn.Parameter]],
    cfg,
    model_mask_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Adam parameter groups of ``module.parameters()`` (in their order) by role.

    Weight decay (``cfg.weight_decay``) regularises network weights only; variational parameters and
    point-estimated per-treatment values get none, so the optimum is the ELBO's (the reference decays
    everything). Mask logits get their own step size (without decay): ``cfg.mask_lr`` when it is
    set, else the model's ``model_mask_lr`` (``ModelConfig.masks.lr``) when that is set, else they join the
    variational group (the network's step). A parameter absent from ``roles`` is a network weight.

    Args:
        module: the model (or block) whose parameters are grouped.
        roles: {role: parameters}, roles among :data:`pyrovae.models.roles.PARAM_ROLES` (e.g. an effect
            block's ``param_roles()``).
        cfg: the training settings (``weight_decay``, ``mask_lr``; a
            :class:`~pyrovae.train.trainer.TrainConfig`).
        model_mask_lr: the model's own step size of its mask logits (used when ``cfg.mask_lr`` is unset).

    Returns:
        ``[{network, weight_decay}, {variational, weight_decay 0}]`` plus ``{mask logits, weight_decay 0,
        lr mask_lr}`` when there are mask logits and a mask step size is set.
    """
    mask_lr = cfg.mask_lr if cfg.mask_lr is not None else model_mask_lr
    role_of = {id(q): role for role in ("variational", "mask_logits") for q in roles.get(role, ())}
    decay, no_decay, masks = [], [], []
    for q in module.parameters():
        role = role_of.get(id(q), "network")
        if role == "mask_logits" and mask_lr is not None:
            masks.append(q)
        else:
            (decay if role == "network" else no_decay).append(q)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if masks:
        groups.append({"params": masks, "weight_decay": 0.0, "lr": mask_lr})
    return groups


def model_param_groups(model, cfg) -> list[dict[str, Any]]:
    """Adam parameter groups of every parameter of ``model`` (a
    :class:`~pyrovae.models.skeleton.PerturbationVAE`) under the training settings ``cfg``: roles from the
    model's :meth:`~pyrovae.models.skeleton.PerturbationVAE.param_roles`, the mask step size from
    ``cfg.mask_lr`` or else the model's own (``ModelConfig.masks.lr``)."""
    return param_groups(model, model.param_roles(), cfg, model.effect.mask_lr)
