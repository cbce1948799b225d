"""prune at catalog scale: thousands of backups removed in one run, dry and real."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lvbackup.config import load_config
from lvbackup.operations.create import create_backup, select_source
from lvbackup.session import Session

from support import Workdir, describe

BACKUPS = 2000


@pytest.fixture
def many_backups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Workdir, list[str]]:
    """BACKUPS backups of a small image, made in this process (the command would spend its
    start-up time on each): fulls and incrementals, every tenth a full."""
    monkeypatch.delenv("LVBACKUP_PASSPHRASE", raising=False)
    wd = Workdir(tmp_path / "wd")
    wd.init(block_size="4K")
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(3).randbytes(64 * 1024))
    session = Session(load_config(wd.config))
    try:
        if session.repo.encrypted:
            pytest.fail("this test opens the repository without a passphrase")
        source, name = select_source(session.config, device=str(image))
        ids = [create_backup(session, source, incremental=i % 10 != 0,
                             source_name=name).record["id"] for i in range(BACKUPS)]
    finally:
        session.close()
    return wd, ids


@pytest.mark.slow
def test_prune_removes_thousands_of_backups_dry_and_real(many_backups) -> None:
    wd, ids = many_backups
    dry = wd.run_json("prune", "--keep-last", "1", "-n")
    assert len(dry["remove"]) == BACKUPS - 1
    assert [k["id"] for k in dry["keep"]] == [ids[-1]]
    # The newest is an incremental whose chain is re-parented onto what is kept.
    assert len(wd.list()) == BACKUPS
    real = wd.run_json("prune", "--keep-last", "1")
    assert sorted(real["deleted"]) == sorted(r["id"] for r in dry["remove"])
    left = wd.list()
    assert [r["id"] for r in left] == [ids[-1]]
    p = wd.verify("--deep")
    assert p.returncode == 0, describe(p)
