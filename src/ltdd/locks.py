"""Exclusive claims between processes through lock files (expert stores, benchmark cells).

A lock file is created with ``O_CREAT | O_EXCL`` and names its owner as ``host:pid``. A lock whose owner is a process
on this host that no longer exists (a killed run or rank) is stale and may be taken over, so a restart redoes exactly
the work that was in flight. Locks of other hosts (a shared file system) are presumed alive for 24 hours.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

__all__ = ["try_lock", "lock_is_stale", "unlock"]


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def try_lock(path: str | Path) -> bool:
    """Create the lock file ``path`` exclusively; True if this process now holds it.

    A stale lock (see the module docstring) is removed and the claim retried; a live one gives False.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not lock_is_stale(path):
                return False
            path.unlink(missing_ok=True)
            continue
        try:
            os.write(fd, _owner().encode())
        finally:
            os.close(fd)
        return True
    return False


def unlock(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)


def lock_is_stale(path: str | Path) -> bool:
    """Whether the lock at ``path`` is gone or held by a process that no longer exists."""
    path = Path(path)
    try:
        owner = path.read_text().strip()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    host, _, pid = owner.rpartition(":")
    if not pid.isdigit():  # being written right now (empty) or foreign: judge by age
        return age > 60 if host == "" else age > 24 * 3600
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return age > 24 * 3600
