"""One rank of the 2-process data-parallel tests (launched by tests/train/test_distributed.py via torchrun).

``ddp_worker.py grad OUT`` writes ``grad_rank{r}.pt`` (the rank's minibatch positions and its all-reduced
gradients of one step at a fixed seed); ``ddp_worker.py train OUT`` trains into ``OUT/run``, then resumes it
for more epochs; ``ddp_worker.py val OUT`` writes ``val_rank{r}.pt`` (the sharded validation loss);
``ddp_worker.py rotate OUT`` writes ``rot_rank{r}.pt`` (the state after 4 steps through the sparse rotation).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import torch

from pyrovae.data.loader import MinibatchLoader
from pyrovae.models.zoo import build_model, model_config
from pyrovae.runs import train_run
from pyrovae.train import distributed
from pyrovae.train.trainer import Trainer, evaluate_loss, split_counts
from tests.train.test_distributed import (
    BATCH,
    EPOCHS,
    GRAD_SEED,
    MODEL,
    MORE_EPOCHS,
    VAL_PARTICLES,
    VAL_SEED,
    make_data,
    make_model,
    train_config,
)


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    data = make_data()
    ddp = distributed.context()
    assert ddp is not None and ddp.world_size == 2
    if mode == "train":  # training, then resuming for more epochs
        mcfg = model_config("sams_vae", **MODEL)
        train_run(data, mcfg, train_config(BATCH, max_epochs=EPOCHS), out / "run", progress=False)
        train_run(
            data, mcfg, train_config(BATCH, max_epochs=MORE_EPOCHS), out / "run", resume=True, progress=False
        )
        return
    if mode == "rotate":  # a few steps through the sparse rotation: every rank must hold the same model
        mcfg = model_config(
            "sams_vae_reference", mask_init_logits=3.0, mask_freeze_steps=2, mask_rotation=True, **MODEL
        )
        model = build_model(mcfg, data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=0)
        trainer = Trainer(model, data, train_config(BATCH, max_epochs=1, max_steps=4))
        trainer.fit(progress=False)
        torch.save(
            {k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"rot_rank{ddp.rank}.pt"
        )
        return
    if mode == "val":  # the validation loss, each rank scoring its share of the cells
        model = make_model(data)
        pyro.set_rng_seed(VAL_SEED + ddp.rank)
        val = evaluate_loss(model, data, "val", VAL_PARTICLES, BATCH, ddp=ddp)
        torch.save({"val": val}, out / f"val_rank{ddp.rank}.pt")
        return
    # one step: the all-reduced gradient
    model = make_model(data)
    trainer = Trainer(model, data, train_config(BATCH, clip_norm=None, lr=0.0))
    batch = next(iter(MinibatchLoader(data, "train", BATCH, shuffle=True, seed=0, shard=ddp.shard)))
    counts = split_counts(model, data, "train", "cpu")
    pyro.set_rng_seed(GRAD_SEED)  # the same global particles and basal noise on both ranks
    loss, _ = trainer.train_step(batch, len(data.indices("train")), counts)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    torch.save({"idx": batch["idx"], "grads": grads, "loss": loss}, out / f"grad_rank{ddp.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
