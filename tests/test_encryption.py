"""Encryption at rest, through the installed command: what an encrypted repository holds,
how its secrets are given, and that tampering of every kind is caught before anything is
restored from it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import sys
from pathlib import Path

import blake3
import pytest

from lvbackup.repository.codec import PLAIN
from lvbackup.repository.index import decode_index

from support import (
    MiB,
    Workdir,
    assert_one_line_error,
    describe,
    flip_byte,
    make_image,
    write_secret,
)

PASSPHRASE = "correct horse battery staple"
ENV = {"LVBACKUP_PASSPHRASE": PASSPHRASE}


def encrypted(path: Path, **extra) -> Workdir:
    """A Workdir whose encrypted repository's passphrase is in a passphrase file."""
    path.mkdir(parents=True, exist_ok=True)
    write_secret(path / "passphrase", PASSPHRASE)
    wd = Workdir(path, passphrase_file=str(path / "passphrase"), **extra)
    p = wd.run("--json", "init", "--block-size", "64K", "--encryption")
    assert p.returncode == 0, describe(p)
    assert json.loads(p.stdout)["encrypted"] is True
    return wd


@pytest.fixture
def wd(tmp_path: Path) -> Workdir:
    return encrypted(tmp_path / "a")


def repository_bytes(wd: Workdir) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(wd.repo.rglob("*")) if p.is_file())


def test_init_says_which_kind_it_made(tmp_path: Path) -> None:
    plain = Workdir(tmp_path / "plain")
    p = plain.run("init", "--block-size", "64K")
    assert p.returncode == 0 and "unencrypted repository" in p.stdout, describe(p)
    assert plain.init()["encrypted"] is False
    enc = encrypted(tmp_path / "enc")
    p = enc.run("init")
    assert p.returncode == 0 and "existing encrypted repository" in p.stdout, describe(p)


@pytest.mark.slow
def test_round_trip_and_no_plaintext_in_the_repository(tmp_path: Path, wd: Workdir) -> None:
    data = make_image(tmp_path / "img", 6, seed=11)
    rec = wd.create(tmp_path / "img")
    wd.assert_restores(rec["id"], data)
    stored = repository_bytes(wd)
    # Any 64-byte piece of the random stretches would be in a raw blob of a plain repository.
    for off in (0, 100_000, 3 * MiB + 12345):
        assert data[off:off + 64] not in stored
    # The record (volume path, backup id) is inside the sealed manifest, not in clear.
    assert str(tmp_path / "img").encode() not in stored
    # Control: the same image in an unencrypted repository is found at once.
    plain = Workdir(tmp_path / "plain")
    plain.init()
    plain.create(tmp_path / "img")
    assert data[:64] in repository_bytes(plain)


@pytest.mark.slow
def test_chunk_ids_are_keyed_and_dedup_still_works(tmp_path: Path, wd: Workdir) -> None:
    data = make_image(tmp_path / "img", 6, seed=11)
    first = wd.create(tmp_path / "img")
    again = wd.create(tmp_path / "img")
    assert again["stored_bytes"] < first["stored_bytes"] // 100, "no dedup within the repo"
    other = encrypted(tmp_path / "b")
    other.create(tmp_path / "img")
    ids = []
    for w in (wd, other):
        # The index files are sealed: list the chunk ids through the index cache.
        (cache,) = (w.cache).glob("index-*.sqlite")
        ids.append({r[0] for r in sqlite3.connect(cache).execute("SELECT id FROM chunks")})
    block = data[:64 * 1024]
    assert blake3.blake3(block).digest() not in ids[0], "chunk id is the plain BLAKE3"
    assert not ids[0] & ids[1], "two repositories name equal content alike"


