"""An open configuration (the session every operation works in), and what every operation
does first: settle the rows of runs that died.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from . import events as ev
from .base import reserve
from .base.diskio import AtomicFile
from .base.errors import CorruptionError, LvbackupError, UsageError
from .base.lifecycle import Status
from .base.locks import repository_lock, run_is_alive
from .base.permissions import make_private_dirs
from .catalog.catalog import BackupRecord, Catalog, as_record
from .config import Config
from .credentials import FindSecrets, secrets
from .repository import lease
from .repository.backends import open_backend
from .repository.manifest import Manifest
from .repository.repo import Repository

T = TypeVar("T")


class Session:
    """An open configuration: the catalog and repository it names, opened on first use."""

    def __init__(self, config: Config, wait: float = 0.0, find_secrets: FindSecrets = secrets):
        self.config = config
        self.wait = wait
        self.find_secrets = find_secrets   # credentials.target_secrets for a copy's target
        self._catalog: Catalog | None = None
        self._repo: Repository | None = None
        # Where warnings go (failed hooks, an unwritable event log or metrics file).
        self.warn: Callable[[str], None] = ev.stderr_warning
        self._events: ev.Events | None = None
        self._repository_found = False
        # Off while `catalog rebuild` fills an empty catalog from the repository.
        self.warn_empty_catalog = True
        # Off for commands that store backups: they must not fill the room kept for
        # delete and gc on a full disk (reserve.py).
        self.spend_reserve = True

    @property
    def events(self) -> ev.Events:
        if self._events is None:
            self._events = ev.Events(self.config.event_log, self.config.hooks,
                                     warn=lambda m: self.warn(m))
        return self._events

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self.require_repository()
            self._catalog = self._open_catalog()
            if self.warn_empty_catalog and self._catalog.empty() and self._has_manifests():
                self.warn(f"the catalog {self.config.catalog} lists no backups, but the "
                          f"repository {self.config.repository} holds some (a new, lost or "
                          "truncated catalog): recover them with 'lvbackup catalog rebuild'")
        return self._catalog

    def reopen_catalog(self) -> Catalog:
        """The catalog opened anew (`catalog rebuild`, after moving a corrupt one aside)."""
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        return self.catalog

    def _has_manifests(self) -> bool:
        """Whether the repository holds a backup's manifest (a listing: no key needed)."""
        try:
            storage = (self._repo.storage if self._repo is not None
                       else open_backend(self.config.repository, s3=self.config.s3))
        except (LvbackupError, OSError):
            return False
        try:
            return next(iter(storage.list("manifests/")), None) is not None
        except (LvbackupError, OSError):
            return False
        finally:
            if self._repo is None:
                storage.close()

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self.require_repository()
            self._repo = self._on_full_disk(
                lambda: open_repository(self.config, self.find_secrets), self.config.cache_dir)
        return self._repo

    @property
    def lock_dir(self) -> Path:
        # Local state that exists already (a map to undo) is reachable without the
        # repository: unmap and unmount clean up after a repository that went away.
        if not self.config.lock_dir.exists():
            self.require_repository()
        return self.config.lock_dir

    def require_repository(self) -> None:
        """UsageError unless the configured repository exists. Every command but `init`
        needs one, and none creates a catalog, cache or lock beside a repository that is
        not there (a typo, or a mount point whose disk is not mounted)."""
        if self._repository_found:
            return
        if not repository_exists(self.config):
            raise UsageError(f"no repository at {self.config.repository}; run 'lvbackup "
                             f"init' to create it (or correct repository: in "
                             f"{self.config.source})")
        self._repository_found = True

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
        if self._repo is not None:
            self._repo.close()
        if self._repository_found:
            # Put back what this run released, if its SQLite files left the room (those of
            # worker threads may still be open: then the next run puts it back).
            reserve.fill(self._reserves())

    def _reserves(self) -> list[Path]:
        return reserve.places(self.config.cache_dir, self.config.catalog,
                              self.config.repository)

    def keep_reserve(self) -> None:
        """For a run that stores backups: it never spends the room kept for delete and gc
        on a full disk, and puts back first what an earlier run left released."""
        self.spend_reserve = False
        if repository_exists(self.config):
            reserve.fill(self._reserves())

    def release_reserve(self) -> bool:
        """Give the room kept for a full disk back (delete, prune and gc, before they
        write), unless this run stores backups; whether there was any."""
        return self.spend_reserve and reserve.release(self._reserves())

    def _open_catalog(self) -> Catalog:
        """The catalog; on a full or read-only filesystem (no reserve left to release),
        opened read-only for a run that may spend the reserve: list, show, restore and
        verify only read it, and a write says why it cannot be made."""
        path = self.config.catalog
        try:
            return self._on_full_disk(lambda: Catalog(path), path.parent)
        except LvbackupError:
            if not (self.spend_reserve and path.is_file()
                    and (reserve.short_of_space(path.parent) or reserve.read_only(path))):
                raise
        return Catalog(path, read_only=True)

    def _on_full_disk(self, open_it: Callable[[], T], directory: Path) -> T:
        """`open_it()`; if it fails on a full filesystem, again with the reserves released
        (a full disk must not stop list, show, restore, verify, delete and gc)."""
        try:
            return open_it()
        except LvbackupError:
            if not (reserve.short_of_space(directory) and self.release_reserve()):
                raise
        return open_it()

    def refuse_if_append_only(self, what: str) -> None:
        if self.config.append_only:
            raise UsageError(f"{what} is refused: append_only: is set ({self.config.source}), "
                             "so no backup may be deleted from this host")

    @property
    def shared_store(self) -> bool:
        """Whether the repository is in a store other hosts may use at once (object
        storage): then its lock is leases in the store (repository/lease.py) as well."""
        return (isinstance(self.config.repository, str)
                and not self.repo.storage.capabilities.local_files)

    @contextmanager
    def shared_lock(self) -> Iterator[None]:
        """Held by every run that reads or writes backups: any number at once."""
        self.require_repository()
        with repository_lock(self.lock_dir, exclusive=False).acquire(self.wait):
            if not self.shared_store:
                yield
                return
            with lease.shared(self.repo.storage, "a backup, restore, verify or delete",
                              self.wait):
                yield

    @contextmanager
    def exclusive_lock(self, what: str | None = None) -> Iterator[lease.Lease | None]:
        """Held alone on this host; with `what` (gc, prune), on every host: the Lease on a
        shared store, whose check() a long run calls before deleting anything, else None."""
        self.require_repository()
        with repository_lock(self.lock_dir, exclusive=True).acquire(self.wait):
            if what is None or not self.shared_store:
                yield None
                return
            with lease.exclusive(self.repo.storage, what, self.wait) as held:
                yield held




