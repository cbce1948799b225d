"""Helpers for the lvbackup LVM tests: module-scoped VGs and configs, concurrent CLI runs,
processes that hold an LV open, and content generators.

Every lvbackup invocation costs ~5 s in the emulated VM (mostly Python imports) and every
LVM command ~0.5 s, so the test modules share one VG and one repository per module and run
independent commands two at a time (the guest has two vCPUs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
KiB = 1 << 10


def _conftest():
    """tests/lvm/conftest.py as pytest imported it (its classes and teardown helper)."""
    path = HERE / "conftest.py"
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == path:
            return mod
    spec = importlib.util.spec_from_file_location("_lvm_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ct = _conftest()
VolumeGroup = ct.VolumeGroup


# --- VGs and configs shared by a module ----------------------------------------------------

def module_vg(directory: Path, size: int = 2 << 30):
    """Like conftest's `vg` fixture, for a module-scoped fixture (a context manager)."""
    return ct.throwaway_vg(directory, "lvbm", size)


class Lvb(ct.Lvbackup):
    """conftest's Lvbackup plus: extra config keys, background and concurrent runs."""

    def __init__(self, directory: Path, **settings):
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "lvbackup.yaml"
        lines = {"repository": str(directory / "repo"), "catalog": str(directory / "catalog.db"),
                 **settings}
        config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in lines.items()))
        super().__init__(config)
        self.catalog = directory / "catalog.db"

    def argv(self, *args) -> list[str]:
        return [str(self.exe), "--config", str(self.config), *map(str, args)]

    def start(self, *args, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, **kw)

    def parallel(self, *calls: tuple, env: dict | None = None
                 ) -> list[subprocess.CompletedProcess]:
        """Run several invocations at once; each call is a tuple of arguments."""
        procs = [(c, self.start(*c, env=env)) for c in calls]
        done = []
        for c, p in procs:
            out, err = p.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(self.argv(*c), p.returncode, out, err))
        return done

    def rows(self) -> list[dict]:
        """The catalog's rows, read directly (cheaper than `lvbackup list` in the VM)."""
        con = sqlite3.connect(self.catalog, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("SELECT * FROM backups ORDER BY created_at")]
        finally:
            con.close()

    def row(self, backup_id: str) -> dict:
        rows = [r for r in self.rows() if r["id"] == backup_id]
        assert len(rows) == 1, backup_id
        return rows[0]


def ok_json(p: subprocess.CompletedProcess):
    """The JSON document of a successful `lvbackup --json` run."""
    assert p.returncode == 0, describe(p)
    return json.loads(p.stdout)


def describe(p: subprocess.CompletedProcess) -> str:
    return (f"{' '.join(map(str, p.args))} exited {p.returncode}\nstderr: "
            f"{p.stderr.decode(errors='replace')}\nstdout: {p.stdout.decode(errors='replace')}")


def assert_refused(p: subprocess.CompletedProcess, message: str, code: int | None = 2) -> str:
    """Failed with `code` (None: any failure), one line on stderr containing `message`,
    no traceback; returns that line."""
    err = p.stderr.decode(errors="replace")
    assert p.returncode != 0 if code is None else p.returncode == code, describe(p)
    assert "Traceback" not in err, describe(p)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, describe(p)
    assert message in lines[0], describe(p)
    return lines[0]


# --- LVM facts ----------------------------------------------------------------------------

def lv_time_iso(lv_time: str) -> str:
    """lvs' "2026-11-24 17:04:35 +0000" as lvbackup stores times (UTC, microseconds)."""
    ts = datetime.strptime(lv_time.strip(), "%Y-%m-%d %H:%M:%S %z").astimezone(UTC)
    return ts.isoformat(timespec="microseconds")


def info(vg: VolumeGroup, name: str) -> dict[str, str]:
    return vg.lv(name, "lv_uuid", "lv_time", "lv_tags", "segtype")


