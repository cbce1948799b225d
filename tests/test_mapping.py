"""The parts of `lvbackup map` that need no kernel NBD client: the nbdkit server (real
nbdkit running lvbackup's plugin, spoken to over its Unix socket), the registry that holds
mapped backups against delete and gc, and the commands' errors. The kernel side is
tests/lvm/test_map.py, in the VM."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import blake3
import pytest
from nbdclient import NbdClient

from lvbackup.base.timeutil import now_iso
from lvbackup.nbd import devices
from lvbackup.nbd import registry as reg
from lvbackup.repository.backends.local import LocalBackend
from lvbackup.repository.codec import PLAIN
from lvbackup.repository.pack import read_trailer

from support import BLOCK_SIZE, MiB, Workdir, assert_one_line_error, make_image, s3_section


def _start(wd: Workdir, backup_id: str, writable: bool = False, ready: bool = True
           ) -> reg.MapRecord:
    """What `map` does but attach a kernel device: record the map, start nbdkit (and,
    `ready`, record it complete)."""
    map_id = uuid.uuid4().hex[:12]
    run_dir = wd.path / f"run-{map_id}"
    run_dir.mkdir()
    overlay = wd.cache / "overlays" / map_id if writable else None
    if overlay:
        overlay.mkdir(parents=True)
    lock_dir = wd.cache / "locks"
    record: reg.MapRecord = {
        "map_id": map_id, "backup_id": backup_id, "device": None, "writable": writable,
        "ready": False, "pid": None, "run_dir": str(run_dir),
        "overlay_dir": str(overlay) if overlay else None, "started_at": now_iso()}
    reg.save(lock_dir, record)
    record["pid"] = devices.start_server(run_dir, {
        "config": str(wd.config), "backup": backup_id,
        "lock": str(reg.lock_path(lock_dir, map_id))}, overlay)
    record["ready"] = ready
    reg.save(lock_dir, record)
    return record


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            time.sleep(0.05)


@pytest.fixture
def mapped(tmp_path):
    """A backup of a 3 MiB image (plus a tail), served by nbdkit: (wd, id, data, record)."""
    wd = Workdir(tmp_path / "wd")
    wd.init()
    image = tmp_path / "disk.img"
    data = make_image(image, 3, seed=7, tail=4096)
    backup_id = wd.create(image)["id"]
    records = []

    def start(writable: bool = False, ready: bool = True) -> reg.MapRecord:
        records.append(_start(wd, backup_id, writable, ready))
        return records[-1]

    yield wd, backup_id, data, start
    for r in records:
        if r["pid"] and Path(f"/proc/{r['pid']}").exists():
            os.kill(r["pid"], signal.SIGTERM)


def test_served_image_is_the_backup(mapped):
    wd, _, data, start = mapped
    record = start()
    client = NbdClient(str(Path(record["run_dir"]) / "socket"))
    try:
        assert client.size == len(data) and client.read_only
        assert client.pread(0, len(data)) == (0, data)
        rng = random.Random(3)
        for _ in range(50):
            offset = rng.randrange(len(data))
            length = rng.randrange(1, min(300_000, len(data) - offset) + 1)
            assert client.pread(offset, length) == (0, data[offset:offset + length])
    finally:
        client.close()


@pytest.mark.parametrize("where", ["encrypted", "s3"])
def test_the_server_opens_the_repository_as_lvbackup_does(tmp_path, request, monkeypatch,
                                                          where):
    """nbdkit is given the configuration file, not a path: an encrypted repository is
    unlocked with the passphrase from the environment it inherits (never from its command
    line), a repository in object storage is reached through the `s3:` section."""
    if where == "s3":
        server = request.getfixturevalue("s3server")
        bucket = request.getfixturevalue("s3_bucket")
        wd = Workdir(tmp_path / "wd", repository=f"s3://{bucket}/map-{uuid.uuid4().hex[:8]}",
                     s3=s3_section(server))
        env: dict[str, str] = {}
        wd.init()
    else:
        wd = Workdir(tmp_path / "wd")
        env = {"LVBACKUP_PASSPHRASE": "the map's passphrase"}
        monkeypatch.setenv("LVBACKUP_PASSPHRASE", env["LVBACKUP_PASSPHRASE"])
        assert wd.run_json("init", "--encryption", env=env)["encrypted"] is True
    image = tmp_path / "disk.img"
    data = make_image(image, 2, seed=8)
    rec = wd.run_json("create", "--device", image, env=env)
    record = _start(wd, rec["id"])
    cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes()
    assert b"passphrase" not in cmdline and str(wd.config).encode() in cmdline
    client = NbdClient(str(Path(record["run_dir"]) / "socket"))
    try:
        assert client.pread(0, len(data)) == (0, data)
    finally:
        client.close()
        os.kill(record["pid"], signal.SIGTERM)


def test_a_map_of_object_storage_holds_off_every_hosts_gc(tmp_path, s3server, s3_bucket):
    """The map's server holds a run lease in the bucket for its life (renewed from the
    daemon, naming it): another host's gc is refused, then runs once the map is gone."""
    repository = f"s3://{s3_bucket}/held-{uuid.uuid4().hex[:8]}"
    wd = Workdir(tmp_path / "wd", repository=repository, s3=s3_section(s3server))
    other = Workdir(tmp_path / "other", repository=repository, s3=s3_section(s3server))
    wd.init()
    image = tmp_path / "disk.img"
    make_image(image, 1, seed=9)
    record = _start(wd, wd.create(image)["id"])
    assert_one_line_error(other.run("gc"), 75, "in use by another host's run",
                          "a mapped backup", f"pid {record['pid']}")
    os.kill(record["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{record['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    bucket, _, prefix = repository.removeprefix("s3://").partition("/")
    listed = s3server.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/locks/")
    assert listed.get("KeyCount", 0) == 0, "the server released its lease as it exited"
    other.run_json("gc")


def test_a_damaged_chunk_fails_its_range_with_eio(mapped):
    wd, _, data, start = mapped
    pack = next(p for p in (wd.repo / "packs").rglob("*") if p.is_file())
    storage = LocalBackend(wd.repo)
    try:
        refs = read_trailer(storage, bytes.fromhex(pack.name), PLAIN)
    finally:
        storage.close()
    ref = refs[len(refs) // 2]
    blocks = [data[i:i + BLOCK_SIZE] for i in range(0, len(data), BLOCK_SIZE)]
    bad = next(i for i, b in enumerate(blocks) if blake3.blake3(b).digest() == ref.chunk_id)
    with open(pack, "r+b") as f:
        f.seek(ref.offset + ref.length // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x04]))
    client = NbdClient(str(Path(start()["run_dir"]) / "socket"))
    try:
        assert client.pread(bad * BLOCK_SIZE + 100, 10)[0] == errno.EIO
        # A request spanning the damaged block fails whole: never partly wrong data.
        assert client.pread((bad - 1) * BLOCK_SIZE, 3 * BLOCK_SIZE)[0] == errno.EIO
        for i in (bad - 1, bad + 1):
            assert client.pread(i * BLOCK_SIZE, BLOCK_SIZE) == (0, blocks[i])
    finally:
        client.close()


def test_writable_map_keeps_writes_in_its_overlay(mapped):
    wd, backup_id, data, start = mapped
    before = {p: p.read_bytes() for p in wd.repo.rglob("*") if p.is_file()}
    record = start(writable=True)
    client = NbdClient(str(Path(record["run_dir"]) / "socket"))
    try:
        assert not client.read_only
        junk = os.urandom(200_000)
        assert client.pwrite(MiB + 5, junk) == 0
        assert client.pread(MiB, len(junk) + 10) == (0, data[MiB:MiB + 5] + junk
                                                     + data[MiB + 5 + len(junk):MiB + 10
                                                            + len(junk)])
    finally:
        client.close()
    assert {p: p.read_bytes() for p in wd.repo.rglob("*") if p.is_file()} == before
    wd.assert_restores(backup_id, data)


def test_a_mapped_backup_is_held_against_delete_and_gc(mapped):
    wd, backup_id, data, start = mapped
    record = start()
    listed = wd.run_json("list", "--mapped")
    assert [(m["backup_id"], m["alive"], m["pids"], m["device"]) for m in listed] == \
        [(backup_id, True, [record["pid"]], None)]
    assert_one_line_error(wd.run("delete", backup_id), 2, "is mapped", backup_id)
    assert_one_line_error(wd.run("gc"), 2, "cannot collect garbage", "is mapped")
    assert wd.show(backup_id)["status"] == "available"

    # A killed server holds nothing: gc runs, its record waits for unmap.
    _kill(record["pid"])
    assert [m["alive"] for m in wd.run_json("list", "--mapped")] == [False]
    assert wd.run("gc").returncode == 0
    unmapped = wd.run_json("unmap", backup_id[:8])
    assert [m["backup_id"] for m in unmapped] == [backup_id]
    assert wd.run_json("list", "--mapped") == []
    assert not Path(record["run_dir"]).exists()
    wd.assert_restores(backup_id, data)


def test_unmap_stops_a_live_server(mapped):
    wd, backup_id, _, start = mapped
    record = start(writable=True)
    overlay = Path(record["overlay_dir"] or "")
    assert overlay.is_dir()
    wd.run_json("unmap", backup_id)
    assert not Path(f"/proc/{record['pid']}/fd").exists() or \
        Path(f"/proc/{record['pid']}/stat").read_text().split()[2] == "Z"
    assert not overlay.exists() and not Path(record["run_dir"]).exists()
    assert wd.run("delete", backup_id).returncode == 0


def test_a_map_whose_setup_died_is_undone_by_the_next_command(mapped):
    """Maps are set up under the registry lock: one found unfinished there was being set up
    by a process that died (kill -9 of `lvbackup map`); the next command undoes it."""
    wd, backup_id, _, start = mapped
    record = start(ready=False)
    assert reg.is_alive(wd.cache / "locks", record["map_id"])
    assert wd.run_json("list", "--mapped") == []
    assert not reg.is_alive(wd.cache / "locks", record["map_id"])
    assert not Path(record["run_dir"]).exists()
    assert wd.run("delete", backup_id).returncode == 0


def test_the_plugin_refuses_another_python(tmp_path):
    plugin = Path(devices.__file__).with_name("nbdkit_plugin.py")
    p = subprocess.run(["nbdkit", "--foreground", "--log=stderr", f"--unix={tmp_path / 's'}",
                        "python", str(plugin), "python=2.7"], capture_output=True, timeout=60)
    assert p.returncode != 0
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"nbdkit's Python is {here} but lvbackup runs under Python 2.7" in p.stderr.decode()


def test_command_errors(workdir, tmp_path):
    workdir.init()
    assert workdir.run_json("list", "--mapped") == []
    assert_one_line_error(workdir.run("unmap", "/dev/nbd7"), 2, "no backup is mapped on /dev/nbd7")
    assert_one_line_error(workdir.run("unmap", "3f2a"), 2, "no mapped backup matches")
    assert_one_line_error(workdir.run("unmount", tmp_path), 2, "nothing is mounted on")
    assert_one_line_error(workdir.run("mount", "3f2a", tmp_path / "missing"), 2,
                          "is not a directory")
    assert_one_line_error(workdir.run("list", "--mapped", "--status", "available"), 2,
                          "--mapped takes no other option")
