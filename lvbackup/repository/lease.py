"""Leases: the repository lock of a store shared between hosts (object storage).

A kernel lock (locks.py) reaches the processes of one host only; a bucket is shared by many.
So on such a store the repository lock is made of objects, like a reader-writer lock:

- `locks/exclusive`, held by the one `gc` or `prune` that may run at a time on any host;
- `locks/run-<random>`, one per run that reads or writes backups (create, restore,
  verify, delete): any number at once, from any host.

Each holds {host, pid, what, expires}; its holder rewrites it every third of its term (a
write conditional on the object being the one it wrote) and deletes it at the end. The
exclusive lease is created with a conditional write, so of two hosts only one gets it. A
run first writes its own lease, then looks at the other kind: a run that finds a live
exclusive lease withdraws its own (and waits, with --wait, or exits 75); a gc that finds a
live run lease keeps its exclusive one while it waits, so that new runs hold back and it
gets its turn. Whichever wrote second sees the first, the store being strongly consistent.
A host that died leaves leases that expire: an expired exclusive lease is taken over
(again conditionally, so only one run wins), expired run leases are deleted by the next
gc. Nobody ever removes a stale lock by hand; a lease of a process of this host that is
gone counts as expired at once.
Hosts' clocks are assumed to agree to well within the term (NTP).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..base.errors import LockedError, LvbackupError
from ..base.locks import pid_alive
from .backends import Backend, Conflict, MissingObject, ObjectExists

EXCLUSIVE = "locks/exclusive"
RUN_PREFIX = "locks/run-"
TERM = 120.0   # seconds a lease lasts unless renewed


class LeaseLost(LockedError):
    """The lease expired before it was renewed (the run stalled) and another run took it."""


class Lease:
    """One lease object this run holds, renewed by a thread until release()."""

    def __init__(self, storage: Backend, name: str, what: str, term: float):
        self.storage = storage
        self.name = name
        self.what = what
        self.term = term
        self._token: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lost: LeaseLost | None = None

    def body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                           "expires": time.time() + self.term,
                           "nonce": uuid.uuid4().hex}).encode()   # a new ETag every write

    def held(self) -> None:
        """The object is written: note its token and start renewing it."""
        self._token = self.storage.token(self.name)
        self._start_renewing()

    def after_fork(self) -> None:
        """In a process that has just forked (a daemon): the renewing thread stayed behind.
        Rewrite the lease at once, so that it names this process, and renew it from here."""
        if self._renew_once():
            self._start_renewing()

    def _start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew, name="lvbackup-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.term / 3):
            if not self._renew_once():
                return

    def _renew_once(self) -> bool:
        """Rewrite the lease; False once it is lost."""
        try:
            assert self._token is not None
            self.storage.replace(self.name, self.body(), self._token)
            self._token = self.storage.token(self.name)
        except (Conflict, MissingObject):
            self._lost = LeaseLost(f"the repository lease of this {self.what} expired and "
                                   "was taken by another run; stopped before deleting more")
            return False
        except LvbackupError:
            pass   # the store did not answer: the next renewal tries again
        return True

    def check(self) -> None:
        """Raise LeaseLost if the lease is no longer this run's (before deleting anything)."""
        if self._lost is not None:
            raise self._lost

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self._token is not None and self._lost is None:
            # Only the object this run wrote: one taken over meanwhile is the other run's.
            # If the store does not answer, the lease expires by itself.
            with contextlib.suppress(LvbackupError):
                self.storage.delete_if(self.name, self._token)
        self._token = None


def _read(storage: Backend, name: str) -> tuple[str, dict[str, Any]] | None:
    """(token, contents) of a lease object; None if it is gone. Unreadable contents count
    as expired (a lease never written whole cannot be live)."""
    try:
        token = storage.token(name)   # before the read: a change since fails a replace
        data = json.loads(storage.get(name))
    except MissingObject:
        return None
    except ValueError:
        data = {}
    return token, _usable(data) if isinstance(data, dict) else {}


