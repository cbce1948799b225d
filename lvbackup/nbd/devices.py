"""The commands behind a mapped backup: nbdkit serving it on a Unix socket, the kernel's
NBD client (module `nbd`, attached by `nbd-client`) making it /dev/nbdN, and blkid, mount
and umount for what is on it. Argv lists only. nbdkit inherits lvbackup's environment (it
opens the repository with the same secrets, then drops them: server.py); the other
commands never see the secrets."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import lvbackup

from ..base import proc
from ..base.errors import LvbackupError, UsageError
from ..base.proc import find_tool
from ..base.secretenv import without_secrets

START_TIMEOUT = 120.0   # seconds for nbdkit to load its Python and open the backup
STOP_TIMEOUT = 10.0
LOGICAL_BLOCK = 512     # any filesystem's sector size fits
# Larger requests and readahead than the kernel's 128 KiB defaults: each request costs a
# Python call in the server, and sequential reads (file copies, dd) come in fewer of them.
QUEUE_SETTINGS = {"max_sectors_kb": 1024, "read_ahead_kb": 2048}
_PACKAGES = {"nbdkit": "nbdkit and nbdkit-plugin-python", "nbd-client": "nbd-client",
             "modprobe": "kmod", "blkid": "util-linux", "blockdev": "util-linux",
             "mount": "mount", "umount": "mount"}
_NBD = re.compile(r"^nbd(\d+)$")


def run(argv: list[str], what: str) -> str:
    """Run a command; its stdout, or LvbackupError with the last line it printed."""
    exe = find_tool(argv[0])
    if exe is None:
        raise UsageError(f"{argv[0]} is not installed; install {_PACKAGES[argv[0]]}")
    p = proc.run([exe, *argv[1:]], env={**without_secrets(os.environ), "LC_ALL": "C"})
    assert p.stdout is not None and p.stderr is not None
    if p.returncode != 0:
        raise LvbackupError(f"{what} failed: {_last_line(p.stderr + p.stdout, p.returncode)}")
    return p.stdout.decode(errors="replace")


def _last_line(output: bytes, status: int) -> str:
    lines = [ln.strip() for ln in output.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else proc.describe_status(status)


# --- the server ------------------------------------------------------------------------

def start_server(run_dir: Path, params: dict[str, str], overlay_dir: Path | None,
                 writable: bool = False) -> int:
    """Start nbdkit serving a backup on run_dir/socket (through a copy-on-write overlay in
    `overlay_dir` if given, else read-only unless the export itself is `writable`); its
    pid once it accepts connections. It runs on after lvbackup exits; its messages go to
    run_dir/log."""
    exe = find_tool("nbdkit")
    if exe is None:
        raise UsageError(f"nbdkit is not installed; install {_PACKAGES['nbdkit']}")
    plugin = Path(__file__).with_name("nbdkit_plugin.py")
    # lvbackup's own directory first, then its environment's (compiled) dependencies.
    path = [str(Path(lvbackup.__file__).resolve().parents[1]), *site.getsitepackages()]
    # Not --foreground: a foreground nbdkit exits with its parent. It daemonizes once it
    # has opened the backup (get_ready) and listens; its pid file follows.
    argv = [exe, "--log=stderr", f"--pidfile={run_dir / 'pid'}",
            f"--unix={run_dir / 'socket'}",
            *(["--filter=cow"] if overlay_dir is not None else [] if writable
              else ["--readonly"]),
            "python", str(plugin), f"python={sys.version_info.major}.{sys.version_info.minor}",
            f"path={':'.join(path)}", *(f"{k}={v}" for k, v in params.items())]
    env = dict(os.environ)
    if overlay_dir is not None:
        env["TMPDIR"] = str(overlay_dir)   # where the cow filter keeps the overlay
    status: int | None
    with open(run_dir / "log", "ab") as log:
        try:
            status = proc.run(argv, stdout=log, stderr=log, env=env,
                              timeout=START_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            status = None
    deadline = time.monotonic() + STOP_TIMEOUT
    while status == 0 and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int((run_dir / "pid").read_text())
        time.sleep(0.05)
    raise LvbackupError("nbdkit could not serve the backup: " + server_error(run_dir, status))


def server_error(run_dir: Path, status: int | None) -> str:
    """The last thing the server said (its Python exception, typically)."""
    try:
        text = (run_dir / "log").read_bytes()
    except OSError:
        text = b""
    lines = [ln for ln in text.decode(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines
    return errors[-1].strip() if errors else f"exit status {status}"


def stop_server(pids: list[int], alive) -> None:
    """Terminate a map's server processes; `alive()` tells when they have let go."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive():
            return
    raise LvbackupError(f"nbdkit (pid {', '.join(map(str, pids))}) did not exit")