def repository_exists(config: Config) -> bool:
    """Whether the configured repository (its config object) exists. Object storage is
    asked (a round trip) only on a host without a catalog yet; a local one, always: a
    stat, and the one check that catches an unmounted disk."""
    remote = isinstance(config.repository, str) and not config.repository.startswith("file:")
    if remote and config.catalog.exists():
        return True
    try:
        storage = open_backend(config.repository, s3=config.s3)
    except OSError:
        return True   # not a missing repository: opening it reports what is wrong
    try:
        return storage.exists("config")
    except OSError:
        return True
    finally:
        storage.close()


def open_repository(config: Config, find_secrets: FindSecrets = secrets) -> Repository:
    """The configured repository, unlocked with the configured secrets if encrypted;
    refused if it is not encrypted but should be (check_encryption)."""
    repo = Repository.open(config.repository, config.cache_dir, lambda: find_secrets(config),
                           append_only=config.append_only, s3=config.s3)
    try:
        check_encryption(config, repo, find_secrets)
    except BaseException:
        repo.close()
        raise
    return repo


# Whoever can write a repository's `config` can replace an encrypted one's with an
# unencrypted one (re-sealed under the same id: no key is needed for that), to be sent the
# next backups in plaintext. A repository is refused unencrypted when a secret is given for
# it, or when this host has known it encrypted: a file per repository in the cache
# directory, beside its index cache, remembers that (and where it was).

