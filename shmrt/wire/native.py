"""The only module that touches cffi: timed copies, header-word atomics, the doorbell's waits and records, and
the enclave's one-pass rows (a decode step's residual and norm).

Every buffer is checked (contiguous, writable where written, large enough) before
`ffi.from_buffer`, and every C return code is mapped to an exception here, in one place.
"""
from __future__ import annotations

import functools
import os
import struct
import time
from dataclasses import dataclass

import torch

from .. import settings
from ..errors import ProtocolError, SetupError

try:
    from ._native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise SetupError(
        "shmrt's C helper (shmrt._native) is not built. Install the package so cffi compiles it: "
        "`pip install -e .` (needs gcc), or build it in place: `python native/build_native.py`."
    ) from exc


# CLOCK_MONOTONIC in ns, the clock the C helper stamps with (shmrt_now_ns): Python's own reading of it is a builtin,
# ~0.1 us against ~0.28 for the C call through cffi, and a call reads it 5-8 times on each side.
now_ns = time.monotonic_ns


def _check_rc(rc: int, what: str) -> None:
    if rc == lib.SHMRT_OK:
        return
    if rc == lib.SHMRT_E_BOUNDS:
        raise ProtocolError(f"{what}: range lies outside the mapped buffer")
    if rc == lib.SHMRT_E_ALIGN:
        raise ProtocolError(f"{what}: header word is not 8-byte aligned")
    if rc == lib.SHMRT_E_FULL:
        raise SetupError(f"{what}: more than {lib.SHMRT_FAULT_SLOTS} rings mapped by one process")
    if rc == lib.SHMRT_E_SYS:
        raise SetupError(f"{what}: {os.strerror(ffi.errno)}")
    if rc in (lib.SHMRT_E_TIMEOUT, lib.SHMRT_E_SLOW, lib.SHMRT_E_NONE):
        raise AssertionError(f"{what}: return code {rc} is an answer, not an error; the caller handles it")
    raise AssertionError(f"unknown return code {rc} from {what}")


def _tensor_address(t: torch.Tensor) -> int:
    """The address of a contiguous CPU tensor's first byte. (`is_cpu`, not `t.device.type`: that builds a device
    object and its name, ~0.4 us warm and 15-20 us on a decode step's cold caches, measured on 2 cores.)"""
    if not t.is_cpu:
        raise ValueError("tensor must be in CPU memory for a native copy")
    if not t.is_contiguous():
        raise ValueError("tensor must be contiguous for a native copy")
    return t.data_ptr()


class MappedBuffer:
    """A shared mapping seen by the C helper: bounds-checked timed copies and header atomics.

    The cffi view is taken once (`ffi.from_buffer` is not free); `release()` drops it so the
    underlying mmap can be closed.
    """

    def __init__(self, buf):
        self._buf = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        self.nbytes = len(self._buf)
        self._base = int(ffi.cast("uintptr_t", self._buf))   # (`address`: asked on every staged input's check)
        self.message_starts: tuple[int, ...] = ()   # addresses a message's first tensor returns to (Ring sets them)
        self._word_out = ffi.new("uint64_t *")

    def copy_in(self, offset: int, src: torch.Tensor) -> int:
        """Copy `src`'s bytes to [offset, offset + src.nbytes) of the mapping; returns the ns the copy took (timed
        inside the C helper)."""
        ns = lib.shmrt_copy_in(self._buf, self.nbytes, offset, _tensor_address(src), src.numel() * src.element_size())
        if ns < 0:
            _check_rc(ns, "copy_in")
        return ns

    def copy_within(self, dst: int, src: int, nbytes: int) -> int:
        """Copy [src, src + nbytes) of the mapping to [dst, dst + nbytes) (apart); the ns the copy took."""
        if not (0 <= src <= self.nbytes - nbytes and nbytes >= 0):
            raise ProtocolError(f"copy from {src}: outside the mapped buffer")
        ns = lib.shmrt_copy_in(self._buf, self.nbytes, dst, self._base + src, nbytes)
        if ns < 0:
            _check_rc(ns, "copy_within")
        return ns

    @property
    def address(self) -> int:
        """The mapping's base address (for cudaHostRegister)."""
        return self._base

    def load(self, offset: int) -> int:
        """Acquire-load the 64-bit word at `offset`. (The header words go through here a few times a call on each
        side: the return code is looked at only when it is not SHMRT_OK, 0.28 us a load against 0.57.)"""
        out = self._word_out
        rc = lib.shmrt_load_acquire(self._buf, self.nbytes, offset, out)
        if rc:
            _check_rc(rc, "load_acquire")
        return out[0]

    def store(self, offset: int, value: int) -> None:
        """Release-store the 64-bit word at `offset`."""
        rc = lib.shmrt_store_release(self._buf, self.nbytes, offset, value)
        if rc:
            _check_rc(rc, "store_release")

    def word_address(self, offset: int) -> int:
        """The address of the 8-byte-aligned word at `offset` (for `WordWaiter`)."""
        if not 0 <= offset <= self.nbytes - 8:
            raise ProtocolError(f"word at {offset}: outside the mapped buffer")
        address = self.address + offset
        if address % 8:
            raise ProtocolError(f"word at {offset}: not 8-byte aligned")
        return address

    def post_bell(self, slot_off: int, slot_cap: int, record: bytes, seq_off: int, seq: int, flag_off: int) -> int:
        """Write a doorbell record into its slot, release-store `seq`, fence, and return the reader's
        asleep flag (see shmrt_bell_post)."""
        flag = self._word_out
        _check_rc(lib.shmrt_bell_post(self._buf, self.nbytes, slot_off, slot_cap, record, len(record),
                                      seq_off, seq, flag_off, flag), "posting a doorbell")
        return int(flag[0])

    def store_fence_load(self, store_off: int, value: int, load_off: int) -> int:
        out = self._word_out
        _check_rc(lib.shmrt_store_fence_load(self._buf, self.nbytes, store_off, value, load_off, out),
                  "store_fence_load")
        return int(out[0])

    def release(self) -> None:
        if self._buf is not None:
            ffi.release(self._buf)
            self._buf = None


