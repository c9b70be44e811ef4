"""``pyrovae simulate``: write the embedded simulated Perturb-seq dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from pyrovae.commands.common import seed_int
from pyrovae.data.simulate import PRESETS, simulate_perturbseq
from pyrovae.outputs import atomic_write


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".h5ad":
        raise ValueError(f"--out {out} must end in .h5ad (the format every other command reads)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the path of the .h5ad file to write")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    adata = simulate_perturbseq(args.preset, seed=args.seed)
    atomic_write(out, lambda tmp: adata.write_h5ad(tmp))
    print(f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes (preset {args.preset}, seed {args.seed})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("simulate", help="write a simulated Perturb-seq dataset with ground truth")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)
