"""A decode step's calls as CUDA graphs that copy straight from the request ring and into the response ring (a CUDA
daemon's; a CPU daemon makes the same plans, each graph's body run again where a GPU would replay it: RerunCapture).

Eager, a decode-shaped BatchLinear is ~8 torch ops on the daemon's CPU (the copy in, the product, its split,
the copy out, ...), each a dispatch and a launch, while the GPU works a few microseconds. A graph launches
them all at once. It replays fixed addresses: a message that finds its ring empty starts at one of two lap
starts (ring.py), so a decode step's input and reply lie at the same addresses call after call, and the
graph's copies read and write the rings themselves (registered with cudaHostRegister at Init), with no
staging. (An earlier try, on branch decode-graphs, staged through pinned buffers: the CPU copies cost what
the launches saved.) Only calls of one row (batch 1, one position) whose tensors lie at their rings' lap
starts have graphs; any other runs eagerly (a client holding a reply moves the next one: no graph per
address it lands at).

- BatchLinear: one graph per (layer, projections, KEEP_V, input address, dtype and shape, reply addresses):
  the copy in, the products, the copy out. V's rows (KEEP_V) come out of the graph in a buffer of its own and
  go into the cache eagerly (their position moves every step).
- AttentionScores and AttentionOutput at a padded width (a multiple of SCORE_WIDTH_STEP, model/calls.py):
  the whole call, K's and V's rows kept by index_copy_ at the step's position, which the graph reads from a
  pinned word written before each replay. One graph per family (layer, the tensors' addresses and dtypes) at
  a time: a new width or a grown cache buffer replaces it, and a graph holding a K/V buffer the store has let
  go is dropped (it would keep that memory past the session's quota).
- AttentionScores unpadded: the copies in, q|k|v and RoPE; the cache and Q*K^T (whose length grows every
  step) eagerly after the replay.
- Embedding of one id and LMHead of one row: the lookup (the id checked on the CPU, read by the graph from a
  pinned word written before each replay, never from the ring) and the LM head's product.

A call that ran as a graph is remembered as a plan (`Plan`) under its request's record (method, layer, op, its
tensors' places, dtypes and shapes): the next request with that record skips the checks, the reply's views and the
graph's key, which cost ~30 us of Python on 2 cores where the launch costs ~10 (what the record does not fix, the
K/V store's state and where the reply lands, is checked each time).

Graphs hold the session's ring addresses, so they go with the session, dropped before its rings are
unregistered and unmapped. Arguments are checked by the eager path's code before a graph is looked up
(`linear_rows`, `scores_rows`, `output_factor`, K/V `place`, the reply's reservation), or stand checked by a plan:
checks that passed for the same record, with what the record does not fix checked again (`Plan`). A capture that fails
turns graphs off for the session, with one log line, and the call runs eagerly. (The tests run these routes on a
CPU too, with a capture that runs the body again on replay, `RerunCapture`: tests/test_graph_routes.py.)
"""
from __future__ import annotations

import time

import torch

from ..errors import ShmrtError
from .compute import LinearCompute, grouped_product, write_parts

# The step a CUDA daemon asks clients to pad decode scores to (Hello's score_width_step, model/calls.py): a graph
# per layer and width serves this many steps; the client's softmax reads at most this many columns less one more.
SCORE_WIDTH_STEP = 256
MAX_GRAPHS = 1024  # per session: a decode step needs at most 4 per layer (the v2.4 calls), each at most twice


class CapturedCall:
    """One call's device work replayed: `body()` reads the rings (DMA from the registered request ring) and
    returns what the call's eager rest needs (device tensors the graph owns, rewritten by each replay; or None)."""

    def __init__(self, body, keep, pool, stream: torch.cuda.Stream, device: torch.device):
        # One eager run on a side stream first (cuBLAS picks its kernels and workspace outside the capture); it
        # computes this call's results, which the replay below writes again.
        side = torch.cuda.Stream(device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            body()
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):   # capture_begin/end directly: torch.cuda.graph() would gc.collect() each time
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.outputs = body()
            finally:
                self.graph.capture_end()
        stream.wait_stream(side)
        self._keep = keep   # what the graph reads and writes lives as long as it does

    def replay(self):
        self.graph.replay()
        return self.outputs

    def exec_address(self) -> int:
        """The instantiated graph's cudaGraphExec_t, for a launch straight from the CUDA runtime (host/lane.py); 0
        where torch does not say."""
        try:
            return int(self.graph.raw_cuda_graph_exec())
        except (AttributeError, RuntimeError, TypeError):
            return 0


