"""UTC timestamps, stored and printed as fixed-width ISO 8601 strings (so they sort as text)."""

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """'2026-11-24T17:04:35.000000+00:00': always microseconds, always UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def now_iso() -> str:
    return iso(utcnow())


def parse_iso(text: str) -> datetime:
    ts = datetime.fromisoformat(text)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in '90', '30s', '10m', '2h', '1d' or '1.5h'; ValueError if it is not one
    (or not positive)."""
    t = text.strip().lower()
    unit = t[-1:] if t[-1:].isalpha() else ""
    if unit not in _DURATION_UNITS:
        raise ValueError(text)
    seconds = float(t[: len(t) - len(unit)]) * _DURATION_UNITS[unit]
    if not 0 < seconds < float("inf"):
        raise ValueError(text)
    return seconds
