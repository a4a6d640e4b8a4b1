"""The doorbell: the small binary message ZeroMQ carries instead of tensor bytes.

A doorbell names a method, a sequence number, the session token, a few integer arguments and,
per tensor, where its bytes lie in the sender's ring. It never carries tensor bytes, never
pickles, never evaluates anything.

Wire layout (little-endian, fixed size header, then descriptors, then UTF-8 text):

    header (72 bytes)
      0   4s   magic      b"SHMD"
      4   H    version    PROTOCOL_VERSION
      6   B    method     Method
      7   B    flags      FLAG_* bits (unknown bits rejected)
      8   Q    seq        request number, echoed by the reply
     16   16s  token      random per session, chosen by the client at Hello
     32   i    layer      decoder layer index, -1 where not used
     36   I    op         method-specific argument bits (model/calls.py): opaque to the doorbell
     40   q    pos        first sequence position of the tensors (KV cache placement)
     48   Q    ring_end   sender's ring position after this message; the receiver releases to it
     56   Q    work_ns    daemon compute time for this reply (informational, never trusted)
     64   H    ntensors   <= MAX_TENSORS
     66   H    text_len   <= MAX_TEXT bytes of UTF-8 after the descriptors
     68   4x
    descriptor (72 bytes each)
      0   Q    offset     into the sender's ring data area, multiple of RING_ALIGN
      8   Q    nbytes     == prod(shape) * itemsize(dtype)
     16   B    dtype      DTYPES code
     17   B    ndim       <= MAX_NDIM
     18   6x
     24   6q   shape      dims beyond ndim must be 0

Decoding copies the message once (ZeroMQ hands us private bytes), then validates every field
before anything is used; a violation raises ProtocolError naming the field and what was expected.
Offsets and lengths are checked against the ring capacity with arithmetic that cannot overflow.
Both directions run twice per call, so they are built for speed: lookup tables instead of enum and
dtype conversions, named tuples instead of dataclasses, and per descriptor a few comparisons that
accept the common case, falling back to the field-by-field checks (and their messages) otherwise.
"""
from __future__ import annotations

import enum
import math
import struct
from typing import NamedTuple

import torch

from ..errors import ProtocolError, describe

MAGIC = b"SHMD"
PROTOCOL_VERSION = 4  # 2: ring attachment is its own control message (Attach); Init is a plain RPC;
                      # 3: BatchLinear's KEEP_V bit, P*V with P alone (V's rows kept on the daemon);
                      # 4: AttentionScores
MAX_TENSORS = 8
MAX_NDIM = 6
MAX_DIM = 1 << 40
MAX_SPAN = 1 << 48  # bytes spanned by the non-zero dims: keeps every stride far from int64 overflow
MAX_TEXT = (1 << 16) - 1
RING_ALIGN = 64
TOKEN_BYTES = 16

FLAG_ERROR = 0x01
KNOWN_FLAGS = FLAG_ERROR

_HEADER = struct.Struct("<4sHBBQ16siIqQQHH4x")
_DESC = struct.Struct("<QQBB6x6q")
assert _HEADER.size == 72 and _DESC.size == 72
_WORK_NS = struct.Struct("<Q")
WORK_NS_AT = 56   # the header's work_ns field (layout above)
assert struct.calcsize("<4sHBBQ16siIqQ") == WORK_NS_AT


class Method(enum.IntEnum):
    Init = 1
    Embedding = 2
    BatchLinear = 3
    Matmul = 4
    LMHead = 5
    AttentionOutput = 6   # P*V and o_proj fused (the v2.4 call set uses Matmul + BatchLinear instead)
    AttentionScores = 7   # q|k|v, RoPE with the enclave's tables, K/V kept, Q*K^T (the fewest call set)
    Hello = 16   # control: opens a session, returns the model config (not a logged RPC)
    Close = 17   # control: ends a session, the daemon detaches its rings
    Error = 18   # reply only: text says what went wrong
    Attach = 19  # control (shm only): text names the client's rings; the daemon maps them
    Wake = 20    # control (shm doorbell only, seq 0, never answered): a request bell waits in the ring


CONTROL_FIRST = Method.Hello  # codes below are model RPCs, codes from here on session control
RPC_METHODS = tuple(m.name for m in Method if m < CONTROL_FIRST)

# ---- dtypes (the whitelist; both transports use it)

