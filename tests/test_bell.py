"""The shared-memory doorbell (bell.py) and the word waiter under it (native.WordWaiter), on real
shared memory: each side's ring mapped as the client and the daemon map it, and a second process
(plain Python, no shmrt: a writer as foreign as the host) where crossing processes matters."""
import math
import os
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, strategies as st

from test_untrusted import FUZZ, _mutate_doorbell, doorbell_mutation
from shmrt.errors import ProtocolError
from shmrt.wire import protocol
from shmrt.wire.bell import MAX_RECORD, BellIn, BellOut, Rung
from shmrt.wire.native import Backoff, WordWaiter
from shmrt.wire.ring import BELL_SLOT_BYTES, OFF_ASLEEP, OFF_BELL_SEQ, OFF_BELL_SLOT, Ring

CAP = 4096
TOKEN = bytes(range(16))   # the session's


@pytest.fixture
def ring_pair():
    """(the producer's mapping: the creator, the consumer's: an attacher) of one ring."""
    with Ring.create(CAP, "rsp") as mine:
        theirs = Ring.attach(mine.name, CAP)
        try:
            yield mine, theirs
        finally:
            theirs.close()


# ---- post / take

def test_post_then_take_returns_the_exact_record_once(ring_pair):
    producer, consumer = ring_pair
    out, bell_in = BellOut(producer, TOKEN), BellIn(consumer, TOKEN, CAP)
    for seq, record in enumerate([b"SHMD" + bytes(range(68)), b"x", bytes(MAX_RECORD), b""], start=1):
        assert out.post(record, seq) is False  # the consumer is awake: no Wake to send
        got = bell_in.take_checked(seq)
        assert got == record and type(got) is bytes, seq  # a private copy, not a view on the slot
        assert bell_in.seen == seq
        assert bell_in.take_checked(seq + 1) is None, seq  # taken once: nothing new until the next post


def test_take_returns_none_when_nothing_was_posted(ring_pair):
    _, consumer = ring_pair
    bell_in = BellIn(consumer, TOKEN, CAP)
    assert bell_in.take_checked(1) is None and bell_in.take_checked(7) is None
    assert bell_in.seen == 0


def test_a_record_changed_after_take_does_not_change_the_copy(ring_pair):
    producer, consumer = ring_pair
    BellOut(producer, TOKEN).post(b"A" * 100, 1)
    record = BellIn(consumer, TOKEN, CAP).take_checked(1)
    producer.mapping[OFF_BELL_SLOT + 8:OFF_BELL_SLOT + 108] = b"B" * 100
    assert record == b"A" * 100


@pytest.mark.parametrize("word", [2, 5, 2**63, 2**64 - 1])
def test_a_scribbled_sequence_word_is_a_protocol_error_naming_the_word(ring_pair, word):
    producer, consumer = ring_pair
    BellOut(producer, TOKEN).post(b"first", 1)
    bell_in = BellIn(consumer, TOKEN, CAP)
    assert bell_in.take_checked(1) == b"first"
    producer.native.store(OFF_BELL_SEQ, word)  # neither 1 (seen) nor 3 (expected)
    with pytest.raises(ProtocolError, match=rf"doorbell sequence word {word}, expected 1 \(nothing new\) or 3"):
        bell_in.take_checked(3)
    assert bell_in.seen == 1  # nothing taken


@pytest.mark.parametrize("length", [MAX_RECORD + 1, BELL_SLOT_BYTES, 2**32, 2**64 - 1])
def test_a_record_length_past_the_slot_is_a_protocol_error(ring_pair, length):
    producer, consumer = ring_pair
    BellOut(producer, TOKEN).post(b"ok", 1)
    producer.native.store(OFF_BELL_SLOT, length)  # the length word after the post, before the take
    with pytest.raises(ProtocolError, match=rf"doorbell record length {length}, expected at most {MAX_RECORD}"):
        BellIn(consumer, TOKEN, CAP).take_checked(1)


def test_a_record_longer_than_the_slot_is_never_posted(ring_pair):
    producer, _ = ring_pair
    with pytest.raises(AssertionError):
        BellOut(producer, TOKEN).post(bytes(MAX_RECORD + 1), 1)
    assert producer.native.load(OFF_BELL_SEQ) == 0


