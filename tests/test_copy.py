"""`lvbackup copy`: backups into another configuration's repository and catalog, local or
S3 (the real SeaweedFS server of tests/s3server.py), as the nightly off-site job runs it."""

from __future__ import annotations

import json
import random
import shutil
import uuid

import pytest

from lvbackup.config import load_config
from lvbackup.credentials import passphrase_from_file
from lvbackup.operations.copy import copy_backups
from lvbackup.repository.repo import Repository
from lvbackup.session import Session

from support import (
    MiB,
    Workdir,
    apply_change,
    assert_one_line_error,
    describe,
    make_image,
    s3_section,
    write_secret,
)

# Every test here runs two repositories, most of them encrypted (a key derivation per run)
# or in object storage: tens of seconds each.
pytestmark = pytest.mark.slow

KEPT = ("id", "parent_id", "is_incremental", "created_at", "data_timestamp", "labels",
        "name", "volume_id", "volume_name", "size", "block_size")


@pytest.fixture
def offsite(tmp_path, s3server, s3_bucket) -> Workdir:
    return Workdir(tmp_path / "offsite", repository=f"s3://{s3_bucket}/copy-{uuid.uuid4().hex[:8]}",
                   s3=s3_section(s3server), gc_grace_period=0)


@pytest.fixture
def chain(tmp_path):
    """A local repository with a full backup and two incrementals of one image."""
    return home_chain(tmp_path, "plain")


def copy_all_keeping_records(home: Workdir, target: Workdir, recs: list[dict]) -> dict:
    """`copy --all` sends every backup, and the target's catalog keeps their records;
    its report (`--init`: the target may not exist yet)."""
    report = home.run_json("copy", "--all", "--to-config", target.config, "--init")
    assert report["copied"] == [r["id"] for r in recs] and report["already_present"] == []
    assert report["chunks_sent"] > 0 and report["bytes_sent"] > 0
    theirs = {b["id"]: b for b in target.list()}
    for rec in recs:
        mine = home.show(rec["id"])
        assert {k: theirs[rec["id"]][k] for k in KEPT} == {k: mine[k] for k in KEPT}
    return report


def test_copy_everything_to_s3_keeps_ids_lineage_and_labels_and_reruns_copy_nothing(
        chain, offsite):
    wd, image, recs, versions = chain
    report = copy_all_keeping_records(wd, offsite, recs)
    for rec, data in zip(recs, versions, strict=True):
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
    report = wd.run_json("copy", recs[2]["id"][:8], "--to-config", target.config, "--init")
    assert report["copied"] == [r["id"] for r in recs]
    assert [b["id"] for b in target.list()] == [r["id"] for r in recs]
    assert [b["parent_id"] for b in target.list()] == [None, recs[0]["id"], recs[1]["id"]]
    assert target.show(recs[0]["id"])["num_dependent_backups"] == 1
    target.assert_restores(recs[2]["id"], versions[2])


def kill_and_resume(home: Workdir, target: Workdir, rec: dict, data: bytes) -> None:
    """A copy of `rec` killed once two packs are stored leaves no catalog row in the
    target; the rerun copies it, without sending again what was sent."""
    p = home.run("copy", "--all", "--to-config", target.config, "--init",
                 env={"LVBACKUP_FAULT": "pack-pending:2"})
    assert p.returncode == -9, describe(p)
    assert target.list() == []          # the catalog row comes last
    stored = target.pack_bytes()
    assert stored > 16 * MiB            # two packs made it
    report = home.run_json("copy", "--all", "--to-config", target.config)
    assert report["copied"] == [rec["id"]]
    assert report["bytes_sent"] < len(data) - stored + 4 * MiB, "the packs already sent count"


def test_an_interrupted_copy_from_s3_resumes(tmp_path, s3server, s3_bucket):
    home = Workdir(tmp_path / "home", repository=f"s3://{s3_bucket}/src-{uuid.uuid4().hex[:8]}",
                   s3=s3_section(s3server), gc_grace_period=0)
    home.init("64K")
    image = tmp_path / "big.img"
    data = random.Random(40).randbytes(40 * MiB)
    image.write_bytes(data)
    rec = home.create(image)
    target = Workdir(tmp_path / "target")
    kill_and_resume(home, target, rec, data)
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
    offsite.init("64K")
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


