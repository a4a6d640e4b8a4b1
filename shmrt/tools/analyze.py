"""`shmrt analyze`: reports on v2.4-format logs (v2.4's own and shmrt's), comparisons, plots.

Pure functions: load -> summarize -> format; `main()` only parses arguments. A v2.4 log may hold
several runs with restarting IDs and no marker: an ID that does not increase starts a new run.
Where shmrt's JSONL sidecar sits next to the log, the report and the plot add the breakdown
(tools/breakdown.py): per phase enclave / transport / daemon, and the transport by stage with the
daemon's work taken out of the wait. Without one (v2.4's own logs) the log alone is reported.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

from ..errors import ShmrtError
from ..units import format_bytes, mib
from .breakdown import STAGES as BREAKDOWN_STAGES, by_method as breakdown_by_method, by_phase, inside, per_call
from .perflog import COLUMNS, Sidecar, read_sidecar

HEADER_RE = re.compile(r"^ZeroMQ Performance Log - Transport: (\S+)\s*$")
STAGES = ("serialize_ms", "send_ms", "recv_ms", "deserialize_ms")


class LogError(ShmrtError):
    """The file is not a readable v2.4-format log."""


@dataclass
class Row:
    id: int
    method: str
    serialize_ms: float
    send_ms: float
    recv_ms: float
    deserialize_ms: float
    total_ms: float
    sent_bytes: int
    recv_bytes: int


@dataclass
class Run:
    log: str
    index: int
    transport: str
    rows: list[Row] = field(default_factory=list)
    sidecar: dict = field(default_factory=dict)  # the sidecar's run header, if any
    side: Sidecar | None = None                   # its calls and phases (the file's last run only)


# ---- load

def _parse_row(fields: list[str], where: str) -> Row:
    try:
        return Row(int(fields[0]), fields[1], *(float(f) for f in fields[2:7]),
                   round(float(fields[7]) * 1024), round(float(fields[8]) * 1024))
    except (ValueError, IndexError):
        raise LogError(f"{where}: malformed row (truncated file?)") from None


def load(path: str) -> list[Run]:
    """All runs in one log file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise LogError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LogError(f"{path}: is a directory, expected a zmq_performance.log") from None
    if not lines:
        raise LogError(f"{path}: empty file")
    m = HEADER_RE.match(lines[0])
    if not m:
        raise LogError(f"{path}: not a zmq_performance.log (line 1 should be 'ZeroMQ Performance Log - Transport: ...')")
    transport = m.group(1)
    side = read_sidecar(path + ".jsonl")
    sidecar = side.run if side else {}
    runs: list[Run] = []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or not fields[0].isdigit():
            continue
        if len(fields) < len(COLUMNS):
            raise LogError(f"{path}:{lineno}: row has {len(fields)} fields, expected {len(COLUMNS)} (truncated file?)")
        row = _parse_row(fields, f"{path}:{lineno}")
        if not runs or row.id <= runs[-1].rows[-1].id:
            runs.append(Run(path, len(runs), transport, sidecar=sidecar))
        runs[-1].rows.append(row)
    if not runs:
        raise LogError(f"{path}: header found but no call rows")
    runs[-1].side = side  # shmrt writes one run per file; v2.4's several-run files have no sidecar
    return runs


# ---- summarize

def summarize(run: Run) -> dict:
    rows = run.rows
    by_method: dict[str, dict] = {}
    for r in rows:
        m = by_method.setdefault(r.method, {"calls": 0, "total_ms": 0.0, **{s: 0.0 for s in STAGES},
                                            "sent_bytes": 0, "recv_bytes": 0})
        m["calls"] += 1
        m["total_ms"] += r.total_ms
        for s in STAGES:
            m[s] += getattr(r, s)
        m["sent_bytes"] += r.sent_bytes
        m["recv_bytes"] += r.recv_bytes
    total_ms = sum(r.total_ms for r in rows)
    sent, recv = sum(r.sent_bytes for r in rows), sum(r.recv_bytes for r in rows)
    return {
        "log": run.log, "run": run.index, "transport": run.transport, "calls": len(rows),
        "total_ms": total_ms, **{s: sum(getattr(r, s) for r in rows) for s in STAGES},
        "sent_bytes": sent, "recv_bytes": recv,
        "throughput_mib_s": mib(sent + recv) / (total_ms / 1000) if total_ms else 0.0,
        "by_method": by_method,
        "slowest": [vars(r) for r in sorted(rows, key=lambda r: -r.total_ms)[:5]],
        "largest": [vars(r) for r in sorted(rows, key=lambda r: -(r.sent_bytes + r.recv_bytes))[:5]],
        "wire_dtype": run.sidecar.get("wire_dtype"), "kv_cache": run.sidecar.get("kv_cache"),
        **_sidecar_breakdown(run.side),
    }


