"""thin_delta / thin_dump reports, in the format thin-provisioning-tools 0.9.0 prints."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lvbackup.base.errors import ChangeTrackingError
from lvbackup.datapath.blockmap import Kind, Run
from lvbackup.volumes.changes.ranges import Change, Extent, block_runs
from lvbackup.volumes.changes.thin import parse_delta, parse_mappings

DELTA = """\
<superblock uuid="" time="3" transaction="5" data_block_size="128" nr_data_blocks="1600">
  <diff left="1" right="2">
    <same begin="0" length="16"/>
    <different begin="16" length="1"/>
    <right_only begin="17" length="3"/>
    <left_only begin="40" length="8"/>
    <same begin="48" length="2"/>
  </diff>
</superblock>
"""

DUMP = """\
<superblock uuid="" time="3" transaction="5" flags="0" version="2" data_block_size="128" \
nr_data_blocks="1600" metadata_snap="1234">
  <device dev_id="2" mapped_blocks="7" transaction="4" creation_time="2" snap_time="3">
    <range_mapping origin_begin="0" data_begin="100" length="4" time="2"/>
    <single_mapping origin_block="4" data_block="7" time="3"/>
    <single_mapping origin_block="9" data_block="8" time="3"/>
    <range_mapping origin_begin="10" data_begin="20" length="1" time="3"/>
  </device>
</superblock>
"""


def test_delta() -> None:
    report = parse_delta(DELTA, 1, 2)
    assert report.data_block_sectors == 128 and report.block_bytes == 65536
    assert report.extents == [
        Extent(Change.UNCHANGED, 0, 16), Extent(Change.CHANGED, 16, 1),
        Extent(Change.CHANGED, 17, 3), Extent(Change.DISCARDED, 40, 8),
        Extent(Change.UNCHANGED, 48, 2)]


def test_delta_to_runs() -> None:
    report = parse_delta(DELTA, 1, 2)
    size = 64 * report.block_bytes
    runs = block_runs(report.extents, report.block_bytes, size, 128 * 1024, size,
                      Change.UNMAPPED)
    # 128 KiB repository blocks are pairs of pool blocks: 0-7 same; 8-9 changed; 10-19
    # unmapped on both sides; 20-23 discarded; 24 same; the rest unmapped.
    assert runs == [Run(Kind.INHERIT, 0, 8), Run(Kind.READ, 8, 2), Run(Kind.HOLE, 10, 14),
                    Run(Kind.INHERIT, 24, 1), Run(Kind.HOLE, 25, 7)]


def test_empty_delta() -> None:
    text = ('<superblock uuid="" time="0" transaction="0" data_block_size="2097152" '
            'nr_data_blocks="0"><diff left="7" right="9"></diff></superblock>')
    assert parse_delta(text.encode(), 7, 9).extents == []


def test_mappings_merged() -> None:
    report = parse_mappings(io.BytesIO(DUMP.encode()), 2)
    assert report.data_block_sectors == 128
    assert report.extents == [Extent(Change.CHANGED, 0, 5), Extent(Change.CHANGED, 9, 2)]


def test_large_dump_streams() -> None:
    n = 200_000
    body = "".join(f'<single_mapping origin_block="{2 * i}" data_block="{i}" time="0"/>\n'
                   for i in range(n))
    text = (f'<superblock uuid="" time="0" transaction="0" data_block_size="128" '
            f'nr_data_blocks="{n}"><device dev_id="1" mapped_blocks="{n}" transaction="0" '
            f'creation_time="0" snap_time="0">{body}</device></superblock>')
    report = parse_mappings(text, 1)
    assert len(report.extents) == n and report.extents[-1] == Extent(Change.CHANGED,
                                                                        2 * n - 2, 1)


BAD_DELTAS = {
    "not xml": "thin_delta: Unable to find mapping tree for snap1 (1)",
    "truncated": DELTA[:200],
    "other ids": DELTA.replace('left="1"', 'left="3"'),
    "missing length": DELTA.replace(' length="1"', ""),
    "negative": DELTA.replace('begin="40"', 'begin="-40"'),
    "non-numeric": DELTA.replace('begin="40"', 'begin="4e1"'),
    "unsorted": DELTA.replace('begin="40"', 'begin="2"'),
    "overlapping": DELTA.replace('begin="17"', 'begin="15"'),
    "zero length": DELTA.replace('length="8"', 'length="0"'),
    "block size": DELTA.replace('data_block_size="128"', 'data_block_size="100"'),
    "no block size": DELTA.replace(' data_block_size="128"', ""),
    "verbose": DELTA.replace('<left_only begin="40" length="8"/>',
                             '<left_only><range begin="40" data_begin="9" length="8"/>'
                             '</left_only>'),
    "unknown": DELTA.replace("<same", "<similar"),
    "nested": DELTA.replace('<same begin="48" length="2"/>',
                            '<same begin="48" length="2"><same begin="50" length="1"/></same>'),
    "two diffs": DELTA.replace("</diff>", '</diff><diff left="1" right="2"></diff>'),
    "two documents": DELTA + DELTA,
    "wrong root": DELTA.replace("superblock", "superblocks"),
    "empty": "",
}


@pytest.mark.parametrize("name", BAD_DELTAS)
def test_bad_delta(name: str) -> None:
    with pytest.raises(ChangeTrackingError):
        parse_delta(BAD_DELTAS[name], 1, 2)


BAD_DUMPS = {
    "other device": DUMP.replace('dev_id="2"', 'dev_id="3"'),
    "no device": DUMP[:DUMP.index("<device")] + "</superblock>",
    "shared subtree": DUMP.replace('<single_mapping origin_block="9" data_block="8" '
                                   'time="3"/>', '<ref name="12"/>'),
    "unsorted": DUMP.replace('origin_block="9"', 'origin_block="1"'),
    "missing origin": DUMP.replace('origin_block="9" ', ""),
    "two devices": DUMP.replace("</device>", '</device><device dev_id="2" mapped_blocks="0" '
                                'transaction="0" creation_time="0" snap_time="0"></device>'),
    "truncated": DUMP[:-30],
}


@pytest.mark.parametrize("name", BAD_DUMPS)
def test_bad_dump(name: str) -> None:
    with pytest.raises(ChangeTrackingError):
        parse_mappings(BAD_DUMPS[name], 2)


RESTORE = """\
<superblock uuid="" time="3" transaction="5" flags="0" version="2" data_block_size="256" \
nr_data_blocks="1600">
  <device dev_id="1" mapped_blocks="7" transaction="0" creation_time="0" snap_time="2">
    <range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>
    <single_mapping origin_block="5" data_block="10" time="0"/>
    <range_mapping origin_begin="40" data_begin="20" length="2" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="8" transaction="0" creation_time="2" snap_time="2">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="3" data_block="50" time="2"/>
    <single_mapping origin_block="5" data_block="10" time="0"/>
    <range_mapping origin_begin="6" data_begin="60" length="3" time="2"/>
  </device>