DTYPES: dict[int, tuple[str, torch.dtype]] = {
    1: ("float32", torch.float32),
    2: ("bfloat16", torch.bfloat16),
    3: ("float16", torch.float16),
    4: ("int64", torch.int64),
    5: ("int32", torch.int32),
}
DTYPE_CODE = {dt: code for code, (_, dt) in DTYPES.items()}
DTYPE_BY_NAME = {name: dt for name, dt in DTYPES.values()}
NAME_BY_DTYPE = {dt: name for name, dt in DTYPES.values()}


def dtype_from_name(name, field_name: str = "dtype") -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPE_BY_NAME:
        raise ProtocolError(f"{field_name} {describe(name)} not allowed (expected one of {sorted(DTYPE_BY_NAME)})")
    return DTYPE_BY_NAME[name]


def check_shape(shape, dtype: torch.dtype, nbytes: int, field_name: str) -> tuple[int, ...]:
    """Validate a shape against a byte count: ints, 0 <= dim <= MAX_DIM, product * itemsize == nbytes."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise ProtocolError(f"{field_name}.shape must be a list of at most {MAX_NDIM} dims, got {describe(shape)}")
    for d in shape:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            raise ProtocolError(f"{field_name}.shape has dim {describe(d)}; expected an int in [0, {MAX_DIM}]")
    span = math.prod(d for d in shape if d) * dtype.itemsize  # Python ints: no overflow
    if span > MAX_SPAN:
        # A zero dim makes nbytes 0, but the other dims still set strides: bound them too.
        raise ProtocolError(f"{field_name}.shape {tuple(shape)} spans {span} bytes, more than {MAX_SPAN}")
    expected = math.prod(shape) * dtype.itemsize
    if type(nbytes) is not int or nbytes != expected:
        raise ProtocolError(f"{field_name}.nbytes is {describe(nbytes)}, expected prod{tuple(shape)} x "
                            f"{dtype.itemsize} = {expected}")
    return tuple(shape)


class TensorDesc(NamedTuple):
    """Where one tensor's bytes lie in the sender's ring. A named tuple: built per tensor per call."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class Doorbell(NamedTuple):
    """One message, as encoded and as decoded (immutable; built twice per call on each side)."""

    method: Method
    seq: int
    token: bytes
    layer: int = -1
    op: int = 0
    pos: int = 0
    ring_end: int = 0
    work_ns: int = 0
    tensors: tuple[TensorDesc, ...] = ()
    text: str = ""
    flags: int = 0

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)


# ---- encoding

# One descriptor format per ndim: the shape packs as given and the unused dims are pad bytes (zeros).
_DESC_FORMATS = tuple(f"QQBB6x{n}q{8 * (MAX_NDIM - n)}x" for n in range(MAX_NDIM + 1))
assert all(struct.calcsize("<" + f) == _DESC.size for f in _DESC_FORMATS)
# Header and descriptors as one struct per sequence of tensor ndims (a call's are few and repeat): one pack a record
_RECORD_BY_NDIMS: dict[tuple[int, ...], struct.Struct] = {}


def _record_struct(ndims: tuple[int, ...]) -> struct.Struct:
    packer = _RECORD_BY_NDIMS.get(ndims)
    if packer is None:
        assert len(ndims) <= MAX_TENSORS and max(ndims, default=0) <= MAX_NDIM, ndims
        packer = struct.Struct(_HEADER.format + "".join(_DESC_FORMATS[n] for n in ndims))
        if len(_RECORD_BY_NDIMS) < 256:
            _RECORD_BY_NDIMS[ndims] = packer
    return packer


def encode(bell: Doorbell) -> bytes:
    method, seq, token, layer, op, pos, ring_end, work_ns, tensors, text, flags = bell
    raw_text = text.encode("utf-8") if text else b""
    assert len(tensors) <= MAX_TENSORS, len(tensors)
    assert len(raw_text) <= MAX_TEXT, len(raw_text)
    assert len(token) == TOKEN_BYTES, token
    fields = [MAGIC, PROTOCOL_VERSION, method, flags, seq, token, layer, op, pos, ring_end, work_ns,
              len(tensors), len(raw_text)]
    if not tensors:
        return _HEADER.pack(*fields) + raw_text
    for offset, nbytes, dtype, shape in tensors:
        fields += (offset, nbytes, DTYPE_CODE[dtype], len(shape), *shape)
    record = _record_struct(tuple(len(t.shape) for t in tensors)).pack(*fields)
    return record + raw_text if raw_text else record


