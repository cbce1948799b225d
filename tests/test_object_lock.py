"""S3 Object Lock (`s3.object_lock`) and `--as-of`, against a real SeaweedFS server
(tests/s3server.py): the configuration's bad input, init refusing a bucket without Object
Lock, every object holding a backup written locked and leases not, locks extended and
expired versions released by gc, the overwrite alarm of verify, and the recovery of a
repository an attacker holding the host's credentials overwrote and deleted.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from support import Workdir, assert_one_line_error, describe, make_image, s3_section

DAYS = 30


def locked_workdir(path: Path, server, bucket: str, **extra) -> Workdir:
    extra.setdefault("gc_grace_period", 0)
    section = {**s3_section(server), "object_lock": {"mode": "compliance", "days": DAYS}}
    return Workdir(path, repository=f"s3://{bucket}/repo-{uuid.uuid4().hex[:10]}",
                   s3=section, **extra)


@pytest.fixture(scope="module")
def locked_bucket(s3server) -> str:
    return s3server.new_bucket(locked=True)


@pytest.fixture
def wd(tmp_path, s3server, locked_bucket) -> Workdir:
    return locked_workdir(tmp_path / "wd", s3server, locked_bucket)


def prefix_of(wd: Workdir) -> tuple[str, str]:
    bucket, _, prefix = str(wd.repo).removeprefix("s3://").partition("/")
    return bucket, prefix + "/"


def versions(server, wd: Workdir) -> tuple[list[dict], list[dict]]:
    """(versions, delete markers) under the workdir's repository."""
    bucket, prefix = prefix_of(wd)
    found: tuple[list[dict], list[dict]] = ([], [])
    for page in server.client().get_paginator("list_object_versions").paginate(
            Bucket=bucket, Prefix=prefix):
        found[0].extend(page.get("Versions", []))
        found[1].extend(page.get("DeleteMarkers", []))
    return found


def name_of(wd: Workdir, key: str) -> str:
    return key[len(prefix_of(wd)[1]):]


# --- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize(("lock", "key"), [
    ({"mode": "compliance", "days": 0}, "s3.object_lock.days"),
    ({"mode": "compliance", "days": "30"}, "s3.object_lock.days"),
    ({"mode": "compliance", "days": True}, "s3.object_lock.days"),
    ({"mode": "legal", "days": 30}, "s3.object_lock.mode"),
    ({"mode": "compliance"}, "s3.object_lock.days"),
    ({"mode": "compliance", "days": 30, "years": 1}, "s3.object_lock"),
    ("compliance", "s3.object_lock"),
])
def test_bad_object_lock_settings_name_the_key(tmp_path, lock, key):
    wd = Workdir(tmp_path, repository="s3://bucket/prefix",
                 s3={"endpoint_url": "http://127.0.0.1:9", "object_lock": lock})
    assert_one_line_error(wd.run("list"), 2, f"'{key}'")


def test_object_lock_on_a_local_repository_is_a_config_error(tmp_path):
    wd = Workdir(tmp_path, s3={"object_lock": {"mode": "governance", "days": 7}})
    assert_one_line_error(wd.run("list"), 2, "'s3.object_lock'", "s3://")


def test_config_check_shows_the_lock(wd):
    shown = wd.run_json("config", "check")
    assert shown["s3"]["object_lock"] == {"mode": "compliance", "days": DAYS}


# --- init ---------------------------------------------------------------------------------------

def test_init_refuses_a_bucket_without_object_lock(tmp_path, s3server, s3_bucket):
    wd = locked_workdir(tmp_path, s3server, s3_bucket)
    line = assert_one_line_error(wd.run("init"), 2, s3_bucket, "Object Lock",
                                 "--object-lock-enabled-for-bucket")
    assert "create" in line
    bucket, prefix = prefix_of(wd)
    assert "Contents" not in s3server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    # The bucket's settings are left as they were.
    assert s3server.client().get_bucket_versioning(Bucket=s3_bucket).get("Status") is None


# --- locked writes ------------------------------------------------------------------------------