# ---- doorbell records encoded, posted, taken and checked in C (bell.py drives these)

RECORD_WORDS = lib.SHMRT_RECORD_WORDS
HEAD_WORDS = lib.SHMRT_HEAD_WORDS
DESC_WORDS = lib.SHMRT_DESC_WORDS
# header bytes, descriptor bytes, tensors and dims at most: what the C helper's record layout assumes
RECORD_LAYOUT = (lib.SHMRT_HEADER_BYTES, lib.SHMRT_DESC_BYTES, lib.SHMRT_MAX_TENSORS, lib.SHMRT_MAX_NDIM)
TOOK, SLOW, NONE, TIMEOUT = lib.SHMRT_OK, lib.SHMRT_E_SLOW, lib.SHMRT_E_NONE, lib.SHMRT_E_TIMEOUT


def record_codec(magic: bytes, version: int, rpc_codes, itemsizes: dict[int, int], max_dim: int, align: int):
    """What a record may hold, for the C helper's fast path (shmrt_codec): protocol.py's constants."""
    c = ffi.new("shmrt_codec *")
    c.magic = list(magic)
    c.version = version
    for code in rpc_codes:
        c.rpc[code] = 1
    for code, size in itemsizes.items():
        c.itemsize[code] = size
    c.max_dim, c.align = max_dim, align
    return c


