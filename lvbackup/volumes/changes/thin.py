"""Thin pool metadata reports: thin_delta's differences and thin_dump's mappings.

Both tools (thin-provisioning-tools 0.9.0) print XML in units of the pool's data blocks,
whose size in 512-byte sectors is the superblock element's data_block_size:

    <superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="0">
      <diff left="1" right="2">
        <same begin="0" length="16"/>
        <different begin="16" length="1"/>
        <right_only begin="17" length="3"/>
        <left_only begin="40" length="8"/>
      </diff>
    </superblock>

thin_delta (without --verbose) merges neighbouring blocks of one kind into a range and
says nothing about blocks unmapped in both devices. thin_dump --dev-id N lists one
device's mappings:

    <superblock uuid="" time="1" transaction="2" flags="0" version="2"
                data_block_size="128" nr_data_blocks="16384">
      <device dev_id="1" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">
        <range_mapping origin_begin="0" data_begin="0" length="4" time="0"/>
        <single_mapping origin_block="9" data_block="7" time="1"/>
      </device>
    </superblock>

Anything else (another element, such as the <def>/<ref> shared subtrees newer
thin_dump versions print, a missing or non-numeric attribute, ranges out of order) is a
ChangeTrackingError: the caller then reads the whole volume.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

from ...base.errors import ChangeTrackingError
from .ranges import Change, Extent, validated

SECTOR = 512

# The only data block sizes dm-thin accepts for a pool: 64 KiB to 1 GiB, in multiples of
# 64 KiB.
_MIN_BLOCK_SECTORS = 128
_MAX_BLOCK_SECTORS = 2097152

_DELTA_KINDS = {
    "same": Change.UNCHANGED,
    "different": Change.CHANGED,
    "right_only": Change.CHANGED,     # mapped only in the newer device
    "left_only": Change.DISCARDED,    # mapped only in the older one: reads as zeros now
}
_NUMBER = re.compile(r"[0-9]{1,20}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ThinReport:
    """Ranges of pool data blocks (for ranges.block_runs with unit=block_bytes; blocks no
    extent covers are unmapped on both sides)."""
    data_block_sectors: int
    extents: list[Extent]

    @property
    def block_bytes(self) -> int:
        return self.data_block_sectors * SECTOR


def parse_delta(source: str | bytes | BinaryIO, left: int, right: int) -> ThinReport:
    """thin_delta's report comparing thin device `left` (the parent's) with `right`."""
    elements = _elements(source)
    block_sectors = _superblock(elements)
    diff = _next(elements, "start")
    if diff.tag != "diff":
        raise _unexpected(diff)
    if (_number(diff, "left"), _number(diff, "right")) != (left, right):
        raise ChangeTrackingError(f"thin_delta compared devices {diff.get('left')} and "
                                  f"{diff.get('right')}, not {left} and {right}")
    extents = []
    for event, elem in elements:
        if event == "end" and elem.tag == "diff":
            break
        if elem.tag not in _DELTA_KINDS or event != "start":
            raise _unexpected(elem)
        extents.append(Extent(_DELTA_KINDS[elem.tag], _number(elem, "begin"),
                              _number(elem, "length")))
        if _next(elements, "end") is not elem:
            raise _unexpected(elem)
    else:
        raise ChangeTrackingError("thin_delta's report ends inside <diff>")
    _end(elements)
    return ThinReport(block_sectors, list(validated(extents)))


def parse_mappings(source: str | bytes | BinaryIO, dev_id: int) -> ThinReport:
    """thin_dump --dev-id's report: which blocks of thin device `dev_id` are mapped (as
    CHANGED extents, neighbours merged)."""
    elements = _elements(source)
    block_sectors = _superblock(elements)
    device = _next(elements, "start")
    if device.tag != "device":
        raise _unexpected(device)
    if _number(device, "dev_id") != dev_id:
        raise ChangeTrackingError(f"thin_dump listed device {device.get('dev_id')}, "
                                  f"not {dev_id}")
    extents: list[Extent] = []
    for event, elem in elements:
        if event == "end" and elem.tag == "device":
            break
        if event != "start":
            raise _unexpected(elem)
        if elem.tag == "range_mapping":
            begin, length = _number(elem, "origin_begin"), _number(elem, "length")
        elif elem.tag == "single_mapping":
            begin, length = _number(elem, "origin_block"), 1
        else:
            raise _unexpected(elem)
        if _next(elements, "end") is not elem:
            raise _unexpected(elem)
        if extents and extents[-1].begin + extents[-1].length == begin:
            last = extents.pop()
            extents.append(last._replace(length=last.length + length))
        else:
            extents.append(Extent(Change.CHANGED, begin, length))
    else:
        raise ChangeTrackingError("thin_dump's report ends inside <device>")
    _end(elements)
    return ThinReport(block_sectors, list(validated(extents)))


def _elements(source: str | bytes | BinaryIO) -> Iterator[tuple[str, ET.Element]]:
    """(event, element) pairs, parsed a chunk at a time and forgotten once read: a
    fragmented volume's dump can hold millions of mappings."""
    stream: BinaryIO
    if isinstance(source, str):
        stream = io.BytesIO(source.encode())
    elif isinstance(source, bytes):
        stream = io.BytesIO(source)
    else:
        stream = source
    parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start", "end"))
    open_elements: list[ET.Element] = []
    try:
        while chunk := stream.read(_CHUNK):
            parser.feed(chunk)
            yield from _events(parser, open_elements)
        parser.close()
    except ET.ParseError as e:
        raise ChangeTrackingError(f"unreadable thin metadata report: {e}") from None
    yield from _events(parser, open_elements)