def test_wrong_or_missing_passphrase_is_one_line_exit_2(tmp_path: Path, wd: Workdir) -> None:
    make_image(tmp_path / "img", 2, seed=3)
    rec = wd.create(tmp_path / "img")
    (wd.path / "passphrase").write_text("not it\n")
    p = wd.run("restore", rec["id"], "--to-file", tmp_path / "out")
    assert_one_line_error(p, 2, "wrong passphrase", str(wd.repo))
    assert not (tmp_path / "out").exists()
    bare = wd.config_with("bare.yaml")
    p = wd.run("verify", config=bare)
    assert_one_line_error(p, 2, "is encrypted", "LVBACKUP_PASSPHRASE")
    # The environment works too, and wins over the (wrong) file.
    p = wd.run("verify", rec["id"], env=ENV)
    assert p.returncode == 0, describe(p)


@pytest.mark.slow
def test_passphrase_command_and_key_file(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    cmd = [sys.executable, "-c", f"print({PASSPHRASE!r})"]
    wd = Workdir(tmp_path / "c", passphrase_command=cmd)
    assert wd.run_json("init", "--block-size", "64K", "--encryption")["encrypted"]
    data = make_image(tmp_path / "img", 2, seed=4)
    rec = wd.create(tmp_path / "img")
    assert wd.restore_bytes(rec["id"]) == data
    failing = wd.config_with("fail.yaml", passphrase_command=[sys.executable, "-c",
                                                              "raise SystemExit(3)"])
    assert_one_line_error(wd.run("verify", config=failing), 2, "passphrase_command",
                          "exit status 3")

    key = tmp_path / "k" / "repo.key"
    (tmp_path / "k").mkdir()
    kd = Workdir(tmp_path / "k", key_file=str(key))
    assert kd.run_json("init", "--block-size", "64K", "--encryption")["encrypted"]
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text().strip()) == 64
    rec = kd.create(tmp_path / "img")
    assert kd.restore_bytes(rec["id"]) == data
    key.write_text(os.urandom(32).hex() + "\n")
    assert_one_line_error(kd.run("verify"), 2, "wrong passphrase or key file")


def test_a_configured_key_refuses_an_unencrypted_repository(tmp_path: Path) -> None:
    """Storage that swaps in an unencrypted config must not be sent plaintext."""
    wd = Workdir(tmp_path)
    wd.init()
    keyed = wd.config_with("keyed.yaml", passphrase_file=str(tmp_path / "pw"))
    write_secret(tmp_path / "pw", "x")
    make_image(tmp_path / "img", 2, seed=5)
    p = wd.run("create", "--device", tmp_path / "img", config=keyed)
    assert_one_line_error(p, 2, "not encrypted", "passphrase_file")


def test_the_passphrase_appears_nowhere(tmp_path: Path) -> None:
    wd = encrypted(tmp_path / "a", event_log=str(tmp_path / "events.jsonl"))
    make_image(tmp_path / "img", 2, seed=6)
    out = []
    for args in (["--verbose", "create", "--device", tmp_path / "img"], ["config", "check"],
                 ["--json", "config", "check"], ["--verbose", "verify", "--deep"]):
        p = wd.run(*args)
        assert p.returncode == 0, describe(p)
        out += [p.stdout, p.stderr]
    out.append((tmp_path / "events.jsonl").read_text())
    assert not any(PASSPHRASE in text for text in out)


# --- tampering ------------------------------------------------------------------------------

def _restore_fails(wd: Workdir, backup_id: str, out: Path, *fragments: str) -> None:
    p = wd.run("restore", backup_id, "--to-file", out)
    assert_one_line_error(p, 3, *fragments)   # damage found
    assert not out.exists(), "something was restored from a tampered repository"


def _packs(wd: Workdir) -> list[Path]:
    return sorted((wd.repo / "packs").rglob("*"), key=lambda p: p.stat().st_size)


