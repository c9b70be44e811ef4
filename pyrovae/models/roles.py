"""Optimiser roles of a model's parameters, as the blocks declare them (``param_roles()``): network
weights, variational parameters (and point-estimated per-treatment values), mask logits. The optimiser's
rules per role (weight decay, the mask step size) are :func:`pyrovae.train.optim.param_groups`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["PARAM_ROLES", "parameter_roles"]

#: optimiser roles of a parameter (:meth:`EffectBlock.param_roles`, :func:`pyrovae.train.optim.param_groups`)
PARAM_ROLES = ("network", "variational", "mask_logits")


def parameter_roles(
    module: nn.Module, variational: Sequence[nn.Parameter] = (), mask_logits: Sequence[nn.Parameter] = ()
) -> dict[str, list[nn.Parameter]]:
    """{role: parameters} of ``module``: the given variational and mask-logit parameters, every other
    parameter of ``module`` a network weight (roles: :data:`PARAM_ROLES`)."""
    special = {id(q) for q in (*variational, *mask_logits)}
    return {
        "network": [q for q in module.parameters() if id(q) not in special],
        "variational": list(variational),
        "mask_logits": list(mask_logits),
    }
