"""The incremental parent (docs/lineage.md, rules 5-8): lvbackup.catalog.lineage.choose_parent.

Candidates are crafted rows with ISO 8601 UTC timestamps as the catalog stores them.
"""

from __future__ import annotations

import itertools

import pytest

from lvbackup.base.errors import EXIT_USAGE, UsageError
from lvbackup.catalog.lineage import choose_parent

NO_PARENT = "No backups available to do an incremental backup."


def T(hms: str, micro: int = 0) -> str:
    """'17:04:35' -> '2026-11-24T17:04:35.000000+00:00'."""
    return f"2026-11-24T{hms}.{micro:06d}+00:00"


def B(bid: str, data: str, created: str | None = None, status: str = "available") -> dict:
    return {"id": bid, "data_timestamp": data, "created_at": created or data,
            "status": status, "volume_id": "vol"}


def pick(candidates, snapshot_time=None) -> str:
    """choose_parent's pick, the same whatever the order of the candidates."""
    picks = {choose_parent([dict(c) for c in order], snapshot_time)["id"]
             for order in itertools.permutations(candidates)}
    assert len(picks) == 1, f"the pick depends on the candidates' order: {picks}"
    return picks.pop()


def no_parent(candidates, snapshot_time=None) -> None:
    with pytest.raises(UsageError) as e:
        choose_parent(candidates, snapshot_time)
    assert str(e.value) == NO_PARENT
    assert e.value.exit_code == EXIT_USAGE == 2


# --- volume backups (no snapshot time) ---------------------------------------------------

def test_latest_data_timestamp_wins():
    cands = [B("a", T("10:00:00")), B("b", T("12:00:00")), B("c", T("11:00:00"))]
    assert pick(cands) == "b"


def test_data_timestamp_beats_creation_order():
    # "c" was created last, but from a snapshot taken before "b"'s data: b is newer data.
    cands = [B("a", T("10:00:00")), B("b", T("12:00:00")),
             B("c", T("11:00:00"), created=T("13:00:00"))]
    assert pick(cands) == "b"


def test_microseconds_count():
    cands = [B("a", T("10:00:00", 1)), B("b", T("10:00:00", 0), created=T("10:00:01"))]
    assert pick(cands) == "a"


def test_tie_on_data_timestamp_goes_to_the_most_recently_created():
    cands = [B("a", T("12:00:00"), created=T("12:00:05")),
             B("b", T("12:00:00"), created=T("12:00:09")),
             B("c", T("12:00:00"), created=T("12:00:01"))]
    assert pick(cands) == "b"


@pytest.mark.parametrize("status", ["creating", "error", "restoring", "deleting",
                                    "error_deleting", "deleted"])
def test_a_newer_backup_that_is_not_available_is_ignored(status):
    cands = [B("old", T("10:00:00")), B("new", T("12:00:00"), status=status)]
    assert pick(cands) == "old"


def test_deleted_rows_are_ignored_even_if_passed():
    cands = [B("a", T("09:00:00")), B("gone", T("23:00:00"), status="deleted")]
    assert pick(cands) == "a"


def test_no_candidates():
    no_parent([])


@pytest.mark.parametrize("statuses", [("error",), ("creating", "error"), ("deleted",),
                                      ("deleted", "error_deleting", "deleting")])
def test_no_available_candidate(statuses):
    no_parent([B(f"x{i}", T(f"1{i}:00:00"), status=s) for i, s in enumerate(statuses)])


# --- snapshot backups (rule 7: strictly earlier than the snapshot) ----------------------

def test_snapshot_takes_latest_strictly_earlier():
    cands = [B("a", T("10:00:00")), B("b", T("11:00:00")), B("c", T("13:00:00"))]
    assert pick(cands, T("12:00:00")) == "b"


def test_snapshot_equal_time_is_excluded():
    cands = [B("a", T("10:00:00")), B("same", T("12:00:00"), created=T("12:30:00"))]
    assert pick(cands, T("12:00:00")) == "a"


def test_snapshot_one_microsecond_earlier_counts():
    cands = [B("a", T("10:00:00")), B("b", T("11:59:59", 999999))]
    assert pick(cands, T("12:00:00")) == "b"


def test_snapshot_ignores_unavailable_earlier_candidates():
    cands = [B("a", T("10:00:00")), B("b", T("11:00:00"), status="error"),
             B("c", T("13:00:00"))]
    assert pick(cands, T("12:00:00")) == "a"


def test_snapshot_tie_goes_to_most_recently_created():
    cands = [B("a", T("11:00:00"), created=T("11:00:00")),
             B("b", T("11:00:00"), created=T("11:30:00")),
             B("c", T("12:30:00"))]
    assert pick(cands, T("12:00:00")) == "b"


# --- rule 8: Cinder's fallback when nothing is earlier than the snapshot ------------------

def test_fallback_takes_the_most_recently_created_candidate():
    # Both are newer than the snapshot; "b" has older data but was created last.
    cands = [B("a", T("12:00:00"), created=T("12:00:00")),
             B("b", T("11:00:00"), created=T("13:00:00"))]
    assert pick(cands, T("10:00:00")) == "b"


def test_fallback_when_every_candidate_has_the_snapshot_time():
    cands = [B("a", T("10:00:00"), created=T("10:05:00")),
             B("b", T("10:00:00"), created=T("10:01:00"))]
    assert pick(cands, T("10:00:00")) == "a"


@pytest.mark.parametrize("status", ["error", "creating", "error_deleting"])
def test_fallback_refuses_when_most_recent_is_not_available(status):
    cands = [B("a", T("12:00:00"), created=T("12:00:00")),
             B("b", T("11:00:00"), created=T("13:00:00"), status=status)]
    no_parent(cands, T("10:00:00"))


def test_fallback_ignores_deleted_rows():
    # The deleted row is not a candidate at all, so "a" is the most recently created one.
    cands = [B("a", T("12:00:00"), created=T("12:00:00")),
             B("gone", T("11:00:00"), created=T("13:00:00"), status="deleted")]
    assert pick(cands, T("10:00:00")) == "a"


def test_fallback_needs_an_available_candidate():
    no_parent([B("a", T("12:00:00"), status="error")], T("10:00:00"))


def test_snapshot_with_no_candidates():
    no_parent([], T("10:00:00"))


def test_snapshot_prefers_an_earlier_candidate_to_the_fallback():
    # An earlier available backup exists, so rule 7 applies and the fallback does not.
    cands = [B("early", T("09:00:00"), created=T("09:00:00")),
             B("late", T("12:00:00"), created=T("14:00:00"))]
    assert pick(cands, T("10:00:00")) == "early"