def test_every_object_holding_a_backup_is_written_locked(wd, tmp_path, s3server):
    wd.init()
    image = make_image(tmp_path / "disk.img", 2, seed=1)
    before = datetime.now(UTC)
    first = wd.create(tmp_path / "disk.img")
    make_image(tmp_path / "disk.img", 2, seed=2)
    wd.create(tmp_path / "disk.img", "--incremental")
    client = s3server.client()
    bucket, _ = prefix_of(wd)
    found, markers = versions(s3server, wd)
    names = {name_of(wd, v["Key"]) for v in found}
    assert {"config"} <= names and any(n.startswith("packs/") for n in names)
    assert any(n.startswith("manifests/") for n in names)
    assert any(n.startswith("index/") for n in names)
    for v in found:
        name = name_of(wd, v["Key"])
        head = client.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        if name.startswith("locks/") or name == "index-changes":
            assert head.get("ObjectLockMode") is None, name
            continue
        assert head.get("ObjectLockMode") == "COMPLIANCE", name
        until = head["ObjectLockRetainUntilDate"]
        assert until >= before + timedelta(days=DAYS) - timedelta(seconds=5), (name, until)
    # Leases and index-changes were renewed and released without leaving past versions.
    coordination = [v for v in found + markers if name_of(wd, v["Key"]).startswith("locks/")
                    or name_of(wd, v["Key"]) == "index-changes"]
    assert all(v["IsLatest"] for v in coordination), coordination
    wd.assert_restores(first["id"], image)


def test_locked_objects_cannot_be_deleted_by_the_credentials(wd, tmp_path, s3server):
    wd.init()
    make_image(tmp_path / "disk.img", 1, seed=3)
    wd.create(tmp_path / "disk.img")
    bucket, _ = prefix_of(wd)
    client = s3server.client()
    pack = next(v for v in versions(s3server, wd)[0] if "/packs/" in v["Key"])
    with pytest.raises(client.exceptions.ClientError) as refused:
        client.delete_object(Bucket=bucket, Key=pack["Key"], VersionId=pack["VersionId"])
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_create_refuses_a_repository_whose_bucket_has_no_lock(tmp_path, s3server, s3_bucket):
    # A repository made without the setting, then configured with it: its bucket (as one
    # whose lock configuration was lost) cannot lock what a backup would write.
    plain = Workdir(tmp_path / "plain", repository=f"s3://{s3_bucket}/repo-{uuid.uuid4().hex[:8]}",
                    s3=s3_section(s3server))
    plain.init()
    make_image(tmp_path / "disk.img", 1, seed=4)
    locked = Workdir(tmp_path / "locked", repository=plain.repo,
                     s3={**s3_section(s3server),
                         "object_lock": {"mode": "governance", "days": 3}})
    p = locked.run("create", "--device", tmp_path / "disk.img")
    assert_one_line_error(p, 2, "Object Lock")
    assert plain.list() == [], describe(p)


# --- --as-of ------------------------------------------------------------------------------------

def utc_text(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def a_second_boundary() -> str:
    """A time (whole seconds) after everything written so far and before anything written
    next: object times are whole seconds."""
    time.sleep(1.1)
    mark = utc_text(time.time())
    time.sleep(1.1)
    return mark


def fresh_host(wd: Workdir, path: Path) -> Workdir:
    """Another host: the same repository and settings, a new catalog and cache."""
    return Workdir(path, repository=wd.repo, s3=wd.place["s3"], **wd.extra)


def attack(server, wd: Workdir) -> None:
    """What a script holding the host's own credentials can do: overwrite every manifest
    and delete every pack (and index file)."""
    bucket, prefix = prefix_of(wd)
    client = server.client()
    for v in versions(server, wd)[0]:
        if not v["IsLatest"]:
            continue
        name = name_of(wd, v["Key"])
        if name.startswith("manifests/"):
            client.put_object(Bucket=bucket, Key=v["Key"], Body=b"encrypted by ransomware")
        elif name.startswith(("packs/", "index/")):
            client.delete_object(Bucket=bucket, Key=v["Key"])
            with pytest.raises(client.exceptions.ClientError):
                client.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])


