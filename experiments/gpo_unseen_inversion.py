"""GPO-VAE's unseen perturbations by decoder inversion: can its decoder express a gene's own knock-down?

A diagnosis of the second transfer tried for GPO-VAE's unseen perturbations (the first, the effect block's
``grn_transfer``, is the library's). GPO-VAE's latent perturbation space has one coordinate per GRN gene,
but its decoder ties coordinate j to gene j only through training data, so ``grn_transfer`` cannot knock an
unseen gene down. Here the latent effect r of an unseen gene j is chosen so that the *decoder* produces
the knock-down: with the run's posterior draws (:meth:`~pyrovae.predict.posterior.Posterior.global_samples`)
and prior basal states z ~ N(0, I), f(r) = the mean over z of the perturbseq transform of the decoder mean
at [z, r, QC-pass artifact input], and

    r_j = argmin_r  sum_g w_g (f(r) - f(0) - y_j)_g^2 + lambda |r|^2,   y_j = kappa e_j,

kappa = the model's own-gene shift of the seen single perturbations (mean over seen t of
(f(r_t) - f(0))_t, r_t the posterior mean latent row of t), w_j = 1 and w_g = ``--other-weight`` on every
other gene (1: keep them fixed; small: let them move). A model whose decoder can express a gene-specific
knock-down reaches (f(r_j) - f(0))_j = kappa with the other genes near 0, i.e. the ``grn_de`` baseline; the
script reports how far it gets and scores f(r_j) - f(0) (the ATE of the model mean, no count noise) like
``pyrovae ate`` scores its predictions (Pearson r and MSE over the unseen singles, all genes pooled, against
the empirical ATE of the test cells), next to the CLI's own rows read from ``RUN/ate_test/``.

Usage (each RUN trained by ``pyrovae train --model gpo_vae --holdout-perturbations ...`` and scored by
``pyrovae ate RUN --data DATA``)::

    python -m experiments.gpo_unseen_inversion --runs RUN1 RUN2 ... --out inversion.csv
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
import torch

from pyrovae.predict.posterior import DEFAULT_LIBRARY_SIZE, Posterior, perturbseq_torch
from pyrovae.runs import load_run

CLI_METHODS = ("gpo", "gpo_prior_draw", "zero_effect", "seen_mean", "grn_de", "grn_deconvolved")


def decoded_mean(post: Posterior, rows: torch.Tensor, g: dict[str, torch.Tensor], z: torch.Tensor):
    """(A, G) mean over the basal states ``z`` (S, K) of the perturbseq-transformed decoder mean with
    latent perturbation offsets ``rows`` (A, T), QC-pass artifact input from the global draw ``g``."""
    model = post.model
    A, S = rows.shape[0], z.shape[0]
    u = torch.cat([z[:, None].expand(S, A, -1), rows[None].expand(S, A, -1)], -1)
    if model.artifact is not None:
        art = model.artifact.block(rows.new_zeros(A, model.artifact.n_qc), g)
        u = torch.cat([u, art.expand(u.shape[:-1] + art.shape[-1:])], -1)
    lib = rows.new_full((S, A), DEFAULT_LIBRARY_SIZE)
    return perturbseq_torch(model.decoder(u, lib).mean).mean(0)


def invert(run_dir: str, lam: float, other_weights: list[float], seed: int = 0) -> pd.DataFrame:
    run = load_run(run_dir)
    post = Posterior.from_run(run)
    genes, treatments = post.genes, post.treatments
    ate_dir = f"{run_dir}/ate_test"
    emp = pd.read_csv(f"{ate_dir}/ate_empirical.csv", index_col=0)
    untrained = post.untrained.tolist()
    unseen = [t for t, u in zip(treatments, untrained) if u and t in emp.index]  # held-out singles
    seen = [i for i, u in enumerate(untrained) if not u]
    gpos = {g: i for i, g in enumerate(genes)}
    draws = {k: torch.as_tensor(v) for k, v in post.global_samples(200, seed=seed).items()}
    g0 = {k: v[0] for k, v in draws.items()}
    r_seen = (draws["mask"] * draws["E"]).mean(0)  # (T, T) posterior mean latent rows
    z = torch.randn(256, post.model.n_latent, generator=torch.Generator().manual_seed(seed))
    T = len(treatments)
    with torch.no_grad():
        base = decoded_mean(post, torch.zeros(1, T), g0, z)[0]
        shifts = decoded_mean(post, r_seen[seen], g0, z) - base
    kappa = float(np.mean([shifts[i, gpos[treatments[t]]].item() for i, t in enumerate(seen)]))
    preds: dict[str, pd.DataFrame] = {}
    own: dict[str, list[float]] = {}
    for w in other_weights:
        rows = []
        for j in unseen:
            y = torch.zeros(len(genes))
            y[gpos[j]] = kappa
            wgt = torch.full((len(genes),), float(w))
            wgt[gpos[j]] = 1.0
            r = torch.zeros(1, T, requires_grad=True)
            opt = torch.optim.LBFGS([r], max_iter=200, line_search_fn="strong_wolfe")

            def closure(r=r, y=y, wgt=wgt, opt=opt):
                opt.zero_grad()
                loss = (((decoded_mean(post, r, g0, z)[0] - base - y) ** 2) * wgt).sum() + lam * (r**2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                rows.append((decoded_mean(post, r, g0, z)[0] - base).numpy())
            own.setdefault(f"inversion_w{w:g}", []).append(float(rows[-1][gpos[j]]))
        preds[f"inversion_w{w:g}"] = pd.DataFrame(np.asarray(rows), index=unseen, columns=genes)
    for m in CLI_METHODS:
        preds[m] = pd.read_csv(f"{ate_dir}/ate_pred_{m}.csv", index_col=0).loc[unseen]
    truth = emp.loc[unseen].to_numpy().reshape(-1)
    out = []
    for m, p in preds.items():
        v = p.to_numpy().reshape(-1)
        r = float(np.corrcoef(v, truth)[0, 1]) if np.std(v) > 0 else float("nan")
        out.append(
            {
                "run": run_dir,
                "method": m,
                "pearson": r,
                "mse": float(np.mean((v - truth) ** 2)),
                "kappa": kappa,
                "own_gene_shift": float(np.mean(own[m])) if m in own else float("nan"),
            }
        )
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="GPO-VAE run directories scored by pyrovae ate")
    p.add_argument("--ridge", type=float, default=1e-3, help="lambda")
    p.add_argument("--other-weight", type=float, nargs="+", default=[1.0, 0.1], help="w on the other genes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV of the per-run scores")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    res = pd.concat([invert(r, args.ridge, args.other_weight, args.seed) for r in args.runs])
    if args.out:
        res.to_csv(args.out, index=False)
    agg = res.groupby("method", sort=False)[["pearson", "mse", "own_gene_shift"]].agg(["mean", "std"])
    print(f"unseen singles, mean ± sd over {res['run'].nunique()} runs (kappa {res['kappa'].mean():.3f}):")
    print(agg.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
