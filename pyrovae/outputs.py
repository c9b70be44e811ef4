"""Everything pyrovae writes: atomic files, output directories it recognises, locks, staged directories.

Rules (the reliability contract of the README):

- every file is written through :func:`atomic_write` (a temporary file in the same folder, then a rename),
  with the permissions the user's umask gives (not mkstemp's 0600); temporary files of a killed process are
  removed by the next write of the same file;
- every output *directory* pyrovae creates carries a marker file (``.pyrovae``) naming its kind (``run``,
  ``demo``, ``ate``); :func:`clear_output_dir` removes a directory only when it is one pyrovae recognises
  and every entry in it is something pyrovae writes there, so ``--overwrite`` never deletes user files;
- :func:`dir_lock` holds an exclusive ``flock`` on a directory while a process writes it (a second writer
  fails at once with the holder's pid and command; the kernel releases the lock when the holder dies);
- :func:`staged_dir` builds a multi-file output in a hidden sibling and swaps it into place, so a kill
  leaves either the old complete output or the new complete one.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import fnmatch
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

MARKER = ".pyrovae"
LOCK = ".pyrovae.lock"
#: what pyrovae writes into each kind of output directory (fnmatch patterns; directories must be marked)
KIND_PATTERNS: dict[str, tuple[str, ...]] = {
    "run": (
        "config.json",
        "schema.json",
        "split.csv",
        "prep.json",
        "best.pt",
        "last.pt",
        "metrics.csv",
        "iwelbo_*.csv",
        "iwelbo_*_summary.json",
        "enrichment_*.csv",  # pyrovae enrich
        "enrichment_*_summary.json",
        "grn_reference_*.csv",  # pyrovae grn --reference
        "grn_reference_*_summary.json",
        "fingerprint.json",  # the training data's identity and the run id (pyrovae.runs.run)
        "adata.h5ad",  # pyrovae.Model.save(save_anndata=True)
    ),
    "ate": ("ate_*.csv", "ate_*.md", "ate_summary.json", "ate_scatter.png"),
    "demo": (
        "data.h5ad",
        "comparison.csv",
        "comparison.md",
        "summary.json",
        "ate_metrics_*.csv",
        "ate_per_perturbation_*.csv",
        "iwelbo_cells.csv",
        "*.png",
        # pyrovae demo --model gpo
        "comparison_gpo.md",
        "grn_recovery.csv",
        "grn_scores.csv",
        "unseen_ate.csv",
        # pyrovae demo --dataset NAME
        "ate_metrics.csv",
        "ate_per_perturbation.csv",
    ),
}
#: files of pyrovae's own bookkeeping, allowed in every kind (and its temporaries: :func:`is_temporary`)
_COMMON = (MARKER, LOCK)
#: files a directory of each kind owns: no output of another command may be written onto them
OWNED: dict[str, tuple[str, ...]] = {
    "run": (
        "config.json",
        "schema.json",
        "split.csv",
        "prep.json",
        "fingerprint.json",
        "best.pt",
        "last.pt",
        "metrics.csv",
        "adata.h5ad",
    ),
}


# -------------------------------------------------------------------------------------------- files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: exactly the names pyrovae makes: ``.<stem>.<pid>.<8 random>.tmp<suffix>`` (:func:`atomic_write_all`),
#: ``.<name>.<pid>.staging-<8 random>`` and ``.<name>.<pid>.old-<seconds>`` (:func:`staged_dir`); the random
#: parts are :mod:`tempfile`'s (8 of ``a-z0-9_``). A user's ``.notes.tmp.txt`` or ``.backup.old-2020`` is
#: not one of them, so it is never cleaned up nor taken for pyrovae's.
_TEMPORARY = re.compile(
    r"^\.(?P<stem>.+)\.(?P<pid>\d+)\."
    r"(?:[a-z0-9_]{8}\.tmp(?:\.[^.]+)?|staging-[a-z0-9_]{8}|old-\d+)$"
)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of pyrovae's temporary files or staging folders (its exact naming rule)."""
    return _TEMPORARY.match(name) is not None


