"""Every parse of host bytes ends in a result or a ShmrtError: the size/depth-capped JSON and msgpack
loaders, LlamaConfig's checks, and hostile replies driven through the real client transport classes
(a fake peer socket answers each request with a mutated reply). Error messages are one printable line.

Examples per fuzz target: SHMRT_FUZZ_EXAMPLES (default 300; 10,000 for a long run)."""
import json
import math
import os
import struct
import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from shmrt.enclave.ops import RemoteOps
from shmrt.errors import ModelError, ProtocolError, ShmrtError, describe, printable
from shmrt.model.config import LlamaConfig
from shmrt.wire import protocol
from shmrt.wire.peer import client_info
from shmrt.wire.bell import MAX_RECORD, BellOut
from shmrt.wire.ring import OFF_ASLEEP, OFF_BELL_SEQ, OFF_BELL_SLOT, OFF_HEAD, OFF_TAIL, Consumer, Producer, Ring
from shmrt.wire.registry import client_transport as make_client_transport
from shmrt.wire.untrusted import MAX_DEPTH, json_depth, load_json, load_msgpack

EXAMPLES = int(os.environ.get("SHMRT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
TINY = LlamaConfig.from_name("tiny")
OUTCOMES: dict[str, dict[str, int]] = {}


def _count(target: str, outcome: str) -> None:
    OUTCOMES.setdefault(target, {}).setdefault(outcome, 0)
    OUTCOMES[target][outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    for target, counts in sorted(OUTCOMES.items()):
        print(f"fuzz {target}: {sum(counts.values())} cases, {counts}")


def assert_one_clean_line(message: str) -> None:
    assert "\n" not in message and "\r" not in message, message[:200]
    assert all(ch.isprintable() for ch in message), ascii(message[:300])
    assert len(message) <= 3000, len(message)


def survives(target: str, fn, *args):
    """Run fn: a value or a ShmrtError with a clean message; anything else fails the test."""
    try:
        out = fn(*args)
    except ShmrtError as exc:
        assert_one_clean_line(str(exc))
        _count(target, type(exc).__name__)
        return None
    _count(target, "ok")
    return out


# ---- strategies: hostile plain data

CONTROL = "\x00\x07\x08\x1b[2J\x1b]0;pwned\x07\r\n\t\x7f\x85\u2028\u202e\ud800"
hostile_text = st.one_of(st.text(max_size=40), st.text(alphabet=st.sampled_from(list(CONTROL) + ["a", "é"]), max_size=40),
                         st.builds(lambda n: "\n" * n + "x", st.integers(0, 5000)))
huge_ints = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**63, 2**64, -2**63 - 1, 10**308, 10**309, 10**4000]))
bad_floats = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e300, 5e-324])
leaf = st.one_of(st.none(), st.booleans(), huge_ints, bad_floats, st.floats(), hostile_text)
plain = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(hostile_text, inner, max_size=4)), max_leaves=12)


def deep(depth: int, kind: str):
    value = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


@st.composite
def deep_json(draw):
    d = draw(st.integers(MAX_DEPTH - 2, 20_000))
    return draw(st.sampled_from(["[" * d + "]" * d, '{"a":' * d + "1" + "}" * d, "[" * d,
                                 '["' + "[" * d + '"]', '{"config": ' + "[" * d + "]" * d + "}"]))


def hostile_json_text():
    return st.one_of(deep_json(), plain.map(lambda v: json.dumps(v, allow_nan=True)),
                     st.sampled_from(["", "NaN", "-Infinity", "1e999", "[1e400]", "9" * 5000, '{"a": 1,}', "\x00"]),
                     st.text(max_size=100))


