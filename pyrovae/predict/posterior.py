"""Posterior sampling: global draws, basal latents, posterior-predictive counts, model ATEs (ArviZ export:
:mod:`pyrovae.predict.arviz`).

Everything runs on :class:`pyro.infer.Predictive` over the shared skeleton, vectorised over particles and
chunked to bound memory; nothing here knows which model family it runs. Shapes: A perturbations, T
treatments, K latent dimensions, G genes, n (or S) global particles.

Seeding: every method takes ``seed``; the same seed gives the same numbers. Randomness is drawn inside
:func:`rng_scope`, which seeds torch / numpy / ``random`` and restores the caller's RNG state afterwards,
so calling these methods never perturbs the caller's random stream.

Untrained treatments (no training cell, e.g. unseen perturbations): their global rows are drawn from the
*prior* (:meth:`~pyrovae.models.skeleton.PerturbationVAE.sample_globals` with ``untrained``), not from their
never-updated q (as the reference code does), and then predicted by the effect block's
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
from pyro import poutine
from pyro.infer import Predictive

from pyrovae.data.dosage import build_dosage
from pyrovae.data.loader import MinibatchLoader
from pyrovae.data.perturbation_data import PerturbationData, untrained_treatments
from pyrovae.models.effects import UNTRAINED_METHODS
from pyrovae.models.skeleton import PerturbationVAE
from pyrovae.nn.likelihoods import COUNT_LIKELIHOODS, DEFAULT_LIBRARY_SIZE
from pyrovae.predict.arviz import to_arviz
from pyrovae.predict.conditions import MATCHED, Conditions

_LIBRARY_SITE = "library_size"
_COVARIATE_SITE = "covariates"


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


def perturbseq_torch(x: torch.Tensor, scale: float = 1e4, total: torch.Tensor | None = None) -> torch.Tensor:
    """g(x) = log2(scale * x / l + 1) per cell (last axis = genes), l = sum_j x_j (or ``total``, e.g. the
    cell's size factor, shape broadcasting to x's with a last axis of 1); all-zero cells map to 0.

    The torch twin of :func:`pyrovae.evaluate.empirical.perturbseq_transform` (used on model samples).
    """
    total = x.sum(-1, keepdim=True) if total is None else total
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
        #: what samples are conditioned on beyond the perturbation (library sizes, covariates)
        self.conditions = Conditions(
            schema, model.n_covariates, model.likelihood in COUNT_LIKELIHOODS, self.device
        )
        #: {covariate key: levels} of the run (batch first); empty without covariates
        self.covariate_levels: dict[str, list[str]] = self.conditions.levels
        self.size_factor_key: str | None = schema.get("size_factor_key")

    def __repr__(self) -> str:
        n_untrained = 0 if self.untrained is None else int(self.untrained.sum())
        return (
            f"{type(self).__name__}({len(self.genes)} genes, {len(self.treatments)} treatments "
            f"({n_untrained} untrained), likelihood {self.model.likelihood}, on {self.device})"
        )

    @classmethod
    def from_run(cls, run, transfer: bool = True) -> Posterior:
        """The posterior of a :class:`~pyrovae.runs.run.Run` (its untrained treatments as ``transfer``)."""
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
                f"prediction is {how}. Train with gene_features (--gene-features data|FILE, --gene-graph "
                "FILE) to predict them from their target genes' features.",
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

    def chunk_size(self, chunk: int, n_rows: int, max_mb: float = 1024.0) -> int:
        """``chunk``, or fewer samples so that one chunk stays within about ``max_mb``: a sample holds one
        global draw (its size measured on one draw, made without touching the caller's random streams),
        counted 16 times (float32: the draw, the guide's parameters and network activations for it, the
        model's uses; GPO-VAE's T x T effects peaked at ~2.6 GB with 4 times, bench/README.md), and
        ``n_rows`` predicted rows of G counts, counted 4 times. An estimate, not a guarantee."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            one = self._draw_globals(1)
        per_sample = 4 * (16 * sum(v.numel() for v in one.values()) + 4 * n_rows * len(self.genes))
        return max(1, min(int(chunk), int(float(max_mb) * 2**20 // max(per_sample, 1))))

    def _batch(
        self, d: torch.Tensor, library: torch.Tensor | None = None, cov: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        batch = {"d": d}
        if library is not None:
            batch[_LIBRARY_SITE] = library
        if cov is not None:
            batch[_COVARIATE_SITE] = cov
        if self.model.artifact is not None:  # predicted cells pass QC
            batch["qc"] = d.new_zeros(d.shape[0], self.model.artifact.n_qc)
        return batch

    def _predictive_model(self, batch: dict[str, torch.Tensor]) -> None:
        """The model with the library size and the covariates as (conditioned) pseudo-sites, so they can
        vary by particle."""
        lib, cov = batch.get(_LIBRARY_SITE), batch.get(_COVARIATE_SITE)
        if lib is not None or cov is not None:
            n_cells = (lib if lib is not None else cov[..., 0]).shape[-1]
            with pyro.plate("_condition_cells", n_cells, dim=-1):
                if lib is not None:
                    lib = pyro.sample(_LIBRARY_SITE, dist.Delta(lib))
                if cov is not None:
                    cov = pyro.sample(_COVARIATE_SITE, dist.Delta(cov, event_dim=1))
            batch = {**batch, _LIBRARY_SITE: lib, _COVARIATE_SITE: cov}
        self.model.model(batch)

    def _trace(
        self,
        d: torch.Tensor,
        g: dict[str, torch.Tensor],
        n: int,
        library: torch.Tensor | None,
        z: torch.Tensor | None = None,
        cov: torch.Tensor | None = None,
    ):
        """Vectorised trace of the model over n particles: globals ``g`` (n, T, ...), library (n, A),
        covariates ``cov`` (n, A, C), optionally basal latents ``z`` (n, A, K) fixed; the ``x`` site has
        batch shape (n, A)."""
        samples = dict(g)
        if library is not None:
            samples[_LIBRARY_SITE] = library
        if cov is not None:
            samples[_COVARIATE_SITE] = cov
        if z is not None:
            samples["z_basal"] = z
        pred = Predictive(
            self._predictive_model,
            posterior_samples=samples,
            num_samples=n,
            return_sites=["x"],
            parallel=True,
        )
        return pred.get_vectorized_trace(
            self._batch(d, None if library is None else library[0], None if cov is None else cov[0])
        )

    def _needs_library(self) -> bool:
        return self.conditions.needs_library

    def check_covariates(self, covariates: dict[str, str] | None) -> dict[str, str]:
        """A level choice ``{key: level}`` checked against the run's covariates (one clear error)."""
        return self.conditions.check(covariates)

    def training_covariates(
        self, n: int, rng: np.random.Generator, covariates: dict[str, str] | None = None
    ) -> np.ndarray:
        """(n, C) one-hot covariate rows drawn from the training cells' level combinations in proportion
        (``covariates`` {key: level} fixes levels); (n, 0) for a model without covariates."""
        return self.conditions.training_rows(n, rng, covariates)

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
        schema (:meth:`~pyrovae.runs.run.Run.load_data`).
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

    @torch.no_grad()
    def mask_probabilities(self) -> np.ndarray | None:
        """(T, dim) q(m = 1), read off the guide's mask distribution exactly (``None`` for models without
        masks)."""
        with rng_scope(0):
            tr = poutine.trace(self.model.draw_globals).get_trace()
        site = tr.nodes.get("mask")
        if site is None or site["type"] != "sample":
            return None
        fn = site["fn"]
        base = fn.base_dist if hasattr(fn, "base_dist") else fn  # Bernoulli-type: P(m = 1) = probs
        return base.probs.detach().cpu().numpy().astype(np.float64)

    # ------------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def _predict_tensor(
        self,
        perturbations: Sequence[str],
        n_cells: int,
        library_size,
        data,
        seed: int,
        chunk: int,
        covariates: dict[str, str] | None = None,
    ) -> tuple[torch.Tensor, list[str], torch.Tensor | None, str]:
        d, labels = self.dosage(perturbations)
        if n_cells < 1:
            raise ValueError(f"n_cells must be >= 1, got {n_cells}")
        rng = np.random.default_rng(seed)
        lib, cov, how = self.conditions.draw(labels, n_cells, library_size, data, None, covariates, rng)
        xs = []
        with rng_scope(seed):
            g = self._draw_globals(n_cells)
            for s in range(0, n_cells, chunk):
                e = min(s + chunk, n_cells)
                tr = self._trace(
                    d,
                    {k: v[s:e] for k, v in g.items()},
                    e - s,
                    None if lib is None else lib[s:e],
                    cov=None if cov is None else cov[s:e],
                )
                xs.append(tr.nodes["x"]["value"].reshape(e - s, len(labels), -1).cpu())
        return torch.cat(xs, 0), labels, lib, how

    def predict(
        self,
        perturbations: Sequence[str],
        n_cells: int = 1000,
        library_size: str | float | None = DEFAULT_LIBRARY_SIZE,
        data: PerturbationData | None = None,
        seed: int = 0,
        chunk: int = 256,
        covariates: dict[str, str] | None = None,
    ):
        """Posterior-predictive counts of ``n_cells`` cells for each perturbation label.

        Cell j of every perturbation uses global draw j (so perturbations are compared at the same posterior
        draw), a fresh basal latent z ~ p(z | d) and count noise. Combinations never seen together work
        through the multi-hot dosage row.

        Args:
            perturbations: labels like ``["A", "A+B", "control"]``; unknown ones raise ``ValueError``.
            n_cells: cells per perturbation.
            library_size: a number (every cell; default 1e4, the reference's setting), ``None`` (1e4), or
                ``"matched"`` (alias ``"data"``): each cell takes the library size (and covariates) of a
                cell of ``data`` with the same label, or of its control cells when the label has no cell
                there. Ignored by the normal likelihood.
            data: the data to draw library sizes from (with ``library_size="matched"``).
            chunk: particles per vectorised call (memory bound: chunk * A * G).
            covariates: ``{key: level}`` to predict at (e.g. ``{"cell_type": "A172"}``); keys not given
                are drawn from the training cells' levels in proportion.

        Returns:
            AnnData (A * n_cells, G): X the sampled counts (float32), obs ``perturbation`` (canonical label),
            ``sample`` (global draw index), ``library_size``, ``prediction`` (how the label was predicted,
            :meth:`prediction_methods`; also in ``uns["pyrovae_sample"]["prediction"]``); var names = the
            model's genes. Warns when a label rests on a prior draw.
        """
        methods = self.prediction_methods(perturbations)
        self._warn_untrained(methods)
        x, labels, lib, how = self._predict_tensor(
            perturbations, n_cells, library_size, data, seed, chunk, covariates
        )
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
        # var_names set after construction: an AnnData given a var DataFrame without columns reads a pandas
        # option that pandas 3 deprecates (anndata 0.13 emits a Pandas4Warning then)
        out = ad.AnnData(X=X, obs=obs)
        out.var_names = pd.Index(self.genes, dtype=str)
        out.obs_names_make_unique()
        out.uns["pyrovae_sample"] = {
            "seed": int(seed),
            "library_size": str(library_size)
            if isinstance(library_size, str) or library_size is None
            else float(library_size),
            "likelihood": self.model.likelihood,
            "conditions": how,
            "covariates": self.check_covariates(covariates),
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
        library_size: str | float | None = None,
        data: PerturbationData | None = None,
        seed: int = 0,
        chunk: int = 256,
        mean: bool = False,
        transform: str | None = None,
        rows: np.ndarray | None = None,
        covariates: dict[str, str] | None = None,
        max_chunk_mb: float = 1024.0,
    ) -> pd.DataFrame:
        """Model average treatment effect of each perturbation versus control, with common random numbers.

        ATE[a] = (1/S) sum_s g(x_s^a) - (1/S) sum_s g(x_s^control). Sample s uses, for the control and for
        every perturbation, the SAME global draw and the SAME basal noise (z_a = prior_loc(d_a) + eps; the
        prior mean depends on d for SVAE+); only the count noise is independent.

        The library size is the comparison's other half. g is not linear, so the model's ATE depends on
        the depth it is sampled at; compared with cells of another depth it differs from theirs by a
        Jensen gap that grows as cells get shallower. The default, ``"matched"``, gives sample s of label
        a the library size (and covariates) of a cell of that label among the evaluated cells ``rows`` of
        ``data``, the cell at the same quantile u_s of each label's depths (controls: the control cells),
        so both sides of the comparison see the data's depth distribution and labels still share u_s. A
        number (``1e4``, the reference's setting) samples everything at that depth.

        Args:
            perturbations: labels (canonicalised; unknown ones raise ``ValueError``).
            n_samples: S.
            library_size: ``"matched"`` (alias ``"data"``; needs ``data``), a fixed number, or ``None``
                (the default: matched when ``data`` is given, else 1e4).
            data, rows: the evaluated cells (row positions of ``data``; default every cell with a split).
            mean: average the transform of the model *mean* (no count noise).
            transform: ``"perturbseq"`` (log2(1e4 x / l + 1), l = the cell's total over the genes, or its
                size factor when the run has one) or ``"mean"`` (identity); default perturbseq for count
                likelihoods and identity for the normal likelihood.
            covariates: ``{key: level}`` to evaluate at (with ``"matched"``: the evaluated cells at that
                level); keys not given follow the evaluated cells (matched) or the training proportions.
            chunk: samples drawn at once (global draws, basal noise, counts): memory O(chunk (T K + U G));
                the same ``seed``, ``chunk`` and ``max_chunk_mb`` give the same numbers.
            max_chunk_mb: bound on one chunk's memory: when ``chunk`` samples would take more (about
                16 x 4 bytes per global entry and 4 x 4 per predicted count of a sample; e.g. at T = 10,000
                perturbations, or GPO-VAE's T x T effects), fewer are drawn at once (:meth:`chunk_size`).

        Returns:
            DataFrame (perturbation x genes), index = canonical labels in the given order;
            ``attrs["prediction"]`` = :meth:`prediction_methods` (warns when a label rests on a prior draw),
            ``attrs["conditions"]``: how library sizes and covariates were chosen.
        """
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        methods = self.prediction_methods(perturbations)
        self._warn_untrained(methods)
        transform = transform or ("perturbseq" if self._needs_library() else "mean")
        if transform not in ("perturbseq", "mean"):
            raise ValueError(f"unknown transform {transform!r}; use 'perturbseq' or 'mean'")
        if library_size is None:
            library_size = MATCHED if data is not None else DEFAULT_LIBRARY_SIZE
        d_alt, labels = self.dosage(perturbations)
        all_labels = [self.control_label, *labels]
        d_all = torch.cat([d_alt.new_zeros(1, d_alt.shape[1]), d_alt], 0)
        rng = np.random.default_rng(seed)
        lib_all, cov_all, how = self.conditions.draw(
            all_labels, n_samples, library_size, data, rows, covariates, rng
        )
        if isinstance(library_size, str):  # matched: every label has its own depths; a repeated label
            # (control itself) shares all of its samples, so control vs control is exactly 0
            first_of = {lab: i for i, lab in reversed(list(enumerate(all_labels)))}
            first = sorted(set(first_of.values()))
            inverse = torch.as_tensor([first.index(first_of[lab]) for lab in all_labels])
            d_unique = d_all[first]
            lib_all = None if lib_all is None else lib_all[:, first]
            cov_all = None if cov_all is None else cov_all[:, first]
        else:  # identical dosage rows (control itself) share every sample: control vs control is exactly 0
            d_unique, inverse = torch.unique(d_all, dim=0, return_inverse=True)
            first = [int((inverse == u).nonzero()[0]) for u in range(d_unique.shape[0])]
            lib_all = None if lib_all is None else lib_all[:, first]
            cov_all = None if cov_all is None else cov_all[:, first]
        U = d_unique.shape[0]
        chunk = self.chunk_size(chunk, U, max_chunk_mb)
        by_size_factor = self.size_factor_key is not None
        total = torch.zeros(U, len(self.genes), dtype=torch.float64)
        with rng_scope(seed):
            for s in range(0, n_samples, chunk):  # globals drawn per chunk: memory O(chunk), not O(S)
                e = min(s + chunk, n_samples)
                n = e - s
                # Pyro's and torch's checks as set globally on the first chunk, off on the others (the
                # same numbers; as training and the IWELBO do)
                with contextlib.nullcontext() if s == 0 else pyro.validation_enabled(False):
                    g = self._draw_globals(n)
                    eps = torch.randn(n, 1, self.model.n_latent, device=self.device)
                    loc = self.model.effect.prior_loc(d_unique, g) if g else None
                    z = eps.expand(n, U, eps.shape[-1]) if loc is None else eps + loc
                    lib = None if lib_all is None else lib_all[s:e]
                    cov = None if cov_all is None else cov_all[s:e]
                    tr = self._trace(d_unique, g, n, lib, z=z, cov=cov)
                    node = tr.nodes["x"]
                    vals = node["fn"].mean if mean else node["value"]
                    vals = vals.reshape(n, U, -1)
                    if transform == "perturbseq":
                        # size factors: divide by the cell's size factor, as the data's transform does
                        vals = perturbseq_torch(vals, total=lib.unsqueeze(-1) if by_size_factor else None)
                    total += vals.double().sum(0).cpu()
        avg = total / n_samples
        ate = (avg[inverse[1:]] - avg[inverse[0]]).numpy()
        out = pd.DataFrame(ate, index=pd.Index(labels, name="perturbation"), columns=self.genes)
        out.attrs["prediction"] = dict(methods)
        out.attrs["conditions"] = how
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
        or ``DataTree`` (1.x): :func:`pyrovae.predict.arviz.to_arviz` (groups, dims and coords there)."""
        return to_arviz(self, n_draws, perturbations, library_size, data, seed, chunk)
