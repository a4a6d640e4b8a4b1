"""The daemon's per-call cost, in process: `ModelHandler.handle` and the tests' reference `LocalOps` for decode-shaped
requests (one token, a K/V cache of --context positions), per method, in microseconds per call.

No transport, no client: request tensors are plain CPU tensors and the reply buffers slices of one
preallocated arena (as a ring's would be), so what is timed is the daemon's own work: dispatch, checks,
the K/V append, the products and the copies into the reply.

    PYTHONPATH=. .venv/bin/python bench/daemon_calls.py --model small --threads 1 2 --json out.json

Calls run back to back unless `--gap-us N` spins N us before each one, as the daemon spins on its bell word
while the enclave computes: end to end on the H200 the daemon's work per call has been 1.5-2x the back-to-back
figures, which themselves moved 2x between runs (bench/results/h200-llama3.2-1b-session8).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from shmrt.host.compute import LinearCompute
from shmrt.host.daemon import COMPUTE_DTYPES, ModelHandler
from shmrt.host.local_ops import LocalOps
from shmrt.host.weights import load_weights
from shmrt.model.calls import matmul_bits, projection_bits
from shmrt.wire.transport import Request

QKV, O, GATE_UP, DOWN = ["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]
METHODS = ("Embedding", "BatchLinear qkv", "Matmul QK^T (cache k)", "AttentionOutput (cache v)",
           "BatchLinear o", "BatchLinear gate|up", "BatchLinear down", "LMHead")


class ArenaBuilder:
    """Reply buffers carved out of one preallocated arena (a ring's response area, minus the ring)."""

    def __init__(self, arena: torch.Tensor):
        self.arena = arena
        self.capacity = arena.numel()
        self.used = 0

    def alloc(self, shape, dtype):
        start = -(-self.used // 64) * 64
        nbytes = math.prod(shape) * dtype.itemsize
        self.used = start + nbytes
        return self.arena[start:self.used].view(dtype).view(shape)

    def alloc_joined(self, shapes, dtype):
        """As ShmReplyBuilder's: the buffers back to back, and one flat view over them where no padding parts them."""
        start = -(-self.used // 64) * 64
        views = [self.alloc(shape, dtype) for shape in shapes]
        nbytes = sum(v.numel() for v in views) * dtype.itemsize
        joined = self.arena[start:start + nbytes].view(dtype) if self.used == start + nbytes else None
        return views, joined


def decode_requests(layer: int, pos: int, x: dict) -> dict[str, Request]:
    """One decode step's requests for one layer, by method label (inputs drawn once, reused)."""
    return {
        "Embedding": Request("Embedding", 0, tensors=[x["ids"]]),
        "BatchLinear qkv": Request("BatchLinear", 0, layer, projection_bits(QKV, keep_v=True), pos, tensors=[x["h"]]),
        "Matmul QK^T (cache k)": Request("Matmul", 0, layer, matmul_bits(True, "k"), pos, tensors=[x["q"], x["k"]]),
        "AttentionOutput (cache v)": Request("AttentionOutput", 0, layer, matmul_bits(False, "v"), pos,
                                             tensors=[x["p"][..., :pos + 1]]),
        "BatchLinear o": Request("BatchLinear", 0, layer, projection_bits(O), tensors=[x["h"]]),
        "BatchLinear gate|up": Request("BatchLinear", 0, layer, projection_bits(GATE_UP), tensors=[x["h"]]),
        "BatchLinear down": Request("BatchLinear", 0, layer, projection_bits(DOWN), tensors=[x["act"]]),
        "LMHead": Request("LMHead", 0, tensors=[x["h"]]),
    }


def inputs(cfg, wire: torch.dtype, max_pos: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    Hkv, g, hd = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(wire)

    p = torch.softmax(torch.randn(1, Hkv, g, max_pos, generator=gen), -1).to(wire)
    return {"ids": torch.tensor([[7]]), "h": randn(1, 1, cfg.hidden_size), "q": randn(1, Hkv, g, hd),
            "k": randn(1, Hkv, 1, hd), "p": p, "act": randn(1, 1, cfg.intermediate_size)}


def spin(us: float) -> None:
    """Busy-wait `us` microseconds: the daemon spinning on its bell word while the enclave computes."""
    end = time.perf_counter_ns() + int(us * 1e3)
    while time.perf_counter_ns() < end:
        pass


def bench_handler(compute: LinearCompute, wire: torch.dtype, context: int, steps: int, warmup: int,
                  gap_us: float = 0) -> dict:
    cfg = compute.cfg
    handler = ModelHandler(compute, "bench", "0" * 64, log=lambda m: None)
    session = handler.open({"wire_dtype": str(wire).replace("torch.", "")}, lambda: [])
    arena = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=compute.device.type == "cuda")  # as a registered ring
    handler.handle(Request("Init", 0), ArenaBuilder(arena), session)
    x = inputs(cfg, wire, context + warmup + steps + 1)
    Hkv, hd = cfg.num_key_value_heads, cfg.head_dim
    prefill = torch.randn(1, Hkv, context, hd).to(wire)
    for layer in range(cfg.num_hidden_layers):  # the prompt's K/V rows
        for which in ("k", "v"):
            session.kv.append(layer, which, prefill, 0)
    times = {m: [] for m in METHODS}
    for step in range(warmup + steps):
        pos = context + step
        for layer in range(cfg.num_hidden_layers):
            for method, request in decode_requests(layer, pos, x).items():
                if gap_us:
                    spin(gap_us)
                c0, t0 = time.process_time_ns(), time.perf_counter_ns()
                handler.handle(request, ArenaBuilder(arena), session)
                t1, c1 = time.perf_counter_ns(), time.process_time_ns()
                if step >= warmup:
                    times[method].append(((t1 - t0) / 1e3, (c1 - c0) / 1e3))
    return times


def bench_floor(compute: LinearCompute, wire: torch.dtype, context: int, steps: int, warmup: int,
                gap_us: float = 0) -> dict:
    """The same calls through LocalOps (no rings: bench e2e's floor until session 11, now host/inprocess.py)."""
    cfg = compute.cfg
    ops = LocalOps(compute, wire)
    x = inputs(cfg, wire, context + warmup + steps + 1)
    Hkv, hd = cfg.num_key_value_heads, cfg.head_dim
    prefill = torch.randn(1, Hkv, context, hd).to(wire)
    for layer in range(cfg.num_hidden_layers):
        for which in ("k", "v"):
            ops.kv.append(layer, which, prefill, 0)
    calls = {
        "Embedding": lambda layer, pos: ops.embedding(x["ids"]),
        "BatchLinear qkv": lambda layer, pos: ops.linear(layer, QKV, x["h"], keep_v_at=pos),
        "Matmul QK^T (cache k)": lambda layer, pos: ops.matmul(x["q"], x["k"], transpose_b=True, expect_cols=pos + 1,
                                                               layer=layer, cache="k", pos=pos),
        "AttentionOutput (cache v)": lambda layer, pos: ops.attention_output(x["p"][..., :pos + 1], None,
                                                                             layer=layer, cache="v", pos=pos),
        "BatchLinear o": lambda layer, pos: ops.linear(layer, O, x["h"]),
        "BatchLinear gate|up": lambda layer, pos: ops.linear(layer, GATE_UP, x["h"]),
        "BatchLinear down": lambda layer, pos: ops.linear(layer, DOWN, x["act"]),
        "LMHead": lambda layer, pos: ops.lm_head(x["h"]),
    }
    times = {m: [] for m in METHODS}
    for step in range(warmup + steps):
        pos = context + step
        for layer in range(cfg.num_hidden_layers):
            for method, call in calls.items():
                if gap_us:
                    spin(gap_us)
                c0, t0 = time.process_time_ns(), time.perf_counter_ns()
                call(layer, pos)
                t1, c1 = time.perf_counter_ns(), time.process_time_ns()
                if step >= warmup:
                    times[method].append(((t1 - t0) / 1e3, (c1 - c0) / 1e3))
    return times


def summary(times: dict) -> dict:
    """Per method: median and spread of the wall time, and the median CPU time of the process (all its
    threads; on a shared machine less disturbed by other processes than the wall time)."""
    out = {}
    for m, samples in times.items():
        wall, cpu = sorted(w for w, _ in samples), sorted(c for _, c in samples)
        out[m] = {"median_us": statistics.median(wall), "p10_us": wall[len(wall) // 10],
                  "p90_us": wall[len(wall) * 9 // 10], "cpu_median_us": statistics.median(cpu), "n": len(wall)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(COMPUTE_DTYPES))
    ap.add_argument("--wire", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--context", type=int, default=128, help="K/V positions before the timed decode steps")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps (each: every layer, every method)")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--gap-us", type=float, default=0,
                    help="spin this long before each call, as the daemon waits while the enclave computes "
                         "(the device and the caches idle between calls as in a real run)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    dtype, wire = COMPUTE_DTYPES[args.dtype], COMPUTE_DTYPES[args.wire]
    weights = load_weights(args.model, dtype=dtype, device=args.device)
    results = []
    print(f"{args.model} on {args.device} {args.dtype}, wire {args.wire}, context {args.context}, "
          f"{args.steps} steps x {weights.cfg.num_hidden_layers} layers, gap {args.gap_us:g} us; us per call: "
          "wall median [p10-p90], "
          "process CPU median")
    print(f"{'method':<28}{'threads':>8}{'handler wall':>24}{'cpu':>8}{'floor wall':>24}{'cpu':>8}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs = {}
        for what, bench in (("handler", bench_handler), ("floor", bench_floor)):
            compute = LinearCompute(weights, args.device, dtype)
            runs[what] = summary(bench(compute, wire, args.context, args.steps, args.warmup, args.gap_us))
        for m in METHODS:
            cells = "".join(f"{r[m]['median_us']:>10.1f} [{r[m]['p10_us']:5.0f}-{r[m]['p90_us']:5.0f}]"
                            f"{r[m]['cpu_median_us']:>8.1f}" for r in runs.values())
            print(f"{m:<28}{threads:>8}{cells}")
            results.append({"method": m, "threads": threads, **{f"{w}_{k}": v for w, r in runs.items()
                                                                  for k, v in r[m].items()}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
