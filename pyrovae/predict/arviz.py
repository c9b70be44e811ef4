"""ArviZ export of a :class:`~pyrovae.predict.posterior.Posterior`, for ArviZ 0.x and 1.x.

The two ArviZ lines convert the same nested arrays with different calls:

- ArviZ 0.x (<= 0.23, the last line that installs on Python 3.10/3.11): ``from_dict(posterior=...,
  posterior_predictive=..., coords=..., dims=...)`` returns an ``arviz.InferenceData``;
- ArviZ 1.x (Python >= 3.12; its ``from_dict`` is ``arviz_base.from_dict``): ``from_dict({group: {var:
  array}}, coords=..., dims=...)`` returns an ``xarray.DataTree``.

:func:`posterior_groups` builds the groups once (plain numpy, dims and coords); :func:`convert` hands them to
whichever ``from_dict`` is installed, told apart by its signature (the 1.x one takes the nested dict as its
first, positional ``data`` argument). Both results are indexed the same way: ``out["posterior"]["E"]`` or
``out.posterior["E"]`` with dims (chain, draw, treatment, effect_latent).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pyrovae.config import check_range
from pyrovae.nn.likelihoods import DEFAULT_LIBRARY_SIZE


def posterior_groups(
    posterior,
    n_draws: int = 100,
    perturbations: Sequence[str] | None = None,
    library_size: str | float | None = DEFAULT_LIBRARY_SIZE,
    data=None,
    seed: int = 0,
    chunk: int = 256,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list], dict[str, list[str]]]:
    """The ArviZ groups of a posterior: ``({group: {var: array}}, coords, dims)``.

    - ``posterior``: every global site of :meth:`Posterior.global_samples` (and ``effect``), arrays
      (chain=1, draw, rows, ...), dims (treatment, effect_latent, ...) with the treatment names as
      coordinates (artifact rows: (qc_row, qc_latent));
    - ``posterior_predictive``: ``counts`` (chain=1, draw, cell, gene): at draw j one cell per perturbation
      (coordinate ``cell`` = the labels; default: control and every treatment alone), sampled as in
      :meth:`Posterior.predict` (the same seed gives the same counts).

    The posterior group is absent for a model without global latents (the conditional VAE).
    """
    check_range("n_draws", n_draws, ge=1)
    check_range("chunk", chunk, ge=1)
    T = len(posterior.treatments)
    post, dims = {}, {}
    for name, v in posterior.global_samples(n_draws, seed).items():
        rest = v.shape[1:]
        row_dim = "treatment" if rest and rest[0] == T and name != "qc_E" else "qc_row"
        # The trailing axis is named after its space, so sites of different widths never share a dim
        # (GPO-VAE's effect space has T entries while its artifact rows have n_latent; one shared name
        # would make xarray outer-join them and pad with NaN).
        last = "qc_latent" if row_dim == "qc_row" else "effect_latent"
        dims[name] = [row_dim] + [(last if i == 0 else f"{name}_dim{i}") for i in range(len(rest) - 1)]
        post[name] = v[None]
    if perturbations is None:
        perturbations = [posterior.control_label] + list(posterior.treatments)
    pred = posterior.predict(
        perturbations, n_cells=n_draws, library_size=library_size, data=data, seed=seed, chunk=chunk
    )
    # predict's rows are perturbation-major: (A * n, G) -> (n, A, G), cell j of every label at draw j
    x = np.asarray(pred.X).reshape(-1, n_draws, pred.n_vars).transpose(1, 0, 2)
    labels = [str(v) for v in pred.obs["perturbation"].to_numpy()[::n_draws]]
    dims["counts"] = ["cell", "gene"]
    coords = {"treatment": list(posterior.treatments), "gene": list(posterior.genes), "cell": labels}
    groups = {"posterior_predictive": {"counts": x[None]}}
    if post:
        groups = {"posterior": post, **groups}
    return groups, coords, dims


def installed_from_dict() -> Callable[..., Any]:
    """The installed ``from_dict``: ``arviz.from_dict`` (0.x or 1.x), else ``arviz_base.from_dict``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.23 announces the 1.x migration on import
        for name in ("arviz", "arviz_base"):  # optional dependencies, imported only when exporting
            if importlib.util.find_spec(name) is not None:
                return importlib.import_module(name).from_dict
    raise ImportError("the ArviZ export needs ArviZ: pip install arviz (0.x on Python 3.11, 1.x on >= 3.12)")


def takes_nested_dict(from_dict: Callable[..., Any]) -> bool:
    """Whether ``from_dict`` is ArviZ 1.x's (first parameter ``data``: ``{group: {var: array}}``)."""
    params = list(inspect.signature(from_dict).parameters.values())
    return bool(params) and params[0].name == "data" and params[0].kind != inspect.Parameter.KEYWORD_ONLY


def convert(
    groups: dict[str, dict[str, np.ndarray]],
    coords: dict[str, list],
    dims: dict[str, list[str]],
    from_dict: Callable[..., Any] | None = None,
):
    """``groups`` as an ArviZ object: an ``InferenceData`` (ArviZ 0.x) or a ``DataTree`` (1.x).

    Args:
        from_dict: the converter (default: :func:`installed_from_dict`); its API is read from its signature.
    """
    from_dict = from_dict or installed_from_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if takes_nested_dict(from_dict):
            return from_dict(groups, coords=coords, dims=dims)
        return from_dict(**groups, coords=coords, dims=dims)


def to_arviz(
    posterior,
    n_draws: int = 100,
    perturbations: Sequence[str] | None = None,
    library_size: str | float | None = DEFAULT_LIBRARY_SIZE,
    data=None,
    seed: int = 0,
    chunk: int = 256,
    from_dict: Callable[..., Any] | None = None,
):
    """:func:`posterior_groups` converted by the installed ArviZ (see the module docstring)."""
    groups, coords, dims = posterior_groups(
        posterior, n_draws, perturbations, library_size, data, seed, chunk
    )
    return convert(groups, coords, dims, from_dict)