def set_work_ns(record: bytearray, work_ns: int) -> None:
    """Write `work_ns` into an encoded doorbell (a reply encoded before its daemon work was known)."""
    _WORK_NS.pack_into(record, WORK_NS_AT, work_ns)


def encoded_size(ntensors: int, text_len: int = 0) -> int:
    return _HEADER.size + ntensors * _DESC.size + text_len


def is_doorbell(payload: bytes) -> bool:
    return payload[:4] == MAGIC


def peek_method(payload: bytes) -> Method | None:
    """The method byte of a doorbell not yet validated (None if there is none): the one place that reads a
    method from raw bytes. For routing and error messages only; `decode` validates everything."""
    if not is_doorbell(payload) or len(payload) < 7:
        return None
    return _METHOD_BY_CODE.get(payload[6])


# ---- decoding

_METHOD_BY_CODE = {m.value: m for m in Method}
_DTYPE_BY_CODE = {code: dt for code, (_, dt) in DTYPES.items()}
_DESC_UNSIGNED = struct.Struct(_DESC.format.replace("6q", "6Q"))  # the fast path's view of a descriptor
_ZERO_DIMS = tuple((0,) * (MAX_NDIM - n) for n in range(MAX_NDIM + 1))  # what lies past ndim


def decode(payload: bytes, *, capacity: int, token: bytes | None = None,
           expect_seq: int | None = None) -> Doorbell:
    """Parse and validate a doorbell. `capacity`: the sender's ring data bytes (bounds for offsets)."""
    data = bytes(payload)  # one private copy (none if `payload` is bytes already: immutable)
    if len(data) < _HEADER.size:
        raise ProtocolError(f"doorbell is {len(data)} bytes, expected at least {_HEADER.size}")
    (magic, version, code, flags, seq, msg_token, layer, op, pos, ring_end, work_ns,
     ntensors, text_len) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"doorbell magic {magic!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"doorbell version {version}, expected {PROTOCOL_VERSION}: "
                            "daemon and client run different shmrt versions")
    method = _METHOD_BY_CODE.get(code)
    if method is None:
        raise ProtocolError(f"doorbell method {code}, expected one of "
                            f"{[f'{m.value}={m.name}' for m in Method]}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"doorbell flags {flags:#x}, expected a subset of {KNOWN_FLAGS:#x}")
    if token is not None and msg_token != token:
        raise ProtocolError("doorbell token does not match this session's token")
    if expect_seq is not None and seq != expect_seq:
        raise ProtocolError(f"doorbell seq {seq}, expected {expect_seq}")
    if layer < -1:
        raise ProtocolError(f"doorbell layer {layer}, expected -1 or a layer index")
    if pos < 0:
        raise ProtocolError(f"doorbell pos {pos}, expected >= 0")
    if ntensors > MAX_TENSORS:
        raise ProtocolError(f"doorbell ntensors {ntensors}, expected at most {MAX_TENSORS}")
    text_at = _HEADER.size + ntensors * _DESC.size
    if len(data) != text_at + text_len:
        raise ProtocolError(f"doorbell is {len(data)} bytes, expected {text_at + text_len} for "
                            f"{ntensors} tensors and {text_len} text bytes")
    tensors = []
    if ntensors:
        # The common case, accepted in a few comparisons: a known dtype, dims read unsigned (a negative one
        # reads >= 2**63) with a product in [1, MAX_DIM] (so every dim is in [1, MAX_DIM] and the span far
        # below MAX_SPAN), zeros past ndim, nbytes matching, aligned and inside the ring. Anything else
        # takes the field-by-field checks, which accept the rest of what is legal or raise naming the field.
        for rec in _DESC_UNSIGNED.iter_unpack(data[_HEADER.size:text_at]):
            offset, nbytes, dtype, ndim = rec[0], rec[1], _DTYPE_BY_CODE.get(rec[2]), rec[3]
            if dtype is not None and ndim <= MAX_NDIM:
                shape = rec[4:4 + ndim]
                elements = math.prod(shape)
                if (0 < elements <= MAX_DIM and nbytes == elements * dtype.itemsize
                        and rec[4 + ndim:] == _ZERO_DIMS[ndim] and not offset % RING_ALIGN
                        and offset <= capacity and nbytes <= capacity - offset):
                    tensors.append(TensorDesc(offset, nbytes, dtype, shape))
                    continue
            tensors.append(_checked_descriptor(len(tensors), data, capacity))
    text = ""
    if text_len:
        try:
            text = data[text_at:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("doorbell text is not valid UTF-8") from None
    return Doorbell(method, seq, msg_token, layer, op, pos, ring_end, work_ns, tuple(tensors), text, flags)


def _checked_descriptor(i: int, data: bytes, capacity: int) -> TensorDesc:
    """Descriptor `i` of `data`, field by field: the first bad field raises, named."""
    offset, nbytes, code, ndim, *dims = _DESC.unpack_from(data, _HEADER.size + i * _DESC.size)
    name = f"tensor[{i}]"
    if code not in DTYPES:
        raise ProtocolError(f"{name}.dtype code {code}, expected one of "
                            f"{[f'{c}={n}' for c, (n, _) in DTYPES.items()]}")
    dtype = DTYPES[code][1]
    if ndim > MAX_NDIM:
        raise ProtocolError(f"{name}.ndim {ndim}, expected at most {MAX_NDIM}")
    if any(dims[ndim:]):
        raise ProtocolError(f"{name}.shape has non-zero entries past ndim {ndim}")
    shape = check_shape(dims[:ndim], dtype, nbytes, name)
    if offset % RING_ALIGN:
        raise ProtocolError(f"{name}.offset {offset} is not a multiple of {RING_ALIGN}")
    if not (offset <= capacity and nbytes <= capacity - offset):
        raise ProtocolError(f"{name} [{offset}, +{nbytes}) lies outside the ring data area "
                            f"of {capacity} bytes")
    return TensorDesc(offset, nbytes, dtype, shape)


# ---- a record as the C helper's words (native.NativeBell, bell.py): the shared-memory doorbell's fast path

WORD_MASK = (1 << 64) - 1
HEAD_WORDS = 10   # method, flags, seq, layer, op, pos, ring_end, work_ns, ntensors, text_len (native.py checks
DESC_WORDS = 10   # these against the C header): then per tensor offset, nbytes, dtype code, ndim, MAX_NDIM dims
WORK_NS_WORD = 7  # where work_ns lies among the header words


def to_words(method: int, seq: int, layer: int, op: int, pos: int, ring_end: int, tensors) -> list[int]:
    """A request's fields as the C encoder takes them (HEAD_WORDS, then DESC_WORDS per tensor; the token travels
    beside them). Each must fit its field (the header's layout), as `encode`'s struct would insist."""
    assert len(tensors) <= MAX_TENSORS, len(tensors)
    if not (-1 <= layer < 1 << 31 and 0 <= op < 1 << 32 and 0 <= pos < 1 << 63 and 0 <= seq <= WORD_MASK
            and 0 <= ring_end <= WORD_MASK):
        raise ValueError(f"doorbell fields out of range: layer {layer}, op {op}, pos {pos}, seq {seq}, "
                         f"ring_end {ring_end}")
    words = [method, 0, seq, layer & WORD_MASK, op, pos, ring_end, 0, len(tensors), 0]
    for offset, nbytes, dtype, shape in tensors:
        assert len(shape) <= MAX_NDIM, shape
        words += (offset, nbytes, DTYPE_CODE[dtype], len(shape), *shape, *_ZERO_DIMS[len(shape)])
    return words


def from_words(words: list[int], token: bytes, text: str = "") -> Doorbell:
    """The Doorbell of a record the C helper checked on its fast path (`words`: native.NativeBell.checked(); it
    accepts a strict subset of what `decode` does, so nothing here is checked again)."""
    tensors = []
    for at in range(HEAD_WORDS, len(words), DESC_WORDS):
        offset, nbytes, code, ndim = words[at:at + 4]
        tensors.append(TensorDesc(offset, nbytes, _DTYPE_BY_CODE[code], tuple(words[at + 4:at + 4 + ndim])))
    layer = words[3] if words[3] < 1 << 63 else words[3] - (1 << 64)
    return Doorbell(_METHOD_BY_CODE[words[0]], words[2], token, layer, words[4], words[5], words[6], words[7],
                    tuple(tensors), text, words[1])
