"""The two `ops` backends the enclave model drives: over a transport, or in-process.

`RemoteOps` is the split: each op is one RPC (method names as in v2.4), inputs converted to the
wire dtype on their way into the transport, replies checked for the shape and dtype the op must
return (a daemon is untrusted). `LocalOps` runs the daemon's compute in this process with no
transport at all: the reference for tests and the compute floor for the bench.
"""
from __future__ import annotations

import torch

from .compute import KVStore, LinearCompute
from .config import LlamaConfig
from .errors import ProtocolError
from .protocol import MATMUL_TRANSPOSE_B, projection_bits
from .transport import ClientTransport, Reply
from .weights import projection_rows


def _matmul_op(transpose_b: bool, cache: int) -> int:
    return (MATMUL_TRANSPOSE_B if transpose_b else 0) | cache


class RemoteOps:
    def __init__(self, transport: ClientTransport, cfg: LlamaConfig, wire_dtype: torch.dtype):
        self.t = transport
        self.cfg = cfg
        self.wire_dtype = wire_dtype
        self.rows = projection_rows(cfg)

    def _call(self, method: str, tensors, expect: list[tuple], dtype: torch.dtype, **args) -> Reply:
        reply = self.t.call(method, tensors, wire_dtype=self.wire_dtype, **args)
        got = [(tuple(t.shape), t.dtype) for t in reply.tensors]
        want = [(shape, dtype) for shape in expect]
        if got != want:
            reply.release()
            raise ProtocolError(f"{method} reply has tensors {got}, expected {want}")
        return reply

    def staging(self, shape) -> torch.Tensor:
        return self.t.staging(shape, self.wire_dtype)

    def embedding(self, ids: torch.Tensor) -> Reply:
        B, S = ids.shape
        return self._call("Embedding", [ids], [(B, S, self.cfg.hidden_size)], self.wire_dtype)

    def linear(self, layer: int, names: list[str], x: torch.Tensor) -> Reply:
        B, S, _ = x.shape
        return self._call("BatchLinear", [x], [(B, S, self.rows[n]) for n in names], self.wire_dtype,
                          layer=layer, op=projection_bits(names))

    def matmul(self, a, b, *, transpose_b: bool, expect_cols: int, layer: int = -1, cache: int = 0,
               pos: int = 0) -> Reply:
        return self._call("Matmul", [a, b], [tuple(a.shape[:-1]) + (expect_cols,)], self.wire_dtype,
                          layer=layer, op=_matmul_op(transpose_b, cache), pos=pos)

    def lm_head(self, x: torch.Tensor) -> Reply:
        return self._call("LMHead", [x], [(x.shape[0], self.cfg.vocab_size)], torch.float32)


class LocalOps:
    """The daemon's compute in-process; results come back as CPU tensors in the wire dtype."""

    def __init__(self, compute: LinearCompute, wire_dtype: torch.dtype = torch.float32):
        self.c = compute
        self.wire_dtype = wire_dtype
        self.kv = KVStore(compute.cfg)
        self.pinned = compute.device.type == "cuda"

    def _out(self, tensors, dtype=None) -> Reply:
        out = []
        for t in tensors:
            t = t.to(dtype or self.wire_dtype)
            out.append(t if t.device.type == "cpu" else
                       torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t))
        return Reply(out, stats=None)

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.wire_dtype) if t.is_floating_point() else t

    def staging(self, shape) -> torch.Tensor:
        # Pinned (and reused by torch's caching host allocator) on CUDA: the floor moves bytes to and
        # from the GPU by DMA, as the daemon does from its registered ring.
        return torch.empty(tuple(shape), dtype=self.wire_dtype, pin_memory=self.pinned)

    def embedding(self, ids) -> Reply:
        return self._out([self.c.embedding(ids)])

    def linear(self, layer, names, x) -> Reply:
        return self._out(self.c.linear(layer, names, self._wire(x)))

    def matmul(self, a, b, *, transpose_b, expect_cols, layer=-1, cache=0, pos=0) -> Reply:
        return self._out([self.c.matmul(self._wire(a), self._wire(b), _matmul_op(transpose_b, cache),
                                        layer, pos, self.kv)])

    def lm_head(self, x) -> Reply:
        return self._out([self.c.lm_head(self._wire(x))], torch.float32)