def test_a_flipped_bit_in_a_chunk_is_caught(tmp_path: Path, wd: Workdir) -> None:
    make_image(tmp_path / "img", 4, seed=7)
    rec = wd.create(tmp_path / "img")
    pack = _packs(wd)[-1]
    flip_byte(pack, 8 + 40)     # inside the first blob's ciphertext
    _restore_fails(wd, rec["id"], tmp_path / "out", "fails authentication")
    p = wd.verify(rec["id"], "--deep")
    assert p.returncode == 3 and "chunk" in p.stdout + p.stderr, describe(p)


def test_swapped_chunks_are_caught(tmp_path: Path, wd: Workdir) -> None:
    """Two blobs of the same length swapped in place: each fails under the other's id."""
    make_image(tmp_path / "img", 4, seed=8)
    rec = wd.create(tmp_path / "img")
    (cache,) = wd.cache.glob("index-*.sqlite")
    rows = sqlite3.connect(cache).execute(
        "SELECT p.id, c.offset, c.length FROM chunks c JOIN packs p ON p.n = c.pack "
        "ORDER BY p.id, c.offset").fetchall()
    by_len: dict[tuple[bytes, int], list[int]] = {}
    for pack, off, ln in rows:
        by_len.setdefault((pack, ln), []).append(off)
    (pack, ln), offs = next((k, v) for k, v in by_len.items() if len(v) >= 2)
    path = wd.repo / "packs" / pack.hex()[:2] / pack.hex()
    raw = bytearray(path.read_bytes())
    a, b = offs[:2]
    raw[a:a + ln], raw[b:b + ln] = raw[b:b + ln], raw[a:a + ln]
    path.write_bytes(raw)
    _restore_fails(wd, rec["id"], tmp_path / "out", "chunk", "fails authentication")


