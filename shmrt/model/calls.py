"""The model's calls as the wire carries them: each method's arguments packed into the doorbell's
`op` word. Only the enclave's ops layer and the daemon's handler translate between the two; the
model code speaks names (`cache="k"`, projection names) and the doorbell never knows what a LLaMA is.
"""
from __future__ import annotations

import functools

from ..errors import ProtocolError

# A layer's projections in checkpoint order: BatchLinear's op bits, one per projection, follow it.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ---- BatchLinear: which projections of the layer, one bit each in checkpoint order, and one bit more:
# v_proj's rows go into the daemon's V cache at the doorbell's `pos` instead of into the reply (a K/V cache on
# the daemon: the enclave does nothing to V, so V need not travel there and back; P*V then sends P alone)

KEEP_V = 1 << len(PROJECTIONS)


def projection_bits(names, keep_v: bool = False) -> int:
    bits = KEEP_V if keep_v else 0
    for name in names:
        bits |= 1 << PROJECTIONS.index(name)
    return bits


def projection_names(bits: int) -> list[str]:
    """The projections `bits` name (the KEEP_V bit aside)."""
    projections = bits & ~KEEP_V
    if projections <= 0 or projections >> len(PROJECTIONS):
        raise ProtocolError(f"BatchLinear op bits {bits:#x} name no known projection "
                            f"(expected a non-empty subset of {PROJECTIONS}, and KEEP_V {KEEP_V:#x})")
    return [name for i, name in enumerate(PROJECTIONS) if projections >> i & 1]


def replied_projections(names, keep_v: bool) -> list[str]:
    """The projections whose rows a BatchLinear reply carries: `names`, less v_proj where KEEP_V keeps its rows."""
    return [name for name in names if not (keep_v and name == "v_proj")]


def linear_args(bits: int) -> tuple[list[str], bool]:
    """op bits -> (projection names, keep_v); KEEP_V without v_proj is a ProtocolError."""
    names = projection_names(bits)
    keep_v = bool(bits & KEEP_V)
    if keep_v and "v_proj" not in names:
        raise ProtocolError(f"BatchLinear op bits {bits:#x} keep v_proj's rows but do not compute v_proj")
    return names, keep_v


# ---- Matmul: transpose b, and whether b holds new K or V rows for the daemon's cache

_TRANSPOSE_B = 0x01
_CACHE_BITS = {"k": 0x02, "v": 0x04}
_KNOWN = _TRANSPOSE_B | _CACHE_BITS["k"] | _CACHE_BITS["v"]


def matmul_bits(transpose_b: bool, cache: str | None) -> int:
    return (_TRANSPOSE_B if transpose_b else 0) | (_CACHE_BITS[cache] if cache else 0)


@functools.lru_cache(maxsize=16)   # a decode step asks the same two or three, call after call (bounded: bits are the peer's)
def matmul_args(bits: int) -> tuple[bool, str | None]:
    """op bits -> (transpose_b, cache); unknown or contradictory bits are a ProtocolError (never remembered)."""
    if bits & ~_KNOWN or (bits & _CACHE_BITS["k"] and bits & _CACHE_BITS["v"]):
        raise ProtocolError(f"Matmul op bits {bits:#x} not understood")
    cache = next((name for name, bit in _CACHE_BITS.items() if bits & bit), None)
    return bool(bits & _TRANSPOSE_B), cache


def call_label(method: str, bits: int) -> str:
    """A call as a reader of a log names it: BatchLinear with its projections ("BatchLinear q|k|v"), Matmul as
    "Matmul QK^T" or "Matmul P*V"; bits a log cannot explain leave the bare method name."""
    if type(bits) is not int:   # a log file's field: anything may be there
        return method
    try:
        if method == "BatchLinear":
            return "BatchLinear " + "|".join(name.removesuffix("_proj") for name in projection_names(bits))
        if method == "Matmul":
            return "Matmul QK^T" if matmul_args(bits)[0] else "Matmul P*V"
    except ProtocolError:
        pass
    return method


# ---- AttentionScores: `op` is the scores' width W, 0 for pos + S (every kept row, nothing more). A client may
# pad a decode step's width up to a multiple of the `score_width_step` the daemon names at Hello (a hint: only
# speed depends on it): Q*K^T and P*V then keep one shape for many steps, and a CUDA daemon replays them as
# graphs. Columns past pos + S are products with the cache's zero rows; the client's softmax leaves them out and
# its P for AttentionOutput is as wide, zeros past pos + S.

MAX_SCORE_WIDTH_STEP = 1024


def score_width_step(hint) -> int:
    """The Hello's `score_width_step` as the client uses it: a power of two up to MAX_SCORE_WIDTH_STEP, else 1 (no
    padding): the host's word decides how wide messages are, never what they mean."""
    if type(hint) is int and 1 <= hint <= MAX_SCORE_WIDTH_STEP and not hint & (hint - 1):
        return hint
    return 1


def padded_width(length: int, step: int) -> int:
    """`length` rounded up to a multiple of `step`."""
    return -(-length // step) * step