class NativeBell:
    """One side of one ring's doorbell as the C helper sees it (shmrt_bell): set up once, then one C call a
    post (`post`) or a take (`take`). `words` holds the record a take checked (RECORD_WORDS,
    the header's layout). The mapping must outlive it (bell.py drops it first)."""

    def __init__(self, buf: MappedBuffer, codec, *, seq_off: int, slot_off: int, slot_cap: int, flag_off: int = 0,
                 token: bytes = bytes(16), capacity: int = 0, record_cap: int = 0):
        b = ffi.new("shmrt_bell *")
        self._token = ffi.new("uint8_t[16]", list(token))
        self._record = ffi.new("uint8_t[]", max(record_cap, 1))
        self._codec = codec   # cdata the struct points at: alive as long as it is
        b.base, b.base_len, b.seq_off, b.slot_off, b.slot_cap = buf._buf, buf.nbytes, seq_off, slot_off, slot_cap
        b.flag_off, b.codec, b.token, b.capacity = flag_off, codec, self._token, capacity
        b.record, b.record_cap = self._record, record_cap
        self.c = b
        self.words = ffi.new("uint64_t[]", RECORD_WORDS)
        self._descs = ffi.buffer(self.words + HEAD_WORDS, 8 * (RECORD_WORDS - HEAD_WORDS))   # the descriptors' words
        self._out = ffi.new("uint64_t[2]")   # a post's asleep flag and the record's length
        self._length = self._out + 1

    def post(self, words: list[int], text: bytes = b"") -> tuple[bool, int]:
        """Encode `words` (header words then descriptors' words) and `text` into the slot and ring it: (whether the
        consumer sleeps on ZeroMQ, the record's bytes)."""
        if len(words) != HEAD_WORDS + DESC_WORDS * words[8]:   # C reads exactly these (a temporary array of them)
            raise ValueError(f"a record of {words[8]} tensors is {HEAD_WORDS + DESC_WORDS * words[8]} words, got {len(words)}")
        out = self._out   # (the list goes to C as a temporary array: a slice into `words` first cost ~1 us more)
        _check_rc(lib.shmrt_bell_post_words(self.c, words, text, len(text), out, self._length), "posting a doorbell")
        return out[0] != 0, out[1]

    def take(self, expect_seq: int, expect_method: int) -> int:
        """TOOK (`checked()` has the record), NONE or SLOW (`taken()`: what came, for protocol.decode)."""
        rc = lib.shmrt_bell_take_record(self.c, expect_seq, expect_method, self.words)
        if rc in (TOOK, NONE, SLOW):
            return rc
        _check_rc(rc, "taking a doorbell")
        return rc

    def checked(self) -> list[int]:
        """The words of the record the last take checked (header and its descriptors)."""
        return ffi.unpack(self.words, HEAD_WORDS + DESC_WORDS * self.words[8])

    def checked_key(self) -> tuple:
        """What the record the last take checked fixes beyond its seq, pos, ring_end, work_ns and text: its method,
        layer and op words and its descriptors' words (as bytes). Records with equal keys name the same tensors
        in the same places (the fast path takes no flags)."""
        w = self.words
        return w[0], w[3], w[4], self._descs[:8 * DESC_WORDS * w[8]]

    def checked_fields(self) -> tuple[int, int, int, int, int]:
        """The rest of that record: seq, pos, ring_end, work_ns and its text's length."""
        w = self.words
        return w[2], w[5], w[6], w[7], w[9]

    def text(self, at: int, n: int) -> bytes:
        return ffi.buffer(self._record + at, n)[:]

    @property
    def seen(self) -> int:
        return self.c.seen

    @property
    def taken_length(self) -> int:
        return self.c.taken_length

    def taken(self) -> tuple[int, int, bytes | None]:
        """The last take's seq word and length as loaded, and its copy (None where it did not fit)."""
        length = self.c.taken_length
        fits = length <= self.c.record_cap and length <= self.c.slot_cap - 8
        return self.c.taken_seq, length, ffi.buffer(self._record, length)[:] if fits else None


# ---- a ring's producer in C (ring.py drives it and words its refusals: it knows the ring)

RESERVE_WAIT, RESERVE_TOO_LARGE, RESERVE_BAD_TAIL = lib.SHMRT_E_WAIT, lib.SHMRT_E_TOO_LARGE, lib.SHMRT_E_TAIL
RESERVE_ALIGNMENTS = (lib.SHMRT_SMALL_ALIGN, lib.SHMRT_LARGE_ALIGN, lib.SHMRT_LARGE_TENSOR)   # ring.py's, asserted there


class NativeProducer:
    """A ring's producer state as the C helper keeps it (shmrt_producer, shmrt_ring.c): one C call a reservation,
    one a publish. `c` is the struct (its fields are the state: head, known_tail, floor, published, seen_tail,
    released, ...). The mapping must outlive it: `detach()` before the mapping goes, after which no call touches
    memory (a reservation that would is refused, SHMRT_E_BOUNDS)."""

    def __init__(self, buf: MappedBuffer, *, capacity: int, head_off: int, tail_off: int, starts: tuple[int, ...],
                 laps_until: int):
        assert 1 <= len(starts) <= 2, starts
        p = ffi.new("shmrt_producer *")
        p.base, p.base_len, p.capacity, p.head_off, p.tail_off = buf._buf, buf.nbytes, capacity, head_off, tail_off
        p.starts = list(starts) + [0] * (2 - len(starts))
        p.n_starts, p.laps_until = len(starts), laps_until
        self.c = p
        self._buf = buf._buf   # the cdata the struct points into: alive as long as this is
        self._marked = ffi.new("shmrt_producer *")   # `mark`'s copy of the state
        self._has_mark = False

    def mark(self) -> bool:
        """Remember the state, between two messages: `rewind` undoes the reservations made since (a reservation
        changes nothing but this struct; only a publish writes the ring). False, nothing remembered, in the middle
        of a message (a call that failed after reserving leaves one open)."""
        self._has_mark = not self.c.in_message
        if self._has_mark:
            self._marked[0] = self.c[0]
        return self._has_mark

    def rewind(self) -> None:
        """Back to the state at the last `mark`, once, keeping the mapping as it is now (detached stays detached).
        Never across a publish: that would take back a message the peer may be reading."""
        assert self._has_mark and self.c.published == self._marked.published, "rewind without a mark, or past a publish"
        self._has_mark = False
        base, base_len = self.c.base, self.c.base_len
        self.c[0] = self._marked[0]
        self.c.base, self.c.base_len = base, base_len

    def reserve(self, nbytes: int) -> int:
        """The data offset of `nbytes` reserved (>= 0), or RESERVE_WAIT, RESERVE_TOO_LARGE, RESERVE_BAD_TAIL."""
        at = lib.shmrt_reserve(self.c, nbytes)
        if at < 0 and at not in (RESERVE_WAIT, RESERVE_TOO_LARGE, RESERVE_BAD_TAIL):
            _check_rc(at, "reserving ring space")
        return at

    def publish(self) -> None:
        rc = lib.shmrt_publish(self.c)
        if rc:
            _check_rc(rc, "publishing a message")

    def detach(self) -> None:
        self.c.base, self.c.base_len = ffi.NULL, 0
        self._buf = None


