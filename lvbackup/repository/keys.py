"""Key slots: an encrypted repository's master key, wrapped by passphrases or key files.

The master key (32 random bytes, made once at `init --encryption`) never changes; codec.py
derives the data, chunk-id and trailer keys from it. Each way in is a slot, an object
`keys/<slot id>` sealed with the plain envelope (magic "LVBKEY01") whose payload is JSON:

    {"repository": "<id>", "kind": "passphrase" | "key_file",
     "kdf": {"name": "scrypt", "salt": "<hex>", "n": 131072, "r": 8, "p": 1}
            | {"name": "blake3", "salt": "<hex>"},
     "nonce": "<hex, 12 bytes>", "wrapped": "<hex: AES-256-GCM of the master key, 48 bytes>"}

The key-encrypting key is scrypt(passphrase) or BLAKE3-derive(salt | key file's key); the
associated data is "LVBKEY01" | repository id | NUL | slot name, so a slot only opens for
its repository under its own name. Changing a passphrase writes a new slot and deletes the
old one: no data is rewritten.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..base.errors import CorruptionError, UsageError
from .backends import Backend
from .codec import NONCE_LEN, key_check, seal, unseal

SLOT_MAGIC = b"LVBKEY01"
SLOTS = "keys/"
PASSPHRASE = "passphrase"
KEY_FILE = "key_file"
MASTER_LEN = 32
KEY_FILE_CONTEXT = "lvbackup 2026-12 key file key-encrypting key"
SCRYPT = {"n": 1 << 17, "r": 8, "p": 1}        # 128 MiB (OWASP's minimum); see performance.md
_SCRYPT_MAX_MEMORY = 1 << 28                    # 256 MiB: a slot asking for more is refused
_SLOT_MAX = 4096                                # bytes: a slot is a few hundred


@dataclass(frozen=True)
class Secret:
    """A passphrase or a key file's key, and where it came from (for messages; the value
    never appears in one)."""

    kind: str
    value: bytes = field(repr=False)
    source: str


def new_master() -> bytes:
    return os.urandom(MASTER_LEN)


def slot_name(slot_id: str) -> str:
    return f"{SLOTS}{slot_id}"


def _kek(secret: Secret, kdf: dict) -> bytes:
    salt = bytes.fromhex(kdf["salt"])
    if kdf["name"] == "scrypt":
        return Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
            secret.value)
    return blake3.blake3(salt + secret.value, derive_key_context=KEY_FILE_CONTEXT).digest()


def _aad(repo_id: str, name: str) -> bytes:
    return SLOT_MAGIC + repo_id.encode() + b"\0" + name.encode()


def make_slot(master: bytes, secret: Secret, repo_id: str) -> tuple[str, bytes]:
    """(object name, stored bytes) of a new slot opening `master` with `secret`."""
    name = slot_name(os.urandom(8).hex())
    kdf: dict[str, Any] = {"name": "scrypt" if secret.kind == PASSPHRASE else "blake3",
                           "salt": os.urandom(16).hex()}
    if secret.kind == PASSPHRASE:
        kdf.update(SCRYPT)
    nonce = os.urandom(NONCE_LEN)
    wrapped = AESGCM(_kek(secret, kdf)).encrypt(nonce, master, _aad(repo_id, name))
    slot = {"repository": repo_id, "kind": secret.kind, "kdf": kdf, "nonce": nonce.hex(),
            "wrapped": wrapped.hex()}
    return name, seal(SLOT_MAGIC, json.dumps(slot, sort_keys=True).encode())


def parse_slot(name: str, data: bytes) -> dict:
    """A slot's fields, checked (CorruptionError naming it): bounded sizes, and KDF
    parameters that cannot ask for unbounded memory or time."""
    what = f"key slot {name}"
    if len(data) > _SLOT_MAX:
        raise CorruptionError(f"{what} is corrupt (implausibly large)")
    try:
        slot = json.loads(unseal(SLOT_MAGIC, data, what))
        kdf = slot["kdf"]
        ok = (isinstance(slot["repository"], str) and slot["kind"] in (PASSPHRASE, KEY_FILE)
              and len(bytes.fromhex(slot["nonce"])) == NONCE_LEN
              and len(bytes.fromhex(slot["wrapped"])) == MASTER_LEN + 16
              and len(bytes.fromhex(kdf["salt"])) >= 16
              and kdf["name"] == ("scrypt" if slot["kind"] == PASSPHRASE else "blake3"))
        if ok and kdf["name"] == "scrypt":
            n, r, p = (kdf[k] for k in ("n", "r", "p"))
            ok = (all(type(v) is int and v > 0 for v in (n, r, p)) and n & (n - 1) == 0
                  and n > 1 and 128 * n * r <= _SCRYPT_MAX_MEMORY and p <= 16)
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise CorruptionError(f"{what} is corrupt (bad fields)")
    return slot


def open_slot(name: str, slot: dict, secret: Secret, repo_id: str) -> bytes | None:
    """The master key if `secret` opens this slot, else None."""
    if slot["kind"] != secret.kind or slot["repository"] != repo_id:
        return None
    try:
        return AESGCM(_kek(secret, slot["kdf"])).decrypt(
            bytes.fromhex(slot["nonce"]), bytes.fromhex(slot["wrapped"]), _aad(repo_id, name))
    except InvalidTag:
        return None


def read_slots(storage: Backend) -> dict[str, bytes]:
    """Every slot object's stored bytes, by name."""
    return {name: storage.get(name) for name, _ in storage.list(SLOTS)}


