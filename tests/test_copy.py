"""`lvbackup copy`: backups into another configuration's repository and catalog, local or
S3 (the real SeaweedFS server of tests/s3server.py), as the nightly off-site job runs it."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from support import (
    MiB,
    Workdir,
    apply_change,
    assert_one_line_error,
    describe,
    make_image,
    s3_section,
)

KEPT = ("id", "parent_id", "is_incremental", "created_at", "data_timestamp", "labels",
        "name", "volume_id", "volume_name", "size", "block_size")


@pytest.fixture
def offsite(tmp_path, s3server, s3_bucket) -> Workdir:
    return Workdir(tmp_path / "offsite", repository=f"s3://{s3_bucket}/copy-{uuid.uuid4().hex[:8]}",
                   s3=s3_section(s3server), gc_grace_period=0)


@pytest.fixture
def chain(tmp_path):
    """A local repository with a full backup and two incrementals of one image."""
    wd = Workdir(tmp_path / "home")
    wd.init("64K")
    image = tmp_path / "disk.img"
    versions = [make_image(image, 8, seed=31)]
    recs = [wd.create(image, "--name", "full", "--label", "tier=gold")]
    for seed in (32, 33):
        versions.append(apply_change(image, seed=seed))
        recs.append(wd.create(image, "--incremental", "--label", "tier=gold"))
    return wd, image, recs, versions


def test_copy_everything_to_s3_keeps_ids_lineage_and_labels_and_reruns_copy_nothing(
        chain, offsite):
    wd, image, recs, versions = chain
    report = wd.run_json("copy", "--all", "--to-config", offsite.config)
    assert report["copied"] == [r["id"] for r in recs] and report["already_present"] == []
    assert report["chunks_sent"] > 0 and report["bytes_sent"] > 0
    theirs = {b["id"]: b for b in offsite.list()}
    for rec, data in zip(recs, versions, strict=True):
        mine = wd.show(rec["id"])
        assert {k: theirs[rec["id"]][k] for k in KEPT} == {k: mine[k] for k in KEPT}
        offsite.assert_restores(rec["id"], data)
    # Nothing new: nothing sent, and said so.
    p = wd.run("copy", "--all", "--to-config", offsite.config)
    assert p.returncode == 0, describe(p)
    assert "Nothing new to copy: 3 backups already in s3://" in p.stdout
    again = wd.run_json("copy", "--all", "--to-config", offsite.config)
    assert again["copied"] == [] and again["chunks_sent"] == 0

    # A new incremental: only its new chunks travel.
    apply_change(image, seed=34)
    new = wd.create(image, "--incremental")
    more = wd.run_json("copy", "--volume", str(image), "--to-config", offsite.config)
    assert more["copied"] == [new["id"]]
    assert 0 < more["bytes_sent"] < report["bytes_sent"] / 5
    offsite.assert_restores(new["id"], image.read_bytes())
    assert offsite.show(new["id"])["parent_id"] == recs[-1]["id"]


def test_copying_an_incremental_brings_its_parents_first(chain, tmp_path):
    wd, _, recs, versions = chain
    target = Workdir(tmp_path / "target")
    report = wd.run_json("copy", recs[2]["id"][:8], "--to-config", target.config)
    assert report["copied"] == [r["id"] for r in recs]
    assert [b["id"] for b in target.list()] == [r["id"] for r in recs]
    assert [b["parent_id"] for b in target.list()] == [None, recs[0]["id"], recs[1]["id"]]
    assert target.show(recs[0]["id"])["num_dependent_backups"] == 1
    target.assert_restores(recs[2]["id"], versions[2])


def test_an_interrupted_copy_from_s3_resumes(tmp_path, s3server, s3_bucket):
    home = Workdir(tmp_path / "home", repository=f"s3://{s3_bucket}/src-{uuid.uuid4().hex[:8]}",
                   s3=s3_section(s3server), gc_grace_period=0)
    home.init("64K")
    image = tmp_path / "big.img"
    data = random.Random(40).randbytes(40 * MiB)
    image.write_bytes(data)
    rec = home.create(image)
    target = Workdir(tmp_path / "target")
    p = home.run("copy", "--all", "--to-config", target.config,
                 env={"LVBACKUP_FAULT": "pack-pending:2"})
    assert p.returncode == -9, describe(p)
    assert target.list() == []          # the catalog row comes last
    stored = target.pack_bytes()
    assert stored > 16 * MiB            # two packs made it
    report = home.run_json("copy", "--all", "--to-config", target.config)
    assert report["copied"] == [rec["id"]]
    assert report["bytes_sent"] < len(data) - stored + 4 * MiB, "the packs already sent count"
    target.assert_restores(rec["id"], data)


def test_copy_refuses_bad_requests_in_one_line(chain, tmp_path):
    wd, _, recs, _ = chain
    target = Workdir(tmp_path / "target")
    assert_one_line_error(wd.run("copy", "--to-config", target.config), 2, "--all")
    assert_one_line_error(wd.run("copy", "--all", "--to-config", wd.config), 2,
                          "own repository")
    target.init("128K")
    assert_one_line_error(wd.run("copy", "--all", "--to-config", target.config), 2,
                          "block size")
    assert_one_line_error(wd.run("copy", "nope", "--to-config", target.config), 2, "nope")


def test_a_job_copies_each_new_backup_offsite_and_the_metrics_say_so(tmp_path, offsite):
    image = tmp_path / "vm.img"
    make_image(image, 4, seed=50)
    prom = tmp_path / "metrics" / "lvbackup.prom"
    wd = Workdir(tmp_path / "home", metrics=str(prom), jobs={"nightly": {
        "device": str(image), "incremental": True, "copy_to": str(offsite.config)}})
    wd.init("64K")
    first = wd.run_json("run")
    (job,) = first["jobs"]
    assert job["status"] == "ok" and job["copied"] == [job["backup"]["id"]]
    apply_change(image, seed=51)
    (job2,) = wd.run_json("run")["jobs"]
    assert job2["copied"] == [job2["backup"]["id"]]
    assert offsite.show(job2["backup"]["id"])["parent_id"] == job["backup"]["id"]
    offsite.assert_restores(job2["backup"]["id"], image.read_bytes())
    text = prom.read_text()
    volume = str(image.resolve())
    assert f'lvbackup_last_copy_status{{volume="{volume}"}} 1' in text
    assert f'lvbackup_last_copy_success_timestamp_seconds{{volume="{volume}"}}' in text

    # The off-site store unreachable: the backup stands, the job says the copy failed.
    broken = Workdir(tmp_path / "broken", repository="s3://lvb-missing-bucket/x",
                     s3=offsite.place["s3"])
    wd2 = Workdir(tmp_path / "home2", metrics=str(prom), jobs={"nightly": {
        "device": str(image), "copy_to": str(broken.config)}})
    wd2.init("64K")
    p = wd2.run("--json", "run")
    assert p.returncode == 2, describe(p)
    (failed,) = json.loads(p.stdout)["jobs"]
    assert failed["backup"]["status"] == "available"
    assert "the backup succeeded, but the copy to" in failed["error"]
    assert f'lvbackup_last_copy_status{{volume="{volume}"}} 0' in prom.read_text()
