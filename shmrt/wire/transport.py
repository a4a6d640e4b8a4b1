"""The transport interface both sides share, the per-call timings, and the ZeroMQ plumbing.

Transports sit side by side behind it, chosen by name in registry.py: `msgpack` (the v2.4 baseline:
tensor bytes inside a msgpack message) and `shm` (tensors in shared-memory rings, a doorbell on ZeroMQ).
A call carries a method name, a few integer arguments and a list of tensors each way.

Client side: `ClientTransport.request()` opens the inputs of the next call (buffers the caller fills
in place: views on the request ring for shm, zero copy) and `call()` sends them and returns a
`Reply` whose tensors are valid until it is released; scopes.py enforces both lifetimes.

Server side: `ServerSession` decodes requests into `Request`s (tensors as views where possible)
and encodes replies whose tensors were written into buffers from `ReplyBuilder.alloc()`.
"""
from __future__ import annotations

import ipaddress
import re
import secrets
import struct
import time
from dataclasses import dataclass, field

import torch
import zmq

from ..errors import PeerError, PeerTimeout, SetupError
from .scopes import PendingRequest, Reply, refuse_unstaged
from .stats import CallStats
from .untrusted import load_json


CONNECTION_SLICE_S = 0.1   # a call waiting on its socket looks at the connection this often (ZeroMQ's monitor)
SERVED = object()   # what a session's take_bell returns for a request the daemon's planned lane served whole


# ---- endpoints

