"""Instant restore onto an LV, for real: the device-mapper device over the kernel's NBD
client and nbdkit, an ext4 volume mounted and written at once while hydration runs, the
table swapped onto the LV under the mounted filesystem, the helper killed with SIGKILL
mid-hydration then taken up again by `restore --resume` with no write lost, the device
removed once finished (`--release`, or by itself once nothing holds it open), and
`--cancel` (killed midway too).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lvbhelpers import Lvb, assert_refused, ct, garbage, mixed, module_vg

run = ct.run

MiB = 1 << 20
REGION = 4 * MiB


def _dm_table(name: str) -> str:
    return run(["dmsetup", "table", name]).strip()


def _linear_onto(path: str, size: int) -> str:
    rdev = os.stat(path).st_rdev
    return f"0 {size // 512} linear {os.major(rdev)}:{os.minor(rdev)} 0"


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _our_dm_devices() -> list[str]:
    """lvbackup's device-mapper devices (`dmsetup ls`)."""
    return [line.split()[0] for line in run(["dmsetup", "ls"]).splitlines()
            if line.startswith("lvbackup-")]


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def _read(path: str, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # what is on the disk
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _pwrite(path: str, data: bytes, offset: int) -> None:
    """A write the device acknowledged after a flush (fsync)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("instant")
    with module_vg(base) as vg:
        lvb = Lvb(base / "state", cache_dir=str(base / "state" / "cache"))
        lvb("init", "--block-size", "64K")
        dm_names: list[str] = []
        pids: list[int] = []
        yield vg, lvb, base, dm_names, pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in dm_names:   # before the VG goes: the devices hold its LVs open
            run(["dmsetup", "remove", "--force", name], check=False)


def test_instant_ext4_mounted_written_and_switched_under_the_mount(setup):
    vg, lvb, base, dm_names, pids = setup
    size = 32 * MiB
    image = base / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", image])
    files = {f"dir/file{i}.bin": os.urandom(1_000_000 + i * 333_333) for i in range(5)}
    src = base / "src"
    src.mkdir()
    run(["mount", "-o", "loop", image, src])
    try:
        (src / "dir").mkdir()
        for name, data in files.items():
            (src / name).write_bytes(data)
    finally:
        run(["umount", src])
    backup_id = lvb.json("create", "--device", image)["id"]

    started = time.monotonic()
    info = lvb.json("restore", backup_id, "--new-volume", f"{vg.name}/fast", "--instant",
                    "--rate", "512K")
    dm_names.append(Path(info["device"]).name)
    pids.append(info["pid"])
    device = info["device"]
    assert device == f"/dev/mapper/lvbackup-restore-{vg.name}-fast", info
    assert info["running"] and not info["done"] and info["total_bytes"] == size, info
    lv = vg.path("fast")
    point = base / "mnt"
    point.mkdir()
    # Usable at once: mounted, read and written while the copy has far to go.
    run(["mount", "-o", "noatime", device, point])
    for name, data in files.items():
        assert (point / name).read_bytes() == data, name
    written = {f"new/w{i}.bin": os.urandom(700_000) for i in range(3)}
    (point / "new").mkdir()
    for name, data in written.items():
        (point / name).write_bytes(data)
    (point / "dir/file0.bin").write_bytes(b"overwritten\n" * 1000)
    files["dir/file0.bin"] = b"overwritten\n" * 1000
    run(["sync", "-f", point])
    assert time.monotonic() - started < size / (512 * 1024), "hydration was over already"
    assert _dm_table(Path(device).name) != _linear_onto(lv, size)   # still over NBD

    # Hydration ends: the table is swapped onto the LV under the mounted filesystem and
    # the helper exits.
    _wait(lambda: _dm_table(Path(device).name) == _linear_onto(lv, size), 300,
          "the switch onto the LV")
    _wait(lambda: _gone(info["pid"]), 30, "the helper to exit")
    assert os.path.ismount(point)
    for name, data in {**files, **written}.items():
        assert (point / name).read_bytes() == data, name
    (point / "after.txt").write_bytes(b"written after the switch\n")
    # Mounted, the device stays (the helper left it), and --release refuses.
    assert_refused(lvb("restore", "--release", f"{vg.name}/fast", check=False),
                   "is in use (mounted or open): unmount it")
    status = lvb.json("restore", "--status", f"{vg.name}/fast")
    assert [(s["done"], s["running"], s["released"], s["hydrated_bytes"]) for s in status] \
        == [(True, False, False, size)], status
    run(["umount", point])
    run(["fsck.ext4", "-f", "-n", lv])   # clean: exit 0
    assert lvb.json("list", "--mapped") == []   # the NBD device and its record are gone
    # Released: no device of lvbackup's left, the LV is used under its own name.
    p = lvb("restore", "--release", f"{vg.name}/fast")
    assert p.stdout.decode() == f"/dev/{vg.name}/fast\n"
    assert _our_dm_devices() == []
    assert lvb.json("restore", "--status", f"{vg.name}/fast")[0]["released"] is True
    run(["mount", "-o", "ro,noload", lv, point])
    try:
        for name, data in {**files, **written}.items():
            assert (point / name).read_bytes() == data, name
        assert (point / "after.txt").read_bytes() == b"written after the switch\n"
    finally:
        run(["umount", point])


def backed_up(lvb, base: Path, size: int, tag: str) -> tuple[bytes, str]:
    """An image of `size` mixed bytes, backed up: its bytes and the backup's id."""
    data = mixed(size, tag.encode())
    image = base / f"{tag}.img"
    image.write_bytes(data)
    return data, lvb.json("create", "--device", image)["id"]


def test_killed_helper_resumes_with_no_write_lost(setup):
    """Raw data, compared byte for byte: the LV ends as the backup plus every write
    acknowledged before the kill and after the resume, over an existing LV full of
    garbage (nothing of it may show through)."""
    vg, lvb, base, dm_names, pids = setup
    size = 24 * MiB
    data, backup_id = backed_up(lvb, base, size, "instant")
    vg.create_lv("target", size)
    lv = vg.path("target")
    _pwrite(lv, garbage(size), 0)

    info = lvb.json("restore", backup_id, "--to", f"{vg.name}/target", "--instant",
                    "--rate", "256K")
    dm_names.append(Path(info["device"]).name)
    device = info["device"]
    expected = bytearray(data)
    for offset, length in ((100, 5000), (3 * REGION + 777, 300_000), (size - 4096, 4096)):
        patch = os.urandom(length)
        _pwrite(device, patch, offset)
        expected[offset:offset + length] = patch
    assert _read(device, size) == expected
    os.kill(info["pid"], signal.SIGKILL)
    _wait(lambda: _gone(info["pid"]), 30, "the helper to die")

    resumed = lvb.json("restore", "--resume", f"{vg.name}/target", "--rate", "4M")
    pids.append(resumed["pid"])
    assert resumed["device"] == device and resumed["running"] and resumed["pid"] != info["pid"]
    assert _read(device, size) == expected   # nothing lost, nothing of the LV's garbage
    patch = os.urandom(REGION + 512)
    _pwrite(device, patch, 4 * REGION - 512)   # written after the resume, across regions
    expected[4 * REGION - 512:5 * REGION] = patch
    held = os.open(device, os.O_RDONLY)   # open across the switch: the helper leaves it
    try:
        _wait(lambda: _dm_table(Path(device).name) == _linear_onto(lv, size), 300,
              "the switch onto the LV")
        _wait(lambda: _gone(resumed["pid"]), 60, "the helper to exit")
        assert _read(device, size) == expected
        assert _our_dm_devices() == [Path(device).name]
    finally:
        os.close(held)
    assert _read(lv, size) == expected
    assert lvb.json("list", "--mapped") == []
    # Nothing holds it open now: the next look at the restores removes the device.
    (status,) = lvb.json("restore", "--status", f"{vg.name}/target")
    assert status["done"] and status["released"], status
    assert _our_dm_devices() == []


def test_helper_killed_with_the_device_suspended_for_the_switch(setup):
    """The helper dies between the suspend and the new table (crash point
    `instant-suspended`): the device stays suspended; --resume swaps a new helper in,
    which resumes the device and finishes the switch."""
    vg, lvb, base, dm_names, pids = setup
    size = 8 * MiB
    data, backup_id = backed_up(lvb, base, size, "suspended")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LVBACKUP_")},
           "LVBACKUP_FAULT": "instant-suspended"}
    p = subprocess.run(lvb.argv("--json", "restore", backup_id, "--new-volume",
                                f"{vg.name}/susp", "--instant"), capture_output=True, env=env)
    assert p.returncode == 0, p
    info = json.loads(p.stdout)
    name = Path(info["device"]).name
    dm_names.append(name)
    _wait(lambda: _gone(info["pid"]), 120, "the helper to die at its crash point")
    assert "SUSPENDED" in run(["dmsetup", "info", name])
    assert lvb.json("restore", "--status", f"{vg.name}/susp")[0]["done"] is False
    resumed = lvb.json("restore", "--resume", f"{vg.name}/susp")
    pids.append(resumed["pid"])
    lv = vg.path("susp")
    # Nothing opened the device: the helper switches it onto the LV (resuming it), then
    # removes it and exits.
    _wait(lambda: _gone(resumed["pid"]), 180, "the helper to switch, release and exit")
    assert _our_dm_devices() == []
    assert _read(lv, size) == data


