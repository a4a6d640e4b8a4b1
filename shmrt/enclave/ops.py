"""The enclave's remote ops: each op the model needs from a weight matrix is one RPC to the daemon.

Method names are v2.4's. Inputs go to the wire dtype on their way into the transport (or are written
there in place, through `request()`); replies are checked for the shape and dtype the op must return
(a daemon is untrusted). The model speaks names (`cache="k"`, projection names); this is where they
become the doorbell's argument bits (model/calls.py), and nowhere else on this side.
"""
from __future__ import annotations

import torch

from ..errors import ProtocolError
from ..model.calls import matmul_bits, projection_bits, replied_projections
from ..model.config import LlamaConfig, projection_rows
from ..wire.scopes import PendingRequest, Reply
from ..wire.transport import ClientTransport


class RemoteOps:
    def __init__(self, transport: ClientTransport, cfg: LlamaConfig, wire_dtype: torch.dtype):
        self.t = transport
        self.cfg = cfg
        self.wire_dtype = wire_dtype
        self.rows = projection_rows(cfg)

    def request(self) -> PendingRequest:
        """The inputs of the next call, written in place (views on the request ring for shm)."""
        return self.t.request(self.wire_dtype)

    def _call(self, method: str, tensors, expect: list[tuple], dtype: torch.dtype, *, convert: bool = True,
              **args) -> Reply:
        """One RPC; a None among `tensors` is a factor the daemon has in its K/V cache: it does not travel.
        `convert` False: every tensor travels in its own dtype (the caller made them what they must be)."""
        tensors = [t for t in tensors if t is not None]
        reply = self.t.call(method, tensors, wire_dtype=self.wire_dtype if convert else None, **args)
        views = reply.views()
        ok = len(views) == len(expect)
        for t, shape in zip(views, expect):
            ok = ok and t.dtype == dtype and t.shape == shape
        if not ok:
            reply.release()
            raise ProtocolError(f"{method} reply has tensors {[(tuple(t.shape), t.dtype) for t in views]}, "
                                f"expected {[(shape, dtype) for shape in expect]}")
        return reply

    def embedding(self, ids: torch.Tensor) -> Reply:
        B, S = ids.shape
        return self._call("Embedding", [ids], [(B, S, self.cfg.hidden_size)], self.wire_dtype)

    def linear(self, layer: int, names: list[str], x: torch.Tensor, keep_v_at: int | None = None) -> Reply:
        """x @ W^T for each projection; `keep_v_at` (a position): v_proj's rows stay in the daemon's V cache
        there and the reply leaves them out."""
        B, S, _ = x.shape
        keep_v = keep_v_at is not None
        return self._call("BatchLinear", [x], [(B, S, self.rows[n]) for n in replied_projections(names, keep_v)],
                          self.wire_dtype, layer=layer, op=projection_bits(names, keep_v), pos=keep_v_at or 0)

    def matmul(self, a, b, *, transpose_b: bool, expect_cols: int, layer: int = -1, cache: str | None = None,
               pos: int = 0) -> Reply:
        """a @ b (b^T); b None: the daemon's cache rows as they are (V kept at the projection)."""
        return self._call("Matmul", [a, b], [tuple(a.shape[:-1]) + (expect_cols,)],
                          self.wire_dtype, layer=layer, op=matmul_bits(transpose_b, cache), pos=pos)

    def attention_scores(self, layer: int, x: torch.Tensor, tables: torch.Tensor, *, pos: int, width: int = 0) -> Reply:
        """q|k|v of x [B, S, D], q and k rotated with our RoPE `tables` (model/rope.py), K's and V's rows kept in
        the daemon's cache at `pos`, then Q*K^T over every kept row, one call: [B, Hkv, g*S, pos + S], or `width`
        columns (model/calls.py: padded, products with zero rows past pos + S)."""
        B, S, _ = x.shape
        cfg = self.cfg
        # x in the wire dtype, the tables in float32 whatever it is (model/rope.py), on every transport: none
        # converts them (msgpack would round the tables to the wire dtype)
        x = x if x.dtype == self.wire_dtype else x.to(self.wire_dtype)
        tables = tables if tables.dtype == torch.float32 else tables.float()
        return self._call("AttentionScores", [x, tables],
                          [(B, cfg.num_key_value_heads, cfg.groups * S, width or pos + S)],
                          self.wire_dtype, convert=False, layer=layer, op=width, pos=pos)

    def attention_output(self, p, v, *, layer: int, cache: str | None = None, pos: int = 0) -> Reply:
        """P*V then o_proj, one call: p [B, Hkv, g*S, T] -> [B, S, D]; v None as in `matmul`."""
        B, S = p.shape[0], p.shape[1] * p.shape[2] // self.cfg.num_attention_heads
        return self._call("AttentionOutput", [p, v], [(B, S, self.cfg.hidden_size)],
                          self.wire_dtype, layer=layer, op=matmul_bits(False, cache), pos=pos)

    def lm_head(self, x: torch.Tensor) -> Reply:
        return self._call("LMHead", [x], [(x.shape[0], self.cfg.vocab_size)], torch.float32)