def _usable(holder: dict[str, Any]) -> dict[str, Any]:
    """The contents without the numbers a damaged or forged lease could make unusable: an
    expiry that is no finite number (the lease then counts as expired), a pid that no
    process can have."""
    out = dict(holder)
    expires, pid = out.get("expires"), out.get("pid")
    if not (isinstance(expires, (int, float)) and not isinstance(expires, bool)
            and -1e18 < expires < 1e18):   # NaN fails too
        out.pop("expires", None)
    if type(pid) is not int or not 0 < pid < 1 << 31:
        out.pop("pid", None)
    return out


def _live(holder: dict[str, Any]) -> bool:
    """Unexpired, and not held by a process of this host that is gone (killed: its lease
    need not be waited out)."""
    expires = holder.get("expires")
    if not isinstance(expires, (int, float)) or expires <= time.time():
        return False
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        return pid_alive(pid)
    return True


def _refusal(holder: dict[str, Any], why: str) -> LockedError:
    left = max(0, int(holder.get("expires", 0) - time.time()))
    return LockedError(f"{why}: {holder.get('what', 'a run')} on host {holder.get('host', '?')} "
                       f"(pid {holder.get('pid', '?')}; its lease expires in {left} s unless "
                       "renewed); retry later or pass --wait SECONDS")


def _waiting(wait: float) -> Callable[[], bool]:
    """A function that sleeps a little and says whether there is time left to wait."""
    deadline = time.monotonic() + max(wait, 0.0)

    def more() -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(1.0, left))
        return True

    return more


def _take_exclusive(lease: Lease) -> dict[str, Any] | None:
    """Take the exclusive lease if it is free or expired: None; else its live holder."""
    try:
        lease.storage.put(EXCLUSIVE, lease.body())
        return None
    except ObjectExists:
        pass
    found = _read(lease.storage, EXCLUSIVE)
    if found is None:
        return {}   # released meanwhile: try again
    token, holder = found
    if _live(holder):
        return holder
    try:
        lease.storage.replace(EXCLUSIVE, lease.body(), token)   # an expired one: take over
        return None
    except (Conflict, MissingObject):
        return {}   # another run took it over first, or it was released: look again


def _live_runs(storage: Backend, prune: bool) -> dict[str, Any] | None:
    """A live run lease (its contents) if there is one; with `prune`, expired ones (of
    runs that died) are deleted on the way."""
    for name, _ in list(storage.list(RUN_PREFIX.rsplit("/", 1)[0] + "/")):
        if not name.startswith(RUN_PREFIX):
            continue
        found = _read(storage, name)
        if found is None:
            continue
        token, holder = found
        if _live(holder):
            return holder
        if prune:
            with contextlib.suppress(Conflict, MissingObject):
                storage.delete_if(name, token)
    return None


@contextmanager
def exclusive(storage: Backend, what: str, wait: float = 0.0, term: float = TERM
              ) -> Iterator[Lease]:
    """Hold the exclusive lease while no run holds a run lease (gc, prune)."""
    more = _waiting(wait)
    lease = Lease(storage, EXCLUSIVE, what, term)
    while True:
        holder = _take_exclusive(lease)
        if holder is None:
            break
        if holder and not more():
            raise _refusal(holder, "the repository is locked by another host's run")
    lease.held()
    try:
        while (running := _live_runs(storage, prune=True)) is not None:
            if not more():
                raise _refusal(running, "the repository is in use by another host's run")
        yield lease
    finally:
        lease.release()


@contextmanager
def shared(storage: Backend, what: str, wait: float = 0.0, term: float = TERM
           ) -> Iterator[Lease]:
    """Hold a run lease while no exclusive lease is live (backups, restores, deletes)."""
    more = _waiting(wait)
    lease = Lease(storage, f"{RUN_PREFIX}{uuid.uuid4().hex}", what, term)
    while True:
        storage.put(lease.name, lease.body())
        found = _read(storage, EXCLUSIVE)
        if found is None or not _live(found[1]):
            break
        # Withdrawn while waiting: a gc that holds the exclusive lease waits for run
        # leases to go, so both waiting on each other would only time out.
        storage.delete(lease.name)
        if not more():
            raise _refusal(found[1], "the repository is locked by another host's run")
    lease.held()
    try:
        yield lease
    finally:
        lease.release()
