"""Incremental parent selection across volume and snapshot backups of one real LV
(docs/lineage.md, rules 5-9), with classic snapshots taken a second apart.

Timeline of the volume `data` (a linear LV; snapshot times have one-second resolution):

    S1 (content v1)  <1 s>  S2 (v2)  <1 s>  volume backup BV (v2)  <1 s>  S3 (v4)

and the backups, in the order they are made:

    incremental of S1 with no backups at all  -> "No backups available ..." (rule 6)
    B2 = full of S2
    B1 = incremental of S1: B2 is not earlier than S1, nothing is -> rule 8's fallback:
         the most recently created candidate, B2, which is available
    BV = full of the volume
    B3 = incremental of S3 -> the latest earlier data_timestamp: BV (a volume backup)
    B2i = incremental of S2 -> strictly earlier only: B1 (t1), not B2 (t2, equal) nor BV
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from lvbhelpers import (
    Lvb,
    MiB,
    assert_refused,
    info,
    lv_time_iso,
    mixed,
    module_vg,
    next_second,
    sha,
    sleep_past_second_of,
)

pytestmark = pytest.mark.lvm

SIZE = 16 * MiB


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parent")
    lvb = Lvb(tmp / "lvb", workers=1)
    init = lvb.start("init")
    with module_vg(tmp) as vg:
        content = {}
        vg.create_lv("data", SIZE)
        vg.write("data", mixed(SIZE, b"v1"))
        content["v1"] = vg.read("data")
        vg.snapshot("data", "s1", 8 * MiB)
        next_second(vg, "s1")
        vg.write("data", os.urandom(MiB), offset=2 * MiB)
        vg.write("data", bytes(MiB), offset=4 * MiB)  # zeros over data: a hole appears
        content["v2"] = vg.read("data")
        vg.snapshot("data", "s2", 8 * MiB)
        out, err = init.communicate(timeout=120)
        assert init.returncode == 0, err
        uuids = {n: info(vg, n) for n in ("data", "s1", "s2")}
        assert uuids["s1"]["lv_time"] < uuids["s2"]["lv_time"], uuids
        yield SimpleNamespace(vg=vg, lvb=lvb, content=content, lvs=uuids, rec={})


def create(story, *args):
    return story.lvb.json("create", *args)


def test_incremental_with_no_backups_is_refused(story):
    p = story.lvb("create", "--snapshot", f"{story.vg.name}/s1", "--incremental", check=False)
    assert_refused(p, "No backups available to do an incremental backup.")
    assert story.lvb.rows() == []


def test_parent_selection(story):
    vg, lvs, rec = story.vg, story.lvs, story.rec
    t1, t2 = lv_time_iso(lvs["s1"]["lv_time"]), lv_time_iso(lvs["s2"]["lv_time"])

    b2 = rec["b2"] = create(story, "--snapshot", f"{vg.name}/s2")
    assert (b2["parent_id"], b2["is_incremental"], b2["data_timestamp"]) == (None, False, t2)

    # Rule 7 excludes B2 (t2 is not earlier than t1); rule 8 then takes the most recently
    # created candidate, B2, because it is available.
    b1 = rec["b1"] = create(story, "--snapshot", f"{vg.name}/s1", "--incremental")
    assert b1["data_timestamp"] == t1
    assert b1["parent_id"] == b2["id"] and b1["is_incremental"] is True, b1

    next_second(vg, "s2")
    bv = rec["bv"] = create(story, "--volume", f"{vg.name}/data")
    assert bv["parent_id"] is None and bv["data_timestamp"] == bv["created_at"] > t2, bv

    vg.write("data", os.urandom(MiB), offset=8 * MiB)
    story.content["v4"] = vg.read("data")
    sleep_past_second_of(bv["data_timestamp"])  # S3's lv_time must be later than BV's
    vg.snapshot("data", "s3", 8 * MiB)
    t3 = lv_time_iso(info(vg, "s3")["lv_time"])
    b3 = rec["b3"] = create(story, "--snapshot", f"{vg.name}/s3", "--incremental")
    assert b3["data_timestamp"] == t3 > bv["data_timestamp"]
    assert b3["parent_id"] == bv["id"], "latest earlier data_timestamp: the volume backup"

    b2i = rec["b2i"] = create(story, "--snapshot", f"{vg.name}/s2", "--incremental")
    assert b2i["parent_id"] == b1["id"], "strictly earlier than S2: B1 only"

    counts = {r["id"]: r["num_dependent_backups"] for r in story.lvb.rows()}
    assert counts == {b2["id"]: 1, b1["id"]: 1, bv["id"]: 1, b3["id"]: 0, b2i["id"]: 0}


def test_incrementals_restore_bit_exact(story, tmp_path):
    """B1 (an incremental whose parent holds later data) and B3 (one whose parent is a
    volume backup) restore to their snapshots' content."""
    rec = story.rec
    assert {"b1", "b3"} <= rec.keys(), "needs test_parent_selection's backups"
    expected = {"b1": story.content["v1"], "b3": story.content["v4"]}
    for p in story.lvb.parallel(*[("restore", rec[k]["id"], "--to-file", tmp_path / k)
                                  for k in expected]):
        assert p.returncode == 0, p.stderr
    for key, data in expected.items():
        assert sha((tmp_path / key).read_bytes()) == sha(data), key
