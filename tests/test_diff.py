"""`lvbackup diff`: the ranges two backups of a volume differ in, from their manifests."""

from __future__ import annotations

import json
import os

from support import KiB, MiB, Workdir, assert_one_line_error, make_image

BS = 64 * KiB


def _write(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_diff_against_the_parent_names_changed_zeroed_and_grown_ranges(tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 4, seed=7)
    _write(img, 20 * BS, os.urandom(BS))                      # data, to be zeroed below
    full = wd.create(img)
    _write(img, 3 * BS + 100, os.urandom(10))                 # inside block 3
    _write(img, 10 * BS, os.urandom(2 * BS))                  # blocks 10-11
    _write(img, 20 * BS, bytes(BS))                           # block 20 zeroed
    with open(img, "ab") as f:                                # grown by 1.5 blocks
        f.write(os.urandom(BS + BS // 2))
    incr = wd.create(img, "--incremental")
    report = wd.run_json("diff", incr["id"])
    assert report["other_id"] == full["id"] and report["backup_id"] == incr["id"]
    ranges = [(r["offset"], r["length"], r["change"]) for r in report["ranges"]]
    size = 4 * MiB + BS + BS // 2
    assert ranges == [(3 * BS, BS, "changed"), (10 * BS, 2 * BS, "changed"),
                      (20 * BS, BS, "zeroed"), (4 * MiB, size - 4 * MiB, "grown")], ranges
    assert report["differing_bytes"] == sum(r[1] for r in ranges)
    lines = wd.run("diff", incr["id"], "--jsonl").stdout.splitlines()
    assert [json.loads(ln) for ln in lines] == report["ranges"]
    # Compared the other way round, the tail is gone rather than grown.
    back = wd.run_json("diff", full["id"], incr["id"])
    assert back["ranges"][-1]["change"] == "shrunk" and back["size"] == 4 * MiB


def test_diff_of_identical_backups_is_empty_and_refusals_are_one_line(tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.init("64K")
    img, other = tmp_path / "disk.img", tmp_path / "other.img"
    make_image(img, 2, seed=8)
    make_image(other, 2, seed=9)
    a = wd.create(img)
    b = wd.create(img, "--incremental")
    assert wd.run_json("diff", b["id"])["ranges"] == []
    assert_one_line_error(wd.run("diff", a["id"]), 2, "is a full backup")
    c = wd.create(other)
    assert_one_line_error(wd.run("diff", a["id"], c["id"]), 2, "different volumes")
    assert_one_line_error(wd.run("diff", "nonexistent"), 2, "not found")
