"""zmq_performance.log in the exact v2.4 layout, plus a JSONL sidecar with what the text cannot hold.

Text layout (see LOG_FORMAT.md): 4 header lines, one 144-character row per call appended and
flushed as the call ends, a SUMMARY block when the run ends. One run per file: IDs never restart.
Sidecar (`<log>.jsonl`): a "run" header object, a "call" object per RPC with nanosecond stage
timestamps, and a "phase" object per prefill/decode span (enclave compute = phase minus calls).
The sidecar is flushed at phase marks and at close, not per call: it is off the hot path.
"""
from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import dataclass, field

from ..wire.stats import CallStats

RULE = "=" * 120
WIDTHS = (5, 20, 15, 12, 12, 17, 12, 12, 12, 18)
COLUMNS = ("ID", "Method", "Serialize(ms)", "Send(ms)", "Recv(ms)", "Deserialize(ms)", "Total(ms)",
           "Sent(KB)", "Recv(KB)", "Throughput(MB/s)")
LINE_WIDTH = sum(WIDTHS) + len(WIDTHS) - 1  # 144
SUMMARY_KEYS = ("Total RPC Calls", "Average Serialize Time", "Average Send Time", "Average Receive Time",
                "Average Deserialize Time", "Average Total Time", "Total Data Sent", "Total Data Received",
                "Average Throughput")


ROW_FORMAT = " ".join(f"{{:<{w}}}" for w in WIDTHS)


def format_row(fields) -> str:
    """Each field left-aligned in its column (a field wider than its column pushes the rest right)."""
    return ROW_FORMAT.format(*map(str, fields))


# One call's row in one %-format (what format_row(row_fields(...)) writes, at half its cost: rows are formatted
# on the client's hot path, every FLUSH_ROWS calls).
ROW_PERCENT = " ".join(f"%-{w}{conv}" for w, conv in zip(WIDTHS, ("d", "s", ".3f", ".3f", ".3f", ".3f", ".3f", ".2f",
                                                                 ".2f", ".2f")))


def header_lines(label: str) -> list[str]:
    return [f"ZeroMQ Performance Log - Transport: {label}", RULE, format_row(COLUMNS), RULE]


def throughput_mbps(sent_b: int, recv_b: int, total_ms: float) -> float:
    """v2.4's Throughput(MB/s): bytes both ways over the time they took (0 for no time)."""
    return (sent_b + recv_b) / 2**20 / (total_ms / 1000) if total_ms > 0 else 0.0


def row_fields(call_id: int, method: str, ser_ms, send_ms, recv_ms, deser_ms, total_ms, sent_b, recv_b):
    mbps = throughput_mbps(sent_b, recv_b, total_ms)
    return (call_id, method, f"{ser_ms:.3f}", f"{send_ms:.3f}", f"{recv_ms:.3f}", f"{deser_ms:.3f}",
            f"{total_ms:.3f}", f"{sent_b / 1024:.2f}", f"{recv_b / 1024:.2f}", f"{mbps:.2f}")


def summary_lines(calls: int, ser_ms: float, send_ms: float, recv_ms: float, deser_ms: float,
                  total_ms: float, sent_b: int, recv_b: int) -> list[str]:
    """The SUMMARY block; arguments are sums over the run (averages are taken here)."""
    n = max(calls, 1)
    mbps = throughput_mbps(sent_b, recv_b, total_ms)
    return ["", RULE, "SUMMARY", RULE,
            f"Total RPC Calls: {calls}",
            f"Average Serialize Time: {ser_ms / n:.3f} ms",
            f"Average Send Time: {send_ms / n:.3f} ms",
            f"Average Receive Time: {recv_ms / n:.3f} ms",
            f"Average Deserialize Time: {deser_ms / n:.3f} ms",
            f"Average Total Time: {total_ms / n:.3f} ms",
            f"Total Data Sent: {sent_b / 2**20:.2f} MB",
            f"Total Data Received: {recv_b / 2**20:.2f} MB",
            f"Average Throughput: {mbps:.2f} MB/s",
            RULE]


