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
