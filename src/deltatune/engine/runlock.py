"""One writer per directory, and replacing a run without losing it first.

`hold(dir, command)` takes an exclusive `flock` on `<dir>/.deltatune.lock` (created with the directory
when needed) for the whole command; a second writer is refused at once with the holder's pid and
command. The lock file records who holds it; a file left by a killed process is taken over (its
flock died with the process). The file is removed on release: its name, not just its inode, is the
lock, so an acquirer checks after locking that the name still points at the file it locked.

`Lock.replace()` moves a run aside as `.<name>.replaced-<pid>` (one rename on the same filesystem)
and starts an empty directory under the name. `artifact_saved` removes the old run once the new one
has saved its first model or checkpoint; `rollback` renames it back when the new run fails before
that. After a kill, `settle` (run by the next `train` of the directory, or a command that loads the run)
does what the dead process could not: it puts the old run back while the new one has saved
nothing, and finishes the removal once it has.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deltatune.engine import disk
from deltatune.errors import DeltatuneError

LOCK = ".deltatune.lock"
# Runs being replaced by this process: run dir (resolved) -> the old run moved aside.
_pending: dict[Path, Path] = {}


def _say(msg: str) -> None:
    from deltatune.engine.report import console

    console.print(msg, highlight=False, soft_wrap=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder(path: Path) -> dict:
    """What the lock file says about its holder ({} when unreadable or empty)."""
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["time"])) if "time" in info else "?"
    return f"pid {info.get('pid', '?')}: `{info.get('command', '?')}`, since {since}"


class Lock:
    def __init__(self, directory: Path, fd: int, created: bool):
        self.dir, self.fd, self.created = directory, fd, created
        self.discard = False  # remove the directory on release (a failed command leaves no new directory)

    @property
    def path(self) -> Path:
        return self.dir / LOCK

    def release(self) -> None:
        """Unlink first, then unlock: whoever locked the old inode in between sees the name moved on."""
        if self.discard:
            shutil.rmtree(self.dir, ignore_errors=True)
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)

    @property
    def replacing(self) -> bool:
        """A run moved aside by `replace` still waits for the new run's first save."""
        return self.dir.resolve() in _pending

    def replace(self, why: str) -> Path:
        """Move the run in this directory aside (lock file included) and continue in an empty one."""
        aside = self.dir.with_name(f".{self.dir.name}.replaced-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(self.dir, aside)
        self.dir.mkdir()
        os.rename(aside / LOCK, self.path)  # the locked file itself: the lock is never let go
        _pending[self.dir.resolve()] = aside
        _say(f"{why}: the previous run is kept as {aside} until this run saves its first model or checkpoint")
        return aside

    def rollback(self) -> None:
        """The new run failed before saving anything: its files go and the previous run comes back."""
        aside = _pending.pop(self.dir.resolve(), None)
        if aside is not None and aside.is_dir():
            _put_back(self.dir, aside)
            _say(f"the new run saved nothing; the previous run is back in {self.dir}")


def artifact_saved(run_dir: Path) -> None:
    """The new run has a complete model or checkpoint on disk: the run it replaces can go."""
    if not _pending:
        return
    aside = _pending.pop(Path(run_dir).resolve(), None)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _put_back(run_dir: Path, aside: Path) -> None:
    for p in run_dir.iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if (run_dir / LOCK).exists():
        os.replace(run_dir / LOCK, aside / LOCK)  # an open (locked) file keeps its lock across renames
    run_dir.rmdir()
    os.rename(aside, run_dir)


def settle(run_dir: Path, saved: Callable[[Path], bool]) -> None:
    """Finish what a killed replacement left (call with the directory's lock held, or with nobody holding it).
    `saved(run_dir)`: whether the replacing run got as far as a complete model or checkpoint."""
    run_dir = Path(run_dir)
    mine = f".{run_dir.name}.replaced-{os.getpid()}"
    for aside in sorted(run_dir.parent.glob(f".{run_dir.name}.replaced-*")):
        if aside.name == mine or not aside.is_dir():
            continue
        if run_dir.is_dir() and saved(run_dir):
            shutil.rmtree(aside, ignore_errors=True)
            _say(f"removed {aside}: the run that replaced it in {run_dir} had saved its first model or checkpoint "
                 f"before it was killed")
        else:
            if not run_dir.exists():
                run_dir.mkdir()
            _put_back(run_dir, aside)
            _say(f"put the previous run back into {run_dir} from {aside}: the run that was replacing it was killed "
                 f"before it saved anything")


def settle_unlocked(run_dir: Path, saved: Callable[[Path], bool]) -> None:
    """For commands that only read a run: settle a killed replacement if nobody holds the directory now."""
    run_dir = Path(run_dir)
    if not any(run_dir.parent.glob(f".{run_dir.name}.replaced-*")):
        return
    try:
        lock = acquire(run_dir, "settle a replaced run")
    except DeltatuneError:  # a replacement is running now (or the directory cannot be written): leave it
        return
    try:
        settle(run_dir, saved)
    finally:
        lock.release()


def _write_error(directory: Path, e: OSError) -> DeltatuneError:
    return disk.write_failure(e, directory / LOCK, "the lock file of the output directory") or DeltatuneError(
        f"{directory}: cannot create the lock file: {e}")


def acquire(directory: str | Path, command: str | None = None) -> Lock:
    """Lock `directory` (created, with its parents, when missing) or refuse at once, naming the holder."""
    directory = Path(directory)
    created = not directory.exists()
    if directory.exists() and not directory.is_dir():
        raise DeltatuneError(f"{directory} is a file, not a directory. Fix: choose another output directory.")
    for _ in range(20):  # retried only while holders keep releasing (and unlinking) under us
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if created:  # a directory made here goes again (as far as it was made)
                shutil.rmtree(directory, ignore_errors=True)
            raise _write_error(directory, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = holder(directory / LOCK)
            raise DeltatuneError(f"{directory} is in use by another deltatune process ({describe(info)}); two "
                                 f"writers would mix their files. Fix: wait for it to finish, stop it "
                                 f"(kill {info.get('pid', 'PID')}), or choose another directory.") from None
        try:
            same = os.stat(directory / LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (and removed) it between our open and our lock
            os.close(fd)
            continue
        left = holder(directory / LOCK)
        if left.get("pid") and left.get("pid") != os.getpid() and not _alive(left["pid"]):
            _say(f"taking over the lock left by pid {left['pid']} (`{left.get('command', '?')}`), which is no "
                 f"longer running")
        me = {"pid": os.getpid(), "command": command or " ".join(["deltatune", *sys.argv[1:]]), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return Lock(directory, fd, created)
    raise DeltatuneError(f"{directory}: could not take its lock (it kept changing hands). Fix: try again.")


@contextmanager
def hold(directory: str | Path, command: str | None = None) -> Iterator[Lock]:
    lock = acquire(directory, command)
    try:
        yield lock
    finally:
        lock.release()
