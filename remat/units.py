"""Sizes at the edges: "16GB" = 16e9 bytes, "16GiB" = 16 * 2**30 bytes, "75%" of a reference."""

from __future__ import annotations

import math
import re
from decimal import Decimal

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e\+?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def is_share(text: str | int | float | None) -> bool:
    """A size given as a share of a reference ("75%"), which parse_size reads against `reference_bytes`."""
    return isinstance(text, str) and text.strip().endswith("%")


def parse_size(text: str | int | float, reference_bytes: int | None = None) -> int:
    """Bytes in `text`: "16GB", "16 GiB", "1.5e9", "512MiB", or "75%" of `reference_bytes`."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text <= 0:
            raise ValueError(f"size must be a positive number, got {text!r}")
        if text < 1:  # budget=0.6 was 0 bytes: most likely a share meant as "60%"
            raise ValueError(f"{text!r} is less than a byte: a number is bytes; write \"60%\" for a share of the "
                             "store-all peak, or a size such as \"16GB\"")
        return int(text)
    raw = str(text).strip()
    if is_share(raw):
        if reference_bytes is None:
            raise ValueError(f"a percentage ({raw}) needs a reference size here")
        try:
            percent = float(raw[:-1])
        except ValueError:
            raise ValueError(f"not a percentage: {raw!r}") from None
        if not math.isfinite(percent) or percent <= 0:
            raise ValueError(f"percentage must be a positive number, got {raw!r}")
        share = int(reference_bytes * Decimal(raw[:-1]) / 100)  # exact: 32.3% of 1000 bytes is 323, not 322
        if share < 1:
            raise ValueError(f"{raw} of {reference_bytes} bytes is less than a byte")
        return share
    match = _SIZE.match(raw)
    if not match and raw.startswith("-"):
        raise ValueError(f"size must be positive, got {raw!r}")
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {raw!r}: use a number with a unit such as 16GB, 16GiB or 512MiB")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"size {raw!r} is too large")
    if value <= 0:
        raise ValueError(f"size must be positive, got {raw!r}")
    if value < 1:  # "0.6" rounds to 0 bytes: most likely a share meant as 60%
        raise ValueError(f"{raw!r} is less than a byte: a number without a unit is bytes; write 60% for a share "
                         "of the store-all peak, or a size such as 16GB")
    # the decimal digits as written: float("2.01") * 10**9 is 2009999999.9999998, one byte short of 2.01GB
    exact = int(Decimal(match.group(1)) * _UNITS[match.group(2).lower()])
    if exact < 1:  # "0.99999999999999999" is 1.0 as a float
        raise ValueError(f"{raw!r} is less than a byte: write a size such as 16GB")
    return exact


def format_bytes(num_bytes: int | float) -> str:
    """Decimal units, as GPU marketing and `--budget 16GB` use them."""
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(round(value, 0 if unit == "B" else 2)) < 1000:  # as printed: 999,999 bytes are 1.00 MB, not 1000.00 KB
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} TB"


def format_share_above(part_bytes: int, whole_bytes: int) -> str:
    """The share of `whole_bytes` that `part_bytes` is, rounded up to a tenth of a percent ("97.4%"), so that a budget
    of that share is not below the part: rounded to the nearest percent, fixed memory of 97.33% of the store-all peak
    read "97%", in the error that had just refused a budget of "97%" as below fixed memory."""
    tenths = -(-part_bytes * 1000 // whole_bytes)  # ceil(part / whole * 1000), exact in integers
    return f"{tenths // 10}.{tenths % 10}%" if tenths % 10 else f"{tenths // 10}%"


def format_seconds(seconds: float) -> str:
    if round(seconds * 1e6, 1) < 1000:
        return f"{seconds * 1e6:.1f} us"
    if round(seconds * 1e3, 2) < 1000:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"
