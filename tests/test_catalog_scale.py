"""Catalogs of thousands of backups: `show` of a chain of 1,000 prints it compactly from one
query, `list` of 10,000 prints every row in a table that fits, with as many catalog queries
as for ten. (How fast is measured by bench/scale.py, not asserted here.)"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lvbackup.base.lifecycle import Status
from lvbackup.base.timeutil import iso
from lvbackup.catalog.catalog import Catalog
from lvbackup.config import load_config
from lvbackup.operations.records import list_backups, show_backup
from lvbackup.session import Session

from support import Workdir, describe


def add_backups(catalog: Path, n: int, per_chain: int, seed: int = 5) -> list[str]:
    """`n` available backups of one volume straight into the catalog, in chains of
    `per_chain` (a full backup, then incrementals each on the one before)."""
    rng = random.Random(seed)
    cat = Catalog(catalog)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids: list[str] = []
    try:
        with cat.write():
            for i in range(n):
                full = i % per_chain == 0
                ts = iso(start + timedelta(minutes=i))
                ids.append(str(uuid.UUID(int=rng.getrandbits(128), version=4)))
                cat.insert({"id": ids[-1], "volume_id": "vol-1", "volume_name": "vg0/data",
                            "name": f"backup {i}", "parent_id": None if full else ids[-2],
                            "is_incremental": not full, "data_timestamp": ts,
                            "created_at": ts, "updated_at": ts, "size": 1 << 30,
                            "block_size": 128 << 10, "stored_bytes": 1 << 20,
                            "num_dependent_backups": int((i + 1) % per_chain != 0)},
                           Status.AVAILABLE)
    finally:
        cat.close()
    return ids


@pytest.fixture
def wd(tmp_path: Path) -> Workdir:
    wd = Workdir(tmp_path / "wd")
    wd.init("4K")
    return wd


@contextmanager
def counted_queries(session: Session) -> Iterator[list[str]]:
    """The SELECT statements the catalog's connection runs meanwhile."""
    seen: list[str] = []
    conn = session.catalog._db.conn
    conn.set_trace_callback(lambda sql: seen.append(sql)
                            if sql.lstrip().upper().startswith(("SELECT", "WITH")) else None)
    try:
        yield seen
    finally:
        conn.set_trace_callback(None)


def show_queries(wd: Workdir, backup_id: str) -> tuple[int, int]:
    """(catalog queries of `show`, length of the chain it returned)."""
    session = Session(load_config(wd.config))
    try:
        with counted_queries(session) as seen:
            _, lineage, _ = show_backup(session, backup_id)
        return len(seen), len(lineage)
    finally:
        session.close()


def test_show_reads_a_chain_of_1000_in_as_many_queries_as_a_chain_of_3(wd):
    short = add_backups(wd.catalog, 3, per_chain=3, seed=1)
    long = add_backups(wd.catalog, 1000, per_chain=1000, seed=2)
    queries_short, length_short = show_queries(wd, short[-1])
    queries_long, length_long = show_queries(wd, long[-1])
    assert (length_short, length_long) == (3, 1000)
    assert queries_long == queries_short


def test_show_prints_a_long_chain_compactly_and_json_keeps_all_of_it(wd):
    ids = add_backups(wd.catalog, 1000, per_chain=1000)
    p = wd.run("show", ids[-1], env={"COLUMNS": "80"})
    assert p.returncode == 0, describe(p)
    lines = p.stdout.splitlines()
    assert "chain back to the full backup: 1000 backups" in lines
    assert len(lines) < 45, describe(p)
    assert all(len(line) <= 80 for line in lines)
    shown = [bid for bid in ids if any(line.startswith(bid[:8]) for line in lines)]
    # this backup and its four nearest ancestors, then the full backup
    assert shown == [ids[0], *ids[-5:]]
    assert any("994 more" in line for line in lines)
    chain = wd.run_json("show", ids[-1], "--chain")
    assert [r["id"] for r in chain] == ids[::-1]


def test_show_of_a_short_chain_lists_every_backup(wd):
    ids = add_backups(wd.catalog, 6, per_chain=6)
    p = wd.run("show", ids[-1])
    assert p.returncode == 0, describe(p)
    assert "more" not in p.stdout and "6 backups" in p.stdout
    assert all(bid[:8] in p.stdout for bid in ids)


def test_show_stops_at_a_parent_the_catalog_lacks_and_at_a_cycle(wd):
    ids = add_backups(wd.catalog, 4, per_chain=4)
    session = Session(load_config(wd.config))
    try:
        cat = session.catalog
        cat.update(ids[1], parent_id="0" * 8)   # ids[0] is no longer in the chain
        assert [r["id"] for r in cat.chain(ids[3])] == ids[:0:-1]
        cat.update(ids[1], parent_id=ids[3])    # a loop, as only a damaged catalog has
        assert [r["id"] for r in cat.chain(ids[3])] == ids[:0:-1]
    finally:
        session.close()
    p = wd.run("show", ids[3])
    assert p.returncode == 0, describe(p)


@pytest.mark.slow
def test_list_of_10000_backups_prints_every_row_with_a_constant_number_of_queries(wd):
    def list_queries() -> tuple[int, int]:
        session = Session(load_config(wd.config))
        try:
            with counted_queries(session) as seen:
                rows = list_backups(session)
            return len(seen), len(rows)
        finally:
            session.close()

    ids = add_backups(wd.catalog, 10, per_chain=100, seed=1)
    few, n = list_queries()
    assert n == 10
    ids += add_backups(wd.catalog, 9990, per_chain=100, seed=2)
    assert list_queries() == (few, 10000)
    p = wd.run("list", env={"COLUMNS": "80"})
    assert p.returncode == 0, describe(p)
    lines = p.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    rows = [line for line in lines if line[:8] in {bid[:8] for bid in ids}]
    assert len(rows) == 10000
