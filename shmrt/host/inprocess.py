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

from .daemon import ModelHandler
from ..wire.protocol import NAME_BY_DTYPE
from ..wire.ring import PAGE_BYTES, align_up
from ..wire.scopes import Reply
from ..wire.shm_transport import RequestRingInputs, ShmReplyBuilder, accept_views, close_rings, create_rings, \
    describe_input
from ..wire.transport import Caller, Request


class InProcessCaller(RequestRingInputs, Caller):
    """Calls `handler` (a `ModelHandler`) directly: one session, its rings created here; a context manager."""

    name = "inprocess"
    timeout = 0.0   # one caller: a ring with no room now has none later either (RingFull at once)

    def __init__(self, handler: ModelHandler, wire_dtype: torch.dtype, ring_bytes: int):
        super().__init__()
        self.handler = handler
        self.session = None
        self.req, self.rsp = create_rings(align_up(ring_bytes, PAGE_BYTES))
        try:
            self.session = handler.open({"wire_dtype": NAME_BY_DTYPE[wire_dtype]},
                                        lambda: [self.req.native, self.rsp.native])
            self.seq = 0
            self.call("Init").release()
        except BaseException:
            self.close()
            raise

    def call(self, method: str, tensors=(), *, layer: int = -1, op: int = 0, pos: int = 0, wire_dtype=None) -> Reply:
        descs = tuple(describe_input(self.req, t, staged, wire_dtype, self.timeout)[0]
                      for t, staged in zip(tensors, self._claim_inputs(method, tensors)))
        self.seq += 1
        # what a shm session's daemon does with a request rung in the ring, less the doorbell: the views, the
        # handler (its checks, graphs and wait for the device), the request handed back, the reply published
        views, release = accept_views(self.req, self.req.producer.publish(), descs)
        request = Request(method, self.seq, layer, op, pos, views, on_release=release, descs=descs)
        builder = ShmReplyBuilder(self.rsp, self.timeout)
        try:
            text = self.handler.handle(request, builder, self.session)
        finally:
            request.release()
        out, release_reply = accept_views(self.rsp, self.rsp.producer.publish(), builder.descs)
        return Reply(out, None, text or "", release=release_reply)

    def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()   # its graphs and registrations go before the rings they point into
        close_rings(self.req, self.rsp)
        self.req = self.rsp = None

    def __enter__(self) -> "InProcessCaller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
