"""A backend that can only add: `append_only: true` wraps the configured backend in it.

Every delete is refused, and so is replacing an object (put_content_addressed replaces a
damaged copy of a pack or index file elsewhere): a host whose credentials could be used to
destroy its past backups is thus kept from doing so by lvbackup itself, and, with storage
that grants no delete (docs/security.md), by the storage too.

Coordination objects hold no backup: leases (`locks/`) and `index-changes` may still be
replaced and deleted, so that a run renews and releases its lease (where the
storage grants no delete, the lease is left to expire).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ...base.errors import UsageError
from .base import Backend, Capabilities, Data, Held, ObjectExists, holds_no_backup


class AppendOnlyError(UsageError):
    """A delete or a replacement that append_only forbids."""


def _coordination(name: str, what: str = "replaced") -> str:
    if holds_no_backup(name):
        return name
    raise AppendOnlyError(f"append_only: is set: repository object {name} cannot be {what}")


class AppendOnlyBackend(Backend):
    def __init__(self, inner: Backend):
        self.inner = inner

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]  # the inner one's
        return self.inner.capabilities

    def put(self, name: str, data: Data) -> None:
        self.inner.put(name, data)

    def put_content_addressed(self, name: str, data: Data) -> None:
        try:
            self.inner.put(name, data)
        except ObjectExists:
            if memoryview(data).cast("B") != self.inner.get(name):
                raise AppendOnlyError(f"repository object {name} exists with other bytes "
                                      "(damaged?), and append_only: forbids replacing it; "
                                      "run 'lvbackup verify' from a host allowed to repair "
                                      "the repository") from None

    def get(self, name: str) -> bytes:
        return self.inner.get(name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return self.inner.get_range(name, offset, length)

    def get_range_into(self, name: str, offset: int, outs: list[memoryview]) -> None:
        self.inner.get_range_into(name, offset, outs)

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str) -> Iterator[tuple[str, str]]:
        return self.inner.list(prefix)

    def modified(self, name: str) -> float:
        return self.inner.modified(name)

    def token(self, name: str) -> str:
        return self.inner.token(name)

    def replace(self, name: str, data: Data, token: str) -> None:
        self.inner.replace(_coordination(name), data, token)

    def delete_if(self, name: str, token: str) -> None:
        self.inner.delete_if(_coordination(name), token)

    def delete(self, name: str) -> None:
        self.inner.delete(_coordination(name, "deleted"))

    def extend_locks(self) -> int:
        # A longer lock removes nothing: what append_only: is for.
        return self.inner.extend_locks()

    def release_expired(self) -> Held:
        raise AppendOnlyError("append_only: is set: past versions cannot be deleted")

    def overwritten(self) -> Sequence[tuple[str, float]]:
        return self.inner.overwritten()

    def remove_incomplete(self, older_than: float) -> int:
        # Unfinished puts are not objects: removing them destroys nothing stored.
        return self.inner.remove_incomplete(older_than)

    def close(self) -> None:
        self.inner.close()
