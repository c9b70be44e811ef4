"""A hostile environment (issue 27, "also finish"): a full disk during every write, a memory limit, inputs and
outputs without permission, the same seed with 1 and 2 threads. Each ends in one clear line (exit 2) with
nothing lost, or a documented limit (docs/guarantees.md)."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pyrovae.cli import main
from pyrovae.runs import load_run
from tests.helpers import make_adata

TINY = ["n_latent=3", "decoder_hidden=8", "encoder_hidden=8", "embedding_encoder_hidden=8", "max_epochs=1"]
TINY += ["batch_size=64", "n_particles=1", "val_particles=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data.h5ad"
    make_adata().write_h5ad(data)
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--quiet", "--set", *TINY]) == 0
    return root, data, run


def _cli(args: list[str], limit: str = "", cwd: Path | None = None, prefix: tuple = ()):
    """``python -m pyrovae.cli ARGS`` in a child process; ``limit``: Python run in the child before main
    (e.g. setting a resource limit once everything is imported)."""
    code = (
        "import sys, resource\nfrom pyrovae.cli import build_parser, main\nbuild_parser()\n"
        f"{limit}\nsys.exit(main({args!r}))"
    )
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stderr


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


FILE_LIMIT = "resource.setrlimit(resource.RLIMIT_FSIZE, ({n}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))"


@pytest.mark.parametrize("limit", [2_000, pytest.param(30_000, marks=pytest.mark.slow)])
def test_a_full_disk_while_training_leaves_nothing_half_made(trained, tmp_path, limit):
    """Every write fails past ``limit`` bytes (RLIMIT_FSIZE: what a full disk looks like to a process)."""
    _, data, _ = trained
    out = tmp_path / "r"
    rc, err = _cli(["train", "--data", str(data), "--out", str(out), "--quiet", "--set", *TINY],
                   FILE_LIMIT.format(n=limit))  # fmt: skip
    assert rc == 2
    line = _one_error_line(err)
    assert "File too large" in line or "disk full" in line, line
    assert not out.exists()  # a run that failed before its first checkpoint leaves nothing


def test_a_full_disk_while_resuming_keeps_the_last_checkpoint(trained, tmp_path):
    _, data, run_dir = trained
    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")}
    rc, err = _cli(["train", "--data", str(data), "--out", str(run), "--resume", "--quiet", "--set",
                    "max_epochs=3"], FILE_LIMIT.format(n=30_000))  # fmt: skip
    assert rc == 2
    assert "disk full" in _one_error_line(err)
    after = {p.name for p in run.iterdir()}
    assert not [n for n in after if ".tmp" in n]  # no temporary left behind
    run_ = load_run(run, "last")  # still whole
    assert (run / "best.pt").read_bytes() == before["best.pt"] or len(run_.metrics()) >= 1
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", "--quiet", "--set",
                 "max_epochs=2"]) == 0  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("command", ["iwelbo", "sample", "ate"])
def test_a_full_disk_while_evaluating_keeps_the_old_output(trained, tmp_path, command):
    _, data, run_dir = trained
    out = tmp_path / ("old.h5ad" if command == "sample" else "old.csv" if command == "iwelbo" else "old_ate")
    args = {
        "iwelbo": ["iwelbo", str(run_dir), "--data", str(data), "--particles", "2", "--seeds", "0", "1"],
        "sample": ["sample", str(run_dir), "--perturbation", "A", "B", "--n-cells", "3000"],
        "ate": ["ate", str(run_dir), "--data", str(data), "--n-samples", "8"],
    }[command] + ["--out", str(out)]
    assert main(args) == 0
    snapshot = {p: p.read_bytes() for p in ([out] if out.is_file() else list(out.iterdir()))}
    rc, err = _cli([*args, "--overwrite"], FILE_LIMIT.format(n=300 if command == "iwelbo" else 2_000))
    assert rc == 2
    line = _one_error_line(err)
    assert "File too large" in line or "disk full" in line, line
    assert {p: p.read_bytes() for p in snapshot} == snapshot  # the previous output is intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_memory_limit_is_one_line(trained, tmp_path):
    _, data, _ = trained
    limit = (
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "hard = resource.getrlimit(resource.RLIMIT_AS)[1]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 1_000_000_000, hard))"
    )
    big = ["n_latent=60000", "decoder_hidden=60000", "encoder_hidden=60000", "max_epochs=1"]
    out = tmp_path / "r"
    rc, err = _cli(["train", "--data", str(data), "--out", str(out), "--quiet", "--set", *big], limit)
    assert rc == 2
    assert "out of memory" in _one_error_line(err)
    assert not out.exists()


@pytest.mark.skipif(not shutil.which("setpriv") or resource.getrlimit(resource.RLIMIT_NOFILE) is None,
                    reason="needs setpriv")  # fmt: skip
def test_no_permission_is_one_line(trained, tmp_path):
    """Without the capabilities that let root ignore file permissions (as an unprivileged user would be):
    an unreadable input, an unwritable output directory, a read-only run."""
    import os

    if os.geteuid() != 0:
        pytest.skip("run as root: drops root's permission override with setpriv")
    _, data, run_dir = trained
    drop = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")
    secret = tmp_path / "secret.h5ad"
    shutil.copy(data, secret)
    secret.chmod(0o600)
    os.chown(secret, 65534, 65534)
    rc, err = _cli(["train", "--data", str(secret), "--out", str(tmp_path / "r1")], prefix=drop)
    assert rc == 2 and "permission denied" in _one_error_line(err)
    walled = tmp_path / "walled"
    walled.mkdir(mode=0o755)
    os.chown(walled, 65534, 65534)
    rc, err = _cli(["train", "--data", str(data), "--out", str(walled / "r"), "--set", *TINY], prefix=drop)
    assert rc == 2 and "Permission denied" in _one_error_line(err)
    ro = tmp_path / "ro_run"
    shutil.copytree(run_dir, ro)
    for p in [ro, *ro.iterdir()]:
        os.chown(p, 65534, 65534)
    rc, err = _cli(["iwelbo", str(ro), "--data", str(data), "--particles", "2", "--seeds", "0"], prefix=drop)
    assert rc == 2 and "Permission denied" in _one_error_line(err)
    load_run(ro)  # untouched


def test_the_same_seed_with_1_and_2_threads(trained, tmp_path):
    """A documented limit: the same seed gives the same run at a given thread count; with another thread
    count the float32 reductions round differently (parameters differ in the last bits, ~1e-8 after a few
    steps), so bit-for-bit reproduction needs the same number of threads."""
    _, data, _ = trained
    saved = torch.get_num_threads()
    runs = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            runs[n] = tmp_path / f"t{n}"
            args = ["train", "--data", str(data), "--out", str(runs[n]), "--quiet", "--set", *TINY]
            assert main([*args, "max_epochs=3"]) == 0
        torch.set_num_threads(1)
        again = tmp_path / "t1b"
        assert main(["train", "--data", str(data), "--out", str(again), "--quiet", "--set", *TINY,
                     "max_epochs=3"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(saved)
    state = {
        k: torch.load(p / "last.pt", weights_only=True)["model"] for k, p in {**runs, "1b": again}.items()
    }
    assert all(torch.equal(state[1][k], state["1b"][k]) for k in state[1])  # same threads: bit for bit
    diff = max(float((state[1][k].float() - state[2][k].float()).abs().max()) for k in state[1])
    assert diff < 1e-4
    m1, m2 = (pd.read_csv(p / "metrics.csv") for p in runs.values())
    np.testing.assert_allclose(m1["train_loss"], m2["train_loss"], rtol=1e-5)
