"""What the daemon computes, as a table: one row per model RPC (its name, how many tensors it takes, the
function that computes it), and one typed session object per client.

The serving loop (server.py) knows nothing of methods: it opens a session at Hello (`Handler.open`),
hands every request to `Handler.handle`, and closes the session with the client's. `handle` is the one
dispatcher: it looks the method up in the table, enforces Init-first and the arity, then calls the row's
compute function. A new call is one row here (in the handler's table), one compute function, one method
in the enclave's ops, and its code in protocol.Method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .. import settings
from ..errors import ProtocolError
from ..wire.protocol import RPC_METHODS
from ..wire.transport import ReplyBuilder, Request

INIT = "Init"  # opens the session's state; every other call needs it first


@dataclass(frozen=True)
class Call:
    """One row of a method table. `compute(handler, session, request, builder)` writes the results into
    `builder` and may return reply text; `arity` is how many tensors a request carries: a count, the counts it
    may carry (a product with one factor in the K/V cache: 1 or 2), or None (any)."""

    name: str
    arity: int | tuple[int, ...] | None
    compute: Callable
    counts: tuple[int, ...] | None = field(init=False)   # the tensor counts a request may carry (None: any)

    def __post_init__(self) -> None:
        counts = self.arity if self.arity is None or isinstance(self.arity, tuple) else (self.arity,)
        object.__setattr__(self, "counts", counts)   # once per row, not per request


def table(*calls: Call) -> dict[str, Call]:
    """A method table by name; each name is an RPC the wire knows, and appears once."""
    rows = {c.name: c for c in calls}
    assert len(rows) == len(calls), [c.name for c in calls]
    assert set(rows) <= set(RPC_METHODS), set(rows) - set(RPC_METHODS)
    return rows


class HandlerSession:
    """A client's state on the handler's side; closed when the daemon drops the session."""

    initialised: bool = False  # Init ran

    def summary(self) -> str:
        """What the daemon's log says of this session when it ends, beyond why ("" for nothing)."""
        return ""

    def close(self) -> None:
        pass


class Handler:
    """What the daemon serves: `calls` (the method table), what Hello answers, the per-session state."""

    calls: dict[str, Call] = {}
    # True where `handle(settle=False)` can return before its copies are done (a CUDA daemon): the server then
    # encodes the reply's doorbell meanwhile. Elsewhere there is nothing to overlap, and it encodes after.
    overlaps_device: bool = False

    def hello(self) -> dict:
        return {}

    def open(self, client_info: dict, pinned_buffers: Callable[[], list], lane_parts: Callable[[], object] = lambda: None
             ) -> HandlerSession:
        """A new client's state, from what its Hello said. `pinned_buffers()`: its transport's mappings a
        device may register for DMA ([] where there are none; ask at Init, once they exist); `lane_parts()`: what
        the daemon's planned calls need of its transport (host/lane.py; None where they cannot serve it)."""
        return HandlerSession()

    def handle(self, request: Request, builder: ReplyBuilder, session: HandlerSession, settle: bool = True) -> str:
        """The one dispatcher: table row, Init first and once, arity, then the row's compute. `settle` False: a
        device may still be reading the request's tensors and writing the reply's when this returns or raises:
        the caller calls `settle` before it releases the one or sends the other."""
        call = self.calls.get(request.method)
        if call is None:
            raise ProtocolError(f"method {request.method} is not served here (expected one of {list(self.calls)})")
        if call.name == INIT:
            if session.initialised:
                raise ProtocolError("Init sent twice in one session")
        elif not session.initialised:
            raise ProtocolError(f"{call.name} before Init")
        counts = call.counts
        if counts is not None and len(request.tensors) not in counts:
            raise ProtocolError(f"{call.name} takes {' or '.join(map(str, counts))} tensor(s), got {len(request.tensors)}")
        text = call.compute(self, session, request, builder)
        if call.name == INIT:
            session.initialised = True
        return text or ""

    def settle(self, session: HandlerSession) -> None:
        """Return once nothing of the last call still reads its request or writes its reply (a device's copies)."""


def _no_state(handler, session, request, builder) -> None:
    pass


class EchoSession(HandlerSession):
    """An echo client's state: its lane (host/lane.py's EchoLane) where its transport has rings (shm)."""

    def __init__(self, lane_parts: Callable[[], object]):
        self.lane_parts = lane_parts
        self.lane = None

    def summary(self) -> str:
        return f" ({self.lane.served} echoes served in C)" if self.lane is not None else ""

    def close(self) -> None:
        if self.lane is not None:
            self.lane.close()
            self.lane = None


def _echo_init(handler, session: EchoSession, request, builder) -> None:
    from .lane import EchoLane   # (torch-heavy host modules: only where a session asks)
    parts = session.lane_parts() if settings.planned_lane() else None
    if parts is not None:
        session.lane = EchoLane(parts)


def _echo(handler, session: EchoSession, request, builder) -> None:
    for t in request.tensors:
        builder.alloc(t.shape, t.dtype).copy_(t)
    if session.lane is not None:
        session.lane.remember(request, builder)


class EchoHandler(Handler):
    """Returns every request tensor unchanged (a copy into the reply buffers): tests, micro bench. Over shm rings a
    repeated call is served in C (its lane), as a model daemon's planned calls are."""

    calls = table(Call(INIT, 0, _echo_init), *(Call(name, None, _echo) for name in RPC_METHODS if name != INIT))

    def hello(self) -> dict:
        return {"echo": True}

    def open(self, client_info: dict, pinned_buffers, lane_parts=lambda: None) -> EchoSession:
        return EchoSession(lane_parts)
