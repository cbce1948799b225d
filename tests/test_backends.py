"""The storage backend contract: one suite that every backend runs (local on disk, local on
tmpfs, memory, S3 on a real SeaweedFS server), and the registry that picks a backend from a
repository location."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest

from lvbackup.base import diskio
from lvbackup.base.errors import CorruptionError, UsageError
from lvbackup.repository.backends import (
    Backend,
    Conflict,
    LocalBackend,
    MemoryBackend,
    MissingObject,
    ObjectExists,
    open_backend,
)
from lvbackup.repository.backends import local as local_backend
from lvbackup.repository.codec import FLAG_RAW
from lvbackup.repository.repo import Repository

import support

SHM = Path("/dev/shm")
BIG = 64 * 1024 * 1024


@pytest.fixture(params=["local", "local-tmpfs", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        b: Backend = LocalBackend.open(tmp_path / "repo", create=True)
    elif request.param == "local-tmpfs":
        if not (SHM.is_dir() and os.access(SHM, os.W_OK)):
            pytest.skip("/dev/shm is not a writable tmpfs here")
        root = SHM / f"lvbackup-test-{uuid.uuid4().hex}"
        request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
        b = LocalBackend.open(root, create=True)
    elif request.param == "s3":
        server, bucket = request.getfixturevalue("s3server"), request.getfixturevalue("s3_bucket")
        b = open_backend(f"s3://{bucket}/contract-{uuid.uuid4().hex}", create=True,
                         s3=support.s3_settings(server))
    else:
        b = MemoryBackend(f"contract-{uuid.uuid4().hex}")
    yield b
    for name, _ in list(b.list("")):   # frees a memory store, which outlives the object
        b.delete(name)
    b.close()


def local_root(backend: Backend) -> Path:
    if not backend.capabilities.local_files:
        pytest.skip("objects are not local files in this backend")
    assert isinstance(backend, LocalBackend)
    return backend.root


def big_payload() -> memoryview:
    """64 MiB in a page-aligned buffer, as the packer hands over (O_DIRECT for local)."""
    buf = diskio.aligned_buffer(BIG)
    block = random.Random(1).randbytes(1 << 20)
    for i in range(BIG >> 20):
        buf[i << 20:(i + 1) << 20] = block[i:] + block[:i]   # no two MiB alike
    return memoryview(buf)


# --- atomic visibility ---------------------------------------------------------------------

def test_a_reader_never_sees_a_partial_object(backend: Backend) -> None:
    data = big_payload()
    tail = bytes(data[-4096:])
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def poll() -> None:
        try:
            while not done.is_set():
                listed = dict(backend.list("big/"))
                if backend.exists("big/obj"):
                    assert backend.size("big/obj") == BIG
                    assert backend.get_range("big/obj", BIG - 4096, 4096) == tail
                    seen.append(1)
                for name in listed:
                    assert backend.size(name) == BIG
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(e)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        backend.put("big/obj", data)
        time.sleep(0.05)   # let the reader see the object whole at least once
    finally:
        done.set()
        reader.join()
    assert not errors, errors[0]
    assert seen, "the reader never saw the finished object"
    assert backend.get("big/obj") == data


def test_a_failing_put_leaves_nothing_visible(backend: Backend,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = local_root(backend)
    real = local_backend.pwrite_all

    def fail_halfway(fd: int, data: memoryview, pos: int, padded: memoryview | None = None
                     ) -> None:
        real(fd, data[:len(data) // 2], pos)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_backend, "pwrite_all", fail_halfway)
    with pytest.raises(OSError, match="No space"):
        backend.put("packs/ab/obj", b"x" * 100_000)
    assert not backend.exists("packs/ab/obj")
    assert list(backend.list("")) == []
    assert not list((root / "tmp").iterdir()), "the temporary file is removed"


def test_a_killed_put_leaves_nothing_visible_and_remove_incomplete_clears_it(
        backend: Backend) -> None:
    root = local_root(backend)
    # The child stops for good at its fsync (all written, nothing published) and is killed.
    script = ("import os, sys, time\n"
              "from lvbackup.repository.backends import LocalBackend\n"
              "os.fsync = lambda fd: (print('written', flush=True), time.sleep(600))\n"
              "LocalBackend(sys.argv[1]).put('packs/cd/obj', bytes(8 << 20))\n")
    with subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "written\n"
        finally:
            proc.kill()
    assert not backend.exists("packs/cd/obj") and list(backend.list("")) == []
    assert len(list((root / "tmp").iterdir())) == 1
    assert backend.remove_incomplete(older_than=0) == 1
    assert not list((root / "tmp").iterdir())


# --- write-once ------------------------------------------------------------------------------

def test_a_second_put_is_refused_and_keeps_the_first(backend: Backend) -> None:
    backend.put("index/a", b"first")
    with pytest.raises(ObjectExists, match="index/a"):
        backend.put("index/a", b"second")
    assert backend.get("index/a") == b"first"
    backend.put_content_addressed("index/a", b"first")   # already there: success
    assert backend.get("index/a") == b"first"


def test_a_content_addressed_put_replaces_a_damaged_copy(backend: Backend) -> None:
    backend.put("packs/12/obj", b"flipped bit")
    backend.put_content_addressed("packs/12/obj", b"flipped bIt")
    assert backend.get("packs/12/obj") == b"flipped bIt"


def test_concurrent_writers(backend: Backend) -> None:
    n = 8
    barrier = threading.Barrier(n)
    won: list[int] = []
    refused: list[int] = []
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            barrier.wait()
            backend.put(f"own/{k}", bytes([k]) * 300_000)
            try:
                backend.put("race/one", bytes([k]) * 300_000)
                won.append(k)
            except ObjectExists:
                refused.append(k)
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for k in range(n):
        assert backend.get(f"own/{k}") == bytes([k]) * 300_000
    assert backend.capabilities.conditional_put
    assert len(won) == 1 and sorted(won + refused) == list(range(n))
    assert backend.get("race/one") == bytes(won) * 300_000


# --- reads -----------------------------------------------------------------------------------

def test_ranged_reads_at_the_edges(backend: Backend) -> None:
    data = random.Random(2).randbytes(10_000)
    backend.put("packs/ee/obj", data)
    assert backend.size("packs/ee/obj") == len(data)
    assert backend.get_range("packs/ee/obj", 0, 10) == data[:10]
    assert backend.get_range("packs/ee/obj", 9_999, 1) == data[-1:]
    assert backend.get_range("packs/ee/obj", 10_000, 0) == b""
    for offset, length in [(9_990, 11), (10_000, 1), (20_000, 0)]:
        with pytest.raises(CorruptionError, match=f"packs/ee/obj is truncated: {length} bytes "
                                                  f"at offset {offset} asked for, it has 10000"):
            backend.get_range("packs/ee/obj", offset, length)
    with pytest.raises(ValueError):
        backend.get_range("packs/ee/obj", -1, 1)


def test_get_range_into_several_buffers(backend: Backend) -> None:
    data = random.Random(3).randbytes(20_000)
    backend.put("packs/ff/obj", data)
    bufs = [bytearray(n) for n in (3, 4096, 1, 0, 7000)]
    backend.get_range_into("packs/ff/obj", 100, [memoryview(b) for b in bufs])
    assert b"".join(bufs) == data[100:100 + sum(map(len, bufs))]
    last = bytearray(8)
    backend.get_range_into("packs/ff/obj", 19_992, [memoryview(last)])
    assert last == data[-8:]
    with pytest.raises(CorruptionError, match="truncated"):
        backend.get_range_into("packs/ff/obj", 19_000, [memoryview(bytearray(999)),
                                                        memoryview(bytearray(2))])


def test_missing_objects(backend: Backend) -> None:
    calls: list[Callable[[], object]] = [
        lambda: backend.get("packs/00/none"), lambda: backend.size("packs/00/none"),
        lambda: backend.get_range("packs/00/none", 0, 1), lambda: backend.token("packs/00/none"),
        lambda: backend.get_range_into("packs/00/none", 0, [memoryview(bytearray(1))])]
    for call in calls:
        with pytest.raises(MissingObject, match="packs/00/none is missing"):
            call()
    assert not backend.exists("packs/00/none")


# --- listing and deleting --------------------------------------------------------------------

def test_listing_by_prefix_and_tokens(backend: Backend) -> None:
    for name in ["index/a", "index/b", "indexes/c", "packs/aa/x", "packs/bb/y", "config"]:
        backend.put(name, name.encode())
    assert sorted(n for n, _ in backend.list("index/")) == ["index/a", "index/b"]
    assert sorted(n for n, _ in backend.list("packs/")) == ["packs/aa/x", "packs/bb/y"]
    assert sorted(n for n, _ in backend.list("")) == [
        "config", "index/a", "index/b", "indexes/c", "packs/aa/x", "packs/bb/y"]
    assert list(backend.list("nothing/")) == []
    first = dict(backend.list("index/"))
    assert first == dict(backend.list("index/"))
    assert first["index/a"] == backend.token("index/a")
    backend.delete("index/a")
    time.sleep(backend.capabilities.token_resolution)   # a store that dates to the second
    backend.put("index/a", b"index/a")   # the same bytes: only the token tells it apart
    again = dict(backend.list("index/"))
    assert again["index/a"] != first["index/a"] and again["index/b"] == first["index/b"]
    with pytest.raises(ValueError, match="prefix"):
        list(backend.list("index"))


def test_delete(backend: Backend) -> None:
    backend.put("manifests/m", b"m")
    backend.delete("manifests/m")
    assert not backend.exists("manifests/m") and list(backend.list("manifests/")) == []
    with pytest.raises(MissingObject):
        backend.get("manifests/m")
    backend.delete("manifests/m")   # idempotent: a killed deletion is simply repeated
    backend.put("manifests/m", b"again")
    assert backend.get("manifests/m") == b"again"


def test_modified_is_when_the_object_was_put(backend: Backend) -> None:
    before = time.time()
    backend.put("packs/aa/when", b"x")
    # Within a second either way: object stores date objects to the whole second.
    assert before - 1 <= backend.modified("packs/aa/when") <= time.time() + 1
    with pytest.raises(MissingObject):
        backend.modified("packs/aa/none")


def test_conditional_replace_and_delete(backend: Backend) -> None:
    if backend.capabilities.local_files:
        pytest.skip("a local directory is locked by the kernel, not by leases in it")
    backend.put("locks/l", b"mine")
    mine = backend.token("locks/l")
    backend.replace("locks/l", b"renewed", mine)
    renewed = backend.token("locks/l")
    assert backend.get("locks/l") == b"renewed" and renewed != mine
    with pytest.raises(Conflict):
        backend.replace("locks/l", b"stale", mine)   # another run renewed it meanwhile
    with pytest.raises(Conflict):
        backend.delete_if("locks/l", mine)
    assert backend.get("locks/l") == b"renewed"
    backend.delete_if("locks/l", renewed)
    assert not backend.exists("locks/l")


def test_nothing_incomplete_after_puts_that_finished(backend: Backend) -> None:
    backend.put("a/b", b"1")
    backend.put("a/c", b"y" * 5000)
    assert backend.remove_incomplete(older_than=0) == 0
    assert sorted(n for n, _ in backend.list("a/")) == ["a/b", "a/c"]


def test_remove_incomplete_keeps_fresh_ones(backend: Backend) -> None:
    root = local_root(backend)
    backend.put("config", b"c")
    tmp = root / "tmp"
    stale, fresh = tmp / "stale.tmp", tmp / "fresh.tmp"
    stale.write_bytes(b"left by a killed run")
    fresh.write_bytes(b"a put in progress")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert backend.remove_incomplete(older_than=600) == 1
    assert not stale.exists() and fresh.exists()
    assert backend.get("config") == b"c"


@pytest.mark.parametrize("name", ["/abs", "../x", "a/../b", "", "a//b", "a/", ".", "a/./b"])
def test_bad_names_are_refused(backend: Backend, name: str) -> None:
    for call in [lambda: backend.put(name, b"x"), lambda: backend.get(name),
                 lambda: backend.exists(name), lambda: backend.delete(name)]:
        with pytest.raises(ValueError, match="bad object name"):
            call()


def test_the_local_temporary_area_is_not_an_object_name(backend: Backend) -> None:
    local_root(backend)
    with pytest.raises(ValueError, match="bad object name"):
        backend.put("tmp/x", b"x")


# --- the registry --------------------------------------------------------------------------

def test_open_backend_by_location(tmp_path: Path) -> None:
    locations: list[str | Path] = [tmp_path / "a", str(tmp_path / "a"), f"file://{tmp_path / 'a'}"]
    for location in locations:
        b = open_backend(location, create=True)
        assert isinstance(b, LocalBackend) and b.root == tmp_path / "a"
    name = f"mem://registry-{uuid.uuid4().hex}"
    one, two = open_backend(name), open_backend(name)
    assert isinstance(one, MemoryBackend)
    one.put("config", b"shared")
    assert two.get("config") == b"shared"
    one.delete("config")


def test_open_backend_refuses_an_unknown_scheme_or_an_unwritable_directory(
        tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown scheme 'xyz'"):
        open_backend("xyz://bucket/repo")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UsageError, match="is not writable: .*check the path and its permissions"):
        open_backend(tmp_path / "file" / "repo", create=True)


def test_a_repository_in_memory_opened_twice(tmp_path: Path) -> None:
    location = f"mem://repo-{uuid.uuid4().hex}"
    repo, created = Repository.init(location, tmp_path / "cache", None)
    assert created
    chunk = b"chunk" * 1000
    chunk_id = blake3.blake3(chunk).digest()
    packer = repo.packer("run-1")
    packer.add(chunk_id, chunk, len(chunk), FLAG_RAW)
    packer.commit()
    repo.close()
    again, created = Repository.init(location, tmp_path / "cache2", None)
    assert not created and again.id == repo.id
    again.sync_index(tmp_path / "locks")
    (ref,) = again.index.lookup([chunk_id]).values()
    assert again.read_chunk(ref) == chunk
    again.close()
