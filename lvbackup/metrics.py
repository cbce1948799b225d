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
    lvbackup_last_read_bytes{volume=...}                        of the last successful one
    lvbackup_last_stored_bytes{volume=...}                      of the last successful one

and after every `copy` (the command, or a job's `copy_to`), for each volume copied:

    lvbackup_last_copy_success_timestamp_seconds{volume=...}    last successful copy
    lvbackup_last_copy_status{volume=...}                       1 ok, 0 failed
    lvbackup_last_copy_sent_bytes{volume=...}                   of the last successful one

and after every group backup (`create --group`; its members have their volumes' series):

    lvbackup_group_last_success_timestamp_seconds{group="db"}   last successful one
    lvbackup_group_last_status{group=...}                       1 ok, 0 failed

and while an instant restore copies a backup into an LV (`volume` is the LV restored onto):

    lvbackup_restore_hydrated_bytes{volume="vg0/data"}          bytes copied into the LV
    lvbackup_restore_total_bytes{volume=...}                    bytes to copy in all

and after every sampled deep verification (`verify --sample` or `--max-duration`), for the
repository (its location as configured):

    lvbackup_verify_oldest_unverified_age_seconds{repository="/srv/backup"}
        how long the chunk that has gone longest without being read had gone (at that run)
    lvbackup_verify_oldest_unverified_timestamp_seconds{repository=...}
        when it was last read (for an alert that ages between runs: time() - this)
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from .base.diskio import AtomicFile
from .base.locks import FileLock

METRICS: dict[str, tuple[str, str]] = {
    "lvbackup_last_success_timestamp_seconds":
        ("gauge", "Unix time of the volume's last successful backup."),
    "lvbackup_last_run_timestamp_seconds":
        ("gauge", "Unix time the volume's last backup ended, successful or not."),
    "lvbackup_last_status":
        ("gauge", "1 if the volume's last backup succeeded, 0 if it failed."),
    "lvbackup_last_duration_seconds":
        ("gauge", "Duration of the volume's last backup, in seconds."),
    "lvbackup_last_read_bytes":
        ("gauge", "Bytes read from the volume by its last successful backup."),
    "lvbackup_last_stored_bytes":
        ("gauge", "Bytes the volume's last successful backup added to the repository."),
    "lvbackup_last_copy_success_timestamp_seconds":
        ("gauge", "Unix time of the last successful copy of the volume's backups."),
    "lvbackup_last_copy_status":
        ("gauge", "1 if the last copy of the volume's backups succeeded, 0 if it failed."),
    "lvbackup_last_copy_sent_bytes":
        ("gauge", "Bytes the last successful copy of the volume's backups stored in the "
                  "target repository."),
    "lvbackup_group_last_success_timestamp_seconds":
        ("gauge", "Unix time of the group's last successful group backup."),
    "lvbackup_group_last_status":
        ("gauge", "1 if the group's last group backup succeeded, 0 if it failed."),
    "lvbackup_restore_hydrated_bytes":
        ("gauge", "Bytes an instant restore onto the volume has copied into it so far."),
    "lvbackup_restore_total_bytes":
        ("gauge", "Bytes an instant restore onto the volume copies in all."),
    "lvbackup_verify_oldest_unverified_age_seconds":
        ("gauge", "Seconds since the repository's least recently verified chunk was read by "
                  "a deep verification, as of the last sampled verification."),
    "lvbackup_verify_oldest_unverified_timestamp_seconds":
        ("gauge", "Unix time the repository's least recently verified chunk was last read "
                  "(for a chunk never read: when sampled verification began)."),
}
# The label of a metric's series: the volume, or for these the repository.
_REPOSITORY_METRICS = frozenset({"lvbackup_verify_oldest_unverified_age_seconds",
                                 "lvbackup_verify_oldest_unverified_timestamp_seconds"})

_GROUP_METRICS = frozenset({"lvbackup_group_last_success_timestamp_seconds",
                            "lvbackup_group_last_status"})

_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(?:volume|repository|group)="((?:[^"\\]|\\.)*)"\}\s+(\S+)')


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
        label = ("repository" if metric in _REPOSITORY_METRICS
                 else "group" if metric in _GROUP_METRICS else "volume")
        for volume in sorted(series):
            out.append(f'{metric}{{{label}="{_escape(volume)}"}} {series[volume]}')
    return "\n".join(out) + "\n" if out else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def record_backup(path: Path, lock_dir: Path, volume: str, *, ok: bool, ended_at: float,
                  duration: float, bytes_read: int | None = None,
                  bytes_stored: int | None = None) -> None:
    """Update `volume`'s series in the textfile at `path` (raises OSError on failure)."""
    values: dict[str, float] = {"lvbackup_last_run_timestamp_seconds": ended_at,
                                "lvbackup_last_status": 1 if ok else 0,
                                "lvbackup_last_duration_seconds": round(duration, 3)}
    if ok:
        values["lvbackup_last_success_timestamp_seconds"] = ended_at
        if bytes_read is not None:
            values["lvbackup_last_read_bytes"] = bytes_read
        if bytes_stored is not None:
            values["lvbackup_last_stored_bytes"] = bytes_stored
    _update(path, lock_dir, {volume: values})


