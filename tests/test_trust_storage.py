"""Metadata an attacker who can write to the storage could replay or plant, through the
installed command, on unencrypted and encrypted repositories: index files gc deleted put
back, damage marks that do not unseal."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import uuid
from pathlib import Path

import pytest

from lvbackup.base.errors import EXIT_DAMAGED
from lvbackup.datapath.backup import write_backup
from lvbackup.datapath.blockmap import FileBlocks
from lvbackup.datapath.unpack import restore_blocks
from lvbackup.repository import lease
from lvbackup.repository.backends import MemoryBackend
from lvbackup.repository.codec import PLAIN
from lvbackup.repository.index import ChunkIndex, announce_change, encode_index, encode_mark
from lvbackup.repository.pack import ENTRY, FOOTER, ChunkRef, pack_name
from lvbackup.repository.repo import Repository

from support import KiB, MiB, Workdir, describe, flip_byte, make_image

PASSPHRASE = "trust storage passphrase"


@pytest.fixture(params=["plain", "encrypted"])
def wd(request, tmp_path: Path) -> Workdir:
    extra = {}
    if request.param == "encrypted":
        secret = tmp_path / "passphrase"
        secret.write_text(PASSPHRASE + "\n")
        secret.chmod(0o600)
        extra["passphrase_file"] = str(secret)
    w = Workdir(tmp_path / "wd", **extra)
    args = ["--encryption"] if extra else []
    p = w.run("init", "--block-size", "64K", *args)
    assert p.returncode == 0, describe(p)
    return w


def test_replayed_index_files_never_make_a_backup_reuse_deleted_packs(wd: Workdir,
                                                                     tmp_path: Path) -> None:
    """After delete + gc, the old index files put back (they still authenticate) name
    packs that no longer exist: the next backup of the same data stores it again."""
    img = tmp_path / "disk.img"
    data = make_image(img, 6, seed=71, tail=777)
    first = wd.create(img)
    aside = tmp_path / "aside"
    shutil.copytree(wd.repo / "index", aside)
    assert wd.run("delete", first["id"]).returncode == 0
    p = wd.run("gc")
    assert p.returncode == 0, describe(p)
    assert wd.pack_bytes() == 0
    shutil.copytree(aside, wd.repo / "index", dirs_exist_ok=True)
    again = wd.create(img)
    assert again["stored_bytes"] > 0 and wd.pack_bytes() > 0
    wd.assert_restores(again["id"], data)
    # A later backup finds the data it needs in the packs that do exist.
    third = wd.create(img)
    assert third["stored_bytes"] == 0
    wd.assert_restores(third["id"], data)



def trailer(pack: Path) -> list[tuple[bytes, int, int, int, int]]:
    """A pack file's trailer entries (in clear, encrypted or not): (chunk id, offset,
    stored length, plain length, flags)."""
    data = pack.read_bytes()
    count = FOOTER.unpack_from(data, len(data) - FOOTER.size)[0]
    start = len(data) - FOOTER.size - count * ENTRY.size
    return list(ENTRY.iter_unpack(data[start:len(data) - FOOTER.size]))


def packs(wd: Workdir) -> list[Path]:
    return sorted(p for p in (wd.repo / "packs").rglob("*") if p.is_file())


def test_planted_damage_marks_are_ignored_and_reported(wd: Workdir, tmp_path: Path) -> None:
    """Empty objects named like the damage marks of every chunk: the next backup of the
    same data still reuses it all, verify names each planted mark, and restores work."""
    img = tmp_path / "disk.img"
    data = make_image(img, 5, seed=72)
    first = wd.create(img)
    (wd.repo / "damaged").mkdir()
    planted = []
    for pack in packs(wd):
        for cid, *_ in trailer(pack):
            name = f"damaged/{cid.hex()}.{pack.name}"
            (wd.repo / name).write_bytes(b"")
            planted.append(name)
    assert len(planted) > 40
    again = wd.create(img)
    assert again["stored_bytes"] == 0, again
    p = wd.verify("--deep")
    assert p.returncode == EXIT_DAMAGED and "Traceback" not in p.stderr, describe(p)
    for name in planted:
        assert f"damage mark {name}" in p.stdout, describe(p)
    assert [ln for ln in p.stdout.splitlines() if ln.startswith("ok")] != []
    for backup in (first, again):
        assert wd.restore_bytes(backup["id"]) == data


def test_a_real_damage_mark_is_honoured_by_a_fresh_cache(wd: Workdir, tmp_path: Path) -> None:
    """A mark verify wrote unseals: another host (here, the cache deleted) honours it, and
    the next backup stores the damaged chunk again."""
    img = tmp_path / "disk.img"
    data = make_image(img, 4, seed=73)
    first = wd.create(img)
    pack = packs(wd)[0]
    _, offset, length, _, _ = trailer(pack)[0]
    flip_byte(pack, offset + length // 2)
    assert wd.verify("--deep").returncode == EXIT_DAMAGED
    assert len(wd.files("damaged")) == 1
    shutil.rmtree(wd.cache)
    again = wd.create(img)
    assert again["stored_bytes"] > 0
    p = wd.verify("--deep")
    assert p.returncode == 0 and "damage mark" not in p.stdout, describe(p)
    assert wd.restore_bytes(first["id"]) == data


def test_reused_packs_are_looked_for_once_per_pack_and_run(tmp_path: Path, monkeypatch) -> None:
    """The check costs one stat (a HEAD on object storage) per pack a run reuses: not one
    per chunk, and none for a run that reuses nothing."""
    repo, _ = Repository.init(tmp_path / "repo", tmp_path / "cache", 64 * KiB)
    data = random.Random(5).randbytes(40 * MiB)
    first = _backup(repo, data)
    packs = {name for name, _ in repo.storage.list("packs/")}
    assert len(packs) >= 3
    asked: list[str] = []
    exists = repo.storage.exists
    monkeypatch.setattr(repo.storage, "exists", lambda name: asked.append(name) or exists(name))
    second = _backup(repo, data)
    assert sorted(asked) == sorted(packs)
    asked.clear()
    _backup(repo, random.Random(6).randbytes(2 * MiB))
    assert asked == []
    for backup_id in (first, second):
        restored = b"".join(bytes(seg.view) for seg in restore_blocks(
            repo, repo.manifest(backup_id), workers=2, fill_holes=True))
        assert restored == data
    repo.close()


def _backup(repo: Repository, data: bytes) -> str:
    backup_id = str(uuid.uuid4())
    fd = os.memfd_create("trust")
    try:
        os.write(fd, data)
        source = FileBlocks(fd)
        write_backup(repo, source, None, backup_id, lambda stats: {"id": backup_id},
                     workers=2, level=1)
        source.close()
    finally:
        os.close(fd)
    return backup_id


@pytest.mark.parametrize("holder", [
    {"expires": 10**400, "pid": 2**70},     # past a float; no process has that pid
    {"expires": "Infinity", "pid": 1},      # JSON's Infinity: an expiry never reached
    {"expires": "NaN", "pid": 2**31},
], ids=["huge", "infinity", "nan"])
def test_a_lease_with_numbers_out_of_bounds_counts_as_expired(holder) -> None:
    """A damaged or forged lease object is taken over as an expired one, not a traceback
    (or a lock that is never released)."""
    storage = MemoryBackend(f"lease-{uuid.uuid4().hex}")
    body = json.dumps({"host": socket.gethostname(), "what": "gc", **holder})
    body = body.replace('"Infinity"', "Infinity").replace('"NaN"', "NaN")
    storage.put(lease.EXCLUSIVE, body.encode())
    with lease.exclusive(storage, "gc"):
        assert json.loads(storage.get(lease.EXCLUSIVE))["pid"] == os.getpid()
    with lease.shared(storage, "create"):
        pass


@pytest.mark.parametrize("found", ["here", "by-another-host"])
def test_a_copy_that_lost_to_a_damaged_one_replaces_it(tmp_path: Path, found: str) -> None:
    """Two index files list one chunk in two packs, and the cache kept the first copy
    (index files put back after gc, or two hosts storing the same data). Once that copy is
    found damaged or missing, here or by another host (its mark), the next sync takes the
    other copy."""
    storage = MemoryBackend(f"copies-{uuid.uuid4().hex}")
    cid, old_pack, new_pack = b"c" * 32, b"p" * 32, b"q" * 32
    for pack in (old_pack, new_pack):
        storage.put(pack_name(pack), b"a pack")
    cache = ChunkIndex(tmp_path / "cache.sqlite")
    for pack in (old_pack, new_pack):
        storage.put_content_addressed(*encode_index(
            [(pack, [ChunkRef(cid, pack, 8, 100, 200, 1)])], PLAIN))
        cache.sync(storage, PLAIN, full=True)
    assert cache.lookup([cid])[cid].pack_id == old_pack
    if found == "here":
        cache.mark_damaged(cid, old_pack)
    else:
        storage.put(*encode_mark(cid, old_pack, PLAIN))
        announce_change(storage)
    assert cache.sync(storage, PLAIN) == []
    assert cache.lookup([cid])[cid].pack_id == new_pack
    cache.close()


def test_a_lost_pack_is_never_reused_and_loses_to_any_other_copy(tmp_path: Path) -> None:
    """Two index files list a chunk, the one merged first in a pack that does not exist:
    the sync that merges the second caches the copy that exists; the lost pack's other
    entries stay for reads (which then say the pack is missing) but no backup reuses them,
    merging the index files again changes nothing, and once the pack is stored again they
    are reused."""
    storage = MemoryBackend(f"lost-{uuid.uuid4().hex}")
    shared, only_lost = b"c" * 32, b"d" * 32
    lost, kept = b"p" * 32, b"q" * 32
    storage.put(pack_name(kept), b"a pack")
    cache = ChunkIndex(tmp_path / "cache.sqlite")
    for pack, ids in ((lost, [shared, only_lost]), (kept, [shared])):
        storage.put_content_addressed(*encode_index(
            [(pack, [ChunkRef(i, pack, 8, 100, 200, 1) for i in ids])], PLAIN))
        cache.sync(storage, PLAIN, full=True)
    for _ in range(2):
        assert cache.lookup([shared], undamaged=True)[shared].pack_id == kept
        assert cache.lookup([only_lost], undamaged=True) == {}
        assert cache.lookup([only_lost])[only_lost].pack_id == lost
        assert cache.damaged_ids() == {only_lost}
        cache.forget_listing()
        cache.sync(storage, PLAIN)
    cache.add_pending(lost, "a run")
    assert cache.lookup([only_lost], undamaged=True)[only_lost].pack_id == lost
    cache.close()


def test_replayed_index_files_and_a_fresh_cache(wd: Workdir, tmp_path: Path) -> None:
    """Index files put back after gc (under names that sort first: a sync merges them
    before the live ones, which list the same chunks in other packs), and another image
    sharing most blocks backed up: a host with a fresh cache caches the copies that exist,
    verifies clean and restores bit-exactly."""
    img = tmp_path / "disk.img"
    data = make_image(img, 6, seed=74)
    first = wd.create(img)
    stale = {p.name: p.read_bytes() for p in (wd.repo / "index").iterdir()}
    assert wd.run("delete", first["id"]).returncode == 0
    assert wd.run("gc").returncode == 0
    for name, content in stale.items():
        (wd.repo / "index" / f"0000{name[4:]}").write_bytes(content)
    other = bytearray(data)
    other[:64 * KiB] = random.Random(75).randbytes(64 * KiB)
    img.write_bytes(other)
    again = wd.create(img)
    assert again["stored_bytes"] > 0
    shutil.rmtree(wd.cache)
    wd.assert_restores(again["id"], bytes(other))