@pytest.mark.slow
def test_recovery_after_an_attack_from_a_new_host(wd, tmp_path, s3server):
    wd.init()
    disk = tmp_path / "disk.img"
    first_image = make_image(disk, 3, seed=11)
    first = wd.create(disk)
    second_image = make_image(disk, 3, seed=12)
    second = wd.create(disk, "--incremental")
    before = a_second_boundary()
    attack(s3server, wd)
    # The attack shows: the backups cannot be read any more as the repository stands.
    assert wd.verify("--deep").returncode != 0

    host = fresh_host(wd, tmp_path / "new-host")
    assert host.run("--as-of", before, "catalog", "rebuild").returncode == 0
    listed = host.run_json("--as-of", before, "list")
    assert {r["id"] for r in listed} == {first["id"], second["id"]}
    p = host.run("--as-of", before, "verify", "--deep")
    assert p.returncode == 0, describe(p)
    for rec, image in ((first, first_image), (second, second_image)):
        p = host.run("--as-of", before, "restore", rec["id"], "--to-file", "-", binary=True)
        assert p.returncode == 0, describe(p)
        assert p.stdout == image
    # The recovered backups copied out into a clean repository, which restores them.
    clean = Workdir(tmp_path / "clean")
    p = host.run("--as-of", before, "copy", "--all", "--to-config", clean.config, "--init")
    assert p.returncode == 0, describe(p)
    clean.assert_restores(second["id"], second_image)


def test_as_of_reads_what_was_deleted_since(wd, tmp_path, s3server):
    wd.init()
    disk = tmp_path / "disk.img"
    image = make_image(disk, 1, seed=21)
    rec = wd.create(disk)
    before = a_second_boundary()
    assert wd.run("delete", rec["id"]).returncode == 0
    p = wd.run("gc")
    assert p.returncode == 0, describe(p)
    assert wd.list() == []
    # This host's catalog says what it did (deleted); a new one, rebuilt as of then, has it.
    host = fresh_host(wd, tmp_path / "new-host")
    assert host.run("--as-of", before, "catalog", "rebuild").returncode == 0
    assert host.run_json("--as-of", before, "show", rec["id"])["status"] == "available"
    p = host.run("--as-of", before, "restore", rec["id"], "--to-file", "-", binary=True)
    assert p.returncode == 0, describe(p)
    assert p.stdout == image


WRITERS = [("create", "--device", "{disk}"), ("delete", "{id}"), ("gc",),
           ("prune", "--keep-last", "1"), ("init",), ("run",), ("protect", "{id}"),
           ("key", "add"), ("snapshot", "list"), ("import-record", "-")]


def test_as_of_refuses_writers(wd, tmp_path):
    wd.init()
    disk = tmp_path / "disk.img"
    make_image(disk, 1, seed=31)
    rec = wd.create(disk)
    before = a_second_boundary()
    for argv in WRITERS:
        args = [a.format(disk=disk, id=rec["id"]) for a in argv]
        assert_one_line_error(wd.run("--as-of", before, *args), 2, "--as-of", "read-only")
    assert [r["id"] for r in wd.list()] == [rec["id"]]


@pytest.mark.parametrize(("when", "fragment"), [
    ("yesterday", "not a time"), ("2026-13-01T00:00:00Z", "not a time"),
    ("2999-01-01T00:00:00Z", "future")])
def test_as_of_bad_times(wd, when, fragment):
    wd.init()
    assert_one_line_error(wd.run("--as-of", when, "list"), 2, "--as-of", fragment)


def test_as_of_before_the_repository_existed(wd):
    early = utc_text(time.time() - 3600)
    wd.init()
    assert_one_line_error(wd.run("--as-of", early, "list"), 2, "--as-of", "no repository")


def test_as_of_on_a_local_repository(tmp_path):
    wd = Workdir(tmp_path)
    wd.init()
    assert_one_line_error(wd.run("--as-of", utc_text(time.time()), "list"), 2, "--as-of",
                          "S3")


def test_as_of_catalog_rebuild_wants_a_new_catalog(wd, tmp_path):
    wd.init()
    make_image(tmp_path / "disk.img", 1, seed=41)
    wd.create(tmp_path / "disk.img")
    before = a_second_boundary()
    assert_one_line_error(wd.run("--as-of", before, "catalog", "rebuild"), 2,
                          "new catalog", str(wd.catalog))


