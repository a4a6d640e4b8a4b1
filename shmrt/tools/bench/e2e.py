"""End-to-end suite: prefill S random tokens then M decoded tokens, per transport, wire dtype and
K/V placement, with the daemon in its own process; the compute floor (the same enclave model and daemon
handler in one process, through the same rings, with no transport: host/inprocess.py) measured in the same run.

Each round is one `generate` (the same loop `shmrt run` uses); where the time goes comes from each
run's sidecar through shmrt.tools.breakdown (transport, enclave and daemon per phase).
"""
from __future__ import annotations

import itertools
import statistics

import torch

from ...enclave.client import EnclaveClient
from ...enclave.generate import Sampler, generate
from ...enclave.llama import EnclaveModel
from ...enclave.ops import RemoteOps
from ...enclave.sizing import ring_bytes_for
from ...host.compute import LinearCompute
from ...host.daemon import COMPUTE_DTYPES, ModelHandler
from ...host.inprocess import InProcessCaller
from ...host.weights import load_weights
from ...model.calls import score_width_step
from ...model.checkpoint import load_enclave_part
from ..breakdown import by_phase
from ..heap import freeze_heap
from ..perflog import read_sidecar


def sidecar_phases(path: str) -> list[dict]:
    """Per phase span in a sidecar: the breakdown's seconds (wall, transport, daemon, enclave and the
    stages), calls and bytes."""
    side = read_sidecar(path)
    return [b.as_dict() for b in by_phase(side.calls, side.phases)] if side else []


def _median_by(rows: list[dict], key: str) -> dict:
    """The row whose `key` is the median (keeps each row's breakdown consistent)."""
    ordered = sorted(rows, key=lambda r: r[key])
    return ordered[len(ordered) // 2]


def _rounds(model, ids, new: int, repeats: int, on_phase=None, decode_threads: int | None = None) -> list:
    """A warm-up round, then `repeats` measured ones: `generate` with new+1 samples (= `new` decode
    forwards). The warm-up's calls are labelled "warmup" and its phases are not recorded."""
    def warmup(name, start_ns, end_ns, tokens):
        if on_phase and end_ns is None:
            on_phase("warmup", start_ns, None, 0)

    return [generate(model, ids, new + 1, Sampler(), warmup if i == 0 else on_phase, decode_threads=decode_threads)
            for i in range(repeats + 1)][1:]


# The bench's transport labels: (transport, doorbell).
TRANSPORT_LABELS = {"msgpack": ("msgpack", "zmq"), "shm": ("shm", "shm"), "shm-zmqbell": ("shm", "zmq")}


def measure_transport(endpoint: str, source, label: str, wire: str, kv: str, prompt: int, new: int, repeats: int,
                      log_path: str, calls: str = "fewest", decode_threads: int | None = None) -> list[dict]:
    transport, doorbell = TRANSPORT_LABELS[label]
    ids = torch.randint(0, source.cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    with EnclaveClient(endpoint=endpoint, model=source, transport=transport, wire_dtype=wire, kv_cache=kv, timeout=600,
                       log_path=log_path, prompt_tokens=prompt, total_tokens=prompt + new + 1,
                       run_info={"bench": True}, calls=calls, doorbell=doorbell) as c, torch.inference_mode():
        freeze_heap()   # as `shmrt client` does once set up
        _rounds(c.model, ids, new, repeats, c.perflog.on_phase, decode_threads)
    phases = sidecar_phases(log_path + ".jsonl")
    return [_median_by([p for p in phases if p["phase"] == ph], "wall_s") | {
        "p10_s": min(p["wall_s"] for p in phases if p["phase"] == ph),
        "p90_s": max(p["wall_s"] for p in phases if p["phase"] == ph)} for ph in ("prefill", "decode")]


def measure_floor(model: str, device: str, dtype: str, layers, wire: str, kv: str, prompt: int, new: int,
                  repeats: int, weights=None, calls: str = "fewest", decode_threads: int | None = None) -> dict:
    w = weights or load_weights(model, layers=layers, dtype=COMPUTE_DTYPES[dtype], device=device)
    handler = ModelHandler(LinearCompute(w, device, COMPUTE_DTYPES[dtype]), model, "", log=lambda m: None)
    wire_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[wire]
    part = load_enclave_part(w.source)
    ids = torch.randint(0, w.cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    # The split's own ops, rings, graphs and padded scores, with the transport taken out (host/inprocess.py)
    ring = ring_bytes_for(part, prompt, prompt + new + 1, wire_dtype, kv, calls=calls)
    with InProcessCaller(handler, wire_dtype, ring) as caller, torch.inference_mode():
        # decode scores padded as a shm client of this daemon pads them (the Hello hint, read the client's way)
        m = EnclaveModel(part, RemoteOps(caller, w.cfg, wire_dtype), kv, calls,
                         score_step=score_width_step(handler.hello().get("score_width_step")))
        freeze_heap()   # as both sides of a split run do once set up (the first call in a process counts)
        # its K/V store restarts at pos 0, as the daemon's does; the client's decode threads apply where the
        # daemon's half runs on a GPU (on a CPU both halves share torch's threads: the floor keeps them all)
        runs = _rounds(m, ids, new, repeats, decode_threads=decode_threads if device.startswith("cuda") else None)
    return {"prefill": statistics.median(g.prefill_s for g in runs),
            "decode": statistics.median(g.decode_s for g in runs)}


def configurations(prompts, transports, wires, kvs):
    return list(itertools.product(prompts, transports, wires, kvs))
