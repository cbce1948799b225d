"""A backend in memory, for tests: `mem://NAME` names one store shared by the process, so
that a test can open the same repository twice."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

from .base import (
    Backend,
    Capabilities,
    Conflict,
    Data,
    ObjectExists,
    check_name,
    check_prefix,
    check_span,
    missing,
    short_read,
)


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, tuple[bytes, str, float]] = {}
        # Tokens come from one counter, so that a name deleted and put again gets a new one.
        self.serial = itertools.count()


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


class MemoryBackend(Backend):
    capabilities = Capabilities(local_files=False, conditional_put=True, ranged_get=True)

    def __init__(self, store_name: str):
        with _stores_lock:
            self._store = _stores.setdefault(store_name, _Store())

    def _get(self, name: str) -> bytes:
        return self._entry(name)[0]

    def put(self, name: str, data: Data) -> None:
        copy = bytes(data)
        with self._store.lock:
            if check_name(name) in self._store.objects:
                raise ObjectExists(f"repository object {name} exists already")
            self._store.objects[name] = (copy, str(next(self._store.serial)), time.time())

    def replace(self, name: str, data: Data, token: str) -> None:
        copy = bytes(data)
        with self._store.lock:
            found = self._store.objects.get(check_name(name))
            if found is None or found[1] != token:
                raise Conflict(f"repository object {name} changed since it was read")
            self._store.objects[name] = (copy, str(next(self._store.serial)), time.time())

    def delete_if(self, name: str, token: str) -> None:
        with self._store.lock:
            found = self._store.objects.get(check_name(name))
            if found is not None and found[1] != token:
                raise Conflict(f"repository object {name} changed since it was read")
            self._store.objects.pop(name, None)

    def get(self, name: str) -> bytes:
        return self._get(name)

    @staticmethod
    def _check(name: str, offset: int, length: int, data: bytes) -> None:
        check_span(name, offset, length)
        if offset + length > len(data):
            raise short_read(name, offset, length, len(data))

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        data = self._get(name)
        self._check(name, offset, length, data)
        return data[offset:offset + length]

    def get_range_into(self, name: str, offset: int, outs: list[memoryview]) -> None:
        data = self._get(name)
        self._check(name, offset, sum(len(o) for o in outs), data)
        for out in outs:
            out[:] = data[offset:offset + len(out)]
            offset += len(out)

    def size(self, name: str) -> int:
        return len(self._get(name))

    def exists(self, name: str) -> bool:
        with self._store.lock:
            return check_name(name) in self._store.objects

    def list(self, prefix: str) -> Iterator[tuple[str, str]]:
        check_prefix(prefix)
        with self._store.lock:
            found = [(n, t) for n, (_, t, _) in self._store.objects.items()
                     if n.startswith(prefix)]
        yield from found

    def _entry(self, name: str) -> tuple[bytes, str, float]:
        with self._store.lock:
            found = self._store.objects.get(check_name(name))
        if found is None:
            raise missing(name)
        return found

    def token(self, name: str) -> str:
        return self._entry(name)[1]

    def modified(self, name: str) -> float:
        return self._entry(name)[2]

    def delete(self, name: str) -> None:
        with self._store.lock:
            self._store.objects.pop(check_name(name), None)

    def remove_incomplete(self, older_than: float) -> int:
        return 0  # a put is one step under the lock: nothing is ever left half-done

    def close(self) -> None:
        pass
