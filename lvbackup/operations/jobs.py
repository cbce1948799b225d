"""`lvbackup run [JOB...]`: the backups declared under `jobs:` in the configuration.

One cron line or systemd timer runs every job in turn. Per job: find its source (a volume,
read directly or, with `force`, through a temporary snapshot when it is in use; the newest
snapshot of a volume; or a device), decide full or incremental (`full_every`), back it up
with the job's labels plus `job: <name>`, then apply its retention policy (`keep`) to the
backups of that volume made by that job, then copy the new backup to the job's `copy_to`
configuration (the off-site repository). A failing job never stops the others; the run's
exit status is the worst of the jobs' (see `worst_exit`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timedelta

from .. import lvm
from ..base.errors import (
    EXIT_DAMAGED,
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    LvbackupError,
    UsageError,
)
from ..base.lifecycle import Status
from ..base.timeutil import parse_iso, utcnow
from ..catalog.catalog import BackupRecord
from ..config import JOB_LABEL, Job
from ..session import Session
from ..volumes.sources import SourceFactory
from .copy import copy_backups
from .create import create_backup, newest_snapshot, quiesce_of, select_source
from .groups import create_group
from .prune import prune

# Worst last: a locked run (retry later) is less alarming than a failure, an error that
# needs a person (bad configuration, an in-use volume without force) more, and damage to
# what is already backed up the most.
_SEVERITY = {EXIT_OK: 0, EXIT_LOCKED: 1, EXIT_FAILED: 2, EXIT_USAGE: 3, EXIT_DAMAGED: 4}

ProgressFactory = Callable[[str], AbstractContextManager[Callable[..., None] | None]]


def worst_exit(codes: list[int]) -> int:
    """The run's exit status: 0 if every job succeeded (or had nothing to do), else the
    worst of the jobs' statuses, in the order 75 < 1 < 2 < 3 (others rank with 1)."""
    return max(codes, key=lambda c: _SEVERITY.get(c, _SEVERITY[EXIT_FAILED]), default=EXIT_OK)


def full_or_incremental(job: Job, backups: list[BackupRecord],
                        now: datetime | None = None) -> tuple[bool, str]:
    """(incremental?, why) for the job's next backup; `backups` are the volume's catalog
    rows. Pure. A full backup is due when the job is not incremental, when the volume has
    no available backup, after `full_every` backups counting the last full one, or when the
    last full is `full_every_days` old."""
    if not job.incremental:
        return False, "full: the job is not incremental"
    available = sorted((b for b in backups if b["status"] == Status.AVAILABLE),
                       key=lambda b: (b["data_timestamp"], b["created_at"]))
    if not available:
        return False, "full: the volume has no available backup yet"
    fulls = [b for b in available if not b["is_incremental"]]
    last_full = fulls[-1] if fulls else None
    if last_full is None and (job.full_every is not None or job.full_every_days is not None):
        return False, "full: no full backup of the volume is available"
    why = "incremental"
    if last_full is None:
        return True, why
    if job.full_every is not None:
        since = len(available) - available.index(last_full)
        if since >= job.full_every:
            return False, (f"full: {since} backups since the last full one "
                           f"(full_every: {job.full_every})")
        why = f"incremental: {since} backups since the last full one"
    if job.full_every_days is not None:
        age = (now or utcnow()) - parse_iso(last_full["created_at"])
        if age >= timedelta(days=job.full_every_days):
            return False, (f"full: the last full backup is {age.days} days old "
                           f"(full_every: {job.full_every_days}d)")
        why = f"incremental: the last full backup is {age.days} days old"
    return True, why


def _source(session: Session, job: Job) -> tuple[SourceFactory, str, str, str | None]:
    """(source factory, volume id or name to find its backups, volume name, or a reason to
    skip the job)."""
    if job.device is not None:
        factory, _ = select_source(session.config, device=job.device)
        path = os.path.realpath(job.device)
        return factory, path, path, None
    if job.volume is not None:
        vol = lvm.find_lv(job.volume)
        factory, _ = select_source(session.config, volume=job.volume, force=job.force,
                                   keep_snapshot=job.keep_snapshot,
                                   quiesce=quiesce_of(session.config, job.pre_snapshot,
                                                      job.post_snapshot))
        return factory, vol.uuid, vol.full_name, None
    assert job.snapshot_of is not None
    origin, snap = newest_snapshot(job.snapshot_of)
    done = [b for b in session.catalog.candidates(origin.uuid)
            if b["snapshot_id"] == snap.uuid and b["status"] == Status.AVAILABLE]
    skip = (f"the newest snapshot {snap.full_name} is already backed up ({done[0]['id']})"
            if done else None)
    factory, _ = select_source(session.config, snapshot=snap.full_name)
    return factory, origin.uuid, origin.full_name, skip


