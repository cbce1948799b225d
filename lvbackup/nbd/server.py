"""The NBD export of one backup, as nbdkit's Python plugin runs it (`nbdkit_plugin.py`
hands every callback to an `Export`).

Every read goes through `BackupReader`: each block is checked against its manifest digest,
and a block that is missing or damaged fails the request with EIO, never with other data.
The export itself is read-only; `--writable` adds nbdkit's cow filter in front of it.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

from ..base.errors import LvbackupError
from ..base.secretenv import drop_secrets_from_process
from ..config import Config, load_config, pinned
from ..datapath.reader import BackupReader
from ..repository import lease
from ..repository.repo import Repository
from ..session import open_repository
from .registry import hold

CACHE_BYTES = 64 * 1024 * 1024


class Export:
    """One map's server state: its parameters, then the open repository and reader."""

    # `config`: the configuration file lvbackup ran with ("" for the defaults). The
    # repository is opened from it as lvbackup opens it (its object storage settings, its
    # secrets from the same file, command or inherited environment, append_only), so that
    # no secret is ever on nbdkit's command line; the environment's are dropped once the
    # repository is open.
    PARAMETERS: tuple[str, ...] = ("config", "backup", "lock")
    OPTIONAL: tuple[str, ...] = ("as_of",)      # --as-of's time, seconds since the epoch
    writable = False

    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.reader: BackupReader | None = None
        self._repo: Repository | None = None
        self.settings: Config | None = None
        self._held = contextlib.ExitStack()
        self._lease: lease.Lease | None = None
        self._lock_fd: int | None = None

    def config(self, key: str, value: str) -> None:
        if key not in self.PARAMETERS + self.OPTIONAL:
            raise ValueError(f"unknown parameter {key}= (expected "
                             f"{', '.join(self.PARAMETERS + self.OPTIONAL)})")
        self.params[key] = value

    def config_complete(self) -> None:
        missing = [k for k in self.PARAMETERS if k not in self.params]
        if missing:
            raise ValueError(f"missing parameters: {', '.join(missing)}")

    def get_ready(self) -> None:
        """Take the map's lock (it marks the backup held while this process lives), then
        open the repository and the backup's manifest."""
        self._lock_fd = hold(Path(self.params["lock"]))
        self.settings = load_config(self.params["config"] or None)
        if "as_of" in self.params:
            self.settings = pinned(self.settings, float(self.params["as_of"]))
        self._repo = open_repository(self.settings)
        # The server runs for days and needs no secret again (the store's client holds its
        # credentials, the codec the master key): nothing it starts or dumps shows them.
        drop_secrets_from_process()
        if not self._repo.storage.capabilities.local_files:
            # A store other hosts share: their gc must not collect this backup's chunks
            # either, so the map holds a run lease there for as long as it lives.
            self._lease = self._held.enter_context(
                lease.shared(self._repo.storage, "a mapped backup"))
        manifest = self._repo.manifest(self.params["backup"])
        self.reader = BackupReader(self._repo, manifest, CACHE_BYTES)

    @property
    def size(self) -> int:
        assert self.reader is not None
        return self.reader.size

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill `buf` with the image at `offset`; an unreadable block raises
        RequestFailed(EIO) for the whole request."""
        assert self.reader is not None
        try:
            buf[:] = self.reader.read(offset, len(buf))
        except LvbackupError as e:
            raise RequestFailed(errno.EIO, str(e)) from None

    def pwrite(self, buf: memoryview | bytes, offset: int) -> None:
        raise RequestFailed(errno.EROFS, "this export is read-only")

    def flush(self) -> None:
        pass

    def after_fork(self, shutdown) -> None:
        """nbdkit runs in the background now (threads may start); `shutdown()` stops it."""
        if self._lease is not None:
            self._lease.after_fork()

    def cleanup(self) -> None:
        """nbdkit is exiting: the lease goes (a killed server's expires by itself)."""
        self._held.close()


class RequestFailed(OSError):
    """A request the client must see fail, with this errno."""
