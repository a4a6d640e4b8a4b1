"""`shmrt daemon` as a child process (for `shmrt run`, the bench and the tests)."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from .. import settings
from ..errors import ShmrtError


PARENT_ENV = "SHMRT_DAEMON_PARENT"   # set for a daemon DaemonProcess starts: the pid it stops with
PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """In a daemon that DaemonProcess started from a main thread: get SIGTERM when that process dies, however it dies
    (a `shmrt run` killed with SIGKILL cannot stop its daemon itself, which would go on holding the model and the
    device). The daemon's SIGTERM handler stops it as `stop()` would; before that handler is in place, SIGTERM ends
    it at once."""
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent or not parent.isdigit():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return   # (not Linux): the parent's stop() is all there is
    if os.getppid() != int(parent):   # it died before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


class DaemonProcess:
    """`shmrt daemon` as a child process: waits until it listens; always stops it on exit."""

    def __init__(self, daemon_args: list[str], endpoint: str, *, timeout: float = 600.0, quiet: bool = False):
        self.endpoint = endpoint
        self._tmp = tempfile.TemporaryDirectory(prefix="shmrt-run-")
        ready = os.path.join(self._tmp.name, "ready")
        cmd = [sys.executable, "-m", "shmrt", "daemon", "--endpoint", endpoint, "--ready-file", ready, *daemon_args]
        if quiet:
            cmd.append("--quiet")
        # The kernel's death signal follows the thread that started the child, not the process: asked for only from
        # the main thread (`shmrt run`, the bench), or a daemon started on a worker thread would stop with that thread
        env = dict(os.environ)
        if threading.current_thread() is threading.main_thread():
            env[PARENT_ENV] = str(os.getpid())
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + timeout
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                self._tmp.cleanup()
                raise ShmrtError(f"the daemon exited with code {self.proc.returncode} before listening (see above)")
            if time.monotonic() > deadline:
                self.stop()
                raise ShmrtError(f"the daemon did not start listening within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()
        return self.proc.returncode

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def daemon_argv(model: str, device: str, dtype: str, layers: int | None, seed: int = 0) -> list[str]:
    out = ["--model", model, "--device", device, "--dtype", dtype, "--seed", str(seed)]
    if layers:
        out += ["--layers", str(layers)]
    return out


def run_endpoint(enclave: bool) -> str:
    """A fresh endpoint for `shmrt run`: a private ipc socket, or loopback tcp in enclave mode."""
    if enclave:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"
    return f"ipc://{settings.runtime_dir() / f'run-{os.getpid()}.sock'}"
