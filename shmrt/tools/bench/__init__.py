"""`shmrt bench`: the micro and end-to-end suites; results.json, results.md and plots per run."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time

from ... import settings


def add_bench_args(p) -> None:
    p.add_argument("--suite", default="all", choices=["micro", "e2e", "all"])
    p.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 CPU cores")
    p.add_argument("--sizes", help="micro: comma-separated sizes, e.g. 4KiB,10MiB")
    p.add_argument("--repeats", type=int, default=None, help="micro: at least 20; e2e: at least 3")
    p.add_argument("--no-pin", action="store_true",
                   help="micro: leave the client and the echo processes where the scheduler puts them (default: two "
                        "CPUs, the same for a floor and its transport)")
    p.add_argument("--json", metavar="PATH", help="also write the records to PATH")
    p.add_argument("--out", metavar="DIR", help="results directory (default bench/results/<machine>)")
    p.add_argument("--model", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=int)
    p.add_argument("--prompts", default="128,1024", help="e2e: prefill lengths")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--transports", default="msgpack,shm",
                   help="e2e: msgpack, shm (doorbell in shared memory) and/or shm-zmqbell (shm rings, a ZeroMQ doorbell)")
    p.add_argument("--wire-dtypes", default="float32,bfloat16")
    p.add_argument("--kv-caches", default="daemon,client")
    p.add_argument("--decode-threads", type=int, default=1,
                   help="e2e: the client's torch threads while decoding (default 1, as `shmrt run`; 0: torch's default); the floor uses it "
                        "too where the daemon's half runs on a GPU (on a CPU both halves share the threads)")
    p.add_argument("--calls", default="fewest", choices=["fewest", "fused", "v2.4"],
                   help="e2e: fewest (4 calls per layer with K/V on the daemon, else 5), fused (P*V and o_proj as "
                        "one call: 5) or v2.4's six")


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return f"{torch.cuda.get_device_name(0)} + {_cpu()}"
    return _cpu()


def _cpu() -> str:
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def _progress(label):
    start = time.monotonic()

    def show(i, n, what=""):
        width = 24
        done = int(width * i / n)
        print(f"\r{label} [{'#' * done}{'.' * (width - done)}] {i}/{n} {what:<40} {time.monotonic() - start:6.1f}s",
              end="\n" if i == n else "", file=sys.stderr, flush=True)
    return show


def main(args) -> int:
    from ...errors import ShmrtError
    from ...units import parse_bytes
    from .micro import format_micro, run_micro
    from .report import run_e2e, write_results

    machine = machine_name(args.device)
    out = pathlib.Path(args.out or f"bench/results/{_slug(machine)}")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    if args.suite in ("micro", "all"):
        if args.sizes:
            try:
                sizes = [parse_bytes(s) for s in args.sizes.split(",")]
            except ValueError:
                raise ShmrtError(f"--sizes {args.sizes!r}: expected sizes like 4KiB,10MiB") from None
        else:
            sizes = [4 << 10, 1 << 20, 10 << 20] if args.quick else [4 << 10, 64 << 10, 1 << 20, 10 << 20, 64 << 20]
        repeats = max(args.repeats or 20, 20)
        base = str(settings.runtime_dir() / f"bench-{os.getpid()}")
        micro = run_micro(sizes, repeats, f"ipc://{base}", _progress("micro"), pin=not args.no_pin)
        print(format_micro(micro))
        records += [dict(r, machine=machine) for r in micro]
    if args.suite in ("e2e", "all"):
        records += run_e2e(args, out, machine, _progress("e2e  "))
    write_results(records, out, machine)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(records, indent=1))
    print(f"results: {out}/results.json, {out}/results.md")
    return 0


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in keep.split("-") if p)[:60]
