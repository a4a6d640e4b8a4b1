"""A session's planned calls served in C, from the take to the reply's post (the daemon's side; the enclave never
runs this).

graphs.py remembers a decode call that ran as a graph as a plan, under its request's record. Served from Python, a
planned call still cost ~30 us of the daemon's Python on an H200 host (the take's Rung, the Request and its views,
the handler's dispatch, the plan's lookup and checks, the reply's reservation, the release, the reply's record) and
~60-85 on 2 cores, where the product between two calls streams the caches away. Here each plan is also an entry of
the C lane (native.NativeLane, native/shmrt_lane.c), and the lane serves the request ring's doorbell first: the
record taken and checked, its entry found by the record's fixed words, what the record does not fix checked as the
plan's `ready` does (on numbers the K/V store keeps for it: its rows and buffer generations; an Embedding's id read
once and range-checked), the reply reserved where the plan's reply lies, the graph launched and waited for (the CUDA
runtime's cudaGraphLaunch and cudaStreamSynchronize, no Python; where there is no CUDA, a callback that replays the
plan's stand-in), the K/V rows counted, the request released (poisoned first in tests), the reply published and
rung. With `--doorbell zmq` the server hands the lane the record that came over the socket (`serve_record`): checked
as a take checks it, served the same way, and the reply's record encoded for the server to send. Whatever an entry
does not answer leaves the record checked for the Python path and the rings as they were, so the lane changes no
outcome: only who serves a call a plan would serve.

Entries follow graphs.py's plans (`on_plans_changed`, `on_plans_cleared`): a plan that goes takes its entry first, so the lane never
launches a graph that was freed.

The echo daemon (handler.EchoHandler: tests, the micro bench) has a lane too (`EchoLane`): a call it answered from
Python becomes an entry whose run is the C copy of each request tensor into the reply, so that its next ones measure
the transport as a model's planned calls use it, and the tests' hostile peers meet the C path.
"""
from __future__ import annotations

from ..wire import protocol
from ..wire.native import (KEY_WORDS, PLAN_ECHO, PLAN_EMBEDDING, PLAN_OUTPUT, PLAN_PLAIN, PLAN_SCORES, NativeLane,
                           cuda_graph_runtime)
from ..wire.protocol import Method
from ..wire.shm_transport import LaneParts
from .graphs import EmbeddingPlan, OutputPlan, Plan, ScoresPlan, SessionGraphs

ENTRIES_PER_LAYER = 8   # records with plans a lane holds, per layer (a decode step has 4 a layer and 2 more; a new
ENTRIES_MORE = 64       # score width adds a layer's new ones before its old ones go); past that, none new


def record_key(record: tuple) -> list[int]:
    """A plan's record (graphs.plan_key: method, layer, op, descriptors) as the C take's words fix it."""
    method, layer, op, descs = record
    words = protocol.to_words(Method[method], 0, layer, op, 0, 0, descs)
    return [words[0], words[3], words[4], words[8], *words[protocol.HEAD_WORDS:]]


class Lane:
    """One session's C lane (native.NativeLane) as its transport's take_bell asks it: what every kind of lane shares."""

    def __init__(self, parts: LaneParts, capacity: int, run=None, cuda: tuple[int, int, int] | None = None):
        self.capacity = capacity
        self.native = NativeLane(parts.requests, parts.replies, parts.consumer.state, parts.request_buf,
                                 parts.request_data, parts.request_tail_off, parts.consumer.poison, parts.producer,
                                 parts.reply_data, capacity, run=run, cuda=cuda)
        self._install = parts.install
        parts.install(self)

    def serve(self, expect_seq: int) -> int:
        """native.NativeLane.serve: LANE_SERVED, or the take's answer for the Python path."""
        return self.native.serve(expect_seq)

    def serve_record(self, record: bytes, expect_seq: int) -> bytes | None:
        """native.NativeLane.serve_record: a request that came over ZeroMQ, its reply's record where the lane served it."""
        return self.native.serve_record(record, expect_seq)

    @property
    def served(self) -> int:
        """Calls the lane served whole."""
        return self.native.c.served

    def close(self) -> None:
        self.native.clear()
        self.native.detach()
        self._install(None)


