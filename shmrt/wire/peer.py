"""Who the peer process is: a client names its pid in Hello so the daemon can notice its death early
(only where both share a pid namespace), and `shmrt cleanup` finds rings whose owner is gone."""
from __future__ import annotations

import os


def pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def client_info() -> dict:
    """What a client says about itself in Hello (lets the daemon notice its death early)."""
    return {"pid": os.getpid(), "pidns": pid_namespace()}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