_TCP_RE = re.compile(r"^tcp://(?P<host>[^:/\s]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


def check_endpoint(endpoint: str, *, enclave: bool = False, bind: bool = False,
                   allow_remote: bool = False) -> str:
    """Validate an endpoint; in an enclave only tcp:// can reach the host daemon."""
    if endpoint.startswith("ipc://"):
        if enclave:
            raise SetupError(
                f"endpoint {endpoint}: an SGX enclave cannot reach a host Unix-domain socket; "
                "use a tcp://127.0.0.1:PORT endpoint for both daemon and client")
        if len(endpoint) <= len("ipc://"):
            raise SetupError(f"endpoint {endpoint!r} names no socket path")
        return endpoint
    m = _TCP_RE.match(endpoint)
    if not m:
        raise SetupError(f"endpoint {endpoint!r} is not ipc://PATH or tcp://HOST:PORT")
    if not 0 < int(m["port"]) < 65536:
        raise SetupError(f"endpoint {endpoint!r}: port must be 1-65535")
    host = m["host"]
    if re.fullmatch(r"[0-9.]+|\[.*\]", host):   # an address, not a name: a valid one (999.1.1.1 is not)
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise SetupError(f"endpoint {endpoint!r}: {host} is not an IP address") from None
    if bind and not allow_remote and m["host"] not in ("127.0.0.1", "localhost", "[::1]"):
        raise SetupError(f"endpoint {endpoint}: the daemon binds loopback only unless started as "
                         "`shmrt daemon --allow-remote`")
    return endpoint


def endpoint_kind(endpoint: str) -> str:
    return "IPC" if endpoint.startswith("ipc://") else "TCP"


# ---- client side

class Caller:
    """What a model's ops call through: `request()` opens the next call's inputs (buffers the caller fills in
    place), `call()` makes the call and returns its `Reply`. A transport (below), or the daemon's handler driven
    in-process (host/inprocess.py: the bench's floor)."""

    name = "?"

    def __init__(self):
        self.observers: list = []  # called with each RPC's CallStats
        self._pending: PendingRequest | None = None

    def request(self, dtype: torch.dtype = torch.float32) -> PendingRequest:
        """Open the inputs of the next call; the next `call()` sends and seals them."""
        assert self._pending is None or self._pending.sealed, "a request is already being built"
        self._pending = PendingRequest(self._alloc_input, self._in_request_memory, dtype)
        return self._pending

    def _alloc_input(self, shape: tuple, dtype: torch.dtype):
        """A buffer for one input of the next call -> (tensor, the record `call` recognises it by)."""
        return torch.empty(shape, dtype=dtype), None

    def _in_request_memory(self, t: torch.Tensor) -> bool:
        return False

    def _claim_inputs(self, method: str, tensors) -> list:
        """Each input's staged record (or None: memory of the caller's, copied in); seals the request."""
        pending, self._pending = self._pending, None
        if pending is None:   # no request opened: nothing was staged (no object a call to say so)
            for t in tensors:
                refuse_unstaged(t, method, self._in_request_memory)
            return [None] * len(tensors)
        try:
            return [pending.claim(t, method) for t in tensors]
        finally:
            pending.seal()

    def call(self, method: str, tensors=(), *, layer: int = -1, op: int = 0, pos: int = 0,
             wire_dtype: torch.dtype | None = None) -> Reply:
        """One RPC. Floating tensors are converted to `wire_dtype` on their way in (timed as Serialize)."""
        raise NotImplementedError

    def _notify(self, stats: CallStats) -> None:
        for observer in self.observers:
            observer(stats)


class ClientTransport(Caller):
    """A DEALER socket to the daemon plus the request/response encoding of one transport."""

    DOORBELLS = ("zmq",)  # how this transport can signal a call; the first is its default

    def __init__(self, endpoint: str, *, timeout: float, enclave: bool = False, max_reply_bytes: int | None = None,
                 doorbell: str | None = None):
        super().__init__()
        if doorbell is not None and doorbell not in self.DOORBELLS:
            raise SetupError(f"--doorbell {doorbell}: the {self.name} transport rings over "
                             f"{' or '.join(self.DOORBELLS)} (the shm doorbell needs --transport shm)")
        self.doorbell = doorbell or self.DOORBELLS[0]
        self.endpoint = check_endpoint(endpoint, enclave=enclave)
        self.timeout = timeout
        self.enclave = enclave
        self.token = secrets.token_bytes(16)
        self.seq = 0
        self._ctx = zmq.Context.instance()
        # Our own routing id (a leading zero byte is reserved by ZeroMQ): a socket re-opened with a new
        # message-size limit (limit_replies) keeps its session on the daemon's ROUTER (ROUTER_HANDOVER).
        self._routing_id = b"\x01" + secrets.token_bytes(15)
        self.max_message = self.message_limit(max_reply_bytes)
        self._monitor = None
        self._disconnected = False   # the daemon closed our connection once: its session is gone with it
        self._sock = self._open_socket()
        self._closed = False
        self.ring_bytes = 0  # shared memory this session holds (for the log), set by open_session()

    @property
    def label(self) -> str:
        """Line 1 of the v2.4 log: IPC/TCP (as v2.4) unless a transport says more."""
        return endpoint_kind(self.endpoint)

    # ---- the bound on what the host can make us receive

    def message_limit(self, max_reply_bytes: int | None) -> int:
        """The largest message this transport can legitimately receive (ZMQ_MAXMSGSIZE)."""
        raise NotImplementedError

    def _open_socket(self):
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.ROUTING_ID, self._routing_id)
        # Enforced by ZeroMQ while receiving: a larger message is never buffered, the connection is
        # dropped instead, and the call ends in PeerTimeout after --timeout (not a 100 MiB allocation).
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        # The connection's end, as ZeroMQ sees it: a daemon that stops or dies closes it, and whatever Error it queued
        # for us goes with it; a call waiting for its answer hears of that at once instead of waiting out --timeout
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitored = sock
        sock.connect(self.endpoint)
        return sock

    def _close_socket(self, linger: int) -> None:
        if not self._monitored.closed:
            self._monitored.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=linger)

    def limit_replies(self, max_reply_bytes: int) -> None:
        """Tighten or widen the message-size bound once the largest reply is known (the model's size).
        ZeroMQ applies MAXMSGSIZE per connection, so the socket is re-opened (same routing id); call
        only between calls, with no reply outstanding."""
        limit = self.message_limit(max_reply_bytes)
        if limit != self.max_message and not self._closed:
            self.max_message = limit
            self._close_socket(linger=0)
            self._sock = self._open_socket()

    # Subclasses implement these (and `call`).
    def hello(self, client_info: dict) -> dict:
        raise NotImplementedError

    def open_session(self, ring_bytes: int) -> None:
        """Allocate per-session resources (rings) once the model config is known; nothing by default."""

    # Shared plumbing.
    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _send(self, payload) -> None:
        """Send a message (bytes, or a buffer of them). ZeroMQ's monitor is looked at only where the send would wait:
        a connection that closed refuses it (ZMQ_IMMEDIATE), and a wait looks at the monitor."""
        if self._disconnected:
            self._raise_if_disconnected()
        try:
            self._sock.send(payload, flags=zmq.NOBLOCK)
        except zmq.Again:   # no connection (ZMQ_IMMEDIATE): wait for one, or hear that ours closed
            if not self._wait(zmq.POLLOUT):
                raise PeerTimeout(f"no daemon is accepting connections at {self.endpoint} "
                                  f"(waited {self.timeout:.0f} s): start `shmrt daemon` there or pass --endpoint") from None
            self._sock.send(payload)

    def _recv(self) -> bytes:
        if not self._wait(zmq.POLLIN):
            raise self._no_answer()
        return self._sock.recv(copy=True)

    def _wait(self, event: int) -> bool:
        """Wait up to --timeout for the socket to be ready for `event` (False: it was not), looking at the
        connection every CONNECTION_SLICE_S (PeerError once it closed). (The socket first: a reply that is there
        costs no look at the monitor, ~3 us.)"""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._raise_if_disconnected()
                return False
            if self._sock.poll(max(1, int(min(left, CONNECTION_SLICE_S) * 1000)), event):
                return True
            self._raise_if_disconnected()

    def _raise_if_disconnected(self) -> None:
        """PeerError if the daemon closed our connection, now or before (its events: ZeroMQ's monitor frames, event
        number u16 and value u32, then the endpoint). ZeroMQ reconnects by itself, but to no session of ours."""
        while not self._disconnected and not self._monitor.closed and self._monitor.poll(0, zmq.POLLIN):
            frames = self._monitor.recv_multipart(copy=True)
            self._disconnected = len(frames[0]) >= 6 and struct.unpack_from("=H", frames[0])[0] == zmq.EVENT_DISCONNECTED
        if self._disconnected:
            raise PeerError(f"the connection to the daemon at {self.endpoint} closed (the daemon stopped or was killed, "
                            "or sent a message past this client's size limit): start the daemon again, then the client")

    def _no_answer(self) -> PeerTimeout:
        return PeerTimeout(f"the daemon at {self.endpoint} did not answer within {self.timeout:.0f} s "
                           "(is it running? pass --timeout to wait longer)")

    @property
    def _idle_observers(self) -> bool:
        """Whether an observer has an `idle()` for `_while_waiting` to call."""
        return any(getattr(observer, "idle", None) is not None for observer in self.observers)

    def _while_waiting(self) -> None:
        """A call's bell is rung: observers with an `idle()` (the perf log formats its rows there) do their
        bookkeeping now, while the daemon works, instead of between calls."""
        for observer in self.observers:
            idle = getattr(observer, "idle", None)
            if idle is not None:
                idle()

    def _close_message(self) -> bytes | None:
        """The transport's Close request, or None if no session was opened."""
        return None

    def close(self) -> None:
        """Tell the daemon to drop the session now (best effort, not waiting for an answer), then close."""
        if self._closed:
            return
        self._closed = True
        message = self._close_message()
        if message is not None:
            try:
                self._sock.send(message, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._close_socket(linger=100 if message is not None else 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- server side

@dataclass(frozen=True)
class Hello:
    """A new client's first message, decoded by its transport: the session token and what it says of itself."""

    token: bytes
    client_info: dict


def parse_client_info(text) -> dict:
    """Hello's text: a JSON object (client_info()); empty or not an object means nothing is known."""
    if not isinstance(text, str) or not text:
        return {}
    info = load_json(text, "Hello text")   # depth- and size-limited: a peer's bytes
    return info if isinstance(info, dict) else {}


@dataclass
class Request:
    """A decoded request. `tensors` may be views on shared memory, valid until `release()`: copy
    before validating contents, and keep nothing past it (the handler's `keep()` makes owned copies)."""

    method: str
    seq: int
    layer: int = -1
    op: int = 0
    pos: int = 0
    tensors: list = field(default_factory=list)
    text: str = ""
    on_release: object = None  # callable: hands the request's ring space back to the client
    control: bool = False  # session control the transport acted on itself (shm's Attach): no handler
    answer: bool = True    # False: nothing goes back (shm's Wake)
    rung: bool = False     # it came through a shared-memory doorbell, checked in C: its reply goes back that way
    # shm: its tensors' places in the request ring as its record named them (checked): with method, layer and op,
    # what a repeated decode call is recognised by (host/graphs.py's plans); None where there is no ring
    descs: tuple | None = None

    def release(self) -> None:
        """The server is done with the request's memory; its views are gone from here on."""
        self.tensors = []
        on_release, self.on_release = self.on_release, None
        if on_release is not None:
            on_release()


class ReplyBuilder:
    """Buffers for a reply's tensors; `alloc` returns a tensor the server writes the result into.
    `capacity` is the most bytes one reply may carry: the handler checks results against it before
    computing them."""

    capacity: int = 0

    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def alloc_joined(self, shapes, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Buffers for several results, in order, and one flat tensor over all of them where they lie back to
        back (else None): results that are one tensor end to end (a fused projection's) then take one copy."""
        return [self.alloc(shape, dtype) for shape in shapes], None


class ServerSession:
    """One client's session as the daemon sees it (one per transport kind), opened by a Hello."""

    transport = "?"

    def __init__(self, token: bytes):
        self.token = token
        self.expect_seq = 2  # Hello was seq 1

    def decode(self, payload: bytes) -> Request:
        raise NotImplementedError

    def accept_client(self, client_info: dict) -> None:
        """What the client's Hello said that bounds this session (msgpack: the largest reply it takes); a value
        that makes no sense is a ProtocolError (the session is refused)."""

    def reply_builder(self) -> ReplyBuilder:
        raise NotImplementedError

    def encode_reply(self, request: Request, builder: ReplyBuilder, *, work_ns: int = 0, text: str = ""):
        """The reply's bytes; for a request that came through `take_bell`, whatever `post_reply` takes."""
        raise NotImplementedError

    def encode_reply_ahead(self, request: Request, builder: ReplyBuilder, text: str = ""):
        """A transport whose reply names where its tensors lie (not their bytes) encodes it here, while a device
        may still be writing them; `finish_reply` completes it once the handler settled. None: this transport
        carries the bytes themselves, so `encode_reply` runs after."""
        return None

    def finish_reply(self, ahead, work_ns: int):
        """As `encode_reply` returns."""
        raise NotImplementedError

    def encode_error(self, seq: int, message: str) -> bytes:
        raise NotImplementedError

    def goodbye(self, message: str) -> bytes:
        """The session ends with the daemon: `message` as the Error its client's next (or current) call gets; the
        bytes to send over ZeroMQ (a transport whose client looks elsewhere too has told it there already)."""
        return self.encode_error(self.expect_seq, message)

    def pinned_buffers(self) -> list:
        """Mappings the compute device may register for DMA (cudaHostRegister): [] where there are none; the
        request side's first. Each has `address`, `nbytes` and `message_starts`: where the first tensor of a
        message that found its ring empty lies (a decode step's messages do, call after call: the daemon's CUDA
        graphs copy from and to there)."""
        return []

    def lane_parts(self):
        """What the daemon's planned calls (host/lane.py) need to serve this session's requests in C: None where they
        cannot (no rings)."""
        return None

    def serve_planned(self, payload: bytes) -> bytes | None:
        """A request that came over ZeroMQ, served whole by the daemon's planned lane: the reply to send, or None (the
        server decodes and serves it)."""
        return None

    # A transport whose doorbells can travel outside ZeroMQ (shm's ring headers) overrides these four.
    def bell_address(self) -> int | None:
        """The address of the word a new request's doorbell changes; None: requests come over ZeroMQ."""
        return None

    def take_bell(self) -> object | None:
        """The next request rung outside ZeroMQ, for `decode` (a private copy, or what the transport decoded of
        it already), or None."""
        return None

    def post_reply(self, payload) -> None:
        """Send the reply to a request that came through `take_bell` the same way (what `encode_reply`,
        `finish_reply` or `encode_error` made of it)."""
        raise NotImplementedError

    def sleep(self, asleep: bool) -> bool:
        """The server blocks on ZeroMQ (or stops): tell the client; True if a request bell is waiting."""
        return False

    def peer_died(self) -> None:
        """The client process is gone: remove what only it would have removed. close() follows."""

    def close(self) -> None:
        pass