@st.composite
def hostile_config(draw):
    """The tiny config with one field (or one rope_scaling field, or one extra key) made hostile."""
    cfg = TINY.to_dict()
    where = draw(st.sampled_from(list(cfg) + ["rope_scaling.*", "extra", "deep"]))
    value = draw(st.one_of(plain, st.sampled_from([True, False, 0, -1, 10**30, "64", 64.0, 64.5]), huge_ints, bad_floats))
    if where == "rope_scaling.*":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
        scaling[draw(st.sampled_from(list(scaling) + ["type", "mscale"]))] = value
        cfg["rope_scaling"] = scaling
    elif where == "extra":
        cfg[draw(hostile_text)] = value
    elif where == "deep":
        cfg[draw(st.sampled_from(list(cfg)))] = deep(draw(st.integers(1, 900)), draw(st.sampled_from(["list", "dict"])))
    else:
        cfg[where] = value
    return cfg


def pack(value) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):  # not representable in msgpack: junk instead
        return b"\xc1"


# ---- the loaders and the printable() contract

def test_printable_escapes_control_characters_caps_length_and_is_idempotent():
    text = "ok\n\x1b[31mred\x00\u202egnp.exe\u2028" + "z" * 1000
    out = printable(text, 40)
    assert_one_clean_line(out)
    assert out.startswith("ok\\x0a\\x1b[31mred\\x00\\u202e") and out.endswith("(1000 more characters)")
    assert printable(out, 10_000) == out
    assert printable(b"bytes") == "<bytes>" and describe(10**5000) == "<an integer of 16610 bits>"
    start = time.perf_counter()
    assert len(printable("\n" * 8_000_000)) < 400  # an 8 MB error costs no more than a short one
    assert time.perf_counter() - start < 0.5


def test_json_deeper_than_the_limit_is_refused_before_parsing():
    for text in ["[" * 100_000, '{"a":' * 50_000, '["' + "[" * 100 + '"]']:
        depth = json_depth(text)
        if depth > MAX_DEPTH:
            with pytest.raises(ProtocolError, match="levels deep"):
                load_json(text, "t")
        else:
            assert load_json(text, "t") == ["[" * 100]  # brackets inside a string do not count
    assert load_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "t") is not None


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", "-Infinity", "1e999", "9" * 5000, "x" * (2 << 20)])
def test_json_non_finite_huge_or_oversized_is_a_protocol_error(text):
    with pytest.raises(ProtocolError):
        load_json(text, "t")


def test_msgpack_deep_ext_and_oversized_are_protocol_errors():
    for payload in [b"\x91" * 100_000 + b"\xc0", msgpack.packb(deep(MAX_DEPTH + 1, "list")),
                    msgpack.packb(msgpack.ExtType(5, b"x")), msgpack.packb({1: 2}), b"\xc1", b"\x92\x01"]:
        with pytest.raises(ProtocolError):
            load_msgpack(payload, "m", max_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="more than the 10"):
        load_msgpack(b"\x00" * 11, "m", max_bytes=10)


@FUZZ
@given(text=hostile_json_text())
def test_fuzz_load_json(text):
    survives("load_json", load_json, text, "fuzz")


@FUZZ
@given(value=plain, wrap=st.integers(0, 40), raw=st.binary(max_size=64))
def test_fuzz_load_msgpack(value, wrap, raw):
    for _ in range(wrap):
        value = [value]
    payload = pack(value) if not raw else raw
    survives("load_msgpack", lambda: load_msgpack(payload, "fuzz", max_bytes=1 << 20))


# ---- LlamaConfig

@FUZZ
@given(cfg=hostile_config())
def test_fuzz_config_from_dict(cfg):
    survives("LlamaConfig.from_dict", LlamaConfig.from_dict, cfg)


def _hf_view(cfg: dict) -> dict:
    hf = {k: v for k, v in cfg.items() if k != "name"}
    hf["model_type"] = "llama"
    return hf


@FUZZ
@given(cfg=hostile_config(), drop=st.sampled_from([None, "head_dim", "num_key_value_heads", "rms_norm_eps"]))
def test_fuzz_config_from_hf(cfg, drop):
    hf = _hf_view(cfg)
    if drop:
        hf.pop(drop, None)
    survives("LlamaConfig.from_hf", LlamaConfig.from_hf, hf)