def _sidecar_breakdown(side: Sidecar | None) -> dict:
    """The breakdown per phase span and per method (seconds, as tools/breakdown.py gives them)."""
    if side is None or not side.calls:
        return {"phases": [], "method_stages": {}, "decode_calls": []}
    phases = by_phase(side.calls, side.phases)
    decode = [c for p in side.phases if p["phase"] == "decode" for c in inside(side.calls, p)]
    return {"phases": [b.as_dict() | ({"per_token": b.per_token().as_dict()} if b.phase == "decode" and b.tokens
                                      else {}) | ({"cut_short": True} if p.get("cut_short") else {})
                       for b, p in zip(phases, side.phases)],
            "method_stages": {m: b.as_dict() for m, b in breakdown_by_method(side.calls).items()},
            "decode_calls": [asdict(m) for m in per_call(decode)]}


def recommendations(s: dict) -> list[str]:
    """Advice derived from the numbers, each naming the shmrt flag that would help."""
    out = []
    total = s["total_ms"] or 1e-9
    ser_share = (s["serialize_ms"] + s["deserialize_ms"]) / total
    shm = s["transport"].startswith("SHM")
    if not shm and ser_share > 0.05:
        out.append(f"(de)serialization is {100 * ser_share:.0f}% of call time: tensors are packed into msgpack; "
                   "`--transport shm` moves them through shared memory instead")
    mib_per_call = mib(s["sent_bytes"] + s["recv_bytes"]) / max(s["calls"], 1)
    if s.get("wire_dtype") in (None, "float32") and mib_per_call > 0.25:
        out.append(f"{mib_per_call:.2f} MiB move per call{' in float32' if s.get('wire_dtype') else ''}: "
                   "`--wire-dtype bfloat16` halves the bytes (logits stay float32)")
    if s.get("kv_cache") == "client":
        out.append("K/V travel with every Q*K^T and P*V call (client-side cache): `--kv-cache daemon` "
                   "sends only the new rows")
    if s["recv_ms"] / total > 0.7:
        out.append(f"waiting for the daemon is {100 * s['recv_ms'] / total:.0f}% of call time: the daemon's "
                   "compute dominates; `shmrt daemon --device cuda` (and `--dtype bfloat16`) speeds it up")
    per_call = total / max(s["calls"], 1)
    if per_call < 1.0 and s["calls"] > 50:
        out.append(f"{s['calls']} calls averaging {per_call:.3f} ms: per-call overhead dominates; larger "
                   "prompts (--prefill) amortize it")
    return out or ["no obvious bottleneck in the transport"]


# ---- format

def _ms(v: float) -> str:
    return f"{v:10.3f}"


def format_report(s: dict, runs_in_file: int) -> str:
    total = s["total_ms"] or 1e-9
    lines = [f"== {s['log']}" + (f" (run {s['run'] + 1} of {runs_in_file})" if runs_in_file > 1 else ""),
             f"transport: {s['transport']}" + (f", wire {s['wire_dtype']}" if s.get("wire_dtype") else "")
             + (f", kv-cache {s['kv_cache']}" if s.get("kv_cache") else ""),
             "", "Overall",
             f"  calls              {s['calls']}",
             f"  total time         {s['total_ms']:.3f} ms ({total / max(s['calls'], 1):.3f} ms/call)",
             f"  data sent          {format_bytes(s['sent_bytes'], 2)}",
             f"  data received      {format_bytes(s['recv_bytes'], 2)}",
             f"  throughput         {s['throughput_mib_s']:.2f} MiB/s",
             "", "Time breakdown"]
    for stage in STAGES:
        lines.append(f"  {stage[:-3]:<14} {_ms(s[stage])} ms  {100 * s[stage] / total:5.1f}%")
    w = max([12] + [len(name) for name in s["by_method"]])   # v2.4's width, wider for shmrt's longer names
    lines += ["", "By method",
              f"  {'method':<{w}} {'calls':>6} {'total ms':>10} {'avg ms':>9} {'ser ms':>9} {'recv ms':>9} "
              f"{'sent MiB':>9} {'recv MiB':>9} {'share':>6}"]
    for name, m in sorted(s["by_method"].items(), key=lambda kv: -kv[1]["total_ms"]):
        lines.append(f"  {name:<{w}} {m['calls']:>6} {m['total_ms']:>10.3f} {m['total_ms'] / m['calls']:>9.3f} "
                     f"{m['serialize_ms']:>9.3f} {m['recv_ms']:>9.3f} {mib(m['sent_bytes']):>9.2f} "
                     f"{mib(m['recv_bytes']):>9.2f} {100 * m['total_ms'] / total:>5.1f}%")
    lines += ["", "Top 5 slowest calls"]
    lines += [f"  #{r['id']:<5} {r['method']:<12} {r['total_ms']:>10.3f} ms" for r in s["slowest"]]
    lines += ["", "Top 5 largest calls"]
    lines += [f"  #{r['id']:<5} {r['method']:<12} {format_bytes(r['sent_bytes'] + r['recv_bytes'], 2):>12}"
              for r in s["largest"]]
    lines += format_breakdown(s)
    lines += ["", "Recommendations"] + [f"  - {r}" for r in recommendations(s)]
    return "\n".join(lines)


