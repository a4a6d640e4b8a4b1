"""`shmrt daemon` as a child process (for `shmrt run`, the bench and the tests)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from .. import settings
from ..errors import ShmrtError


class DaemonProcess:
    """`shmrt daemon` as a child process: waits until it listens; always stops it on exit."""

    def __init__(self, daemon_args: list[str], endpoint: str, *, timeout: float = 600.0, quiet: bool = False):
        self.endpoint = endpoint
        self._tmp = tempfile.TemporaryDirectory(prefix="shmrt-run-")
        ready = os.path.join(self._tmp.name, "ready")
        cmd = [sys.executable, "-m", "shmrt", "daemon", "--endpoint", endpoint, "--ready-file", ready, *daemon_args]
        if quiet:
            cmd.append("--quiet")
        self.proc = subprocess.Popen(cmd)
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
