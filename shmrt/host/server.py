"""The daemon's serving loop: one ROUTER socket, one session per client, either transport.

A client's first message must be Hello; the transport registry says which transport its bytes are
in, and that transport decodes it (or encodes the refusal). The loop never parses bytes itself.
The session then lives until Close, a protocol
violation (the client gets an Error reply and the session is dropped), idleness past
`session_timeout`, or - where the client's pid is visible to us - the client process dying.

Requests come over ZeroMQ, or - sessions with the shared-memory doorbell (shm_transport, bell.py) -
through their request ring's header. While any such session is open the loop waits on all their bell
words at once (native.WordWaiter: spin, yield, then sleeps of growing length) and looks at the socket
between slices; after `DEEP_SLEEP_S` without a request it tells those clients it sleeps (their next
call sends a Wake over ZeroMQ) and blocks on the socket, so an idle daemon uses no CPU.

What the loop serves is up to a handler (handler.py): `EchoHandler` (tests, micro bench) or the model
(daemon.py). Handlers see `Request`s and fill `ReplyBuilder`s; they never touch sockets.
"""
from __future__ import annotations

import collections
import json
import os
import socket
import stat
import sys
import time
import traceback
from dataclasses import dataclass

import zmq

from .. import settings
from ..wire import registry
from ..errors import ProtocolError, ShmrtError
from ..wire.native import Backoff, WordWaiter, now_ns, precise_sleeps
from ..wire.peer import pid_namespace, process_alive
from ..wire.transport import SERVED, Request, ServerSession, check_endpoint
from .handler import EchoHandler, Handler, HandlerSession  # noqa: F401 (EchoHandler: tests and bench import it here)


_POLLIN = int(zmq.POLLIN)   # (an IntFlag's `&` costs ~1 us: a daemon asks per message)
DROPPED_KEPT = 64         # dropped clients remembered, so that their last messages are refused quietly
DEEP_SLEEP_S = 0.05        # no request for this long: block on the socket (clients send a Wake)
BELL_SLICE_NS = 1_000_000  # while waiting on bell words, look at the socket this often

STOPPED = "the daemon stopped (SIGTERM or Ctrl-C) and closed this session: start it again, then the client"
GOODBYE_LINGER_MS = 500   # how long closing waits for those last messages to leave
NO_SESSION = ("no open session for this client (it ended after an error or was idle past the daemon's "
              "--session-timeout): start a new session")


def check_ipc_free(path: str) -> None:
    """Refuse to listen at `path` where another process listens already, or where something else than a socket lies:
    ZeroMQ's bind replaces whatever is there, so a second daemon would take a live one's clients and, stopping,
    remove its socket (over tcp:// the kernel refuses a second listener). A socket file nobody listens on (a daemon
    that died) is left for the bind to replace."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ShmrtError(f"cannot listen on ipc://{path}: directory {directory} does not exist")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ShmrtError(f"cannot listen on ipc://{path}: a file that is not a socket is there (pick another --endpoint)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return   # nobody listens there: a stale socket file (or none any more)
    except OSError as exc:   # a full backlog (EAGAIN), no permission, a timeout: someone may listen
        raise ShmrtError(f"cannot listen on ipc://{path}: cannot tell whether another process listens there "
                         f"({exc.strerror or exc}): pick another --endpoint") from None
    finally:
        probe.close()
    raise ShmrtError(f"cannot listen on ipc://{path}: another process (a daemon?) is listening there: stop it or "
                     "pick another --endpoint")


def _failure(exc: Exception, where: str) -> str:
    """What a session is told, and dropped for, when serving it raised: a ShmrtError's own line (a bad request); anything
    else (a bug, or a hostile input not foreseen: the daemon goes on) named, its traceback on stderr."""
    if isinstance(exc, ShmrtError):
        return str(exc)
    traceback.print_exc(file=sys.stderr)
    return f"internal error in {where}: {type(exc).__name__}: {exc}"


@dataclass
class Session:
    identity: bytes
    transport: ServerSession
    pid: int | None
    last_seen: float
    model: HandlerSession  # the handler's state for this client


def check_can_listen(endpoint: str, allow_remote: bool = False) -> str:
    """Whatever would refuse a server at `endpoint`, asked before anything is set up (a daemon asks before it loads its
    model): the endpoint itself, a live listener at an ipc:// path, the settings the server reads. Returns it."""
    check_endpoint(endpoint, bind=True, allow_remote=allow_remote)
    if endpoint.startswith("ipc://"):
        check_ipc_free(endpoint[len("ipc://"):])
    settings.backoff_us()
    settings.max_reply_bytes()
    return endpoint


