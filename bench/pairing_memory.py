"""Peak RSS of the OT pairing's features of a split's controls read from a backed .h5ad (issue 29), with the
pyrovae on PYTHONPATH (before / after a change).

The features are ``log1p(target_sum * counts / total)`` on the GRN node genes for every control cell of the
training split (:func:`pyrovae.data.extras.normalized_rows`, called by
:func:`pyrovae.data.pairing.pair_with_controls`). Usage, on a file written by ``bench/scale_run.py``::

    PYTHONPATH=. python bench/pairing_memory.py /tmp/scale/scale_1000000x2000x500.h5ad 600
    PYTHONPATH=/path/to/other/checkout python bench/pairing_memory.py FILE 600

(It does not put this checkout on ``sys.path``, so ``PYTHONPATH`` chooses the code that is measured.)
"""

import resource
import sys
import time

import numpy as np

from pyrovae.data.anndata import load_perturbation_data
from pyrovae.data.extras import median_positive, normalized_rows, row_totals


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


path, n_cols = sys.argv[1], int(sys.argv[2])
data = load_perturbation_data(path, backed=True)
totals = row_totals(data.counts)
rows = np.flatnonzero((data.labels == data.control_label) & (data.split == "train"))
before, t0 = rss_mb(), time.perf_counter()
feats = normalized_rows(data.counts, rows, np.arange(n_cols), totals, median_positive(totals))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(
    f"controls={len(rows)} cols={n_cols} features_mb={feats.nbytes / 2**20:.1f} seconds={seconds:.1f} "
    f"rss_before_mb={before:.0f} peak_rss_mb={peak:.0f}"
)
