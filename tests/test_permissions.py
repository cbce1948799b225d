"""What lvbackup creates is its owner's alone (0700 directories, 0600 files; metrics 0644
for the node_exporter), and what other users can write is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from support import Workdir, assert_one_line_error, describe, make_image, write_config


def _modes(root: Path) -> dict[str, int]:
    return {str(p): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def test_everything_created_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"           # made by lvbackup, parents included
    os.umask(0o022)
    cfg = write_config(tmp_path / "c.yaml", state / "repo", state / "db" / "catalog.db",
                       event_log=str(state / "log" / "events.jsonl"),
                       metrics=str(tmp_path / "textfile" / "lvbackup.prom"))
    wd = Workdir(tmp_path)
    assert wd.run("init", "--block-size", "64K", config=cfg).returncode == 0
    make_image(tmp_path / "img", 2, seed=1)
    rec = wd.create(tmp_path / "img", config=cfg)
    p = wd.run("restore", rec["id"], "--to-file", tmp_path / "out.img", config=cfg)
    assert p.returncode == 0, describe(p)
    modes = _modes(state)
    assert len(modes) > 20 and any("cache" in m for m in modes) and any(
        m.endswith("events.jsonl") for m in modes)
    for path, mode in modes.items():
        want = 0o700 if Path(path).is_dir() else 0o600
        assert mode == want, f"{path} has mode {oct(mode)}, not {oct(want)}"
    assert stat.S_IMODE((tmp_path / "out.img").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "textfile" / "lvbackup.prom").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "textfile").stat().st_mode) == 0o755


def test_what_others_can_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    cfg = write_config(tmp_path / "etc" / "lvbackup.yaml", tmp_path / "repo",
                       tmp_path / "db" / "catalog.db")
    wd = Workdir(tmp_path)
    assert wd.run("init", "--block-size", "64K", config=cfg).returncode == 0
    for path, what in ((tmp_path / "repo", "repository directory"),
                       (tmp_path / "db", "catalog directory"),
                       (tmp_path / "db" / "catalog.db", "catalog"),
                       (cfg, "configuration file"), (cfg.parent, "configuration directory")):
        mode = stat.S_IMODE(path.stat().st_mode)
        os.chmod(path, mode | 0o002)
        p = wd.run("verify", config=cfg)
        line = assert_one_line_error(p, 2, what, str(path), "chmod go-w")
        assert "other users" in line
        os.chmod(path, mode)
        assert wd.run("verify", config=cfg).returncode == 0


def test_a_sticky_shared_directory_is_accepted(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    wd = Workdir(tmp_path / "w")
    cfg = wd.config_with("sticky.yaml")
    text = cfg.read_text().replace(str(wd.catalog), str(shared / "catalog.db"))
    cfg.write_text(text)
    p = wd.run("init", "--block-size", "64K", config=cfg)
    assert p.returncode == 0, describe(p)
    assert stat.S_IMODE((shared / "catalog.db").stat().st_mode) == 0o600