# ---- the sleep handshake (store, fence, load on both sides)

def test_post_reports_a_sleeping_consumer_and_sleep_reports_a_waiting_bell(ring_pair):
    producer, consumer = ring_pair
    out, bell_in = BellOut(producer, TOKEN), BellIn(consumer, TOKEN, CAP)
    assert bell_in.sleep(True) is False           # nothing rung: safe to block on ZeroMQ
    assert producer.native.load(OFF_ASLEEP) == 1
    assert out.post(b"one", 1) is True            # the consumer sleeps: the producer must send a Wake
    assert bell_in.sleep(True) is True            # a bell came in before it slept: serve it, do not block
    assert bell_in.take_checked(1) == b"one"
    assert bell_in.sleep(True) is False           # taken: nothing waits any more
    assert bell_in.sleep(False) is False
    assert producer.native.load(OFF_ASLEEP) == 0
    assert out.post(b"two", 2) is False           # awake again: no Wake
    assert bell_in.sleep(False) is True and bell_in.take_checked(2) == b"two"


# ---- WordWaiter

WRITER = r"""
import mmap, os, struct, sys, time
path, delay, seq, record = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
fd = os.open(path, os.O_RDWR)
mm = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
os.close(fd)
print("ready", flush=True)
time.sleep(delay)
struct.pack_into("<Q", mm, 1024, len(record))   # a post as bell.py does it: slot, then the seq word
mm[1032:1032 + len(record)] = record
struct.pack_into("<Q", mm, 192, seq)
mm.close()
"""


def test_waiter_returns_the_index_of_the_word_another_process_rings(ring_pair):
    producer, consumer = ring_pair
    with Ring.create(CAP, "req") as other:
        waiter = WordWaiter([other.native.word_address(OFF_BELL_SEQ), consumer.native.word_address(OFF_BELL_SEQ)],
                            Backoff())
        record = b"SHMD" + os.urandom(200)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, f"/dev/shm{producer.name}", "0.3", "1", record.hex()],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline() == "ready\n"
            start = time.monotonic()
            which = waiter.wait(0, int(10e9))
            elapsed = time.monotonic() - start
        finally:
            writer.wait(10)
        print(f"woke {elapsed * 1e3:.0f} ms after a write due 300 ms after the writer was ready")
        assert which == 1 and 0.15 < elapsed < 5.0, (which, elapsed)
        assert BellIn(consumer, TOKEN, CAP).take_checked(1) == record  # the other process's record, exactly


@pytest.mark.parametrize("waited_ms", [0.0, 50.0])  # from the spin phase, and from the sleep phase
def test_waiter_returns_minus_one_after_its_budget_when_nothing_changes(ring_pair, waited_ms):
    _, consumer = ring_pair
    consumer.native.store(OFF_BELL_SEQ, 9)
    waiter = WordWaiter([consumer.native.word_address(OFF_BELL_SEQ)], Backoff())
    waiter.seen[0] = 9
    start = time.monotonic()
    assert waiter.wait(int(waited_ms * 1e6), int(0.2e9)) == -1
    elapsed = time.monotonic() - start
    print(f"budget 200 ms, returned after {elapsed * 1e3:.1f} ms")
    assert 0.2 <= elapsed < 0.5, elapsed


def test_waiter_returns_at_once_when_a_word_already_differs(ring_pair):
    _, consumer = ring_pair
    consumer.native.store(OFF_BELL_SEQ, 3)
    waiter = WordWaiter([consumer.native.word_address(OFF_BELL_SEQ)], Backoff())  # seen: 0
    start = time.monotonic()
    assert waiter.wait(0, int(5e9)) == 0
    assert time.monotonic() - start < 0.5


