"""Run the e2e configurations and write results.json, results.md and PNG plots."""
from __future__ import annotations

import json
import os
import pathlib

from ... import settings
from ..process import DaemonProcess, daemon_argv
from ...host.weights import load_weights
from ...model.checkpoint import resolve_model
from ...units import format_bytes, mib
from ...host.daemon import COMPUTE_DTYPES
from ..breakdown import STAGES
from ...errors import ShmrtError
from .e2e import TRANSPORT_LABELS, configurations, measure_floor, measure_transport
from .micro import MICRO_COLUMNS, micro_rows


def run_e2e(args, out: pathlib.Path, machine: str, progress) -> list[dict]:
    quick = args.quick
    model = "tiny" if quick and args.model == "small" else args.model
    prompts = [32] if quick else [int(p) for p in args.prompts.split(",")]
    new = 4 if quick else args.new_tokens
    repeats = max(args.repeats or 3, 3)
    source = resolve_model(model, args.layers)
    transports = args.transports.split(",")
    unknown = [t for t in transports if t not in TRANSPORT_LABELS]
    if unknown:
        raise ShmrtError(f"--transports {','.join(unknown)}: expected some of {','.join(TRANSPORT_LABELS)}")
    configs = configurations(prompts, transports, args.wire_dtypes.split(","), args.kv_caches.split(","))
    endpoint = f"ipc://{settings.runtime_dir() / f'bench-e2e-{os.getpid()}.sock'}"
    records = []
    common = {"suite": "e2e", "machine": machine, "model": model, "device": args.device, "dtype": args.dtype,
              "call_set": args.calls, "decode_threads": args.decode_threads or "default"}
    with DaemonProcess(daemon_argv(model, args.device, args.dtype, args.layers), endpoint, quiet=True):
        for i, (prompt, transport, wire, kv) in enumerate(configs):
            progress(i, len(configs), f"{transport} {wire} kv={kv} S={prompt}")
            log = str(out / f"{transport}-{wire}-kv{kv}-s{prompt}.log")
            for ph in measure_transport(endpoint, source, transport, wire, kv, prompt, new, repeats, log, args.calls,
                                        args.decode_threads or None):
                records.append({**common, "transport": transport, "wire_dtype": wire, "kv_cache": kv,
                                "prompt": prompt, "phase": ph["phase"], "tokens": ph["tokens"],
                                "median_s": ph["wall_s"], "p10_s": ph["p10_s"], "p90_s": ph["p90_s"],
                                "transport_s": ph["transport_s"], "enclave_s": ph["enclave_s"],
                                "daemon_s": ph["daemon_s"], **{f"stage_{st}_s": ph[f"{st}_s"] for st in STAGES},
                                "calls": ph["calls"],
                                "sent_bytes": ph["sent_bytes"], "recv_bytes": ph["recv_bytes"], "log": log})
    # The floor: the same ops and rings in this process, no transport (daemon stopped, so it has the cores).
    weights = load_weights(model, layers=args.layers, dtype=COMPUTE_DTYPES[args.dtype], device=args.device)
    floors = {}
    for prompt, wire, kv in sorted({(p, w, k) for p, _, w, k in configs}):
        floors[(prompt, wire, kv)] = measure_floor(model, args.device, args.dtype, args.layers, wire, kv, prompt,
                                                   new, repeats, weights, args.calls, args.decode_threads or None)
        for phase in ("prefill", "decode"):
            records.append({**common, "transport": "floor", "wire_dtype": wire, "kv_cache": kv, "prompt": prompt,
                            "phase": phase, "tokens": prompt if phase == "prefill" else new,
                            "median_s": floors[(prompt, wire, kv)][phase], "transport_s": 0.0, "calls": 0,
                            "sent_bytes": 0, "recv_bytes": 0})
    for r in records:
        r["floor_s"] = floors[(r["prompt"], r["wire_dtype"], r["kv_cache"])][r["phase"]]
    progress(len(configs), len(configs), "done")
    return records


# ---- output

