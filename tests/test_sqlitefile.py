"""Why a catalog or index cache cannot be opened, told so that the user can act on it.
(The real case, a 9p mount without shared mmap, is tests/lvm/test_filesystems.py.)"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from lvbackup.base import sqlitefile
from lvbackup.base.errors import EXIT_FAILED, EXIT_USAGE, LvbackupError
from lvbackup.base.lifecycle import Status
from lvbackup.catalog.catalog import Catalog


def _ioerror() -> sqlite3.OperationalError:
    e = sqlite3.OperationalError("disk I/O error")
    e.sqlite_errorname = "SQLITE_IOERR_SHMMAP"  # type: ignore[attr-defined]
    return e


def test_shared_mmap_works_on_a_local_directory(tmp_path):
    assert sqlitefile.shared_mmap_works(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_io_error_without_shared_mmap_names_the_path_and_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlitefile, "shared_mmap_works", lambda d: False)
    err = sqlitefile.open_error(_ioerror(), tmp_path / "c.db", "catalog", "catalog:", "")
    assert err.exit_code == EXIT_USAGE
    assert str(tmp_path / "c.db") in str(err) and "set catalog: to a local filesystem" in str(err)


def test_io_error_with_shared_mmap_is_a_plain_failure(tmp_path):
    err = sqlitefile.open_error(_ioerror(), tmp_path / "c.db", "catalog", "catalog:", "; advice")
    assert err.exit_code == EXIT_FAILED
    assert str(err).endswith("disk I/O error; advice")


def test_no_room_turns_a_full_or_read_only_filesystem_into_one_line(tmp_path):
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        err = sqlitefile.no_room(OSError(code, os.strerror(code), str(tmp_path / "x")), "gc")
        assert err is not None and err.exit_code == EXIT_FAILED
        assert str(err).startswith(f"gc failed: {os.strerror(code)} ({tmp_path / 'x'})")
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
    assert "database or disk is full" in str(sqlitefile.no_room(full, "copy to x"))
    assert sqlitefile.no_room(OSError(errno.EIO, "Input/output error"), "gc") is None
    assert sqlitefile.no_room(_ioerror(), "gc") is None


def test_a_read_only_catalog_reads_without_its_shm_and_refuses_writes(tmp_path):
    """Opened read-only (a full or read-only filesystem): with an empty write-ahead log it
    needs no -shm file at all, and every write says why it cannot be made."""
    path = tmp_path / "catalog.db"
    cat = Catalog(path)
    cat.insert({"id": "b1", "volume_id": "v", "data_timestamp": "t", "created_at": "t",
                "updated_at": "t"}, Status.AVAILABLE)
    cat.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    ro = Catalog(path, read_only=True)
    assert [r["id"] for r in ro.list()] == ["b1"] and not ro.empty()
    for write in (lambda: ro.transition("b1", Status.RESTORING),
                  lambda: ro.update("b1", name="x"), lambda: ro.refresh_dependents("b1")):
        with pytest.raises(LvbackupError, match="cannot be written: its filesystem"):
            write()
    ro.close()
    with pytest.raises(LvbackupError, match="cannot open catalog"):
        Catalog(tmp_path / "absent.db", read_only=True)
    # Nothing made beside it (no -wal, no -shm): what a full filesystem could not give.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.db"]