def test_waiter_returns_socket_when_the_descriptor_becomes_readable(ring_pair):
    _, consumer = ring_pair
    r, w = os.pipe()
    try:
        waiter = WordWaiter([consumer.native.word_address(OFF_BELL_SEQ)], Backoff(), fd=r)
        os.write(w, b"x")                               # readable already
        assert waiter.wait(0, int(5e9)) == WordWaiter.SOCKET
        os.read(r, 1)
        timer = threading.Timer(0.2, os.write, (w, b"y"))  # readable while it sleeps
        timer.start()
        start = time.monotonic()
        which = waiter.wait(int(1e9), int(10e9))
        elapsed = time.monotonic() - start
        timer.join()
        assert which == WordWaiter.SOCKET and 0.15 < elapsed < 5.0, (which, elapsed)
    finally:
        os.close(r)
        os.close(w)


def test_waiter_with_no_words_waits_on_the_descriptor_only():
    r, w = os.pipe()
    try:
        waiter = WordWaiter([], Backoff(), fd=r)
        assert waiter.wait(0, int(0.05e9)) == -1
        os.write(w, b"x")
        assert waiter.wait(0, int(5e9)) == WordWaiter.SOCKET
    finally:
        os.close(r)
        os.close(w)


def test_waiter_refuses_an_unaligned_word(ring_pair):
    _, consumer = ring_pair
    with pytest.raises(ProtocolError, match="not 8-byte aligned"):
        consumer.native.word_address(OFF_BELL_SEQ + 4)
    waiter = WordWaiter([consumer.native.word_address(OFF_BELL_SEQ) + 4], Backoff())
    with pytest.raises(ProtocolError, match="not 8-byte aligned"):
        waiter.wait(0, int(1e6))


def test_slot_layout_matches_what_a_foreign_writer_assumes():
    # The WRITER above and tests/hostile_host.py write the header by offset, importing nothing of shmrt.
    assert (OFF_BELL_SEQ, OFF_ASLEEP, OFF_BELL_SLOT, BELL_SLOT_BYTES, MAX_RECORD) == (192, 256, 1024, 3072, 3064)
    assert struct.calcsize("<Q") == 8


def test_the_backoff_spins_through_a_call_only_where_cores_are_plenty(monkeypatch):
    # Few cores: a spinning waiter would take a core from the other side's compute; many: it may spin ~1 ms.
    assert Backoff.for_host(2) == Backoff() and Backoff().spin_us <= 50
    assert Backoff().yield_us >= 2000   # ... but yields (the core goes to whoever else is runnable) through a call
    many = Backoff.for_host(Backoff.MANY_CORES)
    assert many.spin_us == Backoff.MANY_CORES_SPIN_US >= 1000 and many.yield_us > many.spin_us
    monkeypatch.setenv("SHMRT_BACKOFF", "5,6,7,8")   # measuring a policy overrides the host's
    assert Backoff.configured() == Backoff(5, 6, 7, 8)
    monkeypatch.delenv("SHMRT_BACKOFF")
    assert Backoff.configured() == Backoff.for_host()


def test_after_a_long_wait_the_next_one_sleeps_instead_of_spinning(ring_pair):
    _, consumer = ring_pair
    spinner = Backoff(spin_us=60_000, yield_us=120_000)        # would spin through the whole 40 ms below
    waiter = WordWaiter([consumer.native.word_address(OFF_BELL_SEQ)], spinner)

    def cpu_ms_of_an_empty_wait(waited_ms):
        waiter.seen[0] = consumer.native.load(OFF_BELL_SEQ)
        start = time.process_time()
        assert waiter.wait(int(waited_ms * 1e6), int(40e6)) == -1
        return (time.process_time() - start) * 1e3

    consumer.native.store(OFF_BELL_SEQ, 1)
    assert waiter.wait(0, int(1e9)) == 0 and not waiter.policy.last_wait_long           # answered at once
    spinning = cpu_ms_of_an_empty_wait(0)
    consumer.native.store(OFF_BELL_SEQ, 2)
    assert waiter.wait(int(130e6), int(1e9)) == 0 and waiter.policy.last_wait_long     # past spin and yield
    sleeping = cpu_ms_of_an_empty_wait(0)
    print(f"40 ms without a bell: {spinning:.1f} ms of CPU spinning, {sleeping:.1f} ms after a long wait")
    assert sleeping * 4 < spinning and sleeping < 8   # (on a loaded machine the spinner gets less than a core)
    consumer.native.store(OFF_BELL_SEQ, 3)
    assert waiter.wait(0, int(1e9)) == 0 and not waiter.policy.last_wait_long          # a short one: spinning again


