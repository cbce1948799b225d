"""What a backup reads: a readable device path plus its identity and data timestamp.

Every kind of source (an image file or block device here, an LVM volume or snapshot in
lvm.py's callers) reduces to a `Source`; the engine needs nothing else.
"""

from __future__ import annotations

import os
import stat
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .errors import UsageError

# Fixed namespace so that the same path always maps to the same volume id.
_DEVICE_NAMESPACE = uuid.UUID("5b0f9d3e-6c55-4b8e-9a8e-2f6f3f1c7d10")


@dataclass(frozen=True)
class Source:
    path: str                      # what to read
    volume_id: str
    volume_name: str
    snapshot_id: str | None = None
    snapshot_name: str | None = None
    snapshot_time: str | None = None   # the snapshot's creation time (its data timestamp)


def check_readable(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"device {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot access device {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"{path} is neither a block device nor a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read device {path}: permission denied (run as root?)")
    return st


@contextmanager
def device_source(path: str) -> Iterator[Source]:
    """Any block device or image file; its volume id is derived from its resolved path."""
    resolved = os.path.realpath(path)
    check_readable(resolved)
    yield Source(path=resolved,
                 volume_id=str(uuid.uuid5(_DEVICE_NAMESPACE, resolved)),
                 volume_name=resolved)
