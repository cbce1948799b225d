"""Events (Cinder's notifications, docs/lineage.md rule 21): the event log, and hooks that
get each event's JSON on stdin, are reported when they fail or hang, and never change the
result of the operation."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from support import UTC_ISO, Workdir, assert_one_line_error, describe, flip_byte, make_image

RECORD_KEYS = {"id", "volume_id", "volume_name", "parent_id", "status", "size", "labels",
               "protected", "is_incremental", "data_timestamp"}


def _events(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    for doc in docs:
        assert set(doc) == {"event", "timestamp", "payload"}, doc
        assert UTC_ISO.match(doc["timestamp"]), doc["timestamp"]
    return docs


def _hook_script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return str(path)


def _workdir(tmp_path: Path, **extra) -> Workdir:
    wd = Workdir(tmp_path / "wd", event_log=str(tmp_path / "events.jsonl"), **extra)
    wd.init("64K")
    return wd


def test_create_restore_delete_are_logged_with_the_backup_as_payload(tmp_path):
    wd = _workdir(tmp_path)
    img = tmp_path / "disk.img"
    data = make_image(img, 6, seed=71)
    rec = wd.create(img, "--label", "env=test")
    names = [e["event"] for e in _events(tmp_path / "events.jsonl")]
    assert names[0] == "backup.create.start" and names[-1] == "backup.create.end"
    assert set(names[1:-1]) == {"backup.createprogress"}
    docs = _events(tmp_path / "events.jsonl")
    start, end = docs[0]["payload"], docs[-1]["payload"]
    assert set(start) >= RECORD_KEYS and set(end) >= RECORD_KEYS
    assert start["id"] == end["id"] == rec["id"]
    assert start["status"] == "creating" and end["status"] == "available"
    assert end == rec  # the end event carries the record create printed
    assert end["labels"] == {"env": "test"}
    percents = [d["payload"]["percent"] for d in docs[1:-1]]
    assert percents == sorted(percents) and percents[-1] == 100
    assert all(0 < p <= 100 for p in percents)

    out = tmp_path / "restored.img"
    wd.run_json("restore", rec["id"], "--to-file", out)
    assert out.read_bytes() == data
    wd.run_json("delete", rec["id"])
    tail = _events(tmp_path / "events.jsonl")[len(docs):]
    assert [e["event"] for e in tail] == ["backup.restore.start", "backup.restore.end",
                                          "backup.delete.start", "backup.delete.end"]
    assert tail[0]["payload"]["status"] == "restoring"
    assert tail[1]["payload"]["status"] == "available"
    assert tail[1]["payload"]["target"] == str(out)
    assert tail[3]["payload"]["status"] == "deleted"
    assert all(e["payload"]["id"] == rec["id"] for e in tail)


def test_create_error_before_the_backup_exists_names_the_volume_and_reason(tmp_path):
    wd = _workdir(tmp_path)
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=72)
    p = wd.run("create", "--device", img, "--incremental")
    assert_one_line_error(p, 2, "No backups available to do an incremental backup.")
    (doc,) = _events(tmp_path / "events.jsonl")
    assert doc["event"] == "backup.create.error"
    assert doc["payload"]["status"] == "error"
    assert doc["payload"]["volume_name"] == str(img.resolve())
    assert "No backups available" in doc["payload"]["reason"]


def test_create_error_after_the_row_exists_carries_the_failed_record(tmp_path):
    wd = _workdir(tmp_path)
    img = tmp_path / "disk.img"
    make_image(img, 2, seed=73)
    parent = wd.create(img)
    flip_byte(wd.repo / "manifests" / parent["id"], 20)
    p = wd.run("create", "--device", img, "--incremental")
    assert p.returncode == 3, describe(p)   # the parent's manifest is damaged
    docs = _events(tmp_path / "events.jsonl")
    assert docs[-1]["event"] == "backup.create.error"
    failed = docs[-1]["payload"]
    assert failed["id"] not in (None, parent["id"])
    assert failed["status"] == "error" and failed["fail_reason"]
    assert failed["reason"]
    starts = [d for d in docs if d["event"] == "backup.create.start"]
    assert starts[-1]["payload"]["id"] == failed["id"]
    assert [r["status"] for r in wd.catalog_rows() if r["id"] == failed["id"]] == ["error"]


def test_hooks_get_the_event_json_on_stdin_and_the_event_name(tmp_path):
    seen = tmp_path / "seen"
    seen.mkdir()
    script = _hook_script(tmp_path, "hook", (
        "import os, sys\n"
        f"d = {str(seen)!r}\n"
        "n = len(os.listdir(d))\n"
        "open(os.path.join(d, f'{n:03d}.json'), 'w').write(sys.stdin.read())\n"
        "open(os.path.join(d, f'{n:03d}.name'), 'w').write(os.environ['LVBACKUP_EVENT'])\n"
        "print('hook output must not reach lvbackup stdout')\n"))
    wd = _workdir(tmp_path, hooks=[{"on": ["backup.create.*", "backup.delete.end"],
                                    "command": [script]}])
    img = tmp_path / "disk.img"
    make_image(img, 2, seed=74)
    rec = wd.create(img)   # run_json: stdout must be one JSON document despite the hook
    wd.run_json("delete", rec["id"])
    names = [p.read_text() for p in sorted(seen.glob("*.name"))]
    assert names == ["backup.create.start", "backup.create.end", "backup.delete.end"]
    docs = [json.loads(p.read_text()) for p in sorted(seen.glob("*.json"))]
    assert [d["event"] for d in docs] == names
    assert docs[1]["payload"] == rec
    assert docs[2]["payload"]["status"] == "deleted"
    # The event log has exactly the same documents (and more events).
    logged = [e for e in _events(tmp_path / "events.jsonl") if e["event"] in names]
    assert logged == docs


def test_a_failing_hook_is_reported_and_never_fails_the_backup(tmp_path):
    script = _hook_script(tmp_path, "fail", "import sys\nsys.stderr.write('boom here\\n')\n"
                                            "sys.exit(3)\n")
    wd = _workdir(tmp_path, hooks=[{"on": ["backup.create.end"], "command": [script]},
                                   {"on": ["backup.create.end"],
                                    "command": [str(tmp_path / "missing-hook")]}])
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=75)
    p = wd.run("--json", "create", "--device", img)
    assert p.returncode == 0, describe(p)
    assert json.loads(p.stdout)["status"] == "available"
    warnings = [ln for ln in p.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 2, p.stderr
    assert "exited 3" in warnings[0] and "boom here" in warnings[0]
    assert "missing-hook" in warnings[1] and "could not start" in warnings[1]


def test_a_slow_hook_is_killed_with_its_children_at_its_timeout(tmp_path):
    pids = tmp_path / "pids"
    # The hook starts a grandchild, records both pids, and waits far longer than its timeout.
    script = _hook_script(tmp_path, "slow", (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(300)\n"))
    wd = _workdir(tmp_path, hooks=[{"on": ["backup.create.start"], "command": [script],
                                    "timeout": 2}])
    img = tmp_path / "disk.img"
    data = make_image(img, 1, seed=76)
    p = wd.run("--json", "create", "--device", img, timeout=120)
    assert p.returncode == 0, describe(p)
    rec = json.loads(p.stdout)
    assert rec["status"] == "available"
    assert "timed out after 2 s" in p.stderr
    for pid in map(int, pids.read_text().split()):
        assert not _alive(pid), f"hook process {pid} survived its timeout"
    assert wd.restore_bytes(rec["id"]) == data


def _alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, killed and waiting for its reaper, does not count)."""
    for _ in range(50):  # the reaper (init) may take a moment to collect it
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


