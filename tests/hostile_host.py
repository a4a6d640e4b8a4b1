"""A hostile host for tests: a man-in-the-middle between a real `shmrt client` and a real daemon.

    python tests/hostile_host.py --front ENDPOINT --back ENDPOINT --rule FIELD@WHEN --info FILE

It forwards every message unchanged except one reply (or one resource) that `--rule` names, so it keeps
working when payloads change: it never builds a reply of its own, it edits the daemon's. FIELD is a key
of SHM_RULES / MSGPACK_RULES / RESOURCE_RULES; WHEN picks the reply: `hello` (the first), `init`
(the reply to Init), `rpc` (the third RPC reply, mid-prefill), `decode` (the third reply after the
first LMHead, mid-decode). Those see only replies that travel over ZeroMQ: with the shm doorbell an
RPC's reply is rung in the response ring's header instead, so the RPC cases run with `--doorbell zmq`.

BELL_RULES are the shm doorbell's own: WHEN is `bell`, and from the third RPC request bell after Init on
(the request ring's `bell seq` word reaches BELL_TRIGGER_SEQ) the host writes the rings' header words
itself, on every call, until the client sends Close or BELL_ACT_S pass. It maps the rings by the names
in the Attach text and races the daemon: whichever of them rings a call's reply first is what the
client reads, so a rule keeps at it until a call of its lands.

It writes what it learned (ring names, whether the rule fired) to FILE as JSON on every change. It
imports neither shmrt nor torch: it is the attacker, not a peer.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import signal
import struct
import sys
import time

import msgpack
import zmq

HEADER = struct.Struct("<4sHBBQ16siIqQQHH4x")
HEADER_BYTES, DESC_BYTES = 72, 72
FIELDS = {"magic": (0, "4s"), "version": (4, "H"), "method": (6, "B"), "flags": (7, "B"), "seq": (8, "Q"),
          "token": (16, "16s"), "layer": (32, "i"), "op": (36, "I"), "pos": (40, "q"), "ring_end": (48, "Q"),
          "work_ns": (56, "Q"), "ntensors": (64, "H"), "text_len": (66, "H")}
DESC = {"offset": (0, "Q"), "nbytes": (8, "Q"), "dtype": (16, "B"), "ndim": (17, "B"), "shape0": (24, "q")}
INIT, LMHEAD, CLOSE, ERROR, ATTACH, WAKE = 1, 5, 17, 18, 19, 20
FLAG_ERROR = 0x01
MAX_TEXT = 65535

CONTROL_TEXT = "\x1b[2J\x1b]0;owned\x07\x00red\x1b[31m\r\u202eevil\u2028"
DEEP_JSON = "[" * 60000  # fits one doorbell's text


# ---- shm doorbells

def get(data: bytes, name: str, base: int = 0, table=FIELDS):
    off, fmt = table[name]
    return struct.unpack_from("<" + fmt, data, base + off)[0]


def put(data: bytes, name: str, value, base: int = 0, table=FIELDS) -> bytes:
    out = bytearray(data)
    off, fmt = table[name]
    struct.pack_into("<" + fmt, out, base + off, value)
    return bytes(out)


def text_of(data: bytes) -> str:
    n = get(data, "ntensors")
    return data[HEADER_BYTES + n * DESC_BYTES:].decode("utf-8", "replace")


def with_text(data: bytes, text: str | bytes, *, error: bool = False) -> bytes:
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    n = get(data, "ntensors")
    out = put(data[:HEADER_BYTES + n * DESC_BYTES], "text_len", min(len(raw), MAX_TEXT)) + raw
    if error:
        out = put(put(put(out, "flags", FLAG_ERROR), "method", ERROR), "ntensors", 0)
        out = out[:HEADER_BYTES] + raw
    return out


def edit_config(text: str, key: str, value_json: str) -> str:
    """The Hello JSON with config[key] replaced by raw JSON text (which may be invalid for Python). The
    client takes no config from the host (it reads its own copy of the model): a parseable one is ignored."""
    obj = json.loads(text)
    obj.setdefault("config", {})[key] = "@@VALUE@@"
    return json.dumps(obj).replace('"@@VALUE@@"', value_json)


def other_digest(text: str) -> str:
    """The Hello JSON claiming another model: the client must refuse it."""
    return json.dumps({**json.loads(text), "digest": "0" * 64})


def desc_rule(name, value):
    return lambda d: put(d, name, value(get(d, name, HEADER_BYTES, DESC)) if callable(value) else value,
                         HEADER_BYTES, DESC) if get(d, "ntensors") else d


SHM_RULES = {
    "magic": lambda d: put(d, "magic", b"XXXX"),
    "version": lambda d: put(d, "version", get(d, "version") + 1),
    "method-unknown": lambda d: put(d, "method", 99),
    "method-other": lambda d: put(d, "method", 3 if get(d, "method") != 3 else 4),
    "flags-unknown": lambda d: put(d, "flags", 0x80),
    "flags-error": lambda d: put(d, "flags", FLAG_ERROR),
    "seq": lambda d: put(d, "seq", get(d, "seq") + 1),
    "token": lambda d: put(d, "token", bytes(16)),
    "ring_end": lambda d: put(d, "ring_end", 2**63),
    "work_ns": lambda d: put(d, "work_ns", 2**64 - 1),
    "ntensors-max": lambda d: put(d, "ntensors", 9),
    "ntensors-plus1": lambda d: put(d, "ntensors", get(d, "ntensors") + 1),
    "text_len": lambda d: put(d, "text_len", MAX_TEXT),
    "truncated": lambda d: d[:40],
    "desc-offset-unaligned": desc_rule("offset", lambda v: v + 3),
    "desc-offset-outside": desc_rule("offset", 2**60),
    "desc-nbytes": desc_rule("nbytes", lambda v: v + 4),
    "desc-dtype": desc_rule("dtype", 99),
    "desc-ndim": desc_rule("ndim", 7),
    "desc-shape": desc_rule("shape0", 2**40 + 1),
    "text-deep-json": lambda d: with_text(d, DEEP_JSON),
    "text-control": lambda d: with_text(d, CONTROL_TEXT * 100),
    "model-name-control": lambda d: with_text(d, json.dumps({**json.loads(text_of(d)), "model": CONTROL_TEXT})),
    "config-huge-int": lambda d: with_text(d, edit_config(text_of(d), "hidden_size", "1" + "0" * 400)),
    "digest-other": lambda d: with_text(d, other_digest(text_of(d))),
    "config-nan": lambda d: with_text(d, edit_config(text_of(d), "rms_norm_eps", "NaN")),
    "config-inf": lambda d: with_text(d, edit_config(text_of(d), "rope_theta", "1e999")),
    "config-wrong-type": lambda d: with_text(d, edit_config(text_of(d), "vocab_size", '"512"')),
    "config-deep": lambda d: with_text(d, edit_config(text_of(d), "rope_scaling", "[" * 5000 + "]" * 5000)),
    "error-control": lambda d: with_text(d, ("line\n" + CONTROL_TEXT) * 2000, error=True),
    "error-newlines": lambda d: with_text(d, "\n" * MAX_TEXT, error=True),
    "error-8mb": lambda d: with_text(d, b"\n" * (8 << 20), error=True),      # past MAXMSGSIZE
    "oversize": lambda d: d + b"\0" * (100 << 10),                           # past MAXMSGSIZE
}


# ---- msgpack replies

def mp_set(key, value):
    def rule(d):
        obj = msgpack.unpackb(d, raw=False)
        obj[key] = value
        return msgpack.packb(obj, use_bin_type=True)
    return rule


def mp_drop(key):
    def rule(d):
        obj = msgpack.unpackb(d, raw=False)
        obj.pop(key, None)
        return msgpack.packb(obj, use_bin_type=True)
    return rule


def mp_raw(key, raw: bytes):
    """Set obj[key] to an already-packed value (for nesting msgpack's packer refuses to build)."""
    def rule(d):
        obj = msgpack.unpackb(d, raw=False)
        obj.pop(key, None)
        body = msgpack.packb(obj, use_bin_type=True)
        assert body[0] & 0xF0 == 0x80, "expected a fixmap"
        return bytes([body[0] + 1]) + body[1:] + msgpack.packb(key) + raw
    return rule


def mp_tensor(key, value):
    def rule(d):
        obj = msgpack.unpackb(d, raw=False)
        if obj.get("tensors"):
            obj["tensors"][0][key] = value
        return msgpack.packb(obj, use_bin_type=True)
    return rule


def mp_text(edit):
    def rule(d):
        obj = msgpack.unpackb(d, raw=False)
        obj["text"] = edit(obj.get("text") or "{}")
        return msgpack.packb(obj, use_bin_type=True)
    return rule


DEEP_MSGPACK = b"\x91" * 1000 + b"\xc0"

MSGPACK_RULES = {
    "method": lambda d: mp_set("method", "Matmul" if msgpack.unpackb(d).get("method") == "LMHead" else "LMHead")(d),
    "method-type": mp_set("method", [1, 2]),
    "method-missing": mp_drop("method"),
    "seq": mp_set("seq", 2**64 - 1),
    "seq-type": mp_set("seq", "3"),
    "error-type": mp_set("error", {"a": [1]}),
    "error-deep": mp_raw("error", DEEP_MSGPACK),
    "error-control": mp_set("error", ("line\n" + CONTROL_TEXT) * 200_001 + "\n"),  # 200,001 lines, < limit
    "error-8mb": mp_set("error", "\n" * (8 << 20)),                                # past MAXMSGSIZE
    "work_ns": mp_set("work_ns", 2**64 - 1),
    "work_ns-nan": mp_set("work_ns", math.nan),
    "text-type": mp_set("text", 12),
    "text-deep": mp_raw("text", DEEP_MSGPACK),
    "tensors-type": mp_set("tensors", "none"),
    "tensors-many": mp_set("tensors", [{}] * 9),
    "tensor-dtype": mp_tensor("dtype", "complex64"),
    "tensor-shape": mp_tensor("shape", [2**63 - 1, 2]),
    "tensor-data": mp_tensor("data", b"\0" * 3),
    "tensor-extra-key": mp_tensor("extra", 1),
    "extra-key": mp_set("extra", [1, 2, 3]),
    "not-a-map": lambda d: msgpack.packb([1, 2, 3]),
    "garbage": lambda d: b"\xc1\xc1\xc1",
    "hello-deep-json": mp_text(lambda t: DEEP_JSON),
    "model-name-control": mp_text(lambda t: json.dumps({**json.loads(t), "model": CONTROL_TEXT})),
    "config-huge-int": mp_text(lambda t: edit_config(t, "hidden_size", "1" + "0" * 400)),
    "config-nan": mp_text(lambda t: edit_config(t, "rms_norm_eps", "NaN")),
    "digest-other": mp_text(other_digest),
    "oversize": lambda d: d + b"\0" * (2 << 20),                                   # past MAXMSGSIZE
}

# ---- the shm doorbell: the rings' header words (shmrt/wire/ring.py's layout, by offset)

OFF_BELL_SEQ, OFF_ASLEEP, OFF_BELL_SLOT, SLOT_BYTES = 192, 256, 1024, 3072
BELL_TRIGGER_SEQ = 6   # Hello 1, Attach 2, Init 3: the third RPC after Init
BELL_ACT_S = 10.0
WRONG_SEQ = 0x5EED << 48


def word(m: mmap.mmap, off: int) -> int:
    return struct.unpack_from("<Q", m, off)[0]


def set_word(m: mmap.mmap, off: int, value: int) -> None:
    struct.pack_into("<Q", m, off, value)


def forge(edit):
    """Ring a reply of the host's own for the pending call `seq`: the call's request record (from the
    request ring's slot) edited by `edit`; where `edit` gives an int, only that length word."""
    def rule(req: mmap.mmap, rsp: mmap.mmap, seq: int) -> None:
        n = word(req, OFF_BELL_SLOT)
        record = bytes(req[OFF_BELL_SLOT + 8:OFF_BELL_SLOT + 8 + min(n, SLOT_BYTES - 8)])
        if len(record) < HEADER_BYTES or get(record, "seq") != seq:
            return  # the client is rewriting its slot: next time
        out = edit(record)
        if isinstance(out, int):
            set_word(rsp, OFF_BELL_SLOT, out)
        else:
            set_word(rsp, OFF_BELL_SLOT, len(out))
            rsp[OFF_BELL_SLOT + 8:OFF_BELL_SLOT + 8 + len(out)] = out
        set_word(rsp, OFF_BELL_SEQ, seq)  # after the slot, as a producer posts
    return rule


# (request ring, response ring, seq of the call waiting for its reply) -> None
BELL_RULES = {
    "bell-seq": lambda req, rsp, seq: set_word(rsp, OFF_BELL_SEQ, WRONG_SEQ),
    "bell-length": forge(lambda record: 1 << 20),
    "bell-magic": forge(lambda record: put(record, "magic", b"XXXX")),
    "bell-token": forge(lambda record: put(record, "token", bytes(16))),
    "asleep-1": lambda req, rsp, seq: set_word(req, OFF_ASLEEP, 1),   # the client sends a Wake with every call
}

# Resource rules act on the host's own resources instead of editing the reply.
RESOURCE_RULES = ("truncate-req", "truncate-rsp", "grow-req", "grow-rsp", "replace-req", "replace-rsp",
                  "close", "stall")


# ---- the proxy

class Hostile:
    def __init__(self, rule: str, info_path: str):
        self.field, self.when = rule.split("@")
        self.info_path = info_path
        self.info = {"rings": [], "fired": False}
        self.replies = 0
        self.rpc_replies = None      # counting from the Init reply
        self.decode_replies = None   # counting from the first LMHead reply
        self.maps: list[mmap.mmap] | None = None  # the rings' header pages (bell rules)
        self.closed = False          # the client sent Close

    def save(self) -> None:
        tmp = self.info_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.info, f)
        os.replace(tmp, self.info_path)

    def on_request(self, payload: bytes) -> None:
        if payload[:4] == b"SHMD" and len(payload) >= HEADER_BYTES and get(payload, "method") == ATTACH:
            try:
                names = json.loads(text_of(payload))
                self.info["rings"] = [names["req"], names["rsp"]]
                self.save()
            except (ValueError, KeyError):
                pass
        if payload[:4] == b"SHMD" and len(payload) >= HEADER_BYTES and get(payload, "method") == CLOSE:
            self.closed = True
        if payload[:4] == b"SHMD" and len(payload) >= HEADER_BYTES and get(payload, "method") == WAKE:
            self.info["wakes"] = self.info.get("wakes", 0) + 1
            self.save()

    # ---- the shm doorbell rules: the host writes ring header words while the calls go on

    def bell_rule_busy(self) -> bool:
        """True while a bell rule acts or waits for its trigger (the proxy then loops without blocking)."""
        return self.field in BELL_RULES and not self.closed and bool(self.info["rings"]) and \
            (not self.info["fired"] or time.time() - self.info["fired_at"] < BELL_ACT_S)

    def bell_tick(self, burst_s: float = 0.002) -> None:
        """Map the rings once their names are known; from the trigger on, run the rule for `burst_s` (on
        each pass where a call waits for its reply)."""
        if self.maps is None:
            try:
                self.maps = [self._map(name) for name in self.info["rings"]]
            except OSError:
                self.closed = True  # gone already
                return
        req, rsp = self.maps
        end = time.monotonic() + burst_s
        while time.monotonic() < end:
            seq = word(req, OFF_BELL_SEQ)
            if not self.info["fired"]:
                if seq < BELL_TRIGGER_SEQ:
                    time.sleep(200e-6)
                    continue
                self.info["fired"], self.info["fired_at"] = True, time.time()
                self.save()
            if word(rsp, OFF_BELL_SEQ) != seq:
                BELL_RULES[self.field](req, rsp, seq)
            time.sleep(50e-6)  # a call's round trip takes 100s of us: the host wins some of the races

    @staticmethod
    def _map(name: str) -> mmap.mmap:
        fd = os.open("/dev/shm" + name, os.O_RDWR)
        try:
            return mmap.mmap(fd, 4096, mmap.MAP_SHARED)  # the header page only
        finally:
            os.close(fd)

    def _method(self, payload: bytes):
        if payload[:4] == b"SHMD":
            return get(payload, "method") if len(payload) >= HEADER_BYTES else None
        try:
            return {"Init": INIT, "LMHead": LMHEAD}.get(msgpack.unpackb(payload, raw=False).get("method"))
        except Exception:
            return None

    def due(self, payload: bytes) -> bool:
        """Count this reply; True if it is the one the rule targets (once)."""
        self.replies += 1
        method = self._method(payload)
        if self.rpc_replies is not None:
            self.rpc_replies += 1
        if self.decode_replies is not None:
            self.decode_replies += 1
        if method == INIT and self.rpc_replies is None:
            self.rpc_replies = 0
        if method == LMHEAD and self.decode_replies is None:
            self.decode_replies = 0
        if self.info["fired"]:
            return False
        return {"hello": self.replies == 1, "init": method == INIT and self.rpc_replies == 0,
                "rpc": self.rpc_replies == 3, "decode": self.decode_replies == 3, "bell": False}[self.when]

    def act(self, payload: bytes):
        """The reply to forward (None: forward nothing); 'close' to shut the front socket."""
        self.info["fired"] = True
        self.info["fired_at"] = time.time()
        self.save()
        field = self.field
        if field in RESOURCE_RULES:
            if field in ("close", "stall"):
                return field if field == "close" else None
            action, which = field.split("-")
            path = "/dev/shm" + self.info["rings"]["req rsp".split().index(which)]
            if action == "truncate":
                os.truncate(path, 0)
            elif action == "grow":
                os.truncate(path, os.stat(path).st_size + (1 << 20))
            else:  # replace: a new, empty file under the same name
                os.unlink(path)
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            return payload
        rules = SHM_RULES if payload[:4] == b"SHMD" else MSGPACK_RULES
        return rules[field](payload)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--front", required=True)
    p.add_argument("--back", required=True)
    p.add_argument("--rule", required=True)
    p.add_argument("--info", required=True)
    args = p.parse_args(argv)
    hostile = Hostile(args.rule, args.info)
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    front.setsockopt(zmq.LINGER, 0)
    front.setsockopt(zmq.ROUTER_HANDOVER, 1)
    front.bind(args.front)
    backs: dict[bytes, zmq.Socket] = {}
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    hostile.save()  # ready
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    while not stop:
        busy = hostile.bell_rule_busy()
        for sock, _ in poller.poll(0 if busy else 100):
            if sock is front:
                identity, payload = front.recv_multipart()
                if identity not in backs:
                    # One DEALER per client, named by the daemon: copying the client's routing id
                    # would let two proxies' clients collide on the daemon's ROUTER (ids a ROUTER
                    # generates are short and, across processes, not unique).
                    back = ctx.socket(zmq.DEALER)
                    back.setsockopt(zmq.LINGER, 0)
                    back.connect(args.back)
                    backs[identity] = back
                    poller.register(back, zmq.POLLIN)
                hostile.on_request(payload)
                backs[identity].send(payload)
            else:
                identity = next(i for i, b in backs.items() if b is sock)
                payload = sock.recv()
                if hostile.due(payload):
                    payload = hostile.act(payload)
                    if payload == "close":
                        front.close(linger=0)  # the host's end of the socket goes away mid-call
                        while not stop:
                            time.sleep(0.05)
                        return 0
                if payload is not None:
                    front.send_multipart([identity, payload])
        if busy:
            hostile.bell_tick()
    for sock in [front, *backs.values()]:
        sock.close(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
