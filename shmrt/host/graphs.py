"""A decode step's BatchLinear calls as CUDA graphs that copy straight from the request ring and into the
response ring (CUDA daemons only).

Eager, a decode-shaped BatchLinear is ~8 torch ops on the daemon's CPU (the copy in, the product, its split,
the copy out, ...), each a dispatch and a launch, while the GPU works a few microseconds. A graph launches
them all at once. It replays fixed addresses: a message that finds its ring empty starts at data offset 0
(ring.py), so a decode step's input and reply lie at the same addresses call after call, and the graph's
copies read and write the rings themselves (registered with cudaHostRegister at Init), with no staging.
(An earlier try, on branch decode-graphs, staged through pinned buffers: the CPU copies cost what the
launches saved.) Only calls of one row (batch 1, one position) whose input and reply lie at one of their
rings' lap starts have graphs (two per ring: messages alternate between them); any other runs eagerly (a
client holding a reply moves the next one: no graph per address it lands at).

One graph per (layer, projections, KEEP_V, input address, dtype and shape, reply addresses), per session:
graphs hold the session's ring addresses, so they go with the session, dropped before its rings are
unregistered and unmapped. Arguments are checked by the eager path's code before a graph is looked up
(`linear_rows`, the reply's reservation); V's rows (KEEP_V) come out of the graph in a buffer of its own
and go into the cache eagerly (their position moves every step). A capture that fails turns graphs off
for the session, with one log line, and the call runs eagerly.
"""
from __future__ import annotations

import torch

from .compute import LinearCompute, write_parts

MAX_GRAPHS = 1024  # per session: a decode step needs 3 per layer (4 with the v2.4 calls), at most twice


class LinearGraph:
    """One BatchLinear replayed: ring input -> device -> products -> ring reply; `v` holds V's rows (KEEP_V)."""

    def __init__(self, c: LinearCompute, layer: int, names: tuple[str, ...], rows: list[int], x: torch.Tensor,
                 outs: list[torch.Tensor], joined: torch.Tensor | None, dtype: torch.dtype, drop_v: bool, pool,
                 stream: torch.cuda.Stream):
        xd = torch.empty(x.shape, dtype=c.dtype, device=c.device)   # the graph's own input buffer

        def body() -> torch.Tensor | None:
            xd.copy_(x, non_blocking=True)   # DMA from the registered request ring
            parts, whole, v = c.project(layer, names, rows, xd, dtype, drop_v)
            write_parts(outs, joined, parts, whole)   # DMA into the registered response ring
            return v

        # One eager run on a side stream first (cuBLAS picks its kernels and workspace outside the capture); it
        # computes this call's results, which the replay below writes again.
        side = torch.cuda.Stream(c.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            body()
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):   # capture_begin/end directly: torch.cuda.graph() would gc.collect() each time
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.v = body()
            finally:
                self.graph.capture_end()
        stream.wait_stream(side)
        self._keep = (xd, x, outs, joined)   # what the graph reads and writes lives as long as it does

    def replay(self) -> torch.Tensor | None:
        self.graph.replay()
        return self.v


class SessionGraphs:
    """The graphs of one session (module docstring)."""

    def __init__(self, compute: LinearCompute, stream: torch.cuda.Stream, request_starts, reply_starts, log):
        self.c = compute
        # where a message that found its ring empty puts its first tensor, per ring (ring.py's lap starts)
        self.request_starts, self.reply_starts = frozenset(request_starts), frozenset(reply_starts)
        self.stream = stream
        self.log = log
        self.pool = torch.cuda.graph_pool_handle()   # one pool: the graphs replay one at a time, each call synced
        self.graphs: dict[tuple, LinearGraph] = {}
        self.on = True

    def linear(self, layer: int, names: tuple[str, ...], rows: list[int], x: torch.Tensor, outs: list[torch.Tensor],
               joined: torch.Tensor | None, dtype: torch.dtype, drop_v: bool) -> tuple[bool, torch.Tensor | None]:
        """Replay (capturing on first use) the graph of this call: (True, V's rows or None) if it ran, (False,
        None) where the call is not a graph's (not one row, graphs off or too many shapes): run it eagerly."""
        first_out = joined if joined is not None else outs[0]
        if not self.on or x.dim() != 3 or x.shape[:2] != (1, 1) or x.data_ptr() not in self.request_starts \
                or first_out.data_ptr() not in self.reply_starts:
            return False, None
        key = (layer, names, drop_v, dtype, x.data_ptr(), x.dtype, tuple(x.shape),
               joined.data_ptr() if joined is not None else tuple(o.data_ptr() for o in outs))
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return False, None
            try:
                graph = LinearGraph(self.c, layer, names, rows, x, outs, joined, dtype, drop_v, self.pool, self.stream)
            except Exception as exc:  # noqa: BLE001 - any capture failure: eager is always right
                self.on = False
                self.log(f"CUDA graphs off for this session (capture failed: {str(exc).splitlines()[0]}); "
                         "decode calls run eagerly")
                torch.cuda.synchronize(self.c.device)
                return False, None
            self.graphs[key] = graph
        return True, graph.replay()

    def close(self) -> None:
        self.graphs.clear()
