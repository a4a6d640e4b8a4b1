"""The scopes that own views on a ring, on the client side: a request being built, a reply being read.

Zero copy means the enclave computes straight into the request ring and straight from the response
ring. A view on a ring is only as good as the space under it: the peer reuses that space as soon as
it is released. So a view lives exactly as long as the scope that owns it, and the scope enforces it:

    with ops.request() as req:                 # the inputs of the next call, built in place
        x = rms_norm(h, w, eps, out=req.alloc((B, S, D)))
        reply = ops.linear(layer, QKV, x)      # sending seals `req`: its buffers are stale now
    with reply:                                # the results, views on the response ring
        q = reply.view(0)                      # usable inside the block only
        v = reply.take(2)                      # an owned copy: may outlive the block

- A sealed request's buffer given to a later call raises `StaleView` (the transport checks every
  tensor that points into its request ring against the request being sent). On shm, messages that find
  their ring empty alternate between two offsets (ring.py), so the last call's buffers are never the next
  call's (but for a message too large for the half-way start: it starts where the one before it did); two calls on
  the same offsets come back, and a buffer kept that long aliases a buffer that call
  staged: then it is the parity tests (values against transformers) that catch it.
- After a reply is released, `view()`/`take()` raise `StaleView`; a view taken earlier and kept
  anyway reads poison in tests (`SHMRT_POISON=1`: the releasing side overwrites released ring
  space with 0xFF bytes, NaN as a float) until a message two calls on lands there, so a retained alias
  fails loudly instead of silently.
"""
from __future__ import annotations

import torch

from ..errors import StaleView
from .stats import CallStats


class Reply:
    """A call's result tensors: views on the transport's memory until released (`with` block)."""

    __slots__ = ("_tensors", "_stats", "text", "_release", "_released", "aliases_transport")

    def __init__(self, tensors: list[torch.Tensor], stats: CallStats | None, text: str = "", release=None):
        self._tensors = tensors
        self._stats = stats
        self.text = text
        self._release = release
        self._released = False
        self.aliases_transport = release is not None  # views on a ring: `take` must copy

    @property
    def stats(self) -> CallStats | None:
        """What the call cost (None for ops without a transport)."""
        return self._stats

    def __len__(self) -> int:
        return len(self._tensors)

    def view(self, i: int) -> torch.Tensor:
        """Result `i` as it lies in the transport's memory; valid until the reply is released."""
        if self._released:
            self._stale(f"result {i}")
        return self._tensors[i]

    def views(self) -> list[torch.Tensor]:
        """Every result, as `view(i)` gives it."""
        if self._released:
            self._stale("the results")
        return list(self._tensors)

    def _stale(self, what: str):
        raise StaleView(f"{what} of a {self.stats.method if self.stats else ''} reply read after its release: "
                        "keep results with reply.take(i) inside the with block")

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.views()

    def take(self, i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Result `i` as memory of our own (converted to `dtype`): may outlive the reply."""
        t = self.view(i)
        return t.to(dtype, copy=True) if self.aliases_transport else t.to(dtype)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._tensors = []
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> "Reply":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_unstaged(t: torch.Tensor, method: str, owns) -> None:
    """StaleView where `t`, which no open request staged, is a view on the transport's request memory (`owns(t)`)."""
    if t.numel() and owns(t):
        raise StaleView(f"{method} was given a view on the request ring that no open request staged "
                        "(a buffer of an earlier call): buffers from req.alloc feed only the call sent "
                        "inside that request's with block")


class PendingRequest:
    """Buffers for the inputs of the next call, in the transport's memory where it can (shm: the
    request ring). The call that sends them seals the request; a sealed request hands out nothing."""

    def __init__(self, alloc, owns, dtype: torch.dtype = torch.float32):
        self.dtype = dtype       # of `alloc` when none is named (the wire dtype)
        self._alloc = alloc      # (shape, dtype) -> (tensor, token the transport recognises at send)
        self._owns = owns        # tensor -> True if it points into the transport's request memory
        self.staged: dict[int, object] = {}  # data_ptr -> the transport's record of that buffer
        self.sealed = False

    def alloc(self, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.sealed:
            raise StaleView("request buffer asked for after its call was sent: open a new ops.request()")
        t, record = self._alloc(tuple(map(int, shape)), dtype or self.dtype)
        if t.numel():
            self.staged[t.data_ptr()] = record
        return t

    def claim(self, t: torch.Tensor, method: str):
        """The transport's record for `t` if this request staged it; None for memory of the caller's
        own (copied in at send); StaleView for a view on request memory this request did not stage."""
        record = self.staged.pop(t.data_ptr(), None) if t.numel() and not self.sealed else None
        if record is None:
            refuse_unstaged(t, method, self._owns)
        return record

    def seal(self) -> None:
        self.sealed = True
        self.staged.clear()

    def __enter__(self) -> "PendingRequest":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        unsent = not self.sealed and bool(self.staged)   # (seal() empties the dict)
        self.seal()
        assert exc_type is not None or not unsent, "a request was built but its call never sent"


class OpenRequest:
    """The next call's inputs for ops without a transport (the tests' reference ops, the ring sizing's dry run, the
    benches' stand-ins): `open()` makes the request (buffers from `alloc(shape, dtype)`, none of them the caller's
    to refuse), `sent()` seals it once its call is made, as a transport's call does."""

    def __init__(self, alloc, dtype: torch.dtype):
        self._alloc = alloc
        self.dtype = dtype
        self._pending: PendingRequest | None = None

    def open(self) -> PendingRequest:
        self._pending = PendingRequest(self._alloc, lambda t: False, self.dtype)
        return self._pending

    def sent(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.seal()

