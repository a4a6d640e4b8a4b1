"""LLaMA forward as the enclave runs it: norms, RoPE, causal softmax, SiLU*up, residuals.

Everything with a weight matrix (embedding, projections, Q*K^T, P*V, LM head) goes through an
`ops` object: `RemoteOps` sends it to the daemon over a transport (or, for the bench's floor, hands it to the
daemon's handler in-process: host/inprocess.py), `LocalOps` computes it in-process (the tests' reference). The
math lives here once.

Zero copy, with lifetimes the types enforce (wire/scopes.py): every large input of a call is written
once, straight into `req.alloc(...)` of the `ops.request()` that sends it (for shm a view on the
request ring); each reply is read inside its `with` block through `view(i)`, and whatever must outlive
the block is `take(i)`-en (an owned copy). GQA needs no repeat: query heads of one KV group are
stacked along rows, so Q*K^T and P*V are plain batched matmuls over [B, Hkv, g*S, ...].
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ProtocolError
from ..model.calls import padded_width
from ..model.checkpoint import EnclavePart
from ..model.rope import ROPE_TABLES, apply_rope
from ..wire import native

QKV = ["q_proj", "k_proj", "v_proj"]
O = ["o_proj"]
GATE_UP = ["gate_proj", "up_proj"]
DOWN = ["down_proj"]
KV_PLACEMENTS = ("client", "daemon")
ROPE_BLOCK = 256   # decode steps take their RoPE tables from tables made for this many positions at once
# How a layer's work travels. fewest: with the K/V cache on the daemon, the projections, RoPE (our tables) and
# Q*K^T are one call, and P*V with o_proj another (4 calls per layer; with K/V on the client, fused's 5);
# fused: P*V and o_proj travel as one call (5 per layer); v2.4: its six.
CALL_SETS = ("fewest", "fused", "v2.4")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """HF's LlamaRMSNorm in float32; written into `out` (a request buffer) when given. One float32 row (a decode
    step) into a float32 `out`: one pass of the C helper (native.residual_rms_norm: the mean of squares in double,
    then x * weight times the scale as a float32); another row takes its scale as one Python float from one norm,
    then multiplies straight into `out` (three small ops instead of F.rms_norm's composite and a copy); many rows
    F.rms_norm. HF's arithmetic (the mean of squares, rsqrt, products), rounded in other orders: within a few
    float32 ulps of it."""
    x = x.float()
    if x.numel() != x.shape[-1]:
        y = F.rms_norm(x, weight.shape, weight, eps)
        return y if out is None else out.copy_(y)
    if out is not None and native.residual_rms_norm(x, None, weight, eps, out) is not None:
        return out   # x is ours: a non-finite x was refused where it came in
    direct = out is not None and out.dtype == torch.float32
    scale = (float(torch.linalg.vector_norm(x)) ** 2 / x.shape[-1] + eps) ** -0.5
    y = torch.mul(x, weight, out=out if direct else None).mul_(scale)
    return y if out is None or direct else out.copy_(y)


class Rope(NamedTuple):
    """RoPE tables of one forward, [S, 2, hd/2]: a head's two halves side by side. `sin` carries
    rotate_half's sign (its first half negated); q's tables carry the attention scale 1/sqrt(hd) too, so
    Q*K^T arrives scaled and the softmax needs no pass of its own. `packed` holds all four as they travel
    to a daemon that applies them (model/rope.py's layout; the others are views of it). One position (a
    decode step) has the same rotation as one [hd, hd] matrix too (`turn_q`, `turn_k`): a head's RoPE is
    then one product."""

    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos_k: torch.Tensor
    sin_k: torch.Tensor
    packed: torch.Tensor
    turn_q: torch.Tensor | None = None
    turn_k: torch.Tensor | None = None

    def q(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, H, S, hd] rotated (and scaled), into `out` as `apply_rope` writes it."""
        if self.turn_q is not None:
            return turn_rope(x, self.turn_q, out)
        return apply_rope(x, self.cos_q, self.sin_q, out)

    def k(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.turn_k is not None:
            return turn_rope(x, self.turn_k, out)
        return apply_rope(x, self.cos_k, self.sin_k, out)


def rope_tables(inv_freq: torch.Tensor, start: int, length: int, scaling: float, q_scale: float,
                turns: bool = True) -> Rope:
    """The tables of positions start..start+length-1; one position's rotation matrices too unless not `turns` (a
    daemon applies the tables: ~10 small ops a token saved)."""
    positions = torch.arange(start, start + length, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq[None, :]            # [S, hd/2]
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    cos, sin = torch.stack((cos, cos), dim=1), torch.stack((-sin, sin), dim=1)  # [S, 2, hd/2]
    tables = _tables(torch.stack((cos * q_scale, sin * q_scale, cos, sin)))      # from [4, S, 2, hd/2]
    if length != 1 or not turns:
        return Rope(*tables)
    turn = rotation(cos.flatten(), sin.flatten())
    return Rope(*tables, turn * q_scale, turn)


def _tables(stacked: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rope's four tables and `packed` from the four stacked [4, S, 2, hd/2] (views of it)."""
    return (*stacked.unbind(0), stacked.view(ROPE_TABLES, stacked.shape[1], -1))


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The [hd, hd] matrix M with x @ M == x*cos + rotate_half(x)*sin for one position (cos, sin: [hd], the
    tables of `rope_tables` flattened, sin's first half negated): cos on the diagonal, and each half's sin
    where it takes the other half's element."""
    half = cos.numel() // 2
    turn = torch.diag(cos)
    i = torch.arange(half, device=cos.device)
    turn[i + half, i] = sin[:half]     # out j < half:  x[j] cos - x[j + half] sin
    turn[i, i + half] = sin[half:]     # out j >= half: x[j] cos + x[j - half] sin
    return turn


def turn_rope(x: torch.Tensor, turn: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One position's RoPE as one product, x [B, H, 1, hd] @ turn [hd, hd], in float32; into `out` as
    `apply_rope` writes it. A decode step's q or k takes one op instead of five."""
    assert x.shape[-2] == 1, x.shape   # one position: every row turns by the same matrix
    hd = x.shape[-1]
    rows = x.reshape(-1, hd)
    if out is not None and out.dtype == torch.float32 and rows.dtype == torch.float32:
        torch.mm(rows, turn, out=out.view(-1, hd))
        return out
    y = (rows.float() @ turn).view(x.shape)
    return y if out is None else out.copy_(y)


def causal_mask(start: int, S: int, device=None) -> torch.Tensor | None:
    """[S, start+S] True where query i (at absolute position start+i) must not see key j > start+i."""
    return torch.ones(S, start + S, dtype=torch.bool, device=device).triu_(start + 1) if S > 1 else None


def causal_softmax(scores: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = softmax(scores, masked) over the last dim, in float32; scores (scaled already: see Rope), out:
    [B, H, S, T]."""
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    if out.dtype == torch.float32:
        torch.softmax(scores, -1, dtype=torch.float32, out=out)
    else:
        out.copy_(torch.softmax(scores, -1, dtype=torch.float32))


def check_finite(t: torch.Tensor, method: str, layer: int) -> torch.Tensor:
    """Refuse a non-finite state: NaN/Inf in a reply would flow on into the logits and the sampler and
    come out as text. One reduction per check: per layer after the MLP's residual (a NaN/Inf the attention
    added is still there: no sum with a non-finite term is finite), and the logits. A sum is finite only if
    every term is; one that overflows from finite terms takes the element-wise check."""
    if not math.isfinite(t.sum()) and not bool(torch.isfinite(t).all()):
        raise _non_finite(method, layer)
    return t


def _non_finite(method: str, layer: int) -> ProtocolError:
    where = f"layer {layer}" if layer >= 0 else "the last step"
    return ProtocolError(f"the daemon's {method} reply made the {'logits' if layer < 0 else 'hidden state'} "
                         f"non-finite at {where}: refusing to go on with NaN/Inf")


def add_residual(h: torch.Tensor, delta: torch.Tensor, method: str, layer: int, weight: torch.Tensor | None = None,
                 eps: float = 0.0, out: torch.Tensor | None = None) -> bool:
    """h += delta (a reply: `method`'s at `layer`); with `weight`, RMSNorm(h) * weight into `out` (the next call's
    request buffer). Returns whether h was checked finite (refused here if not, naming `method`): always without a
    norm to write (check_finite); with one, where the row is a decode step's in float32, which takes one pass of
    the C helper that sees it anyway. Otherwise torch's add and `rms_norm`, the check left to the caller."""
    finite = native.residual_rms_norm(h, delta, weight, eps, out)
    if finite is not None:
        if not finite:
            raise _non_finite(method, layer)
        return True
    h.add_(delta)
    if weight is None:
        check_finite(h, method, layer)
        return True
    rms_norm(h, weight, eps, out=out)
    return False


class EnclaveModel:
    """The enclave's half of a LLaMA: holds norms and RoPE, drives `ops` for the rest."""

    def __init__(self, part: EnclavePart, ops, kv_cache: str = "daemon", calls: str = "fewest", score_step: int = 1):
        assert kv_cache in KV_PLACEMENTS and calls in CALL_SETS, (kv_cache, calls)
        self.score_step = score_step   # a decode step's scores padded to a multiple of it (model/calls.py)
        self.fused = calls != "v2.4"                                    # P*V and o_proj in one call
        self.scores_in_one = calls == "fewest" and kv_cache == "daemon"  # projections, RoPE, Q*K^T in one call
        self.cfg = cfg = part.cfg
        self.norms = part.norms                 # [2L+1, D] float32, from the enclave's own checkpoint copy
        self.layer_norms = [(part.norms[2 * i], part.norms[2 * i + 1]) for i in range(cfg.num_hidden_layers)]
        self.inv_freq = part.inv_freq           # [hd/2]
        self.attention_scaling = part.attention_scaling
        self.ops = ops
        self._rope_block: tuple[int, torch.Tensor] | None = None   # (first position, [4, block, 2, hd/2]): `_rope`
        self.kv_cache = kv_cache
        self.scale = cfg.head_dim ** -0.5
        self.reset()

    def reset(self) -> None:
        """Forget the sequence (client-side K/V; the daemon's cache restarts at pos 0)."""
        self.k_cache: list[torch.Tensor | None] = [None] * self.cfg.num_hidden_layers
        self.v_cache: list[torch.Tensor | None] = [None] * self.cfg.num_hidden_layers
        self.length = 0

    # ---- one forward

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids: [B, S] positions start..start+S-1 -> float32 logits of the last position [B, V]."""
        cfg = self.cfg
        if start != self.length:
            raise ValueError(f"forward at position {start}, but the cache holds {self.length}")
        B, S = ids.shape
        with self.ops.embedding(ids) as r:
            h = check_finite(r.take(0), "Embedding", 0)        # h: [B, S, D], ours: updated in place below
        rope = self._rope(start, S)
        mask = causal_mask(start, S)   # the enclave computes on its CPU
        for layer in range(cfg.num_hidden_layers):
            self._block(layer, h, start, rope, mask)
        with self.ops.request() as req:   # the last position's norm straight into LMHead's request
            x = rms_norm(h[:, -1:, :], self.norms[-1], cfg.rms_norm_eps, out=req.alloc((B, 1, cfg.hidden_size)))
            reply = self.ops.lm_head(x)
        with reply as r:
            logits = check_finite(r.take(0), "LMHead", -1)     # [B, V]
        self.length = start + S
        return logits

    def _rope(self, start: int, S: int) -> Rope:
        """RoPE's tables for positions start..start+S-1. With the scores in one call the daemon applies them: no
        rotation matrices, and a decode step's tables are a slice of tables made once per ROPE_BLOCK positions (a
        dozen small torch ops a token fewer; the same values: each element is computed on its own)."""
        turns = not self.scores_in_one
        if S != 1 or turns:
            return rope_tables(self.inv_freq, start, S, self.attention_scaling, self.scale, turns=turns)
        first = start - start % ROPE_BLOCK
        if self._rope_block is None or self._rope_block[0] != first:
            block = rope_tables(self.inv_freq, first, ROPE_BLOCK, self.attention_scaling, self.scale, turns=False)
            self._rope_block = (first, block.packed.view(ROPE_TABLES, ROPE_BLOCK, 2, -1))
        return Rope(*_tables(self._rope_block[1][:, start - first:start - first + 1]))

    def _block(self, layer: int, h: torch.Tensor, start: int, rope: Rope, mask) -> None:
        """One decoder layer; adds both residuals into h [B, S, D] in place."""
        cfg, ops = self.cfg, self.ops
        B, S, D = h.shape
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        input_norm, post_attention_norm = self.layer_norms[layer]
        on_daemon = self.kv_cache == "daemon"
        if self.scores_in_one:
            # One call: q|k|v of x, q and k rotated with our tables, K's and V's rows kept, Q*K^T over every row.
            # A decode step's scores padded (model/calls.py): one shape for many steps, a graph on a CUDA daemon
            # (the width is named even where it is start + 1: the step that fills a width exactly is one of them).
            padded = S == 1 and self.score_step > 1
            width = min(padded_width(start + 1, self.score_step), cfg.max_position_embeddings) if padded else start + S
            with ops.request() as req:
                x = rms_norm(h, input_norm, eps, out=req.alloc((B, S, D)))
                tables = req.alloc(rope.packed.shape, torch.float32).copy_(rope.packed)
                scores = ops.attention_scores(layer, x, tables, pos=start, width=width if padded else 0)
            o = self._weigh(layer, scores, B, S, start, mask, None, dict(layer=layer, cache="v", pos=start), width)
        else:
            with ops.request() as req:
                x = rms_norm(h, input_norm, eps, out=req.alloc((B, S, D)))
                # with the cache on the daemon, V's rows stay there (we do nothing to V): the reply is q, k
                qkv = ops.linear(layer, QKV, x, keep_v_at=start if on_daemon else None)
            with ops.request() as req:
                with qkv:
                    q, k = qkv.view(0), qkv.view(1)
                    # q (and k, when only new rows travel) feed the next call: rotate them straight into it
                    q = rope.q(q.view(B, S, H, hd).transpose(1, 2), out=req.alloc((B, H, S, hd)))
                    k_out = req.alloc((B, Hkv, S, hd)) if on_daemon else None
                    k = rope.k(k.view(B, S, Hkv, hd).transpose(1, 2), out=k_out)
                    v = None if on_daemon else qkv.take(2).view(B, S, Hkv, hd).transpose(1, 2).contiguous()
                o = self._attention(layer, q, k, v, start, mask)                               # a reply
        if not self.fused:                                      # v2.4's calls: P*V came back, o_proj is one more
            with ops.request() as req:
                with o:
                    ctx = req.alloc((B, S, H * hd))            # o_proj's input, written once
                    ctx.view(B, S, H, hd).copy_(o.view(0).view(B, H, S, hd).transpose(1, 2))
                o = ops.linear(layer, O, ctx)
        with ops.request() as req:
            x = req.alloc((B, S, D))
            with o:   # the residual and the next norm straight into the request
                attention = "AttentionOutput" if self.fused else "BatchLinear o_proj"
                checked = add_residual(h, o.view(0), attention, layer, post_attention_norm, eps, x)
            gate_up = ops.linear(layer, GATE_UP, x)
        with ops.request() as req:
            with gate_up:
                gate, up = gate_up.views()
                # SiLU in place, in the reply we hold (or float32's copy of it): no buffer of its own
                act = torch.mul(F.silu(gate.float(), inplace=True), up, out=req.alloc((B, S, cfg.intermediate_size)))
            down = ops.linear(layer, DOWN, act)
        with down:
            # where the attention's residual was not checked, a NaN/Inf it added is still in h here
            add_residual(h, down.view(0), "BatchLinear down_proj" if checked else f"{attention} or BatchLinear down_proj",
                         layer)

    def _attention(self, layer: int, q, k, v, start: int, mask):
        """Q*K^T, then `_weigh`; q (and k) are staged in the open request; v is None with the cache on the
        daemon (its rows were kept at the projection)."""
        B, H, S, hd = q.shape
        Hkv = k.shape[1]
        qg = q.view(B, Hkv, (H // Hkv) * S, hd)                # heads of a KV group stacked along rows
        if self.kv_cache == "client":
            keys = k if self.k_cache[layer] is None else torch.cat([self.k_cache[layer], k], dim=2)
            values = v if self.v_cache[layer] is None else torch.cat([self.v_cache[layer], v], dim=2)
            self.k_cache[layer], self.v_cache[layer] = keys, values
            score_call = dict(transpose_b=True)
            ctx_call = dict(transpose_b=False)
        else:
            keys, values = k, None                              # K's new rows travel; V's stayed on the daemon
            score_call = dict(transpose_b=True, layer=layer, cache="k", pos=start)
            ctx_call = dict(transpose_b=False, layer=layer, cache="v", pos=start)
        scores = self.ops.matmul(qg, keys, expect_cols=start + S, **score_call)
        return self._weigh(layer, scores, B, S, start, mask, values, ctx_call)

    def _weigh(self, layer: int, scores, B: int, S: int, start: int, mask, values, ctx_call: dict,
               width: int | None = None):
        """Causal softmax of `scores` (a reply: [B, Hkv, g*S, T], scaled; `width` columns where padded, the first
        T meaning something, whatever the daemon put past them) straight into the next request (as wide, zeros
        past T), then P*V and o_proj in one call (fused: the reply is [B, S, D]) or P*V alone (v2.4: [B, Hkv,
        g*S, hd])."""
        H, T = self.cfg.num_attention_heads, start + S
        W = width or T
        with self.ops.request() as req:
            with scores:
                s = scores.view(0)
                probs = req.alloc(s.shape)                     # written in place: no extra copy
                if W != T:   # padding: no weight. Written into the reply we hold, so the softmax runs on whole rows
                    s.view(B, H, S, W)[..., T:].fill_(float("-inf"))   # (a strided one took ~1.7x as long)
                causal_softmax(s.view(B, H, S, W), mask, probs.view(B, H, S, W))
            if self.fused:
                ctx_call.pop("transpose_b", None)
                return self.ops.attention_output(probs, values, **{"layer": layer, **ctx_call})
            return self.ops.matmul(probs, values, expect_cols=self.cfg.head_dim, **ctx_call)