def consumer_state():
    """A ring consumer's private positions (shmrt_consumer: accepted_end, tail, outstanding), zeroed."""
    return ffi.new("shmrt_consumer *")


# ---- the enclave's calls in C (shm_transport.py's ShmClient: shmrt_call.c)

CALL_ASLEEP = lib.SHMRT_CALL_ASLEEP


class NativeCaller:
    """shmrt_caller: one C call a request, from its inputs' copies to its reply's checked record (`call_c`). Holds the
    structs it points into as long as it lives; their mappings must outlive it (the client drops it first; the release
    `accept_replies` hands out goes to the response ring's consumer, which the ring detaches before it unmaps)."""

    def __init__(self, producer: NativeProducer, request_data: int, requests: NativeBell, replies: NativeBell,
                 backoff: "Backoff"):
        """Its calls wait as a WaitPolicy of `backoff` does (in C)."""
        c = ffi.new("shmrt_caller *")
        c.producer, c.request_data, c.requests, c.replies, c.reply_words = (producer.c, request_data, requests.c,
                                                                             replies.c, replies.words)
        c.backoff, c.after_long = backoff.to_c()[0], backoff.after_long().to_c()[0]
        c.long_ns = int(backoff.yield_us * 1e3)
        self.c = c
        self._replies = replies
        self._keep = (producer, requests, replies)
        self.sources = ffi.new("uint64_t[]", lib.SHMRT_MAX_TENSORS)
        self.times = ffi.new("shmrt_call_times *")
        self.times_bytes = ffi.buffer(self.times)   # `times_bytes[:]`: a call's times, as CALL_TIMES unpacks them
        # shmrt_call over this caller: call_c(words, sources, seq, pos, expect_reply, budget_ns, times), `sources` and
        # `times` this caller's (as shmrt_call says; `answer` for its rc), no Python frame between: a client's hot path
        self.call_c = functools.partial(lib.shmrt_call, c)
        self._record = ffi.new("uint8_t[]", lib.SHMRT_HEADER_BYTES + lib.SHMRT_MAX_TENSORS * lib.SHMRT_DESC_BYTES)

    def accept_replies(self, consumer, tail_offset: int, data_offset: int, poison: bool):
        """Let calls accept a reply shaped as expected into `consumer` (a consumer_state()) where it has no other
        message out (`times.accepted`: which of the two it is shaped as); the response ring's tail word and data area
        at `tail_offset` and `data_offset` of its mapping; `poison`: its release overwrites the reply's tensor bytes
        with 0xFF, as the Consumer's does. Returns the release of such a reply: `release()`, shmrt_call_release (0:
        released; NONE: another is out since)."""
        c = self.c
        c.reply_consumer, c.reply_tail_off, c.reply_data_off, c.poison = consumer, tail_offset, data_offset, poison
        self._consumer = consumer
        release = functools.partial(lib.shmrt_call_release, c)
        release.caller = self   # (c points into the bells and the producer this caller keeps alive)
        return release

    @staticmethod
    def words(record: list[int]):
        """A request's record words as C memory (a template `call_c` completes: seq, pos, ring end, offsets)."""
        return ffi.new("uint64_t[]", record)

    NO_REPLIES = ffi.NULL   # an expect_reply that no reply matches

    @staticmethod
    def expected_replies():
        """Room for the words of two replies a call expects (`call_c`'s expect_reply), none yet (zeros match
        nothing)."""
        return ffi.new("uint64_t[]", 2 * RECORD_WORDS)

    def keep_reply(self, expected, which: int) -> None:
        """Copy the words of the reply the last call took and checked into `expected`'s record `which` (0 or 1)."""
        ffi.memmove(expected + which * RECORD_WORDS, self._replies.words, 8 * RECORD_WORDS)

    def reply_text_length(self) -> int:
        """The text bytes of the reply the last call checked."""
        return self._replies.words[9]

    @staticmethod
    def answer(rc: int) -> int:
        """`call_c`'s rc, where it is one of its answers, returned: TOOK (the reply's record in the reply bell's words;
        `times.same_reply` 1 or 2 where it is shaped as the first or second record of `expect_reply`, the
        `expected_replies()` that `keep_reply` filled), SLOW, TIMEOUT, CALL_ASLEEP, or a reservation's RESERVE_WAIT,
        RESERVE_TOO_LARGE or RESERVE_BAD_TAIL (nothing done); an error's rc raised. (The client's hot path calls
        `call_c` itself, and this only where the rc is not TOOK.)"""
        if rc == TOOK or rc in _CALL_ANSWERS:
            return rc
        _check_rc(rc, "making a call")
        return rc

    def encode(self, words, seq: int, pos: int) -> int:
        """`call_c` with the ZeroMQ doorbell, to its record: TOOK (`record()` holds it, to send), or a reservation's
        RESERVE_WAIT, RESERVE_TOO_LARGE or RESERVE_BAD_TAIL (nothing done)."""
        rc = lib.shmrt_call_encode(self.c, words, self.sources, seq, pos, self._record, len(self._record), self.times)
        if rc == TOOK or rc in _CALL_ANSWERS:
            return rc
        _check_rc(rc, "making a call")
        return rc

    def record(self):
        """The request record `encode` made (a buffer ZeroMQ sends from)."""
        return ffi.buffer(self._record, self.times.sent_length)

    def check(self, record: bytes, seq: int, method: int, expect_reply) -> int:
        """The reply to `encode`'s call, as it came over ZeroMQ, checked as `call_c` checks a reply: TOOK (in the reply
        bell's words, `times.same_reply` set) or SLOW (for protocol.decode)."""
        return lib.shmrt_call_check(self.c, record, len(record), seq, method, expect_reply, self.times)

    def await_reply(self, seq: int, method: int, expect_reply, rung_ns: int, budget_ns: int) -> int:
        """`call_c`'s wait alone, for the reply of call `seq` (rung at `rung_ns`): TOOK, SLOW or TIMEOUT."""
        rc = lib.shmrt_call_await(self.c, seq, method, expect_reply, rung_ns, budget_ns, self.times)
        if rc == TOOK or rc == SLOW or rc == TIMEOUT:
            return rc
        _check_rc(rc, "waiting for a reply")
        return rc