# --- gc, lock extension ---------------------------------------------------------------------

def shorten(server, wd: Workdir, seconds: float) -> int:
    """Shorten every governance lock under the repository (what bypass permission allows),
    to now + `seconds`: as if the objects were written long ago. How many."""
    bucket, _ = prefix_of(wd)
    client = server.client()
    until = datetime.now(UTC) + timedelta(seconds=seconds)
    n = 0
    for v in versions(server, wd)[0]:
        head = client.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        if head.get("ObjectLockMode") == "GOVERNANCE":
            client.put_object_retention(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"],
                                        Retention={"Mode": "GOVERNANCE",
                                                   "RetainUntilDate": until},
                                        BypassGovernanceRetention=True)
            n += 1
    return n


def retention(server, wd: Workdir) -> dict[str, tuple[bool, datetime | None]]:
    """name -> (current?, retain-until) of every version (by name and version id)."""
    bucket, _ = prefix_of(wd)
    client = server.client()
    out = {}
    for v in versions(server, wd)[0]:
        head = client.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        out[f"{name_of(wd, v['Key'])}@{v['VersionId']}"] = (
            v["IsLatest"], head.get("ObjectLockRetainUntilDate"))
    return out


@pytest.fixture
def gov(tmp_path, s3server, locked_bucket) -> Workdir:
    wd = locked_workdir(tmp_path / "gov", s3server, locked_bucket)
    wd.place["s3"] = {**wd.place["s3"], "object_lock": {"mode": "governance", "days": 2}}
    wd.config = wd.config_with("lvbackup.yaml", **wd.extra)
    return wd


def test_gc_extends_the_locks_of_kept_objects_and_holds_deleted_ones(gov, tmp_path, s3server):
    wd = gov
    wd.init()
    disk = tmp_path / "disk.img"
    make_image(disk, 2, seed=51)
    gone = wd.create(disk)
    kept_image = make_image(disk, 2, seed=52)
    kept = wd.create(disk)
    assert wd.run("delete", gone["id"]).returncode == 0
    assert shorten(s3server, wd, 3600) > 0       # within days/2: due for extension
    stats = wd.run_json("gc")
    assert stats["packs_deleted"] >= 1
    assert stats["locks_extended"] > 0
    # The deleted backup's objects are held (hidden by delete markers), not extended.
    assert stats["locked_objects_held"] >= 2 and stats["locked_bytes_held"] > 0
    horizon = datetime.now(UTC) + timedelta(days=2) - timedelta(minutes=5)
    soon = datetime.now(UTC) + timedelta(hours=2)
    for name, (current, until) in retention(s3server, wd).items():
        if name.startswith(("locks/", "index-changes")):
            continue
        if current:
            assert until is not None and until > horizon, name
        else:
            assert until is not None and until < soon, name
    assert datetime.fromisoformat(stats["locked_until"]) < soon
    wd.assert_restores(kept["id"], kept_image)
    # Nothing left to extend: a second gc asks for no extension.
    again = wd.run_json("gc")
    assert again["locks_extended"] == 0
    assert again["locked_objects_held"] == stats["locked_objects_held"]


def test_gc_releases_past_versions_once_their_lock_ends(gov, tmp_path, s3server):
    wd = gov
    wd.init()
    disk = tmp_path / "disk.img"
    make_image(disk, 1, seed=61)
    gone = wd.create(disk)
    assert wd.run("delete", gone["id"]).returncode == 0
    shorten(s3server, wd, 2)
    time.sleep(3)
    first = wd.run_json("gc")      # deletes (markers) the packs; their locks have ended
    assert first["locked_objects_held"] == 0
    second = wd.run_json("gc")
    assert second["locked_objects_held"] == 0
    found, markers = versions(s3server, wd)
    left = {name_of(wd, v["Key"]) for v in found + markers}
    assert not any(n.startswith(("packs/", "manifests/")) for n in left), left