def check_encryption(config: Config, repo: Repository, find_secrets: FindSecrets) -> None:
    """Remember an encrypted repository; refuse an unencrypted one that should not be."""
    if repo.encrypted:
        _remember_encrypted(config, repo.id)
        return
    offered = find_secrets.offered(config)
    if offered is not None:
        raise UsageError(f"repository {config.repository} is not encrypted, but a secret is "
                         f"given for it ({offered}): refusing to send it plaintext (its config "
                         "may have been replaced); remove the secret or use an encrypted "
                         "repository ('lvbackup init --encryption')")
    refuse_known_encrypted(config, repo.id)


def refuse_known_encrypted(config: Config, repo_id: str | None) -> None:
    """UsageError if this host has used the repository (this id, or at this location)
    encrypted: an unencrypted one there now is a downgrade."""
    for marker in sorted(config.cache_dir.glob(f"{_MARKER}*")):
        if marker.name == f"{_MARKER}{repo_id}" or _marked_location(marker) == _location(config):
            raise UsageError(
                f"repository {config.repository} is not encrypted, but this host has used it "
                f"encrypted ({marker}): its config may have been replaced to have backups "
                "sent in plaintext; refused. If it was re-created unencrypted on purpose, "
                f"remove {marker}")


_MARKER = "encrypted-"


def _location(config: Config) -> str:
    return str(config.repository)


def _marked_location(marker: Path) -> str | None:
    try:
        return str(json.loads(marker.read_text())["repository"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember_encrypted(config: Config, repo_id: str) -> None:
    marker = config.cache_dir / f"{_MARKER}{repo_id}"
    if marker.exists():
        return
    # Best effort: a cache directory that cannot be written fails the index cache beside it.
    with contextlib.suppress(OSError):
        make_private_dirs(marker.parent)
        with AtomicFile(marker) as f:
            os.write(f.fd, json.dumps({"id": repo_id, "repository": _location(config)}
                                      ).encode() + b"\n")


def recover_dead_runs(session: Session) -> list[BackupRecord]:
    """Settle rows left in a transitional state by runs that died (rule 11).

    A `creating` backup whose manifest was written is complete and becomes `available`;
    otherwise it becomes `error`. A `restoring` one is `available` again. A `deleting` one
    is `deleted` if its manifest is gone, else `error_deleting`.
    """
    cat = session.catalog
    changed: list[BackupRecord] = []
    if cat.read_only:
        return changed   # settled by the next run that can write
    for row in cat.in_states(Status.CREATING, Status.RESTORING, Status.DELETING):
        if run_is_alive(session.lock_dir, row["id"]):
            continue
        if row["status"] != Status.RESTORING and not _repository_opens(session):
            # Absent, or encrypted and no key given: whether its manifest exists cannot be
            # told, so the row is left for a run that can open the repository.
            continue
        manifest = (None if row["status"] == Status.RESTORING
                    else _manifest_or_none(session, row["id"]))
        has_manifest = manifest is not None
        fields: dict[str, object]
        if row["status"] == Status.CREATING:
            if manifest is not None:
                to = Status.AVAILABLE
                fields = {"fail_reason": None,
                          "stored_bytes": manifest.record.get("stored_bytes") or 0}
            else:
                to = Status.ERROR
                fields = {"fail_reason":
                          "incomplete backup reset: the run creating it was interrupted"}
        elif row["status"] == Status.RESTORING:
            to, fields = Status.AVAILABLE, {}
        elif has_manifest:
            to = Status.ERROR_DELETING
            fields = {"fail_reason":
                      "the run deleting it was interrupted; delete it again with --force"}
        else:
            to, fields = Status.DELETED, {}
        with cat.write():
            if cat.get(row["id"])["status"] != row["status"]:
                continue  # another run recovered it meanwhile
            cat.transition(row["id"], to, **fields)
            cat.refresh_dependents(row["parent_id"])
        changed.append(as_record(row, **fields, status=to))
    return changed


def _repository_opens(session: Session) -> bool:
    try:
        return session.repo is not None
    except UsageError:
        return False


def _manifest_or_none(session: Session, backup_id: str) -> Manifest | None:
    try:
        return session.repo.manifest(backup_id)
    except CorruptionError:
        return None



def reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or e}{where}"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, SystemExit):
        return "terminated by a signal"
    return str(e) or type(e).__name__


