"""The product transport: tensors in two shared-memory rings; doorbells through the rings' headers
(`--doorbell shm`, the default, bell.py) or over ZeroMQ (`--doorbell zmq`).

Session life (steps 1, 3 and 5 always over ZeroMQ):
  1. Hello   (doorbell, no tensors)       -> reply text: the daemon's labels and model digest as JSON
  2. the client creates a request ring and a response ring sized for that model (it owns them)
  3. Attach  (control; text: {"req", "rsp", "capacity", "doorbell"}) -> the daemon maps both rings,
             answers empty. Once per session; any other request before it is refused.
  4. RPCs    Init first (a plain model call), then request tensors in the request ring, reply
             tensors in the response ring; each doorbell in the sender's ring header (shm) or on
             ZeroMQ (zmq). With shm, a daemon idle for a while sleeps on ZeroMQ and the client
             sends a Wake (seq 0, never answered) with the call that finds it asleep.
  5. Close   (or the client vanishes)      -> the daemon detaches; the client unlinks

Who writes what: the client is the only producer of the request ring and the only consumer of
the response ring; the daemon the reverse. Each side releases what it consumed by storing the
`ring_end` of that message's doorbell into the ring's tail word (see ring.py for the order rule).
"""
from __future__ import annotations

import json
import math
from typing import NamedTuple

import torch
import zmq

from .. import settings
from . import protocol
from ..errors import PeerError, ProtocolError, printable
from .bell import MAX_RECORD, BellIn, BellOut, RecordShape, Rung
from .protocol import Doorbell, Method, TensorDesc
from .ring import OFF_TAIL, PAGE_BYTES, Ring, align_up, check_segment_name, unlink_segment
from .scopes import Reply
from .stats import CallStats
from .transport import (SERVED, ClientTransport, Hello, ReplyBuilder, Request, ServerSession, endpoint_kind,
                        parse_client_info)
from .native import (CALL_ASLEEP, CALL_TIMES, DESC_WORDS, HEAD_WORDS, LANE_SERVED, NONE, RESERVE_BAD_TAIL, RESERVE_TOO_LARGE,
                     RESERVE_WAIT, SLOW, TIMEOUT, TOOK, Backoff, NativeCaller, now_ns, precise_sleeps)
from .untrusted import load_json

NAME = "shm"
MAX_RING_BYTES = 1 << 40
DOORBELLS = ("shm", "zmq")
WAIT_SLICE_NS = 2_000_000  # a client waiting for a reply bell looks at its ZeroMQ socket this often


# ---- codec: the first message of a new client (registry.py's interface)

def sniff(payload: bytes) -> bool:
    return protocol.is_doorbell(payload)


def decode_hello(payload: bytes) -> Hello | None:
    """A doorbell that opens a session, validated; None for a doorbell of another method."""
    if protocol.peek_method(payload) != Method.Hello:
        return None
    bell = protocol.decode(payload, capacity=0, expect_seq=1)
    return Hello(bell.token, parse_client_info(bell.text))


