"""On object storage the index cache lists the repository's index only when it has to:
when `index-changes` was replaced (gc, a damage mark), when its last listing is an hour
old, or when a read misses a chunk. Two caches of one repository in the memory backend
(an object store's contract) stand for two hosts sharing a bucket; the real store's run
is in test_s3.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lvbackup.repository import index
from lvbackup.repository.backends.appendonly import AppendOnlyBackend, AppendOnlyError
from lvbackup.repository.repo import Repository

BS = 64 * 1024


def store_chunks(repo: Repository, run: str, seed: int, n: int = 3) -> list[bytes]:
    """Chunks stored and indexed by a run of `repo`; their ids."""
    packer = repo.packer(run)
    ids = []
    for i in range(n):
        plain = os.urandom(8) + bytes([seed, i]) * 1000
        cid = repo.codec.chunk_id(plain)
        packer.add_if_missing(cid, plain, 1)
        ids.append(cid)
    packer.commit()
    return ids


class Host:
    """A repository opened with a cache of its own; counts what its storage lists."""

    def __init__(self, location: str, cache: Path, lock_dir: Path):
        self.repo = Repository.open(location, cache)
        self.lock_dir = lock_dir
        self.listed: list[str] = []
        lister = self.repo.storage.list

        def counted(prefix: str):
            self.listed.append(prefix)
            return lister(prefix)

        self.repo.storage.list = counted  # type: ignore[method-assign]

    def sync(self, **kw) -> list[str]:
        self.listed.clear()
        self.repo.sync_index(self.lock_dir, **kw)
        return list(self.listed)


@pytest.fixture
def hosts(tmp_path) -> Iterator[tuple[Host, Host]]:
    location = f"mem://index-{uuid.uuid4().hex}"
    Repository.init(location, tmp_path / "init-cache", BS)[0].close()
    one = Host(location, tmp_path / "cache-one", tmp_path / "locks")
    two = Host(location, tmp_path / "cache-two", tmp_path / "locks")
    (tmp_path / "locks").mkdir()
    yield one, two
    one.repo.close()
    two.repo.close()


def test_a_second_run_does_not_list_and_a_change_announced_lists_again(hosts):
    one, two = hosts
    assert "index/" in one.sync(), "a cache that never listed lists"
    assert one.repo.storage.exists(index.CHANGES)
    assert one.sync() == [], "nothing changed: no listing"
    index.announce_change(two.repo.storage)
    listed = one.sync()
    assert "index/" in listed and "damaged/" in listed
    assert one.sync() == []
    assert "index/" in one.sync(full=True)


def test_a_listing_an_hour_old_is_listed_again(hosts, monkeypatch):
    one, _ = hosts
    one.sync()
    assert one.sync() == []
    later = index.time.time() + index.RELIST_AFTER + 1
    monkeypatch.setattr(index.time, "time", lambda: later)
    assert "index/" in one.sync()


def test_a_read_that_misses_lists_and_finds_another_hosts_chunks(hosts):
    one, two = hosts
    one.sync()
    two.sync()
    ids = store_chunks(two.repo, "run-two", seed=1)   # another host's new index file
    assert one.sync() == [], "no change announced: the cache stands"
    # A backup's lookup (undamaged: a miss is a new chunk) does not list ...
    assert one.repo.index.lookup(ids, undamaged=True) == {}
    assert one.listed == []
    # ... a read does, once, and finds them.
    assert one.repo.read_pages(ids).keys() == set(ids)
    assert one.listed.count("index/") == 1
    more = store_chunks(two.repo, "run-two-b", seed=2)
    one.listed.clear()
    assert one.repo.index.lookup(more) == {}, "written after this run listed"
    assert one.listed == [], "a run lists at most once"
    assert "index/" in one.sync(full=True)
    assert set(one.repo.index.lookup(more)) == set(more)


def test_a_damage_mark_is_announced(hosts):
    one, two = hosts
    ids = store_chunks(one.repo, "run-one", seed=3)
    two.sync()
    assert two.sync() == []
    ref = one.repo.index.lookup(ids)[ids[0]]
    one.repo.quarantine(ref)
    assert "damaged/" in two.sync()
    assert ids[0] not in two.repo.index.lookup(ids, undamaged=True), \
        "the other host no longer deduplicates against the damaged copy"


def test_append_only_storage_replaces_coordination_objects_only(hosts):
    one, _ = hosts
    one.sync()
    store_chunks(one.repo, "run-one", seed=4)
    storage = AppendOnlyBackend(one.repo.storage)
    before = storage.token(index.CHANGES)
    index.announce_change(storage)   # allowed: it holds no backup
    assert storage.token(index.CHANGES) != before
    name = next(n for n, _ in storage.list("index/"))
    with pytest.raises(AppendOnlyError, match="cannot be replaced"):
        storage.replace(name, b"x", storage.token(name))
    with pytest.raises(AppendOnlyError):
        storage.delete_if(name, storage.token(name))
    assert storage.exists(name)


def test_a_local_directory_is_listed_every_run(tmp_path):
    location = tmp_path / "repo"
    Repository.init(location, tmp_path / "init-cache", BS)[0].close()
    (tmp_path / "locks").mkdir()
    host = Host(str(location), tmp_path / "cache", tmp_path / "locks")
    assert "index/" in host.sync() and "index/" in host.sync()
    index.announce_change(host.repo.storage)
    assert not host.repo.storage.exists(index.CHANGES)
    host.repo.close()
