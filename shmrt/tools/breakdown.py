"""Where a phase's time went: the one breakdown that `shmrt run`'s summary, the bench and
`shmrt analyze` print.

From a phase's calls and its wall time:          and per stage of the calls:
  daemon    = sum(daemon work)                     encode   = serialize (copies in, encoding)
  transport = sum(call time) - daemon              doorbell = send
  enclave   = wall - sum(call time)                wait     = recv - daemon work
                                                   decode   = deserialize (copies out, decoding)
so enclave + transport + daemon = wall, and encode + doorbell + wait + decode = transport.

Calls are `CallStats` (live, in `shmrt run`) or the sidecar's "call" records (bench, analyze); phases
are objects with name/start_ns/end_ns/tokens (generate's `Phase`) or the sidecar's "phase" records.
Plain Python, no torch or zmq: `shmrt analyze` imports it.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from ..model.calls import call_label

STAGES = ("encode", "doorbell", "wait", "decode")  # the transport's share of a call, in order


@dataclass(frozen=True)
class Call:
    """One call's stage timestamps (CLOCK_MONOTONIC ns), whichever form it came in."""

    method: str
    start_ns: int
    encoded_ns: int
    sent_ns: int
    replied_ns: int
    decoded_ns: int
    work_ns: int
    sent_bytes: int
    recv_bytes: int
    op: int | None = None   # the doorbell's argument bits (None: a sidecar from before they were logged)

    @classmethod
    def of(cls, c) -> "Call":
        if isinstance(c, Call):
            return c
        if isinstance(c, dict):  # a sidecar "call" record
            return cls(c["method"], c["t_start_ns"], c["t_encoded_ns"], c["t_sent_ns"], c["t_replied_ns"],
                       c["t_decoded_ns"], c.get("daemon_work_ns", 0), c["sent_bytes"], c["recv_bytes"], c.get("op"))
        return cls(c.method, c.t_start, c.t_encoded, c.t_sent, c.t_replied, c.t_decoded, c.work_ns,
                   c.sent_bytes, c.recv_bytes, c.op)  # CallStats

    @property
    def label(self) -> str:
        return call_label(self.method, self.op)

    def stages_ns(self) -> tuple[int, int, int, int]:
        """The transport's share of this call, stage by stage (STAGES: encode, doorbell, wait, decode)."""
        return (self.encoded_ns - self.start_ns, self.sent_ns - self.encoded_ns,
                self.replied_ns - self.sent_ns - self.work_ns, self.decoded_ns - self.replied_ns)


@dataclass(frozen=True)
class Breakdown:
    """Seconds of one phase (or of any set of calls), split both ways."""

    phase: str
    tokens: int
    wall_s: float
    calls: int
    calls_s: float        # sum of call times (t_decoded - t_start)
    daemon_s: float       # sum of the daemon's reported work
    encode_s: float
    doorbell_s: float
    wait_s: float
    decode_s: float
    sent_bytes: int
    recv_bytes: int

    @property
    def transport_s(self) -> float:
        return self.calls_s - self.daemon_s

    @property
    def enclave_s(self) -> float:
        return self.wall_s - self.calls_s

    def per_token(self) -> "Breakdown":
        """Every time divided by the phase's tokens (decode: per step); counts stay totals."""
        n = max(self.tokens, 1)
        return Breakdown(self.phase, self.tokens, self.wall_s / n, self.calls, self.calls_s / n,
                         self.daemon_s / n, self.encode_s / n, self.doorbell_s / n, self.wait_s / n,
                         self.decode_s / n, self.sent_bytes, self.recv_bytes)

    def as_dict(self) -> dict:
        return asdict(self) | {"transport_s": self.transport_s, "enclave_s": self.enclave_s}


