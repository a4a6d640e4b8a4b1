"""Micro suite: echo round trips of float32 tensors over each transport and doorbell, next to the floors
measured in the same run. A floor is the two copies any of them makes, where it makes them (the client's into
shared memory, the echo side's from there into a second shared area, in the other process: the bytes cross
cores as a transport's do), around a bare round trip of the same signalling: a 64-byte ZeroMQ message for the
ZeroMQ doorbell, a word ping-ponged through shared memory with the same waiting policy for the shared-memory
doorbell. `copies` is the two copies alone in one process (the floor up to session 20 added that to the bare
round trip: it leaves out what moving the bytes to another core costs, ~2.5x at 64 KiB on 2 cores).

Where the machine has two CPUs to spare, the client's main thread runs on one and every echo side's (the transports'
daemon, both floors' echo processes) on another, not its SMT sibling (`micro_cpus`): a round trip's cost depends on
which two cores it crosses, so a floor and the transport it is the floor of cross the same two; on 2 cores an
unpinned floor once had its echo side share the client's core (192 us at 4 KiB, against 5-6). ZeroMQ's I/O threads
stay where the scheduler puts them: pinned beside a main thread that waits, they waited for its time slice (0.9 ms
round trips). The kinds' round trips are interleaved in blocks (`_time_interleaved`)."""
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
BLOCK = 100   # round trips of one kind in a row, then the next kind's (`_time_interleaved`)


def micro_cpus() -> tuple[int, int] | None:
    """(the client's CPU, the echo sides' CPU): the first this process may run on, and the first after it that is
    not its SMT sibling (the last allowed, where every other is); None where fewer than two are allowed."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None
    client = allowed[0]
    try:
        with open(f"/sys/devices/system/cpu/cpu{client}/topology/thread_siblings_list") as f:
            siblings = _cpu_list(f.read())
    except (OSError, ValueError):
        siblings = {client}
    return client, next((c for c in allowed if c not in siblings), allowed[-1])


def _cpu_list(text: str) -> set[int]:
    """A sysfs CPU list ("0,8" or "0-1") as a set."""
    cpus = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _pin_thread(tid: int, cpu: int | None) -> None:
    """Thread `tid` (a process's id: its main thread; 0: the calling thread) on `cpu` alone (None: left where the
    scheduler puts it). Threads it starts later inherit that: pin a main thread after its ZeroMQ context is up."""
    if cpu is not None:
        os.sched_setaffinity(tid, {cpu})


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

    def pin(self, cpu: int | None) -> None:
        """Both echo sides' main threads on `cpu` (after a round trip of each: the ZeroMQ one's I/O thread is up)."""
        one = torch.zeros(1)
        self.shm(one)()
        self.zmq(one)()
        for proc in self.procs:
            _pin_thread(proc.pid, cpu)

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

    def __enter__(self) -> "Floors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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


def _time_interleaved(round_trips: dict, repeats: dict, warmup: int, block: int = BLOCK) -> dict[str, list[float]]:
    """Each round trip's `repeats[name]` samples, taken in rounds: in each, a block of each kind in turn, the kind with
    the most repeats `block` round trips, the others as many fewer as they have fewer repeats, so that every kind's
    samples spread over all the rounds. What slows the machine for a while (a neighbour, a frequency step) slows each
    alike, where back-to-back runs of thousands each put one transport in a slow second and its floor in a fast one
    (one H200 host: the floor's median moved 4.6-6.4 us at 4 KiB between runs a minute apart). A block keeps each warm
    in the caches as a tight loop does; its first samples are in the distribution (the median does not see them)."""
    for name, fn in round_trips.items():
        for _ in range(warmup):
            fn()
    rounds = -(-max(repeats.values()) // block)
    out = {name: [] for name in round_trips}
    for r in range(rounds):
        for name, fn in round_trips.items():
            samples = out[name]
            for _ in range(repeats[name] * (r + 1) // rounds - len(samples)):
                t0 = now_ns()
                fn()
                samples.append((now_ns() - t0) / 1e9)
    return out


def _repeats_for(nbytes: int, minimum: int) -> int:
    """Round trips of each kind at a size: 2000 up to 1 MiB (a median that holds still on a noisy machine), fewer
    above (~2 GB moved a kind), `minimum` (--repeats) at least."""
    return max(minimum, min(2000, int(2e9 // max(nbytes, 1))))


def run_micro(sizes: list[int], repeats: int, endpoint_base: str, progress=None, pin: bool = True) -> list[dict]:
    """Every size's records; `pin`: the client's and the echo sides' main threads on two CPUs (`micro_cpus`), where
    there are."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    records = []
    echo_ep, raw_ep = endpoint_base + "-echo.sock", endpoint_base + "-raw.sock"
    client_cpu, echo_cpu = (micro_cpus() if pin else None) or (None, None)
    allowed = os.sched_getaffinity(0)
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
        # main threads pinned once every ZeroMQ context here and there is up (their I/O threads stay unpinned)
        floors.pin(echo_cpu)
        _pin_thread(proc.pid, echo_cpu)
        _pin_thread(0, client_cpu)
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
            round_trips = {"floor-shm": floors.shm(x), "floor-zmq": floors.zmq(x)}
            for name, t in transports.items():
                def round_trip(t=t):
                    t.call("Matmul", [x]).release()
                round_trips[name] = round_trip
            samples = _time_interleaved(round_trips, dict.fromkeys(round_trips, n), 50)
            records += [record(name, nbytes, samples[name]) for name in round_trips]
            if progress:
                progress(i + 1, len(sizes))
        for t in transports.values():
            t.close()
        for r in records:
            r["cpus"] = None if client_cpu is None else [client_cpu, echo_cpu]   # (client, echo sides): pinned
    finally:
        for tid in os.listdir("/proc/self/task"):   # every thread: one started while pinned kept its one CPU
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), allowed)
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
    cpus = next((r.get("cpus") for r in records if r.get("suite", "micro") == "micro"), None)
    lines.append(f"client on CPU {cpus[0]}, every echo side on CPU {cpus[1]}" if cpus
                 else "processes where the scheduler put them (not pinned)")
    return "\n".join(lines)
