from __future__ import annotations

import pytest

from bsfinder.units import format_bytes, format_duration, format_rate, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5G", int(1.5 * 2**30)),
        ("80GB", 80 * 10**9),
        ("100 kB", 100_000),
        ("4096", 4096),
        ("2t", 2 * 2**40),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "12 parsecs", "0"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_formatting() -> None:
    assert format_bytes(1010 * 2**20) == "1010 MiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(None) == "-"
    assert format_duration(0.0123) == "12.3 ms"
    assert format_duration(200) == "3 min 20 s"
    assert format_rate(1234.5) == "1.23k samples/s"
