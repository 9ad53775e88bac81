"""Parse and format quantities with units: bytes and durations.

Data keeps raw units (bytes, seconds); humanising happens only when rendering.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_bytes", "format_duration", "format_rate", "parse_bytes", "parse_duration"]

#: sizes from 2**63 bytes up overflow the signed 64-bit counts of setrlimit and torch
MAX_BYTES = 2**63

_BINARY = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """Parse a memory size such as ``24GiB``, ``512MiB``, ``1.5G`` or ``80GB`` into bytes.

    ``KiB/MiB/GiB/TiB`` and bare ``K/M/G/T`` are binary (powers of 1024), as GPU memory is
    quoted; ``kB/MB/GB/TB`` are decimal. A bare number is bytes.

    Raises:
        ValueError: the text is not a positive size, or is 2**63 bytes or more.

    Example:
        >>> parse_bytes("24GiB")
        25769803776
    """
    match = _BYTES_RE.match(text)
    if match is None:
        raise ValueError(f"not a memory size: {text!r} (expected e.g. 24GiB, 512MiB, 80GB)")
    number, prefix, binary, suffix_b = match.groups()
    prefix = prefix.lower()
    decimal = prefix and suffix_b and not binary  # "GB" is 10**9; "GiB" and "G" are 2**30
    scale = _DECIMAL[prefix] if decimal else _BINARY[prefix]
    value = float(number) * scale
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"memory size must be at least 1 byte: {text!r}")
    if value >= MAX_BYTES:
        raise ValueError(
            f"memory size {text!r} is 8 EiB (2**63 bytes) or more: more than any machine "
            "holds, and more than a memory limit can express"
        )
    return int(value)


_DURATION = re.compile(r"^\s*(?P<n>\d+(\.\d*)?|\.\d+)\s*(?P<unit>ms|s|sec|min|m|h)?\s*$", re.I)
_SECONDS = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse ``"90"``, ``"90s"``, ``"2.5min"``, ``"5m"`` or ``"1h"`` into seconds (> 0).

    Raises:
        ValueError: not a duration, or not positive.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (use e.g. 90s, 5m, 1h)")
    seconds = float(match["n"]) * _SECONDS[(match["unit"] or "s").lower()]
    if not seconds > 0:
        raise ValueError(f"{text!r}: a duration must be more than 0")
    return seconds


def format_bytes(n: int | float | None) -> str:
    """Format bytes with a binary unit and 3-4 significant digits.

    Example:
        >>> format_bytes(3 * 2**30), format_bytes(1010 * 2**20)
        ('3.00 GiB', '1010 MiB')
    """
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{value:.0f} B"
            digits = 2 if value < 10 else 1 if value < 100 else 0
            return f"{sign}{value:.{digits}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """Format seconds as ``850 us``, ``12.3 ms``, ``4.56 s`` or ``3 min 12 s``."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    minutes, rest = divmod(seconds, 60)
    return f"{minutes:.0f} min {rest:.0f} s"


def format_rate(per_s: float | None, unit: str = "samples/s") -> str:
    """Format a throughput: ``format_rate(1234.5) == '1.23k samples/s'``."""
    if per_s is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if per_s >= scale:
            return f"{per_s / scale:.3g}{prefix} {unit}"
    return f"{per_s:.3g} {unit}"
