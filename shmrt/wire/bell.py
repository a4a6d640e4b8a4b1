"""The shared-memory doorbell: with `--doorbell shm` (the default of the shm transport) a call's doorbell
record travels through the header page of the ring its tensors are in, not over ZeroMQ. ZeroMQ keeps
session control (Hello, Attach, Close, errors outside a call) and wakes a daemon that went to sleep.

Per ring (ring.py's header: `bell seq`, `asleep`, the bell slot), the ring's producer rings and its
consumer answers the door:

  post (producer)   write [length u64][record] into the slot (a client's request, and the daemon's reply to
                    one rung this way, is encoded there, in C, from its fields), release-store the record's seq into `bell seq`, full fence, load
                    the consumer's `asleep` word: 1 means send a Wake over ZeroMQ (the consumer is
                    blocked there).
  take (consumer)   acquire-load `bell seq`; unchanged: nothing new. Else copy the length and then the
                    record out once; the seq must be the one it expects (any other value: ProtocolError,
                    the peer scribbled the word, never a wait that outlives --timeout), the length at most a
                    record's, and the copy is validated: in the same C call where it is the session's next
                    model RPC with every field in its common range (the fast path: a strict subset of what
                    protocol.decode accepts), else by protocol.decode, which names what is wrong.
  sleep (consumer)  store asleep=1, full fence, load `bell seq` once more: a bell that came meanwhile is
                    served, not slept through; asleep=0 on waking. Both sides store, fence, then load
                    the other's word, so either the producer sees asleep=1 and sends a Wake or the
                    consumer sees the new seq: no bell is lost (Dekker's handshake).

Who writes what: the client writes the request ring's `bell seq` and slot, the daemon the request ring's
`asleep` word; the daemon writes the response ring's `bell seq` and slot. The client never sleeps on
ZeroMQ during a call (it backs off to 1 ms sleeps, see native.Backoff), so it never sets `asleep`.
Calls alternate strictly (the next request is posted only after its reply was read), so an honest
producer never rewrites a slot its consumer is still copying; a hostile one may, and copy-then-validate
covers that: the worst it can do is a record that fails validation.
"""
from __future__ import annotations

from typing import NamedTuple

from ..errors import ProtocolError
from . import protocol
from .native import DESC_WORDS, HEAD_WORDS, NONE, RECORD_LAYOUT, SLOW, TOOK, NativeBell, record_codec
from .protocol import Method, TensorDesc
from .ring import BELL_SLOT_BYTES, OFF_ASLEEP, OFF_BELL_SEQ, OFF_BELL_SLOT, Ring

MAX_RECORD = BELL_SLOT_BYTES - 8  # bytes of one doorbell record (the slot's first word is its length)
# What the C helper's fast path accepts (a record of a model RPC, every field as protocol.decode's fast path wants
# it): protocol.py's constants. Anything else it hands to protocol.decode, which names what is wrong.
assert RECORD_LAYOUT == (protocol.encoded_size(0), protocol.encoded_size(1) - protocol.encoded_size(0),
                         protocol.MAX_TENSORS, protocol.MAX_NDIM), "the C helper's record layout is not protocol.py's"
assert (HEAD_WORDS, DESC_WORDS) == (protocol.HEAD_WORDS, protocol.DESC_WORDS)
_CODEC = record_codec(protocol.MAGIC, protocol.PROTOCOL_VERSION, [protocol.Method[m].value for m in protocol.RPC_METHODS],
                      {code: dt.itemsize for code, (_, dt) in protocol.DTYPES.items()}, protocol.MAX_DIM,
                      protocol.RING_ALIGN)


class BellOut:
    """The producer's side of one ring's doorbell."""

    def __init__(self, ring: Ring, token: bytes):
        """`token`: the session's, which `post_call` and `post_words` write into each record."""
        self.ring = ring
        self._native = NativeBell(ring.native, _CODEC, seq_off=OFF_BELL_SEQ, slot_off=OFF_BELL_SLOT,
                                  slot_cap=BELL_SLOT_BYTES, flag_off=OFF_ASLEEP, token=token)

    @property
    def native(self) -> NativeBell:
        return self._native

    def post(self, record: bytes, seq: int) -> bool:
        """Publish `record` as doorbell `seq`; True if the consumer sleeps on ZeroMQ (send it a Wake)."""
        assert len(record) <= MAX_RECORD, len(record)
        return self.ring.native.post_bell(OFF_BELL_SLOT, BELL_SLOT_BYTES, record, OFF_BELL_SEQ, seq, OFF_ASLEEP) != 0

    def post_call(self, method: int, seq: int, layer: int, op: int, pos: int, ring_end: int, tensors
                  ) -> tuple[bool, int]:
        """Encode a request of this session (its token) straight into the slot and publish it, in one C call:
        (whether the consumer sleeps on ZeroMQ, the record's bytes)."""
        return self._native.post(protocol.to_words(method, seq, layer, op, pos, ring_end, tensors))

    def post_words(self, words: list[int], text: bytes) -> bool:
        """Encode a record from its words (protocol.to_words' layout; the token is this session's) and its text
        straight into the slot and publish it, in one C call; True if the consumer sleeps on ZeroMQ."""
        assert len(text) <= MAX_RECORD - protocol.encoded_size(words[8]), len(text)
        return self._native.post(words, text)[0]


