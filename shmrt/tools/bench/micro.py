"""Micro suite: echo round trips of float32 tensors over each transport and doorbell, next to the floors
measured in the same run: two memcpys of the size plus a bare round trip of the same signalling (a
64-byte ZeroMQ message for the ZeroMQ doorbell, a word ping-ponged through shared memory with the
same waiting policy for the shared-memory doorbell)."""
from __future__ import annotations

import contextlib
import mmap
import os
import statistics

import torch
import zmq

from ...units import format_bytes
from ...wire.native import Backoff, MappedBuffer, WordWaiter, now_ns, precise_sleeps
from ...host.server import EchoHandler, Server
from ...wire.peer import client_info
from ...wire.registry import client_transport
from ...wire.ring import OFF_HEAD, OFF_TAIL, PAGE_BYTES, Ring

STOP = 1 << 62
# record name -> (transport, doorbell); floors are "floor-zmq" and "floor-shm"
ROUND_TRIPS = {"shm": ("shm", "shm"), "shm-zmqbell": ("shm", "zmq"), "msgpack": ("msgpack", "zmq")}


def _serve_echo(endpoint: str) -> None:
    with Server(endpoint, EchoHandler(), log=lambda m: None) as server:
        server.serve()


def _serve_raw(endpoint: str) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


def _serve_signal(name: str) -> None:
    """The bare shared-memory signal: echo the head word into the tail word, waiting as bell.py does."""
    precise_sleeps()
    ring = Ring.attach(name, PAGE_BYTES)
    waiter = WordWaiter([ring.native.word_address(OFF_HEAD)], Backoff.configured())
    start = now_ns()
    while True:
        if waiter.wait(now_ns() - start, 1_000_000) >= 0:
            value = ring.native.load(OFF_HEAD)
            waiter.seen[0] = value
            if value == STOP:
                break
            ring.native.store(OFF_TAIL, value)
            start = now_ns()
    ring.close()


def _signal_rtt(ctx, repeats: int) -> list[float]:
    ring = Ring.create(PAGE_BYTES, "req")
    proc = ctx.Process(target=_serve_signal, args=(ring.name,), daemon=True)
    proc.start()
    try:
        precise_sleeps()
        waiter = WordWaiter([ring.native.word_address(OFF_TAIL)], Backoff.configured())
        count = 0

        def ping():
            nonlocal count
            count += 1
            ring.native.store(OFF_HEAD, count)
            start = now_ns()
            while waiter.wait(now_ns() - start, 100_000_000) < 0:
                if not proc.is_alive():
                    raise RuntimeError("the signal echo process died")
            waiter.seen[0] = count
        return _time(ping, repeats, 50)
    finally:
        ring.native.store(OFF_HEAD, STOP)
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
        ring.close()


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
        rtt = {"floor-zmq": statistics.median(_time(ping, 500, 50))}
        sock.close()
        rtt["floor-shm"] = statistics.median(_signal_rtt(ctx, 2000))
        ring_cap = max(sizes) * 2 + (1 << 20)
        transports = {}
        for label, (name, doorbell) in ROUND_TRIPS.items():
            t = client_transport(name, echo_ep, timeout=60, doorbell=doorbell)
            t.hello(client_info())
            t.open_session(ring_cap)
            t.call("Init").release()
            transports[label] = t
        for i, nbytes in enumerate(sizes):
            n = _repeats_for(nbytes, repeats)
            x = torch.randn(nbytes // 4)
            # ... plus two memcpys of the size (the C helper's, as the shm path uses)
            area = mmap.mmap(-1, nbytes + 4096)
            buf = MappedBuffer(area)
            copy = _time(lambda: buf.copy_in(0, x), n, 3)
            buf.release()
            area.close()
            for floor, signal in rtt.items():
                records.append(record(floor, nbytes, [2 * c + signal for c in copy]))
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
        for endpoint in (echo_ep, raw_ep):   # the servers were terminated: their socket files are ours to remove
            with contextlib.suppress(OSError):
                os.unlink(endpoint[len("ipc://"):])
    return records


MICRO_COLUMNS = ("floor-shm", "shm", "floor-zmq", "shm-zmqbell", "msgpack")


def micro_rows(records: list[dict]) -> list[tuple]:
    """Per size: the medians (s) in MICRO_COLUMNS order, then shm / floor-shm, shm-zmqbell / floor-zmq and
    msgpack / shm."""
    by = {(r["transport"], r["nbytes"]): r["median_s"] for r in records if r.get("suite", "micro") == "micro"}
    rows = []
    for n in sorted({k[1] for k in by}):
        med = [by[(c, n)] for c in MICRO_COLUMNS]
        rows.append((n, *med, med[1] / med[0], med[3] / med[2], med[4] / med[1]))
    return rows


def format_micro(records: list[dict]) -> str:
    lines = [f"{'size':>10} " + " ".join(f"{c + ' us':>15}" for c in MICRO_COLUMNS)
             + f" {'shm/floor':>10} {'zmqbell/floor':>14} {'msgpack/shm':>12}"]
    for n, *vals in micro_rows(records):
        med, ratios = vals[:5], vals[5:]
        lines.append(f"{format_bytes(n):>10} " + " ".join(f"{v * 1e6:>15.1f}" for v in med)
                     + f" {ratios[0]:>9.2f}x {ratios[1]:>13.2f}x {ratios[2]:>11.1f}x")
    return "\n".join(lines)
