"""Why a catalog or index cache cannot be opened, told so that the user can act on it.
(The real case, a 9p mount without shared mmap, is tests/lvm/test_filesystems.py.)"""

from __future__ import annotations

import sqlite3

from lvbackup import sqlitefile
from lvbackup.errors import EXIT_FAILED, EXIT_USAGE


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
