"""`shmrt analyze`: reports on v2.4-format logs (v2.4's own and shmrt's), comparisons, plots.

Pure functions: load -> summarize -> format; `main()` only parses arguments. A v2.4 log may hold
several runs with restarting IDs and no marker: an ID that does not increase starts a new run.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import ShmrtError
from .perflog import COLUMNS

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
    sidecar = _sidecar_header(path)
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
    return runs


def _sidecar_header(path: str) -> dict:
    try:
        with open(path + ".jsonl", encoding="utf-8") as f:
            first = json.loads(f.readline())
        return first if isinstance(first, dict) and first.get("type") == "run" else {}
    except (OSError, ValueError):
        return {}


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
        "throughput_mib_s": (sent + recv) / 2**20 / (total_ms / 1000) if total_ms else 0.0,
        "by_method": by_method,
        "slowest": [vars(r) for r in sorted(rows, key=lambda r: -r.total_ms)[:5]],
        "largest": [vars(r) for r in sorted(rows, key=lambda r: -(r.sent_bytes + r.recv_bytes))[:5]],
        "wire_dtype": run.sidecar.get("wire_dtype"), "kv_cache": run.sidecar.get("kv_cache"),
    }


def recommendations(s: dict) -> list[str]:
    """Advice derived from the numbers, each naming the shmrt flag that would help."""
    out = []
    total = s["total_ms"] or 1e-9
    ser_share = (s["serialize_ms"] + s["deserialize_ms"]) / total
    shm = s["transport"].startswith("SHM")
    if not shm and ser_share > 0.05:
        out.append(f"(de)serialization is {100 * ser_share:.0f}% of call time: tensors are packed into msgpack; "
                   "`--transport shm` moves them through shared memory instead")
    mib_per_call = (s["sent_bytes"] + s["recv_bytes"]) / 2**20 / max(s["calls"], 1)
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
             f"  data sent          {s['sent_bytes'] / 2**20:.2f} MiB",
             f"  data received      {s['recv_bytes'] / 2**20:.2f} MiB",
             f"  throughput         {s['throughput_mib_s']:.2f} MiB/s",
             "", "Time breakdown"]
    for stage in STAGES:
        lines.append(f"  {stage[:-3]:<14} {_ms(s[stage])} ms  {100 * s[stage] / total:5.1f}%")
    lines += ["", "By method",
              f"  {'method':<12} {'calls':>6} {'total ms':>10} {'avg ms':>9} {'ser ms':>9} {'recv ms':>9} "
              f"{'sent MiB':>9} {'recv MiB':>9} {'share':>6}"]
    for name, m in sorted(s["by_method"].items(), key=lambda kv: -kv[1]["total_ms"]):
        lines.append(f"  {name:<12} {m['calls']:>6} {m['total_ms']:>10.3f} {m['total_ms'] / m['calls']:>9.3f} "
                     f"{m['serialize_ms']:>9.3f} {m['recv_ms']:>9.3f} {m['sent_bytes'] / 2**20:>9.2f} "
                     f"{m['recv_bytes'] / 2**20:>9.2f} {100 * m['total_ms'] / total:>5.1f}%")
    lines += ["", "Top 5 slowest calls"]
    lines += [f"  #{r['id']:<5} {r['method']:<12} {r['total_ms']:>10.3f} ms" for r in s["slowest"]]
    lines += ["", "Top 5 largest calls"]
    lines += [f"  #{r['id']:<5} {r['method']:<12} {(r['sent_bytes'] + r['recv_bytes']) / 2**20:>10.2f} MiB"
              for r in s["largest"]]
    lines += ["", "Recommendations"] + [f"  - {r}" for r in recommendations(s)]
    return "\n".join(lines)


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
        xb = (x.get("sent_bytes", 0) + x.get("recv_bytes", 0)) / 2**20
        yb = (y.get("sent_bytes", 0) + y.get("recv_bytes", 0)) / 2**20
        lines.append(f"  {m:<14} {xa:>11.3f} {ya:>11.3f} {speedup(xa, ya):>10} {xb:>9.2f} {yb:>9.2f}")
    for stage in ("total_ms",) + STAGES:
        lines.append(f"  {('overall' if stage == 'total_ms' else stage[:-3]):<14} {a[stage]:>11.3f} "
                     f"{b[stage]:>11.3f} {speedup(a[stage], b[stage]):>10}")
    lines.append(f"  {'calls':<14} {a['calls']:>11} {b['calls']:>11}")
    return "\n".join(lines)


def json_record(s: dict) -> dict:
    keys = ("log", "run", "transport", "calls", "total_ms", *STAGES, "sent_bytes", "recv_bytes")
    return {**{k: s[k] for k in keys},
            "by_method": {m: {"calls": v["calls"], "total_ms": v["total_ms"]} for m, v in s["by_method"].items()}}


def plot(summaries: list[dict], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5 * len(summaries), 4), squeeze=False, sharey=True)
    colors = ("#4477aa", "#ee6677", "#228833", "#ccbb44")
    for ax, s in zip(axes[0], summaries):
        methods = sorted(s["by_method"])
        bottom = [0.0] * len(methods)
        for stage, color in zip(STAGES, colors):
            values = [s["by_method"][m][stage] for m in methods]
            ax.bar(methods, values, bottom=bottom, color=color, label=stage[:-3])
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(f"{os.path.basename(s['log'])} ({s['transport']})", fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    axes[0][0].set_ylabel("time per stage, summed (ms)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


# ---- command line

def add_analyze_args(p) -> None:
    p.add_argument("logs", nargs="+", metavar="LOG", help="zmq_performance.log files")
    p.add_argument("--json", action="store_true", help="print {'runs': [...]} as JSON instead of the report")
    p.add_argument("--plot", metavar="PNG", help="stacked stage times per method, one panel per log")


def main(args) -> int:
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
