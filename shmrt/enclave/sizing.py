"""Rings sized by the model itself: the enclave model runs once on `RecordingOps`, one layer deep (every
layer sends the same messages), whose replies are zeros of the shapes the daemon would send, and every
call's bytes each way are noted. The rings then hold the largest message of the run twice over, whatever
position in the lap it lands at. (Plain CPU tensors, not meta ones: torch's first meta op imports its
Python reference kernels, ~2 s per process; one layer's zeros cost milliseconds, or a few hundred for
the 1B shape at 1024 tokens, whose attention probabilities take 128 MiB for that moment.)

No formula to keep in step with the model: a new call, a fused call or a new cache placement is
measured the way it will run. Sizes come from the enclave's own config and its own prompt, never
from the host.
"""
from __future__ import annotations

import torch

from ..model.calls import MAX_SCORE_WIDTH_STEP, replied_projections
from ..model.checkpoint import EnclavePart
from ..wire.ring import align_up, alignment_for
from ..wire.scopes import OpenRequest, PendingRequest, Reply
from .llama import EnclaveModel

MIN_RING_BYTES = 1 << 20


class RecordingOps:
    """The ops interface answering zeros of the right shapes; `largest` = the most bytes one message took, each way."""

    def __init__(self, cfg, wire_dtype: torch.dtype):
        self.cfg = cfg
        self.wire_dtype = wire_dtype
        self.largest = {"request": 0, "reply": 0}
        self.calls = 0
        self._requests = OpenRequest(lambda shape, dtype: (torch.zeros(shape, dtype=dtype), None), wire_dtype)

    @staticmethod
    def _message_bytes(shapes_dtypes) -> int:
        """Bytes the ring gives a message: each tensor at its alignment, as the producer places it."""
        total = 0
        for shape, dtype in shapes_dtypes:
            n = dtype.itemsize
            for d in shape:
                n *= int(d)
            total = align_up(total, alignment_for(n)) + n
        return total

    def _note(self, inputs, outputs: list[tuple], as_staged: tuple = ()) -> Reply:
        """`as_staged`: inputs staged in a dtype of their own (RoPE tables: float32), which they travel in."""
        wire = lambda t: self.wire_dtype if t.is_floating_point() and all(t is not a for a in as_staged) else t.dtype  # noqa: E731
        self.calls += 1
        self._requests.sent()
        sent = self._message_bytes([(t.shape, wire(t)) for t in inputs if t is not None])  # None: cached on the daemon
        got = self._message_bytes(outputs)
        self.largest["request"] = max(self.largest["request"], sent)
        self.largest["reply"] = max(self.largest["reply"], got)
        return Reply([torch.zeros(shape, dtype=dtype) for shape, dtype in outputs], stats=None)

    def request(self) -> PendingRequest:
        return self._requests.open()

    def embedding(self, ids):
        return self._note([ids], [((*ids.shape, self.cfg.hidden_size), self.wire_dtype)])

    def linear(self, layer, names, x, keep_v_at=None):
        from ..model.config import projection_rows
        rows = projection_rows(self.cfg)
        return self._note([x], [((*x.shape[:-1], rows[n]), self.wire_dtype)
                                for n in replied_projections(names, keep_v_at is not None)])

    def matmul(self, a, b, *, transpose_b, expect_cols, layer=-1, cache=None, pos=0):
        return self._note([a, b], [((*a.shape[:-1], expect_cols), self.wire_dtype)])

    def attention_scores(self, layer, x, tables, *, pos, width=0):
        B, S, _ = x.shape
        cfg = self.cfg
        return self._note([x, tables], [((B, cfg.num_key_value_heads, cfg.groups * S, width or pos + S), self.wire_dtype)],
                          as_staged=(tables,))

    def attention_output(self, p, v, *, layer, cache=None, pos=0):
        S = p.shape[1] * p.shape[2] // self.cfg.num_attention_heads
        return self._note([p, v], [((p.shape[0], S, self.cfg.hidden_size), self.wire_dtype)])

    def lm_head(self, x):
        return self._note([x], [((x.shape[0], self.cfg.vocab_size), torch.float32)])


def ring_bytes_for(part: EnclavePart, prompt_tokens: int, total_tokens: int, wire_dtype: torch.dtype,
                   kv_cache: str, batch: int = 1, calls: str = "fewest") -> int:
    """Ring size per direction for a prefill of `prompt_tokens` and decode steps up to `total_tokens`."""
    cfg = part.cfg.with_layers(1)                           # every layer sends the same messages
    one_layer = EnclavePart(cfg, part.norms[:3], part.inv_freq, part.attention_scaling, part.digest)
    ops = RecordingOps(cfg, wire_dtype)
    model = EnclaveModel(one_layer, ops, kv_cache, calls, score_step=MAX_SCORE_WIDTH_STEP)  # the widest padding
    ids = torch.zeros((batch, prompt_tokens), dtype=torch.int64)
    model.forward(ids, 0)                                   # the prefill
    last = max(total_tokens - 1, prompt_tokens)
    if last > prompt_tokens:                                # the last decode step: the widest one
        model.length = last
        if kv_cache == "client":                            # a client-side cache holds every row so far
            model.k_cache = [torch.zeros((batch, cfg.num_key_value_heads, last, cfg.head_dim))]
            model.v_cache = list(model.k_cache)
        model.forward(torch.zeros((batch, 1), dtype=torch.int64), last)
    largest = max(ops.largest.values())
    return max(2 * (largest + 2 * alignment_for(largest)), MIN_RING_BYTES)
