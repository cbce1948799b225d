"""Backup labels (KEY=VALUE): what a valid one is, and parsing them from arguments."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .errors import UsageError

LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
LABEL_VALUE_MAX = 255


def check_label(key: Any, value: Any, what: str = "label") -> tuple[str, str]:
    """A validated (key, value) pair; UsageError naming `what` otherwise."""
    if not isinstance(key, str) or not LABEL_KEY.match(key):
        raise UsageError(f"{what}: invalid label key {key!r}: use letters, digits and _ . - "
                         "(starting with a letter or digit), at most 63 characters")
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise UsageError(f"{what}: the value of label {key!r} must be a string "
                         "(quote it in YAML)")
    value = str(value)
    if len(value) > LABEL_VALUE_MAX or any(c in value for c in "\n\r\0"):
        raise UsageError(f"{what}: the value of label {key!r} must be one line of at most "
                         f"{LABEL_VALUE_MAX} characters")
    return key, value


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` arguments (as given to --label) as a dict; UsageError if malformed."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--label {item!r}: expected KEY=VALUE")
        key, value = check_label(key, value, f"--label {item!r}")
        labels[key] = value
    return labels
