"""``pyrovae train``: train a named model into a run directory (or resume one)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pyrovae.commands.common import (
    add_data_args,
    add_device_arg,
    command_device,
    data_options,
    gather_overrides,
)
from pyrovae.config import route_options
from pyrovae.models.zoo import MODEL_ZOO, ModelConfig, model_config
from pyrovae.runs import load_run, train_run
from pyrovae.setup import read_data
from pyrovae.train.trainer import TrainConfig


def gene_feature_options(features: str | None, graph: str | None) -> dict[str, str]:
    """The model options of ``--gene-features data|FILE`` / ``--gene-graph FILE`` (one of them)."""
    if features is not None and graph is not None:
        raise ValueError("give --gene-features or --gene-graph, not both (one feature source per run)")
    if graph is not None:
        return {"gene_features": "graph", "gene_features_file": str(Path(graph).resolve())}
    if features is None:
        return {}
    if features == "data":
        return {"gene_features": "data"}
    return {"gene_features": "table", "gene_features_file": str(Path(features).resolve())}


def run(args: argparse.Namespace) -> int:
    groups = {"model": ModelConfig.keys(), "training": TrainConfig}
    m_over, t_over = route_options(gather_overrides(args.config, args.set), groups)
    m_over.update(gene_feature_options(args.gene_features, args.gene_graph))
    opts = data_options(args)
    if args.resume:
        if args.overwrite:
            raise ValueError("--resume continues a run and --overwrite replaces it; pass one of them")
        # the stored run decides: its model, options, genes, treatments and split (by cell name)
        stored = load_run(args.out, checkpoint="last")
        asked = stored.model_cfg.replace(**m_over)  # repeating the run's own options is fine
        changed = sorted(k for k in m_over if asked.get(k) != stored.model_cfg.get(k))
        if changed:
            raise ValueError(f"cannot change model options {changed} when resuming a run")
        mcfg, tcfg = stored.model_cfg, stored.train_cfg.replace(**t_over)
        if tcfg.seed != stored.train_cfg.seed:
            raise ValueError(
                f"cannot change seed when resuming (stored: {stored.train_cfg.seed}): the random state "
                "continues from the last checkpoint; train a new run for another seed"
            )
        # data options given on the command line must be the run's: the stored ones decide, so another
        # value (another --split-key, ...) would be silently ignored
        defaults, kept = args.data_defaults, stored.options
        other = {
            f.name: getattr(opts, f.name)
            for f in dataclasses.fields(opts)
            if getattr(defaults, f.name) != getattr(opts, f.name) != getattr(kept, f.name)
        }
        if other:
            shown = ", ".join(f"{k}={v!r} (the run's: {getattr(kept, k)!r})" for k, v in other.items())
            raise ValueError(
                f"cannot resume {args.out} with other data options: {shown}; a run keeps the data options it "
                "was trained with: drop them, or train a new run"
            )
        opts = stored.options
        data = stored.load_data(args.data, verify=False)  # train_run refuses data that is not the run's
        name = args.model or stored.model_name
    else:
        name = args.model or "sams_vae"
        mcfg = model_config(name, **m_over)
        tcfg = TrainConfig().replace(**t_over)
        # read and prepared as the model needs (GPO/CRADLE preparation, held-out perturbations)
        data, opts = read_data(args.data, opts, mcfg, model_name=name)
    if tcfg.lr == 0:
        raise ValueError(
            "option lr=0 never moves the parameters (nothing would be trained); give lr > 0, e.g. 1e-3"
        )
    # --device wins; else a --set/--config device; else auto (a resumed run re-resolves where it runs now)
    tcfg = tcfg.replace(device=command_device(args, t_over.get("device", "auto")))
    run_ = train_run(
        data,
        mcfg,
        tcfg,
        args.out,
        data_options=opts.to_dict(),
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.quiet,
        model_name=name,
        protect=(args.data, args.config),
    )
    hist = run_.metrics()
    last = hist[-1] if hist else {}
    print(
        f"trained {name or 'the stored model'} into {args.out}: {int(last.get('epoch', 0))} epochs, "
        f"train loss {last.get('train_loss', float('nan')):.3f}, "
        f"val loss {last.get('val_loss', float('nan')):.3f}"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model into a run directory")
    add_data_args(p)
    p.add_argument(
        "--model",
        default=None,
        choices=sorted(MODEL_ZOO),
        help="named model (default sams_vae; resume: the run's)",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", default=None, help="YAML file of model/training options")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="option overrides, e.g. --set n_latent=20 max_epochs=50 lr=1e-3",
    )
    p.add_argument(
        "--gene-features",
        default=None,
        metavar="data|FILE",
        help="predict effects from the target genes' features (unseen perturbations included): 'data' (PCA "
        "of the training pseudobulk) or a gene x dimension table (CSV, TSV, Parquet; gene in column one)",
    )
    p.add_argument(
        "--gene-graph",
        default=None,
        metavar="FILE",
        help="... or from a gene-gene graph: an edge list (source, target[, weight]), propagated",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arg(p)
    p.set_defaults(func=run)
    # the data options a command line gives when it names none (--resume refuses others than the run's)
    p.set_defaults(data_defaults=data_options(p.parse_args(["--data", "-", "--out", "-"])))
