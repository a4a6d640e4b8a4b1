"""LLaMA forward as the enclave runs it: norms, RoPE, causal softmax, SiLU*up, residuals.

Everything with a weight matrix (embedding, projections, Q*K^T, P*V, LM head) goes through an
`ops` object: `RemoteOps` sends it to the daemon over a transport, `LocalOps` computes it
in-process (the reference and the compute floor). The math lives here once.

Zero copy, with lifetimes the types enforce (wire/scopes.py): every large input of a call is written
once, straight into `req.alloc(...)` of the `ops.request()` that sends it (for shm a view on the
request ring); each reply is read inside its `with` block through `view(i)`, and whatever must outlive
the block is `take(i)`-en (an owned copy). GQA needs no repeat: query heads of one KV group are
stacked along rows, so Q*K^T and P*V are plain batched matmuls over [B, Hkv, g*S, ...].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ProtocolError
from ..model.checkpoint import EnclavePart

QKV = ["q_proj", "k_proj", "v_proj"]
O = ["o_proj"]
GATE_UP = ["gate_proj", "up_proj"]
DOWN = ["down_proj"]
KV_PLACEMENTS = ("client", "daemon")
CALL_SETS = ("fused", "v2.4")   # fused: P*V and o_proj travel as one call (5 per layer); v2.4: six


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    x32 = x.float()
    return torch.mul(weight, x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + eps), out=out)


def rope_cos_sin(inv_freq: torch.Tensor, start: int, length: int, scaling: float):
    positions = torch.arange(start, start + length, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq[None, :]            # [S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                   # [S, hd]
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.add(x * cos, rotated * sin, out=out)


def causal_mask(start: int, S: int, device=None) -> torch.Tensor | None:
    """[S, start+S] True where query i (at absolute position start+i) must not see key j > start+i."""
    return torch.ones(S, start + S, dtype=torch.bool, device=device).triu_(start + 1) if S > 1 else None


def causal_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float, out: torch.Tensor) -> None:
    """out = softmax(scores * scale, masked) over the last dim; scores, out: [B, H, S, T]."""
    x = scores.float() * scale if scores.dtype != torch.float32 else torch.mul(scores, scale)
    if mask is not None:
        x.masked_fill_(mask, float("-inf"))
    if out.dtype == torch.float32:
        torch.softmax(x, dim=-1, out=out)
    else:
        out.copy_(torch.softmax(x, dim=-1))


def check_finite(t: torch.Tensor, method: str, layer: int) -> torch.Tensor:
    """Refuse a non-finite state: NaN/Inf in a reply would flow on into the logits and the sampler and
    come out as text. One pass over the residual stream per check (per layer: after attention, after
    the MLP; and the logits)."""
    if not bool(torch.isfinite(t).all()):
        where = f"layer {layer}" if layer >= 0 else "the last step"
        raise ProtocolError(f"the daemon's {method} reply made the {'logits' if layer < 0 else 'hidden state'} "
                            f"non-finite at {where}: refusing to go on with NaN/Inf")
    return t


class EnclaveModel:
    """The enclave's half of a LLaMA: holds norms and RoPE, drives `ops` for the rest."""

    def __init__(self, part: EnclavePart, ops, kv_cache: str = "daemon", calls: str = "fused"):
        assert kv_cache in KV_PLACEMENTS and calls in CALL_SETS, (kv_cache, calls)
        self.fused = calls == "fused"
        self.cfg = cfg = part.cfg
        self.norms = part.norms                 # [2L+1, D] float32, from the enclave's own checkpoint copy
        self.inv_freq = part.inv_freq           # [hd/2]
        self.attention_scaling = part.attention_scaling
        self.ops = ops
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
            h = r.take(0)                                      # h: [B, S, D]
        cos, sin = rope_cos_sin(self.inv_freq, start, S, self.attention_scaling)
        mask = causal_mask(start, S, self.norms.device)
        for layer in range(cfg.num_hidden_layers):
            h = self._block(layer, h, start, cos, sin, mask)
        x = rms_norm(h[:, -1:, :], self.norms[-1], cfg.rms_norm_eps)  # x: [B, 1, D]
        with self.ops.lm_head(x) as r:
            logits = check_finite(r.take(0), "LMHead", -1)     # [B, V]
        self.length = start + S
        return logits

    def _block(self, layer: int, h: torch.Tensor, start: int, cos, sin, mask) -> torch.Tensor:
        cfg = self.cfg
        B, S, D = h.shape
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        with self.ops.request() as req:
            x = rms_norm(h, self.norms[2 * layer], eps, out=req.alloc((B, S, D)))
            qkv = self.ops.linear(layer, QKV, x)
        with self.ops.request() as req:
            with qkv:
                q, k, v = qkv.views()
                # q (and k, when only new rows travel) feed the next call: rotate them straight into it
                q = apply_rope(q.float().view(B, S, H, hd).transpose(1, 2), cos, sin, out=req.alloc((B, H, S, hd)))
                k_out = req.alloc((B, Hkv, S, hd)) if self.kv_cache == "daemon" else None
                k = apply_rope(k.float().view(B, S, Hkv, hd).transpose(1, 2), cos, sin, out=k_out)  # [B, Hkv, S, hd]
                v = qkv.take(2).view(B, S, Hkv, hd).transpose(1, 2).contiguous()                 # [B, Hkv, S, hd]
            o = self._attention(layer, q, k, v, start, mask)                                     # a reply
        if not self.fused:                                      # v2.4's calls: P*V came back, o_proj is one more
            with self.ops.request() as req:
                with o:
                    ctx = req.alloc((B, S, H * hd))            # o_proj's input, written once
                    ctx.view(B, S, H, hd).copy_(o.view(0).view(B, H, S, hd).transpose(1, 2))
                o = self.ops.linear(layer, O, ctx)
        with o:
            h = check_finite(h + o.view(0).float(), "AttentionOutput" if self.fused else "BatchLinear o_proj", layer)
        with self.ops.request() as req:
            x = rms_norm(h, self.norms[2 * layer + 1], eps, out=req.alloc((B, S, D)))
            gate_up = self.ops.linear(layer, GATE_UP, x)
        with self.ops.request() as req:
            with gate_up:
                gate, up = (t.float() for t in gate_up.views())
                act = torch.mul(F.silu(gate), up, out=req.alloc((B, S, cfg.intermediate_size)))  # [B, S, I]
            down = self.ops.linear(layer, DOWN, act)
        with down:
            return check_finite(h + down.view(0).float(), "BatchLinear down_proj", layer)

    def _attention(self, layer: int, q, k, v, start: int, mask):
        """Q*K^T, causal softmax, then P*V and o_proj in one call (fused: the reply is [B, S, D]) or P*V
        alone (v2.4: the reply is [B, Hkv, g*S, hd]); q (and k) are staged in the open request."""
        B, H, S, hd = q.shape
        Hkv = k.shape[1]
        T = start + S
        qg = q.view(B, Hkv, (H // Hkv) * S, hd)                # heads of a KV group stacked along rows
        if self.kv_cache == "client":
            keys = k if self.k_cache[layer] is None else torch.cat([self.k_cache[layer], k], dim=2)
            values = v if self.v_cache[layer] is None else torch.cat([self.v_cache[layer], v], dim=2)
            self.k_cache[layer], self.v_cache[layer] = keys, values
            score_call = dict(transpose_b=True)
            ctx_call = dict(transpose_b=False)
        else:
            keys, values = k, v                                 # only the new rows travel
            score_call = dict(transpose_b=True, layer=layer, cache="k", pos=start)
            ctx_call = dict(transpose_b=False, layer=layer, cache="v", pos=start)
        scores = self.ops.matmul(qg, keys, expect_cols=T, **score_call)
        with self.ops.request() as req:
            with scores:
                probs = req.alloc(scores.view(0).shape)        # written in place: no extra copy
                causal_softmax(scores.view(0).view(B, H, S, T), mask, self.scale, probs.view(B, H, S, T))
            if self.fused:
                ctx_call.pop("transpose_b")
                return self.ops.attention_output(probs, values, **{"layer": layer, **ctx_call})
            return self.ops.matmul(probs, values, expect_cols=hd, **ctx_call)
