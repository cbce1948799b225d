"""Storage backends, chosen by the repository location: a path or `file://PATH` is a local
directory, `mem://NAME` a store in memory (tests), `s3://BUCKET/PREFIX` an S3-compatible
object store (reached as the configuration's `s3:` section says). Another backend is one
more entry in _SCHEMES."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ...base.errors import UsageError
from ...config import S3Settings
from .base import Backend, Capabilities, Conflict, MissingObject, ObjectExists, ReadOnly
from .local import LocalBackend
from .memory import MemoryBackend

__all__ = ["Backend", "Capabilities", "Conflict", "LocalBackend", "MemoryBackend",
           "MissingObject", "ObjectExists", "ReadOnly", "credential_source", "open_backend"]


def _s3_module() -> ModuleType:
    """The S3 backend's module, imported only when used (boto3 takes a while to import,
    and is an extra: lvbackup[s3])."""
    try:
        from . import s3
    except ModuleNotFoundError as e:
        if e.name not in ("boto3", "botocore"):
            raise
        raise UsageError("an s3:// repository needs boto3, which is not installed: "
                         "pip install 'lvbackup[s3]'") from None
    return s3


def _s3(rest: str, create: bool, s3: S3Settings) -> Backend:
    backend: Backend = _s3_module().S3Backend.open(rest, create, s3)
    return backend


# scheme -> opener(the location without "scheme://", create, the s3: settings)
_SCHEMES: dict[str, Callable[[str, bool, S3Settings], Backend]] = {
    "file": lambda rest, create, s3: LocalBackend.open(Path(rest), create),
    "mem": lambda rest, create, s3: MemoryBackend(rest),
    "s3": _s3,
}
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)", re.DOTALL)


def _scheme(location: str | Path) -> tuple[str, str] | None:
    match = None if isinstance(location, Path) else _SCHEME.fullmatch(location)
    return None if match is None else (match[1].lower(), match[2])


def open_backend(location: str | Path, create: bool = False,
                 s3: S3Settings | None = None) -> Backend:
    """The backend for `location`; with `create`, make it (a local directory) and check
    that it can be written to."""
    found = _scheme(location)
    settings = s3 or S3Settings()
    if settings.as_of is not None and (found is None or found[0] != "s3"):
        raise UsageError(f"--as-of needs a repository in a versioned S3 bucket; {location} "
                         "keeps no past versions")
    if found is None:
        return LocalBackend.open(Path(location), create)
    scheme, rest = found
    opener = _SCHEMES.get(scheme)
    if opener is None:
        raise UsageError(f"repository location {location}: unknown scheme {scheme!r}; "
                         f"known: {', '.join(sorted(_SCHEMES))}, or a plain path")
    return opener(rest, create, settings)


def credential_source(location: str | Path, s3: S3Settings) -> str:
    """Where the repository's credentials come from, for `config check`."""
    found = _scheme(location)
    if found is None or found[0] != "s3":
        return "none needed (the repository is not in object storage)"
    source: str = _s3_module().credential_source(s3)
    return source
