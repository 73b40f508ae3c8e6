"""What the commands say when something goes wrong: one line, naming what was expected and what came.

``ff-train`` (and ``ff-readout``) turn every error into one line ``ff-train: error: ...`` and a
non-zero exit status; the traceback is shown only with ``--debug``. :func:`error_line` is that
line: the message itself for the errors a user causes (a bad option, a damaged file, a run
directory in use, a diverged run, ...), a plain description of an OS error (a full disk, a
read-only folder, a path through a file, ...), and for anything else the error's type and
message with a pointer to ``--debug``.
"""

from __future__ import annotations

import errno

import torch

from .data import DataError
from .guard import EXIT_DIVERGED, TrainingDiverged
from .run_dir import RunDirError
from .train import CheckpointError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Errors whose message is written for the user as it is.
USER_ERRORS = (CheckpointError, DataError, RunDirError, TrainingDiverged, ValueError)


def os_error_line(err: OSError) -> str:
    """An OSError in words: what could not be done to which path, and why."""
    path = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:
        path = f"{path} -> {err.filename2}"
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if code == errno.ENOSPC else "the disk quota is used up"
        return (f"cannot write {path}: {what}; free some space and run again (a run that has a checkpoint "
                "continues with --resume)")
    if code == errno.EROFS:
        return f"cannot write {path}: the file system is read-only; choose a --run-dir on a writable one"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot access {path}: permission denied"
    if code == errno.ENOTDIR:
        return f"{path}: a part of this path is a file, not a folder"
    if code == errno.EISDIR:
        return f"{path} is a folder, expected a file"
    if code == errno.ENOENT:
        return f"{path} does not exist"
    return f"{err.strerror or 'OS error'} ({errno.errorcode.get(code, code)}): {path}"


def error_line(err: BaseException) -> str:
    """The one line (no newline) that stands for ``err``."""
    if _out_of_memory(err):
        first = (str(err).strip().splitlines() or [""])[0]
        text = (f"out of memory ({type(err).__name__}: {first[:200]}): use a smaller --width, --depth or "
                "--batch-size (or --train-subset), or a machine with more memory")
    elif isinstance(err, OSError) and err.errno is not None and not isinstance(err, RunDirError):
        text = os_error_line(err)
    elif isinstance(err, USER_ERRORS):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err} (unexpected; run again with --debug for the traceback)"
    return " ".join(text.split())


def _out_of_memory(err: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    oom = getattr(torch, "OutOfMemoryError", ())
    return isinstance(err, (MemoryError, oom)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def exit_status(err: BaseException) -> int:
    return EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_ERROR


def check_device(device: str) -> None:
    """Raise ValueError unless ``device`` names a device this machine has: cpu, cuda or cuda:N."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but no GPU is visible"
        raise ValueError(f"--device {device}: no CUDA device here (torch {torch.__version__} is {build}); use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
