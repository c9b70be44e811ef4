"""Profile training steps of one named model at the benchmark's sizes (torch.profiler operator table).

Usage::

    OMP_NUM_THREADS=1 python bench/profile_step.py --model sams_vae_reference --steps 3 [--impl torch] \
        [--validate]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.benchmark import SIZES, PlainTorchSAMS, synthetic_data  # noqa: E402
from pyrovae.data.loader import MinibatchLoader  # noqa: E402
from pyrovae.models.zoo import build_model, model_config  # noqa: E402
from pyrovae.train.trainer import TrainConfig, Trainer, split_counts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sams_vae_reference")
    p.add_argument("--impl", choices=["pyro", "torch", "torch_fused"], default="pyro")
    p.add_argument("--size", choices=sorted(SIZES), default="replogle")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25, help="operators shown")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--validate", action="store_true", help="Pyro's validation on every step (pyro impl)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = SIZES[a.size]
    data = synthetic_data(s["n_cells"], s["n_genes"], s["n_treatments"], 0)
    cfg = model_config(
        a.model,
        n_latent=s["n_latent"],
        decoder_hidden=s["hidden"],
        encoder_hidden=s["hidden"],
        embedding_encoder_hidden=s["emb_hidden"],
        embedding_encoder_layers=s["emb_layers"],
    )
    model = build_model(cfg, data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=0)
    tcfg = TrainConfig(batch_size=s["batch_size"], n_particles=s["n_particles"])
    loader = MinibatchLoader(data, "train", s["batch_size"], shuffle=True, drop_last=True)
    batch = next(iter(loader))
    counts = split_counts(model, data, "train", "cpu")
    n = loader.n_cells
    if a.impl == "pyro":
        trainer = Trainer(model, data, tcfg)
        checks = contextlib.nullcontext if a.validate else trainer.step_validation  # as fit runs a step

        def step():
            with checks():
                trainer.train_step(batch, n, counts)

    else:
        plain = PlainTorchSAMS(model, tcfg, n, counts["perturbations"], a.impl == "torch_fused")
        step = lambda: plain.train_step(batch)  # noqa: E731
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
