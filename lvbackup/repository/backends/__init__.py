"""Storage backends, chosen by the repository location: a path or `file://PATH` is a local
directory, `mem://NAME` a store in memory (tests). Another backend (say `s3://`) is one
more entry in _SCHEMES."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ...errors import UsageError
from .base import Backend, Capabilities, MissingObject, ObjectExists
from .local import LocalBackend
from .memory import MemoryBackend

__all__ = ["Backend", "Capabilities", "LocalBackend", "MemoryBackend", "MissingObject",
           "ObjectExists", "open_backend"]

# scheme -> opener(the location without "scheme://", create)
_SCHEMES: dict[str, Callable[[str, bool], Backend]] = {
    "file": lambda rest, create: LocalBackend.open(Path(rest), create),
    "mem": lambda rest, create: MemoryBackend(rest),
}
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)", re.DOTALL)


def open_backend(location: str | Path, create: bool = False) -> Backend:
    """The backend for `location`; with `create`, make it (a local directory) and check
    that it can be written to."""
    match = None if isinstance(location, Path) else _SCHEME.fullmatch(location)
    if match is None:
        return LocalBackend.open(Path(location), create)
    scheme, rest = match[1].lower(), match[2]
    opener = _SCHEMES.get(scheme)
    if opener is None:
        raise UsageError(f"repository location {location}: unknown scheme {scheme!r}; "
                         f"known: {', '.join(sorted(_SCHEMES))}, or a plain path")
    return opener(rest, create)
