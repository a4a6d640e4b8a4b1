"""Would CUDA graphs pay for decode's BatchLinear calls? A standalone probe for a CUDA machine.

For each decode-shaped projection group of a model shape (default: Llama-3.2-1B, hidden 2048,
intermediate 8192, 32 heads, 8 KV heads, head dim 64), one call is what the daemon does per request:
H2D of the input from host memory the GPU can DMA from, one product, D2H of each result into host memory,
then waiting for the device. Three ways, median microseconds per call:

  eager, sync per result   the daemon before issue 13: a blocking D2H copy per result
  eager, one sync          the daemon now: every copy non-blocking, one synchronize per call
  graph replay             the same work captured once as a torch.cuda.CUDAGraph with static buffers

Host buffers are page-locked the way the daemon's are: plain memory registered with cudaHostRegister
(`--host registered`, the default: the daemon registers its rings), or torch's pinned allocator
(`--host pinned`). Nothing here is imported by shmrt; it only informs whether graphs belong in the daemon.

    python bench/cuda_graph_probe.py [--dtype bfloat16] [--wire float32] [--iters 2000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def groups(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> dict:
    """Each call: (input width, output widths), as the daemon's BatchLinear groups and LM head."""
    q, kv = heads * head_dim, kv_heads * head_dim
    calls = {"qkv": (hidden, [q, kv, kv]), "o_proj": (q, [hidden]), "gate|up": (hidden, [intermediate] * 2),
             "down": (intermediate, [hidden])}
    if vocab:
        calls["lm_head"] = (hidden, [vocab])
    return calls


