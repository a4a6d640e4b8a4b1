"""The v2.4 baseline, kept faithful: every tensor's bytes inside one msgpack message on ZeroMQ.

Request:  {"method", "seq", "token", "layer", "op", "pos", "text",
           "tensors": [{"dtype": str, "shape": [int], "data": bytes}]}
Reply:    {"method", "seq", "error": str|None, "work_ns", "text", "tensors": [...]}

Unlike v2.4, the tensor<->bytes copies (tobytes before packing, the copy out of the unpacked
buffer) are timed, inside Serialize and Deserialize. Decoding validates types, the dtype
whitelist and shape x itemsize == len(data); msgpack never builds anything but plain data.
"""
from __future__ import annotations

import json

import msgpack
import torch

from .. import settings
from ..errors import PeerError, ProtocolError, describe, printable
from .native import now_ns
from .protocol import MAX_TENSORS, MAX_TEXT, NAME_BY_DTYPE, TOKEN_BYTES, check_shape, dtype_from_name
from .scopes import Reply
from .stats import CallStats
from .transport import ClientTransport, Hello, ReplyBuilder, Request, ServerSession, parse_client_info
from .untrusted import load_json, load_msgpack
from .protocol import RPC_METHODS

NAME = "msgpack"
CONTROL = ("Hello", "Close")
_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}  # fixmap, map 16, map 32: every message is a map

# Bytes of a message besides its tensor data and text: keys, small ints, dtype names, shapes. A reply
# with MAX_TENSORS six-dim tensors and every field present packs to well under 2 KiB.
ENVELOPE_BYTES = 4096


def tensor_to_wire(t: torch.Tensor) -> dict:
    t = t.detach().contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": NAME_BY_DTYPE[t.dtype], "shape": list(t.shape), "data": data}


def tensor_from_wire(obj, name: str) -> torch.Tensor:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise ProtocolError(f"{name} must be a map with keys dtype, shape, data")
    dtype = dtype_from_name(obj["dtype"], f"{name}.dtype")
    data = obj["data"]
    if not isinstance(data, bytes):
        raise ProtocolError(f"{name}.data must be binary")
    shape = check_shape(obj["shape"], dtype, len(data), name)
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)  # bytearray(): the copy out


def unpack(payload: bytes, what: str, max_bytes: int) -> dict:
    obj = load_msgpack(payload, what, max_bytes=max_bytes)
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a msgpack map")
    return obj


def _int_field(obj: dict, key: str, default: int = 0) -> int:
    value = obj.get(key, default)
    if type(value) is not int:
        raise ProtocolError(f"field {printable(key)!r} must be an integer, got {type(value).__name__}")
    return value


def _tensors_field(obj: dict) -> list:
    items = obj.get("tensors", [])
    if not isinstance(items, list) or len(items) > MAX_TENSORS:
        raise ProtocolError(f"field 'tensors' must be a list of at most {MAX_TENSORS}")
    return [tensor_from_wire(item, f"tensor[{i}]") for i, item in enumerate(items)]


def _text_field(obj: dict) -> str:
    text = obj.get("text", "") or ""
    if not isinstance(text, str):
        raise ProtocolError(f"field 'text' must be a string, got {type(text).__name__}")
    return text


class MsgpackClient(ClientTransport):
    name = NAME

    def message_limit(self, max_reply_bytes: int | None) -> int:
        # Tensor bytes travel inside the reply: the bound is the largest reply the client expects
        # (set from the ring size it would use, open_session) or, before that, a control message.
        return max(max_reply_bytes or 0, MAX_TEXT) + ENVELOPE_BYTES

    def __init__(self, endpoint: str, *, timeout: float, enclave: bool = False, max_reply_bytes: int | None = None,
                 doorbell: str | None = None):
        super().__init__(endpoint, timeout=timeout, enclave=enclave, max_reply_bytes=max_reply_bytes,
                         doorbell=doorbell)
        self.reply_bound = max_reply_bytes   # told the daemon at Hello, so that it refuses a larger reply itself

    def open_session(self, ring_bytes: int) -> None:
        """No rings here; `ring_bytes` (sized for this run's largest message) bounds every reply: the bound Hello
        announced, where it announced one (ZeroMQ drops a message over it without a word: the daemon must know)."""
        self.limit_replies(self.reply_bound or ring_bytes)

    def _roundtrip(self, message: dict, stats: CallStats | None = None) -> tuple[dict, bytes, bytes]:
        payload = msgpack.packb(message, use_bin_type=True)
        if stats is not None:
            stats.t_encoded = now_ns()
        self._send(payload)
        if stats is not None:
            stats.t_sent = now_ns()
            self._while_waiting()
        raw = self._recv()
        if stats is not None:
            stats.t_replied = now_ns()
        reply = unpack(raw, "reply", self.max_message)
        if reply.get("error"):
            raise PeerError(f"daemon at {self.endpoint}: {printable(reply['error'])}")
        if _int_field(reply, "seq") != message["seq"]:
            raise ProtocolError(f"reply seq {describe(reply.get('seq'))}, expected {message['seq']}")
        if reply.get("method") != message["method"]:
            raise ProtocolError(f"reply method {describe(reply.get('method'))}, expected {message['method']}")
        return reply, payload, raw

    def hello(self, client_info: dict) -> dict:
        if self.reply_bound is not None:
            client_info = {**client_info, "max_reply_bytes": self.reply_bound}
        reply, _, _ = self._roundtrip({"method": "Hello", "seq": self._next_seq(), "token": self.token,
                                       "text": json.dumps(client_info)})
        config = load_json(_text_field(reply), "Hello reply text", max_chars=MAX_TEXT)
        if not isinstance(config, dict):
            raise ProtocolError("Hello reply is not a JSON object")
        return config

    def call(self, method: str, tensors=(), *, layer: int = -1, op: int = 0, pos: int = 0,
             wire_dtype=None) -> Reply:
        stats = CallStats(method, self.name, layer, t_start=now_ns(), op=op)
        self._claim_inputs(method, tensors)  # nothing is staged in place: every tensor is packed
        wire = [tensor_to_wire(t.to(wire_dtype) if wire_dtype is not None and t.is_floating_point() else t)
                for t in tensors]
        message = {"method": method, "seq": self._next_seq(), "token": self.token, "layer": layer,
                   "op": op, "pos": pos, "text": "", "tensors": wire}
        reply, payload, raw = self._roundtrip(message, stats)
        out = _tensors_field(reply)
        stats.t_decoded = now_ns()
        stats.payload_sent = sum(len(w["data"]) for w in wire)
        stats.payload_recv = sum(t.numel() * t.element_size() for t in out)
        stats.sent_bytes = len(payload)
        stats.recv_bytes = len(raw)
        stats.work_ns = _int_field(reply, "work_ns")
        self._notify(stats)
        return Reply(out, stats, _text_field(reply))

    def _close_message(self) -> bytes | None:
        return msgpack.packb({"method": "Close", "seq": self._next_seq(), "token": self.token}) if self.seq else None


