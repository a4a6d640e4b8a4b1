"""End-to-end suite: prefill S random tokens then M decoded tokens, per transport, wire dtype and
K/V placement, with the daemon in its own process; the compute floor (the same enclave and daemon
ops in one process, no transport) measured in the same run.

Where the time goes comes from each run's sidecar: per phase, transport = sum(call time - daemon
work), daemon compute = sum(daemon work), enclave compute = phase wall time - sum(call time).
"""
from __future__ import annotations

import itertools
import json
import statistics

import torch

from ...enclave.client import EnclaveClient
from ...host.compute import LinearCompute
from ...host.daemon import COMPUTE_DTYPES
from ...enclave.generate import Sampler, decode_n, prefill
from ...enclave.llama import EnclaveModel
from ...wire.native import now_ns
from ...host.local_ops import LocalOps
from ...host.weights import load_weights
from ...model.checkpoint import load_enclave_part


def sidecar_phases(path: str) -> list[dict]:
    """Per phase span in a sidecar: wall, transport, daemon and enclave seconds, calls and bytes."""
    calls, phases = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            (calls if obj.get("type") == "call" else phases if obj.get("type") == "phase" else []).append(obj)
    out = []
    for ph in phases:
        inside = [c for c in calls if ph["start_ns"] <= c["t_start_ns"] and c["t_decoded_ns"] <= ph["end_ns"]]
        rpc = sum(c["t_decoded_ns"] - c["t_start_ns"] for c in inside) / 1e9
        daemon = sum(c["daemon_work_ns"] for c in inside) / 1e9
        wall = (ph["end_ns"] - ph["start_ns"]) / 1e9
        out.append({"phase": ph["phase"], "tokens": ph["tokens"], "wall_s": wall, "transport_s": rpc - daemon,
                    "daemon_s": daemon, "enclave_s": wall - rpc, "calls": len(inside),
                    "sent_bytes": sum(c["sent_bytes"] for c in inside),
                    "recv_bytes": sum(c["recv_bytes"] for c in inside)})
    return out


def _median_by(rows: list[dict], key: str) -> dict:
    """The row whose `key` is the median (keeps each row's breakdown consistent)."""
    ordered = sorted(rows, key=lambda r: r[key])
    return ordered[len(ordered) // 2]


def measure_transport(endpoint: str, source, transport: str, wire: str, kv: str, prompt: int, new: int, repeats: int,
                      log_path: str) -> list[dict]:
    ids = torch.randint(0, source.cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    with EnclaveClient(endpoint=endpoint, model=source, transport=transport, wire_dtype=wire, kv_cache=kv, timeout=600,
                       log_path=log_path, prompt_tokens=prompt, total_tokens=prompt + new + 1,
                       run_info={"bench": True}) as c, torch.inference_mode():
        log = c.perflog
        for i in range(repeats + 1):  # the first round is the warm-up
            log.phase = "warmup" if i == 0 else "prefill"
            t0 = now_ns()
            logits = prefill(c.model, ids)
            t1 = now_ns()
            log.phase = "warmup" if i == 0 else "decode"
            decode_n(c.model, logits, new + 1, Sampler())   # new+1 samples = `new` forwards
            t2 = now_ns()
            if i:
                log.mark_phase("prefill", t0, t1, prompt)
                log.mark_phase("decode", t1, t2, new)
    phases = sidecar_phases(log_path + ".jsonl")
    return [_median_by([p for p in phases if p["phase"] == ph], "wall_s") | {
        "p10_s": min(p["wall_s"] for p in phases if p["phase"] == ph),
        "p90_s": max(p["wall_s"] for p in phases if p["phase"] == ph)} for ph in ("prefill", "decode")]


def measure_floor(model: str, device: str, dtype: str, layers, wire: str, kv: str, prompt: int, new: int,
                  repeats: int, weights=None) -> dict:
    w = weights or load_weights(model, layers=layers, dtype=COMPUTE_DTYPES[dtype], device=device)
    compute = LinearCompute(w, device, COMPUTE_DTYPES[dtype])
    wire_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[wire]
    m = EnclaveModel(load_enclave_part(w.source), LocalOps(compute, wire_dtype), kv)
    ids = torch.randint(0, w.cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    pre, dec = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            m.ops.kv = m.ops.c.new_kv_store()
            t0 = now_ns()
            logits = prefill(m, ids)
            t1 = now_ns()
            decode_n(m, logits, new + 1, Sampler())
            t2 = now_ns()
            if i:
                pre.append((t1 - t0) / 1e9)
                dec.append((t2 - t1) / 1e9)
    return {"prefill": statistics.median(pre), "decode": statistics.median(dec)}


def configurations(prompts, transports, wires, kvs):
    return list(itertools.product(prompts, transports, wires, kvs))
