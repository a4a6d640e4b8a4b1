"""A single-producer / single-consumer byte ring in one POSIX shared-memory segment.

Memory only: layout, positions, views, create/attach/close/unlink. No sockets, no torch.
One segment per direction (client->daemon requests, daemon->client responses).

Layout (little-endian; every header word on its own 64-byte line):

    offset  size  field          written by            when
    ------  ----  -------------  --------------------  ----------------------------
         0     8  magic          creator               once, before anyone attaches
         8     4  layout version creator               once
        12     4  header bytes   creator               once (HEADER_BYTES)
        16     8  capacity       creator               once (bytes in the data area)
        24     8  owner pid      creator               once (for `shmrt cleanup`)
        32     8  created ns     creator               once (CLOCK_REALTIME)
        64     8  head           producer              release-store after writing data
       128     8  tail           consumer              release-store after it is done reading
       192     8  bell seq       producer              release-store after writing the bell slot
       256     8  asleep         consumer              1 before it sleeps on ZeroMQ, 0 when awake
      1024  3072  bell slot      producer              length (8 bytes) + one doorbell record
      4096   cap  data area      producer writes [tail, head); consumer reads it

The bell words and slot are the shared-memory doorbell (bell.py): with `--doorbell shm` the producer
of a ring also sends its doorbells through that ring's header, not over ZeroMQ.

Positions (head, tail) are byte counters that only grow; a position maps to the data
offset `pos % capacity`. An allocation never straddles the end: if it does not fit before
the end, the producer skips to the next lap (the skipped bytes count as used).

A message that finds the ring empty starts at a lap start: when the producer begins a message and the
tail it loads equals its head (every byte released), it moves head on to the next position whose data
offset is 0 or, every other time, half the capacity (`lap_starts`), so the message's first tensor lies
there (at 0 where that tensor would not fit between the half and the end: an empty ring holds any tensor up
to its capacity). Calls alternate, so a ring is empty at nearly every message, and a decode step's messages land at
two sets of offsets, call after call: the views on them are made once (`Ring.tensor` keeps them) and a
device can copy to and from fixed addresses. Alternating halves keeps lifetime bugs loud: a view kept past
its release reads poison (tests) through the next call, which lands in the other half, and a request
buffer of the last call is not one the next call staged (scopes.py's StaleView); the exception is a message
that had to start at 0 for its size, which shares its start with the message before it. (Up to position
LAPS_UNTIL: a lap per message would run u64 positions out on a huge ring.) The producer's room then counts
from that start (`floor`); the skipped bytes held nothing. The consumer, which cannot tell whether the
producer moved on, accepts message ends up to two laps past its tail (one of skipping, one of message: a
consumer only needs ends that grow and stay bounded; the descriptors' offsets are checked against the
capacity on their own), and poisons the bytes its messages' descriptors name, not position ranges (the
skipped ones may hold a later message already).

Poison (tests, `SHMRT_POISON=1`): whoever releases a message overwrites the bytes its tensors took with 0xFF
(NaN as a float, -1 as an id) before the tail store hands them back, so a view kept past its release reads
poison instead of plausible stale numbers.

Write-order rule: the producer (1) writes tensor bytes into [head, new_head), (2) release-stores
head, (3) only then rings the doorbell that names the offsets. The consumer (1) reads the doorbell,
(2) reads the data, (3) release-stores tail = end of the released message. Neither side ever trusts
its own position from shared memory: each keeps it privately and the header words are published
copies. The one word each side must read from the other (the producer reads tail) is loaded once
per check, validated against the producer's private state (never behind the last tail seen, never past
what was published), and never re-read for the same decision (the producer lives in the C helper,
native/shmrt_ring.c; Producer below drives it).

The host owns /dev/shm and may change a segment under us at any moment:
  - shrink it (ftruncate): the pages past the new end leave our mapping and the next access to them
    raises SIGBUS, in whatever code touches them (the C helper's memcpy, torch, CPython). No check
    before an access can prevent that (the host can truncate between the check and the access), so
    the creator's mappings are guarded instead: the C helper's SIGBUS handler (native/shmrt_native.c)
    knows each guarded mapping's address range; a fault inside one writes one line to stderr,
    unlinks the creator's segments and exits with status 2, without unwinding into Python (state at
    a fault is unknown, and only async-signal-safe calls are allowed there). A SIGBUS anywhere else
    keeps its usual meaning (the previous handler or the default action, a core dump).
  - grow it: harmless; our mapping has a fixed length (the one we created it with) and never looks
    past it.
  - replace it (unlink, then a new file under the same name): harmless to a live session; both
    mappings keep the original file's pages. Only names are looked up again: the creator's unlink at
    close removes the replacement (a file in our name space, so nothing is left in /dev/shm).
Attachers (the daemon) are not guarded: a daemon's crash is the host's business, and the client sees
it as PeerTimeout.
"""
from __future__ import annotations

