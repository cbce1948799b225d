"""Instant restore without a kernel: the region map, the read/write/hydrate rules against
plain files (lvbackup/nbd/hydrate.py), the process killed at its crash points, the
nbdkit export serving and hydrating a restore for real (spoken to over its socket), a
restore's backup held against delete and gc, and the command's errors. The devices
(NBD, device-mapper, the table swap under a mounted filesystem) are tests/lvm/test_instant.py,
in the VM."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from nbdclient import NbdClient

from lvbackup.base.errors import CorruptionError, LvbackupError
from lvbackup.base.timeutil import now_iso
from lvbackup.nbd import devices
from lvbackup.nbd import registry as reg
from lvbackup.nbd.hydrate import (
    STATE_FORMAT,
    Hydrator,
    RegionBitmap,
    hydrated_bytes,
    load_state,
    regions_of,
    regions_path,
    save_state,
)

from support import Workdir, assert_one_line_error, describe, make_image, wait_until

REGION = 64 * 1024   # small regions: many of them in a small image
GARBAGE = 0xEE       # what the "LV" holds before the restore


def _files(tmp_path: Path, size: int, seed: int = 1) -> tuple[bytes, Path, Path]:
    """(the backup's image, a target file full of garbage, a region map path)."""
    rng = random.Random(seed)
    image = bytearray(rng.randbytes(size))
    image[2 * REGION:3 * REGION] = bytes(REGION)   # region 2 is all zeros
    target = tmp_path / "lv"
    target.write_bytes(bytes([GARBAGE]) * (size + 4096))   # an LV may be larger
    regions = tmp_path / "state.regions"
    RegionBitmap.create(regions, regions_of(size, REGION))
    return bytes(image), target, regions


class Source:
    """The backup, as BackupReader.read would give it; counts the reads."""

    def __init__(self, image: bytes):
        self.image = image
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.image[offset:offset + length]


def _hydrator(image: bytes, target: Path, regions: Path, fresh: bool = False,
              copy=None) -> tuple[Hydrator, Source, int]:
    source = Source(image)
    fd = os.open(target, os.O_RDWR)
    rmap = RegionBitmap(regions, regions_of(len(image), REGION))
    return Hydrator(fd, rmap, len(image), REGION, source.read, copy or source.read,
                    fresh), source, fd


def test_region_map_bits_are_durable_and_laid_out_as_documented(tmp_path):
    path = tmp_path / "r.regions"
    RegionBitmap.create(path, 20)
    assert path.read_bytes() == bytes(3)
    rmap = RegionBitmap(path, 20)
    for region in (0, 9, 19):
        rmap.mark(region)
    rmap.mark(9)   # idempotent
    assert path.read_bytes() == bytes([0b0000_0001, 0b0000_0010, 0b0000_1000])
    assert rmap.count == 3 and not rmap.complete
    again = RegionBitmap(path, 20, writable=False)
    assert [r for r in range(20) if r in again] == [0, 9, 19]
    # The last region is short: hydrated bytes count what it holds.
    size = 19 * REGION + 1000
    assert hydrated_bytes(again, size, REGION) == 2 * REGION + 1000
    with pytest.raises(CorruptionError, match="expected 2"):
        RegionBitmap(path, 16)


def test_state_file_round_trip_and_unknown_format(tmp_path):
    path = tmp_path / "s.json"
    state = {"format": STATE_FORMAT, "volume": "vg/lv", "target": "/dev/vg/lv",
             "backup_id": "b", "backup": {}, "size": 1 << 20, "region_size": REGION,
             "fresh": False, "rate": None, "dm_name": "lvbackup-restore-vg-lv",
             "device": "/dev/mapper/lvbackup-restore-vg-lv", "started_at": now_iso(),
             "done_at": None, "error": None}
    save_state(path, state)   # type: ignore[arg-type]
    assert load_state(path) == state
    path.write_text(json.dumps({**state, "format": 99}))
    with pytest.raises(CorruptionError, match="unknown format 99"):
        load_state(path)


def test_reads_come_from_the_backup_until_a_region_is_hydrated(tmp_path):
    image, target, regions = _files(tmp_path, 5 * REGION + 3000)
    h, source, fd = _hydrator(image, target, regions)
    try:
        buf = bytearray(len(image))
        h.pread(buf, 0)
        assert bytes(buf) == image
        assert target.read_bytes() == bytes([GARBAGE]) * (len(image) + 4096)  # untouched
        assert h.hydrate(1) and not h.hydrate(1)
        assert target.read_bytes()[REGION:2 * REGION] == image[REGION:2 * REGION]
        source.reads.clear()
        span = bytearray(REGION + 200)   # region 1 (from the LV) and the start of region 2
        h.pread(span, REGION)
        assert bytes(span) == image[REGION:2 * REGION + 200]
        assert source.reads == [(2 * REGION, 200)]
        with pytest.raises(OSError, match="outside"):
            h.pread(bytearray(10), len(image) - 5)
    finally:
        os.close(fd)


def test_a_write_hydrates_its_regions_first_and_is_never_hidden(tmp_path):
    image, target, regions = _files(tmp_path, 5 * REGION + 3000)
    h, _, fd = _hydrator(image, target, regions)
    expected = bytearray(image)
    try:
        # Across regions 3 and 4, partly: both are hydrated, then written.
        patch = b"W" * 5000
        at = 4 * REGION - 1000
        h.pwrite(patch, at)
        expected[at:at + len(patch)] = patch
        assert [r for r in range(6) if r in h.regions] == [3, 4]
        lv = target.read_bytes()
        assert lv[3 * REGION:5 * REGION] == bytes(expected[3 * REGION:5 * REGION])
        assert lv[:3 * REGION] == bytes([GARBAGE]) * 3 * REGION   # not hydrated yet
        # The last, short region.
        h.pwrite(b"end", len(image) - 3)
        expected[-3:] = b"end"
        got = bytearray(len(image))
        h.pread(got, 0)
        assert got == expected
        # The background copy fills the rest and never undoes a write.
        assert h.run(threading.Event(), None)
        h.flush()
        assert target.read_bytes()[:len(image)] == bytes(expected)
        assert RegionBitmap(regions, 6, writable=False).complete
    finally:
        os.close(fd)


def test_a_fresh_volume_skips_zero_regions_and_a_failed_copy_marks_nothing(tmp_path):
    image, target, regions = _files(tmp_path, 4 * REGION)
    h, _, fd = _hydrator(image, target, regions, fresh=True)
    try:
        assert h.hydrate(2)   # all zeros in the backup: a fresh LV already reads zeros
        assert target.read_bytes()[2 * REGION:3 * REGION] == bytes([GARBAGE]) * REGION
        assert 2 in h.regions
    finally:
        os.close(fd)

    def damaged(offset: int, length: int) -> bytes:
        raise CorruptionError("block 3: damaged chunk")

    image, target, regions = _files(tmp_path, 4 * REGION)
    h, _, fd = _hydrator(image, target, regions, copy=damaged)
    try:
        with pytest.raises(LvbackupError, match="damaged"):
            h.pwrite(b"x" * 512, REGION)
        assert 1 not in h.regions   # the write was refused, the region still the backup's
        assert target.read_bytes()[REGION:2 * REGION] == bytes([GARBAGE]) * REGION
    finally:
        os.close(fd)


def test_the_copy_stops_when_asked_and_keeps_to_its_rate(tmp_path):
    image, target, regions = _files(tmp_path, 8 * REGION)
    h, _, fd = _hydrator(image, target, regions)
    try:
        stop = threading.Event()
        stop.set()
        assert not h.run(stop, None) and h.regions.count == 0
        # 2 regions a second: region k is copied no sooner than k/2 s after the start, however
        # fast or loaded the machine (a loaded one only takes longer to show progress).
        stop = threading.Event()
        done: list[float] = []
        worker = threading.Thread(target=h.run, args=(stop, 2 * REGION,
                                                       lambda: done.append(time.monotonic())))
        start = time.monotonic()
        worker.start()
        wait_until(lambda: len(done) >= 3, "three regions copied", timeout=60)
        stop.set()
        worker.join(10)
        assert not worker.is_alive()
        assert len(done) >= 3 and h.regions.count == len(done), done
        for k, at in enumerate(done):
            assert at - start >= k / 2 - 0.01, f"region {k} copied {at - start:.3f} s in"
    finally:
        os.close(fd)


_CRASH = textwrap.dedent("""
    import os, sys
    from lvbackup.nbd.hydrate import Hydrator, RegionBitmap, regions_of
    image = open(sys.argv[1], "rb").read()
    fd = os.open(sys.argv[2], os.O_RDWR)
    rmap = RegionBitmap(sys.argv[3], regions_of(len(image), {region}))
    read = lambda offset, length: image[offset:offset + length]
    Hydrator(fd, rmap, len(image), {region}, read, read, False).pwrite(b"W" * 100, {at})
    print("written")
""")


@pytest.mark.parametrize("point", ["hydrate-copied", "hydrate-marked"])
def test_killed_while_a_write_hydrates_its_region(tmp_path, point):
    """The process dies between the steps of a write into an unhydrated region: the
    write was never acknowledged, and what the volume reads afterwards is the backup's
    data, whether the region map says the LV has it yet or not."""
    image, target, regions = _files(tmp_path, 4 * REGION)
    (tmp_path / "image").write_bytes(image)
    script = _CRASH.format(region=REGION, at=REGION + 10)
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "image"), str(target),
                        str(regions)], capture_output=True, text=True,
                       env={**os.environ, "LVBACKUP_FAULT": point})
    assert p.returncode == -signal.SIGKILL and "written" not in p.stdout, p.stderr
    lv = target.read_bytes()
    assert lv[REGION:2 * REGION] == image[REGION:2 * REGION]   # copied, not yet written
    h, _, fd = _hydrator(image, target, regions)
    try:
        assert (1 in h.regions) == (point == "hydrate-marked")
        got = bytearray(len(image))
        h.pread(got, 0)
        assert bytes(got) == image
        assert h.run(threading.Event(), None)
        assert target.read_bytes()[:len(image)] == image
    finally:
        os.close(fd)