class Server:
    def __init__(self, endpoint: str, handler: Handler, *, session_timeout: float = 120.0,
                 allow_remote: bool = False, log=None, backoff: Backoff | None = None):
        self.endpoint = check_can_listen(endpoint, allow_remote)   # (first: nothing to undo when one refuses)
        self.handler = handler
        self.session_timeout = session_timeout
        self.sessions: dict[bytes, Session] = {}
        self.log = log or (lambda msg: print(f"shmrt daemon: {msg}", file=sys.stderr, flush=True))
        self.backoff = backoff or Backoff.configured()
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
        self._bells: tuple[list[Session], WordWaiter] | None = None  # the sessions whose bell words we wait on
        self._bells_stale = True  # a message or a drop may have changed which sessions ring through their rings
        self._socket_due = True   # the bell waiter saw the socket's descriptor readable: look at the socket
        self._socket_looked = 0   # when the loop last looked at the socket (ns)
        self._asleep = False  # the bell sessions were told we block on ZeroMQ (their asleep words are 1)
        # clients whose sessions we dropped lately (logged then): their next message (a Close, mostly) is refused
        # without a second line in the log
        self._dropped: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    # ---- lifetime

    def close(self) -> None:
        told = False
        for identity, session in list(self.sessions.items()):
            # Each client hears it (its next call, or the one it waits on, ends with this line) instead of waiting
            # out its --timeout for a daemon that is gone
            told |= self._send_quietly(identity, session.transport.goodbye(STOPPED))
            self._drop(identity, "daemon shutting down")
        self._sock.close(linger=GOODBYE_LINGER_MS if told else 0)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass

    def _send_quietly(self, identity: bytes, message: bytes) -> bool:
        """Queue `message` for one client without waiting: False where ZeroMQ would not take it now."""
        try:
            self._sock.send_multipart([identity, message], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def serve(self, *, until=None, poll_ms: int = 200) -> None:
        """Serve until `stopping` is set (signal handler) or `until()` returns True."""
        next_reap = time.monotonic() + 1.0
        last_request = now_ns()
        deep_sleep_ns = int(DEEP_SLEEP_S * 1e9)
        while not self.stopping and not (until and until()):
            bells = self._bell_sessions()
            served = 0
            if self._socket_due or not bells or now_ns() - self._socket_looked >= BELL_SLICE_NS:
                # With bell sessions the socket is looked at when the waiter saw its descriptor readable, and
                # at least once per slice: not between every two requests (a zmq poll costs ~5-10 us of a
                # ~100 us round trip), while a new client's Hello still waits at most a slice.
                self._socket_due, self._socket_looked = False, now_ns()
                served = self._poll_socket(0 if bells else poll_ms)
            if served:
                bells = self._bell_sessions()   # the socket's messages may have opened or closed sessions
            if bells:
                idle = now_ns() - last_request
                served += self._serve_bells(*bells, idle)
                if not served and idle > deep_sleep_ns:
                    served = self._sleep_on_socket(bells[0], poll_ms)   # 0: slept the whole poll, sleep on
                if served and self._asleep:
                    self._wake_up()
            if served:
                last_request = now_ns()
            if time.monotonic() >= next_reap:
                self.reap()
                next_reap = time.monotonic() + 1.0

    # ---- messages over ZeroMQ

    def _poll_socket(self, timeout_ms: int) -> int:
        """Serve every message waiting on the socket (waiting up to `timeout_ms` for the first). (Whether another one
        waits is asked of ZMQ_EVENTS, ~2 us, not of a receive that fails: its exception costs several.)"""
        served = 0
        sock = self._sock
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return 0
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return served
            if len(frames) == 2:
                self._on_message(frames[0], frames[1])
                served += 1
            if not sock.getsockopt(zmq.EVENTS) & _POLLIN:
                return served

    def _on_message(self, identity: bytes, payload: bytes) -> None:
        session = self.sessions.get(identity)
        if session is None:
            self._bells_stale = True   # a Hello, an Attach or a Close changes the bell sessions
            reply = self._open(identity, payload)
        else:
            session.last_seen = time.monotonic()
            reply, dropped = self._serve_planned(session, payload)   # (a model RPC: the bell sessions stay as they are)
            if reply is None and dropped is None:
                self._bells_stale = True
                reply, dropped = self._serve(session, payload)
            if dropped:
                self._drop(session.identity, dropped)
        if reply is not None:
            self._sock.send(identity, zmq.SNDMORE)
            self._sock.send(reply)

    # ---- requests rung in shared memory

    def _bell_sessions(self) -> tuple[list[Session], WordWaiter] | None:
        """The sessions that ring through their rings and one waiter on all their bell words (kept while
        the set of sessions stays the same); None when there is none."""
        if not self._bells_stale:
            return self._bells
        self._bells_stale = False
        sessions = [s for s in self.sessions.values() if s.transport.bell_address() is not None]
        if not sessions:
            self._bells = None
            return None
        if self._bells is None or self._bells[0] != sessions:
            precise_sleeps()
            self._bells = (sessions, WordWaiter([s.transport.bell_address() for s in sessions], self.backoff,
                                                self._sock.getsockopt(zmq.FD)))
        return self._bells

    def _serve_bells(self, sessions: list[Session], waiter: WordWaiter, idle_ns: int) -> int:
        """Wait up to one slice for a request bell, then serve every session that has one."""
        for i, s in enumerate(sessions):
            waiter.seen[i] = s.transport.bell_in.seen
        rung = waiter.wait(idle_ns, BELL_SLICE_NS)
        if rung < 0:
            self._socket_due |= rung == WordWaiter.SOCKET   # the loop serves the socket's message next
            return 0   # nothing rung
        served = 0
        for session in sessions:
            if self.sessions.get(session.identity) is not session:
                continue  # dropped while serving an earlier one
            try:
                payload = session.transport.take_bell()
            except Exception as exc:  # noqa: BLE001 - a scribbled bell word or slot, or a planned call's run failed
                dropped = _failure(exc, "a planned call")
                payload, reply = None, session.transport.encode_error(session.transport.expect_seq, dropped)
            else:
                if payload is None:
                    continue
                if payload is SERVED:   # a planned call, served and answered in C (host/lane.py)
                    session.last_seen = time.monotonic()
                    served += 1
                    continue
                reply, dropped = self._serve(session, payload)
            session.last_seen = time.monotonic()
            if reply is not None:
                session.transport.post_reply(reply)
            if dropped:
                self._drop(session.identity, dropped)
            served += 1
        return served

    def _sleep_on_socket(self, sessions: list[Session], poll_ms: int) -> int:
        """Idle: tell each bell session we sleep, then block on the socket (unless a bell came in between: the
        store-fence-load handshake of bell.py). Returns how many messages or bells woke us; 0: the poll ran
        out, and the loop comes straight back here, still asleep, without spinning first."""
        self._asleep = True
        pending = False
        for s in sessions:
            pending |= s.transport.sleep(True)
        return 1 if pending else self._poll_socket(poll_ms)

    def _wake_up(self) -> None:
        """Back to waiting on the bell words: clients need not send Wakes any more."""
        self._asleep = False
        for s in self.sessions.values():
            s.transport.sleep(False)

    def _open(self, identity: bytes, payload: bytes) -> bytes | None:
        codec = registry.sniff(payload)
        try:
            hello = codec.decode_hello(payload)
            if hello is None:
                if identity in self._dropped:   # its session's end is in the log already
                    return codec.encode_refusal(f"session refused: {NO_SESSION}")
                raise ProtocolError(NO_SESSION)
            transport = codec.Session(hello.token)
            transport.accept_client(hello.client_info)
            model = self.handler.open(hello.client_info, transport.pinned_buffers, transport.lane_parts)
        except ShmrtError as exc:
            self.log(f"refused a new client: {exc}")
            return codec.encode_refusal(f"session refused: {exc}")
        self._dropped.pop(identity, None)
        info = hello.client_info
        pid = info.get("pid") if info.get("pidns") == self._pidns else None
        session = Session(identity, transport, pid if type(pid) is int else None, time.monotonic(), model)
        self.sessions[identity] = session
        return transport.encode_reply(Request("Hello", 1), None, text=json.dumps(self.handler.hello()))

    def _serve_planned(self, session: Session, payload: bytes) -> tuple[bytes | None, str | None]:
        """A request that came over ZeroMQ, where the planned lane serves it whole (the transport's `serve_planned`):
        (its reply, None); (None, None) where it does not; a failed run as `_serve` answers a failed call."""
        transport = session.transport
        try:
            return transport.serve_planned(payload), None
        except Exception as exc:  # noqa: BLE001 - a planned call's run failed: as _serve answers one
            message = _failure(exc, "a planned call")
        return transport.encode_error(transport.expect_seq, message), message

    def _serve(self, session: Session, payload) -> tuple[object | None, str | None]:
        """One request of an open session (its bytes, or what the transport's `take_bell` decoded of them) ->
        (the reply or None, why to drop the session or None). The caller sends the reply the way the request
        came (bytes over ZeroMQ; `post_reply` takes what a rung request's reply was encoded as), then drops."""
        transport = session.transport
        seq = transport.expect_seq
        request = None
        try:
            request = transport.decode(payload)
            if request.method == "Close":
                return None, "client closed the session"
            if request.control:  # the transport acted on it already; the handler never sees it
                return (transport.encode_reply(request, None) if request.answer else None), None
            builder = transport.reply_builder()
            t0 = now_ns()
            ahead = None
            try:
                text = self.handler.handle(request, builder, session.model, settle=False)
                # A device may still be copying (CUDA): a reply that only names where its results lie is encoded
                # meanwhile; the request is released and the reply sent once the handler has settled.
                if self.handler.overlaps_device:
                    ahead = transport.encode_reply_ahead(request, builder, text)
            finally:
                self.handler.settle(session.model)
            work_ns = now_ns() - t0   # to the settle: on a device, the doorbell's encoding overlapped its work
            request.release()
            if ahead is not None:
                return transport.finish_reply(ahead, work_ns), None
            return transport.encode_reply(request, builder, work_ns=work_ns, text=text), None
        except Exception as exc:  # noqa: BLE001 - a bug or a hostile input we did not foresee: never crash the daemon
            message = _failure(exc, getattr(request, "method", "?"))
        return transport.encode_error(request.seq if request else seq, message), message

    # ---- sessions

    def _drop(self, identity: bytes, why: str) -> None:
        session = self.sessions.pop(identity, None)
        if session is None:
            return
        self._bells_stale = True
        self.log(f"session {identity.hex()[:8]} ({session.transport.transport}) closed: {why}{session.model.summary()}")
        self._dropped[identity] = None
        if len(self._dropped) > DROPPED_KEPT:
            self._dropped.popitem(last=False)
        session.model.close()
        # From here on nobody reads this session's request bells: a client still ringing finds us "asleep",
        # sends a Wake over ZeroMQ and gets the no-session refusal there instead of waiting out its timeout.
        session.transport.sleep(True)
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