def test_copy_into_a_repository_that_does_not_exist_is_refused_without_init(chain, tmp_path):
    """A typo or an unmounted disk in the target's config would put the off-site copy on
    the local disk: refused (exit 2), nothing made, unless --init; a job's copy_to too."""
    wd, image, recs, versions = chain
    target = Workdir(tmp_path / "offsite")
    assert_one_line_error(wd.run("copy", "--all", "--to-config", target.config), 2,
                          str(target.repo), "copy --init")
    jobs = wd.config_with("jobs.yaml", jobs={"nightly": {
        "device": str(image), "incremental": True, "copy_to": str(target.config)}})
    p = wd.run("--json", "run", config=jobs)
    assert p.returncode == 2, describe(p)
    (job,) = json.loads(p.stdout)["jobs"]
    assert job["backup"]["status"] == "available" and "copy --init" in job["error"]
    assert not target.repo.exists() and not target.catalog.exists()
    assert not target.cache.exists()

    report = wd.run_json("copy", "--all", "--to-config", target.config, "--init")
    assert report["copied"] == [r["id"] for r in recs] + [job["backup"]["id"]]
    target.assert_restores(recs[2]["id"], versions[2])


# --- copies between repositories with other keys ------------------------------------------

PASSPHRASES = {"home": "home passphrase", "offsite": "offsite passphrase"}


def repository(kind: str, path, name: str, **place) -> Workdir:
    """An initialized repository: unencrypted, or encrypted under `name`'s passphrase,
    which its config file reads from a passphrase file."""
    if kind == "plain":
        wd = Workdir(path, **place)
        wd.init("64K")
        return wd
    path.mkdir(parents=True, exist_ok=True)
    write_secret(path / "passphrase", PASSPHRASES[name])
    wd = Workdir(path, passphrase_file=str(path / "passphrase"), **place)
    assert wd.run_json("init", "--block-size", "64K", "--encryption")["encrypted"] is True
    return wd


def entries_of(wd: Workdir, backup_id: str) -> list[bytes]:
    """A backup's manifest entries, read with the library from a local repository."""
    secrets = ([passphrase_from_file(wd.path / "passphrase")]
               if (wd.path / "passphrase").exists() else [])
    repo = Repository.open(wd.repo, wd.path / "probe-cache", lambda: secrets)
    try:
        repo.sync_index(wd.path / "probe-cache" / "locks")
        manifest = repo.manifest(backup_id)
        try:
            return [e.entry(i) for e in manifest.entries(256) for i in range(len(e))]
        finally:
            manifest.close()
    finally:
        repo.close()


def home_chain(tmp_path, kind: str, **place) -> tuple[Workdir, object, list[dict], list[bytes]]:
    """A repository of `kind` with a full backup and two incrementals of one image."""
    wd = repository(kind, tmp_path / "home", "home", **place)
    image = tmp_path / "disk.img"
    versions = [make_image(image, 8, seed=61)]
    recs = [wd.create(image, "--name", "full", "--label", "tier=gold")]
    for seed in (62, 63):
        versions.append(apply_change(image, seed=seed))
        recs.append(wd.create(image, "--incremental", "--label", "tier=gold"))
    return wd, image, recs, versions


@pytest.mark.parametrize(("source_kind", "target_kind", "where"), [
    ("plain", "encrypted", "local"),
    ("encrypted", "plain", "local"),
    ("encrypted", "encrypted", "local"),
    ("plain", "encrypted", "s3"),
    ("encrypted", "encrypted", "s3"),
])
def test_copy_between_repositories_that_name_chunks_differently(
        source_kind, target_kind, where, tmp_path, request):
    """Other keys, or one side encrypted: every block is renamed by the target's codec and
    the manifests written anew; restores are bit-exact, verify --deep passes, a rerun
    copies nothing, and an incremental sends only its new chunks."""
    place = {}
    if where == "s3":
        server, bucket = request.getfixturevalue("s3server"), request.getfixturevalue("s3_bucket")
        place = {"repository": f"s3://{bucket}/enc-{uuid.uuid4().hex[:8]}",
                 "s3": s3_section(server), "gc_grace_period": 0}
    wd, image, recs, versions = home_chain(tmp_path, source_kind)
    target = repository(target_kind, tmp_path / "offsite", "offsite", **place)
    report = copy_all_keeping_records(wd, target, recs)
    for rec, data in zip(recs, versions, strict=True):
        target.assert_restores(rec["id"], data)
    assert [b["parent_id"] for b in target.list()] == [None, recs[0]["id"], recs[1]["id"]]
    if where == "local":
        # Same blocks, same digests, other names: the manifests were rewritten.
        here, there = entries_of(wd, recs[2]["id"]), entries_of(target, recs[2]["id"])
        assert len(here) == len(there) == 128
        assert [e[:16] for e in here] == [e[:16] for e in there]
        assert sum(a == b for a, b in zip(here, there, strict=True)) == here.count(bytes(48))
        if target_kind == "encrypted":
            stored = b"".join(p.read_bytes() for p in sorted(target.repo.rglob("*"))
                              if p.is_file())
            for off in (0, 100_000, 3 * MiB + 12345):   # random stretches: stored raw if plain
                assert versions[0][off:off + 64] not in stored

    p = wd.run("copy", "--all", "--to-config", target.config)
    assert p.returncode == 0, describe(p)
    assert "Nothing new to copy: 3 backups already in" in p.stdout
    assert wd.run_json("copy", "--all", "--to-config", target.config)["chunks_sent"] == 0

    apply_change(image, seed=64)
    new = wd.create(image, "--incremental")
    more = wd.run_json("copy", "--volume", str(image), "--to-config", target.config)
    assert more["copied"] == [new["id"]]
    assert 0 < more["bytes_sent"] < report["bytes_sent"] / 5
    target.assert_restores(new["id"], image.read_bytes())


