"""Prometheus metrics for node_exporter's textfile collector.

After every backup (from `create` or `run`) the series of its volume are updated in the
`metrics:` file; the series of other volumes are kept, so one file covers every volume.
The file is rewritten atomically (a temporary file in the same directory, fsynced, then
renamed over it), so the collector never reads half a file, and updates are serialised by
a lock file in lvbackup's lock directory, so concurrent runs never lose each other's series.

    lvbackup_last_success_timestamp_seconds{volume="vg0/data"}  last successful backup
    lvbackup_last_run_timestamp_seconds{volume=...}             last backup, ok or not
    lvbackup_last_status{volume=...}                            1 ok, 0 failed
    lvbackup_last_duration_seconds{volume=...}                  of the last backup
    lvbackup_last_bytes_read{volume=...}                        of the last successful one
    lvbackup_last_bytes_stored{volume=...}                      of the last successful one
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .diskio import AtomicFile
from .locks import FileLock

METRICS: dict[str, tuple[str, str]] = {
    "lvbackup_last_success_timestamp_seconds":
        ("gauge", "Unix time of the volume's last successful backup."),
    "lvbackup_last_run_timestamp_seconds":
        ("gauge", "Unix time the volume's last backup ended, successful or not."),
    "lvbackup_last_status":
        ("gauge", "1 if the volume's last backup succeeded, 0 if it failed."),
    "lvbackup_last_duration_seconds":
        ("gauge", "Duration of the volume's last backup, in seconds."),
    "lvbackup_last_bytes_read":
        ("gauge", "Bytes read from the volume by its last successful backup."),
    "lvbackup_last_bytes_stored":
        ("gauge", "Bytes the volume's last successful backup added to the repository."),
}

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{volume="((?:[^"\\]|\\.)*)"\}\s+(\S+)')


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def read_samples(path: Path) -> dict[str, dict[str, str]]:
    """{metric: {volume: value}} of lvbackup's series in an existing file."""
    samples: dict[str, dict[str, str]] = {}
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return samples
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in METRICS:
            samples.setdefault(m.group(1), {})[_unescape(m.group(2))] = m.group(3)
    return samples


def render(samples: dict[str, dict[str, str]]) -> str:
    out = []
    for metric, (kind, help_text) in METRICS.items():
        series = samples.get(metric) or {}
        if not series:
            continue
        out.append(f"# HELP {metric} {help_text}")
        out.append(f"# TYPE {metric} {kind}")
        for volume in sorted(series):
            out.append(f'{metric}{{volume="{_escape(volume)}"}} {series[volume]}')
    return "\n".join(out) + "\n" if out else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def record_backup(path: Path, lock_dir: Path, volume: str, *, ok: bool, ended_at: float,
                  duration: float, bytes_read: int | None = None,
                  bytes_stored: int | None = None) -> None:
    """Update `volume`'s series in the textfile at `path` (raises OSError on failure)."""
    path = Path(path)
    with FileLock(Path(lock_dir) / "metrics.lock", "the metrics file").acquire(30):
        samples = read_samples(path)

        def put(metric: str, value: float) -> None:
            samples.setdefault(metric, {})[volume] = _number(value)

        put("lvbackup_last_run_timestamp_seconds", ended_at)
        put("lvbackup_last_status", 1 if ok else 0)
        put("lvbackup_last_duration_seconds", round(duration, 3))
        if ok:
            put("lvbackup_last_success_timestamp_seconds", ended_at)
            if bytes_read is not None:
                put("lvbackup_last_bytes_read", bytes_read)
            if bytes_stored is not None:
                put("lvbackup_last_bytes_stored", bytes_stored)
        write_atomic(path, render(samples))


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically; readable by the node_exporter (0644)."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o755)   # the node_exporter must reach it, whatever the umask
    # A temporary name the textfile collector ignores (it reads only *.prom).
    with AtomicFile(path, mode=0o644) as f:
        os.write(f.fd, text.encode())
        os.fchmod(f.fd, 0o644)  # whatever the umask
