"""The daemon's compute driven in-process, with no transport and no rings: the reference the tests compare
against. It has the interface of the enclave's `RemoteOps`, so `EnclaveModel` runs on it unchanged; it lives on
the host side because it holds the whole model. (The bench's floor is inprocess.py: the split's own handler,
rings and CUDA graphs.)"""
from __future__ import annotations

import torch

from ..wire.scopes import OpenRequest, PendingRequest, Reply
from .compute import LinearCompute


class LocalOps:
    """The daemon's compute in-process; results come back as CPU tensors in the wire dtype."""

    def __init__(self, compute: LinearCompute, wire_dtype: torch.dtype = torch.float32):
        self.c = compute
        self.wire_dtype = wire_dtype
        self.kv = compute.new_kv_store()
        self.pinned = compute.device.type == "cuda"
        self._stream = torch.cuda.current_stream(compute.device) if self.pinned else None  # as the handler waits
        self._requests = OpenRequest(self._alloc, wire_dtype)

    def _wire(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t.to(self.wire_dtype) if t is not None and t.is_floating_point() and t.dtype != self.wire_dtype else t

    def _alloc(self, shape, dtype):
        # Pinned (and reused by torch's caching host allocator) on CUDA: the floor moves bytes to and
        # from the GPU by DMA, as the daemon does from its registered ring.
        return torch.empty(shape, dtype=dtype, pin_memory=self.pinned), None

    def request(self) -> PendingRequest:
        return self._requests.open()

    def _out(self, tensors, dtype=None) -> Reply:
        self._requests.sent()   # the call is made: its request is sent, as over a transport
        dtype = dtype or self.wire_dtype
        out = [(t if t.dtype == dtype else t.to(dtype)) if t.device.type == "cpu" else
               torch.empty(t.shape, dtype=dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors]
        if self._stream is not None:  # as the daemon's handler: every copy of the call queued, then one wait
            self._stream.synchronize()
        return Reply(out, stats=None)

    def embedding(self, ids) -> Reply:
        return self._out([self.c.embedding(ids)])

    def linear(self, layer, names, x, keep_v_at=None) -> Reply:
        keep_v = None if keep_v_at is None else (self.kv, keep_v_at)
        return self._out(self.c.products(layer, names, self._wire(x), dtype=self.wire_dtype, keep_v=keep_v)[0])

    def matmul(self, a, b, *, transpose_b, expect_cols, layer=-1, cache=None, pos=0) -> Reply:
        return self._out([self.c.matmul(self._wire(a), self._wire(b), transpose_b=transpose_b, cache=cache,
                                        layer=layer, pos=pos, kv=self.kv)])

    def attention_scores(self, layer, x, tables, *, pos, width=0) -> Reply:
        return self._out([self.c.attention_scores(layer, self._wire(x), tables, pos=pos, kv=self.kv, width=width)])

    def attention_output(self, p, v, *, layer, cache=None, pos=0) -> Reply:
        return self._out([self.c.attention_output(self._wire(p), self._wire(v), layer=layer, cache=cache, pos=pos,
                                                  kv=self.kv)])

    def lm_head(self, x) -> Reply:
        return self._out([self.c.lm_head(self._wire(x))], torch.float32)
