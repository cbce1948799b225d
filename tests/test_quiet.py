"""`--quiet`: a successful run prints nothing on stdout or stderr, whatever the command, so
cron mails only failures; a failure still prints its one line; `--json` still prints its
document. The lines of contrib/cron/lvbackup keep that promise."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from support import assert_one_line_error, describe, job_and_two_backups

CRON = Path(__file__).resolve().parent.parent / "contrib" / "cron" / "lvbackup"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A repository with a job and two backups of an image (full, incremental)."""
    return job_and_two_backups(tmp_path_factory.mktemp("quiet"), seed=61, keep={"last": 5})


@pytest.fixture
def env(base, tmp_path):
    wd, img, full, incr = base
    return wd.clone(tmp_path / "wd"), img, full, incr


def cron_commands() -> list[list[str]]:
    """The lvbackup commands of the cron file, each line split at its '&&'."""
    commands = []
    for line in CRON.read_text().splitlines():
        if not line.strip() or line.startswith("#") or "=" in line.split()[0]:
            continue
        command = line.split(None, 6)[6]      # m h dom mon dow user COMMAND
        for part in command.split("&&"):
            argv = shlex.split(part)
            assert argv[0] == "lvbackup", line
            commands.append(argv[1:])
    return commands


def assert_silent(p) -> None:
    assert p.returncode == 0, describe(p)
    assert p.stdout == "" and p.stderr == "", describe(p)


def test_the_cron_file_has_commands():
    argvs = cron_commands()
    assert len(argvs) >= 4 and all("--quiet" in a for a in argvs), argvs


@pytest.mark.parametrize("argv", cron_commands(), ids=" ".join)
def test_each_cron_command_is_silent_on_success(env, argv):
    wd = env[0]
    assert_silent(wd.run(*argv))


@pytest.mark.parametrize("place", ["before", "after"])
def test_quiet_silences_every_command(env, tmp_path, place):
    wd, img, full, incr = env

    def quiet(*args):
        args = ("--quiet", *args) if place == "before" else (*args, "--quiet")
        assert_silent(wd.run(*args))

    quiet("init", "--block-size", "64K")
    quiet("create", "--device", img, "--incremental")
    quiet("list")
    quiet("show", full)
    quiet("verify")
    quiet("verify", "--deep", full)
    quiet("diff", incr)
    quiet("restore", full, "--to-file", tmp_path / "r.img")
    quiet("protect", full)
    quiet("unprotect", full)
    quiet("prune", "--keep-last", "3", "-n")
    quiet("run")
    quiet("config", "check")
    newest = max(wd.list(), key=lambda r: r["created_at"])["id"]
    quiet("delete", newest)
    quiet("gc")
    quiet("catalog", "rebuild")


def test_quiet_failure_prints_its_one_line(env):
    wd = env[0]
    assert_one_line_error(wd.run("--quiet", "show", "ffffffff"), 2, "not found")
    assert_one_line_error(wd.run("verify", "ffffffff", "--quiet"), 2, "not found")


def test_quiet_run_failure_is_one_line_saying_why(env, tmp_path):
    wd = env[0]
    broken = wd.config_with("broken.yaml", jobs={"gone": {"device": str(tmp_path / "gone")}})
    p = wd.run("--quiet", "run", config=broken)
    line = assert_one_line_error(p, 2, "1 of 1 job failed: gone (")
    assert "gone" in line.split("(", 1)[1], line
    assert p.stdout == ""


def test_quiet_with_json_prints_the_document(env):
    wd, _, full, _ = env
    p = wd.run("--quiet", "show", full, "--json")
    assert p.returncode == 0 and p.stderr == "", describe(p)
    assert json.loads(p.stdout)["id"] == full
    p = wd.run("verify", "--quiet", "--json")
    assert p.returncode == 0 and p.stderr == "", describe(p)
    assert json.loads(p.stdout)["ok"] is True


def test_quiet_still_writes_what_the_command_is_for(env):
    """restore --to-file - writes the image, export-record its text: the output asked for."""
    wd, _, full, _ = env
    p = wd.run("--quiet", "restore", full, "--to-file", "-", binary=True)
    assert p.returncode == 0 and len(p.stdout) == 3 << 20 and p.stderr == b""
    p = wd.run("--quiet", "export-record", full)
    assert p.returncode == 0 and p.stdout.strip() and p.stderr == ""