class RerunCapture:
    """A capture's stand-in where there is no CUDA (a CPU daemon's plans, the tests, the benches' CPU probes): the body
    runs once at capture (its warm-up) and again at each replay, reading the request ring and writing the reply where a graph's replay
    would. `replays` and `replay_ns` count every replay, class-wide (a bench takes their time out of a call's)."""

    replays = 0
    replay_ns = 0

    def __init__(self, body, keep, pool, stream, device):
        self.body, self._keep = body, keep
        body()

    def replay(self):
        start = time.perf_counter_ns()
        try:
            return self.body()
        finally:
            RerunCapture.replays += 1
            RerunCapture.replay_ns += time.perf_counter_ns() - start

    def exec_address(self) -> int:
        return 0   # no CUDA graph: a lane replays it through its run callback


def linear_body(c: LinearCompute, layer: int, names: tuple[str, ...], rows: list[int], x: torch.Tensor,
                outs: list[torch.Tensor], joined: torch.Tensor | None, dtype: torch.dtype, drop_v: bool):
    """BatchLinear: ring input -> device -> products -> ring reply; returns V's rows (KEEP_V) or None."""
    xd = torch.empty(x.shape, dtype=c.dtype, device=c.device)   # the graph's own input buffer

    def body() -> torch.Tensor | None:
        xd.copy_(x, non_blocking=True)   # DMA from the registered request ring
        parts, whole, v = c.project(layer, names, rows, xd, dtype, drop_v)
        write_parts(outs, joined, parts, whole)   # DMA into the registered response ring
        return v

    return body, (xd, x, outs, joined)


def rotation_body(c: LinearCompute, layer: int, rows: list[int], x: torch.Tensor, tables: torch.Tensor):
    """AttentionScores up to the cache: ring input and RoPE tables -> device -> q|k|v, q and k rotated. The rest
    (rows kept at a position that moves every step, Q*K^T over a length that grows) runs eagerly."""
    xd = torch.empty(x.shape, dtype=c.dtype, device=c.device)
    td = torch.empty(tables.shape, dtype=torch.float32, device=c.device)

    def body():
        xd.copy_(x, non_blocking=True)
        td.copy_(tables, non_blocking=True)
        return c.rotated_qkv(layer, rows, xd, td)

    return body, (xd, td, x, tables)


def scores_body(c: LinearCompute, layer: int, rows: list[int], x: torch.Tensor, tables: torch.Tensor,
                position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, width: int, out: torch.Tensor):
    """AttentionScores at a padded width (model/calls.py), all of it: ring input, tables and the step's position
    (pinned: written before each replay) -> device -> q|k|v, RoPE -> K's and V's rows into the cache buffers at
    that position (index_copy_: the position is data, not an address) -> Q*K^T over the first `width` rows ->
    the ring reply. The buffers' addresses and the width are fixed for the graph's life (both in its key)."""
    rotate, inputs = rotation_body(c, layer, rows, x, tables)
    at = torch.empty(1, dtype=torch.int64, device=c.device)
    heads = c.cfg.num_key_value_heads, c.cfg.head_dim

    def body() -> None:
        at.copy_(position, non_blocking=True)
        q, k, v = rotate()
        keys.index_copy_(2, at, k.to(keys.dtype))
        values.index_copy_(2, at, v.view(1, 1, *heads).transpose(1, 2).to(values.dtype))
        out.copy_(grouped_product(q, keys[:, :, :width], transpose_b=True), non_blocking=True)

    return body, (*inputs, at, position, keys, values, out)


def output_body(c: LinearCompute, layer: int, p: torch.Tensor, vd: torch.Tensor, out: torch.Tensor):
    """AttentionOutput with P alone (V kept on the daemon) at a padded width: ring P -> device -> P*V over the
    first rows of the V buffer (`vd`, a fixed view) -> o_proj -> the ring reply."""
    pd = torch.empty(p.shape, dtype=c.dtype, device=c.device)

    def body() -> None:
        pd.copy_(p, non_blocking=True)
        out.copy_(c.output_product(layer, pd, vd), non_blocking=True)

    return body, (pd, p, vd, out)


