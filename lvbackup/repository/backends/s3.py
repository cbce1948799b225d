"""A backend in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, SeaweedFS, Garage),
through boto3: `s3://BUCKET/PREFIX`, object NAME stored under the key PREFIX/NAME.

Every object appears whole or not at all: a single PUT, or for a large object a multipart
upload that is visible only once completed. Both are write-once: `If-None-Match: *` makes
the store itself refuse a name that exists. An upload a killed run never completed stays
invisible (it is not an object) until remove_incomplete() aborts it.

Errors are translated once, in _call(): a missing key is MissingObject, refused credentials
or a missing bucket a UsageError (exit 2), an unreachable endpoint an Unreachable (exit 1)
naming it. Throttling and transient errors are retried with backoff by botocore itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import IO, Any, NoReturn, TypeVar, cast

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from ...base.errors import LvbackupError, UsageError
from ...base.faults import crash_point
from ...base.lru import LRU
from ...config import S3Settings
from .base import (
    Backend,
    Capabilities,
    Conflict,
    Data,
    Held,
    MissingObject,
    ObjectExists,
    ReadOnly,
    check_name,
    check_prefix,
    check_span,
    holds_no_backup,
    missing,
    short_read,
)

MULTIPART_OVER = 32 * 1024 * 1024   # a pack (16 MiB) is one PUT; larger objects go in parts
PART_SIZE = 16 * 1024 * 1024
MAX_CONNECTIONS = 32                # the data path's worker threads share one client
# A reader going through an object in order (a restore, segment after segment, from several
# workers) gets READ_AHEAD bytes per GET; the windows kept hold at most READ_AHEAD_BYTES, which
# bounds the memory (plus one being fetched per reader thread).
READ_AHEAD = 8 * 1024 * 1024
READ_AHEAD_BYTES = 6 * READ_AHEAD
_SCAN = 1024 * 1024                 # a read this large is taken for part of a scan
_GAP = 256 * 1024                   # ... as is the third of reads each starting this close
                                    # after the previous one's end
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_AUTH_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed", "403"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_REFUSED = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_NO_LOCK = {"ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound"}
DELETE_BATCH = 1000                 # keys a DeleteObjects request takes at most
UPKEEP_THREADS = 8                  # lock extension and release: one small request each

# botocore retries a request until its response's headers arrive; a body cut off after
# them (a dropped connection, a proxy's timeout) is asked for again here, as often and with
# the same backoff as its standard retry mode gives an error response.
ATTEMPTS = 5
_MAX_BACKOFF = 20.0
_CUT_OFF = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError,
            ConnectionClosedError)

T = TypeVar("T")


class Unreachable(LvbackupError):
    """The S3 endpoint did not answer (or kept failing) after botocore's retries."""


class _Version:
    """One stored version of an object, from a listing of versions."""
    __slots__ = ("id", "etag", "modified", "size", "marker", "latest")

    def __init__(self, entry: dict[str, Any], marker: bool):
        self.id: str = entry["VersionId"]
        self.etag: str = str(entry.get("ETag", ""))
        self.modified: float = entry["LastModified"].timestamp()
        self.size: int = int(entry.get("Size", 0))
        self.marker = marker
        self.latest: bool = bool(entry.get("IsLatest"))


def _newest_first(versions: list[_Version]) -> list[_Version]:
    # Times are whole seconds: at a tie the current one first, then an object before a
    # delete marker (a reader as of that second gets the data, never less).
    return sorted(versions, key=lambda v: (v.modified, v.latest, not v.marker), reverse=True)


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def parse_location(rest: str) -> tuple[str, str]:
    """(bucket, key prefix ending with '/' or '') of `s3://` + `rest`."""
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise UsageError(f"repository s3://{rest}: {bucket!r} is not a bucket name "
                         "(s3://BUCKET/PREFIX)")
    prefix = prefix.strip("/")
    if prefix:
        check_name(prefix)
    return bucket, prefix + "/" if prefix else ""