import collections
import ctypes
import mmap
import os
import re
import secrets
import struct
import time

import posix_ipc
import torch

from ..errors import ProtocolError, RingFull, SetupError, TensorTooLarge
from ..units import format_bytes, format_bytes_alike
from .native import (RESERVE_ALIGNMENTS, RESERVE_BAD_TAIL, RESERVE_WAIT, MappedBuffer, NativeProducer, consumer_state,
                     fault_program, guard_mapping, unguard_mapping)

MAGIC = b"SHMRTRNG"
LAYOUT_VERSION = 2  # 2: the doorbell words and slot in the header
PAGE_BYTES = 4096   # ring capacities are whole pages; the header is one
HEADER_BYTES = PAGE_BYTES
OFF_HEAD = 64
OFF_TAIL = 128
OFF_BELL_SEQ = 192
OFF_ASLEEP = 256
OFF_BELL_SLOT = 1024
BELL_SLOT_BYTES = HEADER_BYTES - OFF_BELL_SLOT
_FIXED = struct.Struct("<8sIIQQQ")  # magic, version, header bytes, capacity, owner pid, created ns

SMALL_ALIGN = 64
LARGE_ALIGN = PAGE_BYTES
LARGE_TENSOR = 1 << 20  # tensors from 1 MiB up start on a page boundary (DMA-friendly)
assert RESERVE_ALIGNMENTS == (SMALL_ALIGN, LARGE_ALIGN, LARGE_TENSOR), "the C producer's alignments are not ring.py's"
VIEWS_KEPT = 256  # views a ring keeps for reuse (tensor()); past that it starts over
# Positions grow by a whole lap per message that starts one: from here on messages follow each other again, so
# positions (u64 on the wire) keep growing by bytes only (a 1 TiB ring would reach 2**64 after 2**24 laps)
LAPS_UNTIL = 1 << 62

NAME_PREFIX = "/shmrt-"
NAME_RE = re.compile(r"^/shmrt-[0-9a-f]{32}-(req|rsp)$")
SHM_DIR = "/dev/shm"


def new_segment_name(role: str) -> str:
    """An unguessable segment name: 128 random bits plus the direction."""
    assert role in ("req", "rsp"), role
    return f"{NAME_PREFIX}{secrets.token_hex(16)}-{role}"


def check_segment_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProtocolError(f"segment name {name!r} is not a shmrt ring name (expected /shmrt-<32 hex>-req|rsp)")
    return name


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def alignment_for(nbytes: int) -> int:
    return LARGE_ALIGN if nbytes >= LARGE_TENSOR else SMALL_ALIGN