def remove_stale_temporaries(folder: Path, stem: str | None = None) -> list[Path]:
    """Remove the temporary files / staging folders that a killed pyrovae process left in ``folder`` (for
    one target ``stem``, or all); those of a live process are kept."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMPORARY.match(p.name)
        if m is None or (stem is not None and m["stem"] != stem) or _pid_alive(int(m["pid"])):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Write via ``write(tmp_path)`` into a temporary file next to ``path``, then rename it into place.

    The file gets the permissions of a plain ``open`` under the current umask. Temporary files that a killed
    process left for the same ``path`` are removed first.
    """
    atomic_write_all({Path(path): write})


def atomic_write_all(writers: dict[Path, Callable[[str], Any]]) -> None:
    """Write several files: every temporary file first, then the renames in order (put the summary last,
    so a kill leaves either the old set, or a new table without its summary, which marks it incomplete)."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in writers.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent, path.stem)
            fd, tmp = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.stem}.{os.getpid()}.", suffix=f".tmp{path.suffix}"
            )
            os.close(fd)
            staged.append((tmp, path))
            try:
                write(tmp)
            except RuntimeError as err:  # torch's and HDF5's writers report a full disk as RuntimeError
                first = (str(err).strip().splitlines() or ["write failed"])[0][:120]
                raise OSError(
                    f"cannot write {path} ({first}): is the disk full or a file-size limit reached? "
                    f"nothing was replaced (the previous {path.name}, if any, is intact)"
                ) from None
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def json_writer(obj: Any) -> Callable[[str], None]:
    """A writer for :func:`atomic_write` / :func:`atomic_write_all` dumping ``obj`` as indented JSON."""

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default)

    return w


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, json_writer(obj))


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file, or one clear error naming ``what`` it should be when it is unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} ({what}) is corrupt or truncated ({err.__class__.__name__}); restore it or retrain"
        ) from None


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (one dict per row; the columns in order of first appearance) as CSV, atomically."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def w(tmp):
        with open(tmp, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(rows)

    atomic_write(path, w)


def _number(v: str | None) -> float | int:
    if v in ("", None):
        return float("nan")
    try:
        return int(v)
    except ValueError:
        return float(v)


def read_csv(path: str | Path) -> list[dict[str, float | int]]:
    """Rows of a numeric CSV; integers stay ``int`` (epoch, step), everything else is ``float``."""
    with open(path) as f:
        return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


# -------------------------------------------------------------------------------- output directories


def output_kind(path: Path) -> str | None:
    """The kind of a directory pyrovae wrote (its marker; runs of older versions by their files).

    A directory without the marker is a run only if it holds a whole run of an older pyrovae (config,
    schema and a checkpoint): a user's folder that merely holds a ``config.json`` and a ``schema.json`` is
    not taken for one."""
    marker = path / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text()).get("kind"))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
    if (
        (path / "config.json").is_file()
        and (path / "schema.json").is_file()
        and ((path / "best.pt").is_file() or (path / "last.pt").is_file())
    ):
        return "run"
    if path.name.startswith("ate_") and (path / "ate_summary.json").is_file():
        return "ate"
    return None


def check_not_owned(path: str | Path, what: str = "--out") -> None:
    """Refuse an output path that names a file a pyrovae directory owns (a run's ``split.csv``,
    ``config.json``, checkpoints, ...; any directory's marker or lock), with or without ``--overwrite``:
    writing there would destroy the run."""
    path = Path(path).resolve()
    kind = output_kind(path.parent) if path.parent.is_dir() else None
    if path.name in (MARKER, LOCK) or (kind in OWNED and path.name in OWNED[kind]):
        owner = f"the pyrovae {kind} in {path.parent}" if kind else "pyrovae's bookkeeping"
        raise ValueError(
            f"{what} {path} is a file of {owner}: writing it would destroy that {kind or 'directory'} "
            "(--overwrite does not allow it); choose another path"
        )


def mark_output_dir(path: str | Path, kind: str) -> Path:
    """Create ``path`` (if needed) and mark it as a pyrovae output directory of ``kind``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if output_kind(path) != kind or not (path / MARKER).exists():
        write_json(path / MARKER, {"kind": kind, "written_by": "pyrovae"})
    return path


def _foreign_entries(path: Path, kind: str) -> list[Path]:
    """Entries of ``path`` that pyrovae does not write into a directory of ``kind`` (recursively)."""
    patterns = KIND_PATTERNS[kind] + _COMMON
    foreign: list[Path] = []
    for p in sorted(path.iterdir()):
        if p.is_dir() and not p.is_symlink() and not is_temporary(p.name):
            sub = output_kind(p)
            if sub is None or sub not in KIND_PATTERNS:
                foreign.append(p)
            else:
                foreign += _foreign_entries(p, sub)
        elif p.is_symlink() or not (
            is_temporary(p.name) or any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
        ):
            foreign.append(p)
    return foreign


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def check_replaceable(
    path: Path, kind: str, protect: Iterable[str | Path] = (), flag: str = "--overwrite"
) -> None:
    """Raise unless the existing ``path`` may be deleted: an empty directory, or a pyrovae directory of
    ``kind`` holding only what pyrovae writes there and none of the ``protect``-ed paths."""
    if not path.is_dir():
        raise FileExistsError(
            f"{path} exists and is a file, not a pyrovae output directory; choose another one"
        )
    if not any(path.iterdir()):
        return
    for p in protect:
        if p is not None and Path(p).exists() and _inside(Path(p), path):
            raise ValueError(
                f"{p} lies inside {path}: replacing {path} would delete it; choose another output directory"
            )
    found = output_kind(path)
    if found != kind:
        what = f"a pyrovae {found} directory" if found else "not a directory pyrovae wrote"
        raise FileExistsError(
            f"{path} is {what}; {flag} only replaces a pyrovae {kind} directory, so nothing was deleted: "
            "choose an empty or new directory"
        )
    foreign = _foreign_entries(path, kind)
    if foreign:
        shown = ", ".join(str(p.relative_to(path)) for p in foreign[:5])
        raise FileExistsError(
            f"{path} holds files pyrovae did not write ({shown}{', ...' if len(foreign) > 5 else ''}); "
            "move them away or choose another output directory (nothing was deleted)"
        )


def clear_output_dir(
    path: str | Path, kind: str, protect: Iterable[str | Path] = (), flag: str = "--overwrite"
) -> None:
    """Delete a directory of ``kind`` that pyrovae wrote (see :func:`check_replaceable`)."""
    path = Path(path)
    if path.exists():
        check_replaceable(path, kind, protect, flag)
        shutil.rmtree(path)


def fresh_output_dir(path: str | Path, kind: str, overwrite: bool) -> Path:
    """An empty (or new) output directory of ``kind``, marked as pyrovae's.

    A non-empty ``path`` is refused unless ``overwrite``, and then replaced only if pyrovae wrote it as a
    ``kind`` directory holding nothing else (:func:`clear_output_dir`).
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise FileExistsError(
                f"{path} already exists and is not empty; choose another --out or pass --overwrite"
            )
        clear_output_dir(path, kind)
    return mark_output_dir(path, kind)


@contextlib.contextmanager
def staged_dir(
    final: str | Path, kind: str, overwrite: bool, protect: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Write a multi-file output into a hidden staging folder, then swap it in for ``final``.

    Refuses an existing ``final`` unless ``overwrite`` (and then only one pyrovae wrote). A killed process
    leaves the old output intact; its staging folder is removed by the next call.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    if final.exists():  # checked before the work, so a refusal costs nothing
        if final.is_dir() and any(final.iterdir()) and not overwrite:
            raise FileExistsError(f"{final} already holds results; pass --overwrite to replace them")
        check_replaceable(final, kind, protect)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}.staging-"))
    try:
        os.chmod(stage, 0o777 & ~_umask())
        mark_output_dir(stage, kind)
        yield stage
        old = None
        if final.exists():
            check_replaceable(final, kind, protect)
            old = final.parent / f".{final.name}.{os.getpid()}.old-{int(time.time())}"
            os.replace(final, old)
        os.replace(stage, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- lock


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text() or "{}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} ({info.get('command')})"


@contextlib.contextmanager
def dir_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock on directory ``path`` for this process; fails at once if another holds it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / LOCK
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise FileExistsError(
                f"{path} is being written by {_holder(lock_path)}; wait for it to finish, or stop it "
                "(its checkpoints stay intact), or choose another output directory"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:300],
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the flock
