"""append_only: true: delete, prune and gc refuse, and the storage under it never deletes
or replaces an object, so a host cannot destroy its past backups."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvbackup.repository.backends import LocalBackend
from lvbackup.repository.backends.appendonly import AppendOnlyBackend, AppendOnlyError

from support import Workdir, assert_one_line_error, describe, make_image


def _snapshot(wd: Workdir) -> dict[str, bytes]:
    return {p.relative_to(wd.repo).as_posix(): p.read_bytes()
            for p in wd.repo.rglob("*") if p.is_file()}


def test_delete_prune_and_gc_refuse(tmp_path: Path) -> None:
    wd = Workdir(tmp_path, append_only=True)
    wd.init()
    make_image(tmp_path / "img", 2, seed=1)
    first = wd.create(tmp_path / "img")
    second = wd.create(tmp_path / "img")
    before = _snapshot(wd)
    for args in (["delete", first["id"]], ["delete", second["id"], "--force"],
                 ["prune", "--keep-last", "1"], ["prune", "--keep-last", "1", "-n"], ["gc"]):
        p = wd.run(*args)
        assert_one_line_error(p, 2, "append_only")
    assert _snapshot(wd) == before
    assert {r["status"] for r in wd.list()} == {"available"}
    # A configuration without append_only may delete (the repository is not marked).
    open_cfg = wd.config_with("open.yaml")
    p = wd.run("delete", second["id"], config=open_cfg)
    assert p.returncode == 0, describe(p)


def test_a_job_with_retention_is_refused_in_append_only_mode(tmp_path: Path) -> None:
    wd = Workdir(tmp_path, append_only=True,
                 jobs={"j": {"device": str(tmp_path / "img"), "keep": {"last": 2}}})
    p = wd.run("config", "check")
    assert_one_line_error(p, 2, "append_only", "keep")


def test_the_backend_never_deletes_nor_replaces(tmp_path: Path) -> None:
    inner = LocalBackend.open(tmp_path / "r", create=True)
    store = AppendOnlyBackend(inner)
    store.put("packs/aa/x", b"one")
    store.put_content_addressed("packs/aa/x", b"one")        # the same bytes: done
    with pytest.raises(AppendOnlyError, match="forbids replacing"):
        store.put_content_addressed("packs/aa/x", b"two")
    with pytest.raises(AppendOnlyError, match="cannot be deleted"):
        store.delete("packs/aa/x")
    assert inner.get("packs/aa/x") == b"one"
    assert store.capabilities == inner.capabilities
    store.close()
