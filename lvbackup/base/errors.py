"""Exceptions that carry the command's exit status (docs/user-guide.md, "In scripts")."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DAMAGED = 3          # damage found in backed-up data (verify, restore, ...)
EXIT_LOCKED = 75
EXIT_INTERRUPTED = 130    # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143     # SIGTERM: 128 + 15


class LvbackupError(Exception):
    """A failure with a message meant for the user and the exit status to report."""

    exit_code = EXIT_FAILED


class UsageError(LvbackupError):
    """Invalid input, or a request that the current state forbids."""

    exit_code = EXIT_USAGE


class NotFoundError(UsageError):
    """An unknown or ambiguous id, path or name."""


class LockedError(LvbackupError):
    """Another run holds the lock on the repository or the volume."""

    exit_code = EXIT_LOCKED


class CorruptionError(LvbackupError):
    """Repository data failed its checksum or is missing: damage to what is backed up, which
    scripts tell from other failures by its exit status."""

    exit_code = EXIT_DAMAGED


class ChangeTrackingError(LvbackupError):
    """LVM's record of changes cannot be trusted or read; scan the whole volume instead."""
