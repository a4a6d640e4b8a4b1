"""shmrt/units.py: the one byte formatter (ring messages, bench tables, analyzer) and its parser."""
import pytest

from shmrt.units import format_bytes, format_bytes_alike, parse_bytes


@pytest.mark.parametrize("n,text", [(0, "0 B"), (100, "100 B"), (4096, "4 KiB"), (1 << 20, "1 MiB"),
                                    ((1 << 20) + 4096, "1028 KiB"),  # a header page more reads differently
                                    (1_000_000, "976.6 KiB"), (64 << 20, "64 MiB"),
                                    (24683640 << 10, "24105.1 MiB")])  # exact but long: rounded MiB
def test_format_bytes_is_exact_where_short_else_rounded(n, text):
    assert format_bytes(n) == text


def test_parse_bytes_reads_what_the_bench_flags_take():
    assert [parse_bytes(s) for s in ("4KiB", "1.5 MiB", "1GiB", "64", "10B")] == [4096, 3 << 19, 1 << 30, 64, 10]
    assert parse_bytes(format_bytes(10 << 20).replace(" ", "")) == 10 << 20
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_sizes_compared_in_one_message_share_the_finest_unit():
    assert format_bytes_alike(1 << 20, (1 << 20) + 4096) == ["1024 KiB", "1028 KiB"]
    assert format_bytes_alike(1 << 20, 64 << 20) == ["1 MiB", "64 MiB"]
    assert format_bytes_alike(100, 1 << 20) == ["100 B", "1048576 B"]
    assert format_bytes(1536, unit="KiB") == "1.5 KiB" and format_bytes(3 << 20, unit="KiB") == "3072 KiB"
