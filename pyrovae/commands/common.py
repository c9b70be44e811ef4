"""Argument groups shared by subcommands."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyrovae.config import parse_overrides, read_options_file
from pyrovae.data.options import DataOptions
from pyrovae.outputs import dir_lock
from pyrovae.train.device import resolve_device

__all__ = [
    "add_data_args",
    "add_device_arg",
    "command_device",
    "data_options",
    "gather_overrides",
    "parse_overrides",
    "positive_float",
    "positive_int",
    "refuse_existing",
    "run_lock_if_inside",
    "seed_int",
]


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Options of :func:`pyrovae.data.load_perturbation_data`."""
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, help="input .h5ad with raw counts and perturbation labels")
    g.add_argument(
        "--perturbation-key", default="perturbation", help="obs column with labels (default: perturbation)"
    )
    g.add_argument(
        "--control-label", default=None, help="label of control cells (default: control/ctrl/non-targeting)"
    )
    g.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    g.add_argument(
        "--split-key", default=None, help="obs column with train/val/test (default: a seeded split)"
    )
    g.add_argument(
        "--combo-sep", type=separator, default="+", help="separator of combinations in labels (default: +)"
    )
    g.add_argument(
        "--encode-combos-as-unique",
        action="store_true",
        default=None,
        help="one treatment per combination (SVAE+'s default)",
    )
    g.add_argument(
        "--batch-key",
        default=None,
        help="obs column of the batch (replicate, lane, donor): one-hot into the encoder and decoder",
    )
    g.add_argument(
        "--covariate-keys",
        default=None,
        help="comma-separated categorical obs columns (cell line, ...), modelled like the batch",
    )
    g.add_argument(
        "--size-factor-key",
        default=None,
        help="obs column of per-cell library sizes (e.g. total counts when only HVGs are kept; default: "
        "the sum over the genes)",
    )
    g.add_argument(
        "--split-mode",
        default="cells",
        choices=["cells", "combinations"],
        help="seeded split by cell or by held-out combination",
    )
    g.add_argument("--split-seed", type=seed_int, default=0)
    g.add_argument(
        "--heldout",
        default=None,
        help="with --split-mode combinations: comma-separated labels, or a fraction (default 0.25)",
    )

    m = p.add_argument_group("model-specific data preparation")
    m.add_argument(
        "--holdout-perturbations",
        default=None,
        help="comma-separated single perturbations whose cells (combinations included) all go to test: "
        "unseen perturbations (see README)",
    )
    m.add_argument(
        "--qc-key", default=None, help="CRADLE/GPO: obs column with QC failures (default: MAD QC flags)"
    )
    m.add_argument(
        "--extra-genes",
        default=None,
        help="GPO: comma-separated extended GRN genes (default: those recorded in uns, else none)",
    )
    m.add_argument(
        "--pairing-method",
        default="auto",
        choices=["auto", "emd", "sinkhorn"],
        help="GPO: OT pairing of perturbed cells with controls (auto: exact EMD for small groups)",
    )
    m.add_argument(
        "--pairing-reg", type=positive_float, default=0.05, help="GPO: Sinkhorn entropic regulariser"
    )


def data_options(args: argparse.Namespace) -> DataOptions:
    """The :class:`~pyrovae.data.options.DataOptions` of the data arguments (:func:`add_data_args`)."""
    return DataOptions(
        perturbation_key=args.perturbation_key,
        control_label=args.control_label,
        layer=args.layer,
        split_key=args.split_key,
        combo_sep=args.combo_sep,
        encode_combos_as_unique=args.encode_combos_as_unique,
        split_mode=args.split_mode,
        split_seed=args.split_seed,
        heldout=args.heldout,
        batch_key=args.batch_key,
        covariate_keys=args.covariate_keys or (),
        size_factor_key=args.size_factor_key,
        holdout_perturbations=getattr(args, "holdout_perturbations", None),
        qc_key=getattr(args, "qc_key", None),
        extra_genes=getattr(args, "extra_genes", None),
        pairing_method=getattr(args, "pairing_method", "auto"),
        pairing_reg=getattr(args, "pairing_reg", 0.05),
    )


def positive_float(value: str) -> float:
    """argparse type: a number > 0."""
    try:
        out = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value!r}") from None
    if not out > 0 or out == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value!r}")
    return out


def _int_at_least(value: str, low: int, what: str) -> int:
    try:
        out = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}must be a whole number >= {low}, got {value!r}") from None
    if out < low:
        raise argparse.ArgumentTypeError(f"{what}must be >= {low}, got {value!r}")
    return out


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (``--n-samples 0`` is an error, not an empty result)."""
    return _int_at_least(value, 1, "")


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0 (0 switches a step off)."""
    return _int_at_least(value, 0, "")


def seed_int(value: str) -> int:
    """argparse type: a seed, an integer in [0, 2**32 - 1] (numpy's global seed is 32-bit)."""
    out = _int_at_least(value, 0, "a seed ")
    if out > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"a seed must be <= {2**32 - 1}, got {value!r}")
    return out


def separator(value: str) -> str:
    """argparse type: a non-empty combination separator."""
    if not value or value.isspace():
        raise argparse.ArgumentTypeError(
            f"the separator of combination labels cannot be empty or blank, got {value!r}; e.g. --combo-sep +"
        )
    return value


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (:func:`pyrovae.train.device.resolve_device`)."""
    p.add_argument(
        "--device",
        default=None,
        metavar="{auto,cpu,cuda,cuda:N,mps}",
        help="where the model runs: auto (CUDA when torch sees a GPU, else CPU; the default), cpu, cuda, "
        "cuda:N or mps",
    )


def command_device(args: argparse.Namespace, fallback: str = "auto") -> str:
    """The resolved ``--device`` of a command (``fallback`` when not given), as a string like ``cuda:0``."""
    return str(resolve_device(args.device if getattr(args, "device", None) is not None else fallback))


def gather_overrides(config_file: str | None, items: list[str] | None) -> dict[str, Any]:
    """Options of ``--config FILE`` then ``--set key=value`` (the latter win), still untyped."""
    out = read_options_file(config_file) if config_file else {}
    out.update(parse_overrides(items))
    return out


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse outputs that exist unless ``--overwrite`` (one error naming them all)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or choose --out"
        )


def run_lock_if_inside(out: Path, run_dir: Path):
    """The run directory's lock when ``out`` is written inside it (a training there must not interleave)."""
    inside = Path(out).resolve().is_relative_to(Path(run_dir).resolve())
    return dir_lock(run_dir) if inside else contextlib.nullcontext()
