"""The backup lifecycle: the statuses, the moves the catalog allows between them, and that
the operations make exactly the moves the table lists."""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lvbackup.base.lifecycle import INITIAL, TRANSITIONS, IllegalTransition, Status
from lvbackup.catalog.catalog import STATUSES, BackupRecord, Catalog

from support import STATUSES as DOCUMENTED_STATUSES

ALLOWED = sorted((frm, to) for frm, tos in TRANSITIONS.items() for to in tos)
ILLEGAL = sorted(set(itertools.product(Status, Status)) - set(ALLOWED))


def _record(backup_id: str = "b1") -> BackupRecord:
    return {"id": backup_id, "volume_id": "v", "volume_name": "vg/v", "created_at": "t",
            "updated_at": "t", "data_timestamp": "t", "labels": {"k": "v"},
            "protected": False}


def _path_to(status: Status) -> list[Status]:
    """The statuses a new row goes through to reach `status` (shortest way, by the table)."""
    queue = deque([[s] for s in sorted(INITIAL)])
    while queue:
        path = queue.popleft()
        if path[-1] == status:
            return path
        queue.extend(path + [to] for to in sorted(TRANSITIONS[path[-1]]) if to not in path)
    raise AssertionError(f"{status} cannot be reached from {sorted(INITIAL)}")


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(tmp_path / "catalog.db")
    yield cat
    cat.close()


def _row_in(cat: Catalog, status: Status) -> str:
    first, *rest = _path_to(status)
    cat.insert(_record(), first)
    for to in rest:
        cat.transition("b1", to)
    assert cat.get("b1")["status"] == status
    return "b1"


def test_the_statuses_are_the_documented_strings():
    assert tuple(Status) == DOCUMENTED_STATUSES == STATUSES
    assert json.dumps({"status": Status.ERROR_DELETING}) == '{"status": "error_deleting"}'


def test_every_status_is_reachable_and_has_a_way_on():
    for status in Status:
        _path_to(status)
        assert TRANSITIONS[status], f"{status} is a dead end"


@pytest.mark.parametrize(("frm", "to"), ALLOWED, ids=lambda s: str(s))
def test_allowed_transition_is_made_with_its_fields(catalog, frm, to):
    backup_id = _row_in(catalog, frm)
    catalog.transition(backup_id, to, fail_reason="x" * 300)
    row = catalog.get(backup_id)
    assert row["status"] == to and isinstance(row["status"], str)
    assert row["fail_reason"] == "x" * 255  # still cut to Cinder's limit
    assert row["updated_at"] != "t"


@pytest.mark.parametrize(("frm", "to"), ILLEGAL, ids=lambda s: str(s))
def test_illegal_transition_raises_and_changes_nothing(catalog, frm, to):
    backup_id = _row_in(catalog, frm)
    before = catalog.get(backup_id)
    with pytest.raises(IllegalTransition, match=f"status {to} is not allowed from {frm}"):
        catalog.transition(backup_id, to, fail_reason="never written", size=1)
    assert catalog.get(backup_id) == before


def test_an_illegal_transition_is_a_bug_not_a_user_error():
    from lvbackup.base.errors import LvbackupError
    assert not issubclass(IllegalTransition, LvbackupError)


def test_an_illegal_move_inside_a_write_rolls_back_the_whole_transaction(catalog):
    _row_in(catalog, Status.AVAILABLE)
    with pytest.raises(IllegalTransition), catalog.write():
        catalog.update("b1", name="renamed")
        catalog.transition("b1", Status.DELETED)
    row = catalog.get("b1")
    assert row["name"] is None and row["status"] == Status.AVAILABLE


@pytest.mark.parametrize("status", sorted(set(Status) - INITIAL))
def test_insert_in_a_status_a_backup_cannot_start_in_is_refused(catalog, status):
    with pytest.raises(IllegalTransition, match="as a new row"):
        catalog.insert(_record(), status)
    with pytest.raises(IllegalTransition):
        catalog.put(_record(), status)
    assert catalog.find("b1") is None


@pytest.mark.parametrize("status", sorted(INITIAL))
def test_insert_takes_its_status_explicitly(catalog, status):
    catalog.insert({**_record(), "status": "deleted"}, status)
    row = catalog.get("b1")
    assert row["status"] == status and json.loads(row["labels"]) == {"k": "v"}


def test_update_never_changes_a_status(catalog):
    _row_in(catalog, Status.AVAILABLE)
    with pytest.raises(TypeError, match="transition"):
        catalog.update("b1", status=Status.DELETED)
    assert catalog.get("b1")["status"] == Status.AVAILABLE


def test_put_replaces_a_row_as_a_transition_would(catalog):
    _row_in(catalog, Status.DELETED)
    catalog.put({**_record(), "name": "revived"}, Status.AVAILABLE)
    row = catalog.get("b1")
    assert (row["status"], row["name"]) == (Status.AVAILABLE, "revived")
    catalog.put({**_record(), "name": "again"}, Status.AVAILABLE)  # no move: fields only
    assert catalog.get("b1")["name"] == "again"
    with pytest.raises(IllegalTransition):
        catalog.put(_record(), Status.CREATING)
    assert catalog.get("b1")["name"] == "again"