# shmrt_call_times as bytes (NativeCaller.times_bytes), field by field
CALL_TIMES = struct.Struct("<10Q")
assert CALL_TIMES.size == ffi.sizeof("shmrt_call_times")
_CALL_ANSWERS = frozenset((SLOW, TIMEOUT, CALL_ASLEEP, RESERVE_WAIT, RESERVE_TOO_LARGE, RESERVE_BAD_TAIL))


# ---- the daemon's planned calls in C (host/lane.py fills the plans; the enclave never calls these, nor shmrt_lane.c)

LANE_SERVED = lib.SHMRT_LANE_SERVED
PLAN_PLAIN, PLAN_SCORES, PLAN_OUTPUT, PLAN_EMBEDDING, PLAN_ECHO = (
    lib.SHMRT_PLAN_PLAIN, lib.SHMRT_PLAN_SCORES, lib.SHMRT_PLAN_OUTPUT, lib.SHMRT_PLAN_EMBEDDING, lib.SHMRT_PLAN_ECHO)
KEY_WORDS = lib.SHMRT_KEY_WORDS


class NativeLane:
    """shmrt_lane (shmrt_lane.c): a session's plans as C entries (`put`, `remove`) and one C call a request
    (`serve`). Runs each plan's CUDA graph through `cuda` (the runtime's cudaGraphLaunch and cudaStreamSynchronize
    addresses, and the stream), or, where an entry has no graph, calls `run(handle)` (a Python function: the CPU
    stand-in). Holds the structs it points into (the bells', the producer's, the consumer's) as long as it lives;
    their mappings must outlive it (the session drops it first)."""

    def __init__(self, requests: NativeBell, replies: NativeBell, consumer, request_buf: MappedBuffer, request_data: int,
                 request_tail_off: int, poison: bool, producer: NativeProducer, reply_data: int, capacity: int,
                 run=None, cuda: tuple[int, int, int] | None = None):
        lane = ffi.new("shmrt_lane *")
        self.plans = ffi.new("shmrt_plan[]", capacity)
        self.capacity = capacity
        lane.requests, lane.request_words, lane.replies, lane.consumer = requests.c, requests.words, replies.c, consumer
        lane.request_base, lane.request_len = request_buf._buf, request_buf.nbytes
        lane.request_data, lane.request_tail_off, lane.poison = request_data, request_tail_off, int(poison)
        lane.producer, lane.reply_data, lane.plans = producer.c, reply_data, self.plans
        self._reply = ffi.new("uint8_t[]", lib.SHMRT_HEADER_BYTES + lib.SHMRT_MAX_TENSORS * lib.SHMRT_DESC_BYTES)
        self._length = ffi.new("uint64_t *")
        self._keep = (requests, replies, consumer, request_buf._buf, producer)
        self.error: BaseException | None = None
        self._run = run
        if run is not None:
            self._callback = ffi.callback("int(uint64_t)", self._on_run, error=-1, onerror=self._on_error)
            lane.run = self._callback
        if cuda is not None:
            launch, sync, stream = cuda
            lane.launch, lane.sync = ffi.cast("shmrt_launch_fn", launch), ffi.cast("shmrt_sync_fn", sync)
            lane.stream = ffi.cast("void *", stream)
        self.c = lane

    def _on_run(self, handle: int) -> int:
        self._run(handle)
        return 0

    def _on_error(self, exc_type, exc, tb) -> None:
        self.error = exc

    def put(self, index: int, key: list[int], kind: int, reply_nbytes: int, places: list[tuple[int, list[int], int, int]],
            *, width: int = 0, filled=(0, 0), generation=(0, 0), expect_generation=(0, 0), word: int = 0,
            id_offset: int = 0, id_bytes: int = 0, vocab: int = 0) -> None:
        """Entry `index`: a request record's fixed words `key` (method, layer, op, tensor count, then the
        descriptors' words) and its plan: `places` as (the reply's offset, its record's words, the graph's exec
        address or 0, the run handle). `filled`, `generation` and `word`: addresses of int64 / uint64 words (0:
        none) the plan's checks read and its run writes."""
        assert 0 <= index < self.capacity and len(key) <= KEY_WORDS and 1 <= len(places) <= 2, (index, len(key), places)
        p = self.plans[index]
        p.nkey = 0   # (free while it is written: a serve never runs between, but say so)
        p.key[0:len(key)] = key
        p.kind, p.places, p.reply_nbytes, p.width = kind, len(places), reply_nbytes, width
        for i, (offset, words, exec_address, handle) in enumerate(places):
            p.reply_offset[i], p.handle[i] = offset, handle
            p.reply_words[i][0:len(words)] = words
            p.exec[i] = ffi.cast("void *", exec_address)
        for i in range(2):
            p.filled[i] = ffi.cast("int64_t *", filled[i])
            p.generation[i] = ffi.cast("uint64_t *", generation[i])
            p.expect_generation[i] = expect_generation[i]
        p.word = ffi.cast("int64_t *", word)
        p.id_offset, p.id_bytes, p.vocab = id_offset, id_bytes, vocab
        p.nkey = len(key)
        self.c.n_plans = max(self.c.n_plans, index + 1)

    def remove(self, index: int) -> None:
        self.plans[index].nkey = 0

    def clear(self) -> None:
        for i in range(self.c.n_plans):   # (every entry free: none keeps a graph's address for a later `put` to meet)
            self.plans[i].nkey = 0
        self.c.n_plans = 0

    def serve(self, expect_seq: int) -> int:
        """LANE_SERVED, TOOK (the record taken and checked, for Python), NONE or SLOW; a failed run raises."""
        return self._answer(lib.shmrt_lane_serve(self.c, expect_seq))

    def serve_record(self, record: bytes, expect_seq: int) -> bytes | None:
        """A request whose record came over ZeroMQ: its reply's record where the lane served it, else None (Python
        decodes and serves it; nothing changed); a failed run raises."""
        rc = self._answer(lib.shmrt_lane_serve_record(self.c, record, len(record), expect_seq, self._reply,
                                                      len(self._reply), self._length))
        return ffi.buffer(self._reply, self._length[0])[:] if rc == LANE_SERVED else None

    def _answer(self, rc: int) -> int:
        if rc in (LANE_SERVED, TOOK, NONE, SLOW):
            return rc
        if rc == lib.SHMRT_E_RUN:
            error, self.error = self.error, None
            if error is not None:
                raise error
            raise SetupError(f"a planned call's run failed (its CUDA graph's error or the echo's code: {self.c.run_rc})")
        _check_rc(rc, "serving a planned call")
        return rc

    def detach(self) -> None:
        """No more serves (the session's mappings go): a serve after this is refused, SHMRT_E_BOUNDS."""
        self.clear()
        self.c.requests = ffi.NULL
        self._keep = None


