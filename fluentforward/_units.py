"""Parsing of sizes, durations and points in time given on the command line or in env vars.

Each parser raises ``ConfigError`` naming the option, so the CLI can print one line and exit 2.
"""

from __future__ import annotations

import datetime as dt
import re

from fluentforward.errors import ConfigError

__all__ = ["parse_duration", "parse_size", "parse_time_ns"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str | int, *, option: str) -> int:
    """Parse ``1048576``, ``64MiB``, ``8GiB``, ``10MB`` into bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"{option}: expected a size like 64MiB or 1048576, got {text!r}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").lower()])


def parse_duration(text: str | float, *, option: str) -> float:
    """Parse ``30``, ``30s``, ``250ms``, ``5m``, ``1h``, ``7d`` into seconds."""
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"{option}: expected a duration like 30s, 5m or 1h, got {text!r}")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[(unit or "").lower()]


def parse_time_ns(text: str, *, option: str, now_ns: int) -> int:
    """Parse a point in time into Unix nanoseconds.

    Accepted: RFC 3339 (``2026-11-26T10:00:00Z``, offsets allowed, naive means UTC), Unix seconds
    (``1795680245`` or ``1795680245.5``), or a duration meaning that long before now (``15m``, ``2h``).
    """
    value = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value) and float(value) > 10**8:
        return int(float(value) * 1_000_000_000)
    if _DURATION.match(value) and not value.replace(".", "").isdigit():
        return now_ns - int(parse_duration(value, option=option) * 1_000_000_000)
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"{option}: expected RFC 3339 time, Unix seconds or a duration ago (15m), got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000
