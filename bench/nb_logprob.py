"""Time the negative binomial log-density of the decoder as pyrovae computes it against a log-domain form.

Usage::

    OMP_NUM_THREADS=1 python bench/nb_logprob.py [--steps 8]

pyrovae (``pyrovae.nn.likelihoods``): mu = l softmax(f), r = clamp(theta / (mu + 1e-4), 1e-6), then
lgamma(theta + x) - lgamma(theta) - lgamma(x + 1) + theta log r - (theta + x) log(1 + r).
The log-domain form, with m = mu + 1e-4: theta log theta + x log m - (theta + x) log(theta + m) in place of
the last two terms (the same density while the clamp is inactive, m <= 1e6 theta; no division, no clamp).
Forward and backward (to the decoder's output and log theta) on the benchmark's (P, B, G) = (5, 512, 1187),
and the relative differences of the value and the gradients. A measurement for a possible change of
``pyrovae/nn/likelihoods.py`` (bench/README.md), not used by the package.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def nb_pyrovae(out, log_theta, x, lib):
    mu = lib.unsqueeze(-1) * torch.softmax(out, -1)
    theta = log_theta.exp()
    rate = (theta / (mu + 1e-4)).clamp(min=1e-6)
    post = theta + x
    return (
        torch.lgamma(post)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
        + theta * rate.log()
        - post * torch.log1p(rate)
    )


def nb_log_domain(out, log_theta, x, lib):
    m = lib.unsqueeze(-1) * torch.softmax(out, -1) + 1e-4
    theta = log_theta.exp()
    post = theta + x
    return (
        torch.lgamma(post)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
        + theta * log_theta
        + x * m.log()
        - post * (m + theta).log()
    )


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
    for f in (nb_pyrovae, nb_log_domain):
        times = []
        for _ in range(a.steps + 2):
            out, lt = out0.clone().requires_grad_(), lt0.clone().requires_grad_()
            t0 = time.perf_counter()
            v = f(out, lt, x, lib).sum()
            v.backward()
            times.append(time.perf_counter() - t0)
        res[f.__name__] = (float(v.detach()), out.grad, lt.grad)
        print(f"{f.__name__}: forward + backward {1e3 * np.median(times[2:]):.1f} ms (median of {a.steps})")
    (v1, go1, gt1), (v2, go2, gt2) = res.values()
    print(
        f"relative difference: value {abs(v1 - v2) / abs(v1):.1e}, d/d output "
        f"{float((go1 - go2).abs().max() / go1.abs().max()):.1e}, d/d log theta "
        f"{float((gt1 - gt2).abs().max() / gt1.abs().max()):.1e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
