"""The ring's producer, which lives in the C helper (native/shmrt_ring.c), against the rules of ring.py's docstring
written out in Python (`Rules`, below: what the producer was before it moved to C), on long random runs: every
reservation's offset or refusal, every published end and the private state agree, with an honest consumer and with
one that scribbles its tail word (back, past what was published, huge)."""
import collections
import random

import pytest

from shmrt.errors import ProtocolError, RingFull, TensorTooLarge
from shmrt.wire.ring import LAPS_UNTIL, OFF_TAIL, Ring, align_up, alignment_for


class Rules:
    """ring.py's placement rules, one decision at a time, reading the tail word through `load_tail`."""

    def __init__(self, capacity: int, lap_starts: tuple, load_tail):
        self.cap, self.starts, self.load_tail = capacity, lap_starts, load_tail
        self.head = self.known_tail = self.floor = self.published = self.message_start = self.next_start = 0
        self.in_message = False

    def _tail(self) -> int:
        tail = self.load_tail()
        if not self.known_tail <= tail <= self.published:
            raise ProtocolError("tail")
        self.known_tail = tail
        return tail

    def _to_lap_start(self, nbytes: int, alignment: int) -> None:
        target = self.starts[self.next_start]
        if align_up(target, alignment) + nbytes > self.cap:
            target = 0
        else:
            self.next_start = (self.next_start + 1) % len(self.starts)
        self.head = self.floor = self.message_start = self.head + (target - self.head % self.cap) % self.cap

    def reserve(self, nbytes: int):
        """The offset, or "wait" (full now), or raises TensorTooLarge / ProtocolError."""
        cap, alignment = self.cap, alignment_for(nbytes)
        if nbytes > cap:
            raise TensorTooLarge("never fits")
        found_empty = False
        if not self.in_message:
            self.in_message, self.message_start = True, self.head
            if self.head < LAPS_UNTIL and self._tail() == self.head:
                self._to_lap_start(nbytes, alignment)
                found_empty = True
        while True:
            lap_offset = self.head % cap
            offset = align_up(lap_offset, alignment)
            start = self.head + (offset - lap_offset)
            if offset + nbytes > cap:
                start, offset = self.head + (cap - lap_offset), 0
            released = self.floor if found_empty else max(self._tail(), self.floor)
            found_empty = False
            if start + nbytes - released <= cap:
                self.head = start + nbytes
                return offset
            if released >= self.message_start:
                if self.head == self.message_start and self.floor != self.head and self.head < LAPS_UNTIL:
                    self._to_lap_start(nbytes, alignment)
                    continue
                raise TensorTooLarge("with its message")
            return "wait"

    def publish(self) -> int:
        self.in_message, self.published = False, self.head
        return self.head


def _answer(reserve, nbytes):
    try:
        return reserve(nbytes)
    except (TensorTooLarge, ProtocolError, RingFull) as exc:
        return type(exc).__name__ if not isinstance(exc, RingFull) else "wait"


@pytest.mark.parametrize("capacity", [64, 192, 4096, 4096 + 64 * 7, 1 << 16, 3 << 20])
@pytest.mark.parametrize("hostile", [False, True])
def test_the_c_producer_follows_the_rules_on_random_runs(capacity, hostile):
    rng = random.Random(capacity * 2 + hostile)
    sizes = [1, 64, 100, capacity // 3, capacity // 2, capacity - 64, capacity, capacity + 1, 1 << 20, (1 << 20) + 3]
    with Ring.create(capacity, "req") as ring:
        rules = Rules(capacity, ring.lap_starts, lambda: ring.native.load(OFF_TAIL))
        producer = ring.producer
        if rng.random() < 0.5:   # far along: positions past LAPS_UNTIL grow by bytes only
            for side in (producer, rules):
                side.head = side.known_tail = side.published = LAPS_UNTIL - capacity
            producer._state.floor = rules.floor = LAPS_UNTIL - capacity
            ring.native.store(OFF_TAIL, LAPS_UNTIL - capacity)
        ends = []   # published, not yet released by the consumer
        answers = collections.Counter()
        for step in range(3000):
            roll = rng.random()
            if roll < 0.55:
                nbytes = rng.choice(sizes) if rng.random() < 0.1 else rng.randrange(1, capacity // 3 + 2)
                expected = _answer(rules.reserve, nbytes)
                got = _answer(lambda n: producer.reserve(n, timeout=0.0), nbytes)
                assert got == expected, (step, nbytes)
                answers[expected if isinstance(expected, str) else "offset"] += 1
                if expected == "ProtocolError":   # (a session would end here) the word restored, the run goes on
                    ring.native.store(OFF_TAIL, rules.known_tail)
            elif roll < 0.8:
                assert producer.publish() == rules.publish()
                ends.append(rules.published)
            elif ends:   # the consumer releases up to one of the published ends (or, hostile, writes anything)
                if hostile and rng.random() < 0.1:
                    tail = rng.choice([0, rules.known_tail - 64, rules.published + 64, 2**63, 2**64 - 1,
                                       rules.head, rules.published])
                    ring.native.store(OFF_TAIL, max(0, tail))
                else:
                    k = rng.randrange(len(ends))
                    ring.native.store(OFF_TAIL, ends[k])
                    ends = ends[k + 1:]
            state = producer._state
            assert (state.head, state.known_tail, state.floor, state.published) == \
                (rules.head, rules.known_tail, rules.floor, rules.published), step
    # the run went through every kind of answer (ProtocolError: only where the tail word was scribbled)
    assert answers["offset"] > 200 and answers["wait"] > 0 and answers["TensorTooLarge"] > 0, answers
    assert (answers["ProtocolError"] > 0) == hostile, answers
