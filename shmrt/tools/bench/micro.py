"""Micro suite: echo round trips of float32 tensors over each transport, next to the floor
measured in the same run (two memcpys of the size + a 64-byte ZeroMQ round trip)."""
from __future__ import annotations

import mmap
import statistics

import torch
import zmq

from ...units import format_bytes
from ...wire.native import MappedBuffer, now_ns
from ...host.server import EchoHandler, Server
from ...wire.peer import client_info
from ...wire.registry import client_transport


def _serve_echo(endpoint: str) -> None:
    with Server(endpoint, EchoHandler(), log=lambda m: None) as server:
        server.serve()


def _serve_raw(endpoint: str) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


def record(transport: str, nbytes: int, samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return {"suite": "micro", "transport": transport, "nbytes": nbytes, "median_s": statistics.median(samples),
            "p10_s": q[0], "p90_s": q[-1], "repeats": len(samples)}


def _time(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = now_ns()
        fn()
        out.append((now_ns() - t0) / 1e9)
    return out


def _repeats_for(nbytes: int, minimum: int) -> int:
    return max(minimum, min(200, int(2e9 // max(nbytes, 1))))


def run_micro(sizes: list[int], repeats: int, endpoint_base: str, progress=None) -> list[dict]:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    records = []
    echo_ep, raw_ep = endpoint_base + "-echo.sock", endpoint_base + "-raw.sock"
    procs = [ctx.Process(target=_serve_echo, args=(echo_ep,), daemon=True),
             ctx.Process(target=_serve_raw, args=(raw_ep,), daemon=True)]
    for p in procs:
        p.start()
    try:
        # floor: a 64-byte round trip through ZeroMQ ...
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(raw_ep)
        msg = b"x" * 64

        def ping():
            sock.send(msg)
            sock.recv()
        rtt = _time(ping, 500, 50)
        sock.close()
        ring_cap = max(sizes) * 2 + (1 << 20)
        transports = {}
        for name in ("shm", "msgpack"):
            t = client_transport(name, echo_ep, timeout=60)
            t.hello(client_info())
            t.open_session(ring_cap)
            t.call("Init").release()
            transports[name] = t
        for i, nbytes in enumerate(sizes):
            n = _repeats_for(nbytes, repeats)
            x = torch.randn(nbytes // 4)
            # ... plus two memcpys of the size (the C helper's, as the shm path uses)
            area = mmap.mmap(-1, nbytes + 4096)
            buf = MappedBuffer(area)
            copy = _time(lambda: buf.copy_in(0, x), n, 3)
            buf.release()
            area.close()
            rtt_median = statistics.median(rtt)
            floor = [2 * c + rtt_median for c in copy]
            records.append(record("floor", nbytes, floor))
            for name, t in transports.items():
                def roundtrip(t=t):
                    t.call("Matmul", [x]).release()
                records.append(record(name, nbytes, _time(roundtrip, n, 3)))
            if progress:
                progress(i + 1, len(sizes))
        for t in transports.values():
            t.close()
    finally:
        for p in procs:
            p.terminate()
            p.join(5)
    return records


def format_micro(records: list[dict]) -> str:
    by = {(r["transport"], r["nbytes"]): r for r in records}
    sizes = sorted({r["nbytes"] for r in records})
    lines = [f"{'size':>10} {'floor ms':>10} {'shm ms':>10} {'msgpack ms':>11} {'msgpack/shm':>12} {'shm/floor':>10}"]
    for n in sizes:
        f, s, m = by[("floor", n)]["median_s"], by[("shm", n)]["median_s"], by[("msgpack", n)]["median_s"]
        lines.append(f"{format_bytes(n):>10} {f * 1e3:>10.3f} {s * 1e3:>10.3f} {m * 1e3:>11.3f} {m / s:>11.1f}x {s / f:>9.2f}x")
    return "\n".join(lines)
