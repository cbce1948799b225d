"""The quiesce commands, `pre_snapshot:` and `post_snapshot:` (argv lists, no shell), run
around the moment a snapshot (or a group's snapshots) is taken."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..base import proc
from ..base.errors import LvbackupError

COMMAND_TIMEOUT = 600.0   # seconds a quiesce command may take before it is killed


@dataclass(frozen=True)
class Quiesce:
    pre: Sequence[str] | None = None
    post: Sequence[str] | None = None
    warn: Callable[[str], None] = lambda _m: None


@contextmanager
def quiesced(commands: Quiesce | None) -> Iterator[None]:
    """Run `pre` before the block and `post` after it, however the block ends, once `pre`
    ran (also when it failed). LvbackupError if `pre` fails: the block does not run. A
    failing `post` is a warning: the snapshot is taken already."""
    if commands is None or (not commands.pre and not commands.post):
        yield
        return
    try:
        if commands.pre:
            failure = _run(commands.pre)
            if failure:
                raise LvbackupError(f"pre_snapshot command {commands.pre[0]} failed: {failure}; "
                                    "no snapshot was taken")
        yield
    finally:
        if commands.post:
            failure = _run(commands.post)
            if failure:
                commands.warn(f"post_snapshot command {commands.post[0]} failed: {failure}")


def _run(argv: Sequence[str]) -> str | None:
    """None if `argv` succeeded, else why not."""
    try:
        done = proc.run(argv, stdout=proc.DEVNULL, stderr=proc.CAPTURE, timeout=COMMAND_TIMEOUT,
                        own_session=True)
    except subprocess.TimeoutExpired:
        return f"it ran past {COMMAND_TIMEOUT:g} s and was killed"
    except OSError as e:
        return f"cannot run it: {e.strerror or e}"
    if done.returncode == 0:
        return None
    said = ""
    with contextlib.suppress(Exception):
        said = (done.stderr or b"").decode(errors="replace").strip().splitlines()[-1]
    return proc.describe_status(done.returncode) + (f" ({said[:200]})" if said else "")
