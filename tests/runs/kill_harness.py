"""Kill-and-resume harness: ``python kill_harness.py SPEC.json`` (run by ``test_kill_resume.py``).

It imports pyrovae once and forks one child per training (so each costs no interpreter start-up); the parent
never computes with torch, so forking stays safe. Each child runs ``pyrovae train`` through the CLI entry
point, with a fault injected *by this harness* (pyrovae has no test hooks): ``os.replace`` is wrapped so the
child SIGKILLs itself just before or just after the n-th file rename (a kill inside / right after an atomic
write), or ``Trainer.train_step`` is wrapped so it dies in the middle of the n-th optimisation step. After
each kill the harness runs ``pyrovae train --resume`` (or, when the run died before its first checkpoint, the
same training again without ``--resume``, which replaces an incomplete run) and records the exit codes.

SPEC: {"data": path, "root": dir, "args": [...train options...], "points": [[kind, n], ...]} with kind in
``write_before``, ``write_after``, ``step``. Writes ``root/result.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pyrovae.cli import build_parser, main  # noqa: E402
from pyrovae.train import trainer as train_module  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _inject(kind: str, n: int) -> None:
    count = {"replace": 0, "step": 0}
    if kind.startswith("write"):
        real = os.replace

        def replace(src, dst):
            count["replace"] += 1
            if kind == "write_before" and count["replace"] == n:
                _die()
            real(src, dst)
            if kind == "write_after" and count["replace"] == n:
                _die()

        os.replace = replace
    elif kind == "step":
        real_step = train_module.Trainer.train_step

        def step(self, *a, **k):
            count["step"] += 1
            if count["step"] == n:
                _die()
            return real_step(self, *a, **k)

        train_module.Trainer.train_step = step
    else:
        raise ValueError(kind)


def _fork(argv: list[str], log: Path, kill: tuple[str, int] | None = None) -> int:
    """Run ``pyrovae ARGV`` in a forked child (stderr to ``log``); its exit code, or -signal if killed."""
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        try:
            torch.set_num_threads(1)
            if kill is not None:
                _inject(*kill)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run(spec: dict) -> dict:
    build_parser()  # import every command module here, once, not in each child
    root = Path(spec["root"])
    base = ["train", "--data", spec["data"], "--quiet", *spec["args"]]
    ref = _fork([*base[:1], "--out", str(root / "ref"), *base[1:]], root / "ref.err")
    out = {"reference": ref, "points": []}
    for i, (kind, n) in enumerate(spec["points"]):
        d = root / f"k{i:02d}"
        killed = _fork([*base[:1], "--out", str(d), *base[1:]], root / f"k{i:02d}.killed.err", (kind, int(n)))
        had_last = (d / "last.pt").exists()
        resumed = _fork([*base[:1], "--out", str(d), "--resume", *base[1:]], root / f"k{i:02d}.resumed.err")
        fresh = None
        if resumed != 0 and not had_last:  # died before its first checkpoint: train again, no --resume
            fresh = _fork([*base[:1], "--out", str(d), *base[1:]], root / f"k{i:02d}.fresh.err")
        out["points"].append(
            {"kind": kind, "n": int(n), "dir": str(d), "killed": killed, "had_last": had_last,
             "resumed": resumed, "fresh": fresh}
        )  # fmt: skip
    (root / "result.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
