"""Doorbell: round trip, and every field corrupted in turn is rejected naming that field."""
import math
import re
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

from shmrt.wire import protocol
from shmrt.errors import ProtocolError
from shmrt.wire.protocol import Doorbell, Method, TensorDesc

TOKEN = b"t" * 16
CAP = 1 << 20


def bell(**kw) -> Doorbell:
    base = dict(method=Method.Matmul, seq=7, token=TOKEN, layer=3, op=1, pos=5, ring_end=4096,
                tensors=(TensorDesc(0, 2 * 3 * 4, torch.float32, (2, 3)), TensorDesc(64, 8, torch.int64, (1,))))
    base.update(kw)
    return Doorbell(**base)


def test_round_trip_keeps_every_field():
    b = bell(text="héllo")
    assert protocol.decode(protocol.encode(b), capacity=CAP, token=TOKEN, expect_seq=7) == b


def test_zero_d_and_empty_tensors_round_trip():
    b = bell(tensors=(TensorDesc(0, 4, torch.float32, ()), TensorDesc(64, 0, torch.bfloat16, (0, 5))))
    assert protocol.decode(protocol.encode(b), capacity=CAP).tensors == b.tensors


def test_records_are_the_documented_layout_for_every_ndim_and_count():
    """encode packs header and descriptors in one struct per sequence of ndims: byte for byte the layout of the
    module docstring (a header, then per tensor offset, nbytes, dtype code, ndim, the dims and zeros past them)."""
    import random
    rng = random.Random(5)
    for count in range(protocol.MAX_TENSORS + 1):
        for _ in range(6):
            descs = []
            for i in range(count):
                shape = tuple(rng.randint(1, 9) for _ in range(rng.randint(0, protocol.MAX_NDIM)))
                dtype = rng.choice([torch.float32, torch.bfloat16, torch.int64])
                descs.append(TensorDesc(64 * i, dtype.itemsize * math.prod(shape), dtype, shape))
            b = bell(tensors=tuple(descs), text=rng.choice(["", "x", "héllo"]))
            raw = protocol.encode(b)
            text = b.text.encode()
            expected = protocol._HEADER.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, b.method, b.flags, b.seq, b.token,
                                             b.layer, b.op, b.pos, b.ring_end, b.work_ns, count, len(text))
            for d in descs:
                dims = d.shape + (0,) * (protocol.MAX_NDIM - len(d.shape))
                expected += protocol._DESC.pack(d.offset, d.nbytes, protocol.DTYPE_CODE[d.dtype], len(d.shape), *dims)
            assert raw == expected + text
            assert protocol.decode(raw, capacity=CAP) == b


def patch(raw: bytes, offset: int, fmt: str, value) -> bytes:
    raw = bytearray(raw)
    struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


DESC0 = 72  # first descriptor follows the 72-byte header

CORRUPTIONS = [
    ("magic", lambda r: patch(r, 0, "4s", b"XXXX"), "magic"),
    ("version", lambda r: patch(r, 4, "<H", 99), f"version 99, expected {protocol.PROTOCOL_VERSION}"),
    ("method", lambda r: patch(r, 6, "B", 200), "method 200"),
    ("flags", lambda r: patch(r, 7, "B", 0x80), "flags"),
    ("seq", lambda r: patch(r, 8, "<Q", 8), "seq 8, expected 7"),
    ("token", lambda r: patch(r, 16, "16s", b"x" * 16), "token"),
    ("layer", lambda r: patch(r, 32, "<i", -5), "layer -5"),
    ("pos", lambda r: patch(r, 40, "<q", -1), "pos -1"),
    ("ntensors", lambda r: patch(r, 64, "<H", 9), "ntensors 9"),
    ("ntensors-length", lambda r: patch(r, 64, "<H", 1), "bytes, expected"),
    ("text_len", lambda r: patch(r, 66, "<H", 500), "bytes, expected"),
    ("truncated", lambda r: r[:50], "at least 72"),
    ("dtype", lambda r: patch(r, DESC0 + 16, "B", 77), r"tensor\[0\].dtype code 77"),
    ("ndim", lambda r: patch(r, DESC0 + 17, "B", 7), r"tensor\[0\].ndim 7"),
    ("shape-vs-nbytes", lambda r: patch(r, DESC0 + 24, "<q", 3), r"tensor\[0\].nbytes is 24, expected"),
    ("negative-dim", lambda r: patch(r, DESC0 + 24, "<q", -2), r"tensor\[0\].shape has dim -2"),
    ("dims-past-ndim", lambda r: patch(r, DESC0 + 24 + 8 * 4, "<q", 1), "past ndim"),
    ("offset-misaligned", lambda r: patch(r, DESC0, "<Q", 3), "not a multiple of 64"),
    ("offset-out-of-ring", lambda r: patch(r, DESC0, "<Q", CAP), "outside the ring"),
    ("offset-overflow", lambda r: patch(r, DESC0, "<Q", 2**64 - 64), "outside the ring"),
    ("nbytes-huge", lambda r: patch(patch(r, DESC0 + 8, "<Q", 2**63), DESC0 + 24, "<q", 2**40), "nbytes"),
]


