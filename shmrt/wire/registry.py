"""Which transports exist, and the one place that picks one: by name (client) or by a message's bytes (daemon).

pyzmq's `select_backend` pattern: `PUBLIC_API` lists what every transport module must provide, `select()`
imports a module by name and checks it provides all of it; the layers above never learn which one they
got. Adding a transport is one new module and one line in `MODULES`.

What a transport module provides:
  NAME            its name on the CLI and in logs
  sniff(payload)  -> bool: is this first message of a new client in my format? Pure, never raises.
  decode_hello(payload) -> Hello | None: the session opener (None: my format, but not a Hello);
                  a malformed message raises ProtocolError naming the field
  encode_refusal(message) -> bytes: an Error reply a client of mine can read, for a client with no session
  Client          ClientTransport subclass: hello, open_session, request/call, close; DOORBELLS names how
                  it can signal calls (zmq; shm also rings through its rings' headers)
  Session         ServerSession subclass, `Session(token)` after a Hello: decode requests, encode
                  replies/errors, pinned_buffers(), peer_died(), close()
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import SetupError

PUBLIC_API = ("NAME", "sniff", "decode_hello", "encode_refusal", "Client", "Session")

# name -> module; sniffed in this order. One line per transport.
MODULES = {
    "shm": "shmrt.wire.shm_transport",
    "msgpack": "shmrt.wire.msgpack_transport",
}
TRANSPORTS = tuple(MODULES)

# Bytes no transport claims are answered in the baseline's format: a refusal any client can read.
FALLBACK = "msgpack"


def select(name: str) -> ModuleType:
    """The transport module called `name`, checked to provide every name in PUBLIC_API."""
    if name not in MODULES:
        raise SetupError(f"unknown transport {name!r}; expected one of {tuple(MODULES)}")
    module = importlib.import_module(MODULES[name])
    missing = [attr for attr in PUBLIC_API if not hasattr(module, attr)]
    assert not missing, f"transport module {module.__name__} lacks {missing}"
    return module


def client_transport(name: str, endpoint: str, *, timeout: float, enclave: bool = False,
                     max_reply_bytes: int | None = None, doorbell: str | None = None):
    """A client of transport `name` connected to `endpoint` (no session yet: call hello()).
    `max_reply_bytes`: the most tensor bytes one reply may carry where replies carry tensors (msgpack);
    None: control messages only until `open_session()` sets it from the ring size. `doorbell`: how calls
    are signalled (one of the Client's DOORBELLS; None: its default)."""
    return select(name).Client(endpoint, timeout=timeout, enclave=enclave, max_reply_bytes=max_reply_bytes,
                               doorbell=doorbell)


def sniff(payload: bytes) -> ModuleType:
    """The transport a new client's first message is in (FALLBACK when none claims it)."""
    for name in MODULES:
        module = select(name)
        if module.sniff(payload):
            return module
    return select(FALLBACK)
