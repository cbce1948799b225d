"""Operator experience: help texts, exit codes, shell completion, `config check` and the
example configuration, human output (tables, lineage), and progress that never mixes with
the result."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import yaml

from lvbackup.cli import cli

from support import LVBACKUP, Workdir, assert_one_line_error, clean_env, describe, make_image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "lvbackup.yaml.example"


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):   # the root imports each command's module here
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def test_every_command_help_has_an_example():
    from click.testing import CliRunner
    runner = CliRunner()
    paths = list(_commands(cli))
    assert {("prune",), ("protect",), ("unprotect",), ("run",), ("config", "check")} <= \
        {p for p, _ in paths}
    for path, _ in [((), cli)] + paths:
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Example" in result.output, f"'lvbackup {' '.join(path)} --help' has no example"


def test_a_command_imports_only_its_own_module():
    """Start-up (docs/performance.md): importing the command line loads no operation,
    --version loads nothing more, and a command loads its own group's module only."""
    from lvbackup.cli import COMMANDS
    code = ("import sys; from click.testing import CliRunner; import lvbackup.cli as c; "
            "ops = lambda: [m for m in sys.modules if m.startswith('lvbackup.operations')]; "
            "assert ops() == [], ops(); "
            "assert CliRunner().invoke(c.cli, ['--version']).exit_code == 0; "
            "assert ops() == [] and 'lvbackup.catalog.catalog' not in sys.modules; "
            "assert CliRunner().invoke(c.cli, ['config', 'check', '--help']).exit_code == 0; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('lvbackup.cli.'))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=clean_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    loaded = {m.removeprefix("lvbackup.cli.") for m in p.stdout.split()}
    groups = {target.split(":")[0] for target in COMMANDS.values()}
    assert loaded & groups == {"config"}, loaded


def test_top_level_help_lists_the_exit_codes():
    p = subprocess.run([str(LVBACKUP), "--help"], capture_output=True, text=True,
                       env=clean_env())
    assert p.returncode == 0
    for code, words in (("0", "success"), ("1", "failed"), ("2", "invalid usage"),
                        ("75", "locked"), ("130", "interrupted"), ("143", "terminated")):
        assert any(line.strip().startswith(code) and words in line
                   for line in p.stdout.splitlines()), (code, p.stdout)


def test_docs_list_the_exit_codes_and_the_completion_command():
    ops = (ROOT / "docs" / "operations.md").read_text()
    for needle in ("75", "130", "143", "_LVBACKUP_COMPLETE=bash_source",
                   "lvbackup_last_success_timestamp_seconds", "catalog rebuild", "systemd",
                   "cron"):
        assert needle in ops, needle


def test_shell_completion_script_and_completions():
    env = {**clean_env(), "_LVBACKUP_COMPLETE": "bash_source"}
    p = subprocess.run([str(LVBACKUP)], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stderr == "", describe(p)
    assert "complete " in p.stdout and "_lvbackup_completion" in p.stdout
    env = {**clean_env(), "_LVBACKUP_COMPLETE": "bash_complete", "COMP_WORDS": "lvbackup pr",
           "COMP_CWORD": "1"}
    p = subprocess.run([str(LVBACKUP)], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stderr == "", describe(p)
    words = {line.split(",", 1)[1] for line in p.stdout.splitlines()}
    assert {"prune", "protect"} <= words


def test_global_options_after_the_command(tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.init("64K")
    bare = [str(LVBACKUP)]
    for argv in (["list", "--json", "--config", wd.config],
                 ["--config", wd.config, "list", "--json"],
                 ["list", "--config", wd.config, "--quiet", "--json", "--verbose"]):
        p = subprocess.run(bare + [str(a) for a in argv], capture_output=True, text=True,
                           env=clean_env())
        assert p.returncode == 0 and json.loads(p.stdout) == [], describe(p)
    # Nested groups too: `key list` of an unencrypted repository fails, as JSON.
    p = wd.run("key", "list", "--json")
    assert p.returncode == 2 and json.loads(p.stderr)["exit_code"] == 2, describe(p)
    p = wd.run("catalog", "rebuild", "-q")
    assert p.returncode == 0 and p.stdout == p.stderr == "", describe(p)
    # Given twice: a flag is on; two different files are refused.
    assert wd.run("--json", "list", "--json").stdout.strip() == "[]"
    other = wd.config_with("other.yaml")
    assert_one_line_error(wd.run("list", "--config", other), 2, "--config given twice")
    p = wd.run("list", "--config", wd.config)
    assert p.returncode == 0, describe(p)


def test_help_of_a_command_mentions_the_global_options():
    from click.testing import CliRunner
    out = " ".join(CliRunner().invoke(cli, ["key", "list", "--help"]).output.split())
    assert "--json" in out and "may also follow the command" in out, out
    # ... hidden from the options list, which stays about the command
    assert "--quiet" not in out.split("Options:")[1].split("The global options")[0], out


def test_init_help_example_works_as_written():
    """The passphrase must reach every command, and the key goes to a file lvbackup makes
    0600 (a shell redirect leaves an empty 0644 file when the export fails)."""
    from click.testing import CliRunner
    out = CliRunner().invoke(cli, ["init", "--help"]).output
    assert "export LVBACKUP_PASSPHRASE" in out and "key export --to" in out, out
    assert "key export >" not in out


def test_ctrl_c_at_start_up_prints_no_traceback(tmp_path):
    """SIGINT at small delays after the start, from the very first: the command (bin/lvbackup)
    starts the interpreter with Ctrl-C ignored until lvbackup's launcher handles it, so one
    sent while Python starts up is dropped, and one after ends in status 130 and one line;
    never a traceback. (One before the shell's first line ends it silently, by the signal.)"""
    wd = Workdir(tmp_path / "wd")
    wd.init()
    for delay in (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2) * 2:
        proc = wd.popen("list")
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err, (delay, err.decode())
        # Before the shell's first line, the signal ends it as it ends any program (a
        # shell reports 130), silently.
        assert proc.returncode in (130, 0, -signal.SIGINT), (delay, proc.returncode, err)
        if proc.returncode == 130:
            assert err.decode().strip().splitlines() == ["lvbackup: interrupted"], err
        if proc.returncode == -signal.SIGINT:
            assert err == b"", err


# --- configuration --------------------------------------------------------------------------

def test_config_check_flags_log_directories_that_do_not_exist(tmp_path):
    missing = tmp_path / "no" / "such"
    wd = Workdir(tmp_path / "wd", event_log=str(missing / "events.jsonl"),
                 metrics=str(missing / "m" / "lvbackup.prom"))
    p = wd.run("config", "check")
    assert p.returncode == 0, describe(p)
    warnings = [line for line in p.stderr.splitlines() if "does not exist" in line]
    assert len(warnings) == 2 and "event_log" in warnings[0] and "metrics" in warnings[1]
    assert not (tmp_path / "no").exists()


def test_an_unwritable_event_log_warns_once_per_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    wd = Workdir(tmp_path / "wd", event_log=str(blocker / "events.jsonl"))
    wd.init("64K")
    image = tmp_path / "img"
    image.write_bytes(os.urandom(1 << 20))
    p = wd.run("create", "--device", image)
    assert p.returncode == 0, describe(p)
    assert p.stderr.count("cannot write the event log") == 1, p.stderr


def test_counts_are_singular_for_one(tmp_path):
    wd = Workdir(tmp_path / "wd")
    wd.init("64K")
    image = tmp_path / "img"
    image.write_bytes(os.urandom(1 << 20))
    a, b = wd.create(image)["id"], wd.create(image)["id"]
    p = wd.run("prune", "--keep-last", "1", "-n")
    assert "Would delete 1 backup," in p.stdout, describe(p)
    p = wd.run("diff", b, a)
    assert p.stdout.splitlines()[-1].startswith("0 ranges"), describe(p)
    image.write_bytes(os.urandom(1 << 20))
    c = wd.create(image, "--incremental")["id"]
    p = wd.run("diff", c)
    assert p.stdout.splitlines()[-1].startswith("1 range,"), describe(p)

def test_example_config_is_valid_and_documents_every_key(tmp_path):
    from lvbackup import config as cfg
    text = EXAMPLE.read_text()
    # Every key appears in the example, as a key (commented out or not).
    for key in cfg._KEYS + cfg._JOB_KEYS + cfg._HOOK_KEYS + ("last", "hourly", "daily",
                                                             "weekly", "monthly", "yearly",
                                                             "snapshot_of"):
        assert f"{key}:" in text, f"lvbackup.yaml.example does not document '{key}'"
    # As shipped, with every commented-out example block enabled, it validates.
    p = subprocess.run([str(LVBACKUP), "--config", str(EXAMPLE), "--json", "config", "check"],
                       capture_output=True, text=True, env=clean_env())
    assert p.returncode == 0, describe(p)
    uncommented = tmp_path / "full.yaml"
    uncommented.write_text("\n".join(line[2:] if line.startswith("# ") and
                                     _looks_like_yaml(line[2:]) else line
                                     for line in text.splitlines()))
    p = subprocess.run([str(LVBACKUP), "--config", str(uncommented), "--json", "config",
                        "check"], capture_output=True, text=True, env=clean_env())
    assert p.returncode == 0, describe(p) + uncommented.read_text()
    doc = json.loads(p.stdout)
    assert doc["jobs"] and doc["hooks"] and doc["metrics"] and doc["event_log"]


def _looks_like_yaml(line: str) -> bool:
    """A commented-out setting in the example (`key: value`, `- item`, indented), not prose
    (which never starts with a lower-case `word:`)."""
    return re.match(r"^( *)([a-z_][a-z0-9_-]*:( |$)|- )", line) is not None


def test_config_check_prints_the_effective_configuration(tmp_path):
    img = tmp_path / "disk.img"
    wd = Workdir(tmp_path / "wd", metrics="m/lvbackup.prom",
                 jobs={"j": {"device": "disk.img", "incremental": True, "full_every": "7d",
                             "keep": {"daily": 7}}})
    doc = wd.run_json("config", "check")
    assert doc["repository"] == str(wd.repo) and doc["catalog"] == str(wd.catalog)
    assert doc["metrics"] == str(wd.path / "m" / "lvbackup.prom")  # relative to the file
    job = doc["jobs"]["j"]
    assert job["device"] == str(wd.path / "disk.img")
    assert job["full_every"] == "7d" and job["keep"]["daily"] == 7
    assert doc["workers"] >= 1 and doc["compression_level"] == 1  # defaults shown too
    p = wd.run("config", "check")
    assert p.returncode == 0, describe(p)
    human = yaml.safe_load(p.stdout)
    assert human == doc
    assert not img.exists()  # checking touches nothing


def test_config_check_warns_about_a_missing_hook_command(tmp_path):
    wd = Workdir(tmp_path / "wd", hooks=[{"on": ["backup.create.end"],
                                          "command": ["/nonexistent/notify"]}])
    p = wd.run("--json", "config", "check")
    assert p.returncode == 0, describe(p)
    assert "/nonexistent/notify" in p.stderr
    json.loads(p.stdout)


# --- human output ---------------------------------------------------------------------------

@pytest.fixture
def chain3(workdir, make_image, change, tmp_path):
    workdir.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 2, seed=91)
    ids = [workdir.create(img, "--label", "tier=gold")["id"]]
    for seed in (92, 93):
        change(img, seed=seed)
        ids.append(workdir.create(img, "--incremental")["id"])
    return workdir, ids


def test_show_of_an_incremental_shows_its_chain_and_dependents(chain3):
    wd, ids = chain3
    p = wd.run("show", ids[2])
    assert p.returncode == 0, describe(p)
    assert "chain back to the full backup" in p.stdout
    for bid in ids:
        assert bid[:8] in p.stdout     # the chain table shows 8 characters of each id
    p = wd.run("show", ids[1])
    assert f"dependents: {ids[2]}" in p.stdout
    p = wd.run("show", ids[0])
    assert "chain back" not in p.stdout and "tier=gold" in p.stdout
    # --json stays one record; --chain gives the chain as a list.
    assert wd.run_json("show", ids[2])["id"] == ids[2]
    assert [r["id"] for r in wd.run_json("show", ids[2], "--chain")] == ids[::-1]


def test_list_table_shows_lineage_sizes_labels_and_protection(chain3):
    wd, ids = chain3
    wd.run_json("protect", ids[0])
    p = wd.run("list")
    assert p.returncode == 0, describe(p)
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.strip()}
    assert "protected" in rows[ids[0][:8]] and "tier=gold" in rows[ids[0][:8]]
    assert "MiB" in rows[ids[0][:8]]
    second = rows[ids[1][:8]]
    assert ids[0][:8] in second and "incr" in second  # its parent


# --- progress -------------------------------------------------------------------------------

def _run_with_tty_stderr(argv: list[str]) -> tuple[int, bytes, bytes]:
    """Run argv with stderr on a pseudo-terminal and stdout on a pipe."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                            env={**clean_env(), "TERM": "xterm", "COLUMNS": "120"})
    os.close(slave)
    out_fd = proc.stdout.fileno()
    got = {master: bytearray(), out_fd: bytearray()}
    open_fds = [master, out_fd]
    while open_fds:
        ready, _, _ = select.select(open_fds, [], [], 5)
        for fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side is closed
                chunk = b""
            if chunk:
                got[fd] += chunk
            else:
                open_fds.remove(fd)
    proc.wait(timeout=60)
    os.close(master)
    proc.stdout.close()
    return proc.returncode, bytes(got[out_fd]), bytes(got[master])


def test_json_output_is_never_mixed_with_progress_on_a_terminal(workdir, tmp_path):
    workdir.init("64K")
    img = tmp_path / "disk.img"
    data = make_image(img, 32, seed=94)
    base = [str(LVBACKUP), "--config", str(workdir.config)]
    code, out, err = _run_with_tty_stderr(base + ["--json", "create", "--device", str(img)])
    assert code == 0, err
    rec = json.loads(out)  # stdout is exactly the record
    assert rec["status"] == "available"
    assert "━".encode() in err  # the progress bar went to the terminal, on stderr
    assert b"reused" in err
    target = tmp_path / "r.img"
    code, out, err = _run_with_tty_stderr(base + ["--json", "restore", rec["id"], "--to-file",
                                                  str(target)])
    assert code == 0, err
    assert json.loads(out)["backup_id"] == rec["id"] and target.read_bytes() == data
    # Refused (the file exists now): one line, and no progress bar drawn before it.
    code, out, err = _run_with_tty_stderr(base + ["restore", rec["id"], "--to-file",
                                                  str(target)])
    assert code == 2 and "━".encode() not in err and b"exists" in err, err
    code, out, err = _run_with_tty_stderr(base + ["--quiet", "--json", "verify", "--deep"])
    assert code == 0 and err == b"", err  # --quiet: nothing but the result
    assert json.loads(out)["ok"] is True
