"""The one way lvbackup runs an external command: LVM and dmsetup (through lvm.py only),
thin_delta, nbdkit, nbd-client, modprobe, blkid, mount, hooks, `passphrase_command`, the
`pre_snapshot`/`post_snapshot` commands, and the freeze watchdog (started, not waited for).

An argv list, never a shell. Each run is logged at DEBUG (`--verbose`) with its argv, exit
status and duration; never its input, output or environment, which may hold a secret (a
passphrase_command prints the passphrase).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import IO

log = logging.getLogger(__name__)

DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE     # captured through a pipe: it never touches a disk (secrets)
CAPTURE = -10              # captured in an unlinked temporary file: a child left behind
                           # holding it cannot hang lvbackup, and waiting can be repeated
KILL_WAIT = 5.0            # seconds to reap a killed command

# Cron gives root PATH=/usr/bin:/bin, which lacks the sbin directories lvm2 and nbd-client
# install into.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

Stream = int | IO[bytes]


def find_tool(name: str) -> str | None:
    """A system command's path, looked up in PATH and the sbin directories."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_SBIN_DIRS)
    return shutil.which(name, path=path)


def run(argv: Sequence[str], *, stdin: Stream = DEVNULL, stdout: Stream = CAPTURE,
        stderr: Stream = CAPTURE, env: Mapping[str, str] | None = None,
        timeout: float | None = None, own_session: bool = True,
        finish: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` to its end; its exit status and what it printed where CAPTURE or PIPE
    asked for it (else None). OSError if it cannot start.

    - `own_session`: a Ctrl-C on the terminal reaches lvbackup, not the command (and a
      timeout kills everything the command started).
    - `timeout`: then the command is killed and subprocess.TimeoutExpired raised.
    - lvbackup interrupted meanwhile (a signal unwinding it): the command is killed, or,
      with `finish`, waited for first (LVM must never be stopped halfway).
    """
    argv = list(argv)
    with contextlib.ExitStack() as files:
        out, err = (files.enter_context(tempfile.TemporaryFile()) if s == CAPTURE else s
                    for s in (stdout, stderr))
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=err, env=env,
                                    start_new_session=own_session)
        except OSError as e:
            log.debug("could not run %s: %s", shlex.join(argv), e.strerror or e)
            raise
        piped: tuple[bytes | None, bytes | None] = (None, None)
        try:
            if PIPE in (stdout, stderr):
                piped = proc.communicate(timeout=timeout)
            else:
                proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(proc, own_session)
            log.debug("%s: killed after its timeout of %g s", shlex.join(argv), timeout)
            raise
        except BaseException:
            if finish:
                _wait_uninterrupted(proc)
            else:
                _kill(proc, own_session)
            log.debug("%s: interrupted after %.3f s", shlex.join(argv),
                      time.monotonic() - started)
            raise
        log.debug("%s: %s, %.3f s", shlex.join(argv), describe_status(proc.returncode),
                  time.monotonic() - started)
        return subprocess.CompletedProcess(
            argv, proc.returncode, _output(stdout, out, piped[0]),
            _output(stderr, err, piped[1]))


def spawn(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own, with pipes to its input and output, and leave
    it running: a helper that must outlive lvbackup (the freeze watchdog, lvbackup.volumes.freeze).
    OSError if it cannot start."""
    argv = list(argv)
    log.debug("starting %s", shlex.join(argv))
    return subprocess.Popen(argv, stdin=PIPE, stdout=PIPE, stderr=DEVNULL,
                            start_new_session=True)


def describe_status(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def _output(kind: Stream, file: Stream, piped: bytes | None) -> bytes | None:
    if kind == PIPE:
        return piped
    if kind == CAPTURE:
        assert not isinstance(file, int)
        file.seek(0)
        return file.read()
    return None


def _kill(proc: subprocess.Popen, group: bool) -> None:
    with contextlib.suppress(OSError):
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=KILL_WAIT)


def _wait_uninterrupted(proc: subprocess.Popen) -> None:
    while True:
        try:
            proc.wait()
            return
        except BaseException:  # noqa: BLE001 - a second signal: keep waiting
            continue
