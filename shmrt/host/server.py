"""The daemon's serving loop: one ROUTER socket, one session per client, either transport.

A client's first message must be Hello; the transport registry says which transport its bytes are
in, and that transport decodes it (or encodes the refusal). The loop never parses bytes itself.
The session then lives until Close, a protocol
violation (the client gets an Error reply and the session is dropped), idleness past
`session_timeout`, or - where the client's pid is visible to us - the client process dying.

What the loop serves is up to a handler (handler.py): `EchoHandler` (tests, micro bench) or the model
(daemon.py). Handlers see `Request`s and fill `ReplyBuilder`s; they never touch sockets.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass

import zmq

from ..wire import registry
from ..errors import ProtocolError, ShmrtError
from ..wire.native import now_ns
from ..wire.peer import pid_namespace, process_alive
from ..wire.transport import Request, ServerSession, check_endpoint
from .handler import EchoHandler, Handler, HandlerSession  # noqa: F401 (EchoHandler: tests and bench import it here)


NO_SESSION = ("no open session for this client (it ended after an error or was idle past the daemon's "
              "--session-timeout): start a new session")


@dataclass
class Session:
    identity: bytes
    transport: ServerSession
    pid: int | None
    last_seen: float
    model: HandlerSession  # the handler's state for this client


class Server:
    def __init__(self, endpoint: str, handler: Handler, *, session_timeout: float = 120.0,
                 allow_remote: bool = False, log=None):
        self.endpoint = check_endpoint(endpoint, bind=True, allow_remote=allow_remote)
        self.handler = handler
        self.session_timeout = session_timeout
        self.sessions: dict[bytes, Session] = {}
        self.log = log or (lambda msg: print(f"shmrt daemon: {msg}", file=sys.stderr, flush=True))
        self._pidns = pid_namespace()
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise ShmrtError(f"cannot listen on {endpoint}: {exc} (another daemon there? pick --endpoint)") from None
        if endpoint.startswith("ipc://"):
            os.chmod(endpoint[len("ipc://"):], 0o600)
        self.stopping = False

    # ---- lifetime

    def close(self) -> None:
        for identity in list(self.sessions):
            self._drop(identity, "daemon shutting down")
        self._sock.close(linger=0)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def serve(self, *, until=None, poll_ms: int = 200) -> None:
        """Serve until `stopping` is set (signal handler) or `until()` returns True."""
        next_reap = time.monotonic() + 1.0
        while not self.stopping and not (until and until()):
            if self._sock.poll(poll_ms, zmq.POLLIN):
                frames = self._sock.recv_multipart(copy=True)
                if len(frames) == 2:
                    self._on_message(frames[0], frames[1])
            if time.monotonic() >= next_reap:
                self.reap()
                next_reap = time.monotonic() + 1.0

    # ---- messages

    def _on_message(self, identity: bytes, payload: bytes) -> None:
        session = self.sessions.get(identity)
        if session is None:
            reply = self._open(identity, payload)
        else:
            session.last_seen = time.monotonic()
            reply = self._serve(session, payload)
        if reply is not None:
            self._sock.send_multipart([identity, reply])

    def _open(self, identity: bytes, payload: bytes) -> bytes | None:
        codec = registry.sniff(payload)
        try:
            hello = codec.decode_hello(payload)
            if hello is None:
                raise ProtocolError(NO_SESSION)
            transport = codec.Session(hello.token)
            model = self.handler.open(hello.client_info, transport.pinned_buffers)
        except ShmrtError as exc:
            self.log(f"refused a new client: {exc}")
            return codec.encode_refusal(f"session refused: {exc}")
        info = hello.client_info
        pid = info.get("pid") if info.get("pidns") == self._pidns else None
        session = Session(identity, transport, pid if type(pid) is int else None, time.monotonic(), model)
        self.sessions[identity] = session
        return transport.encode_reply(Request("Hello", 1), None, text=json.dumps(self.handler.hello()))

    def _serve(self, session: Session, payload: bytes) -> bytes | None:
        transport = session.transport
        seq = transport.expect_seq
        request = None
        try:
            request = transport.decode(payload)
            if request.method == "Close":
                self._drop(session.identity, "client closed the session")
                return None
            if request.control:  # the transport acted on it already; the handler never sees it
                return transport.encode_reply(request, None)
            builder = transport.reply_builder()
            t0 = now_ns()
            text = self.handler.handle(request, builder, session.model)
            work_ns = now_ns() - t0
            request.release()
            return transport.encode_reply(request, builder, work_ns=work_ns, text=text or "")
        except ShmrtError as exc:
            message = str(exc)
        except Exception as exc:  # a bug or a hostile input we did not foresee: never crash the daemon
            traceback.print_exc(file=sys.stderr)
            message = f"internal error in {getattr(request, 'method', '?')}: {type(exc).__name__}: {exc}"
        reply = transport.encode_error(request.seq if request else seq, message)
        self._drop(session.identity, message)
        return reply

    # ---- sessions

    def _drop(self, identity: bytes, why: str) -> None:
        session = self.sessions.pop(identity, None)
        if session is None:
            return
        self.log(f"session {identity.hex()[:8]} ({session.transport.transport}) closed: {why}")
        session.model.close()
        if session.pid is not None and not process_alive(session.pid):
            session.transport.peer_died()
        session.transport.close()

    def reap(self) -> None:
        now = time.monotonic()
        for identity, session in list(self.sessions.items()):
            if session.pid is not None and not process_alive(session.pid):
                self._drop(identity, f"client process {session.pid} is gone")
            elif now - session.last_seen > self.session_timeout:
                self._drop(identity, f"idle for more than {self.session_timeout:.0f} s")
