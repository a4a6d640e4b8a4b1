"""RoPE's arithmetic, and the layout its tables travel in.

The enclave computes the tables of a forward from its own copy of the model (`enclave/llama.rope_tables`):
where RoPE is applied is a choice of call set. In the `fewest` call set the enclave sends them with the
projection's input and the daemon rotates q and k on its device (`AttentionScores`): the tables are the
enclave's, the daemon does arithmetic with them, as with every product it computes (RoPE is a rotation: linear,
like the rest of the daemon's work). Both sides apply them with `apply_rope`.

Wire layout of one forward's tables (`ROPE_TABLES` rows, float32 whatever the wire dtype: rounding a
rotation to bfloat16 would rotate by a slightly different angle):

    tables [4, S, hd]    rows: cos_q, sin_q, cos_k, sin_k; each [S, hd] is [S, 2, hd/2] flattened: a head's
                         two halves side by side, sin's first half negated (rotate_half's sign), q's rows
                         scaled by the attention scale 1/sqrt(hd) (so Q*K^T arrives scaled)
"""
from __future__ import annotations

import torch

ROPE_TABLES = 4   # cos_q, sin_q, cos_k, sin_k


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, S, hd] -> x*cos + rotate_half(x)*sin in float32 (cos, sin: [S, 2, hd/2], or [S, hd] of the wire
    layout); written into `out` when given: in place if it is float32, else rounded once into it."""
    halves = x.unflatten(-1, (2, -1))                          # [B, H, S, 2, hd/2]
    cos, sin = cos.view(-1, 2, halves.shape[-1]), sin.view(-1, 2, halves.shape[-1])
    direct = out is not None and out.dtype == torch.float32
    y = torch.mul(halves, cos, out=out.unflatten(-1, (2, -1)) if direct else None)
    y.addcmul_(halves.flip(-2), sin)                           # the halves swapped: rotate_half
    if direct:
        return out
    return y.flatten(-2) if out is None else out.copy_(y.flatten(-2))