def _shm_free_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Ring:
    """One mapped ring segment. Use `Ring.create` (owner: unlinks on close) or `Ring.attach`."""

    def __init__(self, name: str, mm: mmap.mmap, capacity: int, owner: bool, poison: bool = False):
        self.name = name
        self.capacity = capacity
        self.owner = owner
        self._mm = mm
        self.native = MappedBuffer(mm)
        # where a message that finds the ring empty starts (data offsets): the start, and half-way (64-aligned)
        self.lap_starts = (0, capacity // 2 // SMALL_ALIGN * SMALL_ALIGN) if capacity >= 2 * SMALL_ALIGN else (0,)
        self.native.message_starts = tuple(self.native.address + HEADER_BYTES + s for s in self.lap_starts)
        self.data = memoryview(mm)[HEADER_BYTES:HEADER_BYTES + capacity]
        self.data_offset = HEADER_BYTES  # where the data area starts inside the mapping
        self.producer = Producer(self)
        self.consumer = Consumer(self, poison)
        self._typed: dict[tuple, torch.Tensor] = {}  # the data area as one tensor per dtype and mode (tensor())
        self._views: dict[tuple, torch.Tensor] = {}        # (offset, dtype, shape, inference) -> a view tensor() made
        self._closed = False
        self._guard: int | None = None  # the creator's mapping is guarded against SIGBUS (create)

    def _fault_line(self) -> str:
        return (f"{fault_program()}: error: ring {self.name} shrank under this process (SIGBUS): another process "
                f"truncated the client's shared memory; the session is over and the client's rings are removed. "
                f"Find what on the host writes to {SHM_DIR}, then restart the daemon and the client\n")

    # ---- lifetime

    @classmethod
    def create(cls, capacity: int, role: str, *, prefault: bool = True, name: str | None = None,
               poison: bool = False) -> "Ring":
        """Create, size, reserve and map a new segment (mode 0600, O_EXCL)."""
        if capacity <= 0 or capacity % SMALL_ALIGN:
            raise ValueError(f"ring capacity must be a positive multiple of {SMALL_ALIGN}, got {capacity}")
        name = name or new_segment_name(role)
        total = HEADER_BYTES + capacity
        free = _shm_free_bytes()
        if free is not None and free < total:
            have, need = format_bytes_alike(free, total)
            raise SetupError(
                f"{SHM_DIR} has {have} free but the ring needs {need}: "
                f"free space in {SHM_DIR} (remove stale segments with `shmrt cleanup`), enlarge it "
                f"(`mount -o remount,size=... {SHM_DIR}`), or pass a smaller --ring-mib")
        try:
            shm = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=total)
        except posix_ipc.ExistentialError as exc:
            raise SetupError(f"shared memory segment {name} already exists: {exc}") from exc
        try:
            if prefault:
                # Reserve every page now so a full /dev/shm fails here with ENOSPC instead of
                # SIGBUS on first touch mid-inference.
                try:
                    os.posix_fallocate(shm.fd, 0, total)
                except OSError as exc:
                    raise SetupError(
                        f"could not reserve {format_bytes(total)} in {SHM_DIR} for ring {name} "
                        f"({exc.strerror}; {format_bytes(_shm_free_bytes() or 0)} free): free space or pass a "
                        f"smaller --ring-mib") from exc
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if prefault else 0)
            mm = mmap.mmap(shm.fd, total, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            shm.close_fd()
            shm.unlink()
            raise
        shm.close_fd()
        ring = cls(name, mm, capacity, owner=True, poison=poison)
        try:
            ring._guard = guard_mapping(ring.native, SHM_DIR + name, ring._fault_line())  # before the first write
        except BaseException:
            ring.close()
            raise
        mm[:_FIXED.size] = _FIXED.pack(MAGIC, LAYOUT_VERSION, HEADER_BYTES, capacity, os.getpid(), time.time_ns())
        for word in (OFF_HEAD, OFF_TAIL, OFF_BELL_SEQ, OFF_ASLEEP):
            ring.native.store(word, 0)
        return ring

    @classmethod
    def attach(cls, name: str, expected_capacity: int, *, poison: bool = False) -> "Ring":
        """Map an existing segment after validating its header against what the creator told us."""
        check_segment_name(name)
        try:
            shm = posix_ipc.SharedMemory(name, flags=0)
        except posix_ipc.ExistentialError as exc:
            raise ProtocolError(f"ring segment {name} does not exist (peer gone or wrong name)") from exc
        try:
            total = HEADER_BYTES + expected_capacity
            size = os.fstat(shm.fd).st_size
            # Under Gramine the file may look like a character device with size 0; otherwise the
            # segment must be exactly as large as announced.
            if size not in (0, total):
                raise ProtocolError(f"ring {name} is {size} bytes, expected {total}")
            mm = mmap.mmap(shm.fd, total, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            shm.close_fd()
        try:
            header = read_header(mm)  # copied once, then validated
            if header.capacity != expected_capacity:
                raise ProtocolError(f"ring {name} header capacity {header.capacity}, expected {expected_capacity}")
        except BaseException:
            mm.close()
            raise
        return cls(name, mm, expected_capacity, owner=False, poison=poison)

    def close(self) -> None:
        """Unmap; the creator also unlinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.consumer.detach()
        if self._guard is not None:
            unguard_mapping(self._guard)
        self.producer.detach()
        self.native.release()
        self._typed.clear()
        self._views.clear()
        try:
            self.data.release()
            self._mm.close()
        except BufferError:
            # A tensor view still references the mapping; it is unmapped when the last view dies.
            pass
        if self.owner:
            unlink_segment(self.name)

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def mapping(self) -> mmap.mmap:
        return self._mm

    # ---- views

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Bytes [offset, offset+nbytes) of the data area; bounds-checked without overflow."""
        if not (0 <= offset <= self.capacity and 0 <= nbytes <= self.capacity - offset):
            raise ProtocolError(f"range [{offset}, +{nbytes}) is outside ring {self.name} of {self.capacity} bytes")
        return self.data[offset:offset + nbytes]

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        """A contiguous `shape` tensor of `dtype` on bytes [offset, offset+nbytes), which the caller has
        matched to the shape (protocol.decode, reserve). Bounds-checked like `view`; an aligned offset (every
        ring allocation is) is a strided view of one tensor over the whole data area (made once per dtype and
        inference mode): a third of the cost of wrapping a fresh memoryview each time. That view is kept and
        handed out again for the same offset, dtype and shape (a decode step's messages land at the same offsets
        call after call: the lap rule above): a dict lookup instead of a new tensor (~15 us a view in a real call
        loop on 2 cores). So views from here are shared: callers change their data, never their metadata in
        place (`t.t_()`, `t.unsqueeze_()`; a view an `out=` resized is made again); `shape` is a tuple."""
        # inference mode is part of the key: a view made inside it cannot be written to outside it
        inference = torch.is_inference_mode_enabled()
        key = (offset, dtype, shape, inference)
        view = self._views.get(key)
        if view is not None and view.shape == shape:   # (an `out=` of another shape would have resized it)
            return view
        size = dtype.itemsize
        if offset % size or not (0 <= offset <= self.capacity and 0 <= nbytes <= self.capacity - offset):
            return torch.frombuffer(self.view(offset, nbytes), dtype=dtype).view(shape)
        base = self._typed.get((dtype, inference))
        if base is None:
            base = self._typed[(dtype, inference)] = torch.frombuffer(self.data, dtype=torch.uint8)[
                :self.capacity - self.capacity % size].view(dtype)
        strides, step = [], 1
        for d in reversed(shape):
            strides.append(step)
            step *= d
        if len(self._views) >= VIEWS_KEPT:
            self._views.clear()
        view = self._views[key] = base.as_strided(shape, strides[::-1], offset // size)
        return view


class RingHeader:
    __slots__ = ("magic", "version", "header_bytes", "capacity", "owner_pid", "created_ns")

    def __init__(self, *fields):
        for slot, value in zip(self.__slots__, fields):
            setattr(self, slot, value)


def read_header(buf) -> RingHeader:
    """Copy the fixed header out of `buf` once and validate it."""
    if len(buf) < HEADER_BYTES:
        raise ProtocolError(f"segment is {len(buf)} bytes, smaller than a ring header ({HEADER_BYTES})")
    header = RingHeader(*_FIXED.unpack(bytes(buf[:_FIXED.size])))
    if header.magic != MAGIC:
        raise ProtocolError(f"ring magic {header.magic!r}, expected {MAGIC!r}: not a shmrt ring")
    if header.version != LAYOUT_VERSION:
        raise ProtocolError(f"ring layout version {header.version}, expected {LAYOUT_VERSION}: "
                            "daemon and client are different shmrt versions")
    if header.header_bytes != HEADER_BYTES:
        raise ProtocolError(f"ring header size {header.header_bytes}, expected {HEADER_BYTES}")
    return header


def unlink_segment(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


class Producer:
    """Reserves space for messages, in the C helper (native.NativeProducer, native/shmrt_ring.c: one call a
    reservation, one a publish; the rules are this module's docstring's). State is private; only `tail` is read
    from shared memory, once per decision, and validated against it there. This class words the refusals."""

    def __init__(self, ring: Ring):
        self.ring = ring
        self._native = NativeProducer(ring.native, capacity=ring.capacity, head_off=OFF_HEAD, tail_off=OFF_TAIL,
                                      starts=ring.lap_starts, laps_until=LAPS_UNTIL)
        self._state = self._native.c   # head, known_tail, floor, published, ...: the C struct's fields

    # the state (read by the transport and by tests; tests also set it)
    head = property(lambda self: self._state.head, lambda self, v: setattr(self._state, "head", v))
    known_tail = property(lambda self: self._state.known_tail, lambda self, v: setattr(self._state, "known_tail", v))
    published = property(lambda self: self._state.published, lambda self, v: setattr(self._state, "published", v))

    native = property(lambda self: self._native)   # the C state (a daemon's planned calls reserve through it too)

    def reserve(self, nbytes: int, *, timeout: float, what: str = "tensor") -> int:
        """Reserve `nbytes` and return its data offset; waits for the consumer up to `timeout` s."""
        offset = self._native.reserve(nbytes)
        return offset if offset >= 0 else self._refused(offset, nbytes, timeout, what)

    def _refused(self, answer: int, nbytes: int, timeout: float, what: str) -> int:
        """What a reservation that did not fit at once comes to: a wait for the consumer (up to `timeout`), then
        the offset; or the refusal, worded."""
        deadline = time.monotonic() + timeout
        delay = 1e-6
        while answer == RESERVE_WAIT:
            if time.monotonic() >= deadline:
                have, need = format_bytes_alike(self.ring.capacity - (self.head - self._state.released), nbytes)
                raise RingFull(f"ring {self.ring.name} stayed full for {timeout:.1f} s ({have} free, {need} needed): "
                               "the consumer is not releasing")
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
            answer = self._native.reserve(nbytes)
        if answer >= 0:
            return answer
        if answer == RESERVE_BAD_TAIL:
            raise ProtocolError(f"ring {self.ring.name}: consumer tail {self._state.seen_tail} outside "
                                f"[{self.known_tail}, {self.published}] (peer corrupted the ring header)")
        need, have = format_bytes_alike(nbytes, self.ring.capacity)
        if nbytes > self.ring.capacity:
            raise TensorTooLarge(f"{what} of {need} does not fit ring {self.ring.name} of {have}: pass a larger --ring-mib")
        raise TensorTooLarge(f"{what} of {need} plus the rest of its message does not fit ring {self.ring.name} of "
                             f"{have}: pass a larger --ring-mib")

    def mark(self) -> bool:
        """Remember the state between two messages: `rewind` takes back what is reserved after this. False (and
        nothing to rewind to) in the middle of a message."""
        return self._native.mark()

    def rewind(self) -> None:
        """Take back every reservation since `mark` (none of it was published: the peer saw nothing)."""
        self._native.rewind()

    def publish(self) -> int:
        """Release-store head after the data is written; returns the message's end position."""
        self._native.publish()
        return self._state.head

    def detach(self) -> None:
        """The mapping goes (Ring.close): from here on every call is refused, none touches it."""
        self._native.detach()


class Consumer:
    """Tracks messages handed out by the producer and releases them in order."""

    def __init__(self, ring: Ring, poison: bool = False):
        self.ring = ring
        self.poison = poison
        # private: the end of the last accepted message, the bytes released so far, how many messages are out; in
        # a C struct (shmrt_consumer) a daemon's planned calls accept and release through too (host/lane.py)
        self.state = consumer_state()
        self._outstanding: collections.deque[list] = collections.deque()  # [end, done, descriptors]
        # a message C accepted as the only one out (`adopt`): tracked in `_outstanding` only once another is accepted
        self._adopted: list | None = None
        self._detached = False
        self.release_in_c = None   # () -> 0 where that message, the only one out, is released in C (`adopt`)
        self._two_laps = 2 * ring.capacity

    accepted_end = property(lambda self: self.state.accepted_end,
                            lambda self, v: setattr(self.state, "accepted_end", v))
    tail = property(lambda self: self.state.tail, lambda self, v: setattr(self.state, "tail", v))

    def accept(self, end: int, tensors=()) -> list:
        """Validate a message's end position (from its doorbell) and track it until released. It may lie up
        to two laps past the tail: a message that found the ring empty starts at a lap start up to a lap on.
        `tensors`: the message's descriptors (validated; offset and nbytes each), poisoned at release."""
        state = self.state
        accepted, bound = state.accepted_end, state.tail + self._two_laps
        if not accepted <= end <= bound:
            raise ProtocolError(f"ring {self.ring.name}: message end {end} outside [{accepted}, {bound}]")
        if self._adopted is not None:   # the message C accepted comes first
            self.track_adopted()
        state.accepted_end = end
        entry = [end, False, tensors]
        self._outstanding.append(entry)
        state.outstanding += 1
        return entry

    def adopt(self, tensors) -> list:
        """A message C accepted as `accept` would, the only one out (shmrt_call's `accepted`; C set accepted_end to
        its end): its entry, for `release_adopted`."""
        entry = self._adopted = [0, False, tensors]
        return entry

    def track_adopted(self) -> None:
        """The message C accepted (if one is out) tracked here from now on: released by `release`, in ring order.
        (Its end is accepted_end until then: C set it, and nothing else is accepted while it is out.)"""
        entry = self._adopted
        if entry is not None:
            entry[0] = self.state.accepted_end
            self._outstanding.append(entry)
            self._adopted = None

    def detach(self) -> None:
        """The ring is being unmapped: a message released from now on (a reply released after its session closed)
        has nothing left to give back, in Python or in C."""
        self._detached = True
        self.release_in_c = self._adopted = None
        self._outstanding.clear()

    def release_adopted(self, entry: list) -> None:
        """`release` for an entry `accept` or `adopt` made: one still the only message out is released by
        `release_in_c()` (the client's NativeCaller.accept_replies: the tail stored in C), where no Python runs."""
        if entry is self._adopted:
            self._adopted = None
            rc = self.release_in_c()
            if rc:   # (it is the only message out, or `accept` would have tracked it: bookkeeping gone wrong)
                raise AssertionError(f"ring {self.ring.name}: a reply accepted in C could not be released there ({rc})")
            return
        self.release(entry)

    def release(self, entry: list) -> None:
        """Mark a message done; publish tail over the completed prefix (FIFO order)."""
        if self._detached:
            return
        entry[1] = True
        if self.poison:
            self._poison(entry[2])
        state = self.state
        old_tail = tail = state.tail
        while self._outstanding and self._outstanding[0][1]:
            tail = self._outstanding.popleft()[0]
            state.outstanding -= 1
        if tail != old_tail:
            state.tail = tail
            self.ring.native.store(OFF_TAIL, tail)

    def _poison(self, tensors) -> None:
        """Overwrite each descriptor's bytes in the data area with 0xFF (validated: inside the ring)."""
        base = self.ring.native.address + self.ring.data_offset
        for desc in tensors:
            ctypes.memset(base + desc.offset, 0xFF, desc.nbytes)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding) + (self._adopted is not None)