def cuda_graph_runtime() -> tuple[int, int] | None:
    """The addresses of cudaGraphLaunch and cudaStreamSynchronize in the CUDA runtime this process loaded (torch's),
    or None where none is loaded."""
    global _CUDART
    if _CUDART is None:
        path = None
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    name = line.rsplit(None, 1)[-1] if line.count(" ") >= 5 else ""
                    if os.path.basename(name).startswith("libcudart.so"):
                        path = name
                        break
        except OSError:
            return None
        if path is None:
            return None
        import cffi
        abi = cffi.FFI()
        abi.cdef("int cudaGraphLaunch(void *exec, void *stream); int cudaStreamSynchronize(void *stream);")
        _CUDART = (abi, abi.dlopen(path))
    abi, rt = _CUDART
    return tuple(int(abi.cast("uintptr_t", abi.addressof(rt, name))) for name in ("cudaGraphLaunch", "cudaStreamSynchronize"))


_CUDART = None


# ---- waiting for words another process writes (the shared-memory doorbell, bell.py)

def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the CPU count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Backoff:
    """How a waiter spends its time, by how long it has waited: spin until `spin_us`, sched_yield until
    `yield_us`, then sleep a quarter of the time waited so far, within [sleep_min_us, sleep_max_us].

    The defaults suit a machine with few cores, where a spinning waiter takes a core from the other side's
    compute (measured on 2 cores, `small`: spinning 2 ms doubled decode time), but a yielding one does not:
    sched_yield hands the core to whatever else is runnable there. So it spins briefly and then yields through
    a whole decode call (0.3-1 ms there) before it sleeps: on 2 cores, `small`, yielding up to 5 ms instead of
    0.2 ms took the wait per call from ~380 to ~160 us and decode from 69.6 to 55.1 ms/token, prefill and the
    daemon's work no slower (bench/results/cpu-2core-session7-yield). `for_host()` spins longer where cores are plenty
    (a GPU host): a reply or request that comes while the waiter spins is seen within a microsecond, one that
    comes while it sleeps costs the wake-up (tens of us in a VM, more for the sleep's own granularity)."""

    spin_us: float = 50.0
    yield_us: float = 5000.0
    sleep_min_us: float = 20.0
    sleep_max_us: float = 1000.0

    AFTER_LONG_SPIN_US = 50.0     # after a wait past yield_us: at most this much spinning and yielding (WordWaiter)
    AFTER_LONG_YIELD_US = 200.0

    MANY_CORES = 8          # from this many usable CPUs on, waiters spin through a whole call
    MANY_CORES_SPIN_US = 1000.0
    MANY_CORES_YIELD_US = 2000.0

    @classmethod
    def for_host(cls, cpus: int | None = None) -> "Backoff":
        """The policy for this machine: spin through a call's typical span (~1 ms) with MANY_CORES usable
        CPUs or more, else the few-core defaults."""
        if cpus is None:
            cpus = usable_cpus()
        if cpus >= cls.MANY_CORES:
            return cls(spin_us=cls.MANY_CORES_SPIN_US, yield_us=cls.MANY_CORES_YIELD_US)
        return cls()

    @classmethod
    def configured(cls) -> "Backoff":
        """SHMRT_BACKOFF's four values (settings.backoff_us), else the policy for this host (`for_host`)."""
        values = settings.backoff_us()
        return cls(*values) if values else cls.for_host()

    def after_long(self) -> "Backoff":
        """How a waiter waits after a wait that outlasted the spin and yield phases (WaitPolicy's rule)."""
        return Backoff(min(self.spin_us, self.AFTER_LONG_SPIN_US), min(self.yield_us, self.AFTER_LONG_YIELD_US),
                       self.sleep_min_us, self.sleep_max_us)

    def to_c(self):
        b = ffi.new("shmrt_backoff *")
        b.spin_ns, b.yield_ns = int(self.spin_us * 1e3), int(self.yield_us * 1e3)
        b.sleep_min_ns, b.sleep_max_ns = int(self.sleep_min_us * 1e3), int(self.sleep_max_us * 1e3)
        return b