@pytest.mark.parametrize("field,value,match", [
    ("rms_norm_eps", 10**400, "rms_norm_eps"), ("rms_norm_eps", 1.0, r"\[1e-12, 0.1\]"),
    ("rope_theta", math.inf, "rope_theta"), ("hidden_size", 10**400, "integer of"),
    ("num_key_value_heads", 3, "multiple"), ("tie_word_embeddings", 1, "true or false"),
    ("vocab_size", 512.0, "integer"), ("hidden_size", True, "integer"), ("name", "a\nb", "printable"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "not supported"),
    ("rope_scaling", {"rope_type": "linear", "factor": math.nan}, "factor"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0, "mscale": 1}, "unexpected 'mscale'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, "low_freq_factor <"),
])
def test_config_field_checks_name_the_field(field, value, match):
    with pytest.raises(ModelError, match=match):
        LlamaConfig.from_dict({**TINY.to_dict(), field: value})


def test_hf_config_implied_head_dim_needs_heads_to_divide_hidden_size():
    hf = _hf_view(TINY.to_dict())
    del hf["head_dim"]
    hf["num_attention_heads"], hf["num_key_value_heads"] = 3, 3
    with pytest.raises(ModelError, match="not a multiple of num_attention_heads 3"):
        LlamaConfig.from_hf(hf)
    hf["num_attention_heads"] = hf["num_key_value_heads"] = 4
    assert LlamaConfig.from_hf(hf).head_dim == 16


# ---- hostile replies through the real client transports

class FakePeer:
    """Stands in for the client's ZeroMQ socket: answers each request with `respond(request bytes)`."""

    def __init__(self, respond):
        self.respond = respond
        self.pending = None

    def send(self, payload, flags=0):
        self.pending = self.respond(bytes(payload))

    def poll(self, timeout=0, flags=0):
        return True

    def recv(self, copy=True):
        out, self.pending = self.pending, None
        return out

    def close(self, linger=0):
        pass


class QuietPeer(FakePeer):
    """A fake socket that is readable only when it holds a message (the shm doorbell's client looks at
    its socket between wait slices, where only an Error may come)."""

    def poll(self, timeout=0, flags=0):
        return self.pending is not None or bool(flags & 2)  # zmq.POLLOUT: always writable


def client_with(transport: str, respond, ring_bytes: int = 1 << 16, doorbell: str = "zmq"):
    """A client whose socket is `respond`: with doorbell="zmq" every doorbell goes over it; with "shm" only
    the control messages (Hello, Attach, Close, a Wake) do."""
    t = make_client_transport(transport, "ipc:///nonexistent/shmrt-fuzz.sock", timeout=0.1, doorbell=doorbell)
    t._sock.close(linger=0)
    peer = (FakePeer if doorbell == "zmq" else QuietPeer)(respond)
    t._sock = peer
    t._open_socket = lambda: peer  # limit_replies re-opens the socket
    return t


# Doorbell header fields: (name, struct format at its offset).
HEADER_FIELDS = {"magic": (0, "4s"), "version": (4, "H"), "method": (6, "B"), "flags": (7, "B"), "seq": (8, "Q"),
                 "token": (16, "16s"), "layer": (32, "i"), "op": (36, "I"), "pos": (40, "q"), "ring_end": (48, "Q"),
                 "work_ns": (56, "Q"), "ntensors": (64, "H"), "text_len": (66, "H")}
DESC_FIELDS = {"offset": (0, "Q"), "nbytes": (8, "Q"), "dtype": (16, "B"), "ndim": (17, "B"), "shape": (24, "q")}
WIDTH = {"B": 8, "H": 16, "I": 32, "i": 32, "Q": 64, "q": 64}