# --- the operations make the moves the table lists ------------------------------------------

@pytest.fixture
def moves(monkeypatch) -> list[tuple[Status | None, Status]]:
    """Every status change the catalog makes in this process: (from, to); from None for a
    new row."""
    seen: list[tuple[Status | None, Status]] = []
    insert, transition, put = Catalog.insert, Catalog.transition, Catalog.put

    def spy_insert(self: Catalog, record: Any, status: Status) -> None:
        insert(self, record, status)
        seen.append((None, status))

    def spy_transition(self: Catalog, backup_id: str, to: Status, **fields: Any) -> None:
        frm = Status(self.get(backup_id)["status"])
        transition(self, backup_id, to, **fields)
        seen.append((frm, to))

    def spy_put(self: Catalog, record: Any, status: Status) -> None:
        old = self.find(record["id"])
        put(self, record, status)
        if old is not None:  # a new row went through insert
            seen.append((Status(old["status"]), status))

    monkeypatch.setattr(Catalog, "insert", spy_insert)
    monkeypatch.setattr(Catalog, "transition", spy_transition)
    monkeypatch.setattr(Catalog, "put", spy_put)
    return seen


def _ok(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if result.stdout.strip().startswith(("{", "[")) else None


def test_create_restore_delete_cycle(invoke, moves, workdir, make_image, tmp_path):
    _ok(invoke("--json", "init", "--block-size", "64K"))
    img = tmp_path / "disk.img"
    make_image(img, 2, seed=7)
    rec = _ok(invoke("--json", "create", "--device", img))
    assert moves == [(None, Status.CREATING), (Status.CREATING, Status.AVAILABLE)]
    _ok(invoke("--json", "restore", rec["id"], "--to-file", tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == img.read_bytes()
    assert moves[2:] == [(Status.AVAILABLE, Status.RESTORING),
                         (Status.RESTORING, Status.AVAILABLE)]
    export = invoke("export-record", rec["id"])
    assert export.exit_code == 0, export.output
    deleted = _ok(invoke("--json", "delete", rec["id"]))
    assert deleted["status"] == Status.DELETED
    assert moves[4:] == [(Status.AVAILABLE, Status.DELETING),
                         (Status.DELETING, Status.DELETED)]
    # The cycle through the installed command ends where the in-process one did.
    assert [r["status"] for r in workdir.catalog_rows()] == ["deleted"]
    assert all(to in TRANSITIONS[frm] if frm else to in INITIAL for frm, to in moves)


def test_rebuild_delete_and_import(invoke, moves, workdir, make_image, tmp_path):
    _ok(invoke("--json", "init", "--block-size", "64K"))
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=8)
    rec = _ok(invoke("--json", "create", "--device", img))
    # Its manifest gone behind the catalog's back: rebuild marks it error ...
    manifest = workdir.repo / "manifests" / rec["id"]
    hidden = manifest.read_bytes()
    manifest.unlink()
    _ok(invoke("--json", "catalog", "rebuild"))
    assert moves[-1] == (Status.AVAILABLE, Status.ERROR)
    # ... and makes it available again once the manifest is back.
    manifest.write_bytes(hidden)
    _ok(invoke("--json", "catalog", "rebuild"))
    assert moves[-1] == (Status.ERROR, Status.AVAILABLE)
    exported = tmp_path / "record"
    exported.write_text(invoke("export-record", rec["id"]).stdout)
    _ok(invoke("--json", "delete", rec["id"]))
    # import-record revives the deleted row once its manifest is in the repository again.
    manifest.write_bytes(hidden)
    imported = _ok(invoke("--json", "import-record", exported))
    assert imported["status"] == Status.AVAILABLE
    assert moves[-3:] == [(Status.AVAILABLE, Status.DELETING),
                          (Status.DELETING, Status.DELETED),
                          (Status.DELETED, Status.AVAILABLE)]
    assert all(to in TRANSITIONS[frm] if frm else to in INITIAL for frm, to in moves)


@pytest.mark.parametrize(("point", "settled"), [("index-written", Status.ERROR),
                                                 ("manifest-written", Status.AVAILABLE)])
def test_recovery_of_a_dead_backup(invoke, moves, workdir, make_image, tmp_path, point, settled):
    workdir.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=9)
    assert workdir.run("create", "--device", img, env={"LVBACKUP_FAULT": point}).returncode != 0
    invoke("verify")  # any command that recovers dead runs
    assert moves == [(Status.CREATING, settled)]


def test_recovery_of_a_dead_delete_then_forced_retry(invoke, moves, workdir, make_image,
                                                     tmp_path):
    workdir.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=10)
    bid = workdir.create(img)["id"]
    assert workdir.run("delete", bid, env={"LVBACKUP_FAULT": "delete-marked"}).returncode != 0
    assert invoke("delete", bid).exit_code != 0  # error_deleting needs --force
    assert moves == [(Status.DELETING, Status.ERROR_DELETING)]
    _ok(invoke("--json", "delete", "--force", bid))
    assert moves[1:] == [(Status.ERROR_DELETING, Status.DELETING),
                         (Status.DELETING, Status.DELETED)]
