"""Posterior sampling: global draws, basal latents, posterior-predictive counts, model ATEs (ArviZ export:
:mod:`pyrovae.infer.arviz`).

Everything runs on :class:`pyro.infer.Predictive` over the shared skeleton, vectorised over particles and
chunked to bound memory; nothing here knows which model family it runs. Shapes: A perturbations, T
treatments, K latent dimensions, G genes, n (or S) global particles.

Seeding: every method takes ``seed``; the same seed gives the same numbers. Randomness is drawn inside
:func:`rng_scope`, which seeds torch / numpy / ``random`` and restores the caller's RNG state afterwards,
so calling these methods never perturbs the caller's random stream.

Untrained treatments (no training cell, e.g. unseen perturbations): their global rows are drawn from the
*prior* (:meth:`~pyrovae.models.skeleton.PerturbationVAE.sample_globals` with ``untrained``), not from their
never-updated q (shared/reference/sams_vae.md §10.3), and then predicted by the effect block's
:meth:`~pyrovae.models.effects.EffectBlock.predict_untrained` (GPO-VAE: transfer through its GRN; other
blocks keep the prior draw). Every prediction states how each label was predicted
(:meth:`Posterior.prediction_methods`: ``trained`` or one of
:data:`~pyrovae.models.effects.UNTRAINED_METHODS`) and warns when a label rests on a prior draw.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive

from pyrovae.config import check_range
from pyrovae.data.anndata import PerturbationData, untrained_treatments
from pyrovae.data.dosage import build_dosage
from pyrovae.data.loader import MinibatchLoader
from pyrovae.infer.arviz import to_arviz
from pyrovae.models.effects import UNTRAINED_METHODS
from pyrovae.models.skeleton import PerturbationVAE
from pyrovae.nn.likelihoods import COUNT_LIKELIHOODS, DEFAULT_LIBRARY_SIZE

_LIBRARY_SITE = "library_size"


@contextlib.contextmanager
def rng_scope(seed: int) -> Iterator[None]:
    """Seed torch (CPU and CUDA), numpy and ``random`` for the block, then restore the previous states."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        pyro.set_rng_seed(int(seed))
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def perturbseq_torch(x: torch.Tensor, scale: float = 1e4) -> torch.Tensor:
    """g(x) = log2(scale * x / sum_j x_j + 1) per cell (last axis = genes); all-zero cells map to 0.

    The torch twin of :func:`pyrovae.evaluate.ate.perturbseq_transform` (used on model samples).
    """
    total = x.sum(-1, keepdim=True)
    return torch.log2(scale * x / total.clamp_min(1e-12) + 1.0)


def split_rows(
    data: PerturbationData, split_or_indices: str | Sequence[int] | np.ndarray | None
) -> np.ndarray:
    """Row positions of a split name (``None``: every cell with a split) or explicit positions."""
    if split_or_indices is None or isinstance(split_or_indices, str):
        rows = data.indices(split_or_indices)
    else:
        rows = np.asarray(split_or_indices, dtype=np.int64).reshape(-1)
    if len(rows) == 0:
        raise ValueError(f"no cells selected ({split_or_indices!r}); check the split column or the indices")
    return rows


