"""The client's Python per known call, in instructions: repeatable where seconds are not (2 cores, lent VMs).

    python bench/call_instructions.py [--calls N]          # needs valgrind, its callgrind.h, and gcc

An echo daemon in a subprocess; one shm client makes warm calls until each shape's reply is known (accepted and
released in C); then C's call and C's release are replaced by no-ops (a Python lambda each: the same for any tree),
and callgrind counts the instructions of N calls + releases, between client requests that switch its counting on
and off (a tiny library built here with gcc; valgrind's startup, torch's import and the daemon are not counted).
What it reports is the Python around the C call: the key's lookup, the inputs' checks, the Reply, its views and its
release. Run it in two trees to compare them (PYTHONPATH=that tree): the same binary and inputs give the same count.

A script, not a timed test.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import pathlib
import subprocess
import sys
import tempfile

TOGGLE_C = """#include <valgrind/callgrind.h>
void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void cg_dump(void) { CALLGRIND_DUMP_STATS; }
"""
CASES = (("1 input", 1, {}), ("2 inputs", 2, {"layer": 3, "op": 1}))


def _measure(lib_path: str, calls: int) -> None:
    """Under callgrind: each case's N calls between two toggles, then a dump (one file a case)."""
    import multiprocessing as mp

    import torch

    from shmrt.tools.bench.micro import _serve_echo
    from shmrt.wire.peer import client_info
    from shmrt.wire.registry import client_transport
    torch.set_num_threads(1)
    endpoint = f"ipc://{tempfile.gettempdir()}/shmrt-instr-{os.getpid()}.sock"
    daemon = mp.get_context("spawn").Process(target=_serve_echo, args=(endpoint,), daemon=True)
    daemon.start()
    cg = ctypes.CDLL(lib_path)
    try:
        with client_transport("shm", endpoint, timeout=60, doorbell="shm") as t:
            t.hello(client_info())
            t.open_session(1 << 21)
            t.call("Init").release()
            inputs = {n: [torch.randn(1024) for _ in range(n)] for _, n, _ in CASES}
            for _ in range(100):
                for _, n, kwargs in CASES:
                    t.call("Matmul", inputs[n], **kwargs).release()
            assert t._caller.times.accepted, "the warm calls' replies were not accepted in C"
            stub = lambda *args: 0   # noqa: E731 (C's call: TOOK, the last reply's times; C's release: released)
            if hasattr(t._caller, "call_c"):
                t._caller.call_c = stub
            else:   # a tree (before call_c) whose NativeCaller.call reads native.lib's shmrt_call
                import shmrt.wire.native as native

                class Lib:
                    def __getattr__(self, name, lib=native.lib):
                        return getattr(lib, name)
                native.lib = Lib()
                native.lib.shmrt_call = stub
            t.rsp.consumer.release_in_c = stub
            for name, n, kwargs in CASES:
                tensors, call = inputs[n], t.call
                for _ in range(50):
                    call("Matmul", tensors, **kwargs).release()
                cg.cg_toggle()
                for _ in range(calls):
                    call("Matmul", tensors, **kwargs).release()
                cg.cg_toggle()
                cg.cg_dump()
                print(name, flush=True)
    finally:
        daemon.terminate()
        daemon.join(5)
        if os.path.exists(endpoint[len("ipc://"):]):
            os.unlink(endpoint[len("ipc://"):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--inner", help=argparse.SUPPRESS)   # (the run under valgrind: the toggle library's path)
    args = p.parse_args()
    if args.inner:
        _measure(args.inner, args.calls)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        lib = pathlib.Path(tmp) / "libcgtoggle.so"
        (pathlib.Path(tmp) / "toggle.c").write_text(TOGGLE_C)
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(pathlib.Path(tmp) / "toggle.c")],
                       check=True)
        out = pathlib.Path(tmp) / "cg.out"
        run = subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}",
                              sys.executable, __file__, "--inner", str(lib), "--calls", str(args.calls)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        if run.returncode:
            print(run.stderr[-2000:], file=sys.stderr)
            return run.returncode
        names = run.stdout.split("\n")
        dumps = sorted(pathlib.Path(tmp).glob("cg.out.*"), key=lambda f: int(f.name.rsplit(".", 1)[1]))
        for name, dump in zip(names, dumps):
            totals = next(int(line.split()[1]) for line in dump.read_text().splitlines()
                          if line.startswith("totals:"))
            print(f"{name}: {totals / args.calls:,.0f} instructions a call + release")
    return 0


if __name__ == "__main__":
    sys.exit(main())
