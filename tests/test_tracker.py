"""The change tracker's pieces that need no LVM: the sample check that guards a change list,
the block source it hands the data path, and LVM report parsing. With real LVM (thin_delta,
COW stores, pairing, reservations, kept bases): tests/lvm/test_change_tracking.py."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from test_datapath import BS, backup, restored

from lvbackup import lvm
from lvbackup.base.errors import ChangeTrackingError
from lvbackup.config import ConfigError, load_config
from lvbackup.datapath.blockmap import FileBlocks, Kind, Run
from lvbackup.repository.repo import Repository
from lvbackup.volumes.changes.tracker import (
    SAMPLE_CAP_BYTES,
    SAMPLE_MIN_BLOCKS,
    MappedBlocks,
    sample_check,
    sample_size,
)

NBLOCKS = 64


@pytest.fixture
def repo(tmp_path) -> Iterator[Repository]:
    r, _ = Repository.init(tmp_path / "repo", tmp_path / "cache", BS)
    yield r
    r.close()


def write_image(path, data: bytes) -> FileBlocks:
    path.write_bytes(data)
    return FileBlocks(os.open(path, os.O_RDONLY))


def test_sample_size_has_a_floor_a_share_and_a_cap():
    assert sample_size(10, 0.1, BS) == 10                      # never more than there is
    assert sample_size(1000, 0.1, BS) == SAMPLE_MIN_BLOCKS      # at least 16
    assert sample_size(10**6, 0.1, 4096) == 1000                # 0.1 %
    cap = SAMPLE_CAP_BYTES // BS
    assert sample_size(10**9, 0.1, BS) == cap                   # the default is capped
    assert sample_size(10**9, 1.0, BS) == 10**7                 # a chosen share is not
    assert sample_size(5000, 100, BS) == 5000                   # an audit reads them all


def test_a_change_list_that_misses_a_change_is_caught(tmp_path, repo):
    rng = random.Random(1)
    old = rng.randbytes(NBLOCKS * BS)
    parent = backup(repo, write_image(tmp_path / "old.img", old))
    new = bytearray(old)
    new[5 * BS + 100] ^= 1             # one changed block
    new[9 * BS:10 * BS] = bytes(BS)    # one zeroed block
    blocks = write_image(tmp_path / "new.img", bytes(new))
    manifest = repo.manifest(parent)
    honest = [Run(Kind.INHERIT, 0, 5), Run(Kind.READ, 5, 1), Run(Kind.INHERIT, 6, 3),
              Run(Kind.READ, 9, 1), Run(Kind.INHERIT, 10, NBLOCKS - 10)]
    assert sample_check(blocks, honest, manifest, BS, 100) == (None, (NBLOCKS - 2) * BS)
    lying = [Run(Kind.INHERIT, 0, NBLOCKS)]
    why, _ = sample_check(blocks, lying, manifest, BS, 100)
    assert why is not None and ("block 5 " in why or "block 9 " in why), why


def test_the_sample_compares_holes_too(tmp_path, repo):
    old = bytes(8 * BS) + random.Random(2).randbytes(8 * BS)
    parent = backup(repo, write_image(tmp_path / "old.img", old))
    new = bytearray(old)
    new[3 * BS] = 7                    # data where the parent had a hole
    blocks = write_image(tmp_path / "new.img", bytes(new))
    why, _ = sample_check(blocks, [Run(Kind.INHERIT, 0, 16)], repo.manifest(parent), BS, 100)
    assert why is not None and "block 3 " in why


def test_a_default_sample_finds_a_change_list_that_drops_most_changes(tmp_path, repo):
    rng = random.Random(3)
    old = rng.randbytes(NBLOCKS * BS)
    parent = backup(repo, write_image(tmp_path / "old.img", old))
    new = bytearray(old)
    for b in range(0, NBLOCKS, 2):     # half the blocks changed, the list says none
        new[b * BS] ^= 0xFF
    blocks = write_image(tmp_path / "new.img", bytes(new))
    # 16 blocks sampled of 64, half of them changed: a miss has odds of about 1 in 10^5.
    why, read = sample_check(blocks, [Run(Kind.INHERIT, 0, NBLOCKS)], repo.manifest(parent),
                             BS, 0.1)
    assert why is not None and read <= SAMPLE_MIN_BLOCKS * BS


def test_a_mapped_source_backs_up_through_its_map(tmp_path, repo):
    data = bytearray(random.Random(4).randbytes(16 * BS))
    data[4 * BS:12 * BS] = bytes(8 * BS)
    base = write_image(tmp_path / "img", bytes(data))
    runs = [Run(Kind.READ, 0, 4), Run(Kind.HOLE, 4, 8), Run(Kind.READ, 12, 4)]
    mapped = MappedBlocks(base, runs, BS)
    assert restored(repo, backup(repo, mapped)) == bytes(data)
    with pytest.raises(ChangeTrackingError, match="block map made for"):
        mapped.block_map(2 * BS)


@pytest.mark.parametrize("line, held", [
    ("0 2097152 thin-pool 1 179/2048 0/16384 - rw no_discard_passdown queue_if_no_space - "
     "1024", False),
    ("0 2097152 thin-pool 3 190/2048 12/16384 77 rw discard_passdown queue_if_no_space - 1024",
     True),
])
def test_a_reserved_metadata_snapshot_is_seen_in_the_pool_status(line, held):
    assert lvm._parse_held_root(line) is held


def test_an_unreadable_pool_status_is_an_error():
    with pytest.raises(lvm.LvmError, match="cannot read"):
        lvm._parse_held_root("0 2097152 linear 8:1 0")


def test_change_sample_and_keep_snapshot_settings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("change_sample: 100\nkeep_snapshot: true\nchange_tracking: false\n"
                   "jobs:\n  a:\n    volume: vg/lv\n    force: true\n    keep_snapshot: false\n")
    c = load_config(cfg)
    assert c.change_sample == 100 and c.keep_snapshot and c.jobs["a"].keep_snapshot is False
    assert not c.change_tracking
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    d = load_config(empty)
    assert d.change_tracking and d.change_sample == 0.1 and not d.keep_snapshot
    for bad in ("change_sample: 0.01\n", "change_sample: 101\n", "change_sample: lots\n",
                "jobs:\n  a:\n    device: /x\n    keep_snapshot: true\n",
                "change_tracking: maybe\n"):
        cfg.write_text(bad)
        with pytest.raises(ConfigError):
            load_config(cfg)
