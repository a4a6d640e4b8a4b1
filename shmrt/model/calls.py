"""The model's calls as the wire carries them: each method's arguments packed into the doorbell's
`op` word. Only the enclave's ops layer and the daemon's handler translate between the two; the
model code speaks names (`cache="k"`, projection names) and the doorbell never knows what a LLaMA is.
"""
from __future__ import annotations

from ..errors import ProtocolError

# A layer's projections in checkpoint order: BatchLinear's op bits, one per projection, follow it.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ---- BatchLinear: which projections of the layer, one bit each in checkpoint order


def projection_bits(names) -> int:
    bits = 0
    for name in names:
        bits |= 1 << PROJECTIONS.index(name)
    return bits


def projection_names(bits: int) -> list[str]:
    if bits <= 0 or bits >> len(PROJECTIONS):
        raise ProtocolError(f"BatchLinear op bits {bits:#x} name no known projection "
                            f"(expected a non-empty subset of {PROJECTIONS})")
    return [name for i, name in enumerate(PROJECTIONS) if bits >> i & 1]


# ---- Matmul: transpose b, and whether b holds new K or V rows for the daemon's cache

_TRANSPOSE_B = 0x01
_CACHE_BITS = {"k": 0x02, "v": 0x04}
_KNOWN = _TRANSPOSE_B | _CACHE_BITS["k"] | _CACHE_BITS["v"]


def matmul_bits(transpose_b: bool, cache: str | None) -> int:
    return (_TRANSPOSE_B if transpose_b else 0) | (_CACHE_BITS[cache] if cache else 0)


def matmul_args(bits: int) -> tuple[bool, str | None]:
    """op bits -> (transpose_b, cache); unknown or contradictory bits are a ProtocolError."""
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