class MsgpackReplyBuilder(ReplyBuilder):
    def __init__(self, capacity: int):
        self.tensors: list[torch.Tensor] = []
        self.capacity = capacity

    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype)
        self.tensors.append(t)
        return t


def parse_request(payload: bytes) -> dict:
    """Validate the envelope of a request (method, seq, token); tensors are decoded later."""
    obj = unpack(payload, "request", settings.max_reply_bytes() + ENVELOPE_BYTES)
    method = obj.get("method")
    if method not in RPC_METHODS + CONTROL:
        raise ProtocolError(f"method {describe(method)}, expected one of {RPC_METHODS + CONTROL}")
    _int_field(obj, "seq")
    token = obj.get("token")
    if not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
        raise ProtocolError(f"token must be {TOKEN_BYTES} bytes")
    return obj


# ---- codec: the first message of a new client (registry.py's interface)

def sniff(payload: bytes) -> bool:
    return len(payload) > 0 and payload[0] in _MAP_MARKERS


def decode_hello(payload: bytes) -> Hello | None:
    """A request that opens a session, validated; None for a request of another method."""
    obj = parse_request(payload)
    if obj["method"] != "Hello":
        return None
    if obj["seq"] != 1:
        raise ProtocolError(f"Hello seq {obj['seq']}, expected 1")
    return Hello(obj["token"], parse_client_info(obj.get("text")))


def encode_error(seq: int, message: str) -> bytes:
    return msgpack.packb({"method": "Error", "seq": seq, "error": message, "tensors": []}, use_bin_type=True)


def encode_refusal(message: str) -> bytes:
    """An Error reply to seq 1 for a client that has no session."""
    return encode_error(1, message)


class MsgpackServerSession(ServerSession):
    transport = NAME

    def __init__(self, token: bytes):
        super().__init__(token)
        self.reply_capacity = settings.max_reply_bytes()

    def accept_client(self, client_info: dict) -> None:
        """The largest reply the client takes (its Hello's `max_reply_bytes`: ZeroMQ would drop a larger one
        unseen, and the client would wait out its timeout); a result past it is refused here, in words."""
        bound = client_info.get("max_reply_bytes")
        if bound is None:
            return
        if type(bound) is not int or bound <= 0:
            raise ProtocolError(f"Hello's max_reply_bytes {describe(bound)}, expected a positive integer")
        self.reply_capacity = min(self.reply_capacity, bound)

    def decode(self, payload: bytes) -> Request:
        obj = parse_request(payload)
        if obj["token"] != self.token:
            raise ProtocolError("request token does not match this session's token")
        seq = obj["seq"]
        if seq != self.expect_seq:
            raise ProtocolError(f"request seq {seq}, expected {self.expect_seq}")
        self.expect_seq += 1
        layer, op, pos = _int_field(obj, "layer", -1), _int_field(obj, "op"), _int_field(obj, "pos")
        if layer < -1 or pos < 0:
            raise ProtocolError(f"layer {layer} / pos {pos} out of range")
        return Request(obj["method"], seq, layer, op, pos, _tensors_field(obj), _text_field(obj))

    def reply_builder(self) -> MsgpackReplyBuilder:
        return MsgpackReplyBuilder(self.reply_capacity)

    def encode_reply(self, request: Request, builder: MsgpackReplyBuilder, *, work_ns: int = 0, text: str = "") -> bytes:
        tensors = [tensor_to_wire(t) for t in builder.tensors] if builder else []
        return msgpack.packb({"method": request.method, "seq": request.seq, "error": None, "work_ns": work_ns,
                              "text": text, "tensors": tensors}, use_bin_type=True)

    def encode_error(self, seq: int, message: str) -> bytes:
        return encode_error(seq, message)


Client = MsgpackClient
Session = MsgpackServerSession