@pytest.mark.parametrize("point", ["map-server-started", "map-attached"])
def test_restore_killed_while_it_sets_up_is_resumed(setup, point):
    """`restore --instant` killed (SIGKILL) between its steps, before the device exists:
    --status shows the restore unfinished, --resume replaces the half-started helper and
    finishes it, and nothing is left mapped."""
    vg, lvb, base, dm_names, pids = setup
    size = 8 * MiB
    tag = point.replace("-", "")
    data, backup_id = backed_up(lvb, base, size, tag)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LVBACKUP_")},
           "LVBACKUP_FAULT": point}
    p = subprocess.run(lvb.argv("--json", "restore", backup_id, "--new-volume",
                                f"{vg.name}/{tag}", "--instant"), capture_output=True, env=env)
    assert p.returncode == -9, p
    name = f"lvbackup-restore-{vg.name.replace('-', '--')}-{tag}"
    dm_names.append(name)
    (status,) = lvb.json("restore", "--status", f"{vg.name}/{tag}")
    if status["pid"]:
        pids.append(status["pid"])   # the half-started helper, should the test fail
    # It may have copied everything meanwhile, but cannot switch: no device was made.
    assert status["done"] is False
    resumed = lvb.json("restore", "--resume", f"{vg.name}/{tag}")
    pids.append(resumed["pid"])
    lv = vg.path(tag)
    _wait(lambda: _gone(resumed["pid"]), 120, "the helper to switch, release and exit")
    assert _our_dm_devices() == []
    assert _read(lv, size) == data
    assert lvb.json("list", "--mapped") == []
    (status,) = lvb.json("restore", "--status", f"{vg.name}/{tag}")
    assert status["done"] and status["released"] and status["hydrated_bytes"] == size