def lm_head_body(c: LinearCompute, x: torch.Tensor, out: torch.Tensor):
    """LMHead: the ring's last-position states -> device -> logits -> the ring reply (float32)."""
    xd = torch.empty(x.shape, dtype=c.dtype, device=c.device)

    def body() -> None:
        xd.copy_(x, non_blocking=True)
        out.copy_(c.logits(xd), non_blocking=True)

    return body, (xd, x, out)


def embedding_body(c: LinearCompute, token: torch.Tensor, out: torch.Tensor):
    """A decode step's Embedding: the checked id (pinned: written before each replay, never read from the ring by
    the device: the client could change it after the check) -> its row -> the ring reply."""
    at = torch.empty(1, dtype=torch.int64, device=c.device)

    def body() -> None:
        at.copy_(token, non_blocking=True)
        out.copy_(c.embedding_rows(at).view(out.shape), non_blocking=True)

    return body, (at, token, out)


class Plan:
    """A decode call that ran as a graph, remembered by its request's record: method, layer, op and its tensors'
    places, dtypes and shapes in the request ring (`plan_key`). A request with the same record passes the same
    argument checks (they read nothing else but the session's constants and, below, the K/V store), takes the same
    graph and gets the same reply layout: one lookup instead of the checks, the reply's views and the graph's key
    (~20 us of Python a call). What a record does not fix is checked each time: where the reply lands (the plan
    of its place, `SessionGraphs.replay_planned`) and, for a call on the K/V cache, `ready`. A plan goes with its
    graph (it holds the graph, and the K/V buffers the graph holds)."""

    __slots__ = ("graph", "reply_offset", "reply_nbytes", "reply_descs")

    def __init__(self, graph: CapturedCall):
        self.graph = graph

    def ready(self, request, kv) -> bool:
        """Whether the eager path's checks of the session's state (and of what the request's record does not fix)
        would pass as they did when this was made."""
        return True

    def run(self, request, kv) -> None:
        self.graph.replay()

    def ready_after(self, first: "Plan", request, kv) -> bool:
        """`ready`, for the record's other plan (its reply's other place), `first` having found the request ready."""
        return self.ready(request, kv)


class ScoresPlan(Plan):
    """A padded AttentionScores: the step's rows go at `pos`, which must be where the store's K and V both end (a
    restart, pos 0 with rows kept, takes the checks: it zeroes them) and before the width; the store must hold the
    buffers the graph writes (it had room for the width in them when the plan was made: it grows none)."""

    __slots__ = ("layer", "width", "generations", "position_word")

    def __init__(self, graph: CapturedCall, layer: int, width: int, kv, position_word):
        super().__init__(graph)
        self.layer, self.width, self.position_word = layer, width, position_word
        # the store's buffers the graph writes (it holds them), by their generations (a grown buffer is a new one)
        self.generations = int(kv.generation["k"][layer]), int(kv.generation["v"][layer])

    def ready(self, request, kv) -> bool:
        layer, pos = self.layer, request.pos
        return pos < self.width and kv.filled["k"][layer] == pos == kv.filled["v"][layer] \
            and (kv.generation["k"][layer], kv.generation["v"][layer]) == self.generations

    def run(self, request, kv) -> None:
        self.step(request.pos, kv)

    def step(self, pos: int, kv) -> None:
        self.position_word[0] = pos
        self.graph.replay()
        kv.commit(self.layer, "k", pos + 1)
        kv.commit(self.layer, "v", pos + 1)


class OutputPlan(Plan):
    """AttentionOutput with P alone: the rows kept in the cache its op names (V; a client may name K) must be some
    and no more than P's width, in the buffer the graph reads."""

    __slots__ = ("layer", "width", "cache", "generation")

    def __init__(self, graph: CapturedCall, layer: int, width: int, cache: str, kv):
        super().__init__(graph)
        self.layer, self.width, self.cache = layer, width, cache
        self.generation = int(kv.generation[cache][layer])   # the buffer the graph reads (it holds it)

    def ready(self, request, kv) -> bool:
        return 0 < kv.filled[self.cache][self.layer] <= self.width \
            and kv.generation[self.cache][self.layer] == self.generation