class WaitPolicy:
    """Which backoff a waiter's next wait uses: its own, or after a wait that outlasted the spin and yield phases,
    one that spins and yields no longer than AFTER_LONG_*. Waits come in runs (a prefill's calls and gaps take ms,
    a decode step's ~0.1-1 ms), and a waiter spinning 1 ms through the other side's long compute takes a core from
    it (a daemon doing so after each prefill reply made the client's 16-thread prefill math 10% slower on an H200
    host). Not less: on 2 cores, sleeping from the start (no spin, no yield) after long waits cost 10 ms per
    decoded token (small), whose short calls followed long ones. Used by WordWaiter; shmrt_call.c keeps the same
    rule for a client's calls (native.NativeCaller)."""

    def __init__(self, backoff: Backoff):
        self._backoff = backoff.to_c()
        self._after_long = backoff.after_long().to_c()
        self._long_ns = int(backoff.yield_us * 1e3)
        self.last_wait_long = False

    def current(self):
        """The C backoff (shmrt_backoff) for the next wait."""
        return self._after_long if self.last_wait_long else self._backoff

    def note(self, waited_ns: int) -> None:
        """A wait on `current()` ended after `waited_ns` with something seen."""
        self.last_wait_long = waited_ns > self._long_ns


class WordWaiter:
    """Waits for any of a fixed set of words (addresses from `MappedBuffer.word_address`, whose mappings
    outlive this waiter) to differ from the value last seen there, or for a file descriptor (a ZeroMQ
    socket's ZMQ_FD; -1: none) to become readable."""

    SOCKET = -2  # what `wait` returns when the descriptor became readable

    def __init__(self, addresses: list[int], backoff: Backoff, fd: int = -1):
        self.n = len(addresses)
        self.fd = fd
        self._words = ffi.new("uint64_t[]", [int(a) for a in addresses] or [0])
        self.seen = ffi.new("uint64_t[]", max(self.n, 1))
        self.policy = WaitPolicy(backoff)

    def wait(self, waited_ns: int, budget_ns: int) -> int:
        """The index of a word that changed (acquire), SOCKET when the descriptor is readable, or -1 when
        `budget_ns` passed first. `waited_ns`: how long the caller has waited already (the backoff phase)."""
        start = now_ns()
        rc = lib.shmrt_wait_any(self._words, self.seen, self.n, self.fd, self.policy.current(), waited_ns, budget_ns)
        if rc >= 0:
            self.policy.note(waited_ns + now_ns() - start)
            return rc if rc < self.n else self.SOCKET
        if rc == lib.SHMRT_E_TIMEOUT:
            return -1
        _check_rc(rc, "waiting for a doorbell")
        return -1


