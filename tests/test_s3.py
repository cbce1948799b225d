"""Repositories in S3-compatible object storage, against a real SeaweedFS server
(tests/s3server.py): every command as a user runs it, credentials, failures of the store,
kill -9 during a backup, abandoned uploads, and the leases that let several hosts share
one bucket.

Most tests share the session's server, each in a prefix of its own; those that stop the
server mid-run start one of their own.
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from s3server import SECRET_KEY, SeaweedServer

from lvbackup.base.errors import CorruptionError
from lvbackup.repository import lease
from lvbackup.repository.backends import open_backend

from support import (
    MiB,
    Workdir,
    apply_change,
    assert_one_line_error,
    describe,
    lock_holders,
    make_image,
    reused_bytes,
    s3_section,
    s3_settings,
    wait_until,
)


def s3_workdir(path: Path, server, bucket: str, prefix: str | None = None, **extra) -> Workdir:
    prefix = prefix or f"repo-{uuid.uuid4().hex[:10]}"
    extra.setdefault("gc_grace_period", 0)
    return Workdir(path, repository=f"s3://{bucket}/{prefix}", s3=s3_section(server), **extra)


@pytest.fixture
def wd(tmp_path, s3server, s3_bucket) -> Workdir:
    return s3_workdir(tmp_path / "wd", s3server, s3_bucket)


def keys(server, bucket: str, prefix: str) -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def bucket_and_prefix(wd: Workdir) -> tuple[str, str]:
    bucket, _, prefix = str(wd.repo).removeprefix("s3://").partition("/")
    return bucket, prefix + "/"


def random_image(path: Path, mib: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(mib * MiB)
    path.write_bytes(data)
    return data


# --- every command --------------------------------------------------------------------------

@pytest.mark.slow
def test_every_command_against_s3(wd, tmp_path, s3server):
    init = wd.init("64K")
    assert init["created"] and init["repository"] == wd.repo
    assert wd.init("64K")["created"] is False
    bucket, prefix = bucket_and_prefix(wd)
    assert f"{prefix}config" in keys(s3server, bucket, prefix)

    image = tmp_path / "disk.img"
    v1 = make_image(image, 6, seed=1)
    full = wd.create(image, "--label", "site=a")
    v2 = apply_change(image, seed=2)
    inc = wd.create(image, "--incremental")
    assert inc["parent_id"] == full["id"] and inc["is_incremental"]
    again = wd.run("create", "--device", image)
    assert reused_bytes(again.stderr) > 0   # deduplicated against the bucket
    assert [b["id"] for b in wd.list()][:2] == [full["id"], inc["id"]]
    assert wd.show(full["id"])["labels"] == {"site": "a"}
    wd.assert_restores(full["id"], v1)
    wd.assert_restores(inc["id"], v2)
    assert wd.run_json("verify", "--deep")
    changed = wd.run_json("diff", inc["id"])
    assert changed["other_id"] == full["id"] and 0 < changed["differing_bytes"] < len(v2)
    record = wd.run("export-record", full["id"])
    assert record.returncode == 0 and record.stdout.strip(), describe(record)

    # The catalog is rebuilt from the bucket alone.
    wd.catalog.unlink()
    rebuilt = wd.run_json("catalog", "rebuild")
    assert rebuilt["recovered"] == 3
    assert {b["id"] for b in wd.list()} >= {full["id"], inc["id"]}

    third = [b for b in wd.list() if b["id"] not in (full["id"], inc["id"])][0]
    wd.run_json("delete", third["id"])
    packs_before = [k for k in keys(s3server, bucket, prefix + "packs/")]
    report = wd.run_json("prune", "--keep-last", "1")
    assert len(report["deleted"]) == 1
    gc = wd.run_json("gc")
    assert gc["unreadable_packs"] == []
    assert len(keys(s3server, bucket, prefix + "packs/")) <= len(packs_before)
    (last,) = wd.list()
    assert last["id"] == inc["id"] and not last["is_incremental"]   # re-parented: full now
    wd.assert_restores(inc["id"], v2)
    assert not [k for k in keys(s3server, bucket, prefix + "locks/")], "leases are released"


def test_config_check_says_where_credentials_come_from_and_never_prints_them(
        tmp_path, s3server, s3_bucket):
    wd = s3_workdir(tmp_path / "wd", s3server, s3_bucket)
    p = wd.run("config", "check")
    assert p.returncode == 0, describe(p)
    assert SECRET_KEY not in p.stdout + p.stderr
    assert s3_section(s3server)["access_key_id"] not in p.stdout + p.stderr
    doc = wd.run_json("config", "check")
    assert set(doc["s3"]) == {"endpoint_url", "region", "addressing_style", "credentials",
                             "object_lock"}
    assert doc["repository"] == wd.repo
    assert doc["s3"]["credentials"].startswith("the configuration file")
    assert doc["s3"]["endpoint_url"] == s3server.endpoint
    # The same keys from the environment work, and are said to come from there.
    section = {k: v for k, v in s3_section(s3server).items()
               if k not in ("access_key_id", "secret_access_key")}
    env_wd = Workdir(tmp_path / "env", repository=wd.repo, s3=section)
    env = {"AWS_ACCESS_KEY_ID": s3_section(s3server)["access_key_id"],
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    p = env_wd.run("--json", "config", "check", env=env)
    assert json.loads(p.stdout)["s3"]["credentials"].startswith("the environment")
    assert SECRET_KEY not in p.stdout + p.stderr
    p = env_wd.run("--json", "init", env=env)
    assert p.returncode == 0 and json.loads(p.stdout)["created"], describe(p)


def test_bad_s3_settings_are_refused_naming_the_key(tmp_path, s3server):
    wd = Workdir(tmp_path / "wd", repository="s3://bucket/x",
                 s3={"endpoint_url": s3server.endpoint, "access_key_id": "only-half"})
    assert_one_line_error(wd.run("init"), 2, "s3.access_key_id", "s3.secret_access_key")
    wd = Workdir(tmp_path / "wd2", repository="s3://bucket/x", s3={"addressing_style": "odd"})
    assert_one_line_error(wd.run("init"), 2, "s3.addressing_style")
    wd = Workdir(tmp_path / "wd3", repository="s3://Not_A_Bucket/x", s3=s3_section(s3server))
    assert_one_line_error(wd.run("init"), 2, "not a bucket name")


def test_wrong_credentials_exit_2_in_one_line(tmp_path, s3server, s3_bucket, wd):
    wd.init()
    wrong = Workdir(tmp_path / "wrong", repository=wd.repo,
                    s3=s3_section(s3server, secret="not-the-secret"))
    for args in (["init"], ["gc"], ["verify"], ["create", "--device", __file__]):
        line = assert_one_line_error(wrong.run(*args), 2, "refused the credentials",
                                     s3server.endpoint)
        assert "not-the-secret" not in line


def test_an_unreachable_endpoint_exits_1_not_as_damage(tmp_path):
    """A network failure is worth retrying: exit 1, not 3 (damage found)."""
    with socket.socket() as sock:      # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wd = Workdir(tmp_path / "wd", repository="s3://bucket/prefix",
                 s3={"endpoint_url": endpoint, "region": "us-east-1",
                     "addressing_style": "path", "access_key_id": "x",
                     "secret_access_key": "not-a-real-secret"})
    assert_one_line_error(wd.run("verify"), 1, endpoint)


def test_a_missing_bucket_exits_2_naming_it(tmp_path, s3server):
    wd = s3_workdir(tmp_path / "wd", s3server, "no-such-bucket-here")
    assert_one_line_error(wd.run("init"), 2, "bucket no-such-bucket-here does not exist")


# --- crashes and failures of the store ----------------------------------------------------

SLOW = {"workers": 1, "compression_level": 19}


@pytest.mark.slow
@pytest.mark.parametrize("point", ["pack-pending", "index-written", "manifest-written"])
def test_kill_9_during_a_backup_to_s3(tmp_path, s3server, s3_bucket, point):
    wd = s3_workdir(tmp_path / "wd", s3server, s3_bucket)
    wd.init("64K")
    small = tmp_path / "small.img"
    make_image(small, 1, seed=4)
    earlier = wd.create(small)
    image = tmp_path / "big.img"
    data = random_image(image, 36, seed=5)
    p = wd.run("create", "--device", image, env={"LVBACKUP_FAULT": point})
    assert p.returncode == -9, describe(p)
    bucket, prefix = bucket_and_prefix(wd)
    manifests = keys(s3server, bucket, prefix + "manifests/")
    (row,) = [b for b in wd.list() if b["id"] != earlier["id"]]   # the dead run settled
    if point == "manifest-written":
        # Complete but for its catalog row: the next command makes it available.
        assert len(manifests) == 2 and row["status"] == "available"
        wd.assert_restores(row["id"], data)
    else:
        assert len(manifests) == 1 and row["status"] == "error"
        rerun = wd.run("--json", "create", "--device", image)
        assert rerun.returncode == 0, describe(rerun)
        assert reused_bytes(rerun.stderr) >= 16 * MiB, "the dead run's packs are reused"
        wd.assert_restores(json.loads(rerun.stdout)["id"], data)
    assert wd.run_json("gc")["unreadable_packs"] == []
    wd.assert_restores(earlier["id"], small.read_bytes())
    assert not keys(s3server, bucket, prefix + "locks/")


@pytest.mark.slow
def test_kill_9_during_gc_on_s3_leaves_every_backup_restorable(tmp_path, s3server, s3_bucket):
    wd = s3_workdir(tmp_path / "wd", s3server, s3_bucket)
    wd.init("64K")
    images = []
    for n in range(3):
        image = tmp_path / f"{n}.img"
        data = random_image(image, 20, seed=60 + n)
        images.append((wd.create(image), data))
    wd.run_json("delete", images[0][0]["id"])
    p = wd.run("gc", env={"LVBACKUP_FAULT": "gc-pack-deleted"})
    assert p.returncode == -9, describe(p)
    for rec, data in images[1:]:
        wd.assert_restores(rec["id"], data)
    # The dead gc's lease (this host, a pid that is gone) does not hold the next one up.
    bucket, prefix = bucket_and_prefix(wd)
    assert keys(s3server, bucket, prefix + "locks/") == [prefix + "locks/exclusive"]
    assert wd.run_json("gc")["unreadable_packs"] == []
    for rec, data in images[1:]:
        wd.assert_restores(rec["id"], data)


def test_abandoned_multipart_uploads_are_removed_by_gc_after_the_grace_period(
        tmp_path, s3server, s3_bucket):
    wd = s3_workdir(tmp_path / "wd", s3server, s3_bucket, gc_grace_period=3600)
    wd.init()
    bucket, prefix = bucket_and_prefix(wd)
    client = s3server.client()
    # What a run killed in the middle of a large upload leaves: an upload never completed.
    client.create_multipart_upload(Bucket=bucket, Key=prefix + "packs/00/abandoned")

    def uploads() -> list[str]:
        found = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        return [u["Key"] for u in found]

    assert uploads() == [prefix + "packs/00/abandoned"]
    assert wd.run_json("gc")["packs_deleted"] == 0
    assert uploads(), "a young upload may be another host's, still going"
    assert not keys(s3server, bucket, prefix + "packs/00/")
    prompt = wd.config_with("nograce.yaml", gc_grace_period=0)
    wd.run_json("gc", config=prompt)
    assert uploads() == []


def test_gc_spares_young_unreferenced_packs_on_a_shared_store(tmp_path, s3server, s3_bucket):
    wd = s3_workdir(tmp_path / "wd", s3server, s3_bucket, gc_grace_period=3600)
    wd.init("64K")
    image = tmp_path / "a.img"
    make_image(image, 3, seed=9)
    rec = wd.create(image)
    wd.run_json("delete", rec["id"])
    bucket, prefix = bucket_and_prefix(wd)
    packs = keys(s3server, bucket, prefix + "packs/")
    gc = wd.run_json("gc")
    assert gc["packs_deleted"] == 0 and gc["packs_spared_young"] == len(packs) > 0
    assert keys(s3server, bucket, prefix + "packs/") == packs
    gc = wd.run_json("gc", config=wd.config_with("nograce.yaml", gc_grace_period=0))
    assert gc["packs_deleted"] == len(packs)
    assert keys(s3server, bucket, prefix + "packs/") == []


@pytest.fixture
def own_server(tmp_path):
    server = SeaweedServer(tmp_path / "own-seaweedfs").start()
    yield server
    server.stop()


@pytest.mark.slow
def test_the_server_stopped_mid_backup_and_mid_restore(tmp_path, own_server):
    bucket = own_server.new_bucket()
    wd = s3_workdir(tmp_path / "wd", own_server, bucket)
    wd.init("64K")
    bucket, prefix = bucket_and_prefix(wd)
    image = tmp_path / "big.img"
    data = random_image(image, 36, seed=6)
    small = tmp_path / "small.img"
    v1 = make_image(small, 2, seed=7)
    earlier = wd.create(small)

    proc = wd.popen("create", "--device", image, config=wd.config_with("slow.yaml", **SLOW))
    packs_before = len(keys(own_server, bucket, prefix + "packs/"))
    wait_until(lambda: len(keys(own_server, bucket, prefix + "packs/")) > packs_before,
               "a pack is stored", proc)
    own_server.stop()
    out, err = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_line_error(done, 1, own_server.endpoint)

    own_server.start()   # the same ports and data
    rec = wd.create(image)
    wd.assert_restores(rec["id"], data)
    wd.assert_restores(earlier["id"], v1)
    assert [b["status"] for b in wd.list() if b["id"] != rec["id"]
            and b["id"] != earlier["id"]] == ["error"]

    restore = wd.popen("restore", rec["id"], "--to-file", "-")
    assert restore.stdout is not None
    assert len(restore.stdout.read(1 * MiB)) == MiB
    own_server.stop()
    rest = restore.stdout.read()
    assert len(rest) + MiB < len(data), "the restore did not finish without the server"
    restore.wait(timeout=300)
    err = restore.stderr.read() if restore.stderr else b""
    done = subprocess.CompletedProcess(restore.args, restore.returncode, b"", err)
    assert_one_line_error(done, 1, own_server.endpoint)
    own_server.start()
    wd.assert_restores(rec["id"], data)


# --- hosts sharing one bucket ---------------------------------------------------------------

@pytest.mark.slow
def test_two_configurations_share_a_bucket_and_gc_one_at_a_time(tmp_path, s3server,
                                                                 s3_bucket):
    one = s3_workdir(tmp_path / "one", s3server, s3_bucket)
    two = s3_workdir(tmp_path / "two", s3server, s3_bucket, prefix=str(one.repo).split("/")[-1])
    one.init("64K")
    assert two.init("64K")["created"] is False
    images = []
    for n, w in enumerate((one, two)):
        image = tmp_path / f"{n}.img"
        data = make_image(image, 4, seed=20 + n)
        images.append((w, w.create(image), data))
    # Two backups of different hosts at once, then two gcs at once (each waits its turn).
    procs = [w.popen("create", "--device", tmp_path / f"{n}.img")
             for n, w in enumerate((one, two))]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    one.run_json("delete", images[0][1]["id"])
    procs = [w.popen("--json", "gc", "--wait", "120") for w in (one, two)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    for w, rec, data in images[1:]:
        w.assert_restores(rec["id"], data)
    for w in (one, two):
        for b in w.list():
            assert w.verify(b["id"], "--deep").returncode == 0


@pytest.mark.slow
def test_a_cache_that_did_not_list_is_never_trusted_past_another_hosts_gc(tmp_path, s3server,
                                                                       s3_bucket):
    """Runs skip listing the index while `index-changes` stands; another host's gc replaces
    it before deleting anything, and a read that misses a chunk lists at once."""
    one = s3_workdir(tmp_path / "one", s3server, s3_bucket)
    two = s3_workdir(tmp_path / "two", s3server, s3_bucket, prefix=str(one.repo).split("/")[-1])
    one.init("64K")
    two.init("64K")
    image, other = tmp_path / "a.img", tmp_path / "b.img"
    data = make_image(image, 4, seed=31)
    make_image(other, 2, seed=32)
    two.create(other)                       # two's cache has listed the index
    first = one.create(image)               # one's new index file, unseen by two's cache
    two.run_json("catalog", "rebuild")
    two.assert_restores(first["id"], data)  # the miss lists, and finds one's chunks
    one.run_json("delete", first["id"])
    assert two.run_json("gc")["packs_deleted"] > 0
    # Had one's cache stood, this backup of the same data would name the deleted packs.
    second = one.create(image)
    assert second["stored_bytes"] > 0
    one.assert_restores(second["id"], data)
    assert one.verify(second["id"], "--deep").returncode == 0


def test_an_append_only_host_backs_up_restores_and_releases_its_lease(tmp_path, s3server,
                                                                     s3_bucket):
    wd = s3_workdir(tmp_path / "wd", s3server, s3_bucket, append_only=True)
    wd.init("64K")
    image = tmp_path / "a.img"
    data = make_image(image, 2, seed=33)
    first = wd.create(image)
    apply_change(image, seed=34)
    second = wd.create(image, "--incremental")
    wd.assert_restores(first["id"], data)
    assert second["parent_id"] == first["id"]
    assert_one_line_error(wd.run("gc"), 2, "append_only")
    bucket, prefix = bucket_and_prefix(wd)
    assert [k for k in keys(s3server, bucket, prefix) if k.startswith(prefix + "locks/")] == []


@pytest.mark.slow
def test_gc_waits_for_a_held_lease_and_takes_over_an_expired_one(tmp_path, s3server,
                                                                 s3_bucket, wd):
    wd.init()
    storage = open_backend(str(wd.repo), s3=s3_settings(s3server))
    with lease.exclusive(storage, "gc"):   # another host's gc, alive
        line = assert_one_line_error(wd.run("gc"), 75, "locked by another host's run", "gc")
        assert "host" in line
        image = tmp_path / "x.img"
        make_image(image, 1, seed=3)
        assert_one_line_error(wd.run("create", "--device", image), 75, "locked")
    assert wd.run_json("gc")["packs_deleted"] == 0

    # A host that died holding the lease: it has expired, and is taken over.
    storage.put(lease.EXCLUSIVE, json.dumps({"host": "gone", "pid": 1, "what": "gc",
                                              "expires": time.time() - 1}).encode())
    wd.run_json("gc")
    assert not storage.exists(lease.EXCLUSIVE)

    # A live run lease (a backup on another host) keeps gc and prune out; a dead one does not.
    with lease.shared(storage, "a backup"):
        assert_one_line_error(wd.run("gc"), 75, "in use by another host's run", "a backup")
        assert_one_line_error(wd.run("prune", "--keep-last", "1"), 75, "in use")
    dead = f"{lease.RUN_PREFIX}dead"
    storage.put(dead, json.dumps({"host": "gone", "expires": time.time() - 1}).encode())
    wd.run_json("gc")
    assert not storage.exists(dead)
    storage.close()


def test_a_lease_holder_that_loses_its_lease_notices(s3server, s3_bucket):
    storage = open_backend(f"s3://{s3_bucket}/lease-{uuid.uuid4().hex[:8]}",
                           s3=s3_settings(s3server))
    held = lease.Lease(storage, lease.EXCLUSIVE, "gc", term=0.3)
    storage.put(lease.EXCLUSIVE, held.body())
    held.held()
    held.check()
    # Another run takes it over (as after the lease expired while this one stalled).
    storage.replace(lease.EXCLUSIVE, b"{}", storage.token(lease.EXCLUSIVE))
    deadline = time.monotonic() + 30
    while held._lost is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(lease.LeaseLost, match="taken by another run"):
        held.check()
    held.release()
    assert storage.get(lease.EXCLUSIVE) == b"{}", "the other run's lease is left alone"
    storage.close()


def test_runs_with_wait_go_ahead_once_the_other_hosts_lease_is_released(tmp_path, s3server,
                                                                        s3_bucket, wd):
    wd.init("64K")
    image = tmp_path / "x.img"
    make_image(image, 1, seed=8)
    storage = open_backend(str(wd.repo), s3=s3_settings(s3server))
    repo_lock = wd.cache / "locks" / "repository.lock"
    with lease.exclusive(storage, "gc"):
        backup = wd.popen("--json", "create", "--device", image, "--wait", "120")
        # This host's repository lock is taken just before the lease is asked for.
        wait_until(lambda: lock_holders(repo_lock).get(backup.pid) == "READ",
                   "the backup to ask for its lease", backup)
        assert backup.poll() is None, "the backup waits while the exclusive lease is held"
        released = datetime.now(UTC)
    out, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    doc = json.loads(out)
    assert doc["status"] == "available"
    assert datetime.fromisoformat(doc["created_at"]) >= released, "it did not wait"
    with lease.shared(storage, "a restore"):
        gc = wd.popen("--json", "gc", "--wait", "120")
        # gc holds the exclusive lease, then waits for the run leases to go.
        wait_until(lambda: storage.exists(lease.EXCLUSIVE)
                   and json.loads(storage.get(lease.EXCLUSIVE))["pid"] == gc.pid,
                   "gc to take the exclusive lease", gc)
        assert gc.poll() is None, "gc waits while a run lease is live"
    out, err = gc.communicate(timeout=120)
    assert gc.returncode == 0, err
    storage.close()


# --- reads ------------------------------------------------------------------------------------

def counted_gets(storage) -> list[str]:
    """The Range of every GET the backend sends from now on."""
    ranges: list[str] = []
    storage._client.meta.events.register(
        "before-parameter-build.s3.GetObject",
        lambda params, **_: ranges.append(params.get("Range", "")))
    return ranges


def test_a_scan_is_served_by_few_large_gets_and_random_reads_by_exact_ones(s3server, s3_bucket):
    from lvbackup.repository.backends.s3 import READ_AHEAD

    storage = open_backend(f"s3://{s3_bucket}/reads-{uuid.uuid4().hex[:8]}",
                           s3=s3_settings(s3server))
    data = random.Random(3).randbytes(2 * READ_AHEAD + 12345)
    storage.put("packs/aa/big", data)
    gets = counted_gets(storage)
    # Runs of ~1 MiB in order, from four threads at once, as a restore's workers read them.
    runs = [(o, min(1000003, len(data) - o)) for o in range(8, len(data), 1000003)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: storage.get_range("packs/aa/big", *r), runs))
    assert got == [data[o:o + n] for o, n in runs]
    assert len(gets) <= 5, f"{len(runs)} reads of a scan took {len(gets)} GETs: {gets}"
    out = [memoryview(bytearray(100)), memoryview(bytearray(READ_AHEAD))]
    storage.get_range_into("packs/aa/big", READ_AHEAD - 100, out)   # across two windows
    assert bytes(out[0]) + bytes(out[1]) == data[READ_AHEAD - 100:2 * READ_AHEAD]

    # Past the middle of a window, the next one is fetched before a read asks for it.
    storage.put("packs/cc/ahead", data)
    gets.clear()
    assert storage.get_range("packs/cc/ahead", 8, 2 * MiB) == data[8:8 + 2 * MiB]
    assert storage.get_range("packs/cc/ahead", 6 * MiB, 2 * MiB) == data[6 * MiB:8 * MiB]
    second = f"bytes={READ_AHEAD}-{2 * READ_AHEAD - 1}"
    deadline = time.monotonic() + 30
    while second not in gets and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gets == [f"bytes=0-{READ_AHEAD - 1}", second]
    assert storage.get_range("packs/cc/ahead", READ_AHEAD + 5, MiB) == data[READ_AHEAD + 5:][:MiB]
    assert len(gets) == 2, gets

    # Reads that do not go forward in a row (gc's footer then trailer, chunks in id order,
    # a mapped backup's random reads) fetch exactly what they ask for.
    other = random.Random(4).randbytes(2 * READ_AHEAD)
    storage.put("packs/bb/other", other)
    gets.clear()
    spans = [(len(other) - 44, 44), (len(other) - 44 - 49 * 300, 49 * 300)]
    spans += [(random.Random(i).randrange(len(other) - 65536), 65536) for i in range(20)]
    for offset, length in spans:
        assert storage.get_range("packs/bb/other", offset, length) == other[offset:][:length]
    assert gets == [f"bytes={o}-{o + n - 1}" for o, n in spans]

    # Past the end: the same error as without windows, whatever was read before.
    with pytest.raises(CorruptionError, match="truncated"):
        storage.get_range("packs/aa/big", len(data) - 10, 20)
    with pytest.raises(CorruptionError, match="truncated"):
        storage.get_range("packs/aa/big", len(data) + READ_AHEAD, 20)

    # An object put again (a damaged pack replaced) is read anew, not from a window.
    storage.delete("packs/aa/big")
    storage.put("packs/aa/big", bytes(len(data)))
    assert storage.get_range("packs/aa/big", 1000011, 1000003) == bytes(1000003)
    storage.close()


@pytest.fixture
def cutting_proxy(s3server):
    from s3proxy import TruncatingProxy

    proxy = TruncatingProxy(s3server.endpoint)
    yield proxy
    proxy.stop()


@pytest.mark.slow
def test_a_body_cut_off_mid_transfer_is_fetched_again(tmp_path, s3server, s3_bucket,
                                                      cutting_proxy) -> None:
    """A dropped connection in the middle of a response body (IncompleteRead) is retried
    like an error response: verify --deep and a restore through a proxy that cuts bodies
    off still read every chunk, bit-exact."""
    wd = s3_workdir(tmp_path / "wd", s3server, s3_bucket)
    wd.place["s3"] = {**wd.place["s3"], "endpoint_url": cutting_proxy.endpoint}
    wd.config = wd.config_with("lvbackup.yaml")
    image = tmp_path / "disk.img"
    data = make_image(image, 24, seed=5)
    wd.init()
    rec = wd.create(image)
    p = wd.verify("--deep")
    assert p.returncode == 0, describe(p) + str(cutting_proxy.cut_paths)
    cutting_proxy.cut = 3
    p = wd.verify("--deep")
    assert p.returncode == 0, describe(p) + str(cutting_proxy.cut_paths)
    assert cutting_proxy.cuts == 3
    cutting_proxy.cut = 3
    assert wd.restore_bytes(rec["id"]) == data
    assert cutting_proxy.cuts == 6


def test_a_body_cut_off_every_time_fails_in_one_line(s3server, s3_bucket, monkeypatch
                                                     ) -> None:
    from s3proxy import TruncatingProxy

    from lvbackup.repository.backends import s3 as s3_backend

    monkeypatch.setattr(s3_backend.time, "sleep", lambda seconds: None)
    proxy = TruncatingProxy(s3server.endpoint)
    try:
        settings = dataclasses.replace(s3_settings(s3server), endpoint_url=proxy.endpoint)
        backend = open_backend(f"s3://{s3_bucket}/cut-{uuid.uuid4().hex[:8]}", s3=settings)
        backend.put("object", b"x" * 4096)
        proxy.cut = s3_backend.ATTEMPTS
        with pytest.raises(s3_backend.Unreachable,
                           match=f"cut off object {s3_backend.ATTEMPTS} times"):
            backend.get("object")
        assert proxy.cuts == s3_backend.ATTEMPTS
        proxy.cut = 1
        assert backend.get("object") == b"x" * 4096
    finally:
        proxy.stop()