class EmbeddingPlan(Plan):
    """A decode step's Embedding: its one id, read once from the request and checked as the eager path does
    (`decode_token`: one out of range takes the checks, which refuse it), is what the graph looks up (through a
    pinned word: the device never reads the ring, which the client may rewrite after the check)."""

    __slots__ = ("decode_token", "token_word", "token")

    def __init__(self, graph: CapturedCall, decode_token, token_word):
        super().__init__(graph)
        self.decode_token, self.token_word, self.token = decode_token, token_word, None

    def ready(self, request, kv) -> bool:
        try:
            self.token = self.decode_token(request.tensors[0])
        except ShmrtError:
            return False
        return True

    def run(self, request, kv) -> None:
        self.token_word[0] = self.token
        self.graph.replay()

    def ready_after(self, first: "EmbeddingPlan", request, kv) -> bool:
        self.token = first.token   # the id `first` read and checked: the ring is read once
        return True


MAX_PLANS = 2 * MAX_GRAPHS   # request records remembered per session (each with at most two reply places)


def plan_key(request) -> tuple:
    return request.method, request.layer, request.op, request.descs


class SessionGraphs:
    """The graphs of one session (module docstring), and the plans of the calls that ran as graphs (`Plan`)."""

    def __init__(self, compute: LinearCompute, stream: torch.cuda.Stream | None, request_starts, reply_starts, log,
                 capture=CapturedCall):
        self.c = compute
        # where a message that found its ring empty puts its first tensor, per ring (ring.py's lap starts)
        self.request_starts, self.reply_starts = frozenset(request_starts), frozenset(reply_starts)
        self.stream = stream
        self.log = log
        # `capture(body, keep, pool, stream, device)` makes a replayable call: CapturedCall (CUDA); the tests' CPU
        # stand-in runs the body again on replay (it reads and writes the memory the graph would)
        self.capture = capture
        self.cuda = compute.device.type == "cuda"
        # one pool: the graphs replay one at a time, each call synced
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self.position = torch.zeros(1, dtype=torch.int64, pin_memory=self.cuda)   # a padded step's position (scores)
        self._position_word = self.position.numpy()   # written through numpy: a tensor's setitem costs ~5 us
        self.token = torch.zeros(1, dtype=torch.int64, pin_memory=self.cuda)   # a decode step's checked id (Embedding)
        self._token_word = self.token.numpy()
        self.width_step = SCORE_WIDTH_STEP
        self.graphs: dict[tuple, CapturedCall] = {}
        # per layer: a padded call's family (kind, layer, its tensors' addresses and dtypes) -> the key of its one
        # graph and the addresses of the K/V buffers that graph holds (`_graph`, `_drop_holding_others`)
        self.families: dict[int, dict[tuple, tuple[tuple, frozenset]]] = {}
        # a request's record (`plan_key`) -> its plans, one per place its reply landed (the response ring's lap starts)
        self.plans: dict[tuple, list[Plan]] = {}
        self.on = True
        self.lane = None   # host/lane.py's PlannedLane where the session has one: told of every change to `plans`

    def remember(self, request, builder, plan: Plan) -> None:
        """Keep `plan` for `request`'s record, the call having just run as its graph with `builder`'s reply: one
        reservation (a reply of several would need each to land where it did)."""
        if request.descs is None or len(builder.reserved) != 1:
            return
        plan.reply_offset, plan.reply_nbytes = builder.reserved[0]
        plan.reply_descs = tuple(builder.descs)
        if len(self.plans) >= MAX_PLANS:
            self._forget_plans()
        record = plan_key(request)
        plans = self.plans.setdefault(record, [])
        plans[:] = [p for p in plans if p.reply_offset != plan.reply_offset][-1:] + [plan]
        if self.lane is not None:
            self.lane.on_plans_changed(record, plans)

    def _forget_plans(self) -> None:
        self.plans.clear()
        if self.lane is not None:
            self.lane.on_plans_cleared()

    def replay_planned(self, request, builder, kv) -> bool:
        """Serve `request` by its record's plan (`Plan`): True if it ran (the reply reserved and described in
        `builder`), False where there is none or it does not apply now: the eager path's checks and routes then."""
        plans = self.plans.get(plan_key(request)) if self.on and self.plans and request.descs is not None else None
        if plans is None or not plans[0].ready(request, kv):
            return False
        # (A reservation that waited for room and lands elsewhere is taken back, and the checks' own may wait again.)
        offset = builder.claim(plans[0].reply_nbytes, [p.reply_offset for p in plans])
        if offset is None:
            return False
        plan = plans[0] if plans[0].reply_offset == offset else plans[1]
        # The other plan of the record: the same K/V buffers (a call that changes them drops the graphs holding the old
        # ones, and their plans, before it makes a plan), so its state checks are a guard, not a case; an Embedding's
        # takes the id the first read and checked (`ready_after`), which it must
        if plan is not plans[0] and not plan.ready_after(plans[0], request, kv):
            builder.unclaim()
            return False
        builder.descs = list(plan.reply_descs)
        plan.run(request, kv)
        return True

    def linear(self, layer: int, names: tuple[str, ...], rows: list[int], x: torch.Tensor, outs: list[torch.Tensor],
               joined: torch.Tensor | None, dtype: torch.dtype, drop_v: bool
               ) -> tuple[CapturedCall | None, torch.Tensor | None]:
        """Replay (capturing on first use) the graph of this call: (the graph, V's rows or None) if it ran, (None,
        None) where the call is not a graph's (not one row, graphs off or too many shapes): run it eagerly."""
        first_out = joined if joined is not None else outs[0]
        if not self.on or x.dim() != 3 or x.shape[:2] != (1, 1) or x.data_ptr() not in self.request_starts \
                or first_out.data_ptr() not in self.reply_starts:
            return None, None
        key = ("BatchLinear", layer, names, drop_v, dtype, x.data_ptr(), x.dtype, tuple(x.shape),
               joined.data_ptr() if joined is not None else tuple(o.data_ptr() for o in outs))
        graph = self._graph(key, lambda: linear_body(self.c, layer, names, rows, x, outs, joined, dtype, drop_v))
        return (None, None) if graph is None else (graph, graph.replay())

    def rotation(self, layer: int, rows: list[int], x: torch.Tensor, tables: torch.Tensor):
        """AttentionScores' q, k (rotated) and v on the device from a replayed graph (`rotation_body`), or None
        where the call is not a graph's (as `linear`): run it eagerly."""
        if not self.on or x.dim() != 3 or x.shape[:2] != (1, 1) or x.data_ptr() not in self.request_starts:
            return None
        key = ("AttentionScores", layer, x.data_ptr(), x.dtype, tuple(x.shape), tables.data_ptr(), tables.dtype,
               tuple(tables.shape))
        graph = self._graph(key, lambda: rotation_body(self.c, layer, rows, x, tables))
        return None if graph is None else graph.replay()

    def scores(self, layer: int, rows: list[int], x: torch.Tensor, tables: torch.Tensor, pos: int, width: int, kv,
               out: torch.Tensor) -> ScoresPlan | None:
        """A padded AttentionScores (`width`, a multiple of the step we asked for) replayed whole (`scores_body`) as
        its plan runs it: the plan if it ran (its rows are kept then), None where it is not a graph's (unpadded, not
        one row, not at lap starts, graphs off): eager."""
        if not self.on or not width or width % self.width_step or x.shape[:2] != (1, 1) \
                or x.data_ptr() not in self.request_starts or out.data_ptr() not in self.reply_starts:
            return None
        shape = (1, *kv.heads_and_dim[:1], 1, kv.heads_and_dim[1])
        keys = kv.place(layer, "k", shape, pos, width, commit=False)   # checked, room made; counted once run
        values = kv.place(layer, "v", shape, pos, width, commit=False)
        held = frozenset((keys.data_ptr(), values.data_ptr()))
        self._drop_holding_others(layer, held)
        family = ("AttentionScores", layer, x.data_ptr(), x.dtype, tuple(x.shape), tables.data_ptr(), tables.dtype,
                  out.data_ptr(), out.dtype)
        self._position_word[0] = pos   # before a capture too: its first, eager run keeps this step's rows
        graph = self._graph((*family, keys.data_ptr(), values.data_ptr(), width), lambda: scores_body(
            self.c, layer, rows, x, tables, self.position, keys, values, width, out), family, held)
        if graph is None:
            return None
        plan = ScoresPlan(graph, layer, width, kv, self._position_word)   # the buffers `place` made room in
        plan.step(pos, kv)
        return plan

    def output(self, layer: int, p: torch.Tensor, vd: torch.Tensor, out: torch.Tensor) -> CapturedCall | None:
        """AttentionOutput with P alone replayed (`output_body`): its graph if it ran, None where it is not a
        graph's (as `scores`: a P whose width is not a multiple of the step would need a graph per step)."""
        if not self.on or p.shape[0] != 1 or p.shape[2] != self.c.cfg.groups or p.shape[3] % self.width_step \
                or p.data_ptr() not in self.request_starts or out.data_ptr() not in self.reply_starts:
            return None
        held = frozenset((vd.data_ptr(),))
        self._drop_holding_others(layer, held, kind="AttentionOutput")
        family = ("AttentionOutput", layer, p.data_ptr(), p.dtype, out.data_ptr(), out.dtype)
        graph = self._graph((*family, tuple(p.shape), vd.data_ptr(), tuple(vd.shape)),
                            lambda: output_body(self.c, layer, p, vd, out), family, held)
        if graph is None:
            return None
        graph.replay()
        return graph

    def lm_head(self, x: torch.Tensor, out: torch.Tensor) -> CapturedCall | None:
        """LMHead of one row (checked: `check_lm_head`) replayed (`lm_head_body`): its graph if it ran, None where it
        is not a graph's (not one row, not at lap starts, graphs off): eager."""
        if not self.on or x.shape[0] != 1 or x.data_ptr() not in self.request_starts \
                or out.data_ptr() not in self.reply_starts:
            return None
        graph = self._graph(("LMHead", x.data_ptr(), x.dtype, tuple(x.shape), out.data_ptr(), out.dtype),
                            lambda: lm_head_body(self.c, x, out))
        if graph is not None:
            graph.replay()
        return graph

    def embedding(self, token: int, ids: torch.Tensor, out: torch.Tensor) -> EmbeddingPlan | None:
        """A decode step's Embedding of `token` (checked: `decode_token`) replayed (`embedding_body`), as its plan
        runs it: the plan if it ran, None where it is not a graph's (as `lm_head`): eager."""
        if not self.on or ids.data_ptr() not in self.request_starts or out.data_ptr() not in self.reply_starts:
            return None
        self._token_word[0] = token   # before a capture too: its first, eager run looks this id up
        graph = self._graph(("Embedding", ids.data_ptr(), ids.dtype, out.data_ptr(), out.dtype, tuple(out.shape)),
                            lambda: embedding_body(self.c, self.token, out))
        if graph is None:
            return None
        plan = EmbeddingPlan(graph, self.c.decode_token, self._token_word)
        plan.token = token
        plan.run(None, None)
        return plan

    def _drop_holding_others(self, layer: int, current: frozenset, kind: str | None = None) -> None:
        """Drop layer `layer`'s padded graphs (of `kind`, or any) that hold a K/V buffer other than `current`
        (the store's now): the store has let it go, and a graph must not keep it alive past the session's
        quota (a client could otherwise pin one old buffer per family: dtypes, lap starts)."""
        for family, (_, held) in list(self.families.get(layer, {}).items()):
            if (kind is None or family[0] == kind) and not held <= current:
                self._drop(family)

    def _drop(self, family: tuple) -> None:
        key, _ = self.families[family[1]].pop(family)
        graph = self.graphs.pop(key)
        for record, plans in list(self.plans.items()):   # (a new width or K/V buffer: every SCORE_WIDTH_STEP steps)
            kept = [p for p in plans if p.graph is not graph]
            if len(kept) == len(plans):
                continue
            if kept:
                self.plans[record] = kept
            else:
                del self.plans[record]
            if self.lane is not None:   # (before the graph goes: the lane never launches a freed one)
                self.lane.on_plans_changed(record, kept)

    def _graph(self, key: tuple, make_body, family: tuple | None = None, held: frozenset = frozenset()
               ) -> CapturedCall | None:
        """The graph of `key`, captured on first use; None if graphs are off or a capture failed just now. A
        `family` (a padded call's; `held`: the K/V buffers its graph holds) has one graph at a time: one for a new
        width or a grown cache buffer replaces the old, which no step will use again."""
        graph = self.graphs.get(key)
        if graph is None:
            if family is not None and family in self.families.get(family[1], {}):
                self._drop(family)
            if len(self.graphs) >= MAX_GRAPHS:
                return None
            try:
                graph = self.capture(*make_body(), self.pool, self.stream, self.c.device)
            except Exception as exc:  # noqa: BLE001 - any capture failure: eager is always right
                self.on = False
                self._forget_plans()
                self.log(f"CUDA graphs off for this session (capture failed: {str(exc).splitlines()[0]}); "
                         "decode calls run eagerly")
                if self.cuda:
                    torch.cuda.synchronize(self.c.device)
                return None
            self.graphs[key] = graph
            if family is not None:
                self.families.setdefault(family[1], {})[family] = (key, held)
        return graph

    def close(self) -> None:
        if self.lane is not None:   # before the graphs it launches go
            self.lane.close()
        self.plans.clear()
        self.graphs.clear()
        self.families.clear()
