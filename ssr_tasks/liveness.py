"""Whether the process that opened an MLflow run still runs (Linux ``/proc``, else ``os.kill(pid, 0)``).

A flow process killed mid-run leaves its MLflow runs RUNNING; the next pipeline ends those
whose process is surely gone (``ssr_tasks.tracking.Tracker.close_orphans``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PROCESS_TAG = "ssr.process"  # "<host>:<pid>:<process start time>" of the process that opened a run


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``); "" where there is
    no ``/proc``; None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def process_tag() -> str:
    """This process, as ``PROCESS_TAG`` records it (host, pid and start time: a reused pid differs)."""
    start = _start_time(os.getpid()) if Path("/proc").is_dir() else ""
    return f"{socket.gethostname()}:{os.getpid()}:{start or ''}"


def process_gone(tag: str) -> bool:
    """Whether the process of a ``PROCESS_TAG`` surely no longer runs: it ran on this host and
    no process with its pid (and start time, where ``/proc`` tells) exists. Runs opened on
    other hosts are never judged."""
    host, _, rest = tag.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if Path("/proc").is_dir():
        now = _start_time(pid)
        return now is None or bool(start and now and now != start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
