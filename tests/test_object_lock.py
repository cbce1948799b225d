"""S3 Object Lock (`s3.object_lock`) and `--as-of`, against a real SeaweedFS server
(tests/s3server.py): the configuration's bad input, init refusing a bucket without Object
Lock, every object holding a backup written locked and leases not, locks extended and
expired versions released by gc, the overwrite alarm of verify, and the recovery of a
repository an attacker holding the host's credentials overwrote and deleted.
"""

from __future__ import annotations

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