def test_an_unwritable_event_log_is_reported_and_never_fails_the_backup(tmp_path):
    log_dir = tmp_path / "events.jsonl"
    log_dir.mkdir()  # a directory where the log file should be
    wd = Workdir(tmp_path / "wd", event_log=str(log_dir))
    wd.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=77)
    p = wd.run("--json", "create", "--device", img)
    assert p.returncode == 0, describe(p)
    assert json.loads(p.stdout)["status"] == "available"
    assert "cannot write the event log" in p.stderr


def test_no_event_log_configured_writes_nothing(tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=78)
    wd.create(img)
    assert not list(tmp_path.rglob("*.jsonl"))


@pytest.mark.parametrize("hooks, key", [
    ([{"on": ["backup.create.bogus"], "command": ["true"]}], "hooks[0].on"),
    ([{"on": ["backup.create.end"]}], "hooks[0]"),
    ([{"on": ["backup.create.end"], "command": "true", "when": 1}], "hooks[0]"),
    ([{"on": ["backup.create.end"], "command": ["true"], "timeout": 0}], "hooks[0].timeout"),
    ([{"on": [], "command": ["true"]}], "hooks[0].on"),
    ({"on": ["backup.create.end"]}, "hooks"),
])
def test_bad_hooks_are_config_errors_naming_the_key(tmp_path, hooks, key):
    wd = Workdir(tmp_path / "wd", hooks=hooks)
    p = wd.run("config", "check")
    line = assert_one_line_error(p, 2)
    assert f"'{key}" in line, line


def test_unquoted_on_key_in_yaml_is_understood(tmp_path):
    """YAML 1.1 reads `on:` as the boolean true; the example config writes it unquoted."""
    wd = Workdir(tmp_path / "wd")
    with open(wd.config, "a") as f:
        f.write("hooks:\n  - on: [backup.create.error]\n    command: [logger, -t, lvbackup]\n")
    doc = wd.run_json("config", "check")
    assert doc["hooks"] == [{"on": ["backup.create.error"],
                             "command": ["logger", "-t", "lvbackup"], "timeout": 30.0}]


def test_events_module_never_raises(tmp_path):
    """The library entry point: emit() swallows every failure into a warning."""
    from lvbackup.events import Events, Hook

    warnings: list[str] = []
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the event log's directory should be
    ev = Events(blocker / "events.jsonl",
                [Hook(on=("backup.*",), command=(str(tmp_path / "nope"),), timeout=1)],
                warn=warnings.append)
    ev.emit("backup.create.end", {"id": "x", "weird": object()})
    assert len(warnings) == 2, warnings
    assert "cannot write the event log" in warnings[0]
    assert "could not start" in warnings[1]
