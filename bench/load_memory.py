"""Peak RSS of reading a backed .h5ad with the pyrovae on PYTHONPATH (before/after a change), and D's size.

Usage::

    PYTHONPATH=. python bench/load_memory.py /tmp/m.h5ad write        # 500,000 cells x 410 genes, T = 400
    PYTHONPATH=. python bench/load_memory.py /tmp/m.h5ad read         # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/load_memory.py /tmp/m.h5ad read

(It does not put this checkout on ``sys.path``, so ``PYTHONPATH`` chooses the code that is measured.)
"""

import sys
import time
from pathlib import Path

import pyrovae
from pyrovae.data.anndata import load_perturbation_data
from pyrovae.simulate import PRESETS, write_perturbseq_h5ad

path = Path(sys.argv[1])
cells, genes, T = 500_000, 410, 400
if sys.argv[2] == "write":
    n_ctrl = cells // 10
    per = (cells - n_ctrl) // T
    cfg = PRESETS["large"]
    write_perturbseq_h5ad(
        path,
        "large",
        seed=0,
        n_genes=genes,
        n_perturbed=T,
        n_extra_grn_genes=5,
        n_doubles=0,
        n_control_cells=cells - per * T,
        cells_per_single=per,
        cells_per_double=0,
        grn_edge_prob=min(cfg.grn_edge_prob, 2.0 / T),
    )
    sys.exit(0)


def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024


r0 = rss()
t0 = time.perf_counter()
data = load_perturbation_data(path, backed=True)
d = data.dosage
mb = (
    (d.data.nbytes + d.indices.nbytes + d.indptr.nbytes) / 2**20 if hasattr(d, "indptr") else d.nbytes / 2**20
)
print(
    f"{pyrovae.__file__}: load {time.perf_counter() - t0:.1f} s, RSS before {r0:.0f} MB, "
    f"peak {hwm():.0f} MB, "
    f"after {rss():.0f} MB, D {type(d).__name__} {mb:.1f} MB, N={data.n_cells} T={data.n_treatments}"
)
