"""Micro suite: echo round trips of float32 tensors over each transport and doorbell, next to the floors
measured in the same run. A floor is the two copies any of them makes, where it makes them (the client's into
shared memory, the echo side's from there into a second shared area, in the other process: the bytes cross
cores as a transport's do), around a bare round trip of the same signalling: a 64-byte ZeroMQ message for the
ZeroMQ doorbell, a word ping-ponged through shared memory with the same waiting policy for the shared-memory
doorbell. `copies` is the two copies alone in one process (the floor up to session 20 added that to the bare
round trip: it leaves out what moving the bytes to another core costs, ~2.5x at 64 KiB on 2 cores)."""
from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import statistics
import struct

import torch
import zmq

from ...units import format_bytes
from ...wire.native import Backoff, MappedBuffer, WordWaiter, now_ns, precise_sleeps
from ...host.server import EchoHandler, Server
from ...wire.peer import client_info
from ...wire.registry import client_transport
from ...wire.ring import OFF_HEAD, OFF_TAIL, PAGE_BYTES, Ring

STOP = 1 << 62
SIZE_BITS = 32   # a floor's signal: (round trip count << SIZE_BITS) | bytes to copy
SIZE = struct.Struct("<Q")   # ... and its ZeroMQ message's first word: the bytes to copy
# record name -> (transport, doorbell); floors are "floor-zmq" and "floor-shm", beside "copies"
ROUND_TRIPS = {"shm": ("shm", "shm"), "shm-zmqbell": ("shm", "zmq"), "msgpack": ("msgpack", "zmq")}


def _serve_echo(endpoint: str) -> None:
    with Server(endpoint, EchoHandler(), log=lambda m: None) as server:
        server.serve()


class FloorArea:
    """The shared memory a floor's copies go through: the client's input at the start of the data area, the echo
    side's copy at its middle."""

    def __init__(self, ring: Ring):
        self.ring, self.buf = ring, ring.native
        self.src, self.dst = ring.data_offset, ring.data_offset + ring.capacity // 2


def _serve_raw(endpoint: str, area_name: str, capacity: int) -> None:
    """The ZeroMQ floor's echo side: copy the bytes the message names, answer the same 64 bytes."""
    area = FloorArea(Ring.attach(area_name, capacity))
    copy, dst, src = area.buf.copy_within, area.dst, area.src
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        identity, msg = sock.recv_multipart()
        copy(dst, src, SIZE.unpack_from(msg)[0])
        sock.send_multipart((identity, msg))


def _serve_signal(area_name: str, capacity: int) -> None:
    """The shared-memory floor's echo side: copy the bytes the head word names, echo the word into the tail word,
    waiting as bell.py does."""
    precise_sleeps()
    ring = Ring.attach(area_name, capacity)
    area = FloorArea(ring)
    copy, dst, src, load, store = area.buf.copy_within, area.dst, area.src, ring.native.load, ring.native.store
    waiter = WordWaiter([ring.native.word_address(OFF_HEAD)], Backoff.configured())
    wait, seen = waiter.wait, waiter.seen
    size_mask = (1 << SIZE_BITS) - 1
    start = now_ns()
    while True:
        if wait(now_ns() - start, 1_000_000) >= 0:
            value = load(OFF_HEAD)
            seen[0] = value
            if value == STOP:
                break
            copy(dst, src, value & size_mask)
            store(OFF_TAIL, value)
            start = now_ns()
    ring.close()


