"""Back up a real LV (full, then incremental) with the lvbackup CLI and restore both,
to a file and onto another LV, byte for byte."""

import hashlib
import os

import pytest

pytestmark = pytest.mark.lvm

MiB = 1 << 20
KiB = 1 << 10
LV_SIZE = 8 * MiB


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mixed_content(size: int) -> bytes:
    """Random data with runs of zeros in between (zeros are often stored specially)."""
    parts, pos = [], 0
    pattern = [(1 * MiB, "r"), (2 * MiB, "0"), (512 * KiB, "r"), (4 * KiB, "0"), (700 * KiB, "r")]
    while pos < size:
        for length, kind in pattern:
            length = min(length, size - pos)
            parts.append(os.urandom(length) if kind == "r" else bytes(length))
            pos += length
    return b"".join(parts)[:size]


def test_full_and_incremental_backup_restore(vg, lvb, tmp_path):
    lvb("init")
    vg.create_lv("data", LV_SIZE)
    vg.write("data", mixed_content(LV_SIZE))
    v1 = vg.read("data")  # what the LV held at the first backup
    assert len(v1) == LV_SIZE

    full = lvb.json("create", "--device", vg.path("data"))
    assert isinstance(full, dict), full
    assert full["status"] == "available", full
    assert full["id"], full
    assert full.get("parent_id") is None, full

    # Change some blocks: random into a zero run, zeros over random data, a few bytes at the end.
    vg.write("data", os.urandom(64 * KiB), offset=1 * MiB + 128 * KiB)
    vg.write("data", bytes(256 * KiB), offset=3 * MiB + 4 * KiB)
    vg.write("data", b"changed", offset=LV_SIZE - 7)
    v2 = vg.read("data")
    assert v2 != v1

    incr = lvb.json("create", "--device", vg.path("data"), "--incremental")
    assert incr["status"] == "available", incr
    assert incr["parent_id"] == full["id"], incr
    assert incr["id"] != full["id"]
    assert incr["volume_id"] == full["volume_id"], (full, incr)

    for record, expected in ((full, v1), (incr, v2)):
        out = tmp_path / f"restored-{record['id']}.img"
        lvb("restore", record["id"], "--to-file", out)
        assert sha256(out.read_bytes()) == sha256(expected), \
            f"restore {record['id']} --to-file differs"

    # Onto another LV of the same size full of garbage: every byte must be rewritten,
    # the zero runs too. The incremental one, so that the chain is resolved as well.
    vg.create_lv("other", LV_SIZE)
    vg.write("other", os.urandom(LV_SIZE))
    lvb("restore", incr["id"], "--to", vg.path("other"))
    assert sha256(vg.read("other")) == sha256(v2), "restore --to LV differs"
