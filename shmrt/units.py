"""Byte counts for people, in one place: the ring's error messages, the bench tables and the analyzer
all print sizes through here. Binary units throughout (v2.4's "MB" were MiB too). Plain Python: both
shmrt/wire/ and shmrt/tools/ import it, and it imports nothing of shmrt."""
from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
UNITS = (("MiB", MIB), ("KiB", KIB))  # printed up to MiB: the flags (--ring-mib, --max-kv-mib) take MiB


def format_bytes(n: int, places: int = 1, unit: str | None = None) -> str:
    """`n` bytes for a message or a table cell. Exact where that stays short: the largest unit in
    which `n` is a whole number below 10000 ("1 MiB", and "1028 KiB" for 1 MiB plus a 4 KiB page);
    else the largest unit it fills, with `places` decimals ("976.6 KiB", "24105.1 MiB").
    `unit` ("B", "KiB", "MiB") forces the unit; the number is still exact when whole."""
    n = int(n)
    if unit is None:
        unit = _unit_of(n)
    scale = dict(UNITS).get(unit, 1)
    return f"{n // scale} {unit}" if n % scale == 0 else f"{n / scale:.{places}f} {unit}"


def format_bytes_alike(*ns: int, places: int = 1) -> list[str]:
    """Sizes that one message compares ("X free but the ring needs Y"), all in one unit: the finest
    that any of them takes alone, so 1 MiB against 1 MiB + a page reads "1024 KiB" / "1028 KiB"."""
    order = [u for u, _ in UNITS] + ["B"]
    unit = max((_unit_of(int(n)) for n in ns), key=order.index)
    return [format_bytes(n, places, unit) for n in ns]


def _unit_of(n: int) -> str:
    for unit, scale in UNITS:
        if n >= scale and n % scale == 0 and n // scale < 10000:
            return unit
    for unit, scale in UNITS:
        if n >= scale:
            return unit
    return "B"


def parse_bytes(text: str) -> int:
    """The inverse for command lines: "4KiB", "1.5 MiB", "64" (bytes)."""
    text = text.strip()
    for unit, scale in (("GiB", GIB),) + UNITS + (("B", 1),):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def mib(n: int) -> float:
    """Bytes as a number of MiB, for tables whose column header names the unit."""
    return n / MIB
