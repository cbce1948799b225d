"""A source that fails to read (docs/reliability.md, "Read errors from the source").

A device-mapper device whose table is a linear segment over an LV, then a 1 MiB `error`
segment (every read there fails with EIO, as a dying disk's bad sectors do), then the rest
of the LV again. Backing it up must fail with exit 1 and one line naming the I/O error,
leave an `error` row with a fail_reason and no manifest, and leave an earlier backup intact.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import subprocess

import pytest

pytestmark = pytest.mark.lvm

MiB = 1 << 20
SECTOR = 512
LV_SIZE = 16 * MiB
GOOD = 8 * MiB       # read fine: the linear segment before the error
BAD = 1 * MiB        # the error segment


def dmsetup(*args: str, input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
    p = subprocess.run(["dmsetup", *args], input=input, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"dmsetup {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def test_read_error_in_the_middle_of_the_source(vg, lvb, tmp_path):
    lvb("init", "--block-size", "64K")
    lv = vg.create_lv("data", LV_SIZE)
    vg.write("data", os.urandom(LV_SIZE))
    # A healthy backup first: it must survive the failed one untouched.
    healthy = lvb.json("create", "--device", lv)
    assert healthy["status"] == "available", healthy

    name = f"lvbt_err_{secrets.token_hex(3)}"
    g, b, n = GOOD // SECTOR, BAD // SECTOR, LV_SIZE // SECTOR
    table = (f"0 {g} linear {lv} 0\n"
             f"{g} {b} error\n"
             f"{g + b} {n - g - b} linear {lv} {g + b}\n")
    dmsetup("create", name, "--noudevsync", input=table)
    try:
        dmsetup("mknodes", name, check=False)   # no udev in the VM: make sure the node exists
        device = f"/dev/mapper/{name}"
        assert os.path.exists(device), dmsetup("ls").stdout
        shown = os.path.realpath(device)   # the volume name lvbackup records and reports

        p = lvb("create", "--device", device, check=False)
        err = p.stderr.decode(errors="replace")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert p.returncode == 1, (p.returncode, err)
        assert "Traceback" not in err, err
        assert len(lines) == 1, err
        assert "Input/output error" in lines[0] and shown in lines[0], lines[0]
    finally:
        dmsetup("remove", "--noudevsync", name, check=False)

    db = sqlite3.connect(tmp_path / "catalog.db")
    try:
        rows = {r[0]: r[1:] for r in db.execute(
            "SELECT id, status, fail_reason, volume_name FROM backups")}
    finally:
        db.close()
    assert rows[healthy["id"]][0] == "available"
    failed = [(s, why) for bid, (s, why, vol) in rows.items() if bid != healthy["id"]]
    assert len(failed) == 1, rows
    status, why = failed[0]
    assert status == "error" and "Input/output error" in why, failed
    assert not [m for m in os.listdir(tmp_path / "repo" / "manifests") if m != healthy["id"]]
    # The earlier backup verifies, every chunk re-hashed.
    assert lvb("verify", "--deep", healthy["id"]).returncode == 0