@st.composite
def doorbell_mutation(draw):
    kind = draw(st.sampled_from(["header"] * 4 + ["desc"] * 3 + ["text", "bytes", "none"]))
    if kind == "header":
        name = draw(st.sampled_from(list(HEADER_FIELDS)))
        off, fmt = HEADER_FIELDS[name]
        if fmt.endswith("s"):
            value = draw(st.binary(min_size=int(fmt[:-1]), max_size=int(fmt[:-1])))
        else:
            bits = WIDTH[fmt]
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if fmt.islower() else (0, 2**bits - 1)
            value = draw(st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1])))
        return ("header", off, fmt, value)
    if kind == "desc":
        name = draw(st.sampled_from(list(DESC_FIELDS)))
        off, fmt = DESC_FIELDS[name]
        if name == "shape":
            off += 8 * draw(st.integers(0, 5))
        bits = WIDTH[fmt]
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if fmt.islower() else (0, 2**bits - 1)
        return ("desc", draw(st.integers(0, 1)), off, fmt, draw(st.one_of(st.integers(lo, hi), st.integers(-1, 70))))
    if kind == "text":
        return ("text", draw(st.one_of(hostile_json_text(), hostile_text)))
    if kind == "bytes":
        return ("bytes", draw(st.integers(0, 200)), draw(st.binary(max_size=100)))
    return ("none",)


def _legit_shm_reply(request: bytes, shapes, config_text: str = "") -> bytes:
    bell = protocol.decode(request, capacity=1 << 40)
    descs, offset = [], 0
    for shape in shapes:
        nbytes = 4 * math.prod(shape)
        descs.append(protocol.TensorDesc(offset, nbytes, torch.float32, shape))
        offset += (nbytes + 63) // 64 * 64
    return protocol.encode(protocol.Doorbell(bell.method, bell.seq, bell.token, ring_end=offset,
                                             tensors=tuple(descs), text=config_text))


def _mutate_doorbell(raw: bytes, mutation) -> bytes:
    data = bytearray(raw)
    kind = mutation[0]
    if kind == "header":
        _, off, fmt, value = mutation
        struct.pack_into("<" + fmt, data, off, value)
    elif kind == "desc":
        _, index, off, fmt, value = mutation
        base = 72 + 72 * index
        if base + 72 <= len(data):
            value = value % 2 ** WIDTH[fmt] if fmt.isupper() else max(min(value, 2**63 - 1), -2**63)
            struct.pack_into("<" + fmt, data, base + off, value)
    elif kind == "text":
        text = mutation[1].encode("utf-8", "surrogatepass")[:protocol.MAX_TEXT]
        ntensors = struct.unpack_from("<H", data, 64)[0]
        data = data[:72 + 72 * min(ntensors, 8)] + text
        struct.pack_into("<H", data, 66, len(text))
    elif kind == "bytes":
        _, cut, tail = mutation
        data = data[:cut] + tail
    return bytes(data)


RPC_SHAPES = {"Embedding": [(1, 3, 64)], "BatchLinear": [(1, 3, 64), (1, 3, 32), (1, 3, 32)],
              "Matmul": [(1, 4, 3, 3)], "LMHead": [(1, 512)], "Init": [(5, 64), (8,)]}


def _rpc(ops: RemoteOps, t, method: str):
    x = torch.zeros(1, 3, 64)
    if method == "Embedding":
        reply = ops.embedding(torch.zeros(1, 3, dtype=torch.int64))
    elif method == "BatchLinear":
        reply = ops.linear(0, ["q_proj", "k_proj", "v_proj"], x)
    elif method == "Matmul":
        reply = ops.matmul(torch.zeros(1, 4, 3, 16), torch.zeros(1, 4, 3, 16), transpose_b=True, expect_cols=3)
    elif method == "LMHead":
        reply = ops.lm_head(torch.zeros(1, 64))
    else:
        reply = t.call("Init")
        load_json(reply.text or "{}", "Init reply text")
    with reply:
        for tensor in reply.tensors:
            tensor.sum()  # touch every byte the reply names


def _reset_rings(t) -> None:
    """Each example starts from empty rings (a failed example may leave them mid-message)."""
    t.req.producer, t.rsp.consumer = Producer(t.req), Consumer(t.rsp)
    for ring in (t.req, t.rsp):
        ring.native.store(OFF_HEAD, 0)
        ring.native.store(OFF_TAIL, 0)
    t._pending = None
    if t.calls_in_c:
        calls_in_c = t.calls_in_c
        t.bind_caller()   # (over the new producer)
        t.calls_in_c = calls_in_c