def test_delete_prune_gc_never_fail_on_locked_objects(wd, tmp_path):
    wd.init()
    disk = tmp_path / "disk.img"
    make_image(disk, 1, seed=71)
    recs = [wd.create(disk)]
    make_image(disk, 1, seed=72)
    recs.append(wd.create(disk))
    make_image(disk, 1, seed=73)
    recs.append(wd.create(disk))
    assert wd.run("delete", recs[0]["id"]).returncode == 0
    p = wd.run("prune", "--keep-last", "1")
    assert p.returncode == 0, describe(p)
    stats = wd.run_json("gc")
    assert stats["locked_objects_held"] > 0
    held_until = datetime.fromisoformat(stats["locked_until"])
    assert held_until > datetime.now(UTC) + timedelta(days=DAYS - 1)
    p = wd.run("gc")
    assert p.returncode == 0 and "Object Lock still holds" in p.stdout, describe(p)
    assert [r["id"] for r in wd.list() if r["status"] == "available"] == [recs[2]["id"]]


def test_lock_extension_killed_midway_completes_on_the_next_gc(gov, tmp_path, s3server):
    wd = gov
    wd.init()
    make_image(tmp_path / "disk.img", 2, seed=81)
    wd.create(tmp_path / "disk.img")
    n = shorten(s3server, wd, 3600)
    p = wd.run("gc", env={"LVBACKUP_FAULT": "lock-extended:2"})
    assert p.returncode == -9, describe(p)
    stats = wd.run_json("gc")
    # The killed run extended two at least (more of its requests in flight may have
    # reached the server before the kill); this one extends what is left.
    assert stats["locks_extended"] <= n - 2
    horizon = datetime.now(UTC) + timedelta(days=1)
    assert all(until > horizon for name, (current, until) in retention(s3server, wd).items()
               if current and not name.startswith(("locks/", "index-changes")))


# --- the alarm, copy, encryption with append_only ------------------------------------------------

def test_verify_reports_objects_overwritten_behind_its_back(wd, tmp_path, s3server):
    wd.init()
    make_image(tmp_path / "disk.img", 1, seed=91)
    rec = wd.create(tmp_path / "disk.img")
    p = wd.run("--json", "verify")
    assert p.returncode == 0, describe(p)
    before = a_second_boundary()
    bucket, prefix = prefix_of(wd)
    client = s3server.client()
    key = f"{prefix}manifests/{rec['id']}"
    client.put_object(Bucket=bucket, Key=key, Body=b"not a manifest")
    at = client.head_object(Bucket=bucket, Key=key)["LastModified"]
    p = wd.run("--json", "verify")
    assert p.returncode == 3, describe(p)
    report = __import__("json").loads(p.stdout)
    assert report["ok"] is False
    assert report["overwritten"] == [{"object": f"manifests/{rec['id']}",
                                      "overwritten_at": at.astimezone(UTC).isoformat(
                                          timespec="microseconds")}]
    p = wd.run("verify")
    assert f"manifests/{rec['id']} was overwritten at" in p.stdout, describe(p)
    assert "overwritten" in p.stderr
    # As of before the overwrite, nothing had been: the view verifies clean.
    host = fresh_host(wd, tmp_path / "new-host")
    assert host.run("--as-of", before, "catalog", "rebuild").returncode == 0
    p = host.run("--as-of", before, "verify", "--deep")
    assert p.returncode == 0, describe(p)


def test_copy_into_a_locked_repository_locks_what_it_writes(tmp_path, s3server, s3_bucket,
                                                             locked_bucket):
    source = Workdir(tmp_path / "src", repository=f"s3://{s3_bucket}/src-{uuid.uuid4().hex[:8]}",
                     s3=s3_section(s3server))
    source.init()
    image = make_image(tmp_path / "disk.img", 1, seed=101)
    rec = source.create(tmp_path / "disk.img")
    target = locked_workdir(tmp_path / "dst", s3server, locked_bucket)
    target.init()
    p = source.run("copy", rec["id"], "--to-config", target.config)
    assert p.returncode == 0, describe(p)
    bucket, _ = prefix_of(target)
    client = s3server.client()
    found = [v for v in versions(s3server, target)[0]
             if name_of(target, v["Key"]).startswith(("packs/", "manifests/", "index/"))]
    assert {name_of(target, v["Key"]).split("/")[0] for v in found} == {
        "packs", "manifests", "index"}
    for v in found:
        head = client.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
        assert head.get("ObjectLockMode") == "COMPLIANCE", v["Key"]
    target.assert_restores(rec["id"], image)


