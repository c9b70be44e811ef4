"""Time the decoder's negative binomial log-density in its rate form against the log-domain form.

Usage::

    OMP_NUM_THREADS=1 python bench/nb_logprob.py [--steps 8]

Rate form (pyrovae before the log-domain form, main at d74d563): mu = l softmax(f),
r = clamp(theta / (mu + 1e-4), 1e-6), then lgamma(theta + x) - lgamma(theta) - lgamma(x + 1)
+ theta log r - (theta + x) log(1 + r).
The log-domain form, with m = mu + 1e-4: theta log theta + x log m - (theta + x) log(theta + m) in place of
the last two terms (the same density while the clamp is inactive, m <= 1e6 theta; no division, no clamp).
``pyrovae``: :class:`pyrovae.nn.likelihoods.GammaPoissonMean`, the log-domain form after its check that
the clamp is inactive (the rate form where it is active).
Forward and backward (to the decoder's output and log theta) on the benchmark's (P, B, G) = (5, 512, 1187),
and the relative differences of the value and the gradients.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.benchmark import nb_log_prob, nb_log_prob_log_domain  # noqa: E402
from pyrovae.nn.likelihoods import GammaPoissonMean  # noqa: E402


def nb_rate_form(out, log_theta, x, lib):
    theta = log_theta.exp()
    rate = (theta / (lib.unsqueeze(-1) * torch.softmax(out, -1) + 1e-4)).clamp(min=1e-6)
    return nb_log_prob(x, theta, rate)


def nb_log_domain(out, log_theta, x, lib):
    m = lib.unsqueeze(-1) * torch.softmax(out, -1) + 1e-4
    return nb_log_prob_log_domain(x, log_theta.exp(), log_theta, m)


def nb_pyrovae(out, log_theta, x, lib):
    mu = lib.unsqueeze(-1) * torch.softmax(out, -1)
    return GammaPoissonMean(log_theta.exp(), mu + 1e-4).log_prob(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    P, B, G = 5, 512, 1187
    out0 = torch.randn(P, B, G, generator=g)
    x = torch.poisson(torch.full((B, G), 0.8), generator=g)
    lib = torch.rand(B, generator=g) * 3000 + 500
    lt0 = torch.randn(G, generator=g) * 0.5
    res = {}
    for f in (nb_rate_form, nb_log_domain, nb_pyrovae):
        times = []
        for _ in range(a.steps + 2):
            out, lt = out0.clone().requires_grad_(), lt0.clone().requires_grad_()
            t0 = time.perf_counter()
            v = f(out, lt, x, lib).sum()
            v.backward()
            times.append(time.perf_counter() - t0)
        res[f.__name__] = (float(v.detach()), out.grad, lt.grad)
        print(f"{f.__name__}: forward + backward {1e3 * np.median(times[2:]):.1f} ms (median of {a.steps})")
    v1, go1, gt1 = res["nb_rate_form"]
    for name in ("nb_log_domain", "nb_pyrovae"):
        v2, go2, gt2 = res[name]
        print(
            f"{name} vs nb_rate_form, relative difference: value {abs(v1 - v2) / abs(v1):.1e}, d/d output "
            f"{float((go1 - go2).abs().max() / go1.abs().max()):.1e}, d/d log theta "
            f"{float((gt1 - gt2).abs().max() / gt1.abs().max()):.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
