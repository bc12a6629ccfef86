"""Byte sizes: parse "5GB", "512MiB", "1e9" and print them back. Decimal units are powers of 1000,
binary (KiB, MiB...) powers of 1024, as in huggingface_hub's `max_shard_size`."""
from __future__ import annotations

import math
import re

from .errors import OptionsError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
}
# Sizes go into file offsets (off_t); anything past 2**63 - 1 bytes is a typo, not a size.
MAX_SIZE_BYTES = 2**63 - 1
# Text without a unit is bytes; below this it is a forgotten unit ("--max-shard-size 2" meaning 2GB would
# write one file per tensor), so it is refused. A tiny size is still possible with an explicit "B".
MIN_UNITLESS_BYTES = 10**6
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value, *, option: str = "size") -> int:
    """Bytes for an int or a string like "5GB" / "16MiB" / "1e9" (text without a unit is bytes, at least 1 MB)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value > MAX_SIZE_BYTES:
            raise OptionsError(f"{option} {value!r} is too large: the most is {MAX_SIZE_BYTES:,} bytes (8 EiB)")
        n = value
    else:
        m = _PATTERN.match(str(value))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise OptionsError(
                f"{option} {value!r} is not a size; write a number with an optional unit: "
                "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 5GB or 16MiB")
        exact = float(m.group(1)) * _UNITS[unit]
        # "1e400" is inf as a float: refuse it (and anything past off_t) here, not as an OverflowError in int().
        if not math.isfinite(exact) or exact > MAX_SIZE_BYTES:
            raise OptionsError(f"{option} {value!r} is too large: the most is {MAX_SIZE_BYTES:,} bytes (8 EiB)")
        n = int(exact)
        if not unit and 0 < n < MIN_UNITLESS_BYTES:
            raise OptionsError(
                f"{option} {value!r} has no unit, so it would be {n:,} bytes; write the unit, e.g. "
                f"{m.group(1)}GB, {m.group(1)}MiB, or {m.group(1)}B if you do mean bytes")
    if n <= 0:
        raise OptionsError(f"{option} must be positive, got {value!r}")
    return n


def format_size(n_bytes: float) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    n = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