def record_group(path: Path, lock_dir: Path, group: str, *, ok: bool, ended_at: float) -> None:
    """Update group `group`'s series (raises OSError on failure)."""
    values: dict[str, float] = {"lvbackup_group_last_status": 1 if ok else 0}
    if ok:
        values["lvbackup_group_last_success_timestamp_seconds"] = ended_at
    _update(path, lock_dir, {group: values})


def record_copy(path: Path, lock_dir: Path, volumes: list[str], *, ok: bool, ended_at: float,
                bytes_sent: dict[str, int]) -> None:
    """Update the copy series of `volumes` (raises OSError on failure)."""
    values: dict[str, dict[str, float]] = {}
    for volume in volumes:
        values[volume] = {"lvbackup_last_copy_status": 1 if ok else 0}
        if ok:
            values[volume].update({"lvbackup_last_copy_success_timestamp_seconds": ended_at,
                                   "lvbackup_last_copy_sent_bytes": bytes_sent.get(volume, 0)})
    _update(path, lock_dir, values)


def record_hydration(path: Path, lock_dir: Path, volume: str, *, hydrated: int,
                     total: int) -> None:
    """Update an instant restore's progress series (raises OSError on failure)."""
    _update(path, lock_dir, {volume: {"lvbackup_restore_hydrated_bytes": hydrated,
                                      "lvbackup_restore_total_bytes": total}})


def record_verify(path: Path, lock_dir: Path, repository: str, *,
                  oldest_unverified: float) -> None:
    """Update a repository's verification series (raises OSError on failure)."""
    _update(path, lock_dir, {repository: {
        "lvbackup_verify_oldest_unverified_age_seconds":
            round(max(0.0, time.time() - oldest_unverified)),
        "lvbackup_verify_oldest_unverified_timestamp_seconds": round(oldest_unverified)}})


def best_effort(path: Path | None, warn: Callable[[str], None],
                write: Callable[[Path], None]) -> None:
    """write(path) if metrics are configured; a failure is a warning: metrics never fail
    the backup or copy they describe."""
    if path is None:
        return
    try:
        write(path)
    except Exception as e:  # noqa: BLE001 - reported, never raised
        warn(f"cannot write the metrics file {path}: {getattr(e, 'strerror', None) or e}")


def _update(path: Path, lock_dir: Path, values: dict[str, dict[str, float]]) -> None:
    """Set {volume: {metric: value}} in the file, keeping every other series."""
    path = Path(path)
    with FileLock(Path(lock_dir) / "metrics.lock", "the metrics file").acquire(30):
        samples = read_samples(path)
        for volume, metrics in values.items():
            for metric, value in metrics.items():
                samples.setdefault(metric, {})[volume] = _number(value)
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
