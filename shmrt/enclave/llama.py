"""LLaMA forward as the enclave runs it: norms, RoPE, causal softmax, SiLU*up, residuals.

Everything with a weight matrix (embedding, projections, Q*K^T, P*V, LM head) goes through an
`ops` object: `RemoteOps` sends it to the daemon over a transport, `LocalOps` computes it
in-process (the reference and the compute floor). The math lives here once.

Each ops call returns a `Reply` whose tensors may be views into the transport's memory: they
are used inside a `with` block and released before the next call needs the space. The other way,
every large input of the next call is written by its op straight into `ops.staging(...)` (for shm a
view on the request ring): the enclave writes each byte it sends once, and never copies it again. A
staged buffer feeds only the very next call (the ring reuses the space once the daemon releases it).
GQA needs no repeat: query heads of one KV group are stacked along rows, so Q*K^T and P*V are
plain batched matmuls over [B, Hkv, g*S, ...] (contiguous views, no copies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.config import LlamaConfig
from ..wire.protocol import MATMUL_CACHE_K, MATMUL_CACHE_V

QKV = ["q_proj", "k_proj", "v_proj"]
O = ["o_proj"]
GATE_UP = ["gate_proj", "up_proj"]
DOWN = ["down_proj"]
KV_PLACEMENTS = ("client", "daemon")


def owned(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`t` as float32 memory of our own: copies if it still aliases `source` (a reply view)."""
    t = t.float()
    if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        t = t.clone()
    return t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    x32 = x.float()
    return torch.mul(weight, x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps), out=out)


def rope_cos_sin(inv_freq: torch.Tensor, start: int, length: int, scaling: float):
    positions = torch.arange(start, start + length, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]            # [S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                   # [S, hd]
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.add(x * cos, rotated * sin, out=out)


def causal_mask(start: int, S: int) -> torch.Tensor | None:
    """[S, start+S] True where query i (at absolute position start+i) must not see key j > start+i."""
    return torch.ones(S, start + S, dtype=torch.bool).triu_(start + 1) if S > 1 else None


def causal_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float, out: torch.Tensor) -> None:
    """out = softmax(scores * scale, masked) over the last dim; scores, out: [B, H, S, T]."""
    x = scores.float() * scale if scores.dtype != torch.float32 else torch.mul(scores, scale)
    if mask is not None:
        x.masked_fill_(mask, float("-inf"))
    if out.dtype == torch.float32:
        torch.softmax(x, dim=-1, out=out)
    else:
        out.copy_(torch.softmax(x, dim=-1))


class EnclaveModel:
    """The enclave's half of a LLaMA: holds norms and RoPE, drives `ops` for the rest."""

    def __init__(self, cfg: LlamaConfig, norms: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
                 ops, kv_cache: str = "daemon"):
        assert kv_cache in KV_PLACEMENTS, kv_cache
        self.cfg = cfg
        self.norms = norms.float()            # [2L+1, D]
        self.inv_freq = inv_freq.float()      # [hd/2]
        self.attention_scaling = attention_scaling
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
            h = owned(r.tensors[0], r.tensors[0])             # h: [B, S, D]
        cos, sin = rope_cos_sin(self.inv_freq, start, S, self.attention_scaling)
        mask = causal_mask(start, S)
        for layer in range(cfg.num_hidden_layers):
            h = self._block(layer, h, start, cos, sin, mask)
        x = rms_norm(h[:, -1:, :], self.norms[-1], cfg.rms_norm_eps)  # x: [B, 1, D]
        with self.ops.lm_head(x) as r:
            logits = owned(r.tensors[0], r.tensors[0])        # [B, V]
        self.length = start + S
        return logits

    def _block(self, layer: int, h: torch.Tensor, start: int, cos, sin, mask) -> torch.Tensor:
        cfg = self.cfg
        B, S, _ = h.shape
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        staging = self.ops.staging
        x = rms_norm(h, self.norms[2 * layer], cfg.rms_norm_eps, out=staging((B, S, cfg.hidden_size)))
        with self.ops.linear(layer, QKV, x) as r:
            q, k, v = (t.float() for t in r.tensors)
            # q (and k, when only new rows travel) feed the next call: rotate them straight into the ring
            q = apply_rope(q.view(B, S, H, hd).transpose(1, 2), cos, sin, out=staging((B, H, S, hd)))
            k_out = staging((B, Hkv, S, hd)) if self.kv_cache == "daemon" else None
            k = apply_rope(k.view(B, S, Hkv, hd).transpose(1, 2), cos, sin, out=k_out)  # [B, Hkv, S, hd]
            v = owned(v.view(B, S, Hkv, hd).transpose(1, 2).contiguous(), r.tensors[2])  # [B, Hkv, S, hd]
        attn = self._attention(layer, q, k, v, start, mask)                          # [B, S, H*hd]
        with self.ops.linear(layer, O, attn) as r:
            h = h + r.tensors[0].float()
        x = rms_norm(h, self.norms[2 * layer + 1], cfg.rms_norm_eps, out=staging((B, S, cfg.hidden_size)))
        with self.ops.linear(layer, GATE_UP, x) as r:
            gate, up = (t.float() for t in r.tensors)
            act = torch.mul(F.silu(gate), up, out=staging((B, S, cfg.intermediate_size)))  # [B, S, I]
        with self.ops.linear(layer, DOWN, act) as r:
            return h + r.tensors[0].float()

    def _attention(self, layer: int, q, k, v, start: int, mask) -> torch.Tensor:
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
            score_call = dict(transpose_b=True, layer=layer, cache=MATMUL_CACHE_K, pos=start)
            ctx_call = dict(transpose_b=False, layer=layer, cache=MATMUL_CACHE_V, pos=start)
        probs = None
        with self.ops.matmul(qg, keys, expect_cols=T, **score_call) as r:
            scores = r.tensors[0]                               # [B, Hkv, g*S, T]
            probs = self.ops.staging(scores.shape)              # written in place: no extra copy
            causal_softmax(scores.view(B, H, S, T), mask, self.scale, probs.view(B, H, S, T))
        with self.ops.matmul(probs, values, expect_cols=hd, **ctx_call) as r:
            attn = self.ops.staging((B, S, H * hd))             # o_proj's input, written once
            attn.view(B, S, H, hd).copy_(r.tensors[0].view(B, H, S, hd).transpose(1, 2))
            return attn