def breakdown(calls, wall_s: float | None = None, phase: str = "", tokens: int = 0) -> Breakdown:
    """The breakdown of `calls` made within `wall_s` seconds (None: the calls' own time, enclave 0)."""
    cs = [Call.of(c) for c in calls]
    ns = lambda f: sum(f(c) for c in cs) / 1e9  # noqa: E731
    calls_s = ns(lambda c: c.decoded_ns - c.start_ns)
    stages = [sum(column) / 1e9 for column in zip(*(c.stages_ns() for c in cs))] or [0.0] * len(STAGES)
    return Breakdown(phase, tokens, calls_s if wall_s is None else wall_s, len(cs), calls_s, ns(lambda c: c.work_ns),
                     *stages, sent_bytes=sum(c.sent_bytes for c in cs), recv_bytes=sum(c.recv_bytes for c in cs))


def _span(p) -> tuple[str, int, int, int]:
    if isinstance(p, dict):  # a sidecar "phase" record
        return p["phase"], p["start_ns"], p["end_ns"], p["tokens"]
    return p.name, p.start_ns, p.end_ns, p.tokens


def by_phase(calls, phases) -> list[Breakdown]:
    """One breakdown per phase span, of the calls that lie wholly inside it."""
    cs = [Call.of(c) for c in calls]
    out = []
    for p in phases:
        name, start, end, tokens = _span(p)
        out.append(breakdown(inside(cs, p), (end - start) / 1e9, name, tokens))
    return out


def inside(calls, phase) -> list[Call]:
    """The calls that lie wholly inside a phase span."""
    _, start, end, _ = _span(phase)
    return [c for c in map(Call.of, calls) if start <= c.start_ns and c.decoded_ns <= end]


@dataclass(frozen=True)
class CallMedians:
    """The median call of one kind in a phase, in microseconds: `enclave` is the time before it since the
    previous call returned (the enclave's math between the two), then the call's own stages."""

    label: str
    calls: int
    enclave_us: float
    encode_us: float
    doorbell_us: float
    wait_us: float
    daemon_us: float
    decode_us: float


def per_call(calls) -> list[CallMedians]:
    """Median stage times per kind of call (`Call.label`), in order of first appearance: which call of a
    decode step is the slow one, and on which side."""
    cs = sorted(map(Call.of, calls), key=lambda c: c.start_ns)
    samples: dict[str, list[tuple]] = {}
    previous = None
    for c in cs:
        gap = c.start_ns - previous if previous is not None else None
        encode, doorbell, wait, decode = c.stages_ns()
        samples.setdefault(c.label, []).append((gap, encode, doorbell, wait, c.work_ns, decode))
        previous = c.decoded_ns
    out = []
    for label, rows in samples.items():
        medians = [statistics.median(v) / 1e3 if (v := [r[i] for r in rows if r[i] is not None]) else 0.0
                   for i in range(6)]
        out.append(CallMedians(label, len(rows), *medians))
    return out


def by_method(calls) -> dict[str, Breakdown]:
    """Per method, the calls' own time split into the stages and the daemon's work."""
    cs = [Call.of(c) for c in calls]
    return {m: breakdown([c for c in cs if c.method == m], phase=m) for m in sorted({c.method for c in cs})}


def combined(parts: list[Breakdown], phase: str = "all") -> Breakdown:
    """Several phases as one (times, counts and bytes add up; tokens too)."""
    fields = [f for f in Breakdown.__dataclass_fields__ if f != "phase"]
    return Breakdown(phase, **{f: sum(getattr(b, f) for b in parts) for f in fields})


def describe(b: Breakdown, with_calls: bool = True) -> str:
    """One line: the three shares of the wall time in ms (clamped at 0: the clocks of a short phase
    can round either way) and the call count."""
    ms = lambda s: f"{max(s, 0.0) * 1e3:.1f} ms"  # noqa: E731
    share = 100 * max(b.transport_s, 0.0) / max(b.wall_s, 1e-12)
    return (f"transport {ms(b.transport_s)} ({share:.1f}%), daemon compute {ms(b.daemon_s)}, "
            f"enclave compute {ms(b.enclave_s)}" + (f", {b.calls} calls" if with_calls else ""))
