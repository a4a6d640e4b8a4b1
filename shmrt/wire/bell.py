"""The shared-memory doorbell: with `--doorbell shm` (the default of the shm transport) a call's doorbell
record travels through the header page of the ring its tensors are in, not over ZeroMQ. ZeroMQ keeps
session control (Hello, Attach, Close, errors outside a call) and wakes a daemon that went to sleep.

Per ring (ring.py's header: `bell seq`, `asleep`, the bell slot), the ring's producer rings and its
consumer answers the door:

  post (producer)   write [length u64][record] into the slot, release-store the record's seq into
                    `bell seq`, full fence, load the consumer's `asleep` word: 1 means send a Wake
                    over ZeroMQ (the consumer is blocked there).
  take (consumer)   acquire-load `bell seq`; unchanged: nothing new. Else copy the length and then the
                    record out once (one C call); the seq must be the one it expects (any other value:
                    ProtocolError, the peer scribbled the word, never a wait that outlives --timeout), the
                    length at most a record's, and protocol.decode validates the copy.
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

from ..errors import ProtocolError
from .ring import BELL_SLOT_BYTES, OFF_ASLEEP, OFF_BELL_SEQ, OFF_BELL_SLOT, Ring

MAX_RECORD = BELL_SLOT_BYTES - 8  # bytes of one doorbell record (the slot's first word is its length)


class BellOut:
    """The producer's side of one ring's doorbell."""

    def __init__(self, ring: Ring):
        self.ring = ring

    def post(self, record: bytes, seq: int) -> bool:
        """Publish `record` as doorbell `seq`; True if the consumer sleeps on ZeroMQ (send it a Wake)."""
        assert len(record) <= MAX_RECORD, len(record)
        return self.ring.native.post_bell(OFF_BELL_SLOT, BELL_SLOT_BYTES, record, OFF_BELL_SEQ, seq, OFF_ASLEEP) != 0


class BellIn:
    """The consumer's side of one ring's doorbell: the last seq it took, and the word to wait on."""

    def __init__(self, ring: Ring):
        self.ring = ring
        self.seen = 0  # the creator zeroes `bell seq`; records start at the session's first RPC
        self.address = ring.native.word_address(OFF_BELL_SEQ)
        self._record = ring.native.record_buffer(MAX_RECORD)

    def take(self, expect_seq: int) -> bytes | None:
        """The next record if it has been posted (a private copy), else None. One C call loads the seq word
        and the length once each and copies the record once; all three are validated here, on the copies."""
        seq, length, record = self.ring.native.take_bell(OFF_BELL_SEQ, self.seen, OFF_BELL_SLOT, BELL_SLOT_BYTES,
                                                         self._record)
        if seq == self.seen:
            return None
        if seq != expect_seq:
            raise ProtocolError(f"ring {self.ring.name}: doorbell sequence word {seq}, expected {self.seen} "
                                f"(nothing new) or {expect_seq} (the next call): the peer scribbled the ring header")
        if length > MAX_RECORD:
            raise ProtocolError(f"ring {self.ring.name}: doorbell record length {length}, expected at most {MAX_RECORD}")
        self.seen = seq
        return record

    def sleep(self, asleep: bool) -> bool:
        """Set this side's `asleep` word (store, fence, load); True if a bell is waiting already."""
        return self.ring.native.store_fence_load(OFF_ASLEEP, int(asleep), OFF_BELL_SEQ) != self.seen
