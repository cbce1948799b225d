"""The environment variables that hold lvbackup's secrets, listed once: hooks and helper
commands are run without them, and a long-lived helper (nbdkit serving a map) drops them
from its own environment once it has opened the repository."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path

PASSPHRASE_ENV = "LVBACKUP_PASSPHRASE"
NEW_PASSPHRASE_ENV = "LVBACKUP_NEW_PASSPHRASE"
TARGET_PASSPHRASE_ENV = "LVBACKUP_TARGET_PASSPHRASE"
# Environment variables no hook or helper is given: lvbackup's passphrases, and every AWS_*
# variable (one rule, so that no credential slips through under a name not listed here).
SECRET_VARIABLES = (PASSPHRASE_ENV, TARGET_PASSPHRASE_ENV, NEW_PASSPHRASE_ENV)
SECRET_PREFIX = "AWS_"


def is_secret_variable(name: str) -> bool:
    return name in SECRET_VARIABLES or name.startswith(SECRET_PREFIX)


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the variables that hold secrets: the environment of hooks and helper
    commands (paging and notification tools log theirs)."""
    return {k: v for k, v in env.items() if not is_secret_variable(k)}


def drop_secrets_from_process() -> None:
    """Remove the secret variables from this process's environment once it has what it
    needs (a long-lived helper: nbdkit serving a map): from os.environ and the C
    environment, and their text overwritten in the initial environment area, which the
    kernel shows in /proc/PID/environ whatever became of it since."""
    names = [n for n in os.environ if is_secret_variable(n)]
    if not names:
        return
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_void_p
    libc.getenv.argtypes = [ctypes.c_char_p]
    area = _initial_environment_area()
    for name in names:
        key = os.fsencode(name)
        value = libc.getenv(key)
        os.environ.pop(name)        # unsetenv(3): the string is no longer referenced
        if value is not None and value in area:
            start = value - len(key) - 1       # "NAME=value"
            ctypes.memset(start, 0, len(key) + 1 + len(ctypes.string_at(value)))


def _initial_environment_area() -> range:
    """The addresses of the environment strings the process was started with (env_start and
    env_end, fields 50 and 51 of /proc/self/stat); empty if they cannot be told."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return range(int(fields[47]), int(fields[48]))
    except (OSError, IndexError, ValueError):
        return range(0)
