"""``pyrovae simulate``: write the embedded simulated Perturb-seq dataset."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pyrovae.commands.common import parse_overrides, seed_int
from pyrovae.outputs import atomic_write
from pyrovae.simulate import PRESETS, simulate_perturbseq


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".h5ad":
        raise ValueError(f"--out {out} must end in .h5ad (the format every other command reads)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the path of the .h5ad file to write")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    adata = simulate_perturbseq(args.preset, seed=args.seed, **simulation_overrides(args.preset, args.set))
    atomic_write(out, lambda tmp: adata.write_h5ad(tmp))
    shown = "".join(f", {item}" for item in args.set or [])
    print(
        f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes (preset {args.preset}, seed {args.seed}"
        f"{shown})"
    )
    return 0


def simulation_overrides(preset: str, items: list[str] | None) -> dict:
    """``--set KEY=VALUE`` items as :class:`~pyrovae.simulate.SimulationConfig` overrides, each value
    of the preset field's type (``grn_edge_prob=1e-1`` is a float, ``grn_shape=chain`` a string)."""
    over = parse_overrides(items)
    fields = {f.name: getattr(PRESETS[preset], f.name) for f in dataclasses.fields(PRESETS[preset])}
    unknown = sorted(set(over) - set(fields))
    if unknown:
        raise ValueError(f"unknown simulation setting(s) {unknown} in --set; valid: {sorted(fields)}")
    out = {}
    for key, value in over.items():
        kind = type(fields[key])
        try:
            out[key] = kind(value) if kind in (int, float, str) and not isinstance(value, bool) else value
        except (TypeError, ValueError):
            raise ValueError(f"--set {key}={value!r}: expected a {kind.__name__}") from None
        if kind is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"--set {key}={value!r}: expected an integer")
    return out


def register(sub) -> None:
    p = sub.add_parser("simulate", help="write a simulated Perturb-seq dataset with ground truth")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--set",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="override fields of the preset (pyrovae.simulate.SimulationConfig), e.g. "
        "grn_shape=chain n_control_cells=800",
    )
    p.set_defaults(func=run)
