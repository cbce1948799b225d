"""Changed-block tracking groundwork: what LVM says changed, as repository block runs.

`ranges` turns changed ranges (in a thin pool's data blocks or a snapshot's COW chunks)
into a block map; `thin` parses thin_delta / thin_dump output; `cow` reads a classic
snapshot's exception store. Nothing here runs a command: lvm.py does that. Any doubt about
what the tools or the kernel reported is a ChangeTrackingError, on which the caller falls
back to reading the whole volume.
"""

from __future__ import annotations

from ..errors import LvbackupError


class ChangeTrackingError(LvbackupError):
    """LVM's record of changes cannot be trusted or read; scan the whole volume instead."""
