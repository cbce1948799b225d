"""Repository and catalog upkeep: `init`, `gc`, `catalog rebuild`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..catalog import (
    Catalog,
    as_record,
)
from ..config import Config
from ..errors import CorruptionError, LvbackupError
from ..lifecycle import Status
from ..mapping.registry import refuse_if_mapped, registry
from ..repository import gc
from ..repository.repo import Repository
from ..session import Session, recover_dead_runs
from ..timeutil import now_iso


def init_repository(config: Config, block_size: int | None) -> dict:
    """Create the repository and the catalog if they do not exist (idempotent)."""
    repo, created = Repository.init(config.repository, config.cache_dir, block_size)
    try:
        Catalog(config.catalog).close()
    finally:
        repo.close()
    return {"repository": str(config.repository), "catalog": str(config.catalog),
            "repository_id": repo.id, "block_size": repo.block_size, "created": created}


def rebuild_catalog(config: Config, wait: float = 0.0) -> dict:
    """Recreate the catalog from the manifests in the repository.

    Rows for manifests are restored as `available`; rows whose manifest is gone are kept
    but no longer claim to be restorable. A catalog that SQLite cannot read is moved
    aside (…corrupt-<time>) first.
    """
    session = Session(config, wait)
    try:
        with session.exclusive_lock():
            repo = session.repo
            moved = None
            try:
                cat = session.catalog
                cat.count()
            except LvbackupError:
                moved = config.catalog.with_name(
                    f"{config.catalog.name}.corrupt-{now_iso().replace(':', '')}")
                for suffix in ("", "-wal", "-shm"):
                    src = Path(str(config.catalog) + suffix)
                    if src.exists():
                        src.rename(str(moved) + suffix)
                session._catalog = None
                cat = session.catalog
            found, bad = set(), []
            for name, _ in repo.storage.list("manifests/"):
                backup_id = name.rsplit("/", 1)[1]
                try:
                    rec = repo.manifest(backup_id).record
                except CorruptionError as e:
                    bad.append(str(e))
                    continue
                row = as_record(rec, fail_reason=None)
                old = cat.find(backup_id)
                if old is not None:
                    # Catalog-only facts, changed after the manifest was written: keep them.
                    for key in ("protected", "parent_id", "is_incremental"):
                        row[key] = old[key]
                cat.put(row, Status.AVAILABLE)
                found.add(backup_id)
            for row in cat.list(include_deleted=True):
                if row["id"] in found or row["status"] in (Status.DELETED, Status.ERROR):
                    continue
                if row["status"] == Status.DELETING:
                    cat.transition(row["id"], Status.DELETED)
                else:
                    cat.transition(row["id"], Status.ERROR, fail_reason="manifest missing or "
                                   "corrupt in the repository")
            _orphans_become_full(cat)
            cat.refresh_all_dependents()
    finally:
        session.close()
    return {"recovered": len(found), "corrupt_manifests": bad,
            "old_catalog_moved_to": str(moved) if moved else None}


def _orphans_become_full(cat: Catalog) -> None:
    """A backup whose recorded parent is gone (pruned: the manifest still names it) needs
    nothing from it, manifests being self-contained: record it as a full backup."""
    rows = {r["id"]: r for r in cat.list(include_deleted=True)}
    for r in rows.values():
        parent = rows.get(r["parent_id"]) if r["parent_id"] else None
        if (r["parent_id"] and r["status"] != Status.DELETED
                and (parent is None or parent["status"] == Status.DELETED)):
            cat.update(r["id"], parent_id=None, is_incremental=False)


def collect_garbage(session: Session, progress: Callable[[int, int], None] | None = None
                    ) -> dict:
    """`gc`, with the repository locked exclusively (no backup is writing meanwhile)."""
    with session.exclusive_lock():
        # A map starts under the shared lock, so none can start until gc ends; one already
        # running reads chunks that gc might move or delete.
        with registry(session.lock_dir):
            refuse_if_mapped(session.lock_dir, None, "collect garbage")
        recover_dead_runs(session)
        return gc.collect_garbage(session.repo, session.config.cache_dir, session.lock_dir,
                                  progress)
