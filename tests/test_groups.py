"""Consistency groups on the host (no device-mapper here: tests/lvm/test_groups_lvm.py has
the real instant): the catalog's group queries and parent candidates, retention keeping a
group whole, the configuration's group jobs and quiesce commands, the freeze watchdog's
failure and leftover paths, and the group commands on backups made members by hand."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from lvbackup import config as cfg
from lvbackup.base.errors import LvbackupError, NotFoundError
from lvbackup.base.lifecycle import Status
from lvbackup.catalog.catalog import Catalog
from lvbackup.catalog.retention import Policy, select
from lvbackup.volumes.freeze import FREEZE_RECORD_GLOB, frozen, thaw_leftovers
from lvbackup.volumes.quiesce import Quiesce, quiesced

from support import Workdir, assert_one_line_error, describe, make_image

T0 = "2026-01-01T00:00:00.000000+00:00"


def rec(bid: str, volume: str, day: int, group: str | None = None, name: str | None = None,
        **kw) -> dict:
    ts = f"2026-01-{day:02d}T00:00:00.000000+00:00"
    return {"id": bid, "volume_id": volume, "volume_name": f"vg/{volume}", "status": "available",
            "data_timestamp": ts, "created_at": ts, "updated_at": ts, "labels": {},
            "is_incremental": False, "group_id": group, "group_name": name, **kw}


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path / "catalog.db")
    rows = [rec("a1", "db", 1, "g1", "pair"), rec("b1", "wal", 1, "g1", "pair"),
            rec("a2", "db", 2), rec("a3", "db", 3, "g3", "other"),
            rec("a4", "db", 4, "g4", "pair"), rec("b4", "wal", 4, "g4", "pair")]
    for r in rows:
        cat.insert(r, Status.AVAILABLE)
    yield cat
    cat.close()


def test_group_by_name_id_or_prefix(catalog):
    assert [r["id"] for r in catalog.group("pair")] == ["a1", "b1", "a4", "b4"]
    assert [r["id"] for r in catalog.group("g4")] == ["a4", "b4"]
    assert catalog.group("nothing") == []
    with pytest.raises(NotFoundError, match="ambiguous"):
        catalog.group("g")


def test_parent_candidates_are_the_groups_own(catalog):
    assert {r["id"] for r in catalog.candidates("db", "pair")} == {"a1", "a4"}
    assert {r["id"] for r in catalog.candidates("db")} == {"a1", "a2", "a3", "a4"}


def test_retention_keeps_a_group_whole():
    rows = [rec("a1", "db", 1, "g1"), rec("b1", "wal", 2, "g1"),
            rec("b0", "wal", 3), rec("a0", "db", 0)]
    # last 1 per volume keeps b0 (wal) and a1 (db); a1 keeps b1, its group's other member.
    plan = select(rows, Policy(last=1))
    assert set(plan.keep) == {"a1", "b1", "b0"} and plan.remove == ["a0"]
    assert plan.keep["b1"] == ["group g1"]


def test_config_group_job_and_quiesce(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pre_snapshot: [/bin/true]\nfreeze_timeout: 3\njobs:\n"
                    "  db: {volumes: [vg0/db, /dev/vg0/wal], force: true,"
                    " post_snapshot: [echo, done]}\n")
    c = cfg.load_config(path)
    job = c.jobs["db"]
    assert job.volumes == ("vg0/db", "vg0/wal") and job.post_snapshot == ("echo", "done")
    assert c.pre_snapshot == ("/bin/true",) and c.freeze_timeout == 3.0
    for bad, key in (("freeze_timeout: 0\n", "freeze_timeout"),
                     ("jobs: {x: {volumes: [vg0/a, vg0/a]}}\n", "twice"),
                     ("jobs: {x: {volumes: [vg0/a], volume: vg0/b}}\n", "exactly one"),
                     ("pre_snapshot: []\n", "pre_snapshot")):
        path.write_text(bad)
        with pytest.raises(cfg.ConfigError, match=key):
            cfg.load_config(path)


def test_failing_pre_snapshot_skips_the_block_and_still_runs_post(tmp_path):
    log = tmp_path / "log"
    ran = []
    commands = Quiesce(pre=["sh", "-c", f"echo pre >> {log}; echo nope >&2; exit 3"],
                       post=["sh", "-c", f"echo post >> {log}"])
    refused = pytest.raises(LvbackupError, match="pre_snapshot command sh failed: exit "
                                                 r"status 3 \(nope\); no snapshot was taken")
    with refused, quiesced(commands):
        ran.append(1)
    assert ran == [] and log.read_text().split() == ["pre", "post"]


def test_failing_post_snapshot_is_a_warning(tmp_path):
    warned = []
    with quiesced(Quiesce(pre=["true"], post=["false"], warn=warned.append)):
        pass
    assert len(warned) == 1 and "post_snapshot command false failed" in warned[0]


def test_a_freeze_that_cannot_start_fails_and_leaves_no_record(tmp_path):
    refused = pytest.raises(LvbackupError, match="cannot freeze .*/gone")
    with refused, frozen([str(tmp_path / "gone")], [], [], 5, tmp_path, "run1"):
        pytest.fail("the block ran without a freeze")
    assert list(tmp_path.glob(FREEZE_RECORD_GLOB)) == []


def test_leftover_record_of_a_dead_watchdog_is_settled(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = tmp_path / FREEZE_RECORD_GLOB.replace("*", "run2")
    record.write_text(json.dumps({"pid": dead.pid, "mounts": [str(tmp_path / "gone")],
                                  "vgs": []}))
    assert thaw_leftovers(tmp_path) == []   # nothing was frozen there: nothing thawed
    assert not record.exists()
    alive = tmp_path / FREEZE_RECORD_GLOB.replace("*", "run3")
    alive.write_text(json.dumps({"pid": 1, "mounts": [], "vgs": []}))
    thaw_leftovers(tmp_path)
    assert alive.exists()   # a live watchdog's freeze is its own


@pytest.fixture
def grouped(tmp_path):
    """Two images backed up twice, each pair made the members of a group backup by hand."""
    imgs = [tmp_path / "a.img", tmp_path / "b.img"]
    for n, img in enumerate(imgs):
        make_image(img, 1, seed=n)
    wd = Workdir(tmp_path / "wd")
    wd.init()
    ids = [[wd.create(img)["id"] for img in imgs] for _ in range(2)]
    con = sqlite3.connect(wd.catalog)
    with con:
        for n, pair in enumerate(ids):
            for bid in pair:
                con.execute("UPDATE backups SET group_id = ?, group_name = 'pair' WHERE id = ?",
                            (f"9999000{n}-0000-4000-8000-000000000000", bid))
    con.close()
    return wd, ids


def test_list_show_and_delete_a_group(grouped):
    wd, ids = grouped
    first, second = "99990000-0000-4000-8000-000000000000", "99990001"
    assert [r["id"] for r in wd.list("--group", "pair")] == ids[0] + ids[1]
    assert [r["id"] for r in wd.list("--group", second)] == ids[1]
    doc = wd.run_json("show", first)
    assert doc["group_id"] == first and doc["name"] == "pair"
    assert [b["id"] for b in doc["backups"]] == ids[0]
    assert all(b["group_id"] == first for b in doc["backups"])

    wd.run_json("protect", ids[1][1])
    p = wd.run("delete", "--group", second)
    assert_one_line_error(p, 2, "protected")
    assert all(r["status"] == "available" for r in wd.list("--group", "pair"))   # none
    wd.run_json("unprotect", ids[1][1])
    deleted = wd.run_json("delete", "--group", second)
    assert [b["status"] for b in deleted["backups"]] == ["deleted", "deleted"]
    assert [r["id"] for r in wd.list("--group", "pair")] == ids[0]


def test_delete_group_refused_when_a_member_has_dependents(grouped, tmp_path):
    wd, ids = grouped
    child = wd.create(tmp_path / "a.img", "--incremental")
    assert child["parent_id"] == ids[1][0]
    p = wd.run("delete", "--group", "99990001")
    assert_one_line_error(p, 2, "dependents")
    assert len(wd.list("--group", "99990001")) == 2


def test_prune_drops_a_group_whole(grouped, tmp_path):
    wd, ids = grouped
    # Keep only the newest backup of a.img: the older group goes, b.img's member with it.
    report = wd.run_json("prune", "--keep-last", "1", "--volume", str(tmp_path / "a.img"))
    assert sorted(report["deleted"]) == sorted(ids[0]), report
    assert [r["id"] for r in wd.list("--group", "pair")] == ids[1]


@pytest.mark.parametrize("args, message", [
    (["create", "--group", "g", "--device", "/dev/null"], "--group takes volumes"),
    (["create", "--volume", "vg/a", "--volume", "vg/b"], "--group NAME"),
    (["create", "--group", "bad name", "--volume", "vg/a"], "invalid group name"),
    (["delete"], "--group ID"),
    (["restore", "--group", "x", "--to", "vg/y"], "does not take --to"),
    (["list", "--group", "nothing"], "group nothing not found"),
])
def test_group_usage_errors(tmp_path, args, message):
    wd = Workdir(tmp_path / "wd")
    wd.init()
    p = wd.run(*args)
    assert p.returncode == 2, describe(p)
    assert_one_line_error(p, 2, message)


def test_group_metrics_name_the_group(tmp_path):
    from lvbackup.metrics import read_samples, record_group
    path = tmp_path / "lvbackup.prom"
    record_group(path, tmp_path, "db", ok=True, ended_at=1000.0)
    record_group(path, tmp_path, "web", ok=False, ended_at=2000.0)
    text = path.read_text()
    assert 'lvbackup_group_last_success_timestamp_seconds{group="db"} 1000' in text
    assert 'lvbackup_group_last_status{group="web"} 0' in text
    assert read_samples(path)["lvbackup_group_last_status"] == {"db": "1", "web": "0"}


def test_a_freeze_past_its_timeout_fails_the_block(tmp_path):
    import time
    refused = pytest.raises(LvbackupError, match=r"outlasted freeze_timeout \(0.5 s\)")
    with refused, frozen([], [], [], 0.5, tmp_path, "run4"):
        time.sleep(1.5)
    assert list(tmp_path.glob(FREEZE_RECORD_GLOB)) == []


KILLED_PARENT = """
import os, signal, sys
from pathlib import Path
from lvbackup.volumes.freeze import frozen
with frozen([], [], [], 60, Path(sys.argv[1]), "run5"):
    print(open(next(Path(sys.argv[1]).glob("freeze-*.json"))).read(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_watchdog_ends_the_freeze_when_lvbackup_is_killed(tmp_path):
    import time
    p = subprocess.run([sys.executable, "-c", KILLED_PARENT, str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    assert json.loads(p.stdout)["pid"] > 0   # the record was there while frozen
    deadline = time.monotonic() + 30
    # The watchdog outlived its parent, saw its pipe end, released and removed its record.
    while list(tmp_path.glob(FREEZE_RECORD_GLOB)):
        assert time.monotonic() < deadline, "the watchdog did not end the freeze"
        time.sleep(0.1)
