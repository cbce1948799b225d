"""Reliability: locks, concurrency, a full disk, a shrinking source, damage that the other
suites do not inflict, and a lost catalog, each inflicted on the real `lvbackup` command
(docs/reliability.md maps every guarantee to its test).

Complements test_faults.py (kill -9 at every crash point), test_crash.py (SIGKILL at
random moments, SIGTERM, resume) and test_corruption.py (flipped, truncated, missing packs,
index files, manifests; a corrupt catalog).

Runs that must be caught holding their locks are paused with SIGSTOP once the kernel shows
them holding the lock (or their `creating` row exists, which they insert only after taking
their locks), and resumed with SIGCONT: a stopped process holds its locks exactly as a slow
one does, and the test does not depend on how fast the machine is.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from lvbackup.repository.codec import PLAIN
from lvbackup.repository.manifest import PAGE_ENTRIES
from lvbackup.repository.repo import PACK_TARGET

from support import (
    MiB,
    Workdir,
    apply_change,
    assert_one_line_error,
    describe,
    holds_open,
    lock_holders,
    make_image,
    reused_bytes,
    wait_until,
)

SLOW_MIB = 16      # random data compressed at zstd level 19 by one worker: a few seconds


# --- helpers --------------------------------------------------------------------------------

@contextmanager
def stopped(*procs: subprocess.Popen):
    """SIGSTOP the processes for the block (they keep every lock they hold), then SIGCONT."""
    for proc in procs:
        proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)


def rows(wd: Workdir) -> list[dict]:
    try:
        return wd.catalog_rows()
    except sqlite3.Error:
        return []


def creating(wd: Workdir, image: Path) -> dict | None:
    found = [r for r in rows(wd) if r["volume_name"] == str(image.resolve())
             and r["status"] == "creating"]
    return found[0] if found else None


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def random_image(path: Path, mib: int, seed: int, sparse_tail_mib: int = 0) -> bytes:
    data = random.Random(seed).randbytes(mib * MiB)
    path.write_bytes(data)
    if sparse_tail_mib:
        with open(path, "r+b") as f:
            f.truncate((mib + sparse_tail_mib) * MiB)
        data += bytes(sparse_tail_mib * MiB)
    return data


class Env:
    """A repository with two earlier backups (a full and an incremental of `small`) that
    every test checks are untouched, a `slow.yaml` config, and the processes to reap."""

    def __init__(self, wd: Workdir, small: Path, earlier: dict[str, bytes]):
        self.wd = wd
        self.small = small
        self.earlier = earlier
        self.slow = wd.config_with("slow.yaml", workers=1, compression_level=19)
        self.procs: list[subprocess.Popen] = []

    def popen(self, *args, config: Path | None = None) -> subprocess.Popen:
        proc = self.wd.popen(*args, config=config)
        self.procs.append(proc)
        return proc

    def slow_create(self, image: Path, *args) -> subprocess.Popen:
        return self.popen("--json", "create", "--device", image, *args, config=self.slow)

    def intact(self) -> None:
        """verify --deep passes and the earlier backups restore bit-exactly."""
        self.wd.assert_intact(self.earlier)


def make_env(path: Path, **config) -> Env:
    wd = Workdir(path / "wd", **config)
    wd.init("64K")
    small = path / "small.img"
    v1 = make_image(small, 2, seed=501)
    full = wd.create(small)
    v2 = apply_change(small, seed=502)
    inc = wd.create(small, "--incremental")
    return Env(wd, small, {full["id"]: v1, inc["id"]: v2})


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path)
    yield e
    for proc in e.procs:          # a failed test leaves no process behind, stopped or not
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def slow_images(tmp_path_factory):
    """Two images of random data: backing each up with slow.yaml takes a few seconds."""
    root = tmp_path_factory.mktemp("slow-images")
    a, b = root / "a.img", root / "b.img"
    return a, random_image(a, SLOW_MIB, 511), b, random_image(b, SLOW_MIB, 512)


# --- locks: one run per volume ----------------------------------------------------------------

def test_same_volume_runs_never_interleave(env, slow_images, tmp_path):
    """A second run on a busy volume exits 75 naming the holder's pid (create and prune);
    with --wait it waits, and starts only after the first has ended."""
    wd = env.wd
    img = tmp_path / "disk.img"
    _, big, _, _ = slow_images
    # Two backups of this volume for prune to choose from, then the slow content.
    for seed in (521, 522):
        make_image(img, 1, seed=seed)
        wd.create(img)
    img.write_bytes(big)
    victim = env.slow_create(img)
    wait_until(lambda: creating(wd, img), "the victim's creating row", victim)
    n_rows = len(rows(wd))
    with stopped(victim):
        assert creating(wd, img), "the victim ended before it could be caught"
        (volume_lock,) = [p for p in wd.cache.glob("locks/volume-*.lock")
                          if lock_holders(p) == {victim.pid: "WRITE"}]
        p = wd.run("create", "--device", img)
        assert_one_line_error(p, 75, str(img.resolve()), "locked", f"(pid {victim.pid})")
        p = wd.run("prune", "--keep-last", "1", "--volume", img)
        # prune, like gc, takes the repository exclusively: a running backup excludes it
        assert_one_line_error(p, 75, "repository is locked", f"(pid {victim.pid})")
        assert len(rows(wd)) == n_rows, "a refused run left a row"
        # With --wait the second run waits for the lock instead.
        waiter = env.popen("--json", "create", "--device", img, "--wait", "120")
        wait_until(lambda: holds_open(waiter.pid, volume_lock),
                   "the waiting run to reach the volume lock", waiter)
        assert waiter.poll() is None, "the waiting run gave up while the lock was held"
        assert len(rows(wd)) == n_rows, "the waiting run started before the lock was free"
        assert list(lock_holders(volume_lock)) == [victim.pid]
    code, out, err = finish(victim)
    assert code == 0, err
    first = json.loads(out)
    code, out, err = finish(waiter)
    assert code == 0, err
    second = json.loads(out)
    assert second["status"] == "available"
    # Never interleaved: the second run's backup began after the first one's ended.
    assert second["created_at"] >= first["updated_at"], (first, second)
    assert second["stored_bytes"] == 0            # and found every chunk already stored
    assert wd.restore_bytes(second["id"]) == big
    # With the volume free, prune runs.
    pruned = wd.run_json("prune", "--keep-last", "1", "--volume", img)
    assert len(pruned["deleted"]) == 3 and second["id"] not in pruned["deleted"]
    env.intact()


def test_prune_refused_by_a_busy_volume_deletes_nothing(env, slow_images, tmp_path):
    from uuid import uuid5

    from lvbackup.volumes.sources import _DEVICE_NAMESPACE as NS

    wd = env.wd
    _, big, _, _ = slow_images
    # The busy volume's id sorts after the small image's, so prune reaches the other first.
    small_id = str(uuid5(NS, str(env.small.resolve())))
    img = next(p for p in (tmp_path / f"busy{k}.img" for k in range(100))
               if str(uuid5(NS, str(p.resolve()))) > small_id)
    for seed in (523, 524):
        make_image(img, 1, seed=seed)
        wd.create(img)
    img.write_bytes(big)
    victim = env.slow_create(img)
    wait_until(lambda: creating(wd, img), "the victim's creating row", victim)
    with stopped(victim):
        before = {r["id"]: (r["status"], r["parent_id"]) for r in rows(wd)}
        p = wd.run("prune", "--keep-last", "1")
        assert_one_line_error(p, 75, "repository is locked", f"(pid {victim.pid})")
        after = {r["id"]: (r["status"], r["parent_id"]) for r in rows(wd)}
        assert after == before, "prune exited 75 (locked) but changed backups"
    assert finish(victim)[0] == 0
    env.intact()


def test_different_volumes_proceed_in_parallel(env, slow_images):
    """Backups of two volumes hold their locks at the same time; gc and catalog rebuild,
    which need the repository to themselves, exit 75 naming both holders."""
    wd = env.wd
    a, a_data, b, b_data = slow_images
    # A gc killed holding the exclusive lock leaves its pid in the lock file: the messages
    # below must name the live holders, not it.
    p = wd.run("gc", env={"LVBACKUP_FAULT": "gc-index-rewritten"})
    assert p.returncode == -signal.SIGKILL, describe(p)
    pa = env.slow_create(a)
    pb = env.slow_create(b)
    wait_until(lambda: creating(wd, a) and creating(wd, b), "both creating rows", pa, pb)
    repo_lock = wd.cache / "locks" / "repository.lock"
    with stopped(pa, pb):
        assert creating(wd, a) and creating(wd, b)
        assert lock_holders(repo_lock) == {pa.pid: "READ", pb.pid: "READ"}
        volume_locks = {}
        for path in wd.cache.glob("locks/volume-*.lock"):
            volume_locks.update(lock_holders(path))
        assert volume_locks == {pa.pid: "WRITE", pb.pid: "WRITE"}
        both = f"(pids {min(pa.pid, pb.pid)}, {max(pa.pid, pb.pid)})"
        assert_one_line_error(wd.run("gc"), 75, "repository", "locked", both)
        assert_one_line_error(wd.run("catalog", "rebuild"), 75, "repository", "locked", both)
    results = {}
    for proc, img in ((pa, a), (pb, b)):
        code, out, err = finish(proc)
        assert code == 0, err
        results[img] = json.loads(out)
    ra, rb = results[a], results[b]
    # Their lifetimes overlap: each began before the other ended.
    assert ra["created_at"] < rb["updated_at"] and rb["created_at"] < ra["updated_at"]
    assert wd.restore_bytes(ra["id"]) == a_data
    assert wd.restore_bytes(rb["id"]) == b_data
    env.intact()


def test_eight_concurrent_backups_of_different_images(env, tmp_path):
    """SQLite in WAL mode with a busy timeout: no 'database is locked', all available;
    then eight concurrent restores, all bit-exact."""
    wd = env.wd
    images = {}
    for k in range(8):
        path = tmp_path / f"img{k}.img"
        images[path] = make_image(path, 4, seed=530 + k)
    procs = {path: env.popen("--json", "create", "--device", path) for path in images}
    recs = {}
    for path, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 0, f"{path}: exit {code}\n{err}"
        assert "locked" not in err and "Traceback" not in err, err
        recs[path] = json.loads(out)
        assert recs[path]["status"] == "available"
    by_id = {r["id"]: r for r in rows(wd)}
    assert all(by_id[r["id"]]["status"] == "available" for r in recs.values())
    # They did run concurrently: some backup's lifetime overlaps another's.
    spans = sorted((r["created_at"], r["updated_at"]) for r in recs.values())
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1)), spans
    restores = {path: env.popen("restore", recs[path]["id"], "--to-file", "-")
                for path in images}
    for path, proc in restores.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")
        assert out == images[path], f"restore of {path} differs"
    env.intact()


def test_catalog_write_after_a_read_in_a_transaction(tmp_path):
    """The interleaving behind the intermittent 'database is locked', made deterministic:
    a write transaction that reads first (as Table.update does), while another process
    commits. A fixed catalog makes the other writer wait (busy timeout), not fail."""
    import threading

    from lvbackup.base.lifecycle import Status
    from lvbackup.catalog.catalog import Catalog

    path = tmp_path / "catalog.db"
    a = Catalog(path)
    try:
        base = {"volume_id": "v", "status": "creating", "created_at": "t", "updated_at": "t",
                "data_timestamp": "t", "labels": {}, "protected": False}
        a.insert({**base, "id": "one"}, Status.CREATING)
        a.insert({**base, "id": "two"}, Status.CREATING)
        errors = []

        def other_run() -> None:
            b = Catalog(path)               # another run's connection
            try:
                b.transition("two", Status.AVAILABLE)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            finally:
                b.close()

        with a.write():                      # as create's final update
            a.get("one")                     # Table.update reads the row first
            t = threading.Thread(target=other_run)
            t.start()
            t.join(2)                        # unfixed: it commits now; fixed: it waits
            a.transition("one", Status.AVAILABLE)
        t.join(90)
        assert not errors, errors
        assert {r["id"]: r["status"] for r in a.list()} == {"one": "available", "two": "available"}
    finally:
        a.close()


# --- locks: gc and catalog rebuild exclude every other run ------------------------------------

@pytest.mark.parametrize("command", [("gc",), ("catalog", "rebuild")],
                         ids=["gc", "catalog-rebuild"])
def test_exclusive_commands_lock_out_every_other_run(env, command, tmp_path):
    wd = env.wd
    # Some garbage, so that gc has work to do while it holds the lock.
    junk = tmp_path / "junk.img"
    make_image(junk, 4, seed=541)
    wd.run_json("delete", wd.create(junk)["id"])
    repo_lock = wd.cache / "locks" / "repository.lock"
    bid = next(iter(env.earlier))
    for _attempt in range(10):
        holder = env.popen(*command)

        def holds(holder: subprocess.Popen = holder) -> bool:
            return lock_holders(repo_lock).get(holder.pid) == "WRITE" or holder.poll() is not None

        wait_until(holds, f"{command} to take the lock", timeout=120)
        holder.send_signal(signal.SIGSTOP)
        if lock_holders(repo_lock).get(holder.pid) == "WRITE":
            break
        holder.send_signal(signal.SIGCONT)    # it finished first: try again
        assert finish(holder)[0] == 0
    else:
        pytest.fail(f"never caught {command} holding the repository lock")
    try:
        n_rows = len(rows(wd))
        for args in (("create", "--device", env.small), ("delete", bid),
                     ("restore", bid, "--to-file", "-"), ("verify",), ("prune", "--keep-last", "1"),
                     ("gc",), ("catalog", "rebuild")):
            p = wd.run(*args)
            assert_one_line_error(p, 75, "repository", "locked", f"(pid {holder.pid})")
        assert len(rows(wd)) == n_rows
        waiter = env.popen("--json", "create", "--device", env.small, "--wait", "120")
        wait_until(lambda: holds_open(waiter.pid, repo_lock),
                   "the waiting run to reach the repository lock", waiter)
        assert waiter.poll() is None, "the waiting run gave up while the lock was held"
    finally:
        holder.send_signal(signal.SIGCONT)
    code, _, err = finish(holder)
    assert code == 0, err
    code, out, err = finish(waiter)
    assert code == 0, err
    assert json.loads(out)["status"] == "available"
    env.intact()


# --- locks: nothing stale ever blocks -------------------------------------------------------

def test_locks_left_by_killed_runs_never_block(env, slow_images):
    """kill -9 leaves the lock files (with the dead pid inside) but no lock: the next run
    proceeds at once, without --wait."""
    wd = env.wd
    a, a_data, _, _ = slow_images
    # A gc killed while it held the exclusive repository lock.
    p = wd.run("gc", env={"LVBACKUP_FAULT": "gc-index-rewritten"})
    assert p.returncode == -signal.SIGKILL, describe(p)
    repo_lock = wd.cache / "locks" / "repository.lock"
    assert repo_lock.read_text().strip().isdigit()
    # A backup killed while it held its volume lock and its run lock.
    victim = env.slow_create(a)
    wait_until(lambda: creating(wd, a), "the creating row", victim)
    dead = creating(wd, a)["id"]
    victim.kill()
    victim.communicate()
    (volume_lock,) = [p for p in wd.cache.glob("locks/volume-*.lock")
                      if p.read_text().strip() == str(victim.pid)]
    assert (wd.cache / "locks" / f"run-{dead}.lock").exists()
    assert lock_holders(volume_lock) == {} and lock_holders(repo_lock) == {}
    # No --wait: a lock still held would make this exit 75.
    rec = wd.create(a)
    assert wd.restore_bytes(rec["id"]) == a_data
    assert wd.show(dead)["status"] == "error"
    assert not (wd.cache / "locks" / f"run-{dead}.lock").exists()
    wd.run_json("gc")
    env.intact()


# --- one restore of a backup at a time ------------------------------------------------------

def held_restore(env: Env, bid: str) -> subprocess.Popen:
    """A restore of `bid` to a pipe nobody reads: it blocks mid-image, holding the backup."""
    proc = env.popen("restore", bid, "--to-file", "-")

    def restoring() -> bool:
        return any(r["id"] == bid and r["status"] == "restoring" for r in rows(env.wd))

    wait_until(restoring, "the restoring status", proc)
    return proc


def test_a_backup_being_restored_is_busy_for_verify_and_a_second_restore(env):
    """verify ID of a backup being restored is never "damage": exit 75 saying it is busy,
    or with --wait the verification once the restore ends; a second restore of it gets 75
    (one restore of a backup at a time), and the first completes bit-exact."""
    wd = env.wd
    bid, data = next(iter(env.earlier.items()))
    first = held_restore(env, bid)
    for args in (("verify", bid), ("verify", bid, "--deep"),
                 ("restore", bid, "--to-file", wd.path / "second.img")):
        line = assert_one_line_error(wd.run(*args), 75, bid, "busy: being restored")
        assert "damage" not in line
    assert not (wd.path / "second.img").exists()
    assert wd.verify().returncode == 0          # every available backup: not this one
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and out == data, err

    first = held_restore(env, bid)
    waiting = env.popen("--json", "verify", bid, "--wait", "120")
    run_lock = wd.cache / "locks" / f"run-{bid}.lock"
    wait_until(lambda: first.pid in lock_holders(run_lock), "the restore's run lock", first)
    wait_until(lambda: holds_open(waiting.pid, run_lock), "verify waiting for the lock",
               waiting)
    assert waiting.poll() is None, "verify --wait did not wait for the restore"
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and out == data, err
    code, out, err = finish(waiting)
    assert code == 0 and json.loads(out)["backups"][0]["ok"] is True, err
    env.intact()


# --- a full disk ----------------------------------------------------------------------------

@pytest.fixture
def tmpfs():
    """mount(path, size): a size-capped tmpfs at `path`, unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """A file in `path` that leaves `leave` bytes free on its filesystem."""
    filler = path / "filler"
    filler.write_bytes(b"\xff" * (free_bytes(path) - leave))
    assert free_bytes(path) == leave
    return filler