# A sidecar "call" line: what json.dumps(..., separators=(",", ":")) writes for these keys, without
# building a dict per call (ints as %d; the few strings JSON-quoted once each, `_json_str`).
CALL_RECORD = ('{"type":"call","id":%d,"method":%s,"layer":%d,"op":%d,"phase":%s,"transport":%s,"t_start_ns":%d,'
               '"t_encoded_ns":%d,"t_sent_ns":%d,"t_replied_ns":%d,"t_decoded_ns":%d,"sent_bytes":%d,'
               '"recv_bytes":%d,"payload_sent":%d,"payload_recv":%d,"copy_in_ns":%d,"daemon_work_ns":%d}\n')


@functools.lru_cache(maxsize=256)
def _json_str(text: str) -> str:
    return json.dumps(text)


CALL_NUMBERS = ("t_start_ns", "t_encoded_ns", "t_sent_ns", "t_replied_ns", "t_decoded_ns", "sent_bytes", "recv_bytes")
PHASE_NUMBERS = ("start_ns", "end_ns", "tokens")


@dataclass
class Sidecar:
    run: dict                                          # the "run" header ({} if missing)
    calls: list[dict] = field(default_factory=list)    # "call" records, in call order
    phases: list[dict] = field(default_factory=list)   # "phase" records, and a span for each phase cut short

    def add_cut_phases(self) -> None:
        """A span for each phase its calls name that has no record (a run killed before the phase ended writes
        none): from its first call's start to its last call's end, `cut_short`; a decode phase's tokens are its
        steps (one LMHead each), another's unknown (0)."""
        recorded = {p["phase"] for p in self.phases}
        spans: dict[str, list] = {}
        for c in self.calls:
            phase = c.get("phase")
            if isinstance(phase, str) and phase in ("prefill", "decode") and phase not in recorded:
                span = spans.setdefault(phase, [c["t_start_ns"], c["t_decoded_ns"], 0])
                span[0], span[1] = min(span[0], c["t_start_ns"]), max(span[1], c["t_decoded_ns"])
                span[2] += phase == "decode" and c["method"] == "LMHead"
        for phase, (start, end, tokens) in spans.items():
            self.phases.append({"type": "phase", "phase": phase, "start_ns": start, "end_ns": end, "tokens": tokens,
                                "cut_short": True})
        self.phases.sort(key=lambda p: p["start_ns"])


def read_sidecar(path: str) -> Sidecar | None:
    """The sidecar `path` (a log's path + ".jsonl"), or None if there is none. A line cut short (a run
    that died between flushes) is skipped: what was written before it still counts."""
    try:
        f = open(path, encoding="utf-8", errors="replace")   # bytes that are not UTF-8 spoil their line, not the file
    except OSError:
        return None
    side = Sidecar({})
    with f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            kind = obj.get("type") if isinstance(obj, dict) else None
            if kind == "run" and not side.run:
                side.run = obj
            elif kind == "call" and _has_numbers(obj, CALL_NUMBERS) and isinstance(obj.get("method"), str):
                side.calls.append(obj)
            elif kind == "phase" and _has_numbers(obj, PHASE_NUMBERS) and isinstance(obj.get("phase"), str):
                side.phases.append(obj)   # (a record without its fields, a damaged line, is skipped like one cut short)
    side.add_cut_phases()
    return side


def _has_numbers(obj: dict, keys) -> bool:
    return all(type(obj.get(k)) is int for k in keys)


