"""Doorbell: round trip, and every field corrupted in turn is rejected naming that field."""
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