# --- the kernel's NBD client -----------------------------------------------------------

def load_module() -> None:
    """Root, and the kernel's NBD client loaded (modprobe nbd if it is not)."""
    if os.geteuid() != 0:
        raise UsageError("mapping a backup needs root: run lvbackup as root")
    if Path("/sys/module/nbd").exists():
        return
    try:
        run(["modprobe", "nbd"], "loading the kernel's NBD client (modprobe nbd)")
    except LvbackupError as e:
        raise UsageError(f"{e}; this kernel has no NBD client (module nbd)") from None


def free_devices() -> list[str]:
    """NBD devices not attached to anything, lowest first."""
    found = []
    for entry in Path("/sys/block").iterdir():
        m = _NBD.match(entry.name)
        if m and _sysfs(entry / "size") == "0" and not (entry / "pid").exists():
            found.append((int(m.group(1)), f"/dev/{entry.name}"))
    return [dev for _, dev in sorted(found)]


def is_attached(device: str) -> bool:
    return _sysfs(Path("/sys/block") / Path(device).name / "size") not in (None, "0")


def _sysfs(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def attach(device: str, socket: Path, writable: bool) -> None:
    argv = ["nbd-client", "-unix", str(socket), device, "-block-size", str(LOGICAL_BLOCK)]
    run(argv + ([] if writable else ["-readonly"]), f"attaching {device} (nbd-client)")
    queue = Path("/sys/block") / Path(device).name / "queue"
    for name, value in QUEUE_SETTINGS.items():
        limit = _sysfs(queue / "max_hw_sectors_kb") if name == "max_sectors_kb" else None
        with contextlib.suppress(OSError):   # a kernel that refuses: its defaults cost speed
            (queue / name).write_text(str(min(value, int(limit)) if limit else value))


def detach(device: str) -> None:
    run(["nbd-client", "-d", device], f"detaching {device} (nbd-client -d)")


# --- filesystems -----------------------------------------------------------------------

def rescan_partitions(device: str) -> None:
    """Ask the kernel to read the partition table again (BLKRRPART): nbd-client's own
    rescan may still be on its way, or not have happened."""
    with contextlib.suppress(LvbackupError):
        run(["blockdev", "--rereadpt", device], f"reading the partition table of {device}")


def wait_for(path: str, seconds: float) -> bool:
    """Whether `path` exists within `seconds` (partition nodes appear after a rescan)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def filesystem_type(device: str) -> str | None:
    try:
        out = run(["blkid", "-p", "-o", "value", "-s", "TYPE", device],
                  f"probing {device} (blkid)")
    except LvbackupError:
        return None
    return out.strip() or None


def mount(device: str, mountpoint: str, fstype: str, writable: bool) -> None:
    """Mount read-only unless `writable`, without replaying a journal into a read-only
    device (ext3/ext4 `noload`, xfs `norecovery`)."""
    options = [] if writable else ["ro"] + {"ext3": ["noload"], "ext4": ["noload"],
                                           "xfs": ["norecovery"]}.get(fstype, [])
    run(["mount", "-t", fstype, *(["-o", ",".join(options)] if options else []), device,
         mountpoint], f"mounting {device} on {mountpoint}")


def umount(mountpoint: str) -> None:
    run(["umount", mountpoint], f"unmounting {mountpoint}")


def mounts() -> list[tuple[str, str]]:
    """(source, mount point) of every mount, from /proc/self/mounts."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 2:
                found.append((_unescape(fields[0]), _unescape(fields[1])))
    return found


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mountpoints_of(device: str) -> list[str]:
    """Where `device` or one of its partitions (/dev/nbd0p1) is mounted."""
    pattern = re.compile(re.escape(device) + r"(p\d+)?$")
    return [point for source, point in mounts() if pattern.match(source)]
