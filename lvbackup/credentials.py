"""Where an encrypted repository's secrets come from, and key files.

A passphrase comes from $LVBACKUP_PASSPHRASE, else `passphrase_file:`, else
`passphrase_command:` (an argv list run without a shell, for a secret store: its standard
output is the passphrase). A key file (`key_file:`) holds 32 random bytes as 64 hex digits.
None of them is ever a command-line argument (other users can read those in /proc), and a
secret's value never appears in a message, event or log: only where it came from.

$LVBACKUP_PASSPHRASE is the secret of the configuration a command runs with. The target of
`copy` (--to-config, a job's copy_to) is another repository, usually under another
passphrase: it takes its own, $LVBACKUP_TARGET_PASSPHRASE, else its configuration's
`passphrase_file:` or `passphrase_command:` (and its `key_file:`), never the source's.

A secret file that other users can read is refused; a passphrase a new key slot is made for
has MIN_PASSPHRASE characters at least. The environment variables that hold secrets are
secretenv.py's.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from .base import proc
from .base.diskio import open_file
from .base.errors import UsageError
from .base.secretenv import NEW_PASSPHRASE_ENV, PASSPHRASE_ENV, TARGET_PASSPHRASE_ENV
from .config import Config
from .repository.keys import KEY_FILE, PASSPHRASE, Secret

MIN_PASSPHRASE = 8        # characters, for a passphrase a new key slot is made for
_COMMAND_TIMEOUT = 60
_MAX_SECRET = 64 * 1024


def configured_key(config: Config) -> str | None:
    """The configuration key that names a secret, if any (it asks for encryption)."""
    for key in ("key_file", "passphrase_file", "passphrase_command"):
        if getattr(config, key) is not None:
            return key
    return None


class FindSecrets:
    """Where a repository's secrets are found: `secrets` for the configuration a command
    runs with, `target_secrets` for a copy's target (its own environment variable)."""

    def __init__(self, env: str, required: bool):
        self.env = env
        self.required = required

    def __call__(self, config: Config) -> list[Secret]:
        """Every secret the configuration and environment give (key file first)."""
        found = []
        if config.key_file is not None:
            found.append(read_key_file(config.key_file))
        passphrase = _passphrase(config, self.env)
        if passphrase is not None:
            found.append(passphrase)
        if not found and self.required:
            raise UsageError(f"copy target {config.repository} is encrypted: give its "
                             f"passphrase (${self.env}, or passphrase_file: or "
                             f"passphrase_command: in {config.source}) or its key_file:")
        return found

    def offered(self, config: Config) -> str | None:
        """Where a secret is given for the repository, if one is (without reading it): a
        repository given one must be encrypted."""
        key = configured_key(config)
        if key is not None:
            return f"{key}: in {config.source}"
        return f"${self.env}" if os.environ.get(self.env) else None


secrets = FindSecrets(PASSPHRASE_ENV, required=False)
target_secrets = FindSecrets(TARGET_PASSPHRASE_ENV, required=True)


def _passphrase(config: Config, env: str) -> Secret | None:
    if os.environ.get(env):
        return Secret(PASSPHRASE, os.environ[env].encode(), f"${env}")
    if config.passphrase_file is not None:
        return passphrase_from_file(config.passphrase_file)
    if config.passphrase_command is not None:
        return _from_command(config.passphrase_command)
    return None


def new_passphrase(path: Path | None) -> Secret:
    """The new passphrase for `key change-passphrase` or `key add`: from `path`, else
    $LVBACKUP_NEW_PASSPHRASE."""
    if path is not None:
        return require_strong(passphrase_from_file(path))
    value = os.environ.get(NEW_PASSPHRASE_ENV)
    if not value:
        raise UsageError(f"give the new passphrase in ${NEW_PASSPHRASE_ENV} or with "
                         "--new-passphrase-file FILE")
    return require_strong(Secret(PASSPHRASE, value.encode(), f"${NEW_PASSPHRASE_ENV}"))


def require_strong(secret: Secret) -> Secret:
    """`secret`, if a new key slot may be made for it: a passphrase of at least
    MIN_PASSPHRASE characters (scrypt slows guessing; it cannot save a short one)."""
    if (secret.kind == PASSPHRASE
            and len(secret.value.decode(errors="replace")) < MIN_PASSPHRASE):
        raise UsageError(f"the passphrase from {secret.source} is shorter than "
                         f"{MIN_PASSPHRASE} characters: choose a longer one")
    return secret


def passphrase_from_file(path: Path) -> Secret:
    """A passphrase file's first line."""
    value = _read(path, "passphrase file").split(b"\n", 1)[0].removesuffix(b"\r")
    if not value:
        raise UsageError(f"passphrase file {path} is empty")
    return Secret(PASSPHRASE, value, f"passphrase file {path}")


def _from_command(argv: tuple[str, ...]) -> Secret:
    what = f"passphrase_command {argv[0]}"
    try:
        # Through pipes: the passphrase never touches a disk. Not in a session of its own:
        # a secret store may ask on the terminal.
        done = proc.run(argv, stdout=proc.PIPE, stderr=proc.PIPE, timeout=_COMMAND_TIMEOUT,
                        own_session=False)
    except OSError as e:
        raise UsageError(f"cannot run {what}: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"{what} did not finish within {_COMMAND_TIMEOUT} s") from None
    if done.returncode != 0:
        raise UsageError(f"{what} failed with exit status {done.returncode}")
    assert done.stdout is not None
    value = done.stdout[:_MAX_SECRET].split(b"\n", 1)[0].removesuffix(b"\r")
    if not value:
        raise UsageError(f"{what} printed no passphrase")
    return Secret(PASSPHRASE, value, what)


def read_key_file(path: Path) -> Secret:
    text = _read(path, "key file").strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) != 32:
        raise UsageError(f"key file {path} is not an lvbackup key file (64 hex digits)")
    return Secret(KEY_FILE, key, f"key file {path}")


def create_key_file(path: Path) -> Secret:
    """A new key file at `path`."""
    key = os.urandom(32)
    write_private_file(path, key.hex() + "\n", "key file")
    return Secret(KEY_FILE, key, f"key file {path}")


def write_private_file(path: Path, text: str, what: str) -> None:
    """A new file only its owner can read (0600), never over an existing file or through a
    symbolic link; written and fsynced."""
    try:
        fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise UsageError(f"{what} {path} exists already; give another path") from None
    except OSError as e:
        raise UsageError(f"cannot create {what} {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path, what: str) -> bytes:
    """A secret file's content; refused, as ssh refuses a private key, if other users may
    read or write it (checked on the open file, so a swap after the check cannot matter)."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o066:
                raise UsageError(f"{what} {path} can be read or written by other users "
                                 f"(mode {stat.filemode(mode)}); fix: chmod 600 {path}")
            return f.read(_MAX_SECRET)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None
