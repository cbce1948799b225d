"""Repository and catalog upkeep: `init`, `gc`, `catalog rebuild`."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

from ..base import reserve
from ..base.errors import CorruptionError, LvbackupError, UsageError
from ..base.lifecycle import Status
from ..base.sqlitefile import no_room
from ..base.timeutil import now_iso
from ..catalog.catalog import (
    Catalog,
    as_record,
)
from ..config import Config, as_dict
from ..credentials import FindSecrets, create_key_file, require_strong, secrets
from ..nbd.registry import refuse_if_mapped, registry
from ..repository import gc
from ..repository.backends import credential_source, open_backend
from ..repository.keys import Secret
from ..repository.repo import Repository
from ..session import Session, check_encryption, recover_dead_runs, refuse_known_encrypted
from .as_of import check_new_catalog


def init_repository(config: Config, block_size: int | None, encryption: bool = False,
                    find_secrets: FindSecrets = secrets) -> dict:
    """Create the repository and the catalog if they do not exist (idempotent). With
    `encryption`, a new repository is encrypted under the configured passphrase or key
    file (a configured key file that does not exist yet is created). An existing encrypted
    one is opened with `find_secrets` (a copy's target: credentials.target_secrets). An
    unencrypted one is never made or opened where a secret is given or this host knew an
    encrypted one (session.check_encryption)."""
    offered = find_secrets.offered(config)
    exists = Repository.exists(config.repository, config.s3)
    if not exists and not encryption:
        if offered is not None:
            raise UsageError(f"a secret is given ({offered}): create the repository with "
                             "'lvbackup init --encryption', or remove the secret")
        refuse_known_encrypted(config, None)
    if encryption and config.key_file is not None and not config.key_file.exists():
        create_key_file(config.key_file)

    def given() -> list[Secret]:
        found = find_secrets(config)
        if encryption and not exists and found:
            require_strong(found[0])    # the one the new repository's key slot is for
        return found

    repo, created = Repository.init(config.repository, config.cache_dir, block_size, given,
                                    encrypt=encryption, s3=config.s3)
    try:
        check_encryption(config, repo, find_secrets)
        Catalog(config.catalog).close()
    finally:
        repo.close()
    reserve.fill(reserve.places(config.cache_dir, config.catalog, config.repository))
    return {"repository": str(config.repository), "catalog": str(config.catalog),
            "repository_id": repo.id, "block_size": repo.block_size, "created": created,
            "encrypted": repo.encrypted}


def effective_config(config: Config) -> dict:
    """`config check`: every key, and where the repository's credentials come from."""
    return as_dict(config, credential_source(config.repository, config.s3))


def config_warnings(config: Config) -> list[str]:
    """`config check`'s warnings: what the configuration names that will fail (a hook that
    is not an executable, an event log or metrics file in a directory that does not exist:
    checked, never created here), and append_only: on object storage whose bucket does not
    keep versions (the host's credentials can still overwrite objects)."""
    found = []
    for n, hook in enumerate(config.hooks):
        exe = hook.command[0]
        if not (os.access(exe, os.X_OK) if "/" in exe else shutil.which(exe) is not None):
            found.append(f"hooks[{n}].command: {exe} is not an executable (the hook will fail)")
    for key, path in (("event_log", config.event_log), ("metrics", config.metrics)):
        if path is not None and not path.parent.is_dir():
            found.append(f"{key}: the directory {path.parent} does not exist (a typo? "
                         "lvbackup would create it at the first write)")
    return found + _versioning_warnings(config)


def _versioning_warnings(config: Config) -> list[str]:
    if not (config.append_only and str(config.repository).startswith("s3://")):
        return []
    from ..repository.backends.s3 import S3Backend  # boto3: only for object storage

    try:
        storage = open_backend(config.repository, s3=config.s3)
        try:
            assert isinstance(storage, S3Backend)
            if storage.versioning_enabled():
                return []
        finally:
            storage.close()
    except LvbackupError as e:
        return [f"append_only: cannot tell whether the bucket keeps versions: {e}"]
    return [f"append_only: is set, but versioning is off on bucket {storage.bucket}: this "
            "host's credentials can still overwrite its objects; turn versioning (or Object "
            "Lock) on"]


def rebuild_catalog(config: Config, wait: float = 0.0) -> dict:
    """Recreate the catalog from the manifests in the repository.

    Rows for manifests are restored as `available`; rows whose manifest is gone are kept
    but no longer claim to be restorable. A catalog that SQLite cannot read is moved
    aside (…corrupt-<time>) first.
    """
    if config.s3.as_of is not None:
        check_new_catalog(config)
    session = Session(config, wait)
    session.warn_empty_catalog = False
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
                cat = session.reopen_catalog()
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
    session.refuse_if_append_only("gc")
    session.release_reserve()   # a full disk: room for the index gc writes first
    with session.exclusive_lock("gc") as held:
        # A map starts under the shared lock, so none can start until gc ends; one already
        # running reads chunks that gc might move or delete.
        with registry(session.lock_dir):
            refuse_if_mapped(session.lock_dir, None, "collect garbage")
        recover_dead_runs(session)
        # On a shared store, another host's run may have put packs and not yet referenced
        # them, or be uploading one, should its lease have lapsed: young ones are spared.
        grace = session.config.gc_grace_period if held is not None else 0
        try:
            return gc.collect(session.repo, session.config.cache_dir,
                                      session.lock_dir, progress, grace=grace,
                                      guard=held.check if held is not None else None)
        except (OSError, sqlite3.Error) as e:
            # gc writes the new index before it deletes anything: nothing needed is gone.
            failure = no_room(e, "gc")
            if failure is None:
                raise
            raise failure from None
