"""lvm.py's change-tracking commands: argv lists and report parsing (no device-mapper)."""

from __future__ import annotations

import json

import pytest

from lvbackup import lvm
from lvbackup.base.errors import ChangeTrackingError, UsageError


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every argv lvm._run is given (lvs prints an empty report, the rest nothing)."""
    seen: list[list[str]] = []

    def fake_run(argv: list[str], what: str) -> str:
        seen.append(argv)
        return report() if argv[0] == "lvs" else ""

    monkeypatch.setattr(lvm, "_run", fake_run)
    monkeypatch.setattr(lvm, "_tool", lambda name: f"/usr/sbin/{name}")
    return seen


def report(*rows: dict[str, str]) -> str:
    return json.dumps({"report": [{"lv": list(rows)}], "log": []})


def test_metadata_snapshot_messages(calls: list[list[str]]) -> None:
    lvm.reserve_metadata_snap("vg-a", "pool-1")
    lvm.release_metadata_snap("vg", "pool")
    assert calls == [
        ["dmsetup", "message", "vg--a-pool--1-tpool", "0", "reserve_metadata_snap"],
        ["dmsetup", "message", "vg-pool-tpool", "0", "release_metadata_snap"]]


def test_thin_tools(calls: list[list[str]]) -> None:
    lvm.thin_delta("vg-a", "pool", 3, 7)
    lvm.thin_dump_mappings("vg", "pool", 7, "/tmp/x.xml")
    assert calls == [
        ["thin_delta", "-m", "--snap1", "3", "--snap2", "7", "/dev/mapper/vg--a-pool_tmeta"],
        ["thin_dump", "-m", "--dev-id", "7", "-o", "/tmp/x.xml",
         "/dev/mapper/vg-pool_tmeta"]]


def test_missing_thin_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tool(name: str) -> str:
        raise UsageError(f"{name} not found")

    monkeypatch.setattr(lvm, "_tool", no_tool)
    with pytest.raises(ChangeTrackingError, match="thin-provisioning-tools"):
        lvm.thin_delta("vg", "pool", 1, 2)


@pytest.mark.parametrize("bad", ["-vg", "vg/x", "a b"])
def test_names_are_validated(calls: list[list[str]], bad: str) -> None:
    with pytest.raises(UsageError):
        lvm.reserve_metadata_snap(bad, "pool")
    with pytest.raises(UsageError):
        lvm.thin_delta("vg", bad, 1, 2)
    assert calls == []


def test_thin_ids() -> None:
    out = report({"lv_name": "pool", "thin_id": ""},
                 {"lv_name": "[pool_tdata]", "thin_id": ""},
                 {"lv_name": "data", "thin_id": "1"},
                 {"lv_name": "data-snap", "thin_id": "12"},
                 {"lv_name": "plain", "thin_id": ""})
    assert lvm._parse_thin_ids(out) == {"data": 1, "data-snap": 12}
    with pytest.raises(lvm.LvmError):
        lvm._parse_thin_ids(report({"lv_name": "data", "thin_id": "x1"}))
    with pytest.raises(lvm.LvmError):
        lvm._parse_thin_ids("not json")


def test_thin_ids_argv(calls: list[list[str]]) -> None:
    assert lvm.thin_ids("vg") == {}
    assert calls == [["lvs", "--reportformat", "json", "-o", "lv_name,thin_id", "vg"]]


def test_chunk_size() -> None:
    assert lvm._parse_chunk_size(report({"lv_name": "pool", "chunk_size": "65536"}),
                                 "vg/pool") == 65536
    for bad in (report({"lv_name": "plain", "chunk_size": "0"}), report(),
                report({"lv_name": "a", "chunk_size": "4096"},
                       {"lv_name": "b", "chunk_size": "4096"})):
        with pytest.raises(lvm.LvmError):
            lvm._parse_chunk_size(bad, "vg/x")


def test_chunk_size_argv(calls: list[list[str]]) -> None:
    with pytest.raises(lvm.LvmError):
        lvm.chunk_size("/dev/vg/snap1")        # the fake lvs reports no LV
    assert calls == [["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                      "lv_name,chunk_size", "vg/snap1"]]
