"""gc updates the index cache for what it changed, without fetching the index again: the
cache it leaves holds exactly what a cache built anew from the repository holds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from support import Workdir, apply_change, describe, make_image


def cached_entries(wd: Workdir) -> set[tuple[bytes, bytes, int, int]]:
    (path,) = wd.cache.glob("index-*.sqlite")
    with sqlite3.connect(path) as db:
        return set(db.execute("SELECT c.id, p.id, c.offset, c.length FROM chunks c "
                              "JOIN packs p ON p.n = c.pack WHERE p.indexed = 1"))


def test_the_cache_gc_leaves_is_the_cache_built_anew(tmp_path: Path) -> None:
    wd = Workdir(tmp_path / "wd")
    wd.init()
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 8, seed=1)
    data_b = make_image(b, 8, seed=2)
    first = wd.create(a)
    wd.create(b)
    apply_change(a, seed=3, fraction=0.5)
    last = wd.create(a)
    assert wd.run("delete", first["id"]).returncode == 0
    stats = wd.run_json("gc")
    assert stats["packs_repacked"] > 0, stats   # both kinds of change gc makes
    after_gc = cached_entries(wd)
    assert after_gc
    for f in wd.cache.glob("index-*.sqlite*"):
        f.unlink()
    p = wd.verify("--deep")
    assert p.returncode == 0, describe(p)
    assert cached_entries(wd) == after_gc
    assert wd.restore_bytes(last["id"]) == a.read_bytes()
    assert wd.restore_bytes(wd.list()[0]["id"]) == data_b
