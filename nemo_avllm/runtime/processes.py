"""Whether the process that left a lock or a temporary folder behind still runs, so that only
leftovers of dead processes are taken over or removed."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_gone(pid: int, host: str, start: str | None = None) -> bool:
    """True when the process `pid` on `host` surely no longer exists (only checkable on this host)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return start is not None and start_time(pid) not in (None, start)
