"""Training: SVI with TraceGraph_ELBO, penalties, global gradient clipping, early stopping, checkpoints.

One step; the objective is one loss object, :class:`PenalisedELBO` (the one place where it is assembled)::

    loss, penalties = PenalisedELBO(model, P particles, vectorised).loss_terms_and_grads(model, guide, batch)
    #   gradient of -ELBO / N + sum(model.extra_losses(batch)), in one backward pass
    clip_grad_norm_(params, clip_norm); Adam.step()

``TraceGraph_ELBO`` is subclassed to add the surrogate terms guide sites ask for (the q(M) gradient
estimators of :mod:`pyrovae.models.mask_estimators`; they change the gradient, not the loss:
:class:`SurrogateTraceGraphELBO`, also used for validation), and then the penalties (:class:`PenalisedELBO`,
training only). The optimiser's parameter groups come from the blocks' declared roles
(:meth:`~pyrovae.models.skeleton.PerturbationVAE.param_roles`, :func:`pyrovae.train.optim.param_groups`).
The ELBO is computed with every site scaled by 1/N (N = training cells), so the loss is a per-cell
negative ELBO in nats (the reference's units, in which the weight decay and clip threshold are set).
Validation uses the held-out *predictive* negative ELBO per cell: local terms of the validation cells with
the global sites drawn from q but not scored (they were fitted on the training cells).

Mask learning rate (``mask_lr``). The straight-through gradient of the q(M) logits has a low
signal-to-noise ratio: a mask that is on and fitted gets ~0 likelihood gradient, one that is off gets a
gradient whose sign depends on the sampled embedding. With Adam a noisy gradient moves a parameter by about
``lr * SNR`` per step, so at the network learning rate most mask probabilities stay near their
initialisation. On the default simulation (mask prior 0.2, 75 epochs at lr 2e-3), 232 of 240 were still
in (0.2, 0.8); with a separate Adam learning rate of 0.05 for the logits only, 61 were. The objective is
unchanged (it is the same ELBO); only the optimiser's step sizes differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from typing import Any, Literal

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import TraceGraph_ELBO
from pyro.infer.util import torch_backward, torch_item
from pyro.util import warn_if_nan
from tqdm.auto import tqdm

from pyrovae.config import PyrovaeWarning, check_range, coerce_fields, replace_checked
from pyrovae.data.loader import MinibatchLoader
from pyrovae.data.matrix import nonzero_counts
from pyrovae.data.perturbation_data import PerturbationData
from pyrovae.models.artifact import QC_PLATE
from pyrovae.models.mask_estimators import SURROGATE_ELBO
from pyrovae.models.plates import PERTURBATION_PLATE
from pyrovae.models.skeleton import PerturbationVAE
from pyrovae.train import distributed
from pyrovae.train.device import check_device_name, device_rng_state, resolve_device, set_device_rng_state
from pyrovae.train.optim import model_param_groups

#: the largest seed: Pyro seeds numpy's global generator, which takes 32-bit seeds
MAX_SEED = 2**32 - 1


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings (saved in a run's ``config.json``). Defaults follow the reference."""

    lr: float = 3e-4
    #: Adam learning rate of the q(M) mask logits; ``None``: ``lr`` (reference parity). See module docstring.
    mask_lr: float | None = None
    batch_size: int = 512
    max_epochs: int = 100
    max_steps: int | None = None
    n_particles: int = 5
    clip_norm: float | None = 100.0
    weight_decay: float = 1e-6
    patience: int = 20
    min_delta: float = 0.0
    global_scaling: Literal["per_treatment", "standard"] = "per_treatment"
    seed: int = 0
    #: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when available; see pyrovae.train.device)
    device: str = "cpu"
    val_particles: int = 5
    #: every training step with Pyro's and torch's validation as set globally (``True``); ``False``: only a
    #: Trainer's first step, the later ones with it off (the same numbers; ``Trainer.step_validation``)
    validate_args: bool = False

    def __post_init__(self) -> None:
        coerce_fields(self)  # "1e-3" (YAML 1.1 reads it as a string) -> 0.001, "10" -> 10, ...
        check_range("lr", self.lr, ge=0)  # 0 freezes the parameters (gradient checks use it)
        for name in ("mask_lr", "clip_norm"):
            check_range(name, getattr(self, name), gt=0)
        for name in ("batch_size", "max_epochs", "max_steps", "n_particles", "patience", "val_particles"):
            check_range(name, getattr(self, name), ge=1)
        for name in ("weight_decay", "min_delta", "seed"):
            check_range(name, getattr(self, name), ge=0)
        check_range("seed", self.seed, le=MAX_SEED)  # numpy's global seed is 32-bit
        check_device_name(self.device)

    def replace(self, **kw: Any) -> TrainConfig:
        return replace_checked(self, "training", **kw)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Pyro (every stochastic step of training derives from this)."""
    pyro.set_rng_seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


def split_counts(
    model: PerturbationVAE, data: PerturbationData, split: str, device
) -> dict[str, torch.Tensor]:
    """{plate: N_t} counts of cells using each global row, over ``split``."""
    out = {PERTURBATION_PLATE: torch.as_tensor(data.treatment_counts(split), device=device)}
    if model.artifact is not None:
        qc = np.asarray(data.extras["qc"])[data.indices(split)]
        out[QC_PLATE] = torch.as_tensor((qc != 0).sum(0).astype(np.float32), device=device)
    return out


class SurrogateTraceGraphELBO(TraceGraph_ELBO):
    """``TraceGraph_ELBO`` plus the surrogate terms guide sites ask for in ``infer[SURROGATE_ELBO]``.

    Such a term changes the gradient only, never the ELBO's value (the mask estimators of
    :mod:`pyrovae.models.mask_estimators` use it).
    """

    def _loss_and_surrogate_loss_particle(self, model_trace, guide_trace):
        elbo, surrogate_loss = super()._loss_and_surrogate_loss_particle(model_trace, guide_trace)
        for site in guide_trace.nodes.values():
            term = site.get("infer", {}).get(SURROGATE_ELBO) if site["type"] == "sample" else None
            if term is not None:
                surrogate_loss = surrogate_loss - term(model_trace, guide_trace)
        return elbo, surrogate_loss


class PenalisedELBO(SurrogateTraceGraphELBO):
    """The training objective as one loss object: the negative ELBO (with the surrogate terms of
    :class:`SurrogateTraceGraphELBO`) plus the penalties of the model, ``vae.extra_losses(batch)`` (GRN
    alignment and sparsity, counterfactual KL: terms that are not log-densities, each in per-cell units).

    The model and guide are those of ``vae``; their first argument is the minibatch (the penalties' input).
    The penalties are computed after the ELBO's traces (so the random stream is the ELBO's, then the
    penalties' draw of the globals), and the surrogate loss plus the penalties are differentiated in one
    backward pass. Validation and the IWELBO score the plain ELBO (:func:`make_elbo`).

    Args:
        vae: the model whose ``extra_losses`` are added.
        **kwargs: as :class:`~pyro.infer.TraceGraph_ELBO`.
    """

    def __init__(self, vae: PerturbationVAE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vae = vae

    def loss_terms_and_grads(
        self, model, guide, batch, *args, **kwargs
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """Accumulate the gradient of the penalised loss; returns (negative ELBO, {penalty: detached 0-d
        tensor, on the device}). The two parts stay apart for reporting; their sum is what is minimised."""
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, (batch, *args), kwargs)
        penalties = self.vae.extra_losses(batch)
        if penalties:
            surrogate_loss = surrogate_loss + sum(penalties.values())
        torch_backward(surrogate_loss, retain_graph=self.retain_graph)
        loss = -torch_item(elbo)
        warn_if_nan(loss, "loss")
        return loss, {k: v.detach() for k, v in penalties.items()}

    def loss_and_grads(self, model, guide, batch, *args, **kwargs) -> float:
        """Pyro's interface: the penalised loss (negative ELBO + penalties), its gradient accumulated."""
        loss, penalties = self.loss_terms_and_grads(model, guide, batch, *args, **kwargs)
        return loss + sum(float(v) for v in penalties.values())

    def loss(self, model, guide, batch, *args, **kwargs) -> float:
        """The penalised loss without gradients (negative ELBO estimate + penalties)."""
        with torch.no_grad():
            penalties = self.vae.extra_losses(batch)
        return super().loss(model, guide, batch, *args, **kwargs) + sum(float(v) for v in penalties.values())


def make_elbo(n_particles: int) -> TraceGraph_ELBO:
    """The plain ELBO (with the mask estimators' surrogate terms): validation, IWELBO, diagnostics."""
    return SurrogateTraceGraphELBO(
        num_particles=n_particles, vectorize_particles=n_particles > 1, max_plate_nesting=1
    )


def make_training_elbo(model: PerturbationVAE, n_particles: int) -> PenalisedELBO:
    """The training objective of ``model`` (:class:`PenalisedELBO`), with :func:`make_elbo`'s settings."""
    return PenalisedELBO(
        model, num_particles=n_particles, vectorize_particles=n_particles > 1, max_plate_nesting=1
    )


@torch.no_grad()
def evaluate_loss(
    model: PerturbationVAE,
    data: PerturbationData,
    split: str,
    n_particles: int = 5,
    batch_size: int = 512,
    device: str = "cpu",
    ddp: distributed.DataParallel | None = None,
) -> float:
    """Held-out predictive negative ELBO per cell of ``split`` (globals drawn from q, not scored).

    Treatments with no training cell are drawn from their prior, as at prediction time
    (:meth:`PerturbationVAE.sample_globals`), so early stopping scores the predictor that is used.
    ``ddp``: each rank scores its contiguous share of the split's cells (``np.array_split``) and the
    per-cell sum and the count are averaged over the ranks: the mean over every cell of the split, each
    scored once (not every rank scoring the whole split).
    """
    rows = data.indices(split)
    if ddp is not None:
        rows = np.array_split(rows, ddp.world_size)[ddp.rank]
    elbo = make_elbo(n_particles)
    n = len(rows)
    untrained_np = data.untrained()
    untrained = torch.as_tensor(untrained_np, device=device)
    redraw = bool(untrained_np.any()) and model.effect.has_globals  # decided on the host, once
    model_fn, guide_fn = model.model, model.guide
    total = 0.0
    # (an empty split in one process: the loader's error; a rank may get no cells when there are few)
    batches = MinibatchLoader(data, split, batch_size, device=device, indices=rows) if n or not ddp else []
    for batch in batches:
        if redraw:
            g = model.sample_globals(n_particles, untrained=untrained)
            if n_particles == 1:
                g = {k: v[0] for k, v in g.items()}
            model_fn = poutine.condition(model.model, data=g)
            guide_fn = poutine.condition(model.guide, data=g)
        w = model.global_weights(batch, {}, n, "none")
        with warnings.catch_warnings():
            # conditioned globals are 'observed' in both programs; they carry weight 0 here either way
            warnings.filterwarnings("ignore", message="Found non-auxiliary vars in guide but not model")
            total += elbo.loss(model_fn, guide_fn, batch, n, w, 1.0 / n) * batch["x"].shape[0]
    if ddp is not None:  # sum over ranks of the per-cell sums / sum of the counts
        return ddp.mean(total, device) / ddp.mean(float(n), device)
    return total / n


class Trainer:
    """Fit a :class:`PerturbationVAE` on the training split, monitoring the validation split.

    Args:
        model: the model.
        data: the data (with ``train`` and ``val`` cells).
        cfg: optimisation settings.
        checkpoint: optional callable ``checkpoint(kind, state)`` called with ``kind`` in
            ``{"best", "last"}`` (the run directory persists them atomically).
    """

    def __init__(self, model: PerturbationVAE, data: PerturbationData, cfg: TrainConfig, checkpoint=None):
        model.effect.check_treatments_per_cell(nonzero_counts(data.dosage, 1))  # sparse D is not densified
        self.device = resolve_device(cfg.device)
        #: data-parallel context under torchrun (None in one process); see pyrovae.train.distributed
        self.ddp = distributed.context(self.device)
        self.model, self.data, self.cfg = model.to(self.device), data, cfg
        self.checkpoint = checkpoint
        self.optimizer = torch.optim.Adam(model_param_groups(model, cfg), lr=cfg.lr)
        self.elbo = make_training_elbo(model, cfg.n_particles)
        #: the model's step hooks (``after_step(trainer)`` after each optimiser step)
        self.hooks = list(model.effect.training_hooks())
        self.history: list[dict[str, float]] = []
        self.epoch = 0
        self.step = 0
        self.best = math.inf
        self.bad_epochs = 0

    def step_validation(self) -> contextlib.AbstractContextManager:
        """The context a training step runs in (:meth:`fit` wraps each :meth:`train_step` in it).

        With ``cfg.validate_args`` off (the default), the run's first step (step 0: not the first step after a
        resume, so a resumed run repeats the uninterrupted one bit for bit) runs with Pyro's and
        torch's validation as set globally (``pyro.enable_validation``: model/guide site match, plate shapes,
        distribution arguments and supports) and every later step with it off, restored afterwards. The
        checks cost 6 % of a SAMS-VAE step's throughput at the Replogle sizes (``aten::all`` and
        comparisons on every parameter and the (P, B, G) rate, the integer check of the counts; see
        bench/README.md); the loss is bit-identical without them and the gradients too, up to last-bit
        rounding in a few entries (SAMS-VAE's q(M) logits, ~1e-8; torch's argument checks change how the
        graph is built, Pyro's own checks change no bit). The counts were checked at load
        (``load_perturbation_data``) and a non-finite loss stops :meth:`fit`.
        """
        if self.cfg.validate_args or self.step == 0:
            return contextlib.nullcontext()
        return pyro.validation_enabled(False)

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "torch_rng": torch.get_rng_state(),
            "history": [dict(r) for r in self.history],
            **device_rng_state(self.device),
        }

    def load_state(self, state: dict[str, Any], history: list[dict[str, float]] | None = None) -> None:
        """Continue from ``state`` (a :meth:`state`): parameters, Adam's moments, counters, RNG states.

        The optimiser's settings are this Trainer's ``cfg`` (``lr``, ``mask_lr``, ``weight_decay``: a resumed
        run with new values trains with them), not the checkpoint's; only Adam's running moments and step
        counts are restored."""
        self.model.load_state_dict(state["model"])
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(own)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])
        torch.set_rng_state(state["torch_rng"].cpu())
        set_device_rng_state(state, self.device)
        self.history = [dict(r) for r in (history if history is not None else state.get("history", []))]

    def train_step(self, batch: dict[str, torch.Tensor], n_cells: int, counts: dict[str, torch.Tensor]):
        """One optimisation step; returns (negative ELBO per cell, {penalty: detached 0-d tensor}).

        The penalties stay on the device (read once per epoch by :meth:`fit`, so no step waits on them).
        """
        self.optimizer.zero_grad(set_to_none=True)
        w = self.model.global_weights(batch, counts, n_cells, self.cfg.global_scaling)
        loss, extras = self.elbo.loss_terms_and_grads(
            self.model.model, self.model.guide, batch, n_cells, w, 1.0 / n_cells
        )
        if self.ddp is not None:  # average gradients (and the loss) over the ranks' minibatches
            loss = self.ddp.reduce_step(self.model.parameters(), loss)
        if self.cfg.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.optimizer.step()
        self.step += 1
        for hook in self.hooks:  # the model's schedules between steps (e.g. the sparse rotation)
            hook.after_step(self)
        return float(loss), extras

    def planned_steps(self, steps_per_epoch: int) -> int:
        """The run's planned number of training steps: ``max_epochs`` x ``steps_per_epoch``, at most
        ``max_steps`` (what the model's step schedules given as fractions of the run are resolved against;
        early stopping may end the run sooner)."""
        total = self.cfg.max_epochs * int(steps_per_epoch)
        return total if self.cfg.max_steps is None else min(total, self.cfg.max_steps)

    def fit(self, progress: bool = True, on_epoch=None) -> list[dict[str, float]]:
        """Train until ``max_epochs``/``max_steps`` or early stopping; returns the metrics history."""
        cfg, data, model = self.cfg, self.data, self.model
        ddp = self.ddp
        if self.epoch == 0:
            seed_everything(cfg.seed if ddp is None else cfg.seed + ddp.rank)
        device = self.device
        if ddp is not None:
            if self.epoch > 0 and not ddp.is_main:  # resumed: the checkpoint holds rank 0's RNG state
                seed_everything(
                    int(np.random.SeedSequence([cfg.seed, ddp.rank, self.epoch]).generate_state(1)[0])
                )
            ddp.broadcast_module(model)
            progress = progress and ddp.is_main
        train = MinibatchLoader(
            data,
            "train",
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            device=device,
            shard=None if ddp is None else ddp.shard,
        )
        train.epoch = self.epoch
        model.effect.start_training(self.planned_steps(len(train)))
        has_val = len(data.indices("val")) > 0
        if not has_val and self.epoch == 0:
            warnings.warn(
                "no validation cells: early stopping and the best checkpoint follow the training loss; give "
                "some cells the split 'val' to monitor held-out data",
                PyrovaeWarning,
                stacklevel=2,
            )
        counts = split_counts(model, data, "train", device)
        n = train.n_cells
        bar = tqdm(
            total=cfg.max_epochs, initial=self.epoch, disable=not progress, desc="training", unit="epoch"
        )
        while self.epoch < cfg.max_epochs and (cfg.max_steps is None or self.step < cfg.max_steps):
            t0 = time.perf_counter()
            model.train()
            losses, extras_sum = [], {}
            for batch in train:
                with self.step_validation():
                    loss, extras = self.train_step(batch, n, counts)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the training loss became {loss} at step {self.step}; lower the learning rate "
                        "(lr=...) or keep gradient clipping on (clip_norm=...)"
                    )
                losses.append(loss)
                for k, v in extras.items():
                    extras_sum[k] = extras_sum.get(k, 0.0) + v
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    break
            self.epoch += 1
            model.eval()
            rec = {"epoch": self.epoch, "step": self.step, "train_loss": float(np.mean(losses))}
            rec.update({k: float(v) / len(losses) for k, v in extras_sum.items()})
            if has_val:
                rec["val_loss"] = evaluate_loss(
                    model, data, "val", cfg.val_particles, cfg.batch_size, device, ddp=ddp
                )
            if ddp is not None:  # the same numbers on every rank, so that they stop together
                rec = {k: ddp.mean(v) if k.endswith("loss") else v for k, v in rec.items()}
            rec["seconds"] = time.perf_counter() - t0
            self.history.append(rec)
            monitor = rec.get("val_loss", rec["train_loss"])
            improved = monitor < self.best - cfg.min_delta
            if improved:
                self.best, self.bad_epochs = monitor, 0
            else:
                self.bad_epochs += 1
            if self.checkpoint is not None and (ddp is None or ddp.is_main):
                if improved:
                    self.checkpoint("best", self.state())
                self.checkpoint("last", self.state())
            if on_epoch is not None and (ddp is None or ddp.is_main):
                on_epoch(self.history)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['train_loss']:.2f}", val=f"{rec.get('val_loss', float('nan')):.2f}")
            if self.bad_epochs >= cfg.patience:
                break
        bar.close()
        if ddp is not None:
            ddp.barrier()  # rank 0's last checkpoint is written before any rank reads it
        return self.history