def unlock(slots_stored: dict[str, bytes], repo_id: str, check: str, secrets: list[Secret],
           where: str) -> tuple[bytes, str]:
    """(master key, name of the slot that opened it) for the first secret that opens one
    of these slots (stored bytes by name) for this repository; UsageError (a wrong key is
    the user's to fix) otherwise."""
    slots = {}
    for name, data in slots_stored.items():
        try:
            slots[name] = parse_slot(name, data)
        except CorruptionError:
            continue   # another slot may open
    if not slots:
        raise UsageError(f"encrypted repository {where} has no usable key slot under keys/: "
                         "put them back with 'lvbackup key import FILE' from a key export")
    for secret in secrets:
        for name, slot in slots.items():
            master = open_slot(name, slot, secret, repo_id)
            if master is not None and key_check(master) == check:
                return master, name
    tried = ", ".join(s.source for s in secrets)
    raise UsageError(f"wrong passphrase or key file for encrypted repository {where} "
                     f"(tried {tried})")


# --- exports: the slots as text, to keep somewhere safe ------------------------------------

EXPORT_FORMAT = "lvbackup key export 1"
_EXPORT_MAX = 256 * 1024
_SLOT_NAME = re.compile(r"keys/[0-9a-f]{16}")


def export_text(repo_id: str, slots: dict[str, bytes]) -> str:
    """A key export: every slot as stored (each still needs its passphrase or key file)."""
    encoded = {n: base64.b64encode(d).decode() for n, d in sorted(slots.items())}
    return json.dumps({"format": EXPORT_FORMAT, "repository": repo_id, "slots": encoded},
                      indent=1) + "\n"


def parse_export(text: str) -> tuple[str, dict[str, bytes]]:
    """(repository id, {slot name: stored bytes}) of a key export, every slot checked;
    UsageError if it is not one."""
    bad = UsageError("not an lvbackup key export (or a damaged one)")
    if len(text) > _EXPORT_MAX:
        raise bad
    try:
        doc = json.loads(text)
        if doc.get("format") != EXPORT_FORMAT or not isinstance(doc.get("repository"), str):
            raise bad
        slots = {n: base64.b64decode(d, validate=True) for n, d in doc["slots"].items()}
    except (ValueError, TypeError, AttributeError, binascii.Error):
        raise bad from None
    if not slots or not all(isinstance(n, str) and _SLOT_NAME.fullmatch(n) for n in slots):
        raise bad
    for name, data in slots.items():
        try:
            parse_slot(name, data)
        except CorruptionError:
            raise bad from None
    return doc["repository"], slots