</superblock>
"""


def test_real_tools(tmp_path: Path) -> None:
    """The tools' own output, from metadata thin_restore builds in a file (no pool)."""
    tools = [shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
             for t in ("thin_restore", "thin_delta", "thin_dump")]
    if None in tools:
        pytest.skip("thin-provisioning-tools are not installed")
    restore, delta, dump = (str(t) for t in tools)
    (tmp_path / "in.xml").write_text(RESTORE)
    meta = tmp_path / "meta"
    meta.write_bytes(b"")
    os.truncate(meta, 8 << 20)
    subprocess.run([restore, "-i", str(tmp_path / "in.xml"), "-o", str(meta)], check=True,
                   capture_output=True)
    out = subprocess.run([delta, "--snap1", "1", "--snap2", "2", str(meta)], check=True,
                         capture_output=True).stdout
    report = parse_delta(out, 1, 2)
    assert report.data_block_sectors == 256
    assert report.extents == [
        Extent(Change.UNCHANGED, 0, 3), Extent(Change.CHANGED, 3, 1),
        Extent(Change.UNCHANGED, 5, 1), Extent(Change.CHANGED, 6, 3),
        Extent(Change.DISCARDED, 40, 2)]
    out = subprocess.run([dump, "--dev-id", "2", str(meta)], check=True,
                         capture_output=True).stdout
    assert parse_mappings(out, 2).extents == [Extent(Change.CHANGED, 0, 4),
                                              Extent(Change.CHANGED, 5, 4)]