def test_disk_full_while_storing_a_pack(tmp_path, tmpfs):
    """The repository's filesystem fills up mid-backup: exit 1, one line naming the cause,
    an `error` row, nothing half-written left behind, earlier backups intact; with room
    again, the rerun completes and reuses the pack the failed run had stored."""
    tmpfs(tmp_path / "wd" / "repo", "24m")
    e = make_env(tmp_path)
    wd = e.wd
    big = tmp_path / "big.img"
    data = random_image(big, 32, 551)           # random: 32 MiB to store, 24 MiB of room
    p = wd.run("create", "--device", big)
    assert_one_line_error(p, 1, str(big.resolve()), "No space left on device")
    failed = [r for r in rows(wd) if r["volume_name"] == str(big.resolve())]
    assert len(failed) == 1 and failed[0]["status"] == "error", failed
    assert "No space left on device" in failed[0]["fail_reason"]
    assert not (wd.repo / "manifests" / failed[0]["id"]).exists()
    assert not list((wd.repo / "tmp").iterdir()), "temporary files left in the repository"
    e.intact()
    # More room (as after deleting backups and running gc): the rerun completes.
    subprocess.run(["mount", "-o", "remount,size=64m", "tmpfs", str(wd.repo)], check=True)
    p = wd.run("--json", "create", "--device", big)
    assert p.returncode == 0, describe(p)
    assert reused_bytes(p.stderr) >= 16 * MiB, p.stderr
    assert wd.restore_bytes(json.loads(p.stdout)["id"]) == data
    wd.run_json("delete", failed[0]["id"])
    wd.run_json("gc")
    e.intact()


