"""Generation as a ladder of one-job functions: prefill -> decode one -> decode n -> generate.

Each rung can be timed alone; `generate` times the two phases (prefill, decode) and tells an observer
where each begins and ends (the perf log's sidecar, the bench), knowing nothing of who listens.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy
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
            return greedy(logits)
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        # In float64 (a temperature below float32's smallest number is not 0 there) and the largest logit taken out
        # first: divided by a tiny temperature the rest go to -inf, never to inf - inf
        logits = logits.double()
        probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self._gen).squeeze(-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest logit (torch.argmax's answer, ties included), through numpy: torch's CPU
    argmax walks a row one element at a time (305 us for Llama 3's 128256 logits, one thread; 0.33 ms of a 15 ms
    token on an H200 host), numpy's is vectorized (12 us). The logits are finite: forward checked them."""
    values = logits.detach().cpu()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()   # numpy has no bfloat16; float16 and bfloat16 are exact in float32
    return torch.from_numpy(numpy.asarray(values.numpy().argmax(axis=-1)))


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


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """torch's intra-op threads set to `n` inside the block (None: unchanged). A decode step's ops are a few
    thousand elements each: on a many-core host, waking a pool of sleeping threads for each of them
    (OMP_WAIT_POLICY=PASSIVE, settings.py) costs more than the arithmetic."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@dataclass(frozen=True)
class Phase:
    """One timed span of `generate`: prefill (tokens = prompt length) or decode (tokens = steps)."""
    name: str
    start_ns: int
    end_ns: int
    tokens: int


# on_phase(name, start_ns, end_ns, tokens): called as a phase begins (end_ns None, tokens 0), so an
# observer can label the calls made inside it, and as it ends. PerfLog.on_phase is one.
PhaseObserver = Callable[[str, int, "int | None", int], None]


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]              # generated ids of sequence 0
    prefill_logits: torch.Tensor   # [B, V] float32
    prefill_s: float
    decode_s: float
    decode_steps: int
    phases: list[Phase] = field(default_factory=list)  # prefill, then decode if any token was asked for


def generate(model: EnclaveModel, ids: torch.Tensor, max_new_tokens: int, sampler: Sampler,
             on_phase: PhaseObserver | None = None, progress=None, stop_id: int | None = None,
             decode_threads: int | None = None) -> Generation:
    """Prefill `ids` [B, S], then sample up to `max_new_tokens` (`decode_n`, with `decode_threads` intra-op
    threads; None: as prefill), timing both phases and telling `on_phase` where each begins and ends (an
    object with an `on_phase` method, such as the PerfLog that callers passed here before, stands for that
    method)."""
    notify = getattr(on_phase, "on_phase", on_phase) or (lambda *_: None)
    t0 = now_ns()
    notify("prefill", t0, None, 0)
    logits = prefill(model, ids)
    t1 = now_ns()
    phases = [Phase("prefill", t0, t1, ids.shape[1])]
    notify("prefill", t0, t1, ids.shape[1])
    tokens = []
    if max_new_tokens:
        notify("decode", t1, None, 0)
        with intra_op_threads(decode_threads):
            tokens = decode_n(model, logits, max_new_tokens, sampler, progress, stop_id)
    t2 = now_ns()
    steps = max(len(tokens) - 1, 0) if len(tokens) < max_new_tokens else max(max_new_tokens - 1, 0)
    if max_new_tokens:
        phases.append(Phase("decode", t1, t2, steps))
        notify("decode", t1, t2, steps)
    return Generation(ids.shape[1], [int(t[0]) for t in tokens], logits, (t1 - t0) / 1e9, (t2 - t1) / 1e9, steps,
                      phases)
