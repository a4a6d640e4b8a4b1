"""The two `ops` backends the enclave model drives: over a transport, or in-process.

`RemoteOps` is the split: each op is one RPC (method names as in v2.4), inputs converted to the
wire dtype on their way into the transport, replies checked for the shape and dtype the op must
return (a daemon is untrusted). `LocalOps` runs the daemon's compute in this process with no
transport at all: the reference for tests and the compute floor for the bench.
"""
from __future__ import annotations

import torch

from ..model.config import LlamaConfig, projection_rows
from ..errors import ProtocolError
from ..wire.protocol import MATMUL_TRANSPOSE_B, projection_bits
from ..wire.transport import ClientTransport, Reply


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