class HostBuffers:
    """Page-locked host tensors: registered plain memory (as the daemon's rings) or torch's pinned pool.

    A registration covers whole pages and two may not overlap, so each registered tensor gets pages of its
    own: a slice, starting on a page boundary, of an allocation a page larger than it on either side."""

    def __init__(self, how: str):
        self.how = how
        self.registered: list[tuple[torch.Tensor, int]] = []  # (allocation, registered address)
        self.page = os.sysconf("SC_PAGE_SIZE")

    def empty(self, shape, dtype) -> torch.Tensor:
        if self.how == "pinned":
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        nbytes = math.prod(shape) * dtype.itemsize
        raw = torch.empty(nbytes + 2 * self.page, dtype=torch.uint8)
        start = -raw.data_ptr() % self.page
        address = raw.data_ptr() + start
        rc = torch.cuda.cudart().cudaHostRegister(address, -(-nbytes // self.page) * self.page, 0)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister failed ({rc})")
        self.registered.append((raw, address))
        return raw[start:start + nbytes].view(dtype).view(shape)

    def release(self) -> None:
        for _, address in self.registered:
            torch.cuda.cudart().cudaHostUnregister(address)
        self.registered = []


class Call:
    """One decode call's buffers: host input, device weight, host outputs."""

    def __init__(self, cols: int, rows: list[int], dtype, wire, host: HostBuffers, device, gen):
        self.rows, self.dtype, self.wire = rows, dtype, wire
        self.x_host = host.empty((1, 1, cols), wire)
        self.x_host.copy_(torch.randn(1, 1, cols, generator=gen))
        self.weight = (torch.randn(sum(rows), cols, generator=gen, device="cpu") * 0.02).to(device=device, dtype=dtype)
        self.out_host = [host.empty((1, 1, r), wire) for r in rows]
        self.device = device

    def queue(self) -> None:
        """H2D, product, one conversion, D2H of each result (the daemon's BatchLinear now), all queued."""
        x = self.x_host.to(device=self.device, dtype=self.dtype, non_blocking=True)
        y = F.linear(x, self.weight)
        y = y if y.dtype == self.wire else y.to(self.wire)
        parts = y.split_with_sizes(self.rows, -1) if len(self.rows) > 1 else [y]
        for out, part in zip(self.out_host, parts):
            out.copy_(part, non_blocking=True)

    def queue_sync_per_result(self) -> None:
        """The daemon before issue 13: split, then per result a conversion and a blocking D2H copy."""
        x = self.x_host.to(device=self.device, dtype=self.dtype, non_blocking=True)
        y = x @ self.weight.t()
        for out, part in zip(self.out_host, torch.split(y, self.rows, dim=-1)):
            out.copy_(part.to(self.wire))


class GraphCall:
    """The same call captured once: static device input, static product, copies into the same host outputs."""

    def __init__(self, call: Call):
        self.call = call
        self.x_dev = torch.empty(call.x_host.shape, dtype=call.dtype, device=call.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (cuBLAS workspaces, allocator) outside the capture
            for _ in range(3):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()

    def _body(self) -> None:
        c = self.call
        self.x_dev.copy_(c.x_host, non_blocking=True)
        y = F.linear(self.x_dev, c.weight)
        y = y if y.dtype == c.wire else y.to(c.wire)
        parts = y.split_with_sizes(c.rows, -1) if len(c.rows) > 1 else [y]
        for out, part in zip(c.out_host, parts):
            out.copy_(part, non_blocking=True)

    def replay(self) -> None:
        self.graph.replay()


def time_calls(fn, iters: int, warmup: int) -> list[float]:
    """Microseconds per call, each call ending with the device idle (as a reply must)."""
    for _ in range(warmup):
        fn()
        torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256, help="0 leaves the LM head out")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="weights and compute")
    ap.add_argument("--wire", default="float32", choices=sorted(DTYPES), help="host input and outputs")
    ap.add_argument("--host", default="registered", choices=["registered", "pinned"])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cuda_graph_probe: no CUDA device here (run it on a GPU machine)")
    device = torch.device(args.device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    torch.cuda.set_device(device)
    dtype, wire = DTYPES[args.dtype], DTYPES[args.wire]
    gen = torch.Generator().manual_seed(0)
    host = HostBuffers(args.host)
    rows_out = []
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, compute {args.dtype}, wire {args.wire}, "
          f"host memory {args.host}; median us per call [p10-p90], {args.iters} calls")
    print(f"{'call':<10}{'shape':>22}{'eager, sync/result':>24}{'eager, one sync':>24}{'graph replay':>24}{'max diff':>10}")
    try:
        with torch.inference_mode():
            for name, (cols, rows) in groups(args.hidden, args.intermediate, args.heads, args.kv_heads,
                                             args.head_dim, args.vocab).items():
                call = Call(cols, rows, dtype, wire, host, device, gen)
                call.queue()
                torch.cuda.synchronize()
                eager = [o.clone() for o in call.out_host]
                runs = {"eager_sync_per_result": time_calls(call.queue_sync_per_result, args.iters, args.warmup),
                        "eager_one_sync": time_calls(call.queue, args.iters, args.warmup)}
                diff = float("nan")
                try:
                    graph = GraphCall(call)
                except RuntimeError as exc:  # report and go on: the eager numbers still stand
                    print(f"{name}: capture failed: {exc}")
                    runs["graph_replay"] = [float("nan")]
                else:
                    for o in call.out_host:
                        o.zero_()
                    graph.replay()
                    torch.cuda.synchronize()
                    diff = max(float((o.float() - e.float()).abs().max()) for o, e in zip(call.out_host, eager))
                    runs["graph_replay"] = time_calls(graph.replay, args.iters, args.warmup)
                    del graph
                cells = ""
                row = {"call": name, "cols": cols, "rows": rows, "max_diff": diff}
                for key, t in runs.items():
                    t = sorted(t)
                    med, p10, p90 = statistics.median(t), t[len(t) // 10], t[len(t) * 9 // 10]
                    row |= {f"{key}_median_us": med, f"{key}_p10_us": p10, f"{key}_p90_us": p90}
                    cells += f"{med:>12.1f} [{p10:4.0f}-{p90:4.0f}]"
                shape = f"1x{cols} @ {sum(rows)}x{cols}"
                print(f"{name:<10}{shape:>22}{cells}{diff:>10.2e}")
                rows_out.append(row)
                del call
    finally:
        torch.cuda.synchronize()
        host.release()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "results": rows_out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
