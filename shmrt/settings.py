"""Settings read from the environment (the only module that reads os.environ for shmrt)."""
from __future__ import annotations

import math
import os
import pathlib

from .errors import SetupError


def _positive(name: str, default: str, what: str) -> float:
    """The environment variable `name` as a finite positive number (else its `default`); SetupError naming it."""
    text = os.environ.get(name, "") or default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SetupError(f"{name}={text!r}: expected a positive number of {what}")
    return value


def default_timeout() -> float:
    """Seconds to wait for a peer before giving up (SHMRT_TIMEOUT, default 60)."""
    return _positive("SHMRT_TIMEOUT", "60", "seconds")


def runtime_dir() -> pathlib.Path:
    """A directory only this user can enter, for ipc:// sockets (SHMRT_RUNTIME_DIR)."""
    base = os.environ.get("SHMRT_RUNTIME_DIR") or os.environ.get("XDG_RUNTIME_DIR")
    path = pathlib.Path(base) / "shmrt" if base else pathlib.Path(f"/tmp/shmrt-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user; set SHMRT_RUNTIME_DIR to a private directory")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def cache_dir() -> pathlib.Path:
    """Where shmrt keeps what it computed once, e.g. checkpoint digests (SHMRT_CACHE_DIR, else
    XDG_CACHE_HOME/shmrt or ~/.cache/shmrt)."""
    base = os.environ.get("SHMRT_CACHE_DIR")
    path = pathlib.Path(base) if base else pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "shmrt"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def default_endpoint() -> str:
    return os.environ.get("SHMRT_ENDPOINT") or f"ipc://{runtime_dir() / 'daemon.sock'}"


def max_reply_bytes() -> int:
    """The largest reply a msgpack session may ask the daemon for (SHMRT_MAX_REPLY_MIB, default 2048).
    An shm reply is bounded by the client's response ring instead."""
    return int(_positive("SHMRT_MAX_REPLY_MIB", "2048", "MiB") * 2**20)


def backoff_us() -> tuple[float, ...] | None:
    """SHMRT_BACKOFF=SPIN,YIELD,SLEEP_MIN,SLEEP_MAX (microseconds): how a doorbell waiter spends its time
    (native.Backoff; unset: its defaults). For measuring the policy on a given host."""
    text = os.environ.get("SHMRT_BACKOFF", "")
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise SetupError(f"SHMRT_BACKOFF={text!r}: expected four non-negative microsecond values SPIN,YIELD,SLEEP_MIN,SLEEP_MAX")
    return values


def cuda_graphs() -> bool:
    """SHMRT_CUDA_GRAPHS=0: a CUDA daemon runs decode-step BatchLinear calls eagerly instead of as CUDA graphs
    (host/graphs.py); for comparison runs."""
    return os.environ.get("SHMRT_CUDA_GRAPHS", "1") not in ("", "0")


def cpu_plans() -> bool:
    """SHMRT_CPU_PLANS=0: a CPU daemon runs every call through the handler, instead of remembering decode calls as
    plans as a CUDA daemon does with its graphs (their bodies run again on the CPU: host/graphs.py's RerunCapture)
    and serving them through the planned lane (host/lane.py); for comparison runs."""
    return os.environ.get("SHMRT_CPU_PLANS", "1") not in ("", "0")


def planned_lane() -> bool:
    """SHMRT_PLANNED_LANE=0: a daemon serves its planned decode calls from Python instead of in C (host/lane.py);
    for comparison runs."""
    return os.environ.get("SHMRT_PLANNED_LANE", "1") not in ("", "0")


def calls_in_c() -> bool:
    """SHMRT_CALLS_IN_C=0: a shm client makes every call from Python (its copies, post, wait and take each a C call
    of their own) instead of in one C call (wire/shm_transport.py's ShmClient.call); for comparison runs."""
    return os.environ.get("SHMRT_CALLS_IN_C", "1") not in ("", "0")


def poison() -> bool:
    """SHMRT_POISON=1: released ring space is overwritten with 0xFF before it is handed back (tests:
    a view kept past its scope then reads NaN instead of plausible stale numbers)."""
    return os.environ.get("SHMRT_POISON", "") not in ("", "0")


def enclave_forced() -> bool:
    """SHMRT_ENCLAVE=1 forces in-enclave rules even outside SGX."""
    return os.environ.get("SHMRT_ENCLAVE", "") not in ("", "0")


def apply_process_defaults() -> None:
    """Before torch loads: OpenMP workers sleep instead of spinning between ops. Daemon and client
    take turns on the same cores; spinning workers of the idle side starve the busy one (measured:
    2.4x slower prefill, 1.7x slower decode on 2 cores). A user's own setting wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