@pytest.fixture(scope="module", params=["python", "c"])
def shm_client(request):
    """A shm client ringing over ZeroMQ (the fake peer its socket), its calls made from Python or in C (the record
    encoded and the reply checked by the C helper)."""
    state = {"respond": lambda raw: _legit_shm_reply(raw, [])}   # a plain answer to Attach
    t = client_with("shm", lambda raw: state["respond"](raw))
    t.open_session(1 << 16)
    t.calls_in_c = request.param == "c"
    yield t, state
    t.close()


@FUZZ
@given(mutation=doorbell_mutation(), method=st.sampled_from(list(RPC_SHAPES)))
def test_fuzz_shm_rpc_replies(shm_client, mutation, method):
    t, state = shm_client
    _reset_rings(t)
    state["respond"] = lambda raw: _mutate_doorbell(_legit_shm_reply(raw, RPC_SHAPES[method]), mutation)
    survives("shm RPC replies", _rpc, RemoteOps(t, TINY, torch.float32), t, method)


def test_a_reply_seq_word_that_changes_and_changes_back_is_waited_through_or_refused():
    """The host flips the response ring's seq word between another value and the one the client has seen while a
    call waits (the C take can then load it changed, then unchanged): the call ends within its timeout with a
    ShmrtError (the scribbled word named, or no answer), never another exception."""
    import threading
    from shmrt.errors import ShmrtError
    t = client_with("shm", lambda raw: _legit_shm_reply(raw, []) if protocol.peek_method(raw) != protocol.Method.Wake
                    else None, doorbell="shm")
    try:
        t.open_session(1 << 16)
        stop = threading.Event()
        seen = t._bell_in.seen

        def flip():
            while not stop.is_set():
                t.rsp.native.store(OFF_BELL_SEQ, seen + 12345)
                t.rsp.native.store(OFF_BELL_SEQ, seen)
        flipper = threading.Thread(target=flip, daemon=True)
        flipper.start()
        try:
            for _ in range(20):
                start = time.monotonic()
                with pytest.raises(ShmrtError):
                    t.call("LMHead", [torch.zeros(1, 64)])
                assert time.monotonic() - start < t.timeout + 1.0
                _reset_rings(t)
        finally:
            stop.set()
            flipper.join(5)
            t.rsp.native.store(OFF_BELL_SEQ, seen)
    finally:
        t.close()


# ---- hostile replies rung through the response ring's header (the shm doorbell)

@st.composite
def slot_mutation(draw):
    """A mutated legit reply record (doorbell_mutation), and what the host does with the slot around it:
    post it as is, post it and then overwrite the length word, store another seq word, send it over the
    socket during the call instead, or post it after forcing the daemon's asleep word (the client sends a
    Wake first)."""
    record = draw(doorbell_mutation())
    kind = draw(st.sampled_from(["post"] * 5 + ["length", "length", "seq", "seq", "socket", "wake"]))
    if kind == "length":
        return record, (kind, draw(st.one_of(st.integers(0, 400), st.integers(0, 2**64 - 1),
                                             st.sampled_from([MAX_RECORD, MAX_RECORD + 1, 4096, 2**63]))))
    if kind == "seq":
        return record, (kind, draw(st.one_of(st.sampled_from(["seen", "next", "previous"]), st.integers(0, 2**64 - 1))))
    if kind == "socket":
        return record, (kind, draw(st.booleans()))  # True: as an Error doorbell
    return record, (kind,)