def test_a_tampered_manifest_or_index_file_is_caught(tmp_path: Path, wd: Workdir) -> None:
    make_image(tmp_path / "img", 2, seed=9)
    rec = wd.create(tmp_path / "img")
    manifest = wd.repo / "manifests" / rec["id"]
    good = manifest.read_bytes()
    flip_byte(manifest, len(good) // 2)
    _restore_fails(wd, rec["id"], tmp_path / "out", f"manifest of backup {rec['id']}",
                   "corrupt")
    manifest.write_bytes(good)
    (index,) = (wd.repo / "index").iterdir()
    flip_byte(index, 30)
    shutil.rmtree(wd.cache)     # read the index files again
    p = wd.verify(rec["id"])
    assert p.returncode == 3 and index.name in p.stdout + p.stderr, describe(p)


def test_a_tampered_pack_trailer_is_caught(tmp_path: Path, wd: Workdir) -> None:
    make_image(tmp_path / "img", 2, seed=10)
    rec = wd.create(tmp_path / "img")
    pack = _packs(wd)[-1]
    size = pack.stat().st_size
    flip_byte(pack, size - 44 - 49 + 33)   # the last trailer entry's offset field
    p = wd.verify(rec["id"])
    assert p.returncode == 3 and pack.name in p.stdout + p.stderr, describe(p)


@pytest.mark.slow
def test_a_manifest_from_another_repository_is_caught(tmp_path: Path, wd: Workdir) -> None:
    """The same passphrase, even the same image: the other repository's manifest does not
    open here (its key and repository id differ)."""
    make_image(tmp_path / "img", 2, seed=12)
    mine = wd.create(tmp_path / "img")
    other = encrypted(tmp_path / "b")
    theirs = other.create(tmp_path / "img")
    shutil.copy(other.repo / "manifests" / theirs["id"], wd.repo / "manifests" / mine["id"])
    _restore_fails(wd, mine["id"], tmp_path / "out", f"manifest of backup {mine['id']}")


def test_an_older_manifest_replayed_under_a_newer_name_is_caught(tmp_path: Path,
                                                                 wd: Workdir) -> None:
    make_image(tmp_path / "img", 2, seed=13)
    old = wd.create(tmp_path / "img")
    flip_byte(tmp_path / "img", 5)
    new = wd.create(tmp_path / "img", "--incremental")
    shutil.copy(wd.repo / "manifests" / old["id"], wd.repo / "manifests" / new["id"])
    _restore_fails(wd, new["id"], tmp_path / "out", f"manifest of backup {new['id']}",
                   "not written under this name")


def test_plain_index_files_are_not_accepted_in_an_encrypted_repository(tmp_path: Path,
                                                                       wd: Workdir) -> None:
    """An index file sealed with the unencrypted envelope (anyone can make one) is refused."""
    make_image(tmp_path / "img", 2, seed=14)
    wd.create(tmp_path / "img")
    (index,) = (wd.repo / "index").iterdir()
    with pytest.raises(Exception, match="corrupt"):
        list(decode_index(index.name, index.read_bytes(), PLAIN))


# --- key management -------------------------------------------------------------------------

def test_key_export_import_brings_back_a_repository_whose_slots_are_lost(tmp_path: Path,
                                                                         wd: Workdir) -> None:
    data = make_image(tmp_path / "img", 2, seed=20)
    rec = wd.create(tmp_path / "img")
    export = tmp_path / "key.txt"
    p = wd.run("key", "export", "--to", export)
    assert p.returncode == 0, describe(p)
    assert export.stat().st_mode & 0o777 == 0o600
    assert PASSPHRASE not in export.read_text()
    again = wd.run("key", "export", "--to", export)
    assert_one_line_error(again, 2, "exists already")
    shutil.rmtree(wd.repo / "keys")
    assert_one_line_error(wd.run("verify"), 2, "no usable key slot", "key import")
    p = wd.run("key", "import", export)
    assert p.returncode == 0, describe(p)
    assert wd.restore_bytes(rec["id"]) == data


def test_key_import_refuses_another_repositorys_export_and_garbage(tmp_path: Path,
                                                                  wd: Workdir) -> None:
    other = encrypted(tmp_path / "b")
    theirs = other.run("key", "export")
    assert theirs.returncode == 0, describe(theirs)
    (tmp_path / "theirs.txt").write_text(theirs.stdout)
    assert_one_line_error(wd.run("key", "import", tmp_path / "theirs.txt"), 2)
    (tmp_path / "junk.txt").write_text('{"format": "lvbackup key export 1", "slots": 5}')
    assert_one_line_error(wd.run("key", "import", tmp_path / "junk.txt"), 2,
                          "not an lvbackup key export")


@pytest.mark.slow
def test_change_passphrase_rewraps_without_rewriting_data(tmp_path: Path, wd: Workdir) -> None:
    data = make_image(tmp_path / "img", 2, seed=21)
    rec = wd.create(tmp_path / "img")
    before = {p: p.stat().st_mtime_ns for p in wd.repo.rglob("*") if p.is_file()
              and "keys" not in p.parts}
    p = wd.run("key", "change-passphrase", env={"LVBACKUP_NEW_PASSPHRASE": "new passphrase"})
    assert p.returncode == 0, describe(p)
    assert_one_line_error(wd.run("verify"), 2, "wrong passphrase")   # the old file's
    p = wd.run("verify", "--deep", env={"LVBACKUP_PASSPHRASE": "new passphrase"})
    assert p.returncode == 0, describe(p)
    after = {p: p.stat().st_mtime_ns for p in wd.repo.rglob("*") if p.is_file()
             and "keys" not in p.parts}
    assert after == before, "data or metadata was rewritten"
    assert wd.run("restore", rec["id"], "--to-file", "-", binary=True,
                  env={"LVBACKUP_PASSPHRASE": "new passphrase"}).stdout == data
    no_new = wd.run("key", "change-passphrase", env={"LVBACKUP_PASSPHRASE": "new passphrase"})
    assert_one_line_error(no_new, 2, "LVBACKUP_NEW_PASSPHRASE")


@pytest.mark.slow
def test_key_add_a_second_passphrase_and_a_key_file(tmp_path: Path, wd: Workdir) -> None:
    make_image(tmp_path / "img", 2, seed=22)
    rec = wd.create(tmp_path / "img")
    write_secret(tmp_path / "second", "second passphrase")
    p = wd.run("key", "add", "--new-passphrase-file", tmp_path / "second")
    assert p.returncode == 0, describe(p)
    p = wd.run("--json", "key", "add", "--key-file", tmp_path / "repo.key")
    assert p.returncode == 0 and json.loads(p.stdout)["kind"] == "key_file", describe(p)
    assert (tmp_path / "repo.key").stat().st_mode & 0o777 == 0o600
    slots = wd.run_json("key", "list")
    assert sorted(s["kind"] for s in slots) == ["key_file", "passphrase", "passphrase"]
    for config in (wd.config_with("second.yaml", passphrase_file=str(tmp_path / "second")),
                   wd.config_with("keyfile.yaml", key_file=str(tmp_path / "repo.key"))):
        p = wd.run("verify", rec["id"], config=config)
        assert p.returncode == 0, describe(p)
    # The first passphrase still opens it too.
    assert wd.verify(rec["id"]).returncode == 0


# --- crashes while keys are written ------------------------------------------------------

@pytest.mark.slow
def test_change_passphrase_killed_between_new_slot_and_old_deletion(tmp_path: Path,
                                                                    wd: Workdir) -> None:
    data = make_image(tmp_path / "img", 2, seed=23)
    rec = wd.create(tmp_path / "img")
    p = wd.run("key", "change-passphrase", env={"LVBACKUP_NEW_PASSPHRASE": "new passphrase",
                                               "LVBACKUP_FAULT": "key-slot-stored"})
    assert p.returncode == -signal.SIGKILL, describe(p)
    # Both passphrases open it: nothing is ever left that no passphrase opens.
    for env in ({}, {"LVBACKUP_PASSPHRASE": "new passphrase"}):
        out = wd.run("restore", rec["id"], "--to-file", "-", binary=True, env=env)
        assert out.returncode == 0 and out.stdout == data, describe(out)
    p = wd.run("key", "change-passphrase", env={"LVBACKUP_NEW_PASSPHRASE": "third passphrase"})
    assert p.returncode == 0, describe(p)
    assert wd.run("verify", env={"LVBACKUP_PASSPHRASE": "third passphrase"}).returncode == 0


def test_init_killed_after_the_key_slot_leaves_no_repository(tmp_path: Path) -> None:
    write_secret(tmp_path / "pw", PASSPHRASE)
    wd = Workdir(tmp_path, passphrase_file=str(tmp_path / "pw"))
    p = wd.run("init", "--encryption", env={"LVBACKUP_FAULT": "key-slot-stored"})
    assert p.returncode == -signal.SIGKILL, describe(p)
    assert not (wd.repo / "config").exists()
    assert_one_line_error(wd.run("verify"), 2, "no repository")
    assert wd.run_json("init", "--block-size", "64K", "--encryption")["encrypted"]
    data = make_image(tmp_path / "img", 2, seed=24)
    assert wd.restore_bytes(wd.create(tmp_path / "img")["id"]) == data


def test_dead_runs_are_not_settled_without_the_key(tmp_path: Path, wd: Workdir) -> None:
    """A backup killed after its manifest was written is complete: a command run without
    the key (which cannot see the manifest) must not call it failed."""
    data = make_image(tmp_path / "img", 2, seed=25)
    p = wd.run("create", "--device", tmp_path / "img",
               env={"LVBACKUP_FAULT": "manifest-written"})
    assert p.returncode == -signal.SIGKILL, describe(p)
    bare = wd.config_with("bare.yaml")
    p = wd.run("--json", "list", config=bare)
    assert p.returncode == 0, describe(p)
    assert [r["status"] for r in json.loads(p.stdout)] == ["creating"]
    (rec,) = wd.list()
    assert rec["status"] == "available"
    assert wd.restore_bytes(rec["id"]) == data
