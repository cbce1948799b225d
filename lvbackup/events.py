"""Notifications, as Cinder sends them (docs/lineage.md, rule 21): an event log and hooks.

Each event is one JSON object `{"event": NAME, "timestamp": UTC ISO 8601, "payload": {...}}`
whose payload is the backup's record (error events add `reason`; `backup.createprogress`
and an instant restore's `backup.restoreprogress` add `percent`). It is appended as one
line to the `event_log` file, and handed on stdin to every configured hook whose `on:`
patterns match its name.

Nothing here ever fails the operation that emits the event: a log that cannot be written, a
hook that cannot start, exits non-zero or outlives its timeout (it is killed, with
everything it started) is reported as one line through `warn`, and the work goes on.
Hooks never see lvbackup's secrets: passphrases and AWS_* variables are not in their
environment.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import proc
from .base.permissions import FILE_MODE, make_private_dirs
from .base.secretenv import without_secrets
from .base.timeutil import now_iso

CREATE_START = "backup.create.start"
CREATE_PROGRESS = "backup.createprogress"
CREATE_END = "backup.create.end"
CREATE_ERROR = "backup.create.error"
RESTORE_START = "backup.restore.start"
RESTORE_PROGRESS = "backup.restoreprogress"   # an instant restore's background copy
RESTORE_END = "backup.restore.end"
RESTORE_ERROR = "backup.restore.error"
DELETE_START = "backup.delete.start"
DELETE_END = "backup.delete.end"
DELETE_ERROR = "backup.delete.error"

EVENTS = (CREATE_START, CREATE_PROGRESS, CREATE_END, CREATE_ERROR, RESTORE_START,
          RESTORE_PROGRESS, RESTORE_END, RESTORE_ERROR, DELETE_START, DELETE_END, DELETE_ERROR)

DEFAULT_HOOK_TIMEOUT = 30.0
# backup.createprogress is sent each time the backup passes another multiple of this.
PROGRESS_STEP = 10


@dataclass(frozen=True)
class Hook:
    on: tuple[str, ...]          # event names or fnmatch patterns ("backup.*.error")
    command: tuple[str, ...]     # argv, run without a shell
    timeout: float = DEFAULT_HOOK_TIMEOUT

    def wants(self, event: str) -> bool:
        return any(fnmatch.fnmatchcase(event, pattern) for pattern in self.on)


def matching_events(pattern: str) -> list[str]:
    return [e for e in EVENTS if fnmatch.fnmatchcase(e, pattern)]


def stderr_warning(message: str) -> None:
    try:
        sys.stderr.write(f"lvbackup: warning: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def make_event(event: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    return {"event": event, "timestamp": now_iso(), "payload": payload}


class Events:
    """Where events go: the event log and the hooks of one configuration."""

    def __init__(self, event_log: Path | None = None, hooks: Iterable[Hook] = (),
                 warn: Callable[[str], None] = stderr_warning):
        self.event_log = Path(event_log) if event_log else None
        self.hooks = tuple(hooks)
        self.warn = warn
        self._log_failed = False   # an unwritable event log is reported once per run

    @property
    def enabled(self) -> bool:
        return self.event_log is not None or bool(self.hooks)

    def emit(self, event: str, payload: Mapping[str, Any]) -> None:
        """Log `event` and run its hooks; never raises (but lets signals through)."""
        if not self.enabled:
            return
        try:
            doc = make_event(event, payload)
            line = json.dumps(doc, sort_keys=True, default=str)
        except Exception as e:  # noqa: BLE001 - an event must never fail the operation
            self._warn(f"cannot encode event {event}: {e}")
            return
        if self.event_log is not None:
            self._append(line)
        for hook in self.hooks:
            if hook.wants(event):
                self._run_hook(hook, event, line)

    def _warn(self, message: str) -> None:
        try:
            self.warn(message)
        except Exception:  # noqa: BLE001
            stderr_warning(message)

    def _append(self, line: str) -> None:
        assert self.event_log is not None
        data = (line + "\n").encode()
        try:
            make_private_dirs(self.event_log.parent)
            # One write(2) with O_APPEND: lines of concurrent runs never interleave.
            fd = os.open(self.event_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                         FILE_MODE)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as e:
            if not self._log_failed:
                self._log_failed = True
                self._warn(f"cannot write the event log {self.event_log}: {e.strerror or e}")

    def _run_hook(self, hook: Hook, event: str, line: str) -> None:
        name = " ".join(hook.command)
        try:
            result = run_hook(hook.command, line, hook.timeout, {"LVBACKUP_EVENT": event})
        except OSError as e:
            self._warn(f"hook '{name}' for {event} could not start: {e.strerror or e}")
            return
        except Exception as e:  # noqa: BLE001 - an event must never fail the operation
            self._warn(f"hook '{name}' for {event} failed: {e}")
            return
        if result is None:
            self._warn(f"hook '{name}' for {event} timed out after {hook.timeout:g} s "
                       "and was killed")
        elif result[0] != 0:
            code, err = result
            what = (f"was killed by signal {-code}" if code < 0 else f"exited {code}")
            detail = f": {err}" if err else ""
            self._warn(f"hook '{name}' for {event} {what}{detail}")


def run_hook(argv: tuple[str, ...] | list[str], stdin_text: str, timeout: float,
             extra_env: dict[str, str] | None = None) -> tuple[int, str] | None:
    """Run argv with `stdin_text` on its stdin; (exit status, last line of its stderr), or
    None if it outlived `timeout` (then it and its process group were killed).

    Files, not pipes, carry stdin and the output: a hook that ignores its stdin, or leaves
    a child behind holding its stdout, can neither block nor hang lvbackup. Its stdout is
    discarded, so it never mixes with lvbackup's own output (`--json`, `--to-file -`).
    Its environment is lvbackup's without the secrets (secretenv.without_secrets).
    """
    env = {**without_secrets(os.environ), **(extra_env or {})}
    with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as err:
        inp.write(stdin_text.encode() + b"\n")
        inp.seek(0)
        try:
            code = proc.run(argv, stdin=inp, stdout=subprocess.DEVNULL, stderr=err, env=env,
                            timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return None
        err.seek(max(0, err.seek(0, os.SEEK_END) - 4096))
        lines = [ln.strip() for ln in err.read().decode(errors="replace").splitlines()
                 if ln.strip()]
    return code, (lines[-1][:200] if lines else "")