def credential_source(settings: S3Settings) -> str:
    """Where the credentials come from (never what they are)."""
    if settings.access_key_id:
        return "the configuration file (s3.access_key_id, s3.secret_access_key)"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
    found = boto3.session.Session().get_credentials()
    if found is None:
        return "none found (set s3.access_key_id, the AWS_* environment or an AWS profile)"
    return f"the AWS credential chain ({found.method})"


class _Body(io.RawIOBase):
    """A read-only, seekable file over a buffer: botocore sends it (and rewinds it for a
    retry) without the copy that bytes() of a 16 MiB pack would cost."""

    def __init__(self, view: memoryview):
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), len(self._view) - self._pos))
        memoryview(buf).cast("B")[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    @classmethod
    def of(cls, view: memoryview) -> IO[bytes]:
        # botocore reads any file-like object; its stubs name only IO.
        return cast(IO[bytes], cls(view))

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return len(self._view)


class _Window:
    """Bytes [start, start + READ_AHEAD) of one object (fewer at its end), fetched once for
    every read that falls in them."""

    def __init__(self, name: str, start: int):
        self.name = name
        self.start = start
        self.data = memoryview(b"")
        self.failed = False
        self.ready = threading.Event()


class _ReadAhead:
    """Ranged reads of an object read in order come from windows of READ_AHEAD bytes on a
    fixed grid, each fetched once: a GET costs the store a fixed amount of work whatever
    its size (SeaweedFS on this kind of machine: ~3 ms of CPU per GET, as much as serving
    4 MiB), and a restore asks for one run of chunks at a time, ~1 MiB each, from several
    workers at once. A read uses windows if they are there already, if it is large, or if
    it continues reads of the object that went forward, each starting just after the
    previous one, twice in a row. Other reads (gc's of a pack's footer and trailer or of
    chunks in id order, a mapped backup's random reads) get exactly the bytes they ask for:
    a window there would fetch megabytes for kilobytes. A read from window k
    past its middle has window k + 1 fetched meanwhile (once), if the object reaches it, so
    that a scan does not wait a round trip per window. Objects are never changed in place
    (put() and delete() forget their windows), so a window stays true."""

    def __init__(self, fetch: Callable[[str, int, int, bool], tuple[bytes, int]]):
        self._fetch = fetch     # (name, offset, length, exact) -> (bytes, the object's size)
        self._lock = threading.Lock()
        # Weighed by the bytes they hold (or will); one dropped still serves its readers.
        self._windows: LRU[tuple[str, int], _Window] = LRU(READ_AHEAD_BYTES)
        # Of the objects read last: where the last read ended and how many reads in a row
        # went forward, their sizes once known, and the last window fetched ahead.
        self._ends: LRU[str, tuple[int, int]] = LRU(64, self._forget_sizes)
        self._sizes: dict[str, int] = {}
        self._ahead: dict[str, int] = {}

    def read(self, name: str, offset: int, length: int) -> memoryview:
        first, last = offset // READ_AHEAD, (offset + length - 1) // READ_AHEAD
        with self._lock:
            end, streak = self._ends.peek(name) or (None, 0)
            streak = streak + 1 if end is not None and 0 <= offset - end <= _GAP else 0
            self._ends.put(name, (offset + length, streak))
            keys = [(name, k) for k in range(first, last + 1)]
            if length >= _SCAN or streak >= 2 or all(key in self._windows for key in keys):
                windows = [self._window(key) for key in keys]
                nxt = last + 1
                if (offset + length > nxt * READ_AHEAD - READ_AHEAD // 2
                        and nxt * READ_AHEAD < self._sizes.get(name, 0)
                        and nxt > self._ahead.get(name, -1)):
                    self._ahead[name] = nxt
                    ahead, mine = self._window((name, nxt))
                    if mine:
                        threading.Thread(target=self._fill, args=(ahead,), daemon=True,
                                         name="lvbackup-read-ahead").start()
            else:
                windows = None
        if windows is None:
            return memoryview(self._fetch(name, offset, length, True)[0])
        for window, mine in windows:
            if mine:
                self._fill(window)
            window.ready.wait()
        pieces = []
        for window, _ in windows:
            lo = max(offset, window.start) - window.start
            hi = min(offset + length, window.start + READ_AHEAD) - window.start
            if window.failed or hi > len(window.data):
                # Its own request: a missing or short object fails with the right error.
                return memoryview(self._fetch(name, offset, length, True)[0])
            pieces.append(window.data[lo:hi])
        return pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))

    def _fill(self, window: _Window) -> None:
        data, size = b"", None
        try:
            data, size = self._fetch(window.name, window.start, READ_AHEAD, False)
        except Exception:   # noqa: BLE001 - a read that needs it makes its own request
            window.failed = True
        except BaseException:
            window.failed = True
            raise
        finally:
            with self._lock:
                window.data = memoryview(data)
                key = (window.name, window.start // READ_AHEAD)
                if self._windows.peek(key) is window:
                    self._windows.reweigh(key, len(data))
                if size is not None and window.name in self._ends:
                    self._sizes[window.name] = size
            window.ready.set()

    def _window(self, key: tuple[str, int]) -> tuple[_Window, bool]:
        """Window (object, k), and whether the caller is to fetch it (under the lock)."""
        window = self._windows.get(key)
        if window is not None:
            return window, False
        window = _Window(key[0], key[1] * READ_AHEAD)
        self._windows.put(key, window, READ_AHEAD)   # all it may hold, until it came
        return window, True

    def _forget_sizes(self, name: str, _: object) -> None:
        self._sizes.pop(name, None)
        self._ahead.pop(name, None)

    def forget(self, name: str) -> None:
        with self._lock:
            for key in [key for key in self._windows if key[0] == name]:
                self._windows.pop(key)
            self._ends.pop(name)
            self._forget_sizes(name, None)


def _token(etag: str, modified: Any) -> str:
    # The ETag changes with the content; the time (whole seconds on many stores) tells
    # apart an object deleted and put again with the same bytes.
    return f"{etag.strip(chr(34))}@{modified.timestamp():.0f}"


class S3Backend(Backend):
    capabilities = Capabilities(local_files=False, conditional_put=True, ranged_get=True,
                                concurrent_puts=2, concurrent_gets=4,
                                token_resolution=1.0)

    def __init__(self, bucket: str, prefix: str, settings: S3Settings):
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = settings.endpoint_url or "AWS S3"
        session = boto3.session.Session(aws_access_key_id=settings.access_key_id,
                                        aws_secret_access_key=settings.secret_access_key,
                                        region_name=settings.region)
        self._client = session.client(
            "s3", endpoint_url=settings.endpoint_url,
            config=BotoConfig(s3={"addressing_style": cast(Any, settings.addressing_style)},
                              retries={"mode": "standard", "max_attempts": 5},
                              max_pool_connections=MAX_CONNECTIONS,
                              connect_timeout=10, read_timeout=120,
                              # A store that is not AWS may not know the newer checksums.
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required"))
        self._read_ahead = _ReadAhead(self._get_range)
        self.lock = settings.object_lock
        self._versioned: bool | None = True if self.lock else None
        # Under --as-of: the version of each object as the repository stood then.
        self.as_of = settings.as_of
        self._pinned: dict[str, _Version] | None = None

    @classmethod
    def open(cls, rest: str, create: bool, settings: S3Settings) -> S3Backend:
        bucket, prefix = parse_location(rest)
        backend = cls(bucket, prefix, settings)
        if backend.as_of is not None:
            if create:
                raise UsageError("--as-of opens a repository read-only: it cannot create one")
            backend._pin(backend.as_of)
        elif create and not backend.lock:
            # Fails early, in one line, on a missing bucket or refused credentials, before
            # a put that some stores answer by creating the bucket. A repository that is
            # opened is read first (its config), which fails the same way: no request more.
            backend._call("", lambda: backend._client.head_bucket(Bucket=bucket))
        elif backend.lock:
            backend.check_lock_configuration()
        return backend

    def check_lock_configuration(self) -> None:
        """Refuse a bucket without Object Lock (it cannot keep a version from deletion),
        before anything is written to it; the bucket's own settings are never changed."""
        try:
            reply = self._client.get_object_lock_configuration(Bucket=self.bucket)
            enabled = reply.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) not in _NO_LOCK:
                self._raise("", e)
            enabled = None
        except BotoCoreError as e:
            raise Unreachable(f"S3 endpoint {self.endpoint} failed: {e}") from None
        if enabled != "Enabled":
            raise UsageError(f"s3.object_lock is set but bucket {self.bucket} has no Object "
                             "Lock; Object Lock is chosen when a bucket is created: create a "
                             "new one with it (aws s3api create-bucket --bucket NAME "
                             "--object-lock-enabled-for-bucket) and use that")

    def versioning_enabled(self) -> bool:
        """Whether the bucket keeps every version of an object (versioning, which Object
        Lock implies): what makes append_only: real here, where the host's credentials
        may overwrite (docs/security.md)."""
        reply = self._call("", lambda: self._client.get_bucket_versioning(Bucket=self.bucket))
        return reply.get("Status") == "Enabled"

    # --- versions ---------------------------------------------------------------------------

    def _versions(self, prefix: str = "") -> dict[str, list[_Version]]:
        """Every version and delete marker under the repository's prefix (+ `prefix`),
        by object name, newest first."""
        found: dict[str, list[_Version]] = {}
        pages = iter(self._client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix))
        while True:
            page = self._call("", lambda: next(pages, None))
            if page is None:
                break
            for kind, marker in (("Versions", False), ("DeleteMarkers", True)):
                entries: Any = page.get(kind, [])
                for entry in entries:
                    name = entry["Key"][len(self.prefix):]
                    found.setdefault(name, []).append(_Version(entry, marker))
        return {name: _newest_first(vs) for name, vs in found.items()}

    def _pin(self, when: float) -> None:
        """Read every object as it stood at `when`: its newest version not newer."""
        pinned: dict[str, _Version] = {}
        for name, versions in self._versions().items():
            then = next((v for v in versions if v.modified <= when), None)
            if then is not None and not then.marker and not holds_no_backup(name):
                pinned[name] = then
        if "config" not in pinned:
            raise UsageError(f"--as-of {_utc(when):%Y-%m-%dT%H:%M:%SZ}: no repository "
                             f"existed at s3://{self.bucket}/{self.prefix} then")
        self._pinned = pinned

    def _version_of(self, name: str) -> dict[str, Any]:
        """The VersionId argument that reads `name` as of --as-of ({} for the current)."""
        if self._pinned is None or holds_no_backup(name):
            return {}
        found = self._pinned.get(name)
        if found is None:
            raise missing(name)
        return {"VersionId": found.id}

    def _writable(self, name: str) -> None:
        if self._pinned is not None and not holds_no_backup(name):
            raise ReadOnly(f"--as-of: the repository is read-only; {name} cannot be "
                           "written")

    def _lock_args(self, name: str) -> dict[str, Any]:
        if self.lock is None or holds_no_backup(name):
            return {}
        return {"ObjectLockMode": self.lock.mode.upper(),
                "ObjectLockRetainUntilDate": _utc(time.time() + self.lock.seconds)}

    def _is_versioned(self) -> bool:
        if self._versioned is None:
            self._versioned = self.versioning_enabled()
        return self._versioned

    def _drop_versions(self, doomed: list[tuple[str, str]]) -> list[str]:
        """Delete these (name, version id)s, a batch per request; the names of those the
        store refused (locked)."""
        refused = []
        for start in range(0, len(doomed), DELETE_BATCH):
            batch = doomed[start:start + DELETE_BATCH]
            reply = self._call("", partial(
                self._client.delete_objects, Bucket=self.bucket, Delete={
                    "Quiet": True, "Objects": [{"Key": self.prefix + name, "VersionId": vid}
                                               for name, vid in batch]}))
            refused += [e["Key"][len(self.prefix):] for e in reply.get("Errors", [])]
        return refused

    def _drop_past(self, name: str, *, also: str | None = None) -> None:
        """Delete the past versions of coordination object `name` (then version `also`),
        so that renewing a lease does not pile up versions in a versioned bucket."""
        if not self._is_versioned():
            return
        past = [(name, v.id) for v in self._versions(name).get(name, []) if not v.latest]
        if also is not None:
            past.append((name, also))
        self._drop_versions(past)

    def extend_locks(self) -> int:
        if self.lock is None or self._pinned is not None:
            return 0
        lock = self.lock
        now = time.time()
        horizon = now + lock.seconds / 2
        retention = cast(Any, {"Mode": lock.mode.upper(),
                               "RetainUntilDate": _utc(now + lock.seconds)})

        def extend(name: str) -> bool:
            head = self._head(name)
            current = head.get("ObjectLockRetainUntilDate")
            if current is not None and current.timestamp() > horizon:
                return False
            self._call(name, partial(
                self._client.put_object_retention, Bucket=self.bucket, Key=self._key(name),
                VersionId=head["VersionId"], Retention=retention))
            crash_point("lock-extended")
            return True

        # A compliance lock is never shorter than put time + days (nobody can shorten it):
        # a young object needs no request. A governance lock may have been shortened (with
        # bypass permission): each object's own date is asked. S3 sets one version's
        # retention per request (there is no batch form): they go UPKEEP_THREADS at a time.
        due = [name for name, modified in self._current()
               if lock.mode != "compliance" or modified + lock.seconds <= horizon]
        with ThreadPoolExecutor(UPKEEP_THREADS) as pool:
            return sum(pool.map(extend, due))

    def _current(self) -> Iterator[tuple[str, float]]:
        """(name, time put) of every current object that holds a backup."""
        pages = iter(self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix))
        while True:
            page = self._call("", lambda: next(pages, None))
            if page is None:
                return
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix):]
                if not holds_no_backup(name):
                    yield name, obj["LastModified"].timestamp()

    def release_expired(self) -> Held:
        if self.lock is None:
            return Held()
        now = time.time()
        history = self._versions()

        def until(name: str, version: _Version) -> float:
            # Its own date: a lock may have been extended (or, in governance mode,
            # shortened) since it was put.
            head = self._call(name, partial(self._client.head_object, Bucket=self.bucket,
                                            Key=self._key(name), VersionId=version.id))
            found = head.get("ObjectLockRetainUntilDate")
            return found.timestamp() if found is not None else 0.0

        past = [(name, v) for name, versions in history.items() for v in versions
                if not v.marker and not v.latest]
        with ThreadPoolExecutor(UPKEEP_THREADS) as pool:
            dates = list(pool.map(lambda p: 0.0 if holds_no_backup(p[0]) else until(*p),
                                  past))
        held = [(v, u) for (name, v), u in zip(past, dates, strict=True) if u > now]
        doomed = [(name, v.id) for (name, v), u in zip(past, dates, strict=True) if u <= now]
        # Markers go with the last version they hide: else the object would come back.
        keeps = {v.id for v, _ in held}
        for name, versions in history.items():
            if not any(v.id in keeps for v in versions):
                doomed += [(name, v.id) for v in versions if v.marker]
        refused = self._drop_versions(doomed)
        return Held(objects=len(held) + len(refused), bytes=sum(v.size for v, _ in held),
                    until=max((u for _, u in held), default=None))

    def overwritten(self) -> Sequence[tuple[str, float]]:
        if self.lock is None and not self._is_versioned():
            return []
        found = []
        for name, versions in self._versions().items():
            # Under --as-of: what had been overwritten by then (what the view reads).
            then = [v for v in versions if self.as_of is None or v.modified <= self.as_of]
            if holds_no_backup(name) or not then or then[0].marker:
                continue
            kept = [v for v in then if not v.marker]
            if len(kept) > 1 and kept[0].etag != kept[1].etag:
                found.append((name, kept[0].modified))
        return sorted(found)

    # --- errors ----------------------------------------------------------------------------

    def _call(self, name: str, request: Callable[[], T]) -> T:
        try:
            return request()
        except ClientError as e:
            self._raise(name, e)
        except NoCredentialsError:
            raise UsageError(f"no S3 credentials for s3://{self.bucket}: set "
                             "s3.access_key_id and s3.secret_access_key, or the "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment") from None
        except BotoCoreError as e:
            raise Unreachable(f"S3 endpoint {self.endpoint} failed: {e}") from None

    def _raise(self, name: str, e: ClientError) -> NoReturn:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _MISSING and name:
            raise missing(name) from None
        if code in ("NoSuchBucket",) or (code in _MISSING and not name):
            raise UsageError(f"S3 bucket {self.bucket} does not exist at {self.endpoint}; "
                             "create it first") from None
        if code in _AUTH_ERRORS:
            raise UsageError(f"S3 endpoint {self.endpoint} refused the credentials for "
                             f"bucket {self.bucket} ({code})") from None
        if code in _REFUSED:
            raise Conflict(f"repository object {name} exists already or changed") from None
        raise Unreachable(f"S3 endpoint {self.endpoint} failed on {name or self.bucket}: "
                          f"{code or status} {err.get('Message', '')}".rstrip()) from None

    def _key(self, name: str) -> str:
        return self.prefix + check_name(name)

    # --- writing --------------------------------------------------------------------------

    def put(self, name: str, data: Data, *, if_match: str | None = None) -> None:
        key = self._key(name)
        self._writable(name)
        self._read_ahead.forget(name)
        view = memoryview(data).cast("B")
        cond: dict[str, Any] = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        cond.update(self._lock_args(name))
        try:
            if len(view) <= MULTIPART_OVER:
                self._call(name, lambda: self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=_Body.of(view), ContentLength=len(view),
                    **cond))
            else:
                self._put_parts(name, key, view, cond)
        except Conflict:
            if if_match:
                raise
            raise ObjectExists(f"repository object {name} exists already") from None

    def _put_parts(self, name: str, key: str, view: memoryview, cond: dict[str, Any]) -> None:
        locked = self._lock_args(name)
        upload = self._call(name, lambda: self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, **locked))["UploadId"]
        try:
            parts: list[Any] = []
            for number, start in enumerate(range(0, len(view), PART_SIZE), 1):
                body = view[start:start + PART_SIZE]
                etag = self._call(name, partial(self._client.upload_part, Bucket=self.bucket,
                                                Key=key, UploadId=upload, PartNumber=number,
                                                Body=_Body.of(body), ContentLength=len(body)
                                                ))["ETag"]
                parts.append({"ETag": etag, "PartNumber": number})
            done = {k: v for k, v in cond.items() if k not in locked}
            self._call(name, lambda: self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload,
                MultipartUpload={"Parts": parts}, **done))
        except BaseException:
            # Best effort: what is left is aborted by remove_incomplete() later.
            with contextlib.suppress(BotoCoreError, ClientError):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                    UploadId=upload)
            raise

    def replace(self, name: str, data: Data, token: str) -> None:
        self.put(name, data, if_match=_etag(token))
        if holds_no_backup(name):
            self._drop_past(name)

    def delete(self, name: str) -> None:
        # In a versioned bucket this leaves a delete marker, which a lock never refuses:
        # the locked versions go when release_expired() finds their lock ended.
        key = self._key(name)
        self._writable(name)
        self._read_ahead.forget(name)
        reply = self._call(name, lambda: self._client.delete_object(Bucket=self.bucket,
                                                                     Key=key))
        if holds_no_backup(name):
            self._drop_past(name, also=reply.get("VersionId"))

    def delete_if(self, name: str, token: str) -> None:
        key = self._key(name)
        self._writable(name)
        try:
            reply = self._call(name, lambda: self._client.delete_object(
                Bucket=self.bucket, Key=key, IfMatch=_etag(token)))
        except Conflict:
            raise Conflict(f"repository object {name} changed since it was read") from None
        if holds_no_backup(name):
            self._drop_past(name, also=reply.get("VersionId"))

    def remove_incomplete(self, older_than: float) -> int:
        if self._pinned is not None:
            return 0
        cutoff = time.time() - older_than
        removed = 0
        pages = self._call("", lambda: list(self._client.get_paginator(
            "list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)))
        for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() > cutoff:
                    continue
                try:
                    self._call(upload["Key"], partial(self._client.abort_multipart_upload,
                                                      Bucket=self.bucket, Key=upload["Key"],
                                                      UploadId=upload["UploadId"]))
                except LvbackupError:
                    continue   # completed or aborted meanwhile
                removed += 1
        return removed

    # --- reading --------------------------------------------------------------------------

    def get(self, name: str) -> bytes:
        key = self._key(name)
        then = self._version_of(name)
        return self._call(name, lambda: self._whole(
            name, lambda: self._client.get_object(Bucket=self.bucket, Key=key, **then)))[0]

    def _whole(self, name: str, request: Callable[[], Any]) -> tuple[bytes, Any]:
        """A GET's body, all of it, and its reply: a body cut off is fetched again."""
        attempt = 1
        while True:
            reply = request()
            try:
                return reply["Body"].read(), reply
            except _CUT_OFF as e:
                if attempt == ATTEMPTS:
                    raise Unreachable(f"S3 endpoint {self.endpoint} cut off {name} "
                                      f"{ATTEMPTS} times: {e}") from None
            time.sleep(min(_MAX_BACKOFF, random.random() * 2 ** attempt))
            attempt += 1

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        return bytes(self._ranged(name, offset, length))

    def get_range_into(self, name: str, offset: int, outs: list[memoryview]) -> None:
        data = self._ranged(name, offset, sum(len(o) for o in outs))
        pos = 0
        for out in outs:
            out[:] = data[pos:pos + len(out)]
            pos += len(out)

    def _ranged(self, name: str, offset: int, length: int) -> memoryview:
        check_span(name, offset, length)
        if not length:
            size = self.size(name)
            if offset > size:
                raise short_read(name, offset, length, size)
            return memoryview(b"")
        return self._read_ahead.read(name, offset, length)

    def _get_range(self, name: str, offset: int, length: int, exact: bool
                   ) -> tuple[bytes, int]:
        """One GET of `length` bytes from `offset` (fewer if the object ends before, unless
        `exact`), and the object's size."""
        key = self._key(name)
        then = self._version_of(name)
        try:
            data, reply = self._whole(name, lambda: self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}",
                **then))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":
                raise short_read(name, offset, length, self.size(name)) from None
            self._raise(name, e)
        except BotoCoreError as e:
            raise Unreachable(f"S3 endpoint {self.endpoint} failed: {e}") from None
        total = int(str(reply.get("ContentRange", "/0")).rsplit("/", 1)[1])
        if len(data) != length and (exact or len(data) > length):
            raise short_read(name, offset, length, total)
        return data, total

    def _head(self, name: str) -> dict[str, Any]:
        key = self._key(name)
        then = self._version_of(name)
        return dict(self._call(name, lambda: self._client.head_object(Bucket=self.bucket,
                                                                       Key=key, **then)))

    def size(self, name: str) -> int:
        return int(self._head(name)["ContentLength"])

    def exists(self, name: str) -> bool:
        try:
            self._head(name)
        except MissingObject:
            return False
        return True

    def token(self, name: str) -> str:
        head = self._head(name)
        return _token(head["ETag"], head["LastModified"])

    def modified(self, name: str) -> float:
        return float(self._head(name)["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[tuple[str, str]]:
        full = self.prefix + check_prefix(prefix)
        if self._pinned is not None and not holds_no_backup(prefix):
            for name, v in list(self._pinned.items()):
                if name.startswith(prefix):
                    yield name, _token(v.etag, _utc(v.modified))
            return
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full)
        it = iter(pages)
        while True:
            page = self._call("", lambda: next(it, None))
            if page is None:
                return
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix):], _token(obj["ETag"], obj["LastModified"])

    def close(self) -> None:
        self._client.close()


def _etag(token: str) -> str:
    return '"' + token.rsplit("@", 1)[0] + '"'
