"""SIGKILL a training run at many points (inside and right after atomic writes, mid-step); ``--resume`` must
then give metrics and checkpoints identical to an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tests.helpers import make_adata

HARNESS = Path(__file__).with_name("kill_harness.py")
TRAIN_ARGS = [
    "--model",
    "sams_vae",
    "--set",
    "n_latent=3",
    "decoder_hidden=8",
    "encoder_hidden=8",
    "embedding_encoder_hidden=8",
    "max_epochs=4",
    "batch_size=64",
    "n_particles=2",
    "val_particles=2",
    "patience=100",
    "lr=1e-2",
]
#: renames of one uninterrupted training: marker, config, schema, split, then per epoch best?, last, metrics
N_RENAMES_MIN = 4 + 4 * 2


def _same(a, b, where: str) -> None:
    """Recursive equality of checkpoint contents; the wall-clock ``seconds`` of each epoch and the ``run_id``
    (a random identity of each run: a rerun gets its own; ``load_run`` checks it against fingerprint.json)
    are exempt."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            if k not in ("seconds", "run_id"):
                _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def _metrics(d: Path) -> pd.DataFrame:
    return pd.read_csv(d / "metrics.csv").drop(columns=["seconds"])


def _points(n_renames: int, n_steps: int, n_random: int, seed: int = 0) -> list[list]:
    """Every 'kill inside a write' point up to ``n_renames``, plus seeded random 'after a write' and
    'mid-step' points."""
    rng = np.random.default_rng(seed)
    pts = [["write_before", i] for i in range(1, n_renames + 1)]
    after = rng.choice(np.arange(1, n_renames + 1), size=min(n_random, n_renames), replace=False)
    steps = rng.choice(np.arange(1, n_steps + 1), size=min(n_random, n_steps), replace=False)
    return pts + [["write_after", int(i)] for i in after] + [["step", int(i)] for i in steps]


def _run(tmp_path: Path, points: list[list]) -> dict:
    data = tmp_path / "tiny.h5ad"
    make_adata(n=240, g=12).write_h5ad(data)
    spec = {"data": str(data), "root": str(tmp_path), "args": TRAIN_ARGS, "points": points}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(tmp_path / "spec.json")],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=Path(__file__).parents[1],
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


def _check(result: dict) -> int:
    ref = Path(result["points"][0]["dir"]).parent / "ref"
    assert result["reference"] == 0
    ref_metrics = _metrics(ref)
    assert ref_metrics["epoch"].dtype.kind == "i" and list(ref_metrics["epoch"]) == [1, 2, 3, 4]
    ref_ckpt = {k: torch.load(ref / k, weights_only=True) for k in ("best.pt", "last.pt")}
    killed = 0
    for p in result["points"]:
        d = Path(p["dir"])
        logs = "".join(q.read_text()[-600:] for q in sorted(d.parent.glob(f"{d.name}.*.err")))
        label = f"{p['kind']}:{p['n']} {logs}"
        killed += p["killed"] == -9
        if p["killed"] == 0:  # the point lies beyond the run's last write/step: nothing was killed
            continue
        assert p["killed"] == -9, label
        if p["had_last"]:
            assert p["resumed"] == 0, label
        else:  # died before its first checkpoint: --resume refuses with a clear line, a rerun replaces it
            assert p["resumed"] == 2 and p["fresh"] == 0, label
        pd.testing.assert_frame_equal(_metrics(d), ref_metrics, obj=label)
        for k, ref_state in ref_ckpt.items():
            _same(torch.load(d / k, weights_only=True), ref_state, f"{label} {k}")
        for f in ("config.json", "schema.json", "split.csv"):
            assert (d / f).read_bytes() == (ref / f).read_bytes(), (label, f)
        leftovers = [q.name for q in d.iterdir() if ".tmp" in q.name or ".staging-" in q.name]
        assert not leftovers, (label, leftovers)
    return killed


def test_sigkill_at_every_write_and_random_steps_then_resume_is_identical(tmp_path):
    # 12+ renames x "inside the write", plus random points after a write and in the middle of a step
    result = _run(tmp_path, _points(N_RENAMES_MIN + 2, n_steps=12, n_random=4))
    assert _check(result) >= 20