def test_copy_between_repositories_under_one_master_key_keeps_every_id(tmp_path):
    """Two repositories under one master key (one a file copy of the other, made before
    any backup): chunks keep their ids and the manifests are copied, not rewritten."""
    wd = repository("encrypted", tmp_path / "home", "home")
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copytree(wd.repo, twin / "repo")
    write_secret(twin / "passphrase", PASSPHRASES["home"])
    target = Workdir(twin, passphrase_file=str(twin / "passphrase"))
    image = tmp_path / "disk.img"
    full = make_image(image, 6, seed=71)
    recs = [wd.create(image)]
    incremental = apply_change(image, seed=72)
    recs.append(wd.create(image, "--incremental"))
    report = wd.run_json("copy", "--all", "--to-config", target.config)
    assert report["copied"] == [r["id"] for r in recs] and report["chunks_sent"] > 0
    for rec, data in zip(recs, (full, incremental), strict=True):
        assert entries_of(target, rec["id"]) == entries_of(wd, rec["id"])
        target.assert_restores(rec["id"], data)
    assert wd.run_json("copy", "--all", "--to-config", target.config)["chunks_sent"] == 0


def tree(path) -> dict[str, tuple[int, int]]:
    """Every file under `path`: (size, mtime): to show nothing was written."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_each_side_takes_its_own_secret_and_a_wrong_or_missing_one_writes_nothing(tmp_path):
    wd, _, recs, versions = home_chain(tmp_path, "encrypted")
    # The target's config names no secret: $LVBACKUP_TARGET_PASSPHRASE gives it.
    target = Workdir(tmp_path / "offsite")
    p = target.run("init", "--block-size", "64K", "--encryption",
                   env={"LVBACKUP_PASSPHRASE": PASSPHRASES["offsite"]})
    assert p.returncode == 0, describe(p)
    before = tree(target.path)
    no_key = wd.config_with("no-key.yaml")
    for env, config, fragments in [
        ({}, wd.config, ("copy target", "is encrypted", "LVBACKUP_TARGET_PASSPHRASE")),
        ({"LVBACKUP_TARGET_PASSPHRASE": "not it"}, wd.config,
         ("wrong passphrase", "$LVBACKUP_TARGET_PASSPHRASE")),
        # $LVBACKUP_PASSPHRASE is the source's, never the target's.
        ({"LVBACKUP_PASSPHRASE": PASSPHRASES["offsite"]}, wd.config,
         ("wrong passphrase", str(wd.repo), "$LVBACKUP_PASSPHRASE")),
        ({"LVBACKUP_TARGET_PASSPHRASE": PASSPHRASES["offsite"]}, no_key,
         ("is encrypted", str(wd.repo))),
    ]:
        p = wd.run("copy", "--all", "--to-config", target.config, config=config, env=env)
        assert_one_line_error(p, 2, *fragments)
        assert PASSPHRASES["offsite"] not in p.stderr and PASSPHRASES["home"] not in p.stderr
        assert tree(target.path) == before, env
    env = {"LVBACKUP_TARGET_PASSPHRASE": PASSPHRASES["offsite"]}
    report = wd.run_json("copy", "--all", "--to-config", target.config, env=env)
    assert report["copied"] == [r["id"] for r in recs]
    target.assert_intact({recs[2]["id"]: versions[2]}, recs[2]["id"],
                         env={"LVBACKUP_PASSPHRASE": PASSPHRASES["offsite"]})

    # The source's passphrase from the environment, the target's from its own file.
    write_secret(target.path / "passphrase", PASSPHRASES["offsite"])
    keyed = target.config_with("keyed.yaml", passphrase_file=str(target.path / "passphrase"))
    again = wd.run_json("copy", "--all", "--to-config", keyed, config=no_key,
                        env={"LVBACKUP_PASSPHRASE": PASSPHRASES["home"]})
    assert again["already_present"] == [r["id"] for r in recs]


def test_an_interrupted_copy_into_an_encrypted_repository_resumes(tmp_path):
    wd = repository("plain", tmp_path / "home", "home")
    image = tmp_path / "big.img"
    data = random.Random(80).randbytes(40 * MiB)
    image.write_bytes(data)
    rec = wd.create(image)
    target = repository("encrypted", tmp_path / "offsite", "offsite")
    kill_and_resume(wd, target, rec, data)
    target.assert_restores(rec["id"], data)

    # Killed after the manifest is stored, before the row: the rerun only adds the row.
    changed = apply_change(image, seed=81)
    new = wd.create(image, "--incremental")
    p = wd.run("copy", "--all", "--to-config", target.config,
               env={"LVBACKUP_FAULT": "copy-manifest-written"})
    assert p.returncode == -9, describe(p)
    assert [b["id"] for b in target.list()] == [rec["id"]]
    assert f"manifests/{new['id']}" in target.files("manifests")
    packs = target.pack_bytes()
    report = wd.run_json("copy", "--all", "--to-config", target.config)
    assert report["copied"] == [new["id"]] and report["chunks_sent"] == 0
    assert target.pack_bytes() == packs
    assert target.show(new["id"])["parent_id"] == rec["id"]
    target.assert_restores(new["id"], changed)


def test_a_job_copies_into_an_encrypted_target(tmp_path):
    target = repository("encrypted", tmp_path / "offsite", "offsite")
    image = tmp_path / "vm.img"
    make_image(image, 4, seed=90)
    home = tmp_path / "home"
    home.mkdir()
    write_secret(home / "passphrase", PASSPHRASES["home"])
    wd = Workdir(home, passphrase_file=str(home / "passphrase"), jobs={"nightly": {
        "device": str(image), "incremental": True, "copy_to": str(target.config)}})
    assert wd.run_json("init", "--block-size", "64K", "--encryption")["encrypted"]
    (first,) = wd.run_json("run")["jobs"]
    assert first["status"] == "ok" and first["copied"] == [first["backup"]["id"]]
    changed = apply_change(image, seed=91)
    (second,) = wd.run_json("run")["jobs"]
    assert second["copied"] == [second["backup"]["id"]]
    assert target.show(second["backup"]["id"])["parent_id"] == first["backup"]["id"]
    target.assert_restores(second["backup"]["id"], changed)


def test_a_renamed_incremental_reads_only_its_changed_blocks(tmp_path, monkeypatch):
    """Its parent already copied, an incremental takes the names of its unchanged blocks
    from the parent's manifests here and there: only changed blocks are read and named."""
    wd, image, recs, versions = home_chain(tmp_path, "encrypted")
    target = repository("encrypted", tmp_path / "offsite", "offsite")
    wd.run_json("copy", recs[0]["id"], "--to-config", target.config)
    read: list[bytes] = []
    real = Repository.read_pages

    def counting(repo, ids):
        if repo.storage.root == wd.repo:    # the source's reads only
            read.extend(ids)
        return real(repo, ids)

    monkeypatch.setattr(Repository, "read_pages", counting)
    monkeypatch.delenv("LVBACKUP_PASSPHRASE", raising=False)
    session = Session(load_config(wd.config))
    try:
        report = copy_backups(session, target.config, [recs[1]["id"]], False, None)
    finally:
        session.close()
    assert report.copied == [recs[1]["id"]]
    mine, parents = entries_of(wd, recs[1]["id"]), entries_of(wd, recs[0]["id"])
    changed = sum(a != b for a, b in zip(mine, parents, strict=True))
    blocks = {e[16:] for e in mine if e != bytes(48)}
    assert 0 < len([cid for cid in read if cid in blocks]) <= changed < len(blocks) // 4
    target.assert_restores(recs[1]["id"], versions[1])