def fit_text(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8 (on a character boundary)."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def encode_error(token: bytes, seq: int, message: str, max_record: int | None = None) -> bytes:
    """An Error doorbell; `max_record`: the most bytes it may take (a bell slot), else the text's limit."""
    limit = protocol.MAX_TEXT if max_record is None else max_record - protocol.encoded_size(0)
    text = fit_text(message, limit)
    return protocol.encode(Doorbell(Method.Error, seq, token, flags=protocol.FLAG_ERROR, text=text))


def encode_refusal(message: str) -> bytes:
    """An Error reply to seq 1 for a client that has no session (so no token of ours to echo)."""
    return encode_error(b"\0" * protocol.TOKEN_BYTES, 1, message)


class RungReply(NamedTuple):
    """The reply to a request rung through the ring's doorbell: its record as words (protocol.to_words) and its
    text, encoded straight into the response ring's slot and published in one C call (`post_reply`), as the
    client posts its requests."""

    words: list[int]
    text: bytes


class LaneParts(NamedTuple):
    """What a shm session hands the daemon's planned calls (host/lane.py): the request ring's bell (its
    reader), consumer and mapping, the response ring's bell (its writer), producer and data offset, and
    `install(lane or None)`: the session's take_bell asks the lane first."""

    requests: object         # native.NativeBell
    replies: object          # native.NativeBell
    consumer: object         # ring.Consumer
    request_buf: object      # native.MappedBuffer
    request_data: int        # the request ring's data offset in its mapping
    request_tail_off: int    # its tail word
    producer: object         # native.NativeProducer
    reply_data: int          # the response ring's data offset in its mapping
    install: object


def ring_view(ring: Ring, desc: TensorDesc) -> torch.Tensor:
    """A tensor aliasing the ring bytes a (validated) descriptor names."""
    if desc.nbytes == 0:
        return torch.empty(desc.shape, dtype=desc.dtype)
    return ring.tensor(desc.offset, desc.nbytes, desc.dtype, desc.shape)


def reserve_view(ring: Ring, shape, dtype: torch.dtype, timeout: float, what: str) -> tuple[TensorDesc, torch.Tensor]:
    """Reserve room for a tensor in `ring` (the caller is its producer) and return it as a writable view."""
    shape = tuple(map(int, shape))
    nbytes = dtype.itemsize * math.prod(shape)
    desc = TensorDesc(ring.producer.reserve(nbytes, timeout=timeout, what=what), nbytes, dtype, shape)
    return desc, ring_view(ring, desc)


def in_ring(ring: Ring, t: torch.Tensor) -> bool:
    """Whether `t`'s first byte lies in `ring`'s mapping."""
    base = ring.native.address
    return base <= t.data_ptr() < base + ring.native.nbytes


def describe_input(ring: Ring, t: torch.Tensor, staged: TensorDesc | None, wire_dtype, timeout: float
                   ) -> tuple[TensorDesc, int]:
    """Descriptor for a call's input `t` in request ring `ring` (the caller is its producer) and the ns its copy
    took: no copy if this call's request staged it there (`staged`); else one copy in (the C helper's memcpy,
    timed) or one converting copy (torch, when the wire dtype differs)."""
    if staged is not None and t.dtype == staged.dtype and t.is_contiguous():
        if t.shape == staged.shape:
            return staged, 0   # the buffer as it was staged (the common case: one comparison)
        if staged.nbytes == t.numel() * t.element_size():
            return TensorDesc(staged.offset, staged.nbytes, t.dtype, tuple(t.shape)), 0  # a view of it, any shape
    dtype = wire_dtype if wire_dtype is not None and t.is_floating_point() else t.dtype
    if t.requires_grad:   # (each of these makes a tensor object: ~1 us of a call's few)
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    nbytes = t.numel() * dtype.itemsize
    offset = ring.producer.reserve(nbytes, timeout=timeout)
    desc = TensorDesc(offset, nbytes, dtype, tuple(t.shape))
    if not nbytes:
        return desc, 0
    if dtype == t.dtype:
        return desc, ring.native.copy_in(ring.data_offset + offset, t.contiguous())
    start = now_ns()
    ring_view(ring, desc).copy_(t)
    return desc, now_ns() - start


def close_rings(*rings: Ring | None) -> None:
    for ring in rings:
        if ring is not None:
            ring.close()


def create_rings(capacity: int) -> tuple[Ring, Ring]:
    """A client's request and response rings (it owns both); none left behind if the second cannot be made."""
    req = Ring.create(capacity, "req", poison=settings.poison())
    try:
        return req, Ring.create(capacity, "rsp", poison=settings.poison())
    except BaseException:
        close_rings(req)
        raise


def accept_views(ring: Ring, end: int, descs) -> tuple[list[torch.Tensor], object]:
    """A message's tensors as views on `ring` (its consumer's side), tracked until the returned release() runs."""
    entry = ring.consumer.accept(end, descs)
    return [ring_view(ring, d) for d in descs], lambda: ring.consumer.release(entry)


def accept_rung(ring: Ring, rung: Rung) -> tuple[list[torch.Tensor], object]:
    """`accept_views` for a record taken through the doorbell: its shape's descriptors, made once (bell.py), and
    their views as Ring.tensor keeps them."""
    descs = rung.shape.descs
    entry = ring.consumer.accept(rung.ring_end, descs)
    return [ring_view(ring, d) for d in descs], lambda: ring.consumer.release(entry)


POS_LIMIT = 1 << 63   # a record's pos word (protocol.to_words' range)
CALL_SHAPES_KEPT = 4096   # call shapes a client keeps (~2.3 KB of C words each; a decode step has ~4 a layer a width)
REFUSED = frozenset((RESERVE_WAIT, RESERVE_TOO_LARGE, RESERVE_BAD_TAIL))   # a C call that did nothing: the Python path


class ReplyShape:
    """One reply shape a call had (`CallShape`): its descriptors, its tensors' bytes, and the views on the response ring
    where such a reply lies (made once per inference mode; made again where an `out=` resized one)."""

    __slots__ = ("descs", "nbytes", "_sizes", "_views", "_inference")

    def __init__(self, descs: tuple[TensorDesc, ...]):
        self.descs = descs
        self.nbytes = sum(d.nbytes for d in descs)
        self._sizes = [torch.Size(d.shape) for d in descs]
        self._views: list[torch.Tensor] | None = None
        self._inference = False

    def views(self, ring: Ring) -> list[torch.Tensor]:
        """The views (shared, as Ring.tensor's are: never changed in place; the list neither)."""
        views, inference = self._views, torch.is_inference_mode_enabled()
        if views is not None and inference is self._inference and (
                views[0].shape == self._sizes[0] if len(views) == 1 else [v.shape for v in views] == self._sizes):
            return views
        views = self._views = [ring_view(ring, d) for d in self.descs]
        self._inference = inference
        return views


class CallShape:
    """What the client knows of a call with one method, layer, op, wire dtype and inputs' shapes (ShmClient.call): its
    request record's words (C fills seq, pos, ring end and the inputs' offsets), its inputs' bytes, and the shapes of
    its last two replies (the words C compares the next reply's record with, and their `ReplyShape`s)."""

    __slots__ = ("code", "words", "nbytes", "payload_sent", "expect", "replies", "_next")

    def __init__(self, code: Method, words, descs: list[TensorDesc]):
        self.code, self.words = code, words
        self.nbytes = [d.nbytes for d in descs]
        self.payload_sent = sum(self.nbytes)
        # its last two replies' shapes (a reply lands at either lap start of the response ring, ring.py): their records'
        # words for C to compare with, and their ReplyShapes (`replies[same_reply - 1]`)
        self.expect = NativeCaller.expected_replies()
        self.replies = [ReplyShape(()), ReplyShape(())]
        self._next = 0

    def learn_reply(self, caller: NativeCaller, shape: RecordShape) -> None:
        """The reply the last call took (checked in C, shaped as `shape`): the next one shaped alike is known by one
        comparison in C."""
        caller.keep_reply(self.expect, self._next)
        self.replies[self._next] = ReplyShape(shape.descs)
        self._next ^= 1


class KnownReply(Reply):
    """The Reply of a call whose reply C recognised as shaped as one of its last two (ShmClient.call): views made for
    that shape before, the message accepted in C where nothing else was out (and released there), its CallStats made
    where someone reads them (from the C call's times, copied out as bytes)."""

    __slots__ = ("_entry", "_consumer", "_call")
    text, _release, aliases_transport = "", None, True   # (what every such reply has: class attributes, not slots)

    def __init__(self, views: list[torch.Tensor], entry: list, consumer, call: tuple, stats: CallStats | None):
        # (one store a line: a tuple's packing and unpacking cost ~80 ns more, on the path of every decode call)
        self._tensors = views
        self._stats = stats
        self._released = False
        self._entry = entry
        self._consumer = consumer
        self._call = call

    @property
    def stats(self) -> CallStats:
        if self._stats is None:
            self._stats = known_call_stats(*self._call)
        return self._stats

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._tensors = ()
        self._consumer.release_adopted(self._entry)


def known_call_stats(method: str, layer: int, op: int, t_start: int, t_decoded: int, shape: CallShape,
                     reply: ReplyShape, times: bytes) -> CallStats:
    """A known reply's CallStats: its call's times (NativeCaller.times_bytes) and its shapes' byte counts."""
    t_encoded, t_sent, t_replied, copy_ns, sent, _, _, work_ns, received, _ = CALL_TIMES.unpack(times)
    return CallStats(method, NAME, layer, t_start, t_encoded, t_sent, t_replied, t_decoded,
                     shape.payload_sent + sent, reply.nbytes + received, shape.payload_sent, reply.nbytes, copy_ns,
                     work_ns, op)


class RequestRingInputs:
    """A caller's inputs staged in its request ring `self.req` (reservations wait up to `self.timeout` seconds)."""

    req: Ring | None
    timeout: float

    def _alloc_input(self, shape: tuple, dtype: torch.dtype):
        return reserve_view(self.req, shape, dtype, self.timeout, "staged tensor")[::-1]

    def _in_request_memory(self, t: torch.Tensor) -> bool:
        return in_ring(self.req, t)


def _raise_if_error(bell: Doorbell, endpoint: str) -> None:
    if bell.is_error or bell.method == Method.Error:
        raise PeerError(f"daemon at {endpoint}: {printable(bell.text)}")


class ShmClient(RequestRingInputs, ClientTransport):
    name = NAME
    DOORBELLS = DOORBELLS

    def __init__(self, endpoint: str, *, timeout: float, enclave: bool = False, max_reply_bytes: int | None = None,
                 doorbell: str | None = None, backoff: Backoff | None = None):
        # replies are doorbells: no tensor bytes (max_reply_bytes does not matter here)
        super().__init__(endpoint, timeout=timeout, enclave=enclave, doorbell=doorbell)
        self.req: Ring | None = None
        self.rsp: Ring | None = None
        self.backoff = backoff or Backoff.configured()
        self._bell_out: BellOut | None = None   # --doorbell shm, from Attach on
        self._bell_in: BellIn | None = None
        self._caller: NativeCaller | None = None   # a call's C steps (`call`), from Attach on
        self._reply_bell: BellIn | None = None   # the words the caller checks replies into
        # by method, layer, op, wire dtype and the inputs' dtypes and shapes (False: a call the Python path makes)
        self._call_shapes: dict[tuple, CallShape | bool] = {}
        self.calls_in_c = False   # `call` in C (from Attach on; SHMRT_CALLS_IN_C=0: `_call_in_python`)
        self.known_replies = 0    # replies C recognised as shaped as one of their call's last two
        self._request_span = (0, 0)   # the request ring's mapping, [first, last + 1) (inputs inside it are staged)
        self._wake = protocol.encode(Doorbell(Method.Wake, 0, self.token))

    def message_limit(self, max_reply_bytes: int | None) -> int:
        # Tensors stay in the rings: every legal message is a doorbell, whatever the model's size.
        return protocol.encoded_size(protocol.MAX_TENSORS, protocol.MAX_TEXT)

    @property
    def label(self) -> str:
        """Line 1 of the log: SHM+IPC / SHM+TCP (the session's control channel); `+ZMQBELL` where every
        call's doorbell travels over ZeroMQ too."""
        return f"SHM+{endpoint_kind(self.endpoint)}" + ("" if self.doorbell == "shm" else "+ZMQBELL")

    # ---- session

    def _control(self, method: Method, text: str = "") -> Doorbell:
        seq = self._next_seq()
        self._send(protocol.encode(Doorbell(method, seq, self.token, text=text)))
        return self._decode_reply(self._recv(), seq, capacity=0)

    def _decode_reply(self, raw: bytes, seq: int, capacity: int) -> Doorbell:
        bell = protocol.decode(raw, capacity=capacity)
        _raise_if_error(bell, self.endpoint)  # errors first: they may predate the session's token
        if bell.token != self.token:
            raise ProtocolError("reply token does not match this session's token")
        if bell.seq != seq:
            raise ProtocolError(f"reply seq {bell.seq}, expected {seq}")
        return bell

    def hello(self, client_info: dict) -> dict:
        bell = self._control(Method.Hello, json.dumps(client_info))
        config = load_json(bell.text, "Hello reply text")
        if not isinstance(config, dict):
            raise ProtocolError("Hello reply is not a JSON object")
        return config

    def open_session(self, ring_bytes: int) -> None:
        """Create both rings (this side owns them), then Attach: the daemon maps them by name."""
        assert self.req is None, "session already open"
        capacity = align_up(ring_bytes, PAGE_BYTES)
        self.req, self.rsp = create_rings(capacity)
        self.ring_bytes = capacity
        self._control(Method.Attach, json.dumps({"req": self.req.name, "rsp": self.rsp.name, "capacity": capacity,
                                                 "doorbell": self.doorbell}))
        if self.doorbell == "shm":
            self._bell_out = BellOut(self.req, self.token)
            self._bell_in = BellIn(self.rsp, self.token, self.rsp.capacity)
            precise_sleeps()
        self.bind_caller()

    def bind_caller(self) -> None:
        """The C caller over this session's rings and doorbells as they are now (again after one is replaced: tests).
        With the ZeroMQ doorbell its records still are the rings' doorbells' (their codec, the session's token and
        the response ring's bounds), sent and received over the socket."""
        self.rsp.consumer.track_adopted()   # (a reply the last caller accepted is Python's to release now)
        requests = self._bell_out or BellOut(self.req, self.token)
        self._reply_bell = self._bell_in or BellIn(self.rsp, self.token, self.rsp.capacity)
        self._caller = NativeCaller(self.req.producer.native, self.req.data_offset, requests.native,
                                    self._reply_bell.native, self.backoff)
        # a known reply accepted (and released, poisoned where the consumer poisons) in C where nothing else is out
        consumer = self.rsp.consumer
        consumer.release_in_c = self._caller.accept_replies(consumer.state, OFF_TAIL, self.rsp.data_offset,
                                                            consumer.poison)
        self._request_span = (self.req.native.address, self.req.native.address + self.req.native.nbytes)
        self.calls_in_c = settings.calls_in_c()

    # ---- calls

    def call(self, method: str, tensors=(), *, layer: int = -1, op: int = 0, pos: int = 0,
             wire_dtype=None) -> Reply:
        """One call in one C call (native.NativeCaller: the inputs' copies, the publish, the record's post, the wait's
        first slice, the reply's take and check) where every input is staged in the ring or a contiguous CPU tensor in
        its wire dtype outside it, the call's shape is known (`CallShape`: its record's words, made once) and the ring
        has room now; else `_call_in_python`. A reply shaped as one of the call's last two is recognised in C: its
        descriptors are theirs, no Python decodes it."""
        assert self.req is not None, "open_session() first"
        t_start = now_ns()
        claims = self._claim_inputs(method, tensors) if self._pending is not None else None
        if not self.calls_in_c:
            return self._call_in_python(method, tensors, claims, layer, op, pos, wire_dtype, t_start)
        # what fixes a call's CallShape: its method, layer, op, wire dtype and each input's dtype and shape, flat (one
        # and two inputs spelled out: a comprehension's frame costs more than the rest of the key, ~0.25 us)
        n = len(tensors)
        if n == 1:
            t = tensors[0]
            key = (method, layer, op, wire_dtype, t.dtype, t.shape)
        elif n == 2:
            t, u = tensors
            key = (method, layer, op, wire_dtype, t.dtype, t.shape, u.dtype, u.shape)
        else:
            key = (method, layer, op, wire_dtype, *[a for t in tensors for a in (t.dtype, t.shape)])
        shape = self._call_shapes.get(key)
        if shape is None:
            shape = self._learn_call(key, tensors, wire_dtype)
        if not shape or not 0 <= pos < POS_LIMIT:   # (the Python path words a pos out of range)
            return self._call_in_python(method, tensors, claims, layer, op, pos, wire_dtype, t_start)
        caller = self._caller
        sources, words = caller.sources, shape.words
        low, high = self._request_span
        i = 0
        for t in tensors:
            staged = claims[i] if claims is not None else None
            if staged is None:
                address = t.data_ptr()
                if low <= address < high or not t.is_cpu or not t.is_contiguous():
                    # (a view on the ring no request staged: the Python path refuses it)
                    return self._call_in_python(method, tensors, claims, layer, op, pos, wire_dtype, t_start)
                sources[i] = address
            elif staged.nbytes == shape.nbytes[i] and staged.dtype == t.dtype and t.is_contiguous():
                sources[i] = 0
                words[HEAD_WORDS + i * DESC_WORDS] = staged.offset
            else:
                return self._call_in_python(method, tensors, claims, layer, op, pos, wire_dtype, t_start)
            i += 1
        seq = self.seq + 1
        times = caller.times
        if self._bell_out is not None:
            # with observers to serve while the daemon works (the perf log's rows), nothing waited in C: they run first
            rc = caller.call_c(words, sources, seq, pos, shape.expect,
                               0 if self.observers and self._idle_observers else WAIT_SLICE_NS, times)
            self.seq = seq
            if rc != TOOK:
                rc = caller.answer(rc)
                if rc in REFUSED:   # no room now, or never, or a scribbled tail: nothing was done (seq not used)
                    self.seq = seq - 1
                    return self._call_in_python(method, tensors, claims, layer, op, pos, wire_dtype, t_start)
                if rc != SLOW:
                    if rc == CALL_ASLEEP:   # the daemon sleeps on ZeroMQ: wake it
                        self._send_wake()
                    self._while_waiting()   # (then the wait's clock starts: its backoff is the wait's own)
                    rc = self._await_reply(seq, shape.code, shape.expect, now_ns())
            raw = None
        else:   # the ZeroMQ doorbell: the record encoded in C, sent and received here, the reply checked in C
            rc = caller.encode(words, seq, pos)
            if rc in REFUSED:
                return self._call_in_python(method, tensors, claims, layer, op, pos, wire_dtype, t_start)
            self.seq = seq
            self._send(caller.record())
            times.t_sent = now_ns()
            self._while_waiting()
            raw = self._recv()
            times.t_replied = now_ns()
            rc = caller.check(raw, seq, shape.code, shape.expect)
        # shaped as one of this call's last two replies: their descriptors and views; accepted in C where nothing else
        # was out (`accepted` says which of the two: the one field read on this path), else here
        accepted = times.accepted
        known = accepted or times.same_reply
        if known:
            reply = shape.replies[known - 1]
            consumer = self.rsp.consumer
            entry = consumer.adopt(reply.descs) if accepted else consumer.accept(times.ring_end, reply.descs)
            self.known_replies += 1
            views = reply.views(self.rsp)
            call = (method, layer, op, t_start, now_ns(), shape, reply, caller.times_bytes[:])
            stats = None
            if self.observers:
                stats = known_call_stats(*call)
                self._notify(stats)
            return KnownReply(views, entry, consumer, call, stats)
        stats = CallStats(method, NAME, layer, t_start=t_start, op=op, t_encoded=times.t_encoded, t_sent=times.t_sent,
                          t_replied=times.t_replied, copy_in_ns=times.copy_ns)
        if raw is None:
            bell, received = self._taken_reply(rc, seq, shape.code), times.received
        else:
            received = len(raw)   # (a text lies in `raw`, not in the bell's copy: protocol.decode reads it)
            if rc == TOOK and not caller.reply_text_length():
                bell = self._reply_bell.record(rc, seq)
            else:
                bell = self._checked_reply(raw, seq, shape.code)
        if type(bell) is Rung:
            shape.learn_reply(caller, bell.shape)
        return self._reply(bell, stats, shape.payload_sent, times.sent_length, received)

    def _call_in_python(self, method: str, tensors, claims, layer: int, op: int, pos: int, wire_dtype, t_start: int
                        ) -> Reply:
        """One call, each of its steps a call into C or ZeroMQ of its own: a ZeroMQ doorbell's, one whose inputs need
        a converting copy, one that waits for room in the ring, SHMRT_CALLS_IN_C=0."""
        if claims is None:
            claims = self._claim_inputs(method, tensors)
        stats = CallStats(method, self.name, layer, t_start=t_start, op=op)
        code = Method[method]
        descs = []
        for t, staged in zip(tensors, claims):
            desc, copy_ns = describe_input(self.req, t, staged, wire_dtype, self.timeout)
            descs.append(desc)
            stats.copy_in_ns += copy_ns
        ring_end = self.req.producer.publish()
        seq = self._next_seq()
        payload_sent = sum(d.nbytes for d in descs)
        if self._bell_out is not None:
            # encoded straight into the ring header's slot and rung, in one C call (the log's Send)
            stats.t_encoded = now_ns()
            asleep, sent = self._bell_out.post_call(code, seq, layer, op, pos, ring_end, descs)
            if asleep:   # the daemon sleeps on ZeroMQ: wake it (one that stopped rang its goodbye in the ring)
                self._send_wake()
            stats.t_sent = now_ns()
            self._while_waiting()
            rc = self._await_reply(seq, code, NativeCaller.NO_REPLIES, now_ns())
            stats.t_replied = self._caller.times.t_replied
            return self._reply(self._taken_reply(rc, seq, code), stats, payload_sent, sent,
                               self._caller.times.received)
        payload = protocol.encode(Doorbell(code, seq, self.token, layer, op, pos, ring_end, tensors=tuple(descs)))
        stats.t_encoded = now_ns()
        self._send(payload)
        stats.t_sent = now_ns()
        self._while_waiting()
        raw = self._recv()
        stats.t_replied = now_ns()
        return self._reply(self._checked_reply(raw, seq, code), stats, payload_sent, len(payload), len(raw))

    def _learn_call(self, key: tuple, tensors, wire_dtype) -> CallShape | bool:
        """A call's CallShape, made once per key (`call`); False (kept too, so that it is not asked again) where an input
        is not in its wire dtype (a converting copy: Python's) or has no bytes."""
        if len(self._call_shapes) >= CALL_SHAPES_KEPT:
            self._call_shapes.clear()
        if any(wire_dtype is not None and t.is_floating_point() and t.dtype != wire_dtype or not t.numel()
               for t in tensors):
            self._call_shapes[key] = False
            return False
        method, layer, op = key[:3]
        descs = [TensorDesc(0, t.numel() * t.element_size(), t.dtype, tuple(t.shape)) for t in tensors]
        code = Method[method]
        shape = self._call_shapes[key] = CallShape(code, NativeCaller.words(protocol.to_words(code, 0, layer, op, 0, 0,
                                                                                              descs)), descs)
        return shape

    def _reply(self, bell: Rung | Doorbell, stats: CallStats, payload_sent: int, sent: int, received: int) -> Reply:
        """The call's Reply: the reply's tensors as views on the response ring (accepted: released with the Reply),
        its stats completed and handed to the observers."""
        if type(bell) is Rung:   # the reply's record, checked in C: its shape's views
            tensors = bell.shape.descs
            out, release = accept_rung(self.rsp, bell)
        else:
            tensors = bell.tensors
            out, release = accept_views(self.rsp, bell.ring_end, tensors)
        stats.t_decoded = now_ns()
        stats.payload_sent = payload_sent
        stats.payload_recv = sum(d.nbytes for d in tensors)
        stats.sent_bytes = payload_sent + sent
        stats.recv_bytes = stats.payload_recv + received
        stats.work_ns = bell.work_ns
        self._notify(stats)
        return Reply(out, stats, bell.text, release=release)

    def _send_wake(self) -> None:
        """A Wake for a daemon asleep on ZeroMQ; none where no daemon takes messages now (it stopped, or died): the
        wait that follows looks at the ring and the socket, and --timeout bounds it."""
        try:
            self._sock.send(self._wake, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _checked_reply(self, raw: bytes, seq: int, method: Method) -> Doorbell:
        bell = self._decode_reply(raw, seq, self.rsp.capacity)
        if bell.method != method:
            raise ProtocolError(f"reply method {bell.method.name}, expected {method.name}")
        return bell

    def _await_reply(self, seq: int, method: Method, expect, start: int) -> int:
        """Wait for the reply of call `seq` (rung at `start`) in the response ring's doorbell: TOOK (checked in C, in the
        caller's words; `times.same_reply` says whether it is shaped as one of `expect`'s) or SLOW (its copy, for
        `_taken_reply`). Waits spinning, then yielding, then sleeping (native.Backoff), in C; between slices it looks
        at the ZeroMQ socket, where only an Error can come (the daemon dropped the session, or a restarted daemon
        never had it); --timeout bounds it all, from `start` (the bell rung, and the observers' turn over)."""
        limit = int(self.timeout * 1e9)
        caller = self._caller
        while True:
            rc = caller.await_reply(seq, method, expect, start, WAIT_SLICE_NS)
            if rc != TIMEOUT:
                return rc
            if self._sock.poll(0, zmq.POLLIN):
                self._refuse_socket_message(self._sock.recv(copy=True))
            self._raise_if_disconnected()   # (a daemon killed outright rings no goodbye)
            if now_ns() - start > limit:
                raise self._no_answer()

    def _taken_reply(self, rc: int, seq: int, method: Method) -> Rung | Doorbell:
        """The reply `_await_reply` took: its checked record's shape and fields, or its copy decoded (an Error raised)."""
        bell = self._reply_bell.record(rc, seq)
        return self._checked_reply(bell, seq, method) if type(bell) is bytes else bell

    def _refuse_socket_message(self, raw: bytes) -> None:
        """A message on the socket during a call rung through the ring: an Error (raised as PeerError), or
        a protocol violation."""
        bell = protocol.decode(raw, capacity=0)
        _raise_if_error(bell, self.endpoint)
        raise ProtocolError(f"the daemon sent a {bell.method.name} over ZeroMQ during a call whose doorbell "
                            "is in shared memory")

    def _close_message(self) -> bytes | None:
        return protocol.encode(Doorbell(Method.Close, self._next_seq(), self.token)) if self.req else None

    def close(self) -> None:
        super().close()
        self._bell_out = self._bell_in = self._caller = self._reply_bell = None
        self.calls_in_c = False
        self._call_shapes.clear()   # (their views on the response ring)
        close_rings(self.req, self.rsp)
        self.req = self.rsp = None


class ShmReplyBuilder(ReplyBuilder):
    def __init__(self, ring: Ring, timeout: float):
        self.ring = ring
        self.capacity = ring.capacity
        self.timeout = timeout
        self.descs: list[TensorDesc] = []
        self.reserved: list[tuple[int, int]] = []   # (offset, nbytes) of each reservation, in order

    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        desc, view = reserve_view(self.ring, shape, dtype, self.timeout, "reply tensor")
        self.descs.append(desc)
        self.reserved.append((desc.offset, desc.nbytes))
        return view

    def claim(self, nbytes: int, offsets) -> int | None:
        """The whole reply as one reservation of `nbytes` where it lands at one of `offsets` (a remembered call's
        reply places: host/graphs.py's plans): its offset; None, with the ring as it was, where it lands elsewhere.
        The caller fills `descs` itself. None too where a message is open (an earlier call failed after reserving)."""
        producer = self.ring.producer
        if not producer.mark():
            return None
        offset = producer.reserve(nbytes, timeout=self.timeout, what="reply tensors")
        if offset in offsets:
            self.reserved.append((offset, nbytes))
            return offset
        producer.rewind()
        return None

    def unclaim(self) -> None:
        """Take back the reservation `claim` just made (nothing reserved since)."""
        self.reserved.pop()
        self.ring.producer.rewind()

    def alloc_joined(self, shapes, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One reservation for all of them where each but the last ends on a descriptor boundary (a multiple of
        protocol.RING_ALIGN bytes: a decode step's q|k|v and gate|up), its parts carved out of one view; else one
        reservation each and no joined view (each reservation starts aligned, so padding would part them)."""
        shapes = [tuple(map(int, shape)) for shape in shapes]
        sizes = [math.prod(shape) for shape in shapes]
        if len(shapes) > 1 and not any(n * dtype.itemsize % protocol.RING_ALIGN for n in sizes[:-1]):
            nbytes = sum(sizes) * dtype.itemsize
            offset = self.ring.producer.reserve(nbytes, timeout=self.timeout, what="reply tensors")
            self.reserved.append((offset, nbytes))
            joined = ring_view(self.ring, TensorDesc(offset, nbytes, dtype, (sum(sizes),)))
            parts = []
            for shape, n in zip(shapes, sizes):
                desc = TensorDesc(offset, n * dtype.itemsize, dtype, shape)
                self.descs.append(desc)
                parts.append(ring_view(self.ring, desc))   # the ring's kept view of these bytes: no split, no views
                offset += desc.nbytes
            return parts, joined
        return super().alloc_joined(shapes, dtype)   # one each: alignment padding parts them anyway


class ShmServerSession(ServerSession):
    transport = NAME

    def __init__(self, token: bytes, *, reply_timeout: float = 1.0):
        super().__init__(token)
        self.req: Ring | None = None
        self.rsp: Ring | None = None
        self.reply_timeout = reply_timeout
        self.bell_in: BellIn | None = None    # --doorbell shm: requests rung in the request ring's header
        self.bell_out: BellOut | None = None  # ... and replies in the response ring's
        # the daemon's planned calls (host/lane.py, installed through `lane_parts`): `serve(expect_seq)` takes the
        # next request bell and serves it whole where a plan answers it (LANE_SERVED), else answers as a take does
        self.lane = None

    def _attach(self, text: str) -> None:
        if self.req is not None:
            raise ProtocolError("Attach sent twice in one session: its rings are attached already")
        info = load_json(text, "Attach text (the rings' names)")
        if not isinstance(info, dict):
            raise ProtocolError("Attach text must be a JSON object {req, rsp, capacity}")
        capacity = info.get("capacity")
        if type(capacity) is not int or not 0 < capacity <= MAX_RING_BYTES or capacity % PAGE_BYTES:
            raise ProtocolError(f"Attach capacity {capacity!r}, expected a multiple of {PAGE_BYTES} up to {MAX_RING_BYTES}")
        req_name = check_segment_name(info.get("req"))
        rsp_name = check_segment_name(info.get("rsp"))
        doorbell = info.get("doorbell", "zmq")
        if doorbell not in DOORBELLS:
            raise ProtocolError(f"Attach doorbell {printable(repr(doorbell), 40)}, expected one of {DOORBELLS}")
        self.req = Ring.attach(req_name, capacity, poison=settings.poison())
        try:
            self.rsp = Ring.attach(rsp_name, capacity, poison=settings.poison())
        except BaseException:
            close_rings(self.req)
            self.req = None
            raise
        if doorbell == "shm":
            self.bell_in = BellIn(self.req, self.token, self.req.capacity)
            self.bell_out = BellOut(self.rsp, self.token)

    def decode(self, payload: bytes | Rung) -> Request:
        if type(payload) is Rung:   # a model RPC's record of this session, checked in C (take_bell)
            self.expect_seq += 1
            views, release = accept_rung(self.req, payload)
            shape = payload.shape
            return Request(shape.method.name, payload.seq, shape.layer, shape.op, payload.pos, views, payload.text,
                           release, rung=True, descs=shape.descs)
        if protocol.peek_method(payload) == Method.Wake:
            return self._wake(payload)
        capacity = self.req.capacity if self.req is not None else 0
        try:
            bell = protocol.decode(payload, capacity=capacity, token=self.token, expect_seq=self.expect_seq)
        except ProtocolError as exc:
            if self.req is None and protocol.peek_method(payload) not in (Method.Attach, Method.Close):
                raise ProtocolError(f"request before Attach: no rings attached ({exc})") from None
            raise
        self.expect_seq += 1
        if bell.flags or bell.method in (Method.Error, Method.Hello):
            raise ProtocolError(f"method {bell.method.name} is not a request in an open session")
        if bell.method == Method.Attach:
            if bell.tensors:
                raise ProtocolError(f"Attach carries {len(bell.tensors)} tensor(s), expected none")
            self._attach(bell.text)
            return Request("Attach", bell.seq, control=True)
        if bell.method != Method.Close and self.req is None:
            raise ProtocolError(f"{bell.method.name} before Attach: no rings attached "
                                "(the client sends Attach with its ring names right after Hello)")
        release = None
        views = []
        if self.req is not None and bell.method != Method.Close:
            views, release = accept_views(self.req, bell.ring_end, bell.tensors)
        return Request(bell.method.name, bell.seq, bell.layer, bell.op, bell.pos, views, bell.text, release,
                       descs=bell.tensors if views else None)

    def _wake(self, payload: bytes) -> Request:
        """A client that found us asleep on ZeroMQ: nothing to do but look at the ring (the server does)."""
        bell = protocol.decode(payload, capacity=0, token=self.token, expect_seq=0)
        if self.bell_in is None or bell.flags or bell.tensors or bell.text:
            raise ProtocolError("Wake is a bare doorbell (seq 0, no tensors, no text) of a session whose "
                                "doorbell is in shared memory")
        return Request("Wake", 0, control=True, answer=False)

    # ---- the shared-memory doorbell (server.py drives these)

    def bell_address(self) -> int | None:
        """The word a new request bell changes (None: this session rings over ZeroMQ)."""
        return self.bell_in.address if self.bell_in is not None else None

    def take_bell(self) -> Rung | bytes | object | None:
        """The next request if one was rung: SERVED where the planned lane served it whole, else a model RPC's record
        checked in C (a Rung) or its private copy for `decode`; None if nothing was rung."""
        if self.lane is None:
            return self.bell_in.take_checked(self.expect_seq)
        rc = self.lane.serve(self.expect_seq)
        if rc == LANE_SERVED:
            self.expect_seq += 1
            return SERVED
        return None if rc == NONE else self.bell_in.record(rc, self.expect_seq)

    def lane_parts(self) -> LaneParts | None:
        """What the daemon's planned calls need of this session: None before its rings are attached. With the ZeroMQ
        doorbell the lane checks records and encodes replies as the rings' doorbells would (their codec, the session's
        token, the request ring's bounds), and they travel over the socket (`serve_planned`)."""
        if self.req is None:
            return None
        requests = self.bell_in or BellIn(self.req, self.token, self.req.capacity)
        replies = self.bell_out or BellOut(self.rsp, self.token)
        return LaneParts(requests.native, replies.native, self.req.consumer, self.req.native,
                         self.req.data_offset, OFF_TAIL, self.rsp.producer.native, self.rsp.data_offset,
                         self._install_lane)

    def _install_lane(self, lane) -> None:
        self.lane = lane

    def serve_planned(self, payload: bytes) -> bytes | None:
        """A request that came over ZeroMQ served whole by the planned lane: its reply's record, to send; None where the
        lane does not serve it (nothing changed: `decode` it)."""
        if self.lane is None or self.bell_in is not None:
            return None
        reply = self.lane.serve_record(payload, self.expect_seq)
        if reply is not None:
            self.expect_seq += 1
        return reply

    def post_reply(self, payload: bytes | RungReply) -> None:
        """Ring `payload` (a reply or an Error we encoded) in the response ring under its own seq, the one
        the client waits for. The client never sleeps on ZeroMQ: no Wake to send."""
        if type(payload) is RungReply:
            self.bell_out.post_words(payload.words, payload.text)
        else:
            self.bell_out.post(payload, int.from_bytes(payload[8:16], "little"))

    def goodbye(self, message: str) -> bytes:
        """Rung in the response ring too, under the seq of the client's next call (the one it waits on, or will):
        a message ZeroMQ still held when the daemon's socket closed is lost with the connection."""
        error = super().goodbye(message)
        if self.bell_out is not None:
            self.post_reply(error)
        return error

    def sleep(self, asleep: bool) -> bool:
        """Tell the client we sleep on ZeroMQ (or no longer); True if a request bell is waiting."""
        return self.bell_in.sleep(asleep) if self.bell_in is not None else False

    def reply_builder(self) -> ShmReplyBuilder:
        return ShmReplyBuilder(self.rsp, self.reply_timeout)

    def encode_reply(self, request: Request, builder: ShmReplyBuilder, *, work_ns: int = 0, text: str = ""
                     ) -> bytes | RungReply:
        ring_end = self.rsp.producer.publish() if self.rsp is not None and not request.control else 0
        return self._reply(request, builder, ring_end, work_ns, text)

    def _reply(self, request: Request, builder: ShmReplyBuilder | None, ring_end: int, work_ns: int, text: str
               ) -> bytes | RungReply:
        """The reply's record: bytes, or - a request rung through the ring - its words for the C encoder."""
        descs = builder.descs if builder else ()
        if text and self.bell_out is not None:
            text = fit_text(text, MAX_RECORD - protocol.encoded_size(len(descs)))
        if request.rung and self.bell_out is not None:
            words = protocol.to_words(Method[request.method], request.seq, -1, 0, 0, ring_end, descs)
            words[protocol.WORK_NS_WORD] = work_ns
            return RungReply(words, text.encode("utf-8") if text else b"")
        return protocol.encode(Doorbell(Method[request.method], request.seq, self.token, ring_end=ring_end,
                                        work_ns=work_ns, tensors=tuple(descs), text=text))

    def encode_reply_ahead(self, request: Request, builder: ShmReplyBuilder, text: str = ""
                           ) -> tuple[bytearray | RungReply, int]:
        """The reply names offsets in the response ring, which its reservations fixed: encoded while a device
        may still be copying results there. `finish_reply` publishes the ring's head once they are written."""
        ring_end = self.rsp.producer.head
        reply = self._reply(request, builder, ring_end, 0, text)
        return (reply if type(reply) is RungReply else bytearray(reply)), ring_end

    def finish_reply(self, ahead: tuple[bytearray | RungReply, int], work_ns: int) -> bytes | RungReply:
        record, ring_end = ahead
        published = self.rsp.producer.publish()
        assert published == ring_end, (published, ring_end)   # nothing reserved between the two
        if type(record) is RungReply:
            record.words[protocol.WORK_NS_WORD] = work_ns
            return record
        protocol.set_work_ns(record, work_ns)
        return bytes(record)

    def encode_error(self, seq: int, message: str) -> bytes:
        return encode_error(self.token, seq, message, MAX_RECORD if self.bell_out is not None else None)

    def pinned_buffers(self) -> list:
        """Both ring mappings: a CUDA daemon registers them (cudaHostRegister) so copies are DMA."""
        return [r.native for r in (self.req, self.rsp) if r is not None]

    def peer_died(self) -> None:
        # The creator cannot unlink any more; nobody else will use these names.
        for ring in (self.req, self.rsp):
            if ring is not None:
                unlink_segment(ring.name)

    def close(self) -> None:
        self.lane = None   # (the handler's session closed it first: server.py drops the model's state, then this)
        self.bell_in = self.bell_out = None
        close_rings(self.req, self.rsp)
        self.req = self.rsp = None


Client = ShmClient
Session = ShmServerSession