def run_job(session: Session, job: Job, *, progress: ProgressFactory | None = None,
            log: Callable[[str], None] | None = None) -> dict:
    """Run one job; never raises an LvbackupError (it is reported in the result)."""
    log = log or (lambda _m: None)
    started = time.monotonic()
    result: dict = {"job": job.name, "source": job.source, "status": "failed",
                    "exit_code": EXIT_FAILED, "error": None, "kind": None, "why": None,
                    "backup": None, "group": None, "pruned": [], "reparented": [],
                    "copied": [], "duration_seconds": None}
    stage = "backup"
    try:
        if job.volumes:
            _run_group(session, job, result, progress, log)
            return result
        factory, volume_key, volume_name, skip = _source(session, job)
        if skip:
            result.update(status="skipped", exit_code=EXIT_OK, why=skip)
            log(f"job {job.name}: skipped: {skip}")
            return result
        incremental, why = full_or_incremental(job, session.catalog.list(volumes=[volume_key]))
        result.update(kind="incremental" if incremental else "full", why=why)
        log(f"job {job.name}: backing up {volume_name}: {why}")
        with (progress(job.name) if progress else nullcontext()) as bar:
            created = create_backup(
                session, factory, incremental=incremental, name=job.name,
                labels={**job.labels, JOB_LABEL: job.name}, progress=bar,
                source_name=volume_name)
        result["backup"] = created.record
        if job.keep is not None:
            stage = "retention"
            report = prune(session, job.keep, volumes=[created.record["volume_id"]],
                                     labels={JOB_LABEL: job.name})
            result["pruned"] = report["deleted"]
            result["reparented"] = report["reparented"]
        if job.copy_to is not None:
            stage = f"the copy to {job.copy_to}"
            copied = copy_backups(session, job.copy_to, [created.record["id"]], False, None)
            result["copied"] = copied.copied
        result.update(status="ok", exit_code=EXIT_OK)
    except LvbackupError as e:
        msg = (str(e) if stage == "backup" else
               f"the backup succeeded, but {stage} failed: {e}")
        result.update(error=msg, exit_code=e.exit_code)
    except Exception as e:  # noqa: BLE001 - one job's bug must not stop the others
        result.update(error=f"internal error: {type(e).__name__}: {e}", exit_code=EXIT_FAILED)
    finally:
        result["duration_seconds"] = round(time.monotonic() - started, 3)
    if result["error"]:
        log(f"job {job.name}: FAILED: {result['error']}")
    return result


def _run_group(session: Session, job: Job, result: dict, progress: ProgressFactory | None,
               log: Callable[[str], None]) -> None:
    """A job with `volumes:`: a group backup named after the job, whose kind follows the
    backups of its first volume in the group; its retention keeps or drops whole groups."""
    first = lvm.find_lv(job.volumes[0])
    history = [b for b in session.catalog.group(job.name) if b["volume_id"] == first.uuid]
    incremental, why = full_or_incremental(job, history)
    result.update(kind="incremental" if incremental else "full", why=why)
    log(f"job {job.name}: backing up the group {', '.join(job.volumes)}: {why}")
    group = create_group(
        session, job.name, list(job.volumes), incremental=incremental, force=job.force,
        keep_snapshot=bool(job.keep_snapshot if job.keep_snapshot is not None
                           else session.config.keep_snapshot),
        labels={**job.labels, JOB_LABEL: job.name},
        quiesce=quiesce_of(session.config, job.pre_snapshot, job.post_snapshot),
        progress=progress)
    result["group"] = group
    result["backup"] = group["backups"][0]
    if job.keep is not None:
        try:
            report = prune(session, job.keep, volumes=[first.uuid],
                           labels={JOB_LABEL: job.name})
        except LvbackupError as e:
            raise LvbackupError(f"the backup succeeded, but retention failed: {e}") from None
        result["pruned"] = report["deleted"]
        result["reparented"] = report["reparented"]
    if job.copy_to is not None:
        ids = [b["id"] for b in group["backups"]]
        try:
            result["copied"] = copy_backups(session, job.copy_to, ids, False, None).copied
        except LvbackupError as e:
            raise LvbackupError(f"the backup succeeded, but the copy to {job.copy_to} "
                                f"failed: {e}") from None
    result.update(status="ok", exit_code=EXIT_OK)


def run_jobs(session: Session, names: list[str] | tuple[str, ...] = (), *,
             progress: ProgressFactory | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Run the named jobs (all, in the configuration's order, if none are named)."""
    jobs = session.config.jobs
    if not jobs:
        raise UsageError(f"no jobs in the configuration {session.config.source}: add a 'jobs:' "
                         "section (see lvbackup.yaml.example)")
    unknown = [n for n in names if n not in jobs]
    if unknown:
        raise UsageError(f"no job named {', '.join(unknown)} in {session.config.source} "
                         f"(jobs: {', '.join(jobs)})")
    session.require_repository()   # one line for the run, not one failure per job
    session.keep_reserve()    # it stores backups (reserve.py)
    chosen = list(dict.fromkeys(names)) if names else list(jobs)
    results = [run_job(session, jobs[n], progress=progress, log=log) for n in chosen]
    # Under Object Lock, what the kept backups need stays locked (gc may never run here,
    # as on an append_only host).
    try:
        session.repo.storage.extend_locks()
    except LvbackupError as e:
        session.warn(f"the Object Lock of the repository's objects was not extended: {e}")
    code = worst_exit([r["exit_code"] for r in results])
    return {"ok": code == EXIT_OK, "exit_code": code, "jobs": results}
