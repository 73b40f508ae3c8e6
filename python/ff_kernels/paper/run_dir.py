"""Run directories: one writer at a time, nothing of the user's overwritten, no stale temp files.

A run directory (see :mod:`ff_kernels.paper.train`) is written by one process, the one holding
its lock: :class:`RunLock`, an OS file lock (``fcntl.flock``) on ``.ff-train.lock`` in the
directory, held for the life of the run (in a parallel run by rank 0). The lock file records who
holds it (pid, host, start time, command), which a refused second writer names. The kernel
drops the lock when its process ends, however it ends, so a lock file left by a killed run
does not block the next one; a run that ends normally removes the file.

A fresh run (not ``--resume``) refuses a directory that already holds files unless asked to
``overwrite``, and then deletes only the files a run writes (:data:`RUN_FILES`); anything else
there stays. A refused run leaves the directory as it found it (it creates nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".ff-train.lock"
# What ff-train and the commands that read its runs write into a run directory; --overwrite
# deletes these (and nothing else).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "readout.json",
             "receptive_fields.png", "hybrid_example.png")
# atomic_write's temp files: ".<name>.<pid>.<32 hex digits>.tmp" beside the file they replace.
TEMP_FILE = re.compile(r"^\..+\.\d+\.[0-9a-f]{32}\.tmp$")


class RunDirError(RuntimeError):
    """A run directory that cannot be used: in use, already holding files, or not a folder."""


class RunDirInUse(RunDirError):
    """Another process holds the run directory's lock."""


class RunDirNotEmpty(RunDirError, FileExistsError):
    """A fresh run was pointed at a directory that already holds files."""

    def __str__(self) -> str:  # FileExistsError's would show the errno fields
        return str(self.args[0])


def check_path(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a Path after checking that it can be a folder: not empty, not a file, and
    not below a file. Raises RunDirError naming the offending part."""
    if str(run_dir).strip() == "":
        raise RunDirError("the run directory must name a folder, got '' (use --run-dir DIR, or leave it out for "
                          "runs/RECIPE-TIME)")
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"run directory {path} is below {parent}, which is a file, not a folder")
            break
    return path


def holder(run_dir: str | os.PathLike) -> str | None:
    """Who holds ``run_dir``'s lock ("pid 123 on host x since ..."), or None when no live process
    does. Reads only: creates and changes nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return (f"pid {info['pid']} on host {info['host']} since {info['started']}"
                + (f" ({info['command']})" if info.get("command") else ""))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another process"


def other_files(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` other than the lock file (empty for a folder that does not exist)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


def check_not_in_use(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` (see :func:`check_path`); RunDirInUse when another process holds its lock. Reads only."""
    run_dir = check_path(run_dir)
    owner = None if holds(run_dir) else holder(run_dir)
    if owner is not None:
        raise RunDirInUse(f"run directory {run_dir} is in use by another ff-train run: {owner}")
    return run_dir


def check_fresh(run_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise unless a fresh run may start in ``run_dir``: not locked by another process, and empty
    unless ``overwrite``. Reads only."""
    run_dir = check_not_in_use(run_dir)
    if overwrite:
        return
    names = other_files(run_dir)
    if not names:
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    if "checkpoint.pt" in names:
        raise RunDirNotEmpty(f"{run_dir} already holds a checkpoint ({shown}): pass --resume to continue it, "
                             "--overwrite to start afresh there, or choose another --run-dir")
    raise RunDirNotEmpty(f"{run_dir} already holds files ({shown}): choose another --run-dir, or pass --overwrite "
                         f"to start afresh there (it deletes only the run files {', '.join(RUN_FILES[:4])}, ...)")


def delete_run_files(run_dir: Path) -> list[str]:
    """Delete the files a run writes (:data:`RUN_FILES`) from ``run_dir``; returns their names."""
    deleted = []
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            deleted.append(name)
    return deleted


def remove_stale_temp_files(run_dir: Path) -> list[str]:
    """Delete the temp files of interrupted atomic writes in ``run_dir`` (call it holding the
    lock: then no write is under way); returns their names."""
    removed = []
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if TEMP_FILE.match(path.name) and path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(path.name)
    return sorted(removed)


class RunLock:
    """The exclusive lock of one run directory, for this process (see the module docstring).

    ``acquire`` creates the directory (and missing parents) if needed, takes the lock without
    waiting (a held lock raises :class:`RunDirInUse` naming its holder) and records this
    process in the lock file. ``release`` deletes the lock file and unlocks, then removes the
    directories that ``acquire`` created if they are still empty.
    """

    def __init__(self, run_dir: str | os.PathLike, created: tuple[Path, ...] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None
        self.created: list[Path] = list(created)  # made for this run (deepest first): removed if left empty

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    def acquire(self) -> RunLock:
        run_dir = check_path(self.run_dir)
        missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        self.created = [p for p in missing if p.is_dir()] + self.created  # deepest first
        try:
            self._lock()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _lock(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _describe_holder(fd)
                os.close(fd)
                raise RunDirInUse(f"run directory {self.run_dir} is in use by another ff-train run: {owner}") from None
            except BaseException:
                os.close(fd)
                raise
            # The file may have been deleted (and recreated) by its previous holder between our
            # open and our lock; then we hold a lock on a file nobody else will open: retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        program = "ff-train" if program in ("__main__.py", "ff-train") else program  # python -m ff_kernels
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([program, *sys.argv[1:]])[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # the record is for messages only; the lock is what counts

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for path in self.created:  # deepest first; stops at the first that holds something
            try:
                path.rmdir()
            except OSError:
                break
        self.created = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_held: dict[str, RunLock] = {}


def holds(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds ``run_dir``'s lock (see :func:`hold`)."""
    return os.path.realpath(run_dir) in _held


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike, enabled: bool = True, created: tuple[Path, ...] = ()) -> Iterator[RunLock | None]:
    """Hold ``run_dir``'s lock for the ``with`` block; nested holds of the same directory in
    this process share the outer one. ``enabled`` False does nothing (a parallel run's ranks
    other than 0). ``created``: directories made for this run beforehand (:func:`claim_default`),
    removed at the end if still empty."""
    if not enabled:
        yield None
        return
    key = os.path.realpath(run_dir)
    if key in _held:
        yield _held[key]
        return
    lock = RunLock(run_dir, created).acquire()
    _held[key] = lock
    try:
        yield lock
    finally:
        del _held[key]
        lock.release()


def claim_default(base: str) -> tuple[str, tuple[Path, ...]]:
    """A new, unique run directory ``base`` (e.g. runs/supervised-20261204-120000), or
    ``base-2``, ``base-3``, ... when taken, created here, so that two runs started in the same
    second get two directories. Returns (its name, the directories created, deepest first)."""
    parent = Path(base).parent
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(name)
        except FileExistsError:
            continue
        return name, (Path(name), *missing)
    raise RunDirError(f"no free run directory name {base}-N left")
