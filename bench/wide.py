"""Many perturbations (T = 10,000, Replogle genome-wide): a training step, IWELBO and the model ATE per model.

Usage::

    # every family at T = 10,000 single-gene perturbations (2 cells each), 500 genes; SAMS-VAE's
    # IWELBO also the former way (checks and global parts on every batch), on the same cells
    OMP_NUM_THREADS=1 python bench/wide.py --treatments 10000 --compare-iwelbo sams_vae_reference \\
        --out bench/results/wide_10k.csv
    # GPO-VAE: its GRN is T x T (W, E, K-hop products), so it is measured at growing T and extrapolated
    OMP_NUM_THREADS=1 python bench/wide.py --models gpo_vae --treatments 250,500,1000,2000 \\
        --out bench/results/wide_gpo.csv

The point is how a step, an IWELBO pass and an ATE call scale with T, not fit: synthetic Poisson counts,
``--cells-per-treatment`` cells per perturbation plus 10 % controls, small networks. Each model runs its
phases in turn: build (model + trainer), ``--steps`` training steps (the median step time), IWELBO with
``--iwelbo-particles`` particles on ``--iwelbo-cells`` cells, the model ATE of 8 perturbations with
``--ate-samples`` samples; each phase's peak resident memory is its own (the high-water mark is reset
before it, as in ``scale_run.py``). CRADLE-VAE and GPO-VAE data are prepared as training does (QC flags,
counterfactuals, pairing and ``delta_x``: the compact, O(batch) extras). GPO-VAE's perturbations must be
genes, so its runs have ``G = max(--genes, T + 50)`` genes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scale_run import Phases  # noqa: E402
from pyrovae.data.anndata import load_perturbation_data  # noqa: E402
from pyrovae.data.loader import MinibatchLoader  # noqa: E402
from pyrovae.data.prepare import prepare_data  # noqa: E402
from pyrovae.models.zoo import build_model, data_requirements, model_config  # noqa: E402
from pyrovae.predict.iwelbo import predictive_iwelbo  # noqa: E402
from pyrovae.predict.posterior import Posterior  # noqa: E402
from pyrovae.train.trainer import TrainConfig, Trainer, seed_everything, split_counts  # noqa: E402

#: the families measured by default (one named model each; GPO-VAE separately, see the module docstring)
DEFAULT_MODELS = "sams_vae_reference,sams_vae,sams_vae_mf,cpa_vae,svae_plus,conditional_vae,cradle_vae"


def wide_data(n_treatments: int, per: int, n_genes: int, seed: int = 0, genes_are_targets: bool = False):
    """Poisson counts of ``per`` cells per single-gene perturbation plus 10 % controls; splits 80/10/10;
    a planted 5 % of low-quality cells (obs ``low_quality``, with a lower depth)."""
    rng = np.random.default_rng(seed)
    n_ctrl = max(20, (n_treatments * per) // 9)
    genes = [f"G{j:05d}" for j in range(n_genes)]
    names = genes[:n_treatments] if genes_are_targets else [f"P{t:05d}" for t in range(n_treatments)]
    labels = np.array(["control"] * n_ctrl + [p for p in names for _ in range(per)], dtype=object)
    n = len(labels)
    low = rng.random(n) < 0.05
    rate = rng.lognormal(-0.5, 1.0, size=n_genes) * np.where(low, 0.3, 1.0)[:, None]
    x = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
    a = ad.AnnData(x)
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = genes
    a.obs["perturbation"] = labels
    a.obs["low_quality"] = low
    split = rng.choice(["train", "val", "test"], size=n, p=[0.8, 0.1, 0.1])
    split[:n_ctrl] = np.array(["train"] * 8 + ["val", "test"])[
        np.arange(n_ctrl) % 10
    ]  # controls in every split
    a.obs["split"] = split
    return load_perturbation_data(a, split_key="split", control_label="control")


def measure(name: str, T: int, args, ph: Phases) -> None:
    gpo = name.startswith("gpo")
    n_genes = max(args.genes, T + 50) if gpo else args.genes
    tag = dict(model=name, T=T, G=n_genes)
    data, row = ph.run(f"{name} T={T}: data", lambda: wide_data(T, args.cells_per_treatment, n_genes, 0, gpo))
    row.update(tag, cells=data.n_cells)
    hidden = dict(
        decoder_hidden=args.hidden, encoder_hidden=args.hidden, embedding_encoder_hidden=args.hidden
    )
    cfg = model_config(name, n_latent=args.latent, **hidden)
    reqs = data_requirements(cfg)
    if reqs:
        data, row = ph.run(
            f"{name} T={T}: prepare", lambda: prepare_data(data, reqs, {"qc_key": "low_quality"})
        )
        row.update(tag, extras_mb=sum(getattr(v, "nbytes", 0) for v in data.extras.values()) / 2**20)
    tcfg = TrainConfig(batch_size=args.batch_size, n_particles=args.particles, seed=0)
    seed_everything(0)

    def build():
        model = build_model(cfg, data.n_genes, data.n_treatments, data.norm_mean, data.norm_std, seed=0)
        return model, Trainer(model, data, tcfg)

    (model, trainer), row = ph.run(f"{name} T={T}: build", build)
    row.update(tag, params_mb=sum(p.numel() * 4 for p in model.parameters()) / 2**20)
    loader = MinibatchLoader(data, "train", args.batch_size, shuffle=True, seed=0)
    batches = [b for _, b in zip(range(args.steps + 1), loader)]
    counts = split_counts(model, data, "train", "cpu")
    n = loader.n_cells
    times: list[float] = []

    def steps():
        for i in range(args.steps + 1):  # the first (validated, warm-up) step is not timed
            b = batches[i % len(batches)]
            t0 = time.perf_counter()
            with trainer.step_validation():
                trainer.train_step(b, n, counts)
            if i:
                times.append(time.perf_counter() - t0)

    _, row = ph.run(f"{name} T={T}: {args.steps} training steps", steps)
    row.update(
        tag, step_ms=1e3 * float(np.median(times)), cells_per_s=args.batch_size / float(np.median(times))
    )
    model.eval()
    test = data.indices("test")[: args.iwelbo_cells]
    res, row = ph.run(
        f"{name} T={T}: IWELBO",
        lambda: predictive_iwelbo(
            model, data, test, n_particles=args.iwelbo_particles, batch_size=args.iwelbo_batch, seed=0
        ),
    )
    row.update(
        tag, cells=len(test), cells_per_s=len(test) / row["seconds"], iwelbo=float(res["iwelbo"].mean())
    )
    if name in args.compare_iwelbo.split(
        ","
    ):  # the former path on the same cells: checks and globals per batch
        old, row = ph.run(
            f"{name} T={T}: IWELBO (before: checks and global parts on every batch)",
            lambda: predictive_iwelbo(
                model,
                data,
                test,
                n_particles=args.iwelbo_particles,
                batch_size=args.iwelbo_batch,
                seed=0,
                validate_args=True,
                reuse_globals=False,
            ),
        )
        same = bool(np.array_equal(old["iwelbo"].to_numpy(), res["iwelbo"].to_numpy()))
        row.update(tag, cells=len(test), cells_per_s=len(test) / row["seconds"], same_numbers=same)
    if args.ate_samples:
        post = Posterior(model, data.schema())
        perts = list(data.treatments[:8])
        _, row = ph.run(
            f"{name} T={T}: model ATE",
            lambda: post.model_ate(perts, n_samples=args.ate_samples, library_size=1e4, seed=0),
        )
        row.update(tag, samples=args.ate_samples, samples_per_s=args.ate_samples / row["seconds"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--treatments", default="10000", help="T, or several comma-separated")
    p.add_argument("--cells-per-treatment", type=int, default=2)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--particles", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--iwelbo-cells", type=int, default=512)
    p.add_argument("--iwelbo-particles", type=int, default=100)
    p.add_argument("--iwelbo-batch", type=int, default=128)
    p.add_argument("--ate-samples", type=int, default=2500)
    p.add_argument("--compare-iwelbo", default="", help="models whose IWELBO is also timed the former way")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/wide.csv")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ph = Phases()
    for T in [int(t) for t in a.treatments.split(",")]:
        for name in [m.strip() for m in a.models.split(",") if m.strip()]:
            measure(name, T, a, ph)
            ph.write(a.out)  # after every model: a long run keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
