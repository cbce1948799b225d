"""The one runner of external commands (lvbackup/base/proc.py) and `--verbose`, which logs every
command it runs (argv, exit status, duration) and the change tracker's choice, and never
a secret."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lvbackup.base import proc

from support import Workdir, describe, make_image

PY = sys.executable


def test_run_returns_status_and_output_and_logs_argv_status_and_duration(caplog):
    caplog.set_level(logging.DEBUG, logger="lvbackup")
    done = proc.run([PY, "-c", "import sys; print('o' + 'UT'); print('e' + 'RR', "
                     "file=sys.stderr); sys.exit(3)"])
    assert (done.returncode, done.stdout, done.stderr) == (3, b"oUT\n", b"eRR\n")
    (record,) = [r for r in caplog.records if r.name == "lvbackup.base.proc"]
    assert record.levelno == logging.DEBUG
    m = re.fullmatch(r"(.*): exit status 3, (\d+\.\d{3}) s", record.getMessage())
    assert m and m.group(1).startswith(PY) and "sys.exit(3)" in m.group(1), record.getMessage()
    assert "oUT" not in record.getMessage() and "eRR" not in record.getMessage()


def test_run_duration_is_measured(caplog):
    caplog.set_level(logging.DEBUG, logger="lvbackup")
    proc.run([PY, "-c", "import time; time.sleep(0.3)"])
    seconds = float(caplog.records[-1].getMessage().rsplit(", ", 1)[1].removesuffix(" s"))
    assert 0.3 <= seconds < 5


def test_run_failures_to_start_and_timeouts_are_logged(caplog, tmp_path):
    caplog.set_level(logging.DEBUG, logger="lvbackup")
    with pytest.raises(FileNotFoundError):
        proc.run([str(tmp_path / "no-such-tool"), "x"])
    assert "could not run" in caplog.records[-1].getMessage()
    marker = tmp_path / "child-ran-on"
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        # The shell's child is killed with it (its own session, killed as a group).
        proc.run(["sh", "-c", f"sleep 30; touch {marker}"], timeout=0.5)
    assert time.monotonic() - started < 10
    assert "killed after its timeout of 0.5 s" in caplog.records[-1].getMessage()
    time.sleep(0.2)
    assert not marker.exists()
    assert proc.run(["sh", "-c", "kill -9 $$"]).returncode == -9
    assert "killed by signal 9" in caplog.records[-1].getMessage()


def test_run_pipes_and_files(tmp_path):
    assert proc.run([PY, "-c", "print('s3cret')"], stdout=proc.PIPE,
                    stderr=proc.PIPE).stdout == b"s3cret\n"
    with open(tmp_path / "log", "wb") as log:
        done = proc.run([PY, "-c", "print('to the log')"], stdout=log, stderr=log)
    assert done.stdout is None and (tmp_path / "log").read_bytes() == b"to the log\n"


def test_verbose_create_logs_the_commands_it_ran_and_no_secret(tmp_path):
    passphrase = "correct horse battery staple 7731"
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\ncat >/dev/null\nexit 4\n")
    hook.chmod(0o755)
    secret = tmp_path / "secret"
    secret.write_text(passphrase + "\n")
    wd = Workdir(tmp_path / "wd", passphrase_command=["cat", str(secret)],
                 hooks=[{"on": ["backup.create.end"], "command": [str(hook)]}])
    assert wd.run_json("init", "--block-size", "64K", "--encryption")["encrypted"]
    image = tmp_path / "disk.img"
    make_image(image, 2, seed=5)
    p = wd.run("--verbose", "create", "--device", image)
    assert p.returncode == 0, describe(p)
    log = p.stderr
    assert passphrase not in log and passphrase not in p.stdout
    # The passphrase command (its argv), and the hook, each with status and duration.
    assert re.search(rf"lvbackup\.base\.proc: cat {re.escape(str(secret))}: exit status 0, "
                     r"\d+\.\d{3} s", log), log
    assert re.search(rf"lvbackup\.base\.proc: {re.escape(str(hook))}: exit status 4, "
                     r"\d+\.\d{3} s", log), log
    # What the change tracker decided, and why.
    assert "lvbackup.volumes.changes.tracker: not an LV: every block is read (full)" in log, log
    quiet = wd.run("create", "--device", image)
    assert quiet.returncode == 0 and "lvbackup.base.proc" not in quiet.stderr, describe(quiet)
    after = wd.run("create", "--device", image, "--verbose")   # a global option, after
    assert after.returncode == 0 and "lvbackup.volumes.changes.tracker" in after.stderr, \
        describe(after)


def test_no_print_based_debug_paths_in_the_package():
    """Diagnostics go through logging; output for people through the command line
    (lvbackup/cli/: its commands, render.py, progressbar.py) only."""
    package = Path(__file__).resolve().parents[1] / "lvbackup"
    offenders = [f"{path.relative_to(package)}:{n}"
                 for path in package.rglob("*.py") if path.relative_to(package).parts[0] != "cli"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"(^|[^.\w])print\(|click\.echo\(", line)]
    assert offenders == []


def test_every_external_command_goes_through_the_runner():
    package = Path(__file__).resolve().parents[1] / "lvbackup"
    offenders = [f"{path.relative_to(package)}:{n}"
                 for path in package.rglob("*.py") if path.name != "proc.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"subprocess\.(run|Popen|call|check_call|check_output)\(|"
                              r"os\.(system|popen|exec\w*|spawn\w*)\(", line)]
    assert offenders == []