def _faulty(lvb, point: str, *args) -> subprocess.CompletedProcess:
    """`lvbackup ARGS` killed at crash point `point`."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LVBACKUP_")},
           "LVBACKUP_FAULT": point}
    return subprocess.run(lvb.argv(*args), capture_output=True, env=env)


def test_cancel_removes_the_new_lv_and_releases_the_backup(setup):
    """--cancel of a restore into a new LV: refused while the device is open; killed after
    the device is removed (`instant-cancel-detached`), the restore shows as cancelling
    and cannot be resumed; a second --cancel finishes: no device, no helper, no LV, and
    the backup is free (delete runs)."""
    vg, lvb, base, dm_names, pids = setup
    size = 16 * MiB
    data, backup_id = backed_up(lvb, base, size, "cancelnew")
    volume = f"{vg.name}/cnew"
    info = lvb.json("restore", backup_id, "--new-volume", volume, "--instant",
                    "--rate", "64K")
    dm_names.append(Path(info["device"]).name)
    pids.append(info["pid"])
    assert _read(info["device"], MiB) == data[:MiB]
    held = os.open(info["device"], os.O_RDONLY)
    try:
        assert_refused(lvb("restore", "--cancel", volume, check=False),
                       "is in use (mounted or open): unmount it")
        assert not _gone(info["pid"])
    finally:
        os.close(held)
    p = _faulty(lvb, "instant-cancel-detached", "restore", "--cancel", volume)
    assert p.returncode == -9, p
    assert _gone(info["pid"]) and _our_dm_devices() == []
    (status,) = lvb.json("restore", "--status", volume)
    assert status["cancelling"] and not status["running"], status
    assert_refused(lvb("restore", "--resume", volume, check=False), "being cancelled")
    assert_refused(lvb("delete", backup_id, check=False), "being restored onto")
    done = lvb.json("restore", "--cancel", volume)
    assert done["volume_removed"] and not done["partly_restored"], done
    assert "cnew" not in [r["lv_name"] for r in vg.lvs()]
    assert _our_dm_devices() == [] and lvb.json("list", "--mapped") == []
    assert all(s["volume"] != volume for s in lvb.json("restore", "--status"))
    assert lvb.row(backup_id)["status"] == "available"
    lvb("delete", backup_id)   # no longer held


def test_cancel_onto_an_existing_lv_needs_force_and_leaves_it_partly_restored(setup):
    vg, lvb, base, dm_names, pids = setup
    size = 16 * MiB
    data, backup_id = backed_up(lvb, base, size, "cancelold")
    vg.create_lv("cold", size)
    lv = vg.path("cold")
    old = garbage(size)
    _pwrite(lv, old, 0)
    volume = f"{vg.name}/cold"
    info = lvb.json("restore", backup_id, "--to", volume, "--instant", "--rate", "64K")
    dm_names.append(Path(info["device"]).name)
    pids.append(info["pid"])
    assert_refused(lvb("restore", "--cancel", volume, check=False),
                   "cannot give it back as it was")
    assert not _gone(info["pid"])   # refused: the restore goes on
    _wait(lambda: lvb.json("restore", "--status", volume)[0]["hydrated_bytes"] > 0, 120,
          "a region to be copied")
    p = lvb("--json", "restore", "--cancel", volume, "--force")
    done = json.loads(p.stdout)
    assert done["partly_restored"] and not done["volume_removed"], done
    assert "is left partly restored" in p.stderr.decode(), p.stderr
    assert _gone(info["pid"]) and _our_dm_devices() == []
    copied = done["hydrated_bytes"]
    assert 0 < copied < size
    now = _read(lv, size)
    # The regions copied hold the backup's data; the rest what the LV held (but the one
    # region whose copy may have been under way, unmarked, when the helper was stopped).
    assert now[:copied] == data[:copied]
    assert now[copied + REGION:] == old[copied + REGION:]
    lvb("delete", backup_id)
