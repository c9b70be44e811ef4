"""Gradient variance / SNR and time per step of the q(M) logit estimators, on the same model state.

Protocol (``configs/mask_estimators.yaml``): a SAMS-VAE (correlated guide, the demo's settings) is trained
with the reference straight-through estimator for ``warmup_epochs`` (0 = at initialisation); that state is
loaded into a model of each estimator (the estimators share every parameter), and on one fixed minibatch of
the training split ``n_draws`` gradients of the mask logits are drawn (the Trainer's ELBO, ``n_particles``
vectorised particles, no optimiser step). Per estimator: the mean over entries of the per-entry variance,
the median per-entry SNR |mean| / sd, the cosine and relative distance of the mean gradient to the
reference (the unbiased ``loo`` mean over ``reference_draws`` draws; straight-through and relaxed are
biased), and the seconds per ``loss_and_grads`` call.

Usage::

    python -m experiments.mask_estimators --out runs/exp/mask_estimators
    python -m experiments.mask_estimators --out runs/exp/mask_estimators_ref --simulator sams_reference \\
        --set likelihood=normal
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from experiments import common
from pyrovae.data.protocols import cell_split

NAME = "mask_estimators"


def build_parser():
    return common.build_parser(NAME, __doc__)


def gradient_draws(
    model, data, cfg_train, n_draws: int, seed: int, burn_in: int = 0
) -> tuple[np.ndarray, float]:
    """(n_draws, T, K) gradients of the ELBO w.r.t. the mask logits on one minibatch; seconds per draw.

    ``burn_in`` draws are taken first and dropped: they warm up the score-function estimator's baseline on
    this state (Pyro's decaying average; the logits and every other parameter stay fixed)."""
    import pyro

    from pyrovae.data.loader import MinibatchLoader
    from pyrovae.train.trainer import make_elbo, split_counts

    loader = MinibatchLoader(data, "train", cfg_train.batch_size, shuffle=True, seed=seed)
    batch = next(iter(loader))
    n = loader.n_cells
    w = model.global_weights(batch, split_counts(model, data, "train", "cpu"), n, cfg_train.global_scaling)
    elbo = make_elbo(cfg_train.n_particles)
    logits = model.effect.q_mask_logits
    pyro.set_rng_seed(seed)
    model.eval()  # freezes the temperature schedule; the networks have no dropout / batch-norm
    for _ in range(burn_in):  # warms up the decaying-average baseline of the score-function estimator
        model.zero_grad(set_to_none=True)
        elbo.loss_and_grads(model.model, model.guide, batch, n, w, 1.0 / n)
    out, t0 = [], time.perf_counter()
    for _ in range(n_draws):
        model.zero_grad(set_to_none=True)
        elbo.loss_and_grads(model.model, model.guide, batch, n, w, 1.0 / n)
        out.append(-logits.grad.detach().cpu().numpy().copy())
    return np.stack(out), (time.perf_counter() - t0) / n_draws


def main(argv=None) -> int:
    import torch

    from pyrovae.models.effects import MASK_ESTIMATORS
    from pyrovae.models.zoo import build_model
    from pyrovae.runs import train_run

    args = build_parser().parse_args(argv)
    exp = common.Experiment(NAME, args)
    st = exp.settings
    torch.set_num_threads(1)
    labels, _ = exp.labels()
    data = exp.load(cell_split(labels, seed=0, test_frac=0.1, val_frac=1 / 9, stratify=True))
    if "n_latent" not in st["model"] and "ground_truth" in exp.adata.uns:
        st["model"]["n_latent"] = int(np.asarray(exp.adata.uns["ground_truth"]["masks"]).shape[1])
    seed = int(st["seed"])
    rows = []
    for i_state, warm in enumerate(st["warmup_epochs"]):
        mcfg, tcfg = exp.configs("sams_vae", seed)
        state = None
        if warm:
            run = train_run(
                data,
                mcfg,
                tcfg.replace(max_epochs=int(warm)),
                exp.out / "runs" / f"warmup{warm}",
                data_options=exp.options.to_dict(),
                overwrite=True,
                progress=args.progress,
            )
            state = run.model.state_dict()
        ref = None
        # draw seeds depend on the state and the estimator's name only (a row does not move when the list
        # of estimators changes)
        for est in [st["reference_estimator"]] + list(st["estimators"]):
            kw = {"mask_estimator": est}
            if est == "relaxed":
                kw["temperature"] = float(st["relaxed_temperature"])
            cfg = mcfg.replace(**kw)
            model = build_model(
                cfg,
                data.n_genes,
                data.n_treatments,
                data.norm_mean,
                data.norm_std,
                data.is_count_data,
                seed=seed,
            )
            if state is not None:
                model.load_state_dict(state)
            n_draws = int(st["reference_draws"] if ref is None else st["n_draws"])
            index = MASK_ESTIMATORS.index(est) if est in MASK_ESTIMATORS else len(MASK_ESTIMATORS)
            draw_seed = seed + 1 + 1000 * i_state + (0 if ref is None else 1 + index)
            burn = int(st.get("baseline_burn_in", 0)) if est == "score_function" and ref is not None else 0
            g, sec = gradient_draws(model, data, tcfg, n_draws, draw_seed, burn_in=burn)
            g = g.reshape(g.shape[0], -1)
            mean, sd = g.mean(0), g.std(0, ddof=1)
            if ref is None:
                ref = mean
                # relative Monte Carlo error of the reference itself: distances below it are noise
                ref_se = float(np.sqrt((sd**2).sum() / n_draws) / np.linalg.norm(ref))
                continue
            cos = float(mean @ ref / (np.linalg.norm(mean) * np.linalg.norm(ref) + 1e-30))
            rows.append(
                {
                    "warmup_epochs": int(warm),
                    "estimator": est,
                    "mean_variance": float((sd**2).mean()),
                    "median_snr": float(np.median(np.abs(mean) / (sd + 1e-30))),
                    "cosine_to_reference": cos,
                    "rel_distance_to_reference": float(np.linalg.norm(mean - ref) / np.linalg.norm(ref)),
                    "reference_rel_se": ref_se,
                    "seconds_per_step": sec,
                    "n_draws": n_draws,
                }
            )
            exp.log(
                f"  warmup {warm}: {est}: variance {rows[-1]['mean_variance']:.3g}, median SNR "
                f"{rows[-1]['median_snr']:.3f}, cosine to {st['reference_estimator']} {cos:.3f}, "
                f"{sec * 1e3:.1f} ms/step"
            )
            exp.record(rows[-1])
    df = pd.DataFrame(rows)
    shown = df.copy()
    for col in ("mean_variance", "median_snr", "rel_distance_to_reference", "reference_rel_se"):
        shown[col] = shown[col].map(lambda v: f"{v:.3g}")
    shown["seconds_per_step"] = shown["seconds_per_step"].map(lambda v: f"{v * 1e3:.0f} ms")
    notes = [
        f"{exp.source['description']}; model state: SAMS-VAE (correlated guide) after `warmup_epochs` of "
        "training with the demo's settings (straight-through); one fixed training minibatch of "
        f"{st['train']['batch_size']} cells, {st['train']['n_particles']} particles.",
        f"reference = mean of {st['reference_draws']} draws of the unbiased '{st['reference_estimator']}' "
        "estimator; reference_rel_se is its own relative Monte Carlo error (a distance below about "
        "sqrt(reference_rel_se^2 + the estimator's own) is noise, above it bias).",
        f"relaxed measured at temperature {st['relaxed_temperature']}; seconds per loss_and_grads call on "
        "one thread.",
    ]
    md = exp.write_table("summary", shown, "Mask-logit gradient estimators on one model state", notes, raw=df)
    exp.finish()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
