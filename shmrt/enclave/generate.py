"""Generation as a ladder of one-job functions: prefill -> decode one -> decode n -> generate.

Each rung can be timed alone; `generate` records the two phases in the perf log's sidecar.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .llama import EnclaveModel
from ..wire.native import now_ns


@dataclass
class Sampler:
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    _gen: torch.Generator | None = field(default=None, repr=False)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> token ids [B]."""
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self._gen).squeeze(-1)


def prefill(model: EnclaveModel, ids: torch.Tensor) -> torch.Tensor:
    """Run the prompt [B, S] from position 0; returns float32 logits of its last position [B, V]."""
    model.reset()
    return model.forward(ids, 0)


def decode_one(model: EnclaveModel, token: torch.Tensor) -> torch.Tensor:
    """Feed one token per sequence [B] at the next position; returns its logits [B, V]."""
    return model.forward(token.view(-1, 1), model.length)


def decode_n(model: EnclaveModel, logits: torch.Tensor, n: int, sampler: Sampler, progress=None,
             stop_id: int | None = None) -> list[torch.Tensor]:
    """Sample up to n tokens, each fed back through `decode_one` (the last one is not fed); stops after
    `stop_id` (end of sequence) when every sequence sampled it."""
    tokens = []
    for i in range(n):
        token = sampler(logits)
        tokens.append(token)
        if stop_id is not None and bool((token == stop_id).all()):
            break
        if i + 1 < n:
            logits = decode_one(model, token)
        if progress:
            progress(i + 1, n)
    return tokens


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]              # generated ids of sequence 0
    prefill_logits: torch.Tensor   # [B, V] float32
    prefill_s: float
    decode_s: float
    decode_steps: int


def generate(model: EnclaveModel, ids: torch.Tensor, max_new_tokens: int, sampler: Sampler,
             perflog=None, progress=None, stop_id: int | None = None) -> Generation:
    if perflog:
        perflog.phase = "prefill"
    t0 = now_ns()
    logits = prefill(model, ids)
    t1 = now_ns()
    if perflog:
        perflog.mark_phase("prefill", t0, t1, ids.shape[1])
        perflog.phase = "decode"
    tokens = decode_n(model, logits, max_new_tokens, sampler, progress, stop_id)
    t2 = now_ns()
    steps = max(len(tokens) - 1, 0) if len(tokens) < max_new_tokens else max(max_new_tokens - 1, 0)
    if perflog and max_new_tokens:
        perflog.mark_phase("decode", t1, t2, steps)
    return Generation(ids.shape[1], [int(t[0]) for t in tokens], logits, (t1 - t0) / 1e9, (t2 - t1) / 1e9, steps)