# ---- records encoded, taken and checked in C (the fast path): what protocol.py encodes and accepts, no more

RING_CAP = 1 << 20   # the capacity descriptors are checked against


def _taken(got):
    """What a take brought, a checked record (a Rung) read as the Doorbell it names, to compare with
    protocol.decode's; a copy (bytes) or None as it is."""
    if type(got) is not Rung:
        return got
    shape = got.shape
    return protocol.Doorbell(shape.method, got.seq, TOKEN, shape.layer, shape.op, got.pos, got.ring_end, got.work_ns,
                             shape.descs, got.text)


def _descs(shapes, dtype=None):
    import torch
    out, offset = [], 0
    for i, shape in enumerate(shapes):
        dt = dtype or [torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.int32][i % 5]
        nbytes = dt.itemsize * math.prod(shape)
        out.append(protocol.TensorDesc(offset, nbytes, dt, tuple(shape)))
        offset += -(-nbytes // 64) * 64
    return tuple(out)


CALLS = [  # (method, layer, op, pos, ring_end, tensor shapes)
    (protocol.Method.Init, -1, 0, 0, 0, []),
    (protocol.Method.BatchLinear, 0, 7, 1023, 4096, [(1, 1, 2048)]),
    (protocol.Method.AttentionScores, 15, 1280, 2**40, 2**63 - 1, [(1, 1, 2048), (4, 1, 64)]),
    (protocol.Method.Matmul, 2**31 - 1, 2**32 - 1, 5, 64, [(1,), (2, 3, 4, 5, 6, 7), ()]),
    (protocol.Method.LMHead, 3, 0, 0, 128, [(1, 1)] * protocol.MAX_TENSORS),
]


@pytest.mark.parametrize("call", CALLS, ids=[c[0].name for c in CALLS])
def test_a_call_posted_in_c_is_byte_for_byte_what_protocol_encodes_and_taken_as_it_decodes(ring_pair, call):
    producer, consumer = ring_pair
    method, layer, op, pos, ring_end, shapes = call
    descs = _descs(shapes)
    expected = protocol.encode(protocol.Doorbell(method, 9, TOKEN, layer, op, pos, ring_end, tensors=descs))
    asleep, length = BellOut(producer, TOKEN).post_call(method, 9, layer, op, pos, ring_end, descs)
    assert (asleep, length) == (False, len(expected))
    slot = bytes(producer.mapping[OFF_BELL_SLOT:OFF_BELL_SLOT + 8 + length])
    assert slot == struct.pack("<Q", length) + expected
    got = _taken(BellIn(consumer, TOKEN, RING_CAP).take_checked(9))
    assert got == protocol.decode(expected, capacity=RING_CAP, token=TOKEN, expect_seq=9)
    assert type(got) is protocol.Doorbell and all(type(d) is protocol.TensorDesc for d in got.tensors)


def test_the_fast_path_hands_anything_but_this_sessions_next_rpc_to_protocol_decode(ring_pair):
    producer, consumer = ring_pair
    out, bell_in = BellOut(producer, TOKEN), BellIn(consumer, TOKEN, RING_CAP)
    fast = protocol.Doorbell(protocol.Method.BatchLinear, 1, TOKEN, 0, tensors=_descs([(1, 8)]), text="ok")
    slow = [fast._replace(token=bytes(16)), fast._replace(method=protocol.Method.Error, flags=protocol.FLAG_ERROR),
            fast._replace(method=protocol.Method.Close), fast._replace(tensors=_descs([(0, 8)])),
            fast._replace(seq=2)]
    for seq, bell in enumerate([fast, *slow], start=1):
        record = protocol.encode(bell._replace(seq=seq + (bell.seq == 2)))
        out.post(record, seq)
        got = _taken(bell_in.take_checked(seq))
        assert got == (bell._replace(seq=seq) if bell is fast else record), bell
    assert bell_in.seen == len(slow) + 1


def test_a_record_text_that_is_not_utf8_is_a_protocol_error_on_the_fast_path(ring_pair):
    producer, consumer = ring_pair
    record = bytearray(protocol.encode(protocol.Doorbell(protocol.Method.Init, 1, TOKEN, text="ab")))
    record[-1] = 0xFF
    BellOut(producer, TOKEN).post(bytes(record), 1)
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        BellIn(consumer, TOKEN, RING_CAP).take_checked(1)


@st.composite
def hostile_records(draw):
    """A record of this session's next call (any method, tensors of any legal shape, some with a zero dim), then
    one mutation of test_untrusted's (a header or descriptor field, text, bytes, or none)."""
    import torch
    method = draw(st.sampled_from(list(protocol.Method)))
    shapes = draw(st.lists(st.lists(st.integers(0, 9), max_size=protocol.MAX_NDIM), max_size=protocol.MAX_TENSORS))
    dtype = draw(st.sampled_from([torch.float32, torch.int64, torch.bfloat16]))
    text = draw(st.sampled_from(["", "x", "ü" * 3]))
    record = protocol.encode(protocol.Doorbell(method, 5, TOKEN, draw(st.integers(-1, 40)), draw(st.integers(0, 2**32 - 1)),
                                               draw(st.integers(0, 2**20)), draw(st.integers(0, 2**64 - 1)),
                                               tensors=_descs(shapes, dtype), text=text))
    return _mutate_doorbell(record, draw(doorbell_mutation()))[:MAX_RECORD]


@FUZZ
@given(record=hostile_records(), capacity=st.sampled_from([0, 64, 4096, RING_CAP]), again=st.booleans())
def test_the_fast_path_accepts_a_strict_subset_of_what_protocol_decode_accepts(record, capacity, again):
    """`again`: the record is taken a second time by the same BellIn under the next seq (the second take finds its
    shape known, bell.py's RecordShape), and must read as the first did."""
    seq = 5
    with Ring.create(CAP, "rsp") as producer:
        out, bell_in = BellOut(producer, TOKEN), BellIn(producer, TOKEN, capacity)
        if again and len(record) >= 16:
            out.post(record, 5)
            try:
                bell_in.take_checked(5)
            except ProtocolError:
                pass
            seq, record = 6, record[:8] + struct.pack("<Q", 6) + record[16:]
        out.post(record, seq)
        try:
            got = _taken(bell_in.take_checked(seq))
        except ProtocolError as exc:   # the fast path's header and descriptors, then text that is not UTF-8
            got = exc
    try:
        decoded = protocol.decode(record, capacity=capacity, token=TOKEN, expect_seq=seq)
    except ProtocolError as exc:
        decoded = str(exc)
    if type(got) is ProtocolError:
        assert str(got) == decoded == "doorbell text is not valid UTF-8"
        return
    if type(got) is bytes:
        assert got == record
    else:
        assert got == decoded, "the C fast path accepted a record protocol.decode refuses, or read it otherwise"
        assert decoded.method.name in protocol.RPC_METHODS and not decoded.flags
    fast_case = (type(decoded) is protocol.Doorbell and decoded.method.name in protocol.RPC_METHODS and not decoded.flags
                 and all(0 < math.prod(d.shape) <= protocol.MAX_DIM for d in decoded.tensors))
    assert (type(got) is protocol.Doorbell) == fast_case, "a plain record of a model RPC left the fast path"


def test_a_request_field_out_of_its_range_is_refused_before_anything_is_posted(ring_pair):
    producer, _ = ring_pair
    out = BellOut(producer, TOKEN)
    for layer, op, pos in [(2**31, 0, 0), (-2, 0, 0), (0, 2**32, 0), (0, 0, -1), (0, 0, 2**63)]:
        with pytest.raises(ValueError, match="out of range"):
            out.post_call(protocol.Method.BatchLinear, 1, layer, op, pos, 0, ())
    assert producer.native.load(OFF_BELL_SEQ) == 0   # nothing rung


def test_a_repeated_record_is_known_by_its_fixed_words_and_takes_each_call_its_own_fields(ring_pair):
    """A decode step's records repeat: the second take of a record with the same method, layer, op and descriptors
    gets the first's shape (its descriptors made once); seq, pos, ring_end, work_ns and text are each call's own.
    Another layer, op or descriptor is another shape."""
    producer, consumer = ring_pair
    out, bell_in = BellOut(producer, TOKEN), BellIn(consumer, TOKEN, RING_CAP)
    a, b = _descs([(1, 1, 64)]), _descs([(1, 1, 64), (4, 1, 16)])
    posts = [(protocol.Method.BatchLinear, 0, 7, 5, 640, a), (protocol.Method.BatchLinear, 0, 7, 6, 1280, a),
             (protocol.Method.BatchLinear, 1, 7, 6, 1920, a), (protocol.Method.BatchLinear, 0, 3, 6, 2560, a),
             (protocol.Method.AttentionScores, 0, 0, 7, 3200, b), (protocol.Method.BatchLinear, 0, 7, 8, 3840, a)]
    shapes = []
    for seq, (method, layer, op, pos, ring_end, descs) in enumerate(posts, start=1):
        out.post_call(method, seq, layer, op, pos, ring_end, descs)
        got = bell_in.take_checked(seq)
        assert type(got) is Rung and (got.seq, got.pos, got.ring_end, got.work_ns, got.text) == (seq, pos, ring_end, 0, "")
        assert (got.shape.method, got.shape.layer, got.shape.op, got.shape.descs) == (method, layer, op, descs)
        shapes.append(got.shape)
    assert shapes[1] is shapes[0] and shapes[5] is shapes[0]
    assert len({id(s) for s in shapes}) == 4   # another layer, another op, another method and descriptors


def test_known_records_start_over_past_their_bound_and_stay_right(ring_pair, monkeypatch):
    import shmrt.wire.bell as bell
    monkeypatch.setattr(bell, "KNOWN_RECORDS", 3)
    producer, consumer = ring_pair
    out, bell_in = BellOut(producer, TOKEN), BellIn(consumer, TOKEN, RING_CAP)
    for seq in range(1, 13):
        layer = seq % 5
        out.post_call(protocol.Method.BatchLinear, seq, layer, 7, seq, 64 * seq, _descs([(1, 1, 64)]))
        got = bell_in.take_checked(seq)
        assert (got.shape.layer, got.pos, got.ring_end) == (layer, seq, 64 * seq)
        assert len(bell_in._known) <= 3


@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")
def test_a_known_records_views_are_made_per_inference_mode_and_again_where_one_was_resized(ring_pair):
    """accept_rung hands out a known record's views as Ring.tensor keeps them: the same view again, per inference
    mode (a view made inside it cannot be written outside it), and made again where an `out=` of another shape
    resized one; each take is accepted by the ring's consumer (its end checked, its release the tail's)."""
    import torch
    from shmrt.wire.shm_transport import accept_rung
    producer, consumer = ring_pair
    out, bell_in = BellOut(producer, TOKEN), BellIn(consumer, TOKEN, CAP)
    descs = _descs([(2, 8)], torch.float32)
    producer.tensor(0, 64, torch.float32, (2, 8)).copy_(torch.arange(16.0).view(2, 8))

    def take(seq, mode):
        out.post_call(protocol.Method.BatchLinear, seq, 0, 7, 0, 64 * seq, descs)
        with torch.inference_mode(mode):
            views, release = accept_rung(consumer, bell_in.take_checked(seq))
        assert consumer.consumer.accepted_end == 64 * seq and torch.equal(views[0], torch.arange(16.0).view(2, 8))
        release()
        assert consumer.consumer.tail == 64 * seq
        return views[0]

    first, plain = take(1, True), take(2, False)
    assert take(3, True) is first and take(4, False) is plain and plain is not first
    assert plain.is_inference() is False and first.is_inference() is True
    torch.mm(torch.ones(3, 1), torch.ones(1, 1), out=plain)   # resized to (3, 1) (torch warns, and does it)
    producer.tensor(0, 64, torch.float32, (2, 8)).copy_(torch.arange(16.0).view(2, 8))   # (its data too)
    again = take(5, False)
    assert again is not plain and again.shape == (2, 8)
