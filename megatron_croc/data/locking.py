"""One run per output: advisory file locks that name their holder and survive a killed holder.

``tools/preprocess_data.py`` writes partitions, temporary files and the merged dataset under an
output prefix; two runs doing that at once destroy each other's work. A run therefore takes
``PREFIX.lock``: exclusively for a whole run, shared for a ``--partition-index`` run (several
nodes fill disjoint partitions of one output at once; each of them also takes its partitions'
own lock files exclusively).

Why ``fcntl.flock`` by hand rather than the ``filelock`` package: we need the holder's identity
*in* the lock file, written after acquiring and read by whoever is refused. ``filelock`` opens
its lock file with ``O_TRUNC`` (wiping the holder's note before it knows whether it got the
lock) and has no shared mode. ``flock`` locks belong to the open file, so the kernel releases
them on any exit of the holder, ``SIGKILL`` included: a lock file left behind by a killed run
is not held by anyone, and the next run takes it over (and says so, from the note inside).

On release the holder deletes the lock file while still holding it; an acquirer that opened the
old file checks afterwards that the path still names the file it locked, and retries otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any


class LockHeldError(RuntimeError):
    """Another live run holds the lock; the message names it."""


def describe_holder(info: dict[str, Any] | None) -> str:
    if not info:
        return "a process that left no note (an older version, or it is just starting)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    text = f"pid {info.get('pid')} on host {info.get('host')} (started {started})"
    if info.get("command"):
        text += f": {info['command']}"
    return text


def _holder_note() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(sys.argv)[:500]}


def _read_note(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


def read_lock_note(path: str) -> dict[str, Any] | None:
    """The holder note in a lock file (None if there is none or no file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_note(fd)
    finally:
        os.close(fd)


class RunLock:
    """An exclusive (or shared) advisory lock on ``path``, taken without waiting.

    ``acquire()`` raises :class:`LockHeldError` naming the holder when another run has it, and
    returns the note of a dead holder it took over (None otherwise). Usable as a context
    manager; the lock is released on any exit of the process.
    """

    def __init__(self, path: str | os.PathLike[str], *, shared: bool = False, what: str = "") -> None:
        self.path = os.fspath(path)
        self.shared = shared
        self.what = what or self.path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock now or raise :class:`LockHeldError`; returns a dead holder's note."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this object")
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                note = _read_note(fd)
                os.close(fd)
                raise LockHeldError(f"{self.what} is in use by another run: {describe_holder(note)}") from None
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise LockHeldError(
                        f"{self.what}: the file system of {self.path!r} does not support file locks ({err}); "
                        "write the output to a file system that does (e.g. mount Lustre with -o flock)"
                    ) from None
                raise
            try:
                st, now = os.fstat(fd), os.stat(self.path)
                same = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
        # Only exclusive holders leave a note, and none holds the lock now: a note is a dead one's.
        stale = _read_note(fd)
        if stale or not self.shared:
            os.ftruncate(fd, 0)
        if not self.shared:
            os.pwrite(fd, json.dumps(_holder_note()).encode(), 0)
        self._fd = fd
        return stale

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if not self.shared:
                os.ftruncate(fd, 0)
                try:
                    os.unlink(self.path)  # while still holding it: see the module docstring
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)  # releases the lock

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