def _events(parser: ET.XMLPullParser[ET.Element],
            open_elements: list[ET.Element]) -> Iterator[tuple[str, ET.Element]]:
    # Start and end events, the only ones asked for, each come with their element.
    for event, elem in cast(Iterator[tuple[str, ET.Element]], parser.read_events()):
        if event == "start":
            open_elements.append(elem)
        else:
            open_elements.pop()
        yield event, elem
    # Drop the elements read so far from the tree (each open one keeps only its open
    # child), so that memory does not grow with the report.
    for parent in open_elements[:-1]:
        del parent[:-1]
    if open_elements:
        del open_elements[-1][:]


def _next(elements: Iterator[tuple[str, ET.Element]], want: str) -> ET.Element:
    for event, elem in elements:
        if event != want:
            raise _unexpected(elem)
        return elem
    raise ChangeTrackingError("the thin metadata report ends early")


def _superblock(elements: Iterator[tuple[str, ET.Element]]) -> int:
    sb = _next(elements, "start")
    if sb.tag != "superblock":
        raise _unexpected(sb)
    sectors = _number(sb, "data_block_size")
    if (not _MIN_BLOCK_SECTORS <= sectors <= _MAX_BLOCK_SECTORS
            or sectors % _MIN_BLOCK_SECTORS):
        raise ChangeTrackingError(f"thin pool data block size of {sectors} sectors is "
                                  "not one the kernel allows")
    return sectors


def _end(elements: Iterator[tuple[str, ET.Element]]) -> None:
    """The superblock closes, and nothing follows."""
    if _next(elements, "end").tag != "superblock":
        raise ChangeTrackingError("the thin metadata report holds more than one listing")
    for _, elem in elements:
        raise _unexpected(elem)


def _number(elem: ET.Element, name: str) -> int:
    text = elem.get(name)
    if text is None or not _NUMBER.fullmatch(text):
        raise ChangeTrackingError(f"thin metadata report: <{elem.tag}> has "
                                  f"{name}={text!r}, not a number")
    return int(text)


def _unexpected(elem: ET.Element) -> ChangeTrackingError:
    return ChangeTrackingError(f"thin metadata report: unexpected <{elem.tag}>")
