"""Data larger than memory: backed vs in-memory minibatches, and a synthetic genome-wide-scale run.

Usage::

    # loader throughput on the `large` preset (100,000 cells x 2,000 genes): in memory, backed with
    # block sampling, backed with one scattered read per cell
    OMP_NUM_THREADS=1 python bench/scale_run.py loader --out bench/results/loader_large.csv
    # write N cells x G genes chunk by chunk, read it backed, train one epoch, one IWELBO pass
    OMP_NUM_THREADS=1 python bench/scale_run.py scale --cells 200000 --genes 2000 --perturbations 500 \\
        --workdir /tmp/scale --out bench/results/scale_200k.csv
    # GPO-VAE (or cradle_vae): also its preparation (QC, counterfactuals, pairing, delta_x), 300 steps,
    # IWELBO over the whole test split, the model ATE with 2,500 samples
    OMP_NUM_THREADS=1 python bench/scale_run.py scale --model gpo_vae --cells 200000 --max-steps 300 \\
        --ate-samples 2500 --workdir /tmp/scale --out bench/results/scale_gpo_200k.csv

Every phase reports its wall time and its peak resident memory (the high-water mark is reset before each
phase through /proc/self/clear_refs, so it is the phase's own peak), as one CSV row per phase.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.benchmark import _rss_mb  # noqa: E402
from pyrovae.data.anndata import load_perturbation_data  # noqa: E402
from pyrovae.data.loader import MinibatchLoader  # noqa: E402
from pyrovae.data.prepare import prepare_data  # noqa: E402
from pyrovae.models.zoo import data_requirements, model_config  # noqa: E402
from pyrovae.predict.iwelbo import predictive_iwelbo  # noqa: E402
from pyrovae.predict.posterior import Posterior  # noqa: E402
from pyrovae.runs import train_run  # noqa: E402
from pyrovae.simulate import PRESETS, write_perturbseq_h5ad  # noqa: E402
from pyrovae.train.trainer import TrainConfig  # noqa: E402


class Phases:
    """Time and peak RSS of named phases; rows for the CSV."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def run(self, name: str, fn, **info):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        before = _rss_mb("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        row = {
            "phase": name,
            "seconds": time.perf_counter() - t0,
            "rss_before_mb": before,
            "peak_rss_mb": _rss_mb("VmHWM"),
            **info,
        }
        self.rows.append(row)
        print(
            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True,
        )
        return out, row

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        print(f"wrote {path}")


def _epoch(loader: MinibatchLoader, max_cells: int | None) -> int:
    n = 0
    for b in loader:
        n += b["x"].shape[0]
        if max_cells is not None and n >= max_cells:
            break
    return n


def loader_benchmark(workdir: Path, out: str, max_cells: int | None, batch_size: int) -> None:
    """Cells/s of one pass over the training split of the `large` preset: in memory, backed (blocks),
    backed (scattered per-cell reads)."""
    ph = Phases()
    path = workdir / "large.h5ad"
    if not path.exists():
        ph.run("write large preset", lambda: write_perturbseq_h5ad(path, "large", seed=0))
    mem, _ = ph.run("load in memory", lambda: load_perturbation_data(path))
    backed, _ = ph.run("load backed", lambda: load_perturbation_data(path, backed=True))
    cases = [
        ("in memory (CSR, shuffled)", mem, dict(block_size=None)),
        ("backed, block sampling (1024 x 16)", backed, dict(block_size=1024)),
        ("backed, one read per cell", backed, dict(block_size=None)),
    ]
    for name, data, kw in cases:
        loader = MinibatchLoader(data, "train", batch_size, shuffle=True, seed=0, **kw)
        limit = max_cells if "per cell" in name else None  # the scattered reads are slow: a part of the epoch
        n, row = ph.run(name, lambda lo=loader, lim=limit: _epoch(lo, lim))
        row["cells"] = n
        row["cells_per_s"] = n / row["seconds"]
        print(f"  {name}: {row['cells_per_s']:.0f} cells/s")
    ph.write(out)


def extras_mb(data) -> tuple[float, float]:
    """(MB held by the prepared extras, MB the former dense (N, G) / (N, T) arrays would take)."""
    held = dense = 0.0
    for v in data.extras.values():
        held += getattr(v, "nbytes", 0) / 2**20
        dense += int(np.prod(np.shape(v))) * 4 / 2**20
    return held, dense


