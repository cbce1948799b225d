"""Consistency groups with real lvm2 and ext4: `create --group` snapshots every member at one
instant (their filesystems frozen meanwhile), the quiesce commands, `restore --group`, and a
freeze never left behind (lvbackup killed with SIGKILL around the freeze).

One VG for the module: a classic LV and a thin LV (mixed members), both ext4 and mounted,
with a writer that updates a counter on the first and then on the second, with fsync.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lvbackup.volumes.freeze import freeze, thaw

from lvbhelpers import Lvb, MiB, assert_refused, describe, module_vg, ok_json, temp_snapshots

pytestmark = pytest.mark.lvm

SIZE = 64 * MiB

WRITER = """
import os, sys
fds = [os.open(p, os.O_RDWR | os.O_CREAT) for p in sys.argv[1:]]
n = 0
while True:
    n += 1
    for fd in fds:   # the first, then the second: at any instant first - second is 0 or 1
        os.pwrite(fd, b"%020d" % n, 0)
        os.fsync(fd)
"""


def run(*argv) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def is_frozen(mountpoint) -> bool:
    """Whether `mountpoint` is frozen, leaving it as it was (FIFREEZE of a frozen
    filesystem fails with EBUSY)."""
    try:
        freeze(str(mountpoint))
    except OSError as e:
        if e.errno == errno.EBUSY:
            return True
        raise
    thaw(str(mountpoint))
    return False


def _written(path) -> bool:
    try:
        return counter(path) > 0
    except (OSError, ValueError):
        return False


def counter(path) -> int:
    with open(path, "rb") as f:
        return int(f.read(20))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("groups")
    log, flag = tmp / "quiesce.log", tmp / "fail-pre"
    lvb = Lvb(tmp / "lvb", workers=1, event_log=str(tmp / "events.jsonl"),
              pre_snapshot=["sh", "-c", f"test ! -e {flag} && echo pre >> {log}"],
              post_snapshot=["sh", "-c", f"echo post >> {log}"])
    init = lvb.start("init")
    mounts = {}
    with module_vg(tmp) as vg:
        vg.create_lv("db", SIZE)
        vg.create_thin_pool("pool", 2 * SIZE)
        vg.create_thin_lv("wal", SIZE, "pool")
        try:
            for lv in ("db", "wal"):
                run("mkfs.ext4", "-q", "-F", vg.path(lv))
                mounts[lv] = tmp / f"mnt-{lv}"
                mounts[lv].mkdir()
                run("mount", vg.path(lv), mounts[lv])
            out, err = init.communicate(timeout=120)
            assert init.returncode == 0, err
            writer = subprocess.Popen([sys.executable, "-c", WRITER, mounts["db"] / "counter",
                                       mounts["wal"] / "counter"])
            try:
                deadline = time.monotonic() + 60
                while not _written(mounts["wal"] / "counter"):
                    assert time.monotonic() < deadline and writer.poll() is None, "no writer"
                    time.sleep(0.2)
                yield SimpleNamespace(vg=vg, lvb=lvb, tmp=tmp, mounts=mounts, log=log,
                                      flag=flag, group=[f"{vg.name}/db", f"{vg.name}/wal"])
            finally:
                writer.kill()
                writer.wait()
        finally:
            for point in mounts.values():
                thaw(str(point))   # never leave the VM's filesystems frozen
                subprocess.run(["umount", str(point)], capture_output=True)


def group_args(site, name: str) -> list[str]:
    args = ["create", "--group", name, "--force"]
    for volume in site.group:
        args += ["--volume", volume]
    return args


def events(site) -> list[dict]:
    path = site.tmp / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_group_backup_while_writing_restores_a_consistent_pair(site):
    vg, lvb = site.vg, site.lvb
    before = counter(site.mounts["db"] / "counter")
    doc = ok_json(lvb.parallel(("--json", *group_args(site, "pair")))[0])
    assert doc["name"] == "pair" and len(doc["backups"]) == 2, doc
    assert [b["volume_name"] for b in doc["backups"]] == site.group
    assert {b["group_id"] for b in doc["backups"]} == {doc["group_id"]}
    assert all(b["status"] == "available" for b in doc["backups"])
    # The snapshots were taken at one instant, and nothing is left: snapshot, freeze.
    times = {b["data_timestamp"] for b in doc["backups"]}
    assert temp_snapshots(vg) == []
    assert not any(is_frozen(p) for p in site.mounts.values())
    assert site.log.read_text().split() == ["pre", "post"]
    assert counter(site.mounts["db"] / "counter") > before   # the writer went on
    assert len(times) <= 2, times

    restored = ok_json(lvb.parallel(("--json", "restore", "--group", doc["group_id"]))[0])
    assert restored["group_id"] == doc["group_id"]
    made = [r["target"] for r in restored["restored"]]
    assert made == [f"{vg.name}/restore_backup_{b['id']}" for b in doc["backups"]]
    values = []
    for target in made:
        point = site.tmp / f"check-{target.split('/')[1]}"
        point.mkdir()
        run("mount", "-o", "ro,noload", f"/dev/{target}", point)
        try:
            values.append(counter(point / "counter"))
        finally:
            run("umount", point)
        vg.lvm("lvremove", "-q", "-y", target)
    db, wal = values
    assert before <= db and 0 <= db - wal <= 1, values
    ends = [e["payload"] for e in events(site) if e["event"] == "backup.create.end"]
    assert [(e["group_id"], e["group_name"]) for e in ends] == [(doc["group_id"], "pair")] * 2
    site.first = doc


def test_failing_pre_snapshot_takes_no_snapshot_and_freezes_nothing(site):
    site.flag.write_text("")
    site.log.write_text("")
    try:
        # A group, and a single volume through its temporary snapshot, at once.
        p, single = site.lvb.parallel(group_args(site, "failing"),
                                      ("create", "--volume", site.group[0], "--force"))
    finally:
        site.flag.unlink()
    assert_refused(p, "pre_snapshot", code=1)
    assert_refused(single, "pre_snapshot", code=1)
    assert temp_snapshots(site.vg) == []
    assert not any(is_frozen(p) for p in site.mounts.values())
    assert site.log.read_text().split() == ["post", "post"]   # post runs once pre ran
    single_errors = [e["payload"] for e in events(site) if e["event"] == "backup.create.error"
                     and e["payload"]["group_id"] is None]
    assert len(single_errors) == 1 and "pre_snapshot" in single_errors[0]["reason"]
    errors = [e["payload"] for e in events(site) if e["event"] == "backup.create.error"
              and e["payload"]["group_name"] == "failing"]
    assert [e["volume_name"] for e in errors] == site.group, errors
    assert all("pre_snapshot" in e["reason"] for e in errors), errors


@pytest.mark.parametrize("point", ["group-frozen", "group-snapshot-made", "group-thawed"])
def test_sigkill_around_the_freeze_leaves_nothing_frozen(site, point):
    env = {**os.environ, "LVBACKUP_FAULT": point}
    p = site.lvb.parallel(group_args(site, "killed"), env=env)[0]
    assert p.returncode == -9, describe(p)
    deadline = time.monotonic() + 30
    while any(is_frozen(m) for m in site.mounts.values()):
        assert time.monotonic() < deadline, f"{point}: a filesystem is still frozen"
        time.sleep(0.2)
    if point != "group-frozen":
        assert temp_snapshots(site.vg), "the killed run made no snapshot: the point moved"


def test_the_next_run_removes_what_killed_runs_left_and_finds_parents_in_its_group(site):
    doc = ok_json(site.lvb.parallel(("--json", *group_args(site, "pair"), "--incremental"))[0])
    assert temp_snapshots(site.vg) == []
    assert not any(is_frozen(m) for m in site.mounts.values())
    # Each member's parent: the same volume's backup in the group's earlier backup.
    assert [b["parent_id"] for b in doc["backups"]] == [b["id"] for b in site.first["backups"]]


def test_restore_group_removes_what_it_created_when_a_member_fails(site):
    """All or nothing: with room in the VG for one member's new LV only, the second
    member's restore fails and the first's LV, made by this restore, is removed."""
    vg, lvb = site.vg, site.lvb
    free = int(vg.lvm("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free",
                      vg.name).strip())
    vg.lvm("lvcreate", "-q", "-y", "-L", f"{(free - SIZE - SIZE // 2) // MiB}m", "-n",
           "filler", vg.name)
    try:
        p = lvb.parallel(("restore", "--group", site.first["group_id"]))[0]
        assert_refused(p, "insufficient free space", code=1)
        assert [r["lv_name"] for r in vg.lvs() if r["lv_name"].startswith("restore_")] == []
    finally:
        vg.lvm("lvremove", "-q", "-y", f"{vg.name}/filler")


def test_a_group_job_backs_its_volumes_up_as_one_group(site):
    """`volumes:` in a job makes `lvbackup run` back them up as a group named after it."""
    jobs = Lvb(site.tmp / "jobs", repository=str(site.tmp / "lvb" / "repo"),
               catalog=str(site.tmp / "lvb" / "catalog.db"),
               jobs={"nightly": {"volumes": site.group, "force": True, "incremental": True}})
    done = ok_json(jobs.parallel(("--json", "run"))[0])
    assert done["exit_code"] == 0 and [j["status"] for j in done["jobs"]] == ["ok"], done
    members = ok_json(jobs.parallel(("--json", "list", "--group", "nightly"))[0])
    assert sorted(m["volume_name"] for m in members) == sorted(site.group), members
    assert {m["group_name"] for m in members} == {"nightly"}
    assert len({m["group_id"] for m in members}) == 1
    assert temp_snapshots(site.vg) == []
    assert not any(is_frozen(m) for m in site.mounts.values())


def test_a_hung_run_is_thawed_at_freeze_timeout_and_fails(site):
    """lvbackup stopped (SIGSTOP) with every member frozen, as a hung lvcreate would hold
    it: the watchdog thaws at freeze_timeout; resumed, the run fails saying so and leaves
    no snapshot."""
    hung = Lvb(site.tmp / "hung", repository=str(site.tmp / "lvb" / "repo"),
               catalog=str(site.tmp / "lvb" / "catalog.db"), freeze_timeout=3)
    p = hung.start(*group_args(site, "hung"),
                   env={**os.environ, "LVBACKUP_FAULT": "group-frozen:1:STOP"})
    try:
        deadline = time.monotonic() + 300
        # Stopped at the crash point, its filesystems frozen (polling them before could
        # race the freeze itself).
        while Path(f"/proc/{p.pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
            assert time.monotonic() < deadline and p.poll() is None, "never stopped"
            time.sleep(0.1)
        while any(is_frozen(m) for m in site.mounts.values()):
            assert time.monotonic() < deadline, "still frozen past freeze_timeout"
            time.sleep(0.2)
        assert p.poll() is None, "the run was to be stopped, not ended"
    finally:
        os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=600)
    assert_refused(subprocess.CompletedProcess(p.args, p.returncode, out, err),
                   "freeze_timeout", code=1)
    assert temp_snapshots(site.vg) == []
    assert not any(is_frozen(m) for m in site.mounts.values())