def test_disk_full_between_a_pack_and_its_index(tmp_path, tmpfs):
    """The disk fills up exactly when the index file naming a stored pack is written:
    the earlier backups must still restore while the disk is full."""
    repo = tmpfs(tmp_path / "wd" / "repo", "24m")
    e = make_env(tmp_path)
    wd = e.wd
    big = tmp_path / "big.img"
    data = random_image(big, PACK_TARGET // MiB, 552)
    # 64 KiB blocks, stored raw, fill exactly one pack (and a 49-byte trailer entry each);
    # the page of manifest entries that lists them (256 entries of 48 bytes, random hashes:
    # stored raw too) goes into a second, small pack.
    chunks = PACK_TARGET // (64 * 1024)
    pack = 8 + chunks * 64 * 1024 + chunks * 49 + 44
    pages_pack = 8 + PAGE_ENTRIES * 48 + 49 + 44
    page = os.statvfs(repo).f_frsize
    before = len(wd.files("packs"))
    # Room for both packs, not for the index file that names them.
    filler = fill(repo, (-(-pack // page) + -(-pages_pack // page)) * page + page)
    p = wd.run("create", "--device", big)
    assert_one_line_error(p, 1, "No space left on device")
    assert len(wd.files("packs")) == before + 2, "expected the packs stored, then the index to fail"
    assert [r["status"] for r in rows(wd)] == ["available", "available", "error"]
    e.intact()
    filler.unlink()
    assert wd.restore_bytes(wd.create(big)["id"]) == data
    e.intact()


def no_internal_error(p: subprocess.CompletedProcess, code: int = 1) -> str:
    """A full or read-only filesystem: exit `code` and one line saying so, never an
    internal error; returns the line with this test's directory left out of it."""
    line = assert_one_line_error(p, code)
    assert "internal error" not in line, line
    return line


def test_disk_full_under_the_catalog(tmp_path, tmpfs):
    """The default layout: repository, catalog and index cache on one filesystem, filled to
    the last block by something else. list, show, verify and restore work; create fails
    in one line; delete and gc free space (the reserve was kept for them); then create
    works again."""
    fs = tmpfs(tmp_path / "fs", "24m")
    e = make_env(fs)
    wd = e.wd
    assert (wd.cache / "reserve").stat().st_size == 4 * MiB
    doomed = wd.create(random_image(fs / "doomed.img", 3, 553) and fs / "doomed.img")
    (fs / "doomed.img").unlink()
    new = tmp_path / "new.img"
    data = random_image(new, 4, 554)
    filler = fill(fs, 0)
    assert len(wd.list()) == 3
    for bid, expected in e.earlier.items():
        assert wd.show(bid)["status"] == "available"
        assert wd.restore_bytes(bid) == expected
    for args in (("verify",), ("verify", "--deep")):
        p = wd.run(*args)
        assert p.returncode == 0, describe(p)
    line = no_internal_error(wd.run("create", "--device", new)).replace(str(tmp_path), "<tmp>")
    assert "catalog rebuild" not in line and ("space" in line or "full" in line), line
    assert free_bytes(fs) < MiB

    wd.run_json("delete", doomed["id"])
    assert wd.run_json("gc")["bytes_freed"] >= 3 * MiB
    assert (wd.cache / "reserve").exists(), "the reserve is put back"
    assert free_bytes(fs) >= 3 * MiB
    filler.unlink()
    assert wd.restore_bytes(wd.create(new)["id"]) == data
    e.intact()


def test_disk_full_with_no_reserve_left_still_lists(tmp_path, tmpfs):
    """Full to the last block and no reserve (made by an older version, or spent): the
    catalog opens read-only, so list and show work; a write says why it cannot be made."""
    fs = tmpfs(tmp_path / "fs", "24m")
    e = make_env(fs)
    wd = e.wd
    (wd.cache / "reserve").unlink()
    filler = fill(fs, 0)
    bid = next(iter(e.earlier))
    assert [b["id"] for b in wd.list()] == list(e.earlier)
    assert wd.show(bid)["id"] == bid
    no_internal_error(wd.run("protect", bid))
    filler.unlink()
    assert wd.run_json("protect", bid)["protected"] is True
    e.intact()


def test_a_read_only_repository(tmp_path, tmpfs):
    """The repository's filesystem mounted read-only (the catalog and cache elsewhere):
    every reading command works; gc and create fail in one line, changing nothing."""
    repo = tmpfs(tmp_path / "wd" / "repo", "24m")
    e = make_env(tmp_path)
    wd = e.wd
    doomed = wd.create(random_image(tmp_path / "doomed.img", 2, 555) and tmp_path / "doomed.img")
    wd.run_json("delete", doomed["id"])
    subprocess.run(["mount", "-o", "remount,ro", str(repo)], check=True)
    try:
        for bid, expected in e.earlier.items():
            assert wd.show(bid)["status"] == "available"
            assert wd.restore_bytes(bid) == expected
        assert len(wd.list()) == 2
        assert wd.verify("--deep").returncode == 0
        line = no_internal_error(wd.run("gc"))
        assert "gc failed" in line and "Read-only file system" in line, line
        no_internal_error(wd.run("create", "--device", e.small))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(repo)], check=True)
    assert wd.run_json("gc")["packs_deleted"] >= 1
    e.intact()


def test_copy_into_a_full_repository_fails_in_one_line(tmp_path, tmpfs):
    """A copy never spends the target's reserve and stops in one line; with room again,
    the rerun completes."""
    e = make_env(tmp_path)
    big = tmp_path / "big.img"
    data = random_image(big, 8, 556)
    rec = e.wd.create(big)
    fs = tmpfs(tmp_path / "offsite", "16m")
    target = Workdir(fs)
    target.init("64K")
    filler = fill(fs, 0)
    line = no_internal_error(e.wd.run("copy", "--all", "--to-config", target.config))
    assert "full" in line, line
    filler.unlink()
    filler = fill(fs, MiB)   # room to open the target, not for the packs
    line = no_internal_error(e.wd.run("copy", "--all", "--to-config", target.config))
    assert "copy to" in line and "No space left on device" in line, line
    assert target.list() == []
    assert (target.cache / "reserve").stat().st_size == 4 * MiB
    filler.unlink()
    report = e.wd.run_json("copy", "--all", "--to-config", target.config)
    assert rec["id"] in report["copied"] + report["already_present"]
    assert target.restore_bytes(rec["id"]) == data
    e.intact()


# --- a source that fails while it is read ------------------------------------------------------

def test_source_shrinking_during_the_backup(env, tmp_path):
    """The source ends early (a file truncated, a device removed under the run): exit 1,
    one line, an `error` row; the next backup of it works. (EIO from a failing disk:
    tests/lvm/test_read_errors.py, with a device-mapper `error` target.)"""
    wd = env.wd
    img = tmp_path / "shrinking.img"
    # Random data first (slow to compress), then a long sparse tail the reader cannot have
    # reached when it is stopped: it reads at most a few 4 MiB segments ahead.
    random_image(img, SLOW_MIB, 561, sparse_tail_mib=48)
    victim = env.slow_create(img)
    wait_until(lambda: creating(wd, img), "the creating row", victim)
    with stopped(victim), open(img, "r+b") as f:
        f.truncate(48 * MiB)
    code, _, err = finish(victim)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert f"the source ended at byte {48 * MiB}" in lines[0], lines[0]
    row = [r for r in rows(wd) if r["volume_name"] == str(img.resolve())][0]
    assert row["status"] == "error" and "the source ended" in row["fail_reason"], row
    assert not (wd.repo / "manifests" / row["id"]).exists()
    rec = wd.create(img)
    assert wd.restore_bytes(rec["id"]) == img.read_bytes()
    env.intact()


# --- a restore killed midway -------------------------------------------------------------------

def test_killed_restore_to_a_file_leaves_the_old_file_untouched(env):
    """`restore --to-file PATH` writes beside PATH and renames at the end: kill -9 midway
    and PATH still holds what it held (the dead run's temporary file stays beside it)."""
    wd = env.wd
    bid, data = next(iter(env.earlier.items()))
    target = wd.path / "restored.img"
    target.write_bytes(b"the previous content")
    p = wd.run("restore", bid, "--to-file", target, "--force",
               env={"LVBACKUP_FAULT": "restore-segment"})
    assert p.returncode == -signal.SIGKILL, describe(p)
    assert target.read_bytes() == b"the previous content"
    assert len(list(wd.path.glob("restored.img.lvbackup-*.tmp"))) == 1
    assert wd.show(bid)["status"] == "available"
    assert wd.run("restore", bid, "--to-file", target, "--force").returncode == 0
    assert target.read_bytes() == data


# --- damage the other suites do not inflict ----------------------------------------------------

@pytest.fixture
def two(tmp_path):
    """Two backups of two images, each with its own pack and index file."""
    wd = Workdir(tmp_path / "wd")
    wd.init("64K")
    kept = {}
    for seed in (571, 572):
        img = tmp_path / f"{seed}.img"
        before = set(wd.files("index"))
        data = make_image(img, 2, seed=seed)
        rec = wd.create(img)
        (index,) = set(wd.files("index")) - before
        kept[rec["id"]] = (data, index)
    return wd, kept


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_index_file_missing_or_truncated_then_gc_rebuilds_it(two, damage):
    """A backup whose index file is gone or torn fails verify and restore, loudly; the
    packs describe themselves, so gc rewrites the index and the backup is whole again."""
    wd, kept = two
    (bad, (bad_data, index)), (good, (good_data, _)) = kept.items()
    path = wd.repo / index
    if damage == "missing":
        path.unlink()
    else:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    p = wd.verify("--deep")
    assert p.returncode == 3, describe(p)
    assert [ln for ln in p.stdout.splitlines() if bad in ln][0].startswith("FAILED")
    assert [ln for ln in p.stdout.splitlines() if good in ln][0].startswith("ok")
    if damage == "truncated":
        assert Path(index).name in p.stdout and "corrupt" in p.stdout
    p = wd.run("restore", bad, "--to-file", "-", binary=True)
    assert_one_line_error(p, 3, bad, "not in the repository index")
    assert wd.restore_bytes(good) == good_data
    wd.run_json("gc")
    wd.assert_intact({bad: bad_data, good: good_data})


def _damage_a_chunk_of(wd: Workdir, data: bytes) -> None:
    """Flip a byte inside the stored copy of one of `data`'s 64 KiB blocks."""
    import blake3

    from lvbackup.repository.backends import LocalBackend
    from lvbackup.repository.pack import read_trailer

    ids = {blake3.blake3(data[o:o + 64 * 1024]).digest() for o in range(0, len(data), 64 * 1024)}
    storage = LocalBackend(wd.repo)
    try:
        pack, ref = next((pack, r) for pack in sorted(wd.files("packs"))
                         for r in read_trailer(storage, bytes.fromhex(Path(pack).name), PLAIN)
                         if r.chunk_id in ids)
    finally:
        storage.close()
    with open(wd.repo / pack, "r+b") as f:
        f.seek(ref.offset + ref.length // 2)
        byte = f.read(1)
        f.seek(ref.offset + ref.length // 2)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("found_by", ["verify", "restore"])
@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_new_backup_after_a_damaged_chunk_is_whole(two, found_by, kind):
    """Once verify --deep or a restore has found a damaged chunk, the next backup of the
    same data (full, or incremental with the block unchanged) stores that block again
    instead of pointing at the damage; and the backups that named the damaged copy
    restore again, from the new one."""
    wd, kept = two
    bid, (data, _) = next(iter(kept.items()))
    _damage_a_chunk_of(wd, data)
    if found_by == "verify":
        assert wd.verify("--deep").returncode == 3
    else:
        p = wd.run("restore", bid, "--to-file", "-", binary=True)
        assert p.returncode == 3 and b"fails its checksum" in p.stderr, p.stderr
    assert len(wd.files("damaged")) == 1, "the damaged copy is recorded in the repository"
    img = Path([r for r in rows(wd) if r["id"] == bid][0]["volume_name"])
    rec = wd.create(img, *(["--incremental"] if kind == "incremental" else []))
    assert wd.restore_bytes(rec["id"]) == data
    assert wd.restore_bytes(bid) == data, "the old backup heals from the new copy"
    assert wd.verify("--deep").returncode == 0


def test_gc_drops_the_damage_marks_of_packs_it_deletes(two):
    wd, kept = two
    (bid, (data, _)), (other, (other_data, _)) = kept.items()
    _damage_a_chunk_of(wd, data)
    assert wd.verify("--deep").returncode == 3
    assert len(wd.files("damaged")) == 1
    img = Path([r for r in rows(wd) if r["id"] == bid][0]["volume_name"])
    healed = wd.create(img)
    for dead in (bid, healed["id"]):
        wd.run_json("delete", dead)
    wd.run_json("gc")
    assert wd.files("damaged") == {}, "the damaged copy's pack is gone, and so is its mark"
    assert wd.restore_bytes(other) == other_data
    assert wd.verify("--deep").returncode == 0


def test_truncated_manifest_stops_gc_until_deleted(two):
    """A torn manifest fails verify and restore naming the backup; gc refuses to run
    (it cannot tell which chunks that backup needs) until the backup is deleted."""
    wd, kept = two
    (bad, _), (good, (good_data, _)) = kept.items()
    path = wd.repo / "manifests" / bad
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    p = wd.verify()
    assert p.returncode == 3 and "Traceback" not in p.stderr, describe(p)
    assert [ln for ln in p.stdout.splitlines() if bad in ln][0].startswith("FAILED")
    p = wd.run("restore", bad, "--to-file", "-", binary=True)
    assert_one_line_error(p, 3, bad, "manifest")
    packs = set(wd.files("packs"))
    assert_one_line_error(wd.run("gc"), 3, "gc stopped before deleting anything")
    assert set(wd.files("packs")) == packs
    wd.run_json("delete", bad)
    assert wd.run_json("gc")["packs_deleted"] == 1
    wd.assert_intact({good: good_data})


def test_deleted_index_cache_is_rebuilt(two):
    wd, kept = two
    subprocess.run(["rm", "-rf", str(wd.cache)], check=True)
    wd.assert_intact({bid: data for bid, (data, _) in kept.items()})


def test_a_catalog_truncated_to_nothing_warns_until_rebuilt(tmp_path):
    """A zero-byte catalog is a valid empty database: every command that reads it warns
    (one line) that the repository holds backups it does not list; a new repository with
    an empty catalog does not."""
    e = make_env(tmp_path)
    wd = e.wd
    empty = Workdir(tmp_path / "new")
    empty.init()
    assert empty.run("list").stderr == ""
    ids = {r["id"] for r in wd.list()}
    for suffix in ("-wal", "-shm"):
        Path(str(wd.catalog) + suffix).unlink(missing_ok=True)
    wd.catalog.write_bytes(b"")
    for args in (("list",), ("--quiet", "list"), ("verify",)):
        p = wd.run(*args)
        assert p.returncode == 0, describe(p)
        (line,) = p.stderr.splitlines()
        assert "catalog rebuild" in line and str(wd.catalog) in line, line
    p = wd.run("catalog", "rebuild")
    assert p.returncode == 0 and p.stderr == "", describe(p)
    assert {r["id"] for r in wd.list()} == ids
    assert wd.run("list").stderr == ""
    e.intact()


def test_missing_catalog_then_rebuild_recovers_every_backup(tmp_path):
    """The catalog file is lost: `catalog rebuild` recreates every available backup, with
    its lineage, from the manifests alone."""
    e = make_env(tmp_path)
    wd = e.wd
    other = tmp_path / "other.img"
    data = make_image(other, 1, seed=581)
    e.earlier[wd.create(other)["id"]] = data
    before = {r["id"]: r for r in wd.list()}
    for suffix in ("", "-wal", "-shm"):
        Path(str(wd.catalog) + suffix).unlink(missing_ok=True)
    p = wd.run("--json", "list")            # a missing catalog is an empty one, which
    assert p.returncode == 0 and json.loads(p.stdout) == [], describe(p)   # says so:
    (line,) = p.stderr.splitlines()
    assert "warning" in line and "'lvbackup catalog rebuild'" in line and str(wd.repo) in line
    result = wd.run_json("catalog", "rebuild")
    assert result["recovered"] == 3 and result["old_catalog_moved_to"] is None
    after = {r["id"]: r for r in wd.list()}
    assert set(after) == set(before)
    for bid, rec in before.items():
        for key in ("volume_id", "volume_name", "parent_id", "is_incremental", "status",
                    "data_timestamp", "created_at", "size", "block_size", "stored_bytes",
                    "num_dependent_backups", "labels"):
            assert after[bid][key] == rec[key], (bid, key, after[bid][key], rec[key])
    e.intact()