def format_breakdown(s: dict) -> list[str]:
    """The sidecar's breakdown: each phase span three ways, then its calls by stage (ms)."""
    if not s["phases"]:
        return []
    lines = ["", "Where the time went (sidecar; enclave + transport + daemon = wall)",
             f"  {'phase':<12} {'tokens':>6} {'wall ms':>10} {'enclave ms':>11} {'transport ms':>13} "
             f"{'daemon ms':>10} {'calls':>6}"]
    for p in s["phases"]:
        if p.get("cut_short"):
            lines.append(f"  ({p['phase']}: the run ended before this phase did: no record of its span, taken from "
                         f"its calls{'; tokens = its steps' if p['phase'] == 'decode' else ''})")
        per = [p] + ([p["per_token"]] if "per_token" in p else [])
        for q, label in zip(per, (p["phase"], "  a token")):
            lines.append(f"  {label:<12} {p['tokens'] if q is p else '':>6} {1e3 * q['wall_s']:>10.3f} "
                         f"{1e3 * q['enclave_s']:>11.3f} {1e3 * q['transport_s']:>13.3f} {1e3 * q['daemon_s']:>10.3f} "
                         f"{p['calls'] if q is p else '':>6}".rstrip())
    lines += ["", "Transport by stage (ms; wait = recv - daemon work)",
              f"  {'phase':<12} " + " ".join(f"{st:>9}" for st in BREAKDOWN_STAGES) + f" {'daemon':>9}"]
    for p in s["phases"]:
        lines.append(f"  {p['phase']:<12} " + " ".join(f"{1e3 * p[st + '_s']:>9.3f}" for st in BREAKDOWN_STAGES)
                     + f" {1e3 * p['daemon_s']:>9.3f}")
    if s["decode_calls"]:
        lines += ["", "Decode, each kind of call (us, medians; enclave = its math since the previous call returned)",
                  f"  {'call':<24} {'calls':>6} {'enclave':>9} " + " ".join(f"{st:>9}" for st in BREAKDOWN_STAGES)
                  + f" {'daemon':>9}"]
        for m in s["decode_calls"]:
            lines.append(f"  {m['label']:<24} {m['calls']:>6} {m['enclave_us']:>9.1f} "
                         + " ".join(f"{m[st + '_us']:>9.1f}" for st in BREAKDOWN_STAGES) + f" {m['daemon_us']:>9.1f}")
    return lines


def format_comparison(a: dict, b: dict) -> str:
    def speedup(x, y):
        return f"{x / y:8.2f}x" if y > 0 else "       -"

    lines = [f"== comparison: A = {a['log']} ({a['transport']}), B = {b['log']} ({b['transport']})",
             f"  {'':<14} {'A ms':>11} {'B ms':>11} {'B speedup':>10} {'A MiB':>9} {'B MiB':>9}"]
    methods = sorted(set(a["by_method"]) | set(b["by_method"]),
                     key=lambda m: -a["by_method"].get(m, {}).get("total_ms", 0))
    for m in methods:
        x, y = a["by_method"].get(m, {}), b["by_method"].get(m, {})
        xa, ya = x.get("total_ms", 0.0), y.get("total_ms", 0.0)
        xb = mib(x.get("sent_bytes", 0) + x.get("recv_bytes", 0))
        yb = mib(y.get("sent_bytes", 0) + y.get("recv_bytes", 0))
        lines.append(f"  {m:<14} {xa:>11.3f} {ya:>11.3f} {speedup(xa, ya):>10} {xb:>9.2f} {yb:>9.2f}")
    for stage in ("total_ms",) + STAGES:
        lines.append(f"  {('overall' if stage == 'total_ms' else stage[:-3]):<14} {a[stage]:>11.3f} "
                     f"{b[stage]:>11.3f} {speedup(a[stage], b[stage]):>10}")
    lines.append(f"  {'calls':<14} {a['calls']:>11} {b['calls']:>11}")
    return "\n".join(lines)