def _e2e_table(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["suite"] == "e2e"]
    lines = ["| S | phase | transport | wire | kv | median s | transport s (%) | enclave s | daemon s | floor s "
             "| x floor | calls | MiB sent | MiB recv |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["prompt"], r["phase"] != "prefill", r["wire_dtype"], r["kv_cache"], r["transport"])  # noqa
    for r in sorted(rows, key=key):
        share = 100 * r["transport_s"] / r["median_s"] if r["median_s"] else 0
        lines.append(f"| {r['prompt']} | {r['phase']} ({r['tokens']}) | {r['transport']} | {r['wire_dtype']} | "
                     f"{r['kv_cache']} | {r['median_s']:.4f} | {r['transport_s']:.4f} ({share:.1f}%) | "
                     f"{r.get('enclave_s', 0):.4f} | {r.get('daemon_s', 0):.4f} | {r['floor_s']:.4f} | "
                     f"{r['median_s'] / r['floor_s']:.2f} | {r['calls']} | {mib(r['sent_bytes']):.1f} | "
                     f"{mib(r['recv_bytes']):.1f} |")
    lines += ["", "per decoded token (ms): enclave math between calls, then the transport's stages, and the daemon's "
              "work (from the sidecar):", "",
              "| S | transport | wire | kv | ms/token | enclave | encode | doorbell | wait | decode | daemon | floor |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["phase"] == "decode" and r["transport"] != "floor"), key=key):
        n = 1e3 / max(r["tokens"], 1)
        lines.append(f"| {r['prompt']} | {r['transport']} | {r['wire_dtype']} | {r['kv_cache']} | {r['median_s'] * n:.2f} | "
                     f"{r.get('enclave_s', 0) * n:.2f} | " + " | ".join(f"{r.get(f'stage_{st}_s', 0) * n:.2f}" for st in STAGES)
                     + f" | {r.get('daemon_s', 0) * n:.2f} | {r['floor_s'] * n:.2f} |")
    index = {(r["prompt"], r["phase"], r["wire_dtype"], r["kv_cache"], r["transport"]): r for r in rows}
    for base in ("msgpack", "shm-zmqbell"):
        pairs = [(key, r) for key, r in sorted(index.items()) if key[4] == "shm" and key[:4] + (base,) in index]
        if not pairs:
            continue
        lines += ["", f"shm vs {base} (same configuration, same run):", "",
                  f"| S | phase | wire | kv | {base} s | shm s | shm speedup | shm x floor | ms/token ({base}) "
                  "| ms/token (shm) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for (p, ph, w, k, _), r in pairs:
            m = index[(p, ph, w, k, base)]
            n = max(r["tokens"], 1)
            lines.append(f"| {p} | {ph} | {w} | {k} | {m['median_s']:.4f} | {r['median_s']:.4f} | "
                         f"{m['median_s'] / r['median_s']:.2f}x | {r['median_s'] / r['floor_s']:.2f} | "
                         f"{1e3 * m['median_s'] / n:.2f} | {1e3 * r['median_s'] / n:.2f} |")
    return lines


def _micro_table(records: list[dict]) -> list[str]:
    rows = micro_rows([r for r in records if r["suite"] == "micro"])
    if not rows:
        return []
    lines = ["| size | " + " | ".join(f"{c} us" for c in MICRO_COLUMNS) + " | shm / floor-shm | shm-zmqbell / floor-zmq "
             "| msgpack / shm |", "|---" * (len(MICRO_COLUMNS) + 4) + "|"]
    k = len(MICRO_COLUMNS)
    for n, *vals in rows:
        lines.append(f"| {format_bytes(n)} | " + " | ".join(f"{v * 1e6:.1f}" for v in vals[:k])
                     + f" | {vals[k]:.2f}x | {vals[k + 1]:.2f}x | {vals[k + 2]:.1f}x |")
    cpus = next((r.get("cpus") for r in records if r["suite"] == "micro"), None)
    return lines + ["", f"Client on CPU {cpus[0]}, every echo side on CPU {cpus[1]}." if cpus
                    else "Processes where the scheduler put them (not pinned)."]


def write_results(records: list[dict], out: pathlib.Path, machine: str) -> None:
    (out / "results.json").write_text(json.dumps(records, indent=1))
    lines = ["# shmrt bench results", "", f"Machine: {machine}", ""]
    micro = _micro_table(records)
    if micro:
        lines += ["## micro: echo round trip of one float32 tensor (median)", "",
                  "shm: tensors in the rings, doorbell in shared memory; shm-zmqbell: the same rings, a ZeroMQ "
                  "doorbell per call. floor-shm / floor-zmq = two memcpys of the size (C helper), made where a "
                  "transport makes them (one into shared memory, one in the other process from there into a second "
                  "shared area), around a bare round trip of that signalling (a word through shared memory / a "
                  "64-byte ZeroMQ message), same run; copies = the two memcpys in one process.",
                  ""] + micro + [""]
    if any(r["suite"] == "e2e" for r in records):
        e2e = [r for r in records if r["suite"] == "e2e"]
        lines += [f"## e2e: {e2e[0]['model']} on {e2e[0]['device']} ({e2e[0]['dtype']})", "",
                  "median of the repeats after a warm-up; transport / enclave / daemon split from the sidecar; "
                  "floor = the same enclave model and daemon handler in one process, through the same rings (and, on "
                  "CUDA, the same graphs), with no transport.", ""] + _e2e_table(records)
        plot_e2e(e2e, out)
        lines += ["", "![e2e breakdown](e2e.png)"]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot_e2e(rows: list[dict], out: pathlib.Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in rows if r["transport"] != "floor"]
    panels = sorted({(r["prompt"], r["phase"]) for r in rows}, key=lambda k: (k[0], k[1] != "prefill"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (prompt, phase) in zip(axes[0], panels):
        sel = sorted((r for r in rows if (r["prompt"], r["phase"]) == (prompt, phase)),
                     key=lambda r: (r["wire_dtype"], r["kv_cache"], r["transport"]))
        labels = [f"{r['transport']}\n{r['wire_dtype'][:4]} {r['kv_cache'][:3]}" for r in sel]
        bottom = [0.0] * len(sel)
        for key, color in (("daemon_s", "#228833"), ("enclave_s", "#4477aa"), ("transport_s", "#ee6677")):
            vals = [max(r.get(key, 0.0), 0.0) for r in sel]
            ax.bar(labels, vals, bottom=bottom, color=color, label=key[:-2])
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.scatter(labels, [r["floor_s"] for r in sel], marker="_", s=300, color="black", label="floor", zorder=3)
        ax.set_title(f"S={prompt} {phase}", fontsize=9)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_ylabel("seconds")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "e2e.png", dpi=80)
    plt.close(fig)