# --- the nbdkit export, for real -------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    """A backup of a 3 MiB image restored "instantly" onto a plain file by a real nbdkit
    running the instant export (no kernel device, no device-mapper): (wd, data, target,
    state file, record)."""
    wd = Workdir(tmp_path / "wd", event_log=str(tmp_path / "events.jsonl"),
                 metrics=str(tmp_path / "metrics" / "lvbackup.prom"))
    wd.init()
    image = tmp_path / "disk.img"
    data = make_image(image, 3, seed=11, tail=4096)
    backup = wd.create(image)
    target = tmp_path / "lv"
    target.write_bytes(bytes([GARBAGE]) * len(data))
    state_file = wd.cache / "instant" / "lvbackup-restore-vg-lv.json"
    state_file.parent.mkdir(parents=True)
    region = 1 << 20
    RegionBitmap.create(regions_path(state_file), regions_of(len(data), region))
    save_state(state_file, {
        "format": STATE_FORMAT, "volume": "vg/lv", "target": str(target),
        "backup_id": backup["id"], "backup": backup, "size": len(data),
        "region_size": region, "fresh": False, "rate": 2 * region,
        "dm_name": "lvbackup-restore-vg-lv", "device": "/dev/mapper/lvbackup-restore-vg-lv",
        "started_at": now_iso(), "done_at": None, "error": None})
    lock_dir = wd.cache / "locks"
    map_id = uuid.uuid4().hex[:12]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record: reg.MapRecord = {
        "map_id": map_id, "backup_id": backup["id"], "device": None, "writable": True,
        "ready": False, "pid": None, "run_dir": str(run_dir), "overlay_dir": None,
        "started_at": now_iso(), "instant": {"state": str(state_file), "volume": "vg/lv"}}
    reg.save(lock_dir, record)
    record["pid"] = devices.start_server(run_dir, {
        "export": "instant", "config": str(wd.config),
        "backup": backup["id"], "lock": str(reg.lock_path(lock_dir, map_id)),
        "state": str(state_file)}, None, writable=True)
    reg.save(lock_dir, record)
    yield wd, data, target, state_file, record
    if Path(f"/proc/{record['pid']}").exists():
        os.kill(record["pid"], signal.SIGKILL)


def _wait(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_export_serves_writes_and_hydrates_in_the_background(served):
    wd, data, target, state_file, record = served
    client = NbdClient(str(Path(record["run_dir"]) / "socket"))
    expected = bytearray(data)
    try:
        assert client.size == len(data) and not client.read_only
        assert client.pread(0, len(data)) == (0, data)
        for at, patch in ((5000, b"first write" * 100), (len(data) - 700, b"Z" * 700),
                          ((1 << 20) - 100, b"across two regions" * 20)):
            assert client.pwrite(at, patch) == 0
            expected[at:at + len(patch)] = patch
        assert client.pread(0, len(data)) == (0, bytes(expected))
        # Held while it runs, and after its server dies too (resume needs the backup).
        backup_id = record["backup_id"]
        assert_one_line_error(wd.run("delete", backup_id), 2, "being restored onto vg/lv")
        assert_one_line_error(wd.run("gc"), 2, "being restored onto vg/lv")
        regions = RegionBitmap(regions_path(state_file), 4, writable=False)
        _wait(lambda: RegionBitmap(regions_path(state_file), 4, writable=False).complete)
        regions.close()
    finally:
        client.close()
    assert target.read_bytes() == bytes(expected)
    status = wd.run_json("restore", "--status")
    assert [(s["volume"], s["hydrated_bytes"], s["total_bytes"], s["done"], s["running"])
            for s in status] == [("vg/lv", len(data), len(data), False, True)], status
    # Progress events, every 10 %, with the backup's record.
    events = [json.loads(line) for line in
              (wd.path.parent / "events.jsonl").read_text().splitlines()]
    progress = [e["payload"] for e in events if e["event"] == "backup.restoreprogress"]
    assert progress and progress[-1]["percent"] == 100, events
    assert {p["id"] for p in progress} == {backup_id} and progress[0]["target"] == "vg/lv"
    prom = (wd.path.parent / "metrics" / "lvbackup.prom").read_text()
    assert f'lvbackup_restore_hydrated_bytes{{volume="vg/lv"}} {len(data)}' in prom, prom
    assert f'lvbackup_restore_total_bytes{{volume="vg/lv"}} {len(data)}' in prom, prom
    human = wd.run("restore", "--status")
    assert human.returncode == 0 and "vg/lv" in human.stdout and "copying (100%)" in \
        human.stdout, human.stdout
    os.kill(record["pid"], signal.SIGKILL)
    _wait(lambda: not reg.is_alive(wd.cache / "locks", record["map_id"]))
    assert_one_line_error(wd.run("delete", backup_id), 2, "being restored onto vg/lv")
    status = wd.run_json("restore", "--status", "vg/lv")
    assert [(s["running"], s["pid"], s["done"]) for s in status] == [(False, None, False)]
    assert "stopped (100%): restore --resume vg/lv" in wd.run("restore", "--status").stdout
    # Its NBD side is listed with the maps, and unmap leaves it to --resume.
    assert [m["instant_volume"] for m in wd.run_json("list", "--mapped")] == ["vg/lv"]
    assert_one_line_error(wd.run("unmap", backup_id), 2, "instant restore onto vg/lv")


def test_instant_restore_usage_errors(tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.init()
    image = tmp_path / "disk.img"
    make_image(image, 1, seed=3)
    backup_id = wd.create(image)["id"]
    assert wd.run_json("restore", "--status") == []
    assert_one_line_error(wd.run("restore", "--resume", "vg0/data"), 2,
                          "no instant restore onto vg0/data")
    assert_one_line_error(wd.run("restore", backup_id, "--instant"), 2,
                          "--new-volume VG/NAME or --to VG/LV")
    assert_one_line_error(wd.run("restore", backup_id, "--instant", "--to", "/dev/sda"), 2,
                          "onto an LV")
    assert_one_line_error(wd.run("restore", backup_id, "--instant", "--to-file", "x"), 2)
    assert_one_line_error(wd.run("restore", backup_id, "--status"), 2,
                          "restore --status does not take a backup")
    assert_one_line_error(wd.run("restore", backup_id, "--to-file", "x", "--rate", "1M"), 2,
                          "a plain restore does not take --rate")
    assert_one_line_error(wd.run("restore", "--cancel", "vg0/a", "--release", "vg0/a"), 2,
                          "--cancel and --release exclude each other")
    assert_one_line_error(wd.run("restore", "--release", "vg0/a", "--force"), 2,
                          "restore --release does not take --force")
    assert_one_line_error(wd.run("restore", "--resume", "not a volume"), 2, "VG/LV")


# --- the end of an instant restore: --cancel, --release (the state rules; the devices are
# tests/lvm/test_instant_lvm.py) --------------------------------------------------------------

def _state(wd: Workdir, volume: str, backup: dict, **fields) -> Path:
    """The state file (and region map, nothing hydrated) of an instant restore onto
    `volume` of 1 MiB, as `restore --instant` writes them."""
    vg, name = volume.split("/")
    dm_name = f"lvbackup-restore-{vg}-{name}"
    state_file = wd.cache / "instant" / f"{dm_name}.json"
    state_file.parent.mkdir(parents=True, exist_ok=True)
    RegionBitmap.create(regions_path(state_file), regions_of(1 << 20, REGION))
    save_state(state_file, {
        "format": STATE_FORMAT, "volume": volume, "target": f"/dev/{volume}",
        "backup_id": backup["id"], "backup": backup, "size": 1 << 20, "region_size": REGION,
        "fresh": False, "rate": None, "dm_name": dm_name, "device": f"/dev/mapper/{dm_name}",
        "started_at": now_iso(), "done_at": None, "error": None, "created": True,
        "lv_uuid": "u", "cancelled_at": None, "released_at": None, **fields})
    return state_file


def test_cancel_release_and_status_follow_the_state(tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.init()
    make_image(tmp_path / "disk.img", 1, seed=5)
    backup = wd.create(tmp_path / "disk.img")
    _state(wd, "vg/run", backup)
    _state(wd, "vg/sw", backup, done_at=now_iso())
    _state(wd, "vg/rel", backup, done_at=now_iso(), released_at=now_iso())
    _state(wd, "vg/can", backup, cancelled_at=now_iso())
    _state(wd, "vg/canold", backup, cancelled_at=now_iso(), created=False)
    # A finished restore's device that cannot be removed now (here: no device-mapper at
    # all) is left for later; --status works on.
    status = {s["volume"]: s for s in wd.run_json("restore", "--status")}
    assert {v: (s["done"], s["released"], s["cancelling"]) for v, s in status.items()} == {
        "vg/run": (False, False, False), "vg/sw": (True, False, False),
        "vg/rel": (True, True, False), "vg/can": (False, False, True),
        "vg/canold": (False, False, True)}, status
    human = wd.run("restore", "--status").stdout
    assert "done: restore --release vg/sw" in human and "done, released" in human, human
    assert "cancelling: restore --cancel vg/can" in human, human
    assert_one_line_error(wd.run("restore", "--release", "vg/run"), 2, "not finished",
                          "restore --cancel vg/run")
    assert_one_line_error(wd.run("restore", "--cancel", "vg/sw"), 2, "is finished",
                          "restore --release vg/sw")
    assert_one_line_error(wd.run("restore", "--resume", "vg/can"), 2,
                          "being cancelled", "restore --cancel vg/can")
    assert_one_line_error(wd.run("restore", "--release", "vg/can"), 2,
                          "being cancelled")
    # A cancel of an existing LV that began (with --force) is finished without it (here it
    # then needs device-mapper).
    p = wd.run("restore", "--cancel", "vg/canold")
    assert "existed before" not in p.stderr and "Traceback" not in p.stderr, describe(p)
    # Released already: nothing to do, and it says where the volume is.
    assert wd.run_json("restore", "--release", "vg/rel")["released"] is True
    p = wd.run("restore", "--release", "vg/rel")
    assert p.returncode == 0 and p.stdout == "/dev/vg/rel\n", describe(p)
    assert_one_line_error(wd.run("restore", "--cancel", "vg/none"), 2,
                          "no instant restore onto vg/none")
    for argv, why in (((backup["id"], "--cancel", "vg/run"),
                       "restore --cancel does not take a backup"),
                      (("--cancel", "vg/run", "--release", "vg/run"),
                       "--cancel and --release exclude each other"),
                      (("--release", "vg/rel", "--force"), "restore --release does not take"),
                      (("--cancel", "vg/run", "--status"), "exclude each other"),
                      (("--cancel", "vg/run", "--rate", "1M"),
                       "restore --cancel does not take --rate")):
        assert_one_line_error(wd.run("restore", *argv), 2, why)


def test_cancel_of_a_restore_onto_an_existing_lv_needs_force(served):
    """The copy overwrites an existing LV from the start: without --force, cancel refuses
    and leaves the restore running."""
    wd, data, target, state_file, record = served
    p = wd.run("restore", "--cancel", "vg/lv")
    assert_one_line_error(p, 2, "vg/lv existed before", "cannot give it back as it was",
                          "--force")
    assert reg.is_alive(wd.cache / "locks", record["map_id"])
    assert not load_state(state_file).get("cancelled_at")
    (status,) = wd.run_json("restore", "--status", "vg/lv")
    assert status["running"] and not status["cancelling"], status


def test_dmsetup_open_counts_are_read_by_exact_name():
    from lvbackup import lvm
    out = ("lvbackup-restore-vg-lv:1\nlvbackup-restore-vg-lv2:0\nodd:name:with:colons:3\n")
    assert lvm._parse_open_count(out, "lvbackup-restore-vg-lv") == 1
    assert lvm._parse_open_count(out, "lvbackup-restore-vg-lv2") == 0
    assert lvm._parse_open_count(out, "odd:name:with:colons") == 3
    assert lvm._parse_open_count(out, "lvbackup-restore-vg-l") is None
    assert lvm._parse_open_count("No devices found\n", "lvbackup-restore-vg-lv") is None
    with pytest.raises(lvm.LvmError, match="open count"):
        lvm._parse_open_count("lvbackup-restore-vg-lv:\n", "lvbackup-restore-vg-lv")
