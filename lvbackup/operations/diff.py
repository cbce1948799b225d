"""`diff`: the block ranges that differ between two backups of a volume, from their
manifests alone (no chunk is read): for replication scripts and audits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..base.errors import UsageError
from ..catalog.catalog import require_available
from ..repository.manifest import Entries, Manifest
from ..session import Session, recover_dead_runs

_BATCH = 4096   # entries compared at a time


def diff_backups(session: Session, backup_id: str, other_id: str | None = None
                 ) -> dict[str, Any]:
    """The ranges where `backup_id` differs from `other_id` (default: its parent). Each
    range is {offset, length, change}: `changed` (different data), `zeroed` (a hole now),
    `grown` (past the other's end) or `shrunk` (past this one's end)."""
    recover_dead_runs(session)
    cat = session.catalog
    new = cat.resolve(backup_id)
    if other_id is None:
        if not new["parent_id"]:
            raise UsageError(f"backup {new['id']} is a full backup: give another backup of "
                             "the same volume to compare it with")
        old = cat.get(new["parent_id"])
    else:
        old = cat.resolve(other_id)
    if old["volume_id"] != new["volume_id"]:
        raise UsageError(f"backups {new['id']} and {old['id']} are of different volumes")
    for row in (new, old):
        require_available(row)
    repo = session.repo
    repo.sync_index(session.lock_dir)
    a, b = repo.manifest(old["id"]), repo.manifest(new["id"])
    ranges = list(_ranges(a, b))
    return {"backup_id": new["id"], "other_id": old["id"], "block_size": b.block_size,
            "size": b.size, "other_size": a.size,
            "differing_bytes": sum(r["length"] for r in ranges), "ranges": ranges}


def _kinds(a: Manifest, b: Manifest) -> Iterator[str | None]:
    """Per block of the longer backup, how `b` differs from `a` there (None: the same)."""
    ea, eb = a.entries(_BATCH), b.entries(_BATCH)
    empty = Entries(b"")
    while True:
        x, y = next(ea, empty), next(eb, empty)
        if not len(x) and not len(y):
            return
        for i in range(max(len(x), len(y))):
            if i >= len(x):
                yield "grown"
            elif i >= len(y):
                yield "shrunk"
            elif x.entry(i) == y.entry(i):
                yield None
            else:
                yield "zeroed" if y.is_hole(i) else "changed"


def _ranges(a: Manifest, b: Manifest) -> Iterator[dict[str, Any]]:
    bs = b.block_size
    end = max(a.size, b.size)
    start, kind = 0, None
    for block, k in enumerate(_kinds(a, b)):
        if k != kind:
            if kind is not None:
                yield {"offset": start * bs, "length": block * bs - start * bs, "change": kind}
            start, kind = block, k
    if kind is not None:
        yield {"offset": start * bs, "length": end - start * bs, "change": kind}
