"""Writes that fail on the user's side (disk full, read-only or forbidden directory) become a
DeltatuneError naming the file, the cause and the fix; any other failure keeps its traceback.

A leaf module: the savers (checkpoint, state) and the run-directory lock all use it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from deltatune.errors import DeltatuneError

NO_SPACE, READ_ONLY, FORBIDDEN = (errno.ENOSPC, errno.EDQUOT), (errno.EROFS,), (errno.EACCES, errno.EPERM)
# safetensors' Rust writer reports the OS error in its message only: `IoError(Os { code: 28, ...`.
RUST_CODES = {"StorageFull": errno.ENOSPC, "No space left": errno.ENOSPC, "Read-only": errno.EROFS,
              "PermissionDenied": errno.EACCES, "Permission denied": errno.EACCES}
# torch.save's zip writer turns a failed write into these, without the OS error (a full disk, nearly always).
TORCH_WRITE = ("inline_container", "file write failed", "unexpected pos")


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        return next((code for text, code in RUST_CODES.items() if text in str(exc)), None)
    return None


def _free_mb(path: Path) -> float | None:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free / 2**20
    return None


def write_failure(exc: BaseException, path: Path, what: str) -> DeltatuneError | None:
    """A sentence for a failed write of `what` at `path` whose cause is the disk or its permissions, or None
    (anything else is a bug and keeps its traceback)."""
    path = Path(path)
    code = _errno_of(exc)
    torch_write = isinstance(exc, RuntimeError) and any(t in str(exc) for t in TORCH_WRITE)
    if code not in (*NO_SPACE, *READ_ONLY, *FORBIDDEN) and not torch_write:
        return None
    free = _free_mb(path)
    room = f"{free:,.1f} MB free there now" if free is not None else "free space unknown"
    if code in NO_SPACE:
        cause = f"no space left on the device ({room})"
        fix = "free space on that disk, or set another output directory on a disk with more room"
    elif code in READ_ONLY:
        cause = "the file system is read-only"
        fix = "choose an output directory on a writable disk"
    elif code in FORBIDDEN:
        cause = "permission denied"
        fix = "choose an output directory you can write to, or give yourself write permission on it"
    else:
        first = str(exc).strip().splitlines()[0][:160]
        cause = f"the write failed ({first}); torch does not say why, and a full disk is the usual cause: {room}"
        fix = "free space on that disk, or set another output directory on a disk with more room"
    return DeltatuneError(f"could not write {what}: {path}: {cause}. Nothing half-written was left behind. "
                          f"Fix: {fix} (for a run: output.dir=...).")