class PerfLog:
    """Observer of a client transport: writes the text log and the sidecar as calls end.

    Rows are kept in memory and written in batches (every FLUSH_ROWS rows, at the latest FLUSH_S after
    the oldest unwritten one, and at each phase's end): one formatted row and one write per call cost
    ~17 ms per decoded token on an H100 host (98 calls). `tail -f` still sees rows within a second.
    The formatting is done off the critical path: the transport calls `idle()` once it has rung a call's
    bell, and the rows of calls already finished are formatted while the daemon works on that one (~7 us a row
    on the 2-core machine; a reply that comes sooner waits for it, and its Recv includes it)."""

    FLUSH_ROWS = 256
    FLUSH_S = 0.5

    def __init__(self, path: str, label: str, run_info: dict):
        self.path = path
        self.sidecar_path = path + ".jsonl"
        self._text = open(path, "w", encoding="utf-8")
        self._side = open(self.sidecar_path, "w", encoding="utf-8")
        self.calls = 0
        self.phase = "init"
        self._pending: list[tuple[int, str, CallStats]] = []   # (id, phase, stats) not yet formatted
        self._rows: list[str] = []    # formatted, not yet written: text rows and sidecar records
        self._side_rows: list[str] = []
        self._oldest_pending = 0.0
        self._sums = [0.0] * 5
        self._bytes = [0, 0]
        self._text.write("\n".join(header_lines(label)) + "\n")
        self._text.flush()
        info = {"type": "run", "label": label, "started_unix": time.time(), "host": platform.node(),
                "python": platform.python_version(), **run_info}
        self._write_side(info)
        self._side.flush()

    def _write_side(self, obj: dict) -> None:
        self._side.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def __call__(self, s: CallStats) -> None:
        self.calls += 1
        if not self._pending and not self._rows:
            self._oldest_pending = time.monotonic()
        self._pending.append((self.calls, self.phase, s))
        if len(self._rows) + len(self._pending) >= self.FLUSH_ROWS or \
                time.monotonic() - self._oldest_pending >= self.FLUSH_S:
            self.flush()

    def idle(self) -> None:
        """Format the rows of the calls that have ended (the transport calls this while it waits for a reply)."""
        for call_id, phase, s in self._pending:
            self._rows.append(self._row(call_id, s))
            self._side_rows.append(self._call_record(call_id, phase, s))
        self._pending = []

    def flush(self) -> None:
        """Write every pending row to the text log and the sidecar."""
        self.idle()
        if self._rows:
            self._text.write("\n".join(self._rows) + "\n")
            self._side.write("".join(self._side_rows))
            self._rows, self._side_rows = [], []
        self._text.flush()
        self._side.flush()

    def _row(self, call_id: int, s: CallStats) -> str:
        ms = (s.serialize_ns / 1e6, s.send_ns / 1e6, s.recv_ns / 1e6, s.deserialize_ns / 1e6, s.total_ns / 1e6)
        sums = self._sums
        for i, v in enumerate(ms):
            sums[i] += v
        sent, recv, total = s.sent_bytes, s.recv_bytes, ms[4]
        self._bytes[0] += sent
        self._bytes[1] += recv
        return ROW_PERCENT % (call_id, s.method, *ms, sent / 1024, recv / 1024, throughput_mbps(sent, recv, total))

    @staticmethod
    def _call_record(call_id: int, phase: str, s: CallStats) -> str:
        return CALL_RECORD % (call_id, _json_str(s.method), s.layer, s.op, _json_str(phase), _json_str(s.transport),
                              s.t_start, s.t_encoded, s.t_sent, s.t_replied, s.t_decoded, s.sent_bytes,
                              s.recv_bytes, s.payload_sent, s.payload_recv, s.copy_in_ns, s.work_ns)

    def on_phase(self, name: str, start_ns: int, end_ns: int | None, tokens: int) -> None:
        """Phase observer of `generate`: a phase begins (end_ns None; its calls get its name) or ends."""
        if end_ns is None:
            self.phase = name
        else:
            self.mark_phase(name, start_ns, end_ns, tokens)

    def mark_phase(self, phase: str, start_ns: int, end_ns: int, tokens: int) -> None:
        self.flush()
        self._write_side({"type": "phase", "phase": phase, "start_ns": start_ns, "end_ns": end_ns, "tokens": tokens})
        self._side.flush()

    def close(self) -> None:
        if self._text.closed:
            return
        self.flush()
        self._text.write("\n".join(summary_lines(self.calls, *self._sums, *self._bytes)) + "\n")
        self._text.close()
        self._side.close()

    def __enter__(self) -> "PerfLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