def scale_run(args) -> None:
    """Write, read backed, (prepare the model's extras), train, one IWELBO pass, the model ATE."""
    ph = Phases()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"scale_{args.cells}x{args.genes}x{args.perturbations}.h5ad"
    legacy = workdir / f"scale_{args.cells}x{args.genes}.h5ad"  # the name before --perturbations was in it
    if not path.exists() and legacy.exists() and args.perturbations == 500:
        path = legacy
    T = args.perturbations
    n_ctrl = args.cells // 10
    per = (args.cells - n_ctrl) // T
    cfg = PRESETS["large"]
    overrides = dict(
        n_genes=args.genes,
        n_perturbed=T,
        n_extra_grn_genes=min(100, args.genes // 20),
        n_doubles=0,
        n_control_cells=args.cells - per * T,
        cells_per_single=per,
        cells_per_double=0,
        grn_edge_prob=min(cfg.grn_edge_prob, 2.0 / T),
    )
    if not path.exists() or args.rewrite:
        ph.run("write h5ad (chunked)", lambda: write_perturbseq_h5ad(path, "large", seed=0, **overrides))
    size_mb = path.stat().st_size / 2**20
    how = "in memory" if args.in_memory else "backed"
    data, row = ph.run(
        f"read {how} + validate", lambda: load_perturbation_data(path, backed=not args.in_memory)
    )
    row["file_mb"] = size_mb
    d = data.dosage  # CSR: values, column indices, row pointers
    row["dosage_mb"] = (d.data.nbytes + d.indices.nbytes + d.indptr.nbytes) / 2**20
    hidden = dict(
        decoder_hidden=args.hidden, encoder_hidden=args.hidden, embedding_encoder_hidden=args.hidden // 2
    )
    mcfg = model_config(args.model, n_latent=args.latent, **hidden)
    options = {"qc_key": "low_quality", "split_seed": 0}
    reqs = data_requirements(mcfg)
    if reqs:
        data, row = ph.run(
            f"prepare ({', '.join(r.name for r in reqs)})", lambda: prepare_data(data, reqs, options)
        )
        row["extras_mb"], row["extras_dense_mb"] = extras_mb(data)
        row.update(data.uns.get("pyrovae_gpo", {}).get("timings", {}))
    tcfg = TrainConfig(
        max_epochs=1,
        max_steps=args.max_steps or None,
        batch_size=args.batch_size,
        n_particles=args.particles,
        val_particles=args.particles,
        lr=1e-3,
    )
    what = f"{args.max_steps} steps" if args.max_steps else "1 epoch"
    run, row = ph.run(
        f"train {args.model}, {what} (+ validation)",
        lambda: train_run(
            data, mcfg, tcfg, workdir / f"run_{args.model}", options, overwrite=True, progress=False
        ),
    )
    n_train = len(data.indices("train"))
    cells = min(n_train, args.max_steps * args.batch_size) if args.max_steps else n_train
    hist = run.metrics()[-1]
    row.update(cells=cells, cells_per_s=cells / row["seconds"], train_loss=hist["train_loss"])
    row["val_loss"] = hist.get("val_loss", float("nan"))
    test = data.indices("test")
    if args.iwelbo_cells:
        test = test[: args.iwelbo_cells]
    res, row = ph.run(
        f"IWELBO ({args.iwelbo_particles} particles)",
        lambda: predictive_iwelbo(
            run.model,
            data,
            test,
            n_particles=args.iwelbo_particles,
            batch_size=args.iwelbo_batch,
            particle_chunk=args.iwelbo_chunk,
            untrained=run.untrained,
        ),
    )
    row.update(cells=len(test), cells_per_s=len(test) / row["seconds"], iwelbo=float(res["iwelbo"].mean()))
    if args.ate_samples:
        post = Posterior(run.model, data.schema(), untrained=run.untrained)
        perts = list(data.treatments[: args.ate_perturbations])
        ate, row = ph.run(
            f"model ATE ({args.ate_samples} samples, {len(perts)} perturbations)",
            lambda: post.model_ate(perts, n_samples=args.ate_samples, library_size=1e4, seed=0),
        )
        row.update(
            samples_per_s=args.ate_samples / row["seconds"], ate_abs_mean=float(np.abs(ate.values).mean())
        )
    ph.write(args.out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("loader", help="backed vs in-memory minibatch throughput on the large preset")
    lo.add_argument("--workdir", default="/tmp/pyrovae_scale")
    lo.add_argument("--out", default="bench/results/loader_large.csv")
    lo.add_argument("--batch-size", type=int, default=512)
    lo.add_argument("--scattered-cells", type=int, default=20480, help="cells read in the per-cell case")
    sc = sub.add_parser("scale", help="a synthetic genome-wide-scale run")
    sc.add_argument("--cells", type=int, default=200_000)
    sc.add_argument("--genes", type=int, default=2000)
    sc.add_argument("--perturbations", type=int, default=500)
    sc.add_argument("--latent", type=int, default=32)
    sc.add_argument("--hidden", type=int, default=128)
    sc.add_argument("--particles", type=int, default=1)
    sc.add_argument("--batch-size", type=int, default=1024)
    sc.add_argument("--iwelbo-particles", type=int, default=100)
    sc.add_argument("--iwelbo-cells", type=int, default=0, help="0: the whole test split")
    sc.add_argument("--iwelbo-batch", type=int, default=256, help="cells per IWELBO batch")
    sc.add_argument("--iwelbo-chunk", type=int, default=25, help="particles per vectorised IWELBO pass")
    sc.add_argument("--model", default="sams_vae_reference", help="a named model (gpo_vae, cradle_vae, ...)")
    sc.add_argument("--max-steps", type=int, default=0, help="training steps (0: one epoch)")
    sc.add_argument("--ate-samples", type=int, default=0, help="model ATE samples (0: no ATE phase)")
    sc.add_argument("--ate-perturbations", type=int, default=8)
    sc.add_argument("--in-memory", action="store_true", help="read the file into memory (CSR), not backed")
    sc.add_argument("--workdir", default="/tmp/pyrovae_scale")
    sc.add_argument("--rewrite", action="store_true")
    sc.add_argument("--out", default="bench/results/scale.csv")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    np.seterr(over="ignore")
    if a.cmd == "loader":
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
        loader_benchmark(Path(a.workdir), a.out, a.scattered_cells, a.batch_size)
    else:
        scale_run(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