def temp_snapshots(vg: VolumeGroup) -> list[str]:
    return [r["lv_name"] for r in vg.lvs("lv_tags") if "lvbackup_temp" in r["lv_tags"].split(",")]


def next_second(vg: VolumeGroup, name: str) -> None:
    """Sleep until whatever LVM creates next gets a later lv_time than `name` (lv_time has
    one-second resolution)."""
    sleep_past_second_of(lv_time_iso(info(vg, name)["lv_time"]))


def sleep_past_second_of(iso: str) -> None:
    """Sleep until the clock is in a later whole second than the ISO 8601 time `iso`."""
    later = datetime.fromisoformat(iso).replace(microsecond=0) + timedelta(seconds=1,
                                                                          milliseconds=50)
    while datetime.now(UTC) < later:
        time.sleep(0.05)


@contextmanager
def held_open(path: str) -> Iterator[subprocess.Popen]:
    """A process holding `path` open (the LV's 6th lv_attr character becomes 'o')."""
    p = subprocess.Popen(["sh", "-c", 'exec 3<"$1"; echo ready; exec sleep 600', "sh", path],
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert p.stdout.readline() == b"ready\n", f"could not open {path}"
        yield p
    finally:
        p.kill()
        p.wait()


def wait_for_rows(lvb: Lvb, procs: dict[str, subprocess.Popen], status: str,
                  timeout: float = 120, freeze: bool = False) -> dict[str, dict]:
    """Poll the catalog until each run in `procs` (keyed by the LV name it backs up) has a
    row in `status`; return {LV name: row}. With `freeze`, each run is stopped (SIGSTOP)
    as soon as its row is seen, so that it is still mid-backup when the caller looks;
    the caller sends SIGCONT. A `creating` row counts once its size is recorded, i.e. once
    the run has its source open (a temporary snapshot, if any, exists)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, dict] = {}
    while time.monotonic() < deadline:
        try:
            rows = {r["volume_name"].split("/")[-1]: r for r in lvb.rows()
                    if r["status"] == status and (status != "creating" or r["size"] is not None)}
        except sqlite3.OperationalError:  # the catalog is still being created
            rows = {}
        for name, p in procs.items():
            if name in seen:
                continue
            if name in rows:
                if freeze:
                    p.send_signal(signal.SIGSTOP)
                seen[name] = rows[name]
            elif p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"{name}: lvbackup exited {p.returncode} before its row was "
                            f"{status}:\n{err.decode(errors='replace')}")
        if seen.keys() == procs.keys():
            return seen
        time.sleep(0.01)
    pytest.fail(f"the runs did not all reach {status} within {timeout} s")


def children(pid: int, comm: str) -> list[int]:
    """Pids of the child processes of `pid` running the program `comm`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if name == comm and int(rest.split()[1]) == pid:
            found.append(int(entry))
    return found


def has_open(pid: int, device: str) -> bool:
    """Whether process `pid` has the block device `device` open."""
    rdev = os.stat(device).st_rdev
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if st.st_rdev == rdev and not os.path.isfile(f"/proc/{pid}/fd/{fd}"):
            return True
    return False


# --- content ------------------------------------------------------------------------------

def mixed(size: int, seed: bytes = b"") -> bytes:
    """Per MiB: 256 KiB random, 256 KiB zeros, 128 KiB text, 384 KiB zeros (cheap to make
    in the emulated guest, with holes a restore must write back over garbage)."""
    text = (b"lvbackup " + seed + b" ") * (128 * KiB // (10 + len(seed)) + 1)
    out = bytearray()
    for mib in range(0, size, MiB):
        out += os.urandom(256 * KiB) + bytes(256 * KiB)
        out += (str(mib).encode() + text)[:128 * KiB] + bytes(384 * KiB)
    return bytes(out[:size])


def garbage(size: int) -> bytes:
    """Non-zero filler: what a restore must overwrite (zero regions included)."""
    return (b"\xa5GARBAGE" + os.urandom(8)) * (size // 16) + b"\xa5" * (size % 16)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
