"""verify --deep --sample PERCENT and --max-duration: a part of the chunks per run, every
chunk once per cycle, the position kept in the cache directory between runs."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import pytest

from lvbackup.base.errors import EXIT_DAMAGED
from lvbackup.operations.sweep import SPACE, Position

from support import Workdir, apply_change, assert_one_line_error, describe, make_image


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Workdir, list[str]]:
    """A repository of about a thousand 4 KiB chunks in a dozen packs: a full backup and
    incrementals (each run writes packs of its own)."""
    root = tmp_path_factory.mktemp("sampled")
    wd = Workdir(root / "wd")
    wd.init("4K")
    image = root / "disk.img"
    make_image(image, 3, seed=71)
    ids = [wd.create(image)["id"]]
    for seed in range(72, 82):
        apply_change(image, seed=seed, fraction=0.02)
        ids.append(wd.create(image, "--incremental")["id"])
    return wd, ids


@pytest.fixture
def wd(pristine, tmp_path) -> Workdir:
    return pristine[0].clone(tmp_path / "wd")


def chunks_by_pack(wd: Workdir) -> dict[int, int]:
    """{pack id as an integer: how many indexed chunks it holds} (from the index cache)."""
    db = sqlite3.connect(f"file:{wd.cache_db()}?mode=ro", uri=True)
    try:
        return {int.from_bytes(p, "big"): n for p, n in db.execute(
            "SELECT p.id, count(*) FROM chunks c JOIN packs p ON p.n = c.pack GROUP BY p.id")}
    finally:
        db.close()


def state_file(wd: Workdir) -> Path:
    found = sorted(wd.cache.glob("verify-*.json"))
    assert len(found) == 1, found
    return found[0]


def test_four_runs_of_25_percent_read_every_chunk_exactly_once(wd):
    runs = [wd.run_json("verify", "--deep", "--sample", "25") for _ in range(4)]
    packs = chunks_by_pack(wd)
    total = sum(packs.values())
    quarter = SPACE // 4
    for k, r in enumerate(runs):
        assert r["ok"] is True and r["deep"] is True
        assert r["chunks_total"] == total > 500
        # Run k read exactly the chunks of the packs whose ids lie in the k-th quarter.
        assert r["chunks_checked"] == sum(n for p, n in packs.items()
                                          if k * quarter <= p < (k + 1) * quarter)
        assert r["cycle"]["number"] == 1
        assert r["cycle"]["done_percent"] == 25 * (k + 1)
        assert r["cycle"]["out_of_time"] is False
        assert all(b["ok"] for b in r["backups"]) and len(r["backups"]) == 11  # manifests
    assert sum(r["chunks_checked"] for r in runs) == total
    assert len({r["cycle"]["started_at"] for r in runs}) == 1
    # The position is a private file of the cache directory; the fifth run starts cycle 2.
    assert stat.S_IMODE(state_file(wd).stat().st_mode) == 0o600
    fifth = wd.run_json("verify", "--deep", "--sample", "25")
    assert fifth["cycle"]["number"] == 2 and fifth["cycle"]["done_percent"] == 25
    assert fifth["chunks_checked"] == runs[0]["chunks_checked"]
    # Every chunk has been read: the oldest unverified chunk was read in cycle 1.
    assert fifth["cycle"]["oldest_unverified_at"] > runs[0]["cycle"]["started_at"]


def test_the_metric_reports_the_oldest_unverified_chunk(wd):
    prom = wd.path / "lvbackup.prom"
    wd.run_json("verify", "--deep", "--sample", "50",
                config=wd.config_with("metrics.yaml", metrics=str(prom)))
    text = prom.read_text()
    line = next(ln for ln in text.splitlines()
                if ln.startswith("lvbackup_verify_oldest_unverified_age_seconds{"))
    assert f'repository="{wd.repo}"' in line
    assert 0 <= float(line.split()[-1]) < 3600
    assert "lvbackup_verify_oldest_unverified_timestamp_seconds{" in text


def test_max_duration_reads_less_and_the_next_run_goes_on(wd):
    total = sum(chunks_by_pack(wd).values())
    first = wd.run_json("verify", "--deep", "--max-duration", "0.001s")
    assert first["cycle"]["out_of_time"] is True
    assert 0 < first["chunks_checked"] < total
    assert 0 < first["cycle"]["done_percent"] < 100
    rest = wd.run_json("verify", "--deep", "--max-duration", "1h")
    assert rest["cycle"]["out_of_time"] is False and rest["cycle"]["done_percent"] == 100
    assert first["chunks_checked"] + rest["chunks_checked"] == total
    assert rest["cycle"]["number"] == 1


def test_sample_and_budget_combine(wd):
    r = wd.run_json("verify", "--deep", "--sample", "50", "--max-duration", "0.001s")
    assert r["cycle"]["out_of_time"] is True and r["cycle"]["done_percent"] < 50
    r2 = wd.run_json("verify", "--deep", "--sample", "50")
    assert r2["cycle"]["done_percent"] > 50   # a share onwards from where the last stopped


def test_a_lost_position_starts_a_new_cycle(wd):
    wd.run_json("verify", "--deep", "--sample", "25")
    state_file(wd).write_text("{not json")
    r = wd.run_json("verify", "--deep", "--sample", "25")
    assert r["cycle"]["number"] == 1 and r["cycle"]["done_percent"] == 25


def _flip_a_chunk(wd: Workdir) -> tuple[int, bytes]:
    """Damage one chunk of the pack holding the most (the full backup's data); returns
    (the pack's id as an integer, the chunk's id). Read from the index cache, which needs
    no key in an encrypted repository."""
    packs = chunks_by_pack(wd)
    pack = max(packs, key=lambda p: packs[p]).to_bytes(32, "big")
    db = sqlite3.connect(f"file:{wd.cache_db()}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT c.id, c.offset, c.length FROM chunks c JOIN packs p "
                          "ON p.n = c.pack WHERE p.id = ? ORDER BY c.offset", (pack,)).fetchall()
    finally:
        db.close()
    chunk, offset, length = rows[len(rows) // 2]
    path = wd.repo / "packs" / pack.hex()[:2] / pack.hex()
    data = bytearray(path.read_bytes())
    data[offset + length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return int.from_bytes(pack, "big"), chunk


def test_a_damaged_chunk_in_the_slice_is_found_and_quarantined(wd, pristine):
    where, chunk = _flip_a_chunk(wd)
    slice_of = where // (SPACE // 4)
    for k in range(4):
        p = wd.run("--json", "verify", "--deep", "--sample", "25")
        if k < slice_of:
            assert p.returncode == 0, describe(p)
            continue
        if k == slice_of:
            assert_one_line_error(p, EXIT_DAMAGED, "verify found damage", pristine[1][0][:8])
            r = json.loads(p.stdout)
            bad = [b for b in r["backups"] if not b["ok"]]
            assert bad and "block " in bad[0]["error"]
            assert chunk.hex() in bad[0]["error"]
            assert any(chunk.hex() in e for e in r["index_errors"])
            assert any(n.startswith(f"damaged/{chunk.hex()}") for n in wd.files("damaged"))
            break


@pytest.mark.parametrize("args", [
    ["--sample", "0"], ["--sample", "101"], ["--sample", "-1"], ["--sample", "abc"],
    ["--max-duration", "abc"], ["--max-duration", "0"], ["--max-duration", "-5s"],
    ["--max-duration", "10x"],
])
def test_bad_arguments_exit_2_in_one_line(wd, args):
    p = wd.run("verify", "--deep", *args)
    assert_one_line_error(p, 2, args[0])
    assert not list(wd.cache.glob("verify-*.json"))


def test_a_backup_id_with_sample_is_refused(wd, pristine):
    p = wd.run("verify", pristine[1][0], "--deep", "--sample", "10")
    assert_one_line_error(p, 2, "--sample")


def test_position_records_when_each_range_was_read():
    pos = Position(started_at=100.0)
    assert pos.oldest_unverified() == 100.0          # nothing read yet
    pos.covered(0, SPACE // 2, 110.0)
    pos.covered(SPACE // 2, SPACE, 120.0)
    assert pos.oldest_unverified() == 110.0
    pos.covered(0, SPACE // 4, 130.0)                 # the next cycle's first quarter
    assert pos.checked == [(SPACE // 4, 130.0), (SPACE // 2, 110.0), (SPACE, 120.0)]
    assert pos.oldest_unverified() == 110.0
    pos.covered(SPACE // 4, 3 * SPACE // 8, 140.0)    # a run stopped inside a range
    assert pos.checked == [(SPACE // 4, 130.0), (3 * SPACE // 8, 140.0),
                           (SPACE // 2, 110.0), (SPACE, 120.0)]