class PlannedLane(Lane):
    """The C lane of one session with graphs (`SessionGraphs`), its entries kept as the plans are."""

    def __init__(self, parts: LaneParts, graphs: SessionGraphs, kv, vocab: int, runtime: tuple[int, int] | None = None):
        """`runtime`: cuda_graph_runtime()'s functions, for a session whose graphs are CUDA's."""
        self.graphs, self.kv, self.vocab = graphs, kv, vocab
        cuda = (*runtime, graphs.stream.cuda_stream) if runtime is not None else None
        self.cuda = cuda is not None
        super().__init__(parts, ENTRIES_PER_LAYER * graphs.c.cfg.num_hidden_layers + ENTRIES_MORE, self._run, cuda)
        self._entries: dict[tuple, int] = {}   # record -> its entry
        self._free = list(range(self.capacity - 1, -1, -1))
        # an entry's plans by place, for the run callback: its handle is 2 * entry + place
        self._replays: dict[int, list[Plan]] = {}
        graphs.lane = self

    @property
    def launched(self) -> int:
        """Of the calls served, the CUDA graphs launched from C."""
        return self.native.c.launched

    def _run(self, handle: int) -> None:
        self._replays[handle >> 1][handle & 1].graph.replay()

    # ---- entries, as graphs.py's plans change

    def on_plans_changed(self, record: tuple, plans: list[Plan]) -> None:
        """The record's plans are now `plans`: its entry says so (none where the lane cannot check them)."""
        self._drop_entry(record)
        if not plans:
            return
        method, _, _, descs = record
        checks = self._entry_fields(plans[-1], descs)
        if checks is None or not self._free or descs is None or len(descs) > protocol.MAX_TENSORS:
            return
        key = record_key(record)
        if len(key) > KEY_WORDS:
            return
        # The record's two reply places (the response ring's lap starts) share an entry where their checks agree
        # (they hold the same K/V buffers: graphs.py drops the plans of old ones); else the newest alone
        same = [p for p in plans if self._entry_fields(p, descs) == checks and p.reply_nbytes == plans[-1].reply_nbytes]
        index = self._free.pop()
        places = []
        for place, plan in enumerate(same[-2:]):
            words = protocol.to_words(Method[method], 0, -1, 0, 0, 0, plan.reply_descs)
            places.append((plan.reply_offset, words, self._exec_address(plan), 2 * index + place))
        self._replays[index] = same[-2:]
        kind, words = checks
        self.native.put(index, key, kind, plans[-1].reply_nbytes, places, **words)
        self._entries[record] = index

    def on_plans_cleared(self) -> None:
        """Every plan went (graphs off, the session's end)."""
        self.native.clear()
        self._entries.clear()
        self._replays.clear()
        self._free = list(range(self.capacity - 1, -1, -1))

    def close(self) -> None:
        self.on_plans_cleared()
        super().close()
        self.graphs.lane = None

    def _drop_entry(self, record: tuple) -> None:
        index = self._entries.pop(record, None)
        if index is None:
            return
        self.native.remove(index)
        self._free.append(index)
        del self._replays[index]

    def _entry_fields(self, plan: Plan, descs) -> tuple[int, dict] | None:
        """A plan's entry but for its key and places: (kind, the words its checks read and its run writes, as
        NativeLane.put takes them); None for a kind the lane does not know."""
        kv, t = self.kv, type(plan)
        if t is Plan:
            return PLAN_PLAIN, {}
        if t is ScoresPlan:
            layer = plan.layer
            return PLAN_SCORES, {"width": plan.width, "word": self.graphs.position.data_ptr(),
                                 "filled": (_word(kv.filled["k"], layer), _word(kv.filled["v"], layer)),
                                 "generation": (_word(kv.generation["k"], layer), _word(kv.generation["v"], layer)),
                                 "expect_generation": plan.generations}
        if t is OutputPlan:
            layer = plan.layer
            return PLAN_OUTPUT, {"width": plan.width, "filled": (_word(kv.filled[plan.cache], layer), 0),
                                 "generation": (_word(kv.generation[plan.cache], layer), 0),
                                 "expect_generation": (plan.generation, 0)}
        if t is EmbeddingPlan:   # the id: the request's one tensor (int64 or int32, checked when the plan was made)
            return PLAN_EMBEDDING, {"word": self.graphs.token.data_ptr(), "id_offset": descs[0].offset,
                                    "id_bytes": descs[0].dtype.itemsize, "vocab": self.vocab}
        return None

    def _exec_address(self, plan: Plan) -> int:
        """The graph's exec address where the CUDA runtime launches it; 0: the run callback replays it."""
        return plan.graph.exec_address() if self.cuda else 0


def _word(array, index: int) -> int:
    """The address of `array[index]` (a numpy array of 8-byte numbers the K/V store keeps)."""
    return array.ctypes.data + index * array.itemsize


def lane_for(parts: LaneParts | None, graphs: SessionGraphs | None, kv, vocab: int) -> PlannedLane | None:
    """A session's lane where it rings through shared memory and has graphs; None elsewhere."""
    if parts is None or graphs is None:
        return None
    runtime = cuda_graph_runtime() if graphs.cuda else None
    if graphs.cuda and runtime is None:   # (no CUDA runtime among this process's libraries: no wait to call from C)
        return None
    return PlannedLane(parts, graphs, kv, vocab, runtime)


class EchoLane(Lane):
    """The echo daemon's lane: a request record it answered from Python (`remember`) is an entry whose run copies each
    request tensor into the reply, where that reply landed (the response ring's lap starts: up to two places)."""

    ENTRIES = 64   # distinct records (past that, none new)

    def __init__(self, parts: LaneParts):
        super().__init__(parts, self.ENTRIES)
        self._places: dict[tuple, list[tuple[int, list[int]]]] = {}   # record -> its reply places (offset, words)
        self._entries: dict[tuple, int] = {}

    def remember(self, request, builder) -> None:
        """`request` was answered with `builder`'s reply (its tensors, in order): its record's entry knows that place.
        C reserves the reply's span (first reservation's start to the last one's end) at once and copies each tensor
        to its descriptor inside it; where that reservation lands elsewhere than a known place, C declines."""
        descs, reserved = request.descs, builder.reserved
        if not descs or len(descs) > protocol.MAX_TENSORS or len(reserved) != len(descs) or request.text \
                or any(n == 0 for _, n in reserved):
            return
        record = (request.method, request.layer, request.op, descs)
        index = self._entries.get(record)
        if index is None:
            if len(self._entries) >= self.ENTRIES:
                return
            index = self._entries[record] = len(self._entries)
        start = reserved[0][0]
        span = reserved[-1][0] + reserved[-1][1] - start
        if any(after < offset + n for (offset, n), (after, _) in zip(reserved, reserved[1:])):
            return   # (a reservation wrapped to the lap's beginning: no one span holds them)
        places = self._places.setdefault(record, [])
        places[:] = [p for p in places if p[0] != start][-1:] + [
            (start, protocol.to_words(Method[request.method], 0, -1, 0, 0, 0, builder.descs))]
        self.native.put(index, record_key(record), PLAN_ECHO, span, [(o, w, 0, 0) for o, w in places])
