"""Parsing bytes a peer (or the host) chose: JSON and msgpack with size and depth limits.

Every JSON text and msgpack message that crosses the trust boundary goes through `load_json` or
`load_msgpack`, and every failure of either is a `ProtocolError` (never a RecursionError,
OverflowError, UnicodeDecodeError or MemoryError). The order matters:

  1. size is capped before anything is parsed (a 100 MB text costs a length check, not a parse);
  2. JSON nesting is measured *before* `json.loads`, with a linear scan that needs no recursion,
     because the stdlib decoder recurses once per level and dies in RecursionError near 1,000;
     msgpack's C unpacker has its own fixed stack (1,024 levels, StackError), so its result is
     measured after parsing, again without recursion;
  3. values a Python parser would happily build but nothing in shmrt accepts are refused at the
     parse: NaN and +-Infinity (also `1e999`, which float() turns into inf), msgpack ext types.

What a value means (types, ranges, which keys) is checked by the caller; here only that it is
plain data of bounded size and depth.
"""
from __future__ import annotations

import json
import math
import re

import msgpack

from ..errors import ProtocolError, printable

MAX_DEPTH = 32          # deepest nesting any shmrt message or config uses is 3
MAX_JSON_CHARS = 1 << 20

# A JSON string token (as json's scanner lexes it) or one bracket. Strings are skipped whole so that
# brackets inside them do not count; DOTALL so that an escaped newline cannot end the token early.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def json_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, without parsing it (no recursion, linear time).
    Stops early past MAX_DEPTH * 4: the caller only needs to know it is too deep."""
    depth = deepest = 0
    for m in _JSON_TOKEN.finditer(text):
        ch = m.group()[0]
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH * 4:
                    break
        elif ch in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number shmrt accepts")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {printable(text, 40)} is out of the float range")
    return value


def load_json(text, what: str, *, max_chars: int = MAX_JSON_CHARS, max_depth: int = MAX_DEPTH):
    """Parse untrusted JSON text into plain data; ProtocolError naming `what` on anything else."""
    if not isinstance(text, str):
        raise ProtocolError(f"{what} must be a JSON string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ProtocolError(f"{what} is {len(text)} characters, more than the {max_chars} allowed")
    depth = json_depth(text)
    if depth > max_depth:
        raise ProtocolError(f"{what} nests {'more than ' if depth > max_depth * 4 else ''}"
                            f"{min(depth, max_depth * 4)} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digits limit, our refusals
        raise ProtocolError(f"{what} is not valid JSON: {printable(str(exc), 120)}") from None


def check_depth(obj, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Refuse containers nested deeper than `max_depth` (iterative: safe on any depth)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth > max_depth:
                raise ProtocolError(f"{what} nests more than {max_depth} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (list, tuple, dict)))


def load_msgpack(payload: bytes, what: str, *, max_bytes: int, max_depth: int = MAX_DEPTH):
    """Unpack an untrusted msgpack message into plain data (str keys, no ext types, bounded depth)."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what} is {len(payload)} bytes, more than the {max_bytes} allowed")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:  # StackError, ExtraData, FormatError, UnicodeDecodeError, ...
        detail = printable(str(exc), 120) or type(exc).__name__
        raise ProtocolError(f"{what} is not valid msgpack: {detail}") from None
    check_depth(obj, what, max_depth)
    return obj
