"""Data-parallel training with torchrun + gloo on CPU (2 processes): the all-reduced gradient of a step is
the single-process gradient of the union of the ranks' minibatches, and a 2-rank run trains like one process
with the union's batch size; rank 0 writes the run and it resumes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.loader import MinibatchLoader
from pyrovae.models.zoo import build_model, model_config
from pyrovae.runs import train_run
from pyrovae.simulate import simulate_perturbseq
from pyrovae.train import distributed
from pyrovae.train.trainer import TrainConfig, evaluate_loss, make_elbo, split_counts

ROOT = Path(__file__).resolve().parents[2]
BATCH, PARTICLES, GRAD_SEED, EPOCHS, MORE_EPOCHS = 16, 3, 123, 12, 15
VAL_SEED, VAL_PARTICLES = 11, 2
MODEL = dict(n_latent=4, decoder_hidden=16, encoder_hidden=16, embedding_encoder_hidden=8)


def make_data():
    return load_perturbation_data(simulate_perturbseq("tiny", seed=0), split_seed=0)


def make_model(data):
    return build_model(
        model_config("sams_vae", **MODEL),
        data.n_genes,
        data.n_treatments,
        data.norm_mean,
        data.norm_std,
        seed=0,
    )


def train_config(batch_size: int, **kw) -> TrainConfig:
    base = dict(batch_size=batch_size, n_particles=PARTICLES, lr=3e-3, seed=0, patience=100, val_particles=2)
    return TrainConfig(**{**base, **kw})


def launch(mode: str, out: Path) -> Path:
    """Run tests/train/ddp_worker.py MODE OUT on 2 CPU processes (gloo) with torchrun."""
    if not _has_torch_run():
        pytest.skip("torch.distributed.run is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = str(ROOT / "tests" / "train" / "ddp_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        worker,
        mode,
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _has_torch_run() -> bool:
    try:
        import torch.distributed.run  # noqa: F401
    except ImportError:
        return False
    return True


def test_allreduced_gradient_equals_the_union_gradient(tmp_path, monkeypatch):
    ddp_out = launch("grad", tmp_path)
    r0, r1 = (torch.load(ddp_out / f"grad_rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["grads"]:  # every rank holds the same (averaged) gradient
        torch.testing.assert_close(r0["grads"][k], r1["grads"][k])
    idx0, idx1 = r0["idx"].numpy(), r1["idx"].numpy()
    assert len(idx0) == len(idx1) == BATCH and not set(idx0) & set(idx1)  # disjoint shards
    data = make_data()
    model = make_model(data)
    loader = MinibatchLoader(data, "train", 2 * BATCH)
    union = loader.batch(np.concatenate([idx0, idx1]))
    n = len(data.indices("train"))
    counts = split_counts(model, data, "train", "cpu")
    w = model.global_weights(union, counts, n, "per_treatment")
    # the same particles: both ranks drew their basal noise (P, B, K) from the same RNG state
    orig = torch.distributions.normal._standard_normal

    def noise(shape, dtype, device):
        if tuple(shape) == (PARTICLES, 2 * BATCH, model.n_latent):
            e = orig((PARTICLES, BATCH, model.n_latent), dtype=dtype, device=device)
            return torch.cat([e, e], dim=-2)
        return orig(shape, dtype=dtype, device=device)

    monkeypatch.setattr(torch.distributions.normal, "_standard_normal", noise)
    pyro.set_rng_seed(GRAD_SEED)
    loss = make_elbo(PARTICLES).loss_and_grads(model.model, model.guide, union, n, w, 1.0 / n)
    assert loss == pytest.approx(r0["loss"], rel=1e-5)
    got = dict(model.named_parameters())
    assert set(r0["grads"]) == {k for k, p in got.items() if p.grad is not None}
    for k, g in r0["grads"].items():
        torch.testing.assert_close(g, got[k].grad, rtol=1e-4, atol=1e-6, msg=k)


class _OneShard:
    """A single-process stand-in for rank ``rank`` of ``world`` ranks, with no other rank to average with."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def mean(self, value: float, device="cpu") -> float:
        return float(value)


def test_sharded_validation_loss_is_the_single_process_mean_over_the_cells(tmp_path):
    """2 ranks each score their half of the validation cells; the result is the mean over all of them,
    equal to one process scoring the same two halves with the same draws (and within noise of the
    unsharded loss)."""
    ddp_out = launch("val", tmp_path)
    v0, v1 = (torch.load(ddp_out / f"val_rank{r}.pt", weights_only=True)["val"] for r in (0, 1))
    assert v0 == v1  # every rank holds the same number
    data = make_data()
    model = make_model(data)
    halves = np.array_split(data.indices("val"), 2)
    means = []
    for r in (0, 1):
        pyro.set_rng_seed(VAL_SEED + r)
        means.append(evaluate_loss(model, data, "val", VAL_PARTICLES, BATCH, ddp=_OneShard(r, 2)))
    want = sum(m * len(h) for m, h in zip(means, halves)) / sum(len(h) for h in halves)
    assert v0 == pytest.approx(want, rel=1e-6)
    pyro.set_rng_seed(VAL_SEED)
    whole = [evaluate_loss(model, data, "val", VAL_PARTICLES, BATCH) for _ in range(4)]
    assert abs(v0 - np.mean(whole)) < 4 * np.std(whole) + 1e-3 * abs(v0)


def test_every_rank_applies_the_same_sparse_rotation(tmp_path):
    """mask_rotation under 2 ranks (each applies rank 0's rotation, broadcast): after the rotation at step 2
    and two more all-reduced steps both ranks hold bit-identical models."""
    out = launch("rotate", tmp_path)
    r0, r1 = (torch.load(out / f"rot_rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0, msg=k)
    assert int(r0["effect.mask_step"]) == 4


def _curve(path: Path) -> dict[str, np.ndarray]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("epoch", "train_loss", "val_loss")}


@pytest.mark.slow
def test_two_ranks_train_like_one_process_with_the_union_batch(tmp_path):
    ddp_out = launch("train", tmp_path / "ddp")
    ddp = _curve(ddp_out / "run" / "metrics.csv")
    np.testing.assert_array_equal(ddp["epoch"], np.arange(1, MORE_EPOCHS + 1))  # trained, then resumed
    assert (ddp_out / "run" / "best.pt").exists() and (ddp_out / "run" / "last.pt").exists()
    data = make_data()
    mcfg = model_config("sams_vae", **MODEL)
    single = [
        _curve(
            train_run(
                data,
                mcfg,
                train_config(2 * BATCH, max_epochs=MORE_EPOCHS, seed=s),
                tmp_path / f"s{s}",
                progress=False,
            ).path
            / "metrics.csv"
        )
        for s in (0, 1)
    ]
    for key in ("train_loss", "val_loss"):
        noise = np.abs(single[0][key] - single[1][key])[2:].mean()  # seed-to-seed spread of one process
        gap = np.abs(ddp[key] - single[0][key])[2:].mean()
        print(f"{key}: mean |2 ranks - 1 process| {gap:.3f}, seed-to-seed {noise:.3f} nats per cell")
        assert gap < 3 * noise + 0.01 * abs(single[0][key][-1]), (key, gap, noise)
    assert ddp["val_loss"][-1] < ddp["val_loss"][0] - 5  # it learns


def test_no_context_in_a_single_process():
    assert distributed.context() is None
