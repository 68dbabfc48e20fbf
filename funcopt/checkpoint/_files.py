"""File hygiene for checkpoints: temporary names, removing stale temporaries, one writer per directory.

A save writes ``.<name>.funcopt-tmp-<pid>-<host>-<random>`` next to its target and renames it
into place. A process killed mid-save leaves that file behind; :func:`remove_stale_temporaries`
(run by every save into the directory and by ``CheckpointManager``) deletes only funcopt's own
temporaries, and only stale ones: written on this host by a process that no longer exists, or
untouched for :data:`STALE_AFTER_S` seconds (a writer on another host sharing the directory).
Temporaries of 0.1.0/0.2.0 (``.<name>.safetensors.tmp-<pid>-<random>``) are removed when their
process is gone.

:class:`DirectoryLock` is the lock a ``CheckpointManager`` takes before its first save: an
advisory ``flock`` on ``.<prefix>.lock`` holding the owner's pid and host, so the kernel releases
it when the owner dies (a stale lock file is simply taken over) and a second live writer is
refused with the owner's pid. Inside one process a newer manager takes the lock over from an
older one, which may then no longer save.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import stat
import time
import weakref
import zlib
from typing import Any

from funcopt.checkpoint._format import CheckpointError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["temp_name", "remove_stale_temporaries", "drop_cached_pages", "DirectoryLock", "STALE_AFTER_S"]

STALE_AFTER_S = 3600.0
"""A temporary file not modified for this long is stale whatever its owner (a save writes continuously)."""

_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMP = re.compile(r"^\.(?P<target>.+)\.funcopt-tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}$")
_LEGACY_TEMP = re.compile(r"^\.(?P<target>.+\.safetensors)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def temp_name(path: str) -> str:
    """The temporary file ``save`` writes before renaming it to ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.funcopt-tmp-{os.getpid()}-{_HOST}-{secrets.token_hex(4)}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a pid we may not signal counts as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _stale(name: str, mtime: float, now: float) -> bool:
    m = _TEMP.match(name)
    if m is not None:
        pid, host = int(m.group("pid")), m.group("host")
    else:
        m = _LEGACY_TEMP.match(name)
        if m is None:
            return False
        pid, host = int(m.group("pid")), _HOST
    if now - mtime > STALE_AFTER_S:
        return True
    return host == _HOST and pid != os.getpid() and not pid_alive(pid)


def drop_cached_pages(path: str) -> None:
    """Asks the kernel to drop the page cache of a file about to be replaced (a hint; errors ignored).

    Writing a new file needs as many fresh cache pages as it has bytes; the replaced file's pages
    are released only at the rename, after the write, so on a machine short of free memory the
    write would wait for reclaim. Dropping them first lets the write reuse them. Pages mapped by
    a live process (a loaded checkpoint's tensors) are not dropped.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str) -> list[str]:
    """Deletes funcopt's stale temporary files in ``directory``; returns their paths."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or ".funcopt-tmp-" not in entry.name and ".tmp-" not in entry.name:
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or not _stale(entry.name, entry.stat().st_mtime, now):
                continue
            os.remove(entry.path)
            removed.append(entry.path)
        except OSError:  # gone already, or not ours to remove
            continue
    return removed


_HOLDERS: dict[str, Any] = {}
"""Lock file path -> weak reference to the DirectoryLock of this process that holds it."""


class DirectoryLock:
    """An exclusive, advisory writer lock on ``path``; released on :meth:`release` or when the process dies.

    Within one process a newer lock on the same file takes it over from an older one (a run
    restarted in the same interpreter, a notebook cell run again); the older one is then refused.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._key = os.path.realpath(path)
        self._fd: int | None = None
        self._superseded = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _owner(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read(200).split()
        except OSError:
            text = []
        if len(text) >= 2:
            here = " (this host)" if text[1] == socket.gethostname() else ""
            return f"process {text[0]} on host {text[1]}{here}"
        return "another process"

    def _record_owner(self) -> None:
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode(), 0)
        except OSError:
            pass  # the lock is held; the owner line is only informative

    def acquire(self, what: str) -> None:
        """Takes the lock or raises :class:`CheckpointError` naming its owner."""
        if self._superseded:
            raise CheckpointError(
                f"{what}: a newer CheckpointManager on the same directory and prefix in this process took over "
                f"the writer lock {self.path}; this one may no longer save (two writers would delete each "
                "other's checkpoints). Save through the newer manager.", self.path)
        if self._fd is not None or fcntl is None:
            return
        ref = _HOLDERS.get(self._key)
        other = ref() if ref is not None else None
        if other is not None and other is not self and other._fd is not None:
            self._fd, other._fd, other._superseded = other._fd, None, True
            _HOLDERS[self._key] = weakref.ref(self)
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot create the writer lock {self.path}: {e.strerror or e}.", self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CheckpointError(
                f"{what}: another writer, {self._owner()}, holds {self.path}. Two writers on one directory "
                "would delete each other's checkpoints. Stop the other writer, or use another directory or "
                "prefix; reading (restore, latest_step, all_steps) works without the lock.", self.path) from None
        self._fd = fd
        self._record_owner()
        _HOLDERS[self._key] = weakref.ref(self)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                ref = _HOLDERS.get(self._key)
                if ref is not None and ref() is self:
                    del _HOLDERS[self._key]
                os.close(fd)  # closing drops the flock
            except Exception:  # noqa: BLE001 - also runs from __del__ at interpreter exit
                pass

    def __del__(self) -> None:
        self.release()

    def __repr__(self) -> Any:
        return f"DirectoryLock({self.path!r}, held={self.held})"
