"""The split with its transport taken out, for the bench's compute floor: the enclave's model calls the daemon's
handler in one process, through the same two rings (the same staging, reply buffers, CUDA graphs and K/V store
as a shm session), with no doorbell, no ZeroMQ, no encoding and no second process.

What a split run costs beyond this floor is the transport's share: signalling, waiting, the doorbell records
and the process boundary. (`LocalOps` computes with no rings at all: the reference the tests compare against,
but not a floor of the split's ops since graphs need the rings' fixed addresses.) It lives on the host side: it
holds the whole model.
"""
from __future__ import annotations

import torch

from .. import settings
from .daemon import ModelHandler
from ..wire.protocol import NAME_BY_DTYPE, TensorDesc
from ..wire.ring import PAGE_BYTES, Ring, align_up
from ..wire.scopes import Reply
from ..wire.shm_transport import ShmReplyBuilder, close_rings, describe_input, in_ring, reserve_view, ring_view
from ..wire.transport import Caller, Request

RESERVE_TIMEOUT_S = 1.0   # one caller: a ring with no room now will have none later either


class InProcessCaller(Caller):
    """Calls `handler` (a `ModelHandler`) directly: one session, its rings created here; a context manager."""

    name = "inprocess"

    def __init__(self, handler: ModelHandler, wire_dtype: torch.dtype, ring_bytes: int):
        super().__init__()
        self.handler = handler
        capacity = align_up(ring_bytes, PAGE_BYTES)
        self.req = Ring.create(capacity, "req", poison=settings.poison())
        self.rsp = None
        try:
            self.rsp = Ring.create(capacity, "rsp", poison=settings.poison())
            self.session = handler.open({"wire_dtype": NAME_BY_DTYPE[wire_dtype]},
                                        lambda: [self.req.native, self.rsp.native])
            self.seq = 0
            self.call("Init").release()
        except BaseException:
            self.close()
            raise

    def _alloc_input(self, shape: tuple, dtype: torch.dtype):
        return reserve_view(self.req, shape, dtype, RESERVE_TIMEOUT_S, "staged tensor")[::-1]

    def _in_request_memory(self, t: torch.Tensor) -> bool:
        return in_ring(self.req, t)

    def call(self, method: str, tensors=(), *, layer: int = -1, op: int = 0, pos: int = 0, wire_dtype=None) -> Reply:
        descs = [describe_input(self.req, t, staged, wire_dtype, RESERVE_TIMEOUT_S)[0]
                 for t, staged in zip(tensors, self._claim_inputs(method, tensors))]
        self.seq += 1
        # what a shm session's daemon does with a request rung in the ring, less the doorbell: the views, the
        # handler (its checks, graphs and waits), the request handed back, the reply published
        entry = self.req.consumer.accept(self.req.producer.publish(), descs)
        request = Request(method, self.seq, layer, op, pos, [ring_view(self.req, d) for d in descs],
                          on_release=lambda: self.req.consumer.release(entry))
        builder = ShmReplyBuilder(self.rsp, RESERVE_TIMEOUT_S)
        try:
            text = self.handler.handle(request, builder, self.session)
        finally:
            request.release()
        out: list[TensorDesc] = builder.descs
        held = self.rsp.consumer.accept(self.rsp.producer.publish(), out)
        return Reply([ring_view(self.rsp, d) for d in out], None, text or "",
                     release=lambda: self.rsp.consumer.release(held))

    def close(self) -> None:
        session, self.session = getattr(self, "session", None), None
        if session is not None:
            session.close()   # its graphs and registrations go before the rings they point into
        close_rings(self.req, self.rsp)
        self.req = self.rsp = None

    def __enter__(self) -> "InProcessCaller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