class Floors:
    """Both floors' echo sides (processes) over one shared area this side owns; `shm(x)` and `zmq(x)` give one round
    trip of x's bytes as a function of no arguments (its steps bound once, as lean as the signalling allows)."""

    def __init__(self, ctx, endpoint: str, capacity: int):
        self.area = FloorArea(Ring.create(capacity, "req"))
        ring = self.area.ring
        self.procs = [ctx.Process(target=_serve_signal, args=(ring.name, ring.capacity), daemon=True),
                      ctx.Process(target=_serve_raw, args=(endpoint, ring.name, ring.capacity), daemon=True)]
        for proc in self.procs:
            proc.start()
        precise_sleeps()
        self.waiter = WordWaiter([ring.native.word_address(OFF_TAIL)], Backoff.configured())
        self.count = itertools.count(1)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def shm(self, x: torch.Tensor):
        copy_in, store, src = self.area.buf.copy_in, self.area.buf.store, self.area.src
        wait, seen, count, nbytes = self.waiter.wait, self.waiter.seen, self.count, x.numel() * x.element_size()
        echo = self.procs[0]

        def round_trip():
            copy_in(src, x)
            value = (next(count) << SIZE_BITS) | nbytes
            store(OFF_HEAD, value)
            start = now_ns()
            while wait(now_ns() - start, 100_000_000) < 0:
                if not echo.is_alive():
                    raise RuntimeError("the signal echo process died")
            seen[0] = value
        return round_trip

    def zmq(self, x: torch.Tensor):
        copy_in, src, send, recv = self.area.buf.copy_in, self.area.src, self.sock.send, self.sock.recv
        msg = SIZE.pack(x.numel() * x.element_size()) + bytes(64 - SIZE.size)

        def round_trip():
            copy_in(src, x)
            send(msg)
            recv()
        return round_trip

    def close(self) -> None:
        self.sock.close()
        self.area.buf.store(OFF_HEAD, STOP)
        self.procs[0].join(5)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.area.ring.close()


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
    proc = ctx.Process(target=_serve_echo, args=(echo_ep,), daemon=True)
    proc.start()
    floors = None
    try:
        floors = Floors(ctx, raw_ep, 2 * max(sizes) + PAGE_BYTES)
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
            # the two copies in one process (the C helper's, as the shm path makes them)
            area = mmap.mmap(-1, nbytes + 4096)
            buf = MappedBuffer(area)
            copy = _time(lambda: buf.copy_in(0, x), n, 3)
            buf.release()
            area.close()
            records.append(record("copies", nbytes, [2 * c for c in copy]))
            records.append(record("floor-shm", nbytes, _time(floors.shm(x), max(n, 2000), 50)))
            records.append(record("floor-zmq", nbytes, _time(floors.zmq(x), max(n, 500), 50)))
            for name, t in transports.items():
                def roundtrip(t=t):
                    t.call("Matmul", [x]).release()
                records.append(record(name, nbytes, _time(roundtrip, n, 3)))
            if progress:
                progress(i + 1, len(sizes))
        for t in transports.values():
            t.close()
    finally:
        if floors is not None:
            floors.close()
        proc.terminate()
        proc.join(5)
        for endpoint in (echo_ep, raw_ep):   # the servers were terminated: their socket files are ours to remove
            with contextlib.suppress(OSError):
                os.unlink(endpoint[len("ipc://"):])
    return records


MICRO_COLUMNS = ("copies", "floor-shm", "shm", "floor-zmq", "shm-zmqbell", "msgpack")


def micro_rows(records: list[dict]) -> list[tuple]:
    """Per size: the medians (s) in MICRO_COLUMNS order, then shm / floor-shm, shm-zmqbell / floor-zmq and
    msgpack / shm."""
    by = {(r["transport"], r["nbytes"]): r["median_s"] for r in records if r.get("suite", "micro") == "micro"}
    rows = []
    for n in sorted({k[1] for k in by}):
        med = [by[(c, n)] for c in MICRO_COLUMNS]
        copies, floor_shm, shm, floor_zmq, zmqbell, msgpack = med
        rows.append((n, *med, shm / floor_shm, zmqbell / floor_zmq, msgpack / shm))
    return rows


def format_micro(records: list[dict]) -> str:
    lines = [f"{'size':>10} " + " ".join(f"{c + ' us':>15}" for c in MICRO_COLUMNS)
             + f" {'shm/floor':>10} {'zmqbell/floor':>14} {'msgpack/shm':>12}"]
    for n, *vals in micro_rows(records):
        med, ratios = vals[:len(MICRO_COLUMNS)], vals[len(MICRO_COLUMNS):]
        lines.append(f"{format_bytes(n):>10} " + " ".join(f"{v * 1e6:>15.1f}" for v in med)
                     + f" {ratios[0]:>9.2f}x {ratios[1]:>13.2f}x {ratios[2]:>11.1f}x")
    return "\n".join(lines)