_slack_set = False


def precise_sleeps() -> None:
    """1 us timer slack for this thread (default 50 us): a waiter's short sleeps end when asked."""
    global _slack_set
    if not _slack_set:
        _slack_set = lib.shmrt_set_timer_slack(1000) == lib.SHMRT_OK


# ---- the enclave's rows: a decode step's residual and RMSNorm in one pass (enclave/llama.py). Built into the
# same helper (native/shmrt_rows.c) so that the enclave loads one compiled module, not two.

def _row(t: torch.Tensor, n: int) -> bool:
    return t.dtype is torch.float32 and t.numel() == n and t.is_contiguous() and t.is_cpu


def residual_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                      out: torch.Tensor | None) -> bool | None:
    """h += delta (None: nothing added); then, given `out` (and `weight`), out = RMSNorm(h) * weight (one row, HF's
    LlamaRMSNorm); True if h is all finite, False if not; None where these are not one row it takes (every tensor
    a contiguous float32 row of h's length in CPU memory: checked here, the C helper reads and writes that many
    floats at each address): the caller computes it another way."""
    assert (weight is None) == (out is None), "a norm needs both its weight and its output"
    n = h.numel()
    if n != h.shape[-1] or not _row(h, n) or (delta is not None and not _row(delta, n)) \
            or (out is not None and not (_row(out, n) and _row(weight, n))):
        return None
    return lib.shmrt_residual_rms_norm(h.data_ptr(), 0 if delta is None else delta.data_ptr(),
                                       0 if out is None else weight.data_ptr(), 0 if out is None else out.data_ptr(),
                                       n, eps) == 1


# ---- fault guard: a segment the host shrinks under us ends the process with one line (see ring.py)

_fault_program = "shmrt"


def set_fault_program(name: str) -> None:
    """What the fault line starts with, e.g. "shmrt client" (so it reads like the CLI's other errors)."""
    global _fault_program
    _fault_program = name


def fault_program() -> str:
    return _fault_program


def guard_mapping(buf: MappedBuffer, path: str, line: str) -> int:
    """Have the C helper's SIGBUS handler own faults in `buf`'s mapping: `line` to stderr, every
    guarded `path` unlinked, exit status 2. Returns a slot for `unguard_mapping`."""
    _check_rc(lib.shmrt_fault_install(), "installing the SIGBUS handler")
    data = line.encode("utf-8", "replace")[:lib.SHMRT_FAULT_LINE_MAX]
    slot = lib.shmrt_fault_register(ffi.cast("uint8_t *", buf.address), buf.nbytes, path.encode(), data, len(data))
    if slot < 0:
        _check_rc(slot, "guarding a ring mapping")
    return slot


def unguard_mapping(slot: int) -> None:
    lib.shmrt_fault_unregister(slot)
