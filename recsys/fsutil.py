"""Writing files so that nothing half-written is ever published, and exclusive locks on outputs.

A reader sees a file either as it was or as it is after the write, never in between
(:func:`atomic_write_text`): the text goes to a temporary file beside the target, is flushed to disk,
then renamed over it. :class:`ExclusiveLock` lets exactly one process write a run directory or a
dataset; a second one gets a :class:`~recsys.errors.RunError` at once instead of interleaving.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from recsys.errors import OutputError, RunError

# errno values that mean "this output cannot be written here", reported as one line
_OUTPUT_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded",
                  errno.EPERM: "operation not permitted"}


def output_error(e: OSError, where: str | Path | None = None) -> OutputError | None:
    """The one-line :class:`OutputError` for an OSError that means the output cannot be written
    (None for any other OSError)."""
    reason = _OUTPUT_ERRNOS.get(e.errno or -1)
    if reason is None:
        return None
    return OutputError(str(e.filename or where or "output"), f"cannot write: {reason}")


@contextlib.contextmanager
def writing(where: str | Path) -> Iterator[None]:
    """Turn "cannot write" OSErrors raised inside into :class:`OutputError` naming ``where``."""
    try:
        yield
    except OSError as e:
        err = output_error(e, where)
        if err is None:
            raise
        raise err from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (readers never see a
    partial file; on failure the old file stays and the temporary one is removed). A target that
    exists and is not a regular file (``/dev/stdout``, a FIFO) is written in place: renaming over
    it would replace the device. Errors name ``path``, never the temporary file."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            with path.open("wb") as f:
                f.write(data)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        err = output_error(e, path)
        if err is None:
            raise
        raise OutputError(str(path), err.message) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8.

    Example:
        >>> atomic_write_text("runs/qs/metrics.json", json.dumps(metrics))
    """
    atomic_write_bytes(path, text.encode("utf-8"))


class ExclusiveLock:
    """An advisory, exclusive, non-blocking lock on ``path`` (a lock file, created if needed).

    The lock is released when the holder exits the ``with`` block or its process dies (kill -9
    included: the kernel drops ``flock`` locks with the file descriptor), so a crashed run never
    leaves a stale lock behind.

    Example:
        >>> with ExclusiveLock(Path("runs/qs/.lock"), "run directory runs/qs"):
        ...     train()
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> ExclusiveLock:
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunError(str(self.path.parent), f"{self.what} is in use by another process"
                           f"{f' (pid {holder})' if holder else ''}; wait for it to finish or use "
                           "another path") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ExclusiveLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def sibling_lock(path: str | Path, what: str) -> ExclusiveLock:
    """The lock of a directory that is replaced as a whole (a dataset): a hidden file beside it,
    ``.NAME.lock``, that outlives the directory's replacement."""
    path = Path(path)
    return ExclusiveLock(path.parent / f".{path.name}.lock", what)


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return os.pread(fd, 32, 0).decode().strip()
    return ""


def staging_dir(target: str | Path) -> Path:
    """A new, uniquely named folder beside ``target`` to build it in before publishing it by a
    rename, with the permissions a plain ``mkdir`` would give (mkdtemp's are owner-only)."""
    target = Path(target)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o777 & ~mask)
    return path