def test_encrypted_append_only_locked_host(tmp_path, s3server, locked_bucket):
    wd = locked_workdir(tmp_path / "wd", s3server, locked_bucket, append_only=True)
    env = {"LVBACKUP_PASSPHRASE": "correct horse battery staple 42"}
    p = wd.run("--json", "init", "--encryption", env=env)
    assert p.returncode == 0, describe(p)
    disk = tmp_path / "disk.img"
    image = make_image(disk, 1, seed=111)
    p = wd.run("--json", "create", "--device", disk, env=env)
    assert p.returncode == 0, describe(p)
    rid = __import__("json").loads(p.stdout)["id"]
    assert_one_line_error(wd.run("delete", rid, env=env), 2, "append_only")
    assert_one_line_error(wd.run("gc", env=env), 2, "append_only")
    bucket, _ = prefix_of(wd)
    client = s3server.client()
    names = set()
    for v in versions(s3server, wd)[0]:
        name = name_of(wd, v["Key"])
        names.add(name.split("/")[0])
        if not (name.startswith("locks/") or name == "index-changes"):
            head = client.head_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
            assert head.get("ObjectLockMode") == "COMPLIANCE", name
    assert "keys" in names or any(n.startswith("key") for n in names), names
    p = wd.run("restore", rid, "--to-file", "-", binary=True, env=env)
    assert p.returncode == 0 and p.stdout == image, describe(p)


def test_run_extends_the_locks(gov, tmp_path, s3server):
    wd = gov
    disk = tmp_path / "disk.img"
    make_image(disk, 1, seed=121)
    config = wd.config_with("jobs.yaml", **wd.extra, jobs={"disk": {"device": str(disk)}})
    wd.init()
    wd.create(disk)
    n = shorten(s3server, wd, 3600)
    p = wd.run("run", config=config)
    assert p.returncode == 0, describe(p)
    horizon = datetime.now(UTC) + timedelta(days=1)
    current = [(name, until) for name, (latest, until) in retention(s3server, wd).items()
               if latest and not name.startswith(("locks/", "index-changes"))]
    assert len(current) >= n
    assert all(until > horizon for _, until in current), current


def test_a_map_as_of_serves_the_backup_as_it_stood_then(wd, tmp_path, s3server, monkeypatch):
    """`map` under --as-of (after an attack): its nbdkit server reads every object as of the
    same time. operations/nbd.map_backup() runs whole but for the kernel's part, which this
    host has not (tests/lvm/test_map.py attaches for real); the served image is read
    through the server's socket."""
    import os
    import signal

    from nbdclient import NbdClient

    from lvbackup.config import load_config, pinned
    from lvbackup.nbd import devices
    from lvbackup.nbd import registry as reg
    from lvbackup.operations import nbd
    from lvbackup.session import Session

    wd.init()
    disk = tmp_path / "disk.img"
    image = make_image(disk, 2, seed=31)
    rec = wd.create(disk)
    before = a_second_boundary()
    attack(s3server, wd)
    host = fresh_host(wd, tmp_path / "new-host")
    assert host.run("--as-of", before, "catalog", "rebuild").returncode == 0
    when = datetime.strptime(before, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    monkeypatch.setattr(devices, "load_module", lambda: None)
    monkeypatch.setattr(devices, "free_devices", lambda: ["/dev/nbd99"])
    monkeypatch.setattr(devices, "attach", lambda *args, **kwargs: None)
    session = Session(pinned(load_config(str(host.config)), when))
    pids = []
    try:
        nbd.map_backup(session, rec["id"])
        (record,) = reg.records(session.lock_dir)
        pids.append(record["pid"])
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")
        assert f"as_of={when!r}".encode() in cmdline
        client = NbdClient(str(Path(record["run_dir"]) / "socket"))
        try:
            assert client.pread(0, len(image)) == (0, image)
        finally:
            client.close()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        session.close()