class SlotResponder:
    """Plays the daemon on the response ring (its own mapping, attached by name as the daemon does) with the reply
    `state["reply"]` makes of each request. Two ways in, as the client rings: `post_call` stands in for the client's
    BellOut where its calls are made from Python (it posts the request for real, then answers); `idle` is a perf-log
    observer's hook, which a call in one C call (shmrt_call) runs between its post and its wait: it reads the request
    the client posted from the request ring's slot, then answers."""

    def __init__(self, t, state):
        self.t, self.state = t, state
        self.request_out = t._bell_out
        self.rsp = Ring.attach(t.rsp.name, t.rsp.capacity)
        self.reply_out = BellOut(self.rsp, t.token)

    def post_call(self, method: int, seq: int, layer: int, op: int, pos: int, ring_end: int, tensors):
        record = protocol.encode(protocol.Doorbell(protocol.Method(method), seq, self.t.token, layer, op, pos, ring_end,
                                                   tensors=tuple(tensors)))
        raw, slot = self.state["reply"](record)
        if slot[0] == "wake":
            self.t.req.native.store(OFF_ASLEEP, 1)
        wake = self.request_out.post_call(method, seq, layer, op, pos, ring_end, tensors)
        self._answer(raw, slot, seq)
        return wake

    def __call__(self, stats) -> None:
        pass

    def idle(self) -> None:
        length = self.t.req.native.load(OFF_BELL_SLOT)
        record = bytes(self.t.req.mapping[OFF_BELL_SLOT + 8:OFF_BELL_SLOT + 8 + length])
        raw, slot = self.state["reply"](record)
        self._answer(raw, slot, struct.unpack_from("<Q", record, 8)[0])

    def _answer(self, raw: bytes, slot: tuple, seq: int) -> None:
        kind, *arg = slot
        if kind == "wake":
            self.t.req.native.store(OFF_ASLEEP, 0)
        if kind == "socket":
            self.t._sock.pending = encode_error(raw, "the daemon on the socket") if arg[0] else raw
            return
        if kind == "seq" and arg[0] == "seen":
            return  # nothing posted: the client waits out its timeout
        self.reply_out.post(raw[:MAX_RECORD], seq)  # the slot holds no more: a longer record is cut
        if kind == "length":
            self.rsp.native.store(OFF_BELL_SLOT, arg[0])
        elif kind == "seq":
            word = {"next": seq + 1, "previous": seq - 1}.get(arg[0], arg[0])
            self.rsp.native.store(OFF_BELL_SEQ, word)

    def close(self) -> None:
        self.rsp.close()


def encode_error(raw: bytes, text: str) -> bytes:
    """An Error doorbell with the token and seq of `raw` where it has them."""
    token, seq = (raw[16:32], struct.unpack_from("<Q", raw, 8)[0]) if len(raw) >= 32 else (bytes(16), 0)
    return protocol.encode(protocol.Doorbell(protocol.Method.Error, seq, token, flags=protocol.FLAG_ERROR, text=text))


@pytest.fixture(scope="module", params=["python", "c"])
def shm_bell_client(request):
    """A shm doorbell client whose calls are made from Python (its BellOut stood in for) or in one C call (the
    responder an observer whose `idle` the call runs between its post and its wait)."""
    state = {"respond": lambda raw: _legit_shm_reply(raw, []) if protocol.peek_method(raw) != protocol.Method.Wake
             else None}
    t = client_with("shm", lambda raw: state["respond"](raw), doorbell="shm")
    t.open_session(1 << 16)
    responder = SlotResponder(t, state)
    if request.param == "python":
        t._bell_out = responder
        t.calls_in_c = False
    else:
        t.observers.append(responder)
    yield t, state
    responder.close()
    t.close()


@FUZZ
@given(mutation=slot_mutation(), method=st.sampled_from(list(RPC_SHAPES)))
def test_fuzz_shm_doorbell_replies_through_the_slot(shm_bell_client, mutation, method):
    t, state = shm_bell_client
    _reset_rings(t)
    t.rsp.native.store(OFF_BELL_SEQ, t._bell_in.seen)  # a scribbled word of the last example is gone
    record_mutation, slot = mutation
    if slot[0] == "wake" and t.calls_in_c:   # (the C call reads the daemon's asleep word as it posts)
        t.req.native.store(OFF_ASLEEP, 1)
    state["reply"] = lambda raw: (_mutate_doorbell(_legit_shm_reply(raw, RPC_SHAPES[method]), record_mutation), slot)
    start = time.monotonic()
    survives("shm doorbell replies (slot)", _rpc, RemoteOps(t, TINY, torch.float32), t, method)
    assert time.monotonic() - start < t.timeout + 1.0, "a call outlived its timeout"
    t._sock.pending = None