def json_record(s: dict) -> dict:
    keys = ("log", "run", "transport", "calls", "total_ms", *STAGES, "sent_bytes", "recv_bytes")
    return {**{k: s[k] for k in keys},
            "by_method": {m: {"calls": v["calls"], "total_ms": v["total_ms"]} for m, v in s["by_method"].items()},
            **({"phases": s["phases"]} if s["phases"] else {}),
            **({"decode_calls": s["decode_calls"]} if s["decode_calls"] else {})}


PLOT_MISSING = "--plot needs matplotlib: pip install 'shmrt[plot]' (or pip install matplotlib)"
STAGE_COLORS = {"serialize": "#4477aa", "send": "#ee6677", "recv": "#ccbb44", "deserialize": "#228833",
                "encode": "#4477aa", "doorbell": "#ee6677", "wait": "#ccbb44", "decode": "#228833",
                "daemon": "#aa3377", "enclave": "#bbbbbb"}


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ShmrtError(PLOT_MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _method_stages(s: dict) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Per method, ms by stage: with a sidecar the daemon's work comes out of the wait; without one,
    the log's four columns (recv then holds the daemon's work)."""
    if s["method_stages"]:
        names = BREAKDOWN_STAGES[:3] + ("daemon",) + BREAKDOWN_STAGES[3:]
        return list(names), {m: {n: 1e3 * b[n + "_s"] for n in names} for m, b in s["method_stages"].items()}
    names = [st[:-3] for st in STAGES]
    return names, {m: {st[:-3]: v[st] for st in STAGES} for m, v in s["by_method"].items()}


def _stack(ax, labels: list[str], parts: list[tuple[str, list[float]]]) -> None:
    bottom = [0.0] * len(labels)
    for name, values in parts:
        values = [max(v, 0.0) for v in values]
        ax.bar(labels, values, bottom=bottom, color=STAGE_COLORS[name], label=name)
        bottom = [b + v for b, v in zip(bottom, values)]


def plot(summaries: list[dict], out: str) -> None:
    """Row 1, per log: stage times summed per method. Row 2, for logs with a sidecar: each phase span
    split into enclave, the transport's stages and the daemon's work."""
    plt = _require_matplotlib()
    with_phases = [s for s in summaries if s["phases"]]
    rows = 2 if with_phases else 1
    fig, axes = plt.subplots(rows, len(summaries), figsize=(5 * len(summaries), 4 * rows), squeeze=False)
    for ax, s in zip(axes[0], summaries):
        names, per_method = _method_stages(s)
        methods = sorted(per_method)
        _stack(ax, methods, [(n, [per_method[m][n] for m in methods]) for n in names])
        ax.set_title(f"{os.path.basename(s['log'])} ({s['transport']})", fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.set_ylabel("time per stage, summed (ms)")
        ax.legend(fontsize=7)
    for ax, s in zip(axes[1] if rows == 2 else [], summaries):
        if not s["phases"]:
            ax.set_axis_off()
            continue
        labels = [f"{i + 1}. {p['phase']}" for i, p in enumerate(s["phases"])]
        names = ("enclave",) + BREAKDOWN_STAGES + ("daemon",)
        _stack(ax, labels, [(n, [1e3 * p[n + "_s"] for p in s["phases"]]) for n in names])
        ax.set_title(f"{os.path.basename(s['log'])}: phases", fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.set_ylabel("wall time (ms)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


# ---- command line

def add_analyze_args(p) -> None:
    p.add_argument("logs", nargs="+", metavar="LOG", help="zmq_performance.log files")
    p.add_argument("--json", action="store_true", help="print {'runs': [...]} as JSON instead of the report")
    p.add_argument("--plot", metavar="PNG", help="stacked stage times per method, one panel per log")


def main(args) -> int:
    if args.plot:
        _require_matplotlib()  # before any output: a missing extra is one line, not a traceback at the end
    per_log = [load(path) for path in args.logs]
    summaries = [[summarize(r) for r in runs] for runs in per_log]
    measured = [s[-1] for s in summaries]  # the last run of a file is the measured one (v2.4 convention)
    if args.json:
        print(json.dumps({"runs": [json_record(s) for group in summaries for s in group]}, indent=1))
    else:
        for group in summaries:
            for s in group:
                print(format_report(s, len(group)))
                print()
        for other in measured[1:]:
            print(format_comparison(measured[0], other))
            print()
    if args.plot:
        plot(measured, args.plot)
        if not args.json:
            print(f"plot: {args.plot}")
    return 0
