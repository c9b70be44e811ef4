"""The scvi-tools-style user API: one model object over an AnnData, built on run directories.

::

    import pyrovae
    pyrovae.Model.setup_anndata(adata, perturbation_key="perturbation", split_key="split")
    model = pyrovae.Model(adata, model="sams_vae", n_latent=10)
    model.train(max_epochs=100, accelerator="auto")
    adata.obsm["X_pyrovae"] = model.get_latent_representation()
    effects = model.get_perturbation_effects()         # {"effect": T x K, "mask_probability": T x K, ...}
    ate = model.get_ate(["A+B"])                          # perturbations x genes
    model.save("runs/my_model")
    model = pyrovae.Model.load("runs/my_model", adata)

Everything here is a thin layer over the library: :func:`~pyrovae.runs.run.train_run` /
:func:`~pyrovae.runs.run.load_run` (a saved model *is* a run directory, the format of ``pyrovae train``,
so the CLI and this API read each other's models), :class:`~pyrovae.predict.posterior.Posterior`,
:func:`~pyrovae.predict.iwelbo.predictive_iwelbo` and :mod:`pyrovae.evaluate.grn_export`.

Conventions (those of scvi-tools): results are arrays or DataFrames for the cells of the AnnData passed (the
model's own if none), in the order of its ``obs_names`` (a shuffled or subset AnnData gets its own rows back);
the user writes them into ``obsm`` / ``uns`` (``inplace=True`` does it for the latent representation).
A backed AnnData (``anndata.read_h5ad(path, backed="r")``) stays on disk: minibatches read its rows.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from pyrovae.data.options import DataOptions
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.evaluate.celleval import cell_eval_inputs, run_cell_eval
from pyrovae.evaluate.grn_export import grn_edges, run_n_perturbed
from pyrovae.models.zoo import MODEL_ZOO, ModelConfig, model_config
from pyrovae.outputs import LOCK, clear_output_dir
from pyrovae.predict.iwelbo import predictive_iwelbo
from pyrovae.predict.latent import latent_representation
from pyrovae.predict.posterior import DEFAULT_LIBRARY_SIZE, MATCHED, Posterior
from pyrovae.runs import Run, load_run, train_run
from pyrovae.setup import SETUP_KEY, SETUP_OPTIONS, read_data, record_setup, recorded_setup
from pyrovae.train.device import resolve_device
from pyrovae.train.trainer import TrainConfig

#: the ``obsm`` key :meth:`Model.get_latent_representation` writes with ``inplace=True``
LATENT_KEY = "X_pyrovae"
ADATA_FILE = "adata.h5ad"
_MODEL_FIELDS = frozenset(ModelConfig.keys())
_TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def _zoo_name(cfg: ModelConfig) -> str:
    """The named model a config was made from: the most specific zoo entry it matches (else its family)."""
    best, best_n = cfg.family, -1
    for name, fields in MODEL_ZOO.items():
        if all(cfg.get(k) == v for k, v in fields.items()) and len(fields) > best_n:
            best, best_n = name, len(fields)
    return best


class Model:
    """A pyrovae model of an AnnData, with the scvi-tools life cycle.

    Args:
        adata: the AnnData (raw counts; in memory or backed); read as recorded by :meth:`setup_anndata`
            (defaults: obs ``perturbation``, a seeded split by cell).
        model: a named model of :data:`pyrovae.models.zoo.MODEL_ZOO` (``sams_vae``, ``cpa_vae``,
            ``svae_plus``, ``conditional_vae``, ``cradle_vae``, ``gpo_vae``, ``sams_vae_mf``).
        **options: model options (fields of :class:`~pyrovae.models.zoo.ModelConfig`, e.g. ``n_latent=10``)
            and, as with :meth:`setup_anndata`, setup keywords (``perturbation_key=...``), which are then
            recorded in ``adata.uns`` too.

    Raises:
        ValueError: unknown model or option, or data that does not pass the checks of
            :func:`~pyrovae.data.anndata.load_perturbation_data`.
    """

    #: the named model of a per-model alias (``SAMSVAE``...); ``None``: chosen with ``model=...``
    fixed_model: str | None = None

    def __init__(self, adata: ad.AnnData, model: str | None = None, **options: Any) -> None:
        name = self._model_name(model)
        setup = {k: options.pop(k) for k in list(options) if k in SETUP_OPTIONS}
        unknown = set(options) - _MODEL_FIELDS
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for {type(self).__name__}(...); model options: "
                f"{sorted(_MODEL_FIELDS)}; setup keywords: {list(SETUP_OPTIONS)} (training options such as "
                "max_epochs go to .train())"
            )
        if setup:
            type(self).setup_anndata(adata, **{**dict(adata.uns.get(SETUP_KEY, {})), **setup})
        self.model_name = name
        self.model_cfg = model_config(name, **options)
        self.adata = adata
        self.options = recorded_setup(adata, name)
        self.run: Run | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._data = self._training_data(adata)

    # ------------------------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        perturbation_key: str = "perturbation",
        control_label: str | None = None,
        layer: str | None = None,
        split_key: str | None = None,
        **options: Any,
    ) -> None:
        """Record how to read ``adata`` (in ``adata.uns["_pyrovae_setup"]``), as scvi-tools' setup_anndata.

        Args:
            perturbation_key: obs column of perturbation labels (``control``, ``A``, ``A+B``).
            control_label: label of control cells (default: ``control`` / ``ctrl`` / ``non-targeting``).
            layer: layer of raw counts (default ``X``).
            split_key: obs column of ``train`` / ``val`` / ``test`` (default: a seeded split).
            **options: further fields of :class:`~pyrovae.data.options.DataOptions`: ``batch_key``,
                ``covariate_keys`` (categorical obs columns, one-hot into the encoder and decoder),
                ``size_factor_key`` (obs column of per-cell library sizes), ``combo_sep``,
                ``encode_combos_as_unique``, ``split_mode``, ``split_seed``, ``heldout``,
                ``holdout_perturbations``, ``qc_key``, ``extra_genes``, ``pairing_method``, ``pairing_reg``.
        """
        unknown = set(options) - set(SETUP_OPTIONS)
        if unknown:
            raise ValueError(f"unknown setup keyword(s) {sorted(unknown)}; valid: {list(SETUP_OPTIONS)}")
        given = DataOptions.from_dict(
            dict(
                perturbation_key=perturbation_key,
                control_label=control_label,
                layer=layer,
                split_key=split_key,
                **options,
            )
        )
        record_setup(adata, given)

    @classmethod
    def _model_name(cls, model: str | None) -> str:
        if cls.fixed_model is not None:
            if model is not None and model != cls.fixed_model:
                raise ValueError(f"{cls.__name__} is model {cls.fixed_model!r}; use pyrovae.Model(model=...)")
            return cls.fixed_model
        name = model or "sams_vae"
        if name not in MODEL_ZOO:
            raise ValueError(f"unknown model {name!r}; available: {sorted(MODEL_ZOO)}")
        return name

    def _training_data(self, adata: ad.AnnData) -> PerturbationData:
        data, _ = read_data(adata, self.options, self.model_cfg, model_name=self.model_name)
        return data

    # ----------------------------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        device: str | int | None = None,
        batch_size: int | None = None,
        early_stopping: bool = True,
        run_dir: str | Path | None = None,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
        **train_options: Any,
    ) -> Model:
        """Train (SVI, early stopping on the held-out predictive ELBO); the model then holds the best
        checkpoint on the validation loss, as every run directory does.

        Args:
            max_epochs, batch_size: as :class:`~pyrovae.train.trainer.TrainConfig` (defaults there).
            accelerator: ``"auto"`` (CUDA when available), ``"cpu"``, ``"gpu"`` / ``"cuda"``, ``"mps"``.
            device: a device (``"cuda:1"``) or GPU index; overrides ``accelerator``.
            early_stopping: stop after ``patience`` epochs without improvement (``False``: run all epochs).
            run_dir: where the run directory is written (default: a temporary one; :meth:`save` copies it).
            overwrite: replace an existing run in ``run_dir``.
            resume: continue the current run from its last checkpoint (``max_epochs`` counts all epochs).
            progress: show a progress bar.
            **train_options: further :class:`~pyrovae.train.trainer.TrainConfig` fields (``lr``, ``seed``,
                ``n_particles``, ``mask_lr``, ``patience``...).
        """
        unknown = set(train_options) - _TRAIN_FIELDS
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}; valid: {sorted(_TRAIN_FIELDS)}")
        if isinstance(device, int) and accelerator not in ("auto", "gpu", "cuda"):
            raise ValueError(f"a GPU index (device={device}) needs accelerator 'gpu' or 'auto'")
        if resume and self.run is None:
            raise ValueError("nothing to resume: this model has not been trained; call train() first")
        chosen = device if device is not None else accelerator
        train_options["device"] = str(resolve_device(chosen))
        if max_epochs is not None:
            train_options["max_epochs"] = int(max_epochs)
        if batch_size is not None:
            train_options["batch_size"] = int(batch_size)
        base = self.run.train_cfg if resume else TrainConfig()
        tcfg = base.replace(**train_options)
        if not early_stopping:
            tcfg = tcfg.replace(patience=tcfg.max_epochs + 1)
        if resume:
            path = self.run.path
        elif run_dir is not None:
            path = Path(run_dir)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="pyrovae-")
            path = Path(self._tmp.name) / "run"
        self.run = train_run(
            self._data,
            self.model_cfg,
            tcfg,
            path,
            data_options=self.options.to_dict(),
            overwrite=overwrite,
            resume=resume,
            progress=progress,
            model_name=self.model_name,
        )
        return self

    @property
    def setup(self) -> dict[str, Any]:
        """The data options the model reads its AnnData with (:class:`~pyrovae.data.options.DataOptions`
        as a dict; the typed object is :attr:`options`)."""
        return self.options.to_dict()

    @property
    def data(self) -> PerturbationData:
        """The validated data of the model's AnnData (counts, dosage, split, ...), as the library takes it."""
        return self._data

    @property
    def is_trained(self) -> bool:
        return self.run is not None

    @property
    def device(self) -> torch.device:
        self._require_trained()
        return next(iter(self.run.model.parameters())).device

    @property
    def history(self) -> pd.DataFrame:
        """Per-epoch metrics (``train_loss``, ``val_loss``, penalties, ``seconds``), indexed by epoch."""
        self._require_trained()
        df = pd.DataFrame(self.run.metrics())
        if "epoch" in df:
            df = df.astype({"epoch": int, "step": int}).set_index("epoch")
        return df

    @property
    def module(self):
        """The trained :class:`~pyrovae.models.skeleton.PerturbationVAE` (scvi-tools calls it ``module``)."""
        self._require_trained()
        return self.run.model

    def _require_trained(self) -> None:
        if self.run is None:
            raise ValueError(f"the model is not trained; call {type(self).__name__}.train() first")

    def posterior(self) -> Posterior:
        """The :class:`~pyrovae.predict.posterior.Posterior` of the trained model."""
        self._require_trained()
        return Posterior.from_run(self.run)

    # ------------------------------------------------------------------------------- save / load
    def save(self, dir_path: str | Path, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Write the run directory (``config.json``, ``schema.json``, ``best.pt``, ``last.pt``,
        ``metrics.csv``) to ``dir_path`` (readable by the CLI too); ``save_anndata`` adds ``adata.h5ad``."""
        self._require_trained()
        dest = Path(dir_path)
        if dest.exists() and not dest.is_dir():
            raise FileExistsError(f"{dest} is a file; save() writes a directory there: choose another path")
        if dest.resolve() != self.run.path.resolve():
            if dest.exists() and any(dest.iterdir()):
                if not overwrite:
                    raise FileExistsError(f"{dest} is not empty; pass overwrite=True or choose another path")
                clear_output_dir(dest, "run", flag="overwrite=True")  # only a run pyrovae wrote
            shutil.copytree(self.run.path, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LOCK))
        if save_anndata:
            target = dest / ADATA_FILE
            if self.adata.isbacked:
                self.adata.to_memory().write_h5ad(target)
            else:
                self.adata.write_h5ad(target)

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: ad.AnnData | None = None,
        accelerator: str = "auto",
        device: str | int | None = None,
        checkpoint: str = "best",
    ) -> Model:
        """A saved model (any run directory, ``pyrovae train``'s included) on ``adata``.

        ``adata`` (default: the ``adata.h5ad`` written by ``save(save_anndata=True)``) is read the way the
        model was trained (its genes in the model's order, known perturbations, the run's split options);
        a mismatch raises ``ValueError`` naming the problem and the fix.
        """
        chosen = device if device is not None else accelerator
        run = load_run(dir_path, checkpoint=checkpoint, device=str(resolve_device(chosen)))
        if adata is None:
            saved = Path(dir_path) / ADATA_FILE
            if not saved.exists():
                raise ValueError(
                    f"pass the AnnData to load the model on: {cls.__name__}.load({str(dir_path)!r}, adata) "
                    f"({dir_path} has no {ADATA_FILE}; save(..., save_anndata=True) writes one)"
                )
            adata = ad.read_h5ad(saved)
        # the name it was trained as (config.json), else the zoo entry its options match (an older run)
        name = run.model_name or _zoo_name(run.model_cfg)
        if cls.fixed_model is not None and name != cls.fixed_model:
            raise ValueError(
                f"{dir_path} holds a {name!r} model, not {cls.fixed_model!r}; use pyrovae.Model.load"
            )
        self = cls.__new__(cls)
        self.model_name, self.model_cfg, self.adata = name, run.model_cfg, adata
        self.run, self._tmp = run, None
        self.options = run.options
        self._data = run.load_data(adata)
        return self

    # ----------------------------------------------------------------------------------- data
    def _data_for(self, adata: ad.AnnData | None) -> PerturbationData:
        """The data of ``adata`` read with the model's schema (every cell, in ``adata``'s order)."""
        self._require_trained()
        if adata is None or adata is self.adata:
            return self._data
        # a new AnnData's cells all count (no hold-out split to make): split by cell, never by combination
        return self.run.load_data(adata, split_key=None, split_mode="cells", heldout=None)

    @staticmethod
    def _rows(data: PerturbationData, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
        if indices is None:
            return np.arange(data.n_cells)
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(rows) == 0 or rows.min() < 0 or rows.max() >= data.n_cells:
            raise ValueError(f"indices must be row positions in [0, {data.n_cells}) of the AnnData")
        return rows

    # ------------------------------------------------------------------------------- latents
    @torch.no_grad()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        kind: str = "basal",
        give_mean: bool = True,
        n_samples: int = 25,
        batch_size: int = 256,
        seed: int = 0,
        inplace: bool = False,
        key_added: str = LATENT_KEY,
    ) -> np.ndarray | None:
        """(cells, K) latent representation of the cells of ``adata`` (default: the model's), in its order.

        Args:
            kind: ``"basal"``: z_basal, the cell's state with its perturbation's effect removed (for SVAE+,
                whose latent carries the shift in its prior mean, z minus that mean); ``"shifted"``: the
                perturbed latent the decoder reads, z_basal + d (E * M) (SAMS/CPA/CRADLE-VAE; SVAE+: z).
                GPO-VAE and the conditional VAE have no shifted latent of width K (ValueError).
            give_mean: the posterior mean E_q[z] = mean over ``n_samples`` global draws g of the encoder
                mean (exact in z given g); ``False``: one draw z ~ q(z | x, d, g) with one global draw g
                shared by all cells and cell noise keyed by obs name (so the same cell gets the same draw in
                any AnnData that holds it).
            n_samples: global draws averaged with ``give_mean``.
            inplace: write the result to ``adata.obsm[key_added]`` and return ``None``.
        """
        if inplace and indices is not None:
            raise ValueError("inplace=True writes every cell's latent to obsm; drop indices=...")
        target = self.adata if adata is None else adata
        data = self._data_for(adata)
        latent = latent_representation(
            self.posterior(),
            data,
            self._rows(data, indices),
            kind=kind,
            give_mean=give_mean,
            n_samples=n_samples,
            batch_size=batch_size,
            seed=seed,
            name=self.model_name,
        )
        if inplace:
            target.obsm[key_added] = latent
            return None
        return latent

    # ------------------------------------------------------------------------------- effects
    def get_perturbation_effects(self, n_samples: int = 200, seed: int = 0) -> dict[str, pd.DataFrame]:
        """Per-treatment latent effects and mask probabilities, as DataFrames (treatments x latent axes).

        Returns:
            ``{"effect": ..., "effect_sd": ...}``: posterior mean and sd, over ``n_samples`` draws, of the
            treatment's latent effect row (E * M for SAMS/GPO/CRADLE-VAE, E for CPA-VAE, M * mu for SVAE+;
            treatments without a training cell drawn as for prediction), and, for models with masks,
            ``"mask_probability"``: q(m = 1) exactly (NaN for treatments without a training cell: q was never
            fitted there). GPO-VAE's latent axes are its GRN genes (the columns are their names; see
            :meth:`get_grn`). Empty for the conditional VAE (no per-treatment latents).
        """
        post = self.posterior()
        draws = post.global_samples(n_samples, seed)
        if "effect" not in draws:
            return {}
        eff = draws["effect"]  # (n, T, dim)
        index = pd.Index(post.treatments, name="perturbation")
        dim = eff.shape[-1]
        cols = list(post.treatments) if self.model_cfg.family == "gpo" else [f"z{k}" for k in range(dim)]
        out = {
            "effect": pd.DataFrame(eff.mean(0), index=index, columns=cols),
            "effect_sd": pd.DataFrame(
                eff.std(0, ddof=1) if len(eff) > 1 else np.zeros_like(eff[0]), index=index, columns=cols
            ),
        }
        probs = post.mask_probabilities()
        if probs is not None:
            probs[self.run.untrained.cpu().numpy()] = np.nan
            out["mask_probability"] = pd.DataFrame(probs, index=index, columns=cols)
        return out

    # ------------------------------------------------------------------------------ prediction
    def predict(
        self,
        perturbations: Sequence[str],
        n_cells: int = 1000,
        library_size: str | float | None = DEFAULT_LIBRARY_SIZE,
        seed: int = 0,
        covariates: dict[str, str] | None = None,
    ) -> ad.AnnData:
        """Posterior-predictive counts of ``n_cells`` cells per perturbation label (an AnnData; see
        :meth:`~pyrovae.predict.posterior.Posterior.predict`); ``library_size="matched"`` draws library
        sizes (and covariates) from the model's AnnData's cells of each label; ``covariates``
        (``{"cell_type": "A172"}``) predicts at chosen levels (default: the training levels in
        proportion)."""
        data = self._data if isinstance(library_size, str) else None
        return self.posterior().predict(
            perturbations, n_cells, library_size, data=data, seed=seed, covariates=covariates
        )

    def get_ate(
        self,
        perturbations: Sequence[str] | None = None,
        n_samples: int = 2500,
        library_size: str | float | None = MATCHED,
        seed: int = 0,
        split: str | None = None,
        covariates: dict[str, str] | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Model average treatment effect versus control (perturbations x genes; see
        :meth:`~pyrovae.predict.posterior.Posterior.model_ate`); default: every perturbation of the model's
        AnnData.

        By default (``library_size="matched"``) each sample is drawn at the depth (and covariates) of a
        cell of its label in the model's AnnData (``split``: only that split's cells), so the ATE is on the
        scale of the data's own empirical ATE; ``library_size=1e4`` is the reference's fixed depth.
        ``covariates`` ({key: level}) evaluates at chosen levels."""
        if perturbations is None:
            perturbations = self._data.groups()
        matched = isinstance(library_size, str)
        return self.posterior().model_ate(
            perturbations,
            n_samples=n_samples,
            library_size=library_size,
            data=self._data if matched else None,
            rows=self._data.indices(split) if matched else None,
            seed=seed,
            covariates=covariates,
            **options,
        )

    def cell_eval(
        self,
        out_dir: str | Path,
        split: str = "test",
        n_cells: int = 500,
        library_size: str | float = "data",
        profile: str = "full",
        seed: int = 0,
    ) -> dict[str, Any]:
        """Score the model with cell-eval (``pip install 'pyrovae[eval]'``) on the held-out ``split`` cells.

        The predicted cells (``n_cells`` per label, control included, at ``library_size``) and the held-out
        real cells are log-normalised on one scale and scored by cell-eval's ``profile``, then cell-eval's
        mean baseline (from the training cells) and its baseline-normalised score; cell-eval writes its
        tables into ``out_dir`` (:func:`pyrovae.evaluate.celleval.run_cell_eval`, whose dict is returned).
        """
        self._require_trained()
        rows = self._data.indices(split)
        if len(rows) == 0:
            raise ValueError(f"the {split!r} split has no cells")
        pred, real, train = cell_eval_inputs(
            self.posterior(), self._data, rows, n_cells=n_cells, library_size=library_size, seed=seed
        )
        return run_cell_eval(pred, real, self._data.control_label, out_dir, train=train, profile=profile)

    def get_iwelbo(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        split: str | None = None,
        n_particles: int = 100,
        seed: int = 0,
        **options: Any,
    ) -> pd.DataFrame:
        """Held-out predictive IWELBO per cell (nats; :func:`~pyrovae.predict.iwelbo.predictive_iwelbo`),
        indexed by obs name, for every cell of ``adata`` (default: the model's AnnData), the ``indices``, or
        the cells of ``split`` (``"test"``...: the model's own split of its AnnData)."""
        if split is not None and (adata is not None or indices is not None):
            raise ValueError("split= selects cells of the model's own AnnData; pass adata/indices or split")
        data = self._data_for(adata)
        rows = data.indices(split) if split is not None else self._rows(data, indices)
        return predictive_iwelbo(
            self.run.model,
            data,
            rows,
            n_particles=n_particles,
            seed=seed,
            untrained=self.run.untrained,
            **options,
        )

    def get_grn(self, include_self_loops: bool = False, min_prob: float = 0.0) -> pd.DataFrame:
        """GPO-VAE's gene regulatory network: every edge (source, target, probability, block); see
        :func:`~pyrovae.evaluate.grn_export.grn_edges`. ValueError for other models."""
        self._require_trained()
        n_perturbed = run_n_perturbed(self.run, self._data)
        return grn_edges(
            self.run, n_perturbed=n_perturbed, include_self_loops=include_self_loops, min_prob=min_prob
        )

    def to_arviz(
        self, n_draws: int = 100, perturbations: Sequence[str] | None = None, seed: int = 0, **options
    ):
        """ArviZ export (InferenceData on ArviZ 0.x, DataTree on 1.x): :func:`pyrovae.predict.arviz.to_arviz`
        of the model's posterior."""
        return self.posterior().to_arviz(n_draws, perturbations, seed=seed, **options)

    # ------------------------------------------------------------------------------------ repr
    def __repr__(self) -> str:
        d = self._data
        state = (
            f"trained {len(self.run.metrics())} epochs on {self.device}, run {self.run.path}"
            if self.run is not None
            else "not trained"
        )
        return (
            f"{type(self).__name__}({self.model_name!r}, {d.n_cells} cells x {d.n_genes} genes, "
            f"{d.n_treatments} treatments, n_latent={self.model_cfg.n_latent}, "
            f"likelihood={self.model_cfg.likelihood}; {state})"
        )


class SAMSVAE(Model):
    """SAMS-VAE (``Model(adata, model="sams_vae")``)."""

    fixed_model = "sams_vae"


class CPAVAE(Model):
    """CPA-VAE, SAMS-VAE without masks (``Model(adata, model="cpa_vae")``)."""

    fixed_model = "cpa_vae"


class SVAEPlus(Model):
    """SVAE+ (``Model(adata, model="svae_plus")``; one treatment per combination)."""

    fixed_model = "svae_plus"


class ConditionalVAE(Model):
    """The conditional VAE (``Model(adata, model="conditional_vae")``)."""

    fixed_model = "conditional_vae"


class CRADLEVAE(Model):
    """CRADLE-VAE (``Model(adata, model="cradle_vae")``)."""

    fixed_model = "cradle_vae"


class GPOVAE(Model):
    """GPO-VAE (``Model(adata, model="gpo_vae")``; :meth:`Model.get_grn` exports its GRN)."""

    fixed_model = "gpo_vae"


__all__ = ["Model", "SAMSVAE", "CPAVAE", "SVAEPlus", "ConditionalVAE", "CRADLEVAE", "GPOVAE", "SETUP_KEY"]