KNOWN_RECORDS = 4096  # distinct records a BellIn remembers (a decode step has ~8 a layer across the two lap starts:
                      # 256 was fewer than a 32-layer model's); past that it starts over


class RecordShape:
    """What a checked record fixes beyond its seq, pos, ring_end, work_ns and text: method, layer, op and its tensors'
    descriptors, made once per distinct record (BellIn's `_known`; a decode step's records repeat call after call:
    the lap rule of ring.py)."""

    __slots__ = ("method", "layer", "op", "descs")

    def __init__(self, method: Method, layer: int, op: int, descs: tuple[TensorDesc, ...]):
        self.method, self.layer, self.op, self.descs = method, layer, op, descs


class Rung(NamedTuple):
    """A record of the session's next model RPC (or of its reply) that the C helper took and checked: its shape,
    known from an earlier record with the same fixed words or made now, and the fields each call changes."""

    shape: RecordShape
    seq: int
    pos: int
    ring_end: int
    work_ns: int
    text: str


class BellIn:
    """The consumer's side of one ring's doorbell: the last seq it took, and the word to wait on. Records of the
    session's model RPCs are taken and checked in one C call (`take_checked`; a client's within its call's, shmrt_call)
    and come back as a Rung; any other comes back as its private copy for protocol.decode."""

    def __init__(self, ring: Ring, token: bytes, capacity: int):
        """`token`: the session's (a record with another is not the fast path's); `capacity`: the sender's ring data
        bytes (descriptors are checked against it)."""
        self.ring = ring
        self.token = token
        self.address = ring.native.word_address(OFF_BELL_SEQ)
        # `bell seq` starts at 0 (the creator zeroes it); records start at the session's first RPC
        self._native = NativeBell(ring.native, _CODEC, seq_off=OFF_BELL_SEQ, slot_off=OFF_BELL_SLOT,
                                  slot_cap=BELL_SLOT_BYTES, token=token, capacity=capacity, record_cap=MAX_RECORD)
        # checked records' fixed words (NativeBell.checked_key: from the private copy C checked, never the slot, which
        # the peer may rewrite) -> their shape: the descriptors of a repeated record are made once, not per call
        # (bench/take_paths.py: a take 10-15% shorter on 2 cores)
        self._known: dict[tuple, RecordShape] = {}

    @property
    def native(self) -> NativeBell:
        return self._native

    @property
    def seen(self) -> int:
        return self._native.seen

    def take_checked(self, expect_seq: int, method: int = 0) -> Rung | bytes | None:
        """The next record: None if none was posted; a Rung if it is call `expect_seq` of `method` (0: any
        model RPC) with this session's token, checked in C; else its private copy (bytes) for protocol.decode. One
        C call loads the seq word and the length once each, copies the record once and checks the copy."""
        rc = self._native.take(expect_seq, method)
        return None if rc == NONE else self.record(rc, expect_seq)

    def record(self, rc: int, expect_seq: int) -> Rung | bytes:
        """What a take that found a new seq word brought (its answer `rc`, TOOK or SLOW; the take may have been a
        planned lane's, host/lane.py, which fills the same words): the checked record, or the copy (`_copy`)."""
        if rc != TOOK:
            assert rc == SLOW, rc
            return self._copy(expect_seq)
        native = self._native
        key = native.checked_key()
        shape = self._known.get(key)
        if shape is None:
            shape = self._learn(key)
        seq, pos, ring_end, work_ns, text_len = native.checked_fields()
        text = ""
        if text_len:
            try:
                text = native.text(protocol.encoded_size(len(shape.descs)), text_len).decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("doorbell text is not valid UTF-8") from None
        return Rung(shape, seq, pos, ring_end, work_ns, text)

    def _learn(self, key: tuple) -> RecordShape:
        """The shape of the record just checked, made from its words and remembered under its `key`."""
        bell = protocol.from_words(self._native.checked(), self.token)
        if len(self._known) >= KNOWN_RECORDS:
            self._known.clear()
        shape = self._known[key] = RecordShape(bell.method, bell.layer, bell.op, bell.tensors)
        return shape

    def _copy(self, expect_seq: int) -> bytes:
        """The last take's private copy, validated as far as its seq word and length go (the rest is
        protocol.decode's)."""
        seq, length, record = self._native.taken()
        if seq != expect_seq:
            raise ProtocolError(f"ring {self.ring.name}: doorbell sequence word {seq}, expected {self.seen} "
                                f"(nothing new) or {expect_seq} (the next call): the peer scribbled the ring header")
        if length > MAX_RECORD or record is None:
            raise ProtocolError(f"ring {self.ring.name}: doorbell record length {length}, expected at most {MAX_RECORD}")
        return record

    def sleep(self, asleep: bool) -> bool:
        """Set this side's `asleep` word (store, fence, load); True if a bell is waiting already."""
        return self.ring.native.store_fence_load(OFF_ASLEEP, int(asleep), OFF_BELL_SEQ) != self.seen