class Posterior:
    """Posterior (and posterior-predictive) sampling for a trained model.

    Args:
        model: the trained :class:`PerturbationVAE` (put in eval mode).
        schema: the run's data schema (``genes``, ``treatments``, ``control_label``, ``sep``,
            ``encode_combos_as_unique``; optionally ``train_treatment_counts``).
        untrained: (T,) bool, treatments without training cells. Default: those with zero training
            cells according to ``schema["train_treatment_counts"]`` (none if the schema lacks it).
        transfer: predict the untrained treatments with the effect block's
            :meth:`~pyrovae.models.effects.EffectBlock.predict_untrained` (GPO-VAE's GRN transfer);
            ``False``: keep their prior draws (a control for the transfer).
    """

    def __init__(
        self,
        model: PerturbationVAE,
        schema: dict[str, Any],
        untrained: torch.Tensor | None = None,
        transfer: bool = True,
    ):
        self.model = model.eval()
        self.schema = schema
        self.genes = [str(g) for g in schema["genes"]]
        self.treatments = [str(t) for t in schema["treatments"]]
        self.control_label = str(schema["control_label"])
        self.sep = str(schema.get("sep", "+"))
        self.encode_combos_as_unique = bool(schema.get("encode_combos_as_unique", False))
        if untrained is None and "train_treatment_counts" in schema:
            untrained = torch.as_tensor(untrained_treatments(schema["train_treatment_counts"]))
        self.device = next(iter(model.parameters())).device
        self.untrained = (
            None if untrained is None else torch.as_tensor(untrained, dtype=torch.bool).to(self.device)
        )
        self.transfer = bool(transfer)

    def __repr__(self) -> str:
        n_untrained = 0 if self.untrained is None else int(self.untrained.sum())
        return (
            f"{type(self).__name__}({len(self.genes)} genes, {len(self.treatments)} treatments "
            f"({n_untrained} untrained), likelihood {self.model.likelihood}, on {self.device})"
        )

    @classmethod
    def from_run(cls, run, transfer: bool = True) -> Posterior:
        """The posterior of a :class:`~pyrovae.infer.runs.Run` (its untrained treatments as ``transfer``)."""
        return cls(run.model, run.schema, run.untrained, transfer=transfer)

    @property
    def untrained_method(self) -> str:
        """How this posterior predicts a treatment with no training cell (:data:`UNTRAINED_METHODS`)."""
        method = self.model.effect.untrained_method(transfer=self.transfer)
        assert method in UNTRAINED_METHODS, method
        return method

    def prediction_methods(self, perturbations: Sequence[str]) -> dict[str, str]:
        """{canonical label: how it is predicted}: ``"trained"`` when every treatment of the label has
        training cells (``"control"`` included), else :attr:`untrained_method`."""
        d, labels = self.dosage(perturbations)
        if self.untrained is None:
            return {lab: "trained" for lab in labels}
        hit = ((d != 0) & self.untrained.unsqueeze(0)).any(-1).tolist()
        return {lab: (self.untrained_method if h else "trained") for lab, h in zip(labels, hit)}

    def _warn_untrained(self, methods: dict[str, str]) -> None:
        bad = sorted({lab for lab, m in methods.items() if m in ("prior_draw", "untrained_weights")})
        if bad:
            how = (
                "drawn from the prior: a random effect that carries no information about them"
                if self.untrained_method == "prior_draw"
                else "made by network weights that never saw their dosage columns (no information)"
            )
            shown = ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
            warnings.warn(
                f"{len(bad)} perturbation(s) have a treatment with no training cell ({shown}); their "
                f"prediction is {how}. GPO-VAE predicts unseen perturbations from its GRN "
                "(Posterior(..., transfer=True), the default).",
                UserWarning,
                stacklevel=3,
            )

    # --------------------------------------------------------------------------------------- helpers
    def dosage(self, perturbations: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """(A, T) dosage rows and canonical labels for labels like ``["A", "A+B", "control"]``.

        Raises ``ValueError`` (from :func:`~pyrovae.data.dosage.build_dosage`) naming unknown perturbations.
        """
        if isinstance(perturbations, str):
            perturbations = [perturbations]
        if len(perturbations) == 0:
            raise ValueError("no perturbations given; pass labels like ['A', 'A+B', 'control']")
        d, _, canon = build_dosage(
            list(perturbations), self.control_label, self.sep, self.encode_combos_as_unique, self.treatments
        )
        return torch.as_tensor(d, device=self.device), [str(c) for c in canon]

    def _draw_globals(self, n: int) -> dict[str, torch.Tensor]:
        g = self.model.sample_globals(n, untrained=self.untrained)
        if self.transfer and g and self.untrained is not None and bool(self.untrained.any()):
            g = self.model.effect.predict_untrained(g, self.untrained)
        return g

    def _batch(self, d: torch.Tensor, library: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        batch = {"d": d}
        if library is not None:
            batch[_LIBRARY_SITE] = library
        if self.model.artifact is not None:  # predicted cells pass QC
            batch["qc"] = d.new_zeros(d.shape[0], self.model.artifact.n_qc)
        return batch

    def _predictive_model(self, batch: dict[str, torch.Tensor]) -> None:
        """The model with the library size as a (conditioned) pseudo-site, so it can vary by particle."""
        lib = batch.get(_LIBRARY_SITE)
        if lib is not None:
            with pyro.plate("_library_cells", lib.shape[-1], dim=-1):
                lib = pyro.sample(_LIBRARY_SITE, dist.Delta(lib))
            batch = {**batch, _LIBRARY_SITE: lib}
        self.model.model(batch)

    def _trace(
        self,
        d: torch.Tensor,
        g: dict[str, torch.Tensor],
        n: int,
        library: torch.Tensor | None,
        z: torch.Tensor | None = None,
    ):
        """Vectorised trace of the model over n particles: globals ``g`` (n, T, ...), library (n, A),
        optionally basal latents ``z`` (n, A, K) fixed; the ``x`` site has batch shape (n, A)."""
        samples = dict(g)
        if library is not None:
            samples[_LIBRARY_SITE] = library
        if z is not None:
            samples["z_basal"] = z
        lib0 = None if library is None else library[0]
        pred = Predictive(
            self._predictive_model,
            posterior_samples=samples,
            num_samples=n,
            return_sites=["x"],
            parallel=True,
        )
        return pred.get_vectorized_trace(self._batch(d, lib0))

    def _needs_library(self) -> bool:
        return self.model.likelihood in COUNT_LIKELIHOODS

    def _library_pool(self, data: PerturbationData | None, label: str | None) -> np.ndarray:
        """Observed library sizes of the cells of ``label`` in ``data`` (controls if it has none)."""
        if data is None:
            raise ValueError("library_size='data' needs the data (data=...) to draw library sizes from")
        if label is not None:
            pool = data.library_size[data.labels == label]
            if len(pool):
                return pool
        pool = data.library_size[data.labels == data.control_label]
        if len(pool) == 0:
            raise ValueError("library_size='data' needs control cells in the data")
        return pool

    def _fixed_library(self, library_size: str | float | None) -> float:
        if library_size is None:
            return DEFAULT_LIBRARY_SIZE
        value = float(library_size)
        if not value > 0:
            raise ValueError(f"library size must be positive, got {library_size}")
        return value

    # ---------------------------------------------------------------------------------------- globals
    @torch.no_grad()
    def global_samples(self, n: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
        """n draws of the global sites from q (untrained rows from the prior), as numpy arrays (n, T, ...).

        Adds ``"effect"`` (n, T, dim): the per-treatment latent effect (E * M for SAMS-VAE, E for CPA-VAE,
        M * action mean for SVAE+) when the family has one. Empty for the conditional VAE.
        """
        with rng_scope(seed):
            g = self._draw_globals(n)
        out = {k: v.detach().cpu().numpy() for k, v in g.items()}
        if g:
            eff = self.model.effect.effect_rows(g)
            if eff is not None:
                out["effect"] = eff.detach().cpu().numpy()
        return out

    # ----------------------------------------------------------------------------------------- latent
    @torch.no_grad()
    def latent(
        self,
        data: PerturbationData,
        split_or_indices: str | Sequence[int] | np.ndarray | None = "test",
        n_samples: int = 10,
        seed: int = 0,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Basal latent samples z ~ q(z_basal | x, d, g) for the selected cells: (n_samples, cells, K).

        Each sample s uses the global draw s (shared across cells). ``data`` must be read with the run's
        schema (:meth:`~pyrovae.infer.runs.Run.load_data`).
        """
        rows = split_rows(data, split_or_indices)
        loader = MinibatchLoader(data, None, batch_size, indices=rows, device=self.device)
        out = []
        with rng_scope(seed):
            g = self._draw_globals(n_samples)
            pred = Predictive(
                self.model.guide,
                posterior_samples=g,
                num_samples=n_samples,
                return_sites=["z_basal"],
                parallel=True,
            )
            for batch in loader:
                out.append(pred(batch)["z_basal"].reshape(n_samples, len(batch["d"]), -1).cpu())
        return torch.cat(out, dim=1).numpy()

    # ------------------------------------------------------------------------------------- prediction
    def _sample_libraries(
        self,
        labels: list[str],
        n: int,
        library_size: str | float | None,
        data: PerturbationData | None,
        rng: np.random.Generator,
    ) -> torch.Tensor | None:
        """(n, A) library sizes: fixed, or drawn from each group's (else the controls') observed sizes."""
        if not self._needs_library():
            return None
        if isinstance(library_size, str):
            if library_size != "data":
                raise ValueError(f"library_size must be a number, None or 'data', got {library_size!r}")
            cols = [rng.choice(self._library_pool(data, lab), size=n, replace=True) for lab in labels]
            lib = np.stack(cols, axis=1)
        else:
            lib = np.full((n, len(labels)), self._fixed_library(library_size))
        return torch.as_tensor(lib, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def _predict_tensor(
        self,
        perturbations: Sequence[str],
        n_cells: int,
        library_size,
        data,
        seed: int,
        chunk: int,
    ) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        d, labels = self.dosage(perturbations)
        if n_cells < 1:
            raise ValueError(f"n_cells must be >= 1, got {n_cells}")
        rng = np.random.default_rng(seed)
        lib = self._sample_libraries(labels, n_cells, library_size, data, rng)
        xs = []
        with rng_scope(seed):
            g = self._draw_globals(n_cells)
            for s in range(0, n_cells, chunk):
                e = min(s + chunk, n_cells)
                tr = self._trace(
                    d, {k: v[s:e] for k, v in g.items()}, e - s, None if lib is None else lib[s:e]
                )
                xs.append(tr.nodes["x"]["value"].reshape(e - s, len(labels), -1).cpu())
        return torch.cat(xs, 0), labels, lib

    def predict(
        self,
        perturbations: Sequence[str],
        n_cells: int = 1000,
        library_size: str | float | None = DEFAULT_LIBRARY_SIZE,
        data: PerturbationData | None = None,
        seed: int = 0,
        chunk: int = 256,
    ):
        """Posterior-predictive counts of ``n_cells`` cells for each perturbation label.

        Cell j of every perturbation uses global draw j (so perturbations are compared at the same posterior
        draw), a fresh basal latent z ~ p(z | d) and count noise. Combinations never seen together work
        through the multi-hot dosage row.

        Args:
            perturbations: labels like ``["A", "A+B", "control"]``; unknown ones raise ``ValueError``.
            n_cells: cells per perturbation.
            library_size: a number (every cell; default 1e4, the reference's setting), ``None`` (1e4), or
                ``"data"``: drawn from the observed library sizes of the cells of ``data`` with the same
                label, or of its control cells when the label has no cell there. Ignored by the normal
                likelihood.
            data: the data to draw library sizes from (with ``library_size="data"``).
            chunk: particles per vectorised call (memory bound: chunk * A * G).

        Returns:
            AnnData (A * n_cells, G): X the sampled counts (float32), obs ``perturbation`` (canonical label),
            ``sample`` (global draw index), ``library_size``, ``prediction`` (how the label was predicted,
            :meth:`prediction_methods`; also in ``uns["pyrovae_sample"]["prediction"]``); var names = the
            model's genes. Warns when a label rests on a prior draw.
        """
        methods = self.prediction_methods(perturbations)
        self._warn_untrained(methods)
        x, labels, lib = self._predict_tensor(perturbations, n_cells, library_size, data, seed, chunk)
        n, a, g = x.shape
        X = x.permute(1, 0, 2).reshape(a * n, g).numpy().astype(np.float32)
        obs = pd.DataFrame(
            {
                "perturbation": pd.Categorical(np.repeat(labels, n), categories=list(dict.fromkeys(labels))),
                "sample": np.tile(np.arange(n), a),
                "library_size": (
                    np.full(a * n, np.nan)
                    if lib is None
                    else lib.t().reshape(-1).cpu().numpy().astype(np.float64)
                ),
                "prediction": np.repeat([methods[lab] for lab in labels], n).astype(str),
            },
            index=[f"{lab}_{j}" for lab in labels for j in range(n)],
        )
        obs.index = pd.Index(obs.index.astype(str))
        out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(self.genes, dtype=str)))
        out.obs_names_make_unique()
        out.uns["pyrovae_sample"] = {
            "seed": int(seed),
            "library_size": str(library_size)
            if isinstance(library_size, str) or library_size is None
            else float(library_size),
            "likelihood": self.model.likelihood,
            "prediction": dict(methods),
            "untrained_method": self.untrained_method,
        }
        return out

    # ---------------------------------------------------------------------------------------- model ATE
    @torch.no_grad()
    def model_ate(
        self,
        perturbations: Sequence[str],
        n_samples: int = 2500,
        library_size: str | float | None = DEFAULT_LIBRARY_SIZE,
        data: PerturbationData | None = None,
        seed: int = 0,
        chunk: int = 256,
        mean: bool = False,
        transform: str | None = None,
    ) -> pd.DataFrame:
        """Model average treatment effect of each perturbation versus control, with common random numbers.

        ATE[a] = (1/S) sum_s g(x_s^a) - (1/S) sum_s g(x_s^control). Sample s uses, for the control and for
        every perturbation, the SAME global draw, the SAME basal noise (z_a = prior_loc(d_a) + eps; the
        prior mean depends on d for SVAE+) and the SAME library size (shared/reference/sams_vae.md §10.8);
        only the count noise is independent. Rows with identical dosage (``"control"`` itself) share all
        samples, so control-vs-control is exactly 0.

        Args:
            perturbations: labels (canonicalised; unknown ones raise ``ValueError``).
            n_samples: S.
            library_size: fixed number (default 1e4, the reference's), ``None`` (1e4) or ``"data"``: drawn
                from the control cells of ``data`` (one draw per sample, shared by all perturbations).
            mean: average the transform of the model *mean* (no count noise; library size then cancels
                out of the perturbseq transform).
            transform: ``"perturbseq"`` (log2(1e4 x / sum x + 1), the reference's) or ``"mean"`` (identity);
                default perturbseq for count likelihoods and identity for the normal likelihood.

            chunk: samples drawn at once (global draws, basal noise, counts): memory O(chunk (T K + U G));
                the same ``seed`` and ``chunk`` give the same numbers.

        Returns:
            DataFrame (perturbation x genes), index = canonical labels in the given order;
            ``attrs["prediction"]`` = :meth:`prediction_methods` (warns when a label rests on a prior draw).
        """
        check_range("n_samples", n_samples, ge=1)  # 0 samples: an ATE of 0/0 = NaN everywhere
        check_range("chunk", chunk, ge=1)
        methods = self.prediction_methods(perturbations)
        self._warn_untrained(methods)
        transform = transform or ("perturbseq" if self._needs_library() else "mean")
        if transform not in ("perturbseq", "mean"):
            raise ValueError(f"unknown transform {transform!r}; use 'perturbseq' or 'mean'")
        d_alt, labels = self.dosage(perturbations)
        d_all = torch.cat([d_alt.new_zeros(1, d_alt.shape[1]), d_alt], 0)
        d_unique, inverse = torch.unique(d_all, dim=0, return_inverse=True)
        U = d_unique.shape[0]
        rng = np.random.default_rng(seed)
        lib_all = None
        if self._needs_library():
            if isinstance(library_size, str):
                if library_size != "data":
                    raise ValueError(f"library_size must be a number, None or 'data', got {library_size!r}")
                lib_all = rng.choice(self._library_pool(data, None), size=n_samples, replace=True)
            else:
                lib_all = np.full(n_samples, self._fixed_library(library_size))
            lib_all = torch.as_tensor(lib_all, dtype=torch.float32, device=self.device)
        total = torch.zeros(U, len(self.genes), dtype=torch.float64)
        with rng_scope(seed):
            for s in range(0, n_samples, chunk):  # globals drawn per chunk: memory O(chunk), not O(S)
                e = min(s + chunk, n_samples)
                n = e - s
                g = self._draw_globals(n)
                eps = torch.randn(n, 1, self.model.n_latent, device=self.device)
                loc = self.model.effect.prior_loc(d_unique, g) if g else None
                z = eps.expand(n, U, eps.shape[-1]) if loc is None else eps + loc
                lib = None if lib_all is None else lib_all[s:e, None].expand(n, U)
                tr = self._trace(d_unique, g, n, lib, z=z)
                node = tr.nodes["x"]
                vals = node["fn"].mean if mean else node["value"]
                vals = vals.reshape(n, U, -1)
                if transform == "perturbseq":
                    vals = perturbseq_torch(vals)
                total += vals.double().sum(0).cpu()
        avg = total / n_samples
        ate = (avg[inverse[1:]] - avg[inverse[0]]).numpy()
        out = pd.DataFrame(ate, index=pd.Index(labels, name="perturbation"), columns=self.genes)
        out.attrs["prediction"] = dict(methods)
        return out

    # ------------------------------------------------------------------------------------------ ArviZ
    def to_arviz(
        self,
        n_draws: int = 100,
        perturbations: Sequence[str] | None = None,
        library_size: str | float | None = DEFAULT_LIBRARY_SIZE,
        data: PerturbationData | None = None,
        seed: int = 0,
        chunk: int = 256,
    ):
        """The global posterior and posterior-predictive counts as an ArviZ ``InferenceData`` (ArviZ 0.x)
        or ``DataTree`` (1.x): :func:`pyrovae.infer.arviz.to_arviz` (groups, dims and coords there)."""
        return to_arviz(self, n_draws, perturbations, library_size, data, seed, chunk)
