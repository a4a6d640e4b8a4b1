"""`python -m shmrt` (or `python -c CODE`) with torch already imported: a zygote for tests that start
such processes many times.

    python tests/cli_zygote.py        (commands on stdin, one JSON object a line)

A fresh `python -m shmrt client` spends ~3 s of CPU importing torch before it does anything; the hostile
host's 83 cases spent most of their time there. This process imports what the client imports once
(after `settings.apply_process_defaults()`, as `shmrt.cli.main` does before torch loads), then forks a
child per command. The child is its own process and does what `python -m shmrt ARGS` does from there:
chdir, its stdout and stderr on files, stdin on /dev/null, only fds 0-2 open, no core dumps, `sys.argv`
and `sys.path[0]` as `-m` sets them, then `runpy.run_module("shmrt", run_name="__main__")`; it exits
through the interpreter's own shutdown (atexit, finalizers, an uncaught exception's traceback, exit 1),
not `os._exit`. What it does not repeat is the interpreter start-up and the imports (the tests that
launch `python -m shmrt` themselves cover those). With "code" in the command, the child runs it as
`python -c CODE ARGV` would (`sys.argv[0]` "-c", `sys.path[0]` "", `__name__` "__main__").

Commands: {"id": N, "argv": [...], "cwd": DIR, "stdout": FILE, "stderr": FILE[, "code": CODE]}. Replies:
{"ready": true} once, {"id": N, "pid": PID} at the fork, {"id": N, "rc": RC} at the exit (RC: the exit
status, or -SIGNAL as subprocess reports it). EOF on stdin: the zygote exits (children keep running).
"""
from __future__ import annotations

import gc
import json
import os
import resource
import select
import sys


def _preload() -> None:
    gc.disable()  # until the fork: no collection leaves holes in the pages the children share
    from shmrt import settings
    settings.apply_process_defaults()  # before torch loads, as shmrt.cli.main does
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import zmq  # noqa: F401
    import shmrt.cli  # noqa: F401
    import shmrt.enclave.client  # noqa: F401
    import shmrt.enclave.generate  # noqa: F401
    import shmrt.enclave.tokenizer  # noqa: F401
    import shmrt.model.checkpoint  # noqa: F401
    import shmrt.tools.breakdown  # noqa: F401
    import shmrt.wire.native  # noqa: F401
    # What the imports made lives as long as the interpreter: out of the collector's sight, so that a
    # child's collections (and its shutdown's) do not write to, and copy, every page of it (~0.7 s each).
    gc.freeze()


def _send(msg: dict) -> None:
    os.write(1, (json.dumps(msg) + "\n").encode())


def serve() -> dict | None:
    """The zygote's loop. Returns the command in a forked child (which then runs it); None at EOF."""
    _send({"ready": True})
    buf, children, eof = b"", {}, False
    while not eof or children:
        readable, _, _ = select.select([] if eof else [0], [], [], 0.01)
        if readable:
            chunk = os.read(0, 65536)
            eof = not chunk
            buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                return cmd
            children[pid] = cmd["id"]
            _send({"id": cmd["id"], "pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            _send({"id": children.pop(pid), "rc": os.waitstatus_to_exitcode(status)})
        if eof and not children:
            break
    return None


def become(cmd: dict) -> None:
    """In the child: the process state `python -m shmrt ARGV` (or `-c CODE ARGV`) would start with."""
    os.chdir(cmd["cwd"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(cmd["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(cmd["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.closerange(3, 65536)  # as subprocess's close_fds
    gc.enable()
    if "code" in cmd:
        sys.argv = ["-c", *cmd["argv"]]
        sys.path[0] = ""                  # -c puts the working directory first, as ''
    else:
        sys.argv = ["-m", *cmd["argv"]]  # run_module puts the module's path in argv[0], as -m does
        sys.path[0] = os.getcwd()         # -m puts the working directory first, not this file's


# ---- the tests' side

class Zygote:
    """Starts tests/cli_zygote.py and runs commands through it, from any number of threads."""

    def __init__(self, env: dict, start_timeout: float = 120.0):
        """Starts the zygote and returns at once (its imports overlap whatever the caller starts next)."""
        import subprocess
        import threading
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, dict] = {}  # id -> {"pid": ..., "rc": ..., "event": Event}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._start_timeout = start_timeout

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            if msg.get("ready"):
                self._ready.set()
                continue
            with self._lock:
                entry = self._waiting[msg["id"]]
                entry.update(msg)
            if "rc" in msg:
                entry["event"].set()

    def run(self, argv: list[str], cwd: str, stdout: str, stderr: str, timeout: float, code: str | None = None) -> int:
        """`python -m shmrt ARGV` (`python -c CODE ARGV` with CODE) in CWD, its output in the files STDOUT
        and STDERR: the exit status (negative: the signal), as subprocess.run would give. Killed after
        TIMEOUT s, raising TimeoutError."""
        import threading
        if not self._ready.wait(self._start_timeout):
            raise RuntimeError(f"the CLI zygote did not start within {self._start_timeout:.0f} s")
        with self._lock:
            self._next += 1
            ident = self._next
            entry = self._waiting[ident] = {"event": threading.Event()}
            cmd = {"id": ident, "argv": argv, "cwd": str(cwd), "stdout": str(stdout), "stderr": str(stderr)}
            if code is not None:
                cmd["code"] = code
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
        if not entry["event"].wait(timeout):
            with self._lock:
                pid = entry.get("pid")
            if pid is not None:
                import signal
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                entry["event"].wait(10)
            raise TimeoutError(f"python -m shmrt {' '.join(argv)} ran past {timeout:.0f} s")
        with self._lock:
            del self._waiting[ident]
        return entry["rc"]

    def close(self) -> None:
        """EOF to the zygote: it exits once its children have."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001 - a child still running: the zygote goes anyway
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    _preload()
    command = serve()
    if command is None:
        sys.exit(0)
    become(command)
    code = command.get("code")
    del command
    if code is not None:
        main = type(sys)("__main__")  # a fresh __main__, as -c runs in
        sys.modules["__main__"] = main
        exec(compile(code, "<string>", "exec"), main.__dict__)
    else:
        import runpy
        runpy.run_module("shmrt", run_name="__main__", alter_sys=True)