@pytest.mark.parametrize("name,corrupt,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_each_corrupted_field_is_rejected_with_its_name(name, corrupt, message):
    raw = corrupt(protocol.encode(bell()))
    with pytest.raises(ProtocolError, match=message):
        protocol.decode(raw, capacity=CAP, token=TOKEN, expect_seq=7)


def test_zero_dim_cannot_smuggle_huge_strides():
    """nbytes 0 satisfies prod(shape) * itemsize, but the other dims would overflow torch's strides."""
    with pytest.raises(ProtocolError, match="spans"):
        protocol.check_shape((0, 2**40, 2**40), torch.float32, 0, "tensor[0]")
    assert protocol.check_shape((0, 5, 7), torch.float32, 0, "tensor[0]") == (0, 5, 7)


def test_invalid_utf8_text_rejected():
    raw = protocol.encode(bell(text="ab"))
    with pytest.raises(ProtocolError, match="UTF-8"):
        protocol.decode(raw[:-2] + b"\xff\xfe", capacity=CAP)


@settings(max_examples=3000, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_random_bytes_never_escape_as_anything_but_protocol_error(raw):
    try:
        b = protocol.decode(protocol.MAGIC + raw, capacity=CAP)
    except ProtocolError:
        return
    for t in b.tensors:  # whatever decoded is inside the ring and self-consistent
        assert t.offset + t.nbytes <= CAP


DIMS = st.one_of(st.integers(1, 70), st.integers(-3, 3),
                 st.sampled_from([2**20, 2**40, 2**40 + 1, 2**47, -2**63, 2**63 - 1]))


# The strategies below are built once, not inside each example: hypothesis validates every strategy it
# meets for the first time, and building them per draw was about a third of the test's time.
NDIM = st.integers(0, 7)
SHAPES = [st.lists(DIMS, min_size=n, max_size=n) for n in range(7)]                      # by ndim (<= 6)
TAILS = [st.one_of(st.just([0] * n), st.lists(DIMS, min_size=n, max_size=n)) for n in range(7)]  # by 6 - len
CODES = st.one_of(st.sampled_from(list(protocol.DTYPES)), st.integers(0, 255))
NBYTES_OFF = st.one_of(st.just(0), st.integers(-8, 8), st.just(2**63))


def _offsets(capacity):
    return st.one_of(st.integers(0, 16).map(lambda n: 64 * n), st.integers(0, 16).map(lambda n: capacity - 64 * n),
                     st.integers(0, capacity + 128), st.sampled_from([2**64 - 64, 2**63]))


OFFSETS = {capacity: _offsets(capacity) for capacity in (CAP, 2**50)}


@st.composite
def descriptor_fields(draw, capacity):
    """offset, nbytes, dtype code, ndim, 6 dims: mostly legal or one step off it."""
    ndim = draw(NDIM)
    shape = draw(SHAPES[min(ndim, 6)])
    tail = draw(TAILS[6 - len(shape)])
    code = draw(CODES)
    itemsize = protocol.DTYPES[code][1].itemsize if code in protocol.DTYPES else 4
    nbytes = math.prod(shape) * itemsize + draw(NBYTES_OFF)
    offset = draw(OFFSETS[capacity])
    return offset, min(max(nbytes, 0), 2**64 - 1), code, ndim, *shape, *tail


FIELDS = {capacity: descriptor_fields(capacity) for capacity in (CAP, 2**50)}


@settings(max_examples=4000, deadline=None)
@given(data=st.data(), capacity=st.sampled_from([CAP, 2**50]))
def test_fast_path_accepts_exactly_what_the_field_checks_accept(data, capacity):
    """decode's few-comparison path for the common descriptor must agree with the field-by-field checks:
    same descriptor when they accept, the same named error when they refuse."""
    raw = bytearray(protocol.encode(bell(tensors=(TensorDesc(0, 24, torch.float32, (2, 3)),))))
    struct.pack_into("<QQBB6x6q", raw, DESC0, *data.draw(FIELDS[capacity]))
    raw = bytes(raw)
    try:
        expected = protocol._checked_descriptor(0, raw, capacity)
    except ProtocolError as exc:
        with pytest.raises(ProtocolError, match=re.escape(str(exc))):
            protocol.decode(raw, capacity=capacity)
    else:
        assert protocol.decode(raw, capacity=capacity).tensors == (expected,)


def test_a_work_time_written_into_an_encoded_doorbell_is_the_one_decoded():
    d = TensorDesc(4096, 16, torch.float32, (2, 2))
    record = bytearray(protocol.encode(Doorbell(Method.BatchLinear, 7, b"t" * 16, ring_end=4160, tensors=(d,),
                                                text="x")))
    protocol.set_work_ns(record, 123_456_789)
    bell = protocol.decode(bytes(record), capacity=1 << 20)
    assert bell == Doorbell(Method.BatchLinear, 7, b"t" * 16, ring_end=4160, work_ns=123_456_789, tensors=(d,),
                            text="x")


@pytest.mark.parametrize("doorbell", ["shm", "zmq"])
@pytest.mark.parametrize("text", ["", "short", "é" * 3000])
def test_a_reply_encoded_ahead_and_finished_is_the_reply_encoded_after(doorbell, text):
    """The server's two ways to encode a reply (wire/shm_transport.py) give the same bytes: the same ring end (the
    head the reservations reached), the work time, the text cut to a shm doorbell's slot on a character boundary."""
    from shmrt.wire.bell import BellOut
    from shmrt.wire.ring import Ring
    from shmrt.wire.shm_transport import ShmServerSession
    from shmrt.wire.transport import Request
    records, heads = [], []
    for ahead in (True, False):
        with Ring.create(1 << 16, "rsp") as ring:
            session = ShmServerSession(b"k" * 16)
            session.rsp = ring
            session.bell_out = BellOut(ring, session.token) if doorbell == "shm" else None
            builder = session.reply_builder()
            builder.alloc((3, 5), torch.float32)
            builder.alloc_joined([(1, 1, 64), (1, 1, 16)], torch.float32)
            request = Request("BatchLinear", 9)
            if ahead:
                records.append(session.finish_reply(session.encode_reply_ahead(request, builder, text), 4242))
            else:
                records.append(session.encode_reply(request, builder, work_ns=4242, text=text))
            heads.append(ring.producer.head)
            session.rsp = session.bell_out = None   # the ring is closed by its `with`
    assert records[0] == records[1] and heads[0] == heads[1]
    bell = protocol.decode(records[0], capacity=1 << 16)
    assert bell.work_ns == 4242 and bell.ring_end == heads[0] and len(bell.tensors) == 3
    assert text.startswith(bell.text) and (bell.text == text or doorbell == "shm")


@pytest.mark.parametrize("text", ["", "short", "é" * 3000])
@pytest.mark.parametrize("ahead", [True, False])
def test_a_rung_reply_posted_by_the_c_encoder_is_the_record_python_encodes(text, ahead):
    """A reply to a request rung through the ring goes back as words the C helper encodes into the slot
    (shm_transport.RungReply): byte for byte the record protocol.encode makes of the same reply (descriptors of
    every rank, the text cut to the slot on a character boundary, the work time written after, as finish_reply
    does for a CUDA daemon)."""
    from shmrt.wire.bell import BellOut
    from shmrt.wire.ring import OFF_BELL_SEQ, OFF_BELL_SLOT, Ring
    from shmrt.wire.shm_transport import RungReply, ShmServerSession
    from shmrt.wire.transport import Request
    records = []
    for rung in (True, False):
        with Ring.create(1 << 16, "rsp") as ring:
            session = ShmServerSession(b"k" * 16)
            session.rsp = ring
            session.bell_out = BellOut(ring, session.token)
            builder = session.reply_builder()
            builder.alloc((3, 5), torch.float32)
            builder.alloc((), torch.int64)
            builder.alloc_joined([(1, 1, 64), (1, 1, 16)], torch.bfloat16)
            builder.alloc((2, 1, 1, 1, 1, 3), torch.float16)
            request = Request("BatchLinear", 9, rung=rung)
            if ahead:
                reply = session.finish_reply(session.encode_reply_ahead(request, builder, text), 4242)
            else:
                reply = session.encode_reply(request, builder, work_ns=4242, text=text)
            assert (type(reply) is RungReply) == rung
            session.post_reply(reply)
            length = ring.native.load(OFF_BELL_SLOT)
            records.append(bytes(ring.mapping[OFF_BELL_SLOT + 8:OFF_BELL_SLOT + 8 + length]))
            assert ring.native.load(OFF_BELL_SEQ) == 9
            session.rsp = session.bell_out = None
    assert records[0] == records[1]
    bell = protocol.decode(records[0], capacity=1 << 16)
    assert bell.work_ns == 4242 and bell.seq == 9 and bell.method == protocol.Method.BatchLinear
    assert [d.shape for d in bell.tensors] == [(3, 5), (), (1, 1, 64), (1, 1, 16), (2, 1, 1, 1, 1, 3)]
    assert text.startswith(bell.text) and len(bell.text) > 0 if text else bell.text == ""
