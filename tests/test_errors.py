"""Bad input: exit 2 (75 for a lock), exactly one line on stderr, no traceback, and nothing
already stored is harmed (an earlier backup still verifies --deep and restores bit-exactly).
"""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from support import Workdir, assert_one_line_error, describe, make_image, write_config

NO_PARENT = "No backups available to do an incremental backup."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A repository with one backup; tests work on clones of it."""
    root = tmp_path_factory.mktemp("errors")
    img = root / "disk.img"
    data = make_image(img, 4, seed=51, tail=999)
    wd = Workdir(root / "wd")
    wd.init("64K")
    rec = wd.create(img)
    return wd, img, data, rec["id"]


@pytest.fixture
def env(base, tmp_path):
    wd, img, data, bid = base
    return wd.clone(tmp_path / "wd"), img, data, bid


def unharmed(wd: Workdir, bid: str, data: bytes) -> None:
    rows = wd.catalog_rows()
    assert [(r["id"], r["status"]) for r in rows] == [(bid, "available")], rows
    wd.assert_intact({bid: data})


# --- sources -------------------------------------------------------------------------------

def test_missing_device(env, tmp_path):
    wd, _, data, bid = env
    p = wd.run("create", "--device", tmp_path / "no-such.img")
    assert_one_line_error(p, 2, "no-such.img", "does not exist")
    unharmed(wd, bid, data)


def test_device_that_is_a_directory(env, tmp_path):
    wd, _, data, bid = env
    p = wd.run("create", "--device", tmp_path)
    assert_one_line_error(p, 2, str(tmp_path))
    unharmed(wd, bid, data)


def test_device_that_is_a_fifo(env, tmp_path):
    wd, _, data, bid = env
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_one_line_error(wd.run("create", "--device", fifo, timeout=30), 2, "fifo")
    unharmed(wd, bid, data)


def test_create_volume_without_its_vg_hints_vg_lv(env):
    """`--volume data` is read as an LV UUID (prefix); the error says how to name an LV."""
    wd, _, data, bid = env
    p = wd.run("create", "--volume", "data")
    assert_one_line_error(p, 2, "no logical volume has UUID data", "VG/LV", "vg0/data")
    unharmed(wd, bid, data)


def test_create_with_no_source(env):
    wd, _, data, bid = env
    assert_one_line_error(wd.run("create"), 2, "--device")
    assert_one_line_error(wd.run("create", "--incremental"), 2)
    unharmed(wd, bid, data)


def test_incremental_with_no_previous_backup(env, tmp_path):
    wd, _, data, bid = env
    img = tmp_path / "new.img"
    make_image(img, 1, seed=52)
    p = wd.run("create", "--device", img, "--incremental")
    assert_one_line_error(p, 2, NO_PARENT)
    # No row was left behind for the refused backup.
    assert len(wd.catalog_rows()) == 1
    unharmed(wd, bid, data)


def test_incremental_when_every_backup_is_deleted(env):
    wd, img, data, bid = env
    wd.run_json("delete", bid)
    assert_one_line_error(wd.run("create", "--device", img, "--incremental"), 2, NO_PARENT)


# --- ids -----------------------------------------------------------------------------------

def test_unknown_id(env):
    wd, _, data, bid = env
    unknown = ("0" if bid[0] != "0" else "1") + "bcdef00-0000-4000-8000-000000000000"
    for command in (("show",), ("restore", "--to-file", "-"), ("delete",), ("verify",),
                    ("export-record",), ("verify", "--deep")):
        p = wd.run(command[0], unknown, *command[1:])
        assert_one_line_error(p, 2, "not found")
        assert p.stdout == ""
    # SQL wildcards in a prefix are literal characters, not "any backup".
    for pattern in ("%", "_", bid[:4] + "%"):
        assert_one_line_error(wd.run("show", pattern), 2, "not found")
    unharmed(wd, bid, data)


@pytest.fixture(scope="module")
def ambiguous(tmp_path_factory):
    """A repository in which two backup ids share their first character."""
    root = tmp_path_factory.mktemp("ambiguous")
    img = root / "tiny.img"
    data = make_image(img, 1, seed=53)
    wd = Workdir(root / "wd")
    wd.init("64K")
    ids = []
    for _ in range(17):  # 17 ids over 16 hex digits: a shared first character is certain
        ids.append(wd.create(img)["id"])
        firsts = [i[0] for i in ids]
        if len(set(firsts)) < len(firsts):
            break
    first = next(c for c in firsts if firsts.count(c) > 1)
    return wd, data, ids, first


def test_ambiguous_prefix(ambiguous):
    wd, data, ids, first = ambiguous
    for command in (("show",), ("restore", "--to-file", "-"), ("delete",),
                    ("export-record",)):
        p = wd.run(command[0], first, *command[1:])
        assert_one_line_error(p, 2, "ambiguous")
        assert p.stdout == ""
    assert [r["status"] for r in wd.catalog_rows()] == ["available"] * len(ids)
    wd.assert_intact({ids[-1]: data})


# --- configuration -------------------------------------------------------------------------

def test_bad_config_files(env, tmp_path):
    wd, _, data, bid = env
    cases = [("malformed.yaml", "repository: [unclosed\ncatalog: x\n", "YAML"),
             ("list.yaml", "- just\n- a list\n", "mapping"),
             ("tabs.yaml", "repository:\t\t- x\n  : :\n", "YAML")]
    for name, text, word in cases:
        cfg = tmp_path / name
        cfg.write_text(text)
        assert_one_line_error(wd.run("list", config=cfg), 2, name, word)
    p = wd.run("list", config=tmp_path / "nowhere.yaml")
    assert_one_line_error(p, 2, "nowhere.yaml", "not found")
    unharmed(wd, bid, data)


def test_unknown_config_key(env, tmp_path):
    wd, img, data, bid = env
    cfg = write_config(tmp_path / "bad.yaml", wd.repo, wd.catalog, compresion_level=3)
    for args in (("list",), ("init",), ("create", "--device", img)):
        assert_one_line_error(wd.run(*args, config=cfg), 2, "compresion_level")
    unharmed(wd, bid, data)


BAD_VALUES = [("workers", -1), ("workers", 0), ("workers", "two"), ("workers", True),
              ("compression_level", 99), ("compression_level", 1.5), ("repository", ""),
              ("catalog", 5), ("cache_dir", ["a", "b"])]


def test_bad_config_value_names_the_key(env, tmp_path):
    wd, img, data, bid = env
    for key, value in BAD_VALUES:
        settings = {"repository": str(wd.repo), "catalog": str(wd.catalog), key: value}
        cfg = tmp_path / f"bad-{key}.yaml"
        cfg.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
        p = wd.run("create", "--device", img, config=cfg)
        assert_one_line_error(p, 2, f"'{key}'")
    unharmed(wd, bid, data)


def test_empty_config_file_means_defaults(env, tmp_path):
    """An empty file is valid YAML (defaults apply); `config check` says so and exits 0."""
    wd, _, data, bid = env
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    p = wd.run("--json", "config", "check", config=cfg)
    assert p.returncode == 0, describe(p)
    assert "/var/lib/lvbackup" in p.stdout


# --- repository location ----------------------------------------------------------------

def test_repository_under_a_regular_file(env, tmp_path):
    wd, img, data, bid = env
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    cfg = write_config(tmp_path / "c.yaml", blocker / "repo", tmp_path / "cat.db")
    assert_one_line_error(wd.run("init", config=cfg), 2, str(blocker / "repo"))
    assert_one_line_error(wd.run("create", "--device", img, config=cfg), 2)
    assert blocker.read_text() == "not a directory"
    unharmed(wd, bid, data)


# Regression test for BUG cache-dir-oserror: a cache directory (catalog's parent/cache) that
# cannot be created gives 'internal error: NotADirectoryError' (exit 1) instead of a usage
# error
def test_catalog_under_a_regular_file(env, tmp_path):
    wd, img, data, bid = env
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "repo", blocker / "cat.db")
    p = wd.run("init", config=cfg)
    line = assert_one_line_error(p, 2, str(blocker))
    assert "internal error" not in line
    unharmed(wd, bid, data)


def test_repository_not_initialised(env, tmp_path):
    wd, img, data, bid = env
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "nothing-here", wd.catalog)
    for args in (("create", "--device", img), ("verify",), ("gc",),
                 ("restore", bid, "--to-file", "-")):
        p = wd.run(*args, config=cfg)
        assert_one_line_error(p, 2, "lvbackup init")
    assert not (tmp_path / "nothing-here" / "config").exists()
    unharmed(wd, bid, data)


# --- restore targets ------------------------------------------------------------------------

def test_restore_to_a_directory(env, tmp_path):
    wd, _, data, bid = env
    assert_one_line_error(wd.run("restore", bid, "--to-file", tmp_path), 2, "directory")
    assert_one_line_error(wd.run("restore", bid, "--to", tmp_path), 2, "directory")
    unharmed(wd, bid, data)


def test_restore_to_a_missing_device(env, tmp_path):
    wd, _, data, bid = env
    p = wd.run("restore", bid, "--to", tmp_path / "no-such-device")
    assert_one_line_error(p, 2, "does not exist")
    assert not (tmp_path / "no-such-device").exists()
    unharmed(wd, bid, data)


def test_restore_into_a_missing_directory(env, tmp_path):
    wd, _, data, bid = env
    p = wd.run("restore", bid, "--to-file", tmp_path / "no" / "such" / "dir" / "x.img")
    assert_one_line_error(p, 2)
    unharmed(wd, bid, data)


# --- locks (exit 75) ------------------------------------------------------------------------

def test_locked_repository_exits_75(env):
    wd, img, data, bid = env
    lock = wd.cache / "locks" / "repository.lock"
    assert lock.exists()
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # as gc holds it
        assert_one_line_error(wd.run("create", "--device", img), 75, "locked")
        assert_one_line_error(wd.run("create", "--device", img, "--wait", "0.3"), 75)
        assert_one_line_error(wd.run("restore", bid, "--to-file", "-"), 75)
        fcntl.flock(fd, fcntl.LOCK_SH)   # as a running backup holds it
        assert_one_line_error(wd.run("gc"), 75, "locked")
    finally:
        os.close(fd)
    assert len(wd.catalog_rows()) == 1, "a refused run must leave no row"
    unharmed(wd, bid, data)
