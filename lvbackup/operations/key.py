"""`lvbackup key`: an encrypted repository's key slots (repository/keys.py).

The master key never changes and no data is rewritten: a slot is added (another passphrase
or key file), replaced (a new passphrase), exported (the slots as text, to keep apart from
the repository: with its passphrase, the one thing that opens the backups if the
repository's own slots are lost) or imported back.
"""

from __future__ import annotations

from pathlib import Path

from ..base.errors import UsageError
from ..base.faults import crash_point
from ..credentials import create_key_file, new_passphrase, secrets, write_private_file
from ..repository.keys import (
    PASSPHRASE,
    Secret,
    export_text,
    make_slot,
    parse_export,
    parse_slot,
    read_slots,
)
from ..repository.repo import Repository
from ..session import Session


def _unlocked(session: Session) -> tuple[Repository, bytes, str]:
    repo = session.repo
    if repo.unlocked is None:
        raise UsageError(f"repository {session.config.repository} is not encrypted: it has "
                         "no key")
    master, slot = repo.unlocked
    return repo, master, slot


def list_keys(session: Session) -> list[dict]:
    """The key slots (kind, and which one opened the repository now)."""
    repo, _, opened = _unlocked(session)
    return [{"slot": name, "kind": parse_slot(name, data)["kind"], "used": name == opened}
            for name, data in sorted(read_slots(repo.storage).items())]


def export_key(session: Session, to: Path | None) -> str:
    """The key export's text (written to `to`, created 0600, if given)."""
    repo, _, _ = _unlocked(session)
    text = export_text(repo.id, read_slots(repo.storage))
    if to is not None:
        write_private_file(to, text, "key export")
    return text


def import_key(session: Session, text: str) -> dict:
    """Put a key export's slots back into the repository (those it lacks): the export must
    be this repository's, and the configured passphrase or key file must open it."""
    repo_id, slots = parse_export(text)
    config = session.config
    repo = Repository.open(config.repository, config.cache_dir, lambda: secrets(config),
                           slots=slots)
    try:
        if not repo.encrypted:
            raise UsageError(f"repository {config.repository} is not encrypted: it has no key")
        if repo_id != repo.id:
            raise UsageError(f"the key export is of repository {repo_id}, not of "
                             f"{config.repository} ({repo.id})")
        have = read_slots(repo.storage)
        added = [n for n in sorted(slots) if n not in have]
        for name in added:
            repo.storage.put(name, slots[name])
    finally:
        repo.close()
    return {"repository": str(config.repository), "slots_added": added}


def add_key(session: Session, new_passphrase_file: Path | None, key_file: Path | None
            ) -> dict:
    """Another way in: a passphrase, or a new key file created at `key_file`."""
    repo, master, _ = _unlocked(session)
    secret = create_key_file(key_file) if key_file else new_passphrase(new_passphrase_file)
    name = _put_slot(repo, master, secret)
    return {"repository": str(session.config.repository), "slot": name, "kind": secret.kind}


def change_passphrase(session: Session, new_passphrase_file: Path | None) -> dict:
    """Replace the passphrase slot that the current passphrase opens with one for the new
    passphrase (the new slot is stored before the old one is deleted)."""
    if session.config.append_only:
        raise UsageError("append_only: is set: a passphrase cannot be changed, as that "
                         "deletes the old key slot (add one with 'lvbackup key add')")
    secret = new_passphrase(new_passphrase_file)
    with session.exclusive_lock():
        repo, master, old = _unlocked(session)
        if _slot_kind(repo, old) != PASSPHRASE:
            raise UsageError("the repository was opened with a key file: give the current "
                             "passphrase ($LVBACKUP_PASSPHRASE) and no key_file: to change it")
        name = _put_slot(repo, master, secret)
        crash_point("key-slot-stored")
        repo.storage.delete(old)
    return {"repository": str(session.config.repository), "slot": name, "replaced": old}


def _slot_kind(repo: Repository, name: str) -> str:
    return str(parse_slot(name, repo.storage.get(name))["kind"])


def _put_slot(repo: Repository, master: bytes, secret: Secret) -> str:
    name, data = make_slot(master, secret, repo.id)
    repo.storage.put(name, data)
    return name