def _hello_then_config(t):
    info = t.hello(client_info())
    if not isinstance(info.get("config"), dict):
        raise ProtocolError("no config")
    LlamaConfig.from_dict(info["config"])


@FUZZ
@given(mutation=doorbell_mutation(), cfg=hostile_config(), text=st.one_of(st.none(), hostile_json_text()))
def test_fuzz_shm_hello_replies(mutation, cfg, text):
    hello = text if text is not None else json.dumps({"config": cfg, "model": "tiny"}, allow_nan=True)
    hello = hello.encode("utf-8", "surrogatepass")[:protocol.MAX_TEXT].decode("utf-8", "ignore")
    t = client_with("shm", lambda raw: _mutate_doorbell(_legit_shm_reply(raw, [], hello), mutation))
    with t:
        survives("shm Hello replies", _hello_then_config, t)


# ---- msgpack

@st.composite
def msgpack_mutation(draw):
    kind = draw(st.sampled_from(["set", "set", "drop", "tensor", "tensor", "whole", "raw", "none"]))
    keys = ["method", "seq", "error", "work_ns", "text", "tensors", "extra"]
    value = draw(st.one_of(plain, huge_ints.filter(lambda v: -2**63 <= v < 2**64), bad_floats,
                           st.builds(deep, st.integers(1, 900), st.sampled_from(["list", "dict"])),
                           st.binary(max_size=64)))
    if kind in ("set", "drop"):
        return (kind, draw(st.sampled_from(keys)), value)
    if kind == "tensor":
        return (kind, draw(st.integers(0, 2)), draw(st.sampled_from(["dtype", "shape", "data", "extra"])), value)
    if kind == "whole":
        return (kind, value)
    if kind == "raw":
        return (kind, draw(st.binary(max_size=200)))
    return ("none",)


def _legit_msgpack_reply(request: bytes, shapes, text: str = "") -> dict:
    req = msgpack.unpackb(request, raw=False)
    tensors = [{"dtype": "float32", "shape": list(s), "data": bytes(4 * math.prod(s))} for s in shapes]
    return {"method": req["method"], "seq": req["seq"], "error": None, "work_ns": 5, "text": text, "tensors": tensors}


def _mutate_msgpack(reply: dict, mutation) -> bytes:
    kind = mutation[0]
    if kind == "set":
        reply[mutation[1]] = mutation[2]
    elif kind == "drop":
        reply.pop(mutation[1], None)
    elif kind == "tensor":
        _, index, key, value = mutation
        if index < len(reply["tensors"]):
            reply["tensors"][index][key] = value
    elif kind == "whole":
        reply = mutation[1]
    elif kind == "raw":
        return mutation[1]
    return pack(reply)


@FUZZ
@given(mutation=msgpack_mutation(), method=st.sampled_from(list(RPC_SHAPES)))
def test_fuzz_msgpack_rpc_replies(mutation, method):
    t = client_with("msgpack", lambda raw: _mutate_msgpack(_legit_msgpack_reply(raw, RPC_SHAPES[method]), mutation))
    with t:
        t.open_session(1 << 20)
        survives("msgpack RPC replies", _rpc, RemoteOps(t, TINY, torch.float32), t, method)


@FUZZ
@given(mutation=msgpack_mutation(), cfg=hostile_config(), text=st.one_of(st.none(), hostile_json_text()))
def test_fuzz_msgpack_hello_replies(mutation, cfg, text):
    hello = text if text is not None else json.dumps({"config": cfg, "model": "tiny"}, allow_nan=True)
    t = client_with("msgpack", lambda raw: _mutate_msgpack(_legit_msgpack_reply(raw, [], hello), mutation))
    with t:
        survives("msgpack Hello replies", _hello_then_config, t)
